"""Relative positional multi-head self-attention, with layer-wise map reuse (SPEC sections 1-2).

The computing layer follows ESPnet's ``RelPositionMultiHeadedAttention`` ("latest" rel-pos,
Transformer-XL style)::

    scores = ((q + u) k^T + rel_shift((q + v) p^T)) / sqrt(d_k),   p = linear_pos(pos_emb)

with learned biases ``u = pos_bias_u``, ``v = pos_bias_v`` and ``linear_pos`` without bias.
A *reuse* layer owns no query, key or positional parameters: it applies the map computed by the
first layer of its group to its own values, whose width is doubled (``W_V: d -> 2d``,
``W_O: 2d -> d``) to keep the parameter count.

Shapes: ``x (B, T, d)``, ``pos_emb (1, 2T-1, d)``, ``key_padding_mask (B, T)`` True at padding,
attention maps ``(B, H, T, T)`` with rows over query frames.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RelPositionalEncoding(nn.Module):
    """Sinusoidal encodings of relative positions ``T-1, ..., 0, ..., -(T-1)`` (ESPnet's
    ``RelPositionalEncoding``). Also scales the input by ``sqrt(d_model)`` and applies dropout."""

    def __init__(self, d_model: int, dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)

    def encodings(self, length: int, device=None, dtype=None) -> torch.Tensor:
        """``(1, 2 * length - 1, d_model)``: row ``k`` encodes relative position ``length - 1 - k``."""
        pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(torch.arange(0, self.d_model, 2, device=device, dtype=torch.float32)
                        * -(math.log(10000.0) / self.d_model))
        pe = torch.zeros(2 * length - 1, self.d_model, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return pe.unsqueeze(0).to(dtype or torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos_emb = self.encodings(x.size(1), x.device, x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, 2T-1)`` scores against relative positions ``T-1..-(T-1)`` -> ``(B, H, T, T)``
    with ``out[..., i, j] = x[..., i, T-1-i+j]``, the score at relative position ``i - j``.

    Transformer-XL's shift, done as a strided view (no zero-padding copy): element ``(i, j)`` lies
    at flat offset ``i (2T-1) + T-1-i+j = i (2T-2) + j + T-1`` of each ``(T, 2T-1)`` block.
    """
    b, h, t, n = x.shape
    if n != 2 * t - 1:
        raise ValueError(f"rel_shift expects (B, H, T, 2T-1) scores; got {tuple(x.shape)}")
    x = x.contiguous()
    sb, sh = x.stride(0), x.stride(1)
    return x.as_strided((b, h, t, t), (sb, sh, n - 1, 1), storage_offset=x.storage_offset() + t - 1)


def relative_position_scores(q: torch.Tensor, p: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``rel_shift(q @ p^T)`` for ``q (B, H, T, d_k)`` and ``p (1 or B, H, 2T-1, d_k)``, contiguous.

    Row ``i`` only needs positions ``T-1-i .. 2T-2-i``, so rows are taken ``chunk`` at a time,
    each against the ``T + chunk - 1`` positions it needs: ``T (T + chunk)`` dot products instead of
    ``T (2T - 1)``. Default chunk: ``T / 8`` for long inputs (one chunk below 256 frames).
    """
    t = q.shape[-2]
    chunk = chunk or (t if t < 256 else max(32, -(-t // 8)))
    if chunk >= t:
        return rel_shift(q @ p.transpose(-2, -1)).contiguous()
    parts = []
    for a in range(0, t, chunk):
        c = min(chunk, t - a)
        window = p[..., t - a - c: 2 * t - 1 - a, :]  # positions needed by rows a .. a+c-1
        y = (q[..., a:a + c, :] @ window.transpose(-2, -1)).contiguous()  # (B, H, c, T + c - 1)
        n = y.shape[-1]
        parts.append(y.as_strided((*y.shape[:2], c, t), (y.stride(0), y.stride(1), n - 1, 1),
                                  storage_offset=y.storage_offset() + c - 1))
    return torch.cat(parts, dim=-2)


def weak_attention_suppression(attn: torch.Tensor, key_padding_mask: torch.Tensor | None, gamma: float) -> torch.Tensor:
    """Zero probabilities below ``mean - gamma * std`` of their row (over valid keys), renormalise."""
    if key_padding_mask is None:
        valid = torch.ones_like(attn, dtype=torch.bool)
    else:
        valid = ~key_padding_mask[:, None, None, :].expand_as(attn)
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    mean = attn.sum(-1, keepdim=True) / n
    var = ((attn - mean).pow(2) * valid).sum(-1, keepdim=True) / n
    kept = attn * (attn >= mean - gamma * var.sqrt())
    return kept / kept.sum(-1, keepdim=True).clamp_min(torch.finfo(attn.dtype).tiny)


class MultiHeadSelfAttention(nn.Module):
    """Relative positional multi-head self-attention; with ``reuse=True`` a layer that applies a
    shared map to its own (double-width) values.

    Args:
        d_model: model width ``d``.
        num_heads: heads ``H``; head width ``d / H`` (``2d / H`` for the values of a reuse layer).
        reuse: no query/key/positional parameters; :meth:`forward` needs ``shared_attn``.
        dropout: dropout on the attention probabilities.
        was_gamma: weak attention suppression threshold (None = off).
    """

    def __init__(self, d_model: int, num_heads: int, reuse: bool = False, dropout: float = 0.1,
                 was_gamma: float | None = None):
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"{num_heads} heads do not divide d_model={d_model}")
        self.d_model, self.num_heads, self.reuse = d_model, num_heads, reuse
        self.d_k = d_model // num_heads
        value_dim = 2 * d_model if reuse else d_model
        self.d_v = value_dim // num_heads
        if not reuse:
            self.linear_q = nn.Linear(d_model, d_model)
            self.linear_k = nn.Linear(d_model, d_model)
            self.linear_pos = nn.Linear(d_model, d_model, bias=False)
            self.pos_bias_u = nn.Parameter(torch.empty(num_heads, self.d_k))
            self.pos_bias_v = nn.Parameter(torch.empty(num_heads, self.d_k))
            nn.init.xavier_uniform_(self.pos_bias_u)
            nn.init.xavier_uniform_(self.pos_bias_v)
        self.linear_v = nn.Linear(d_model, value_dim)
        self.linear_out = nn.Linear(value_dim, d_model)
        self.dropout_p = dropout
        self.dropout = nn.Dropout(dropout)
        self.was_gamma = was_gamma

    def _heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, width).transpose(1, 2)  # (B, H, T, width)

    def _score_terms(self, x, pos_emb):
        """(q + u), k and the scaled positional bias ``rel_shift((q + v) p^T) / sqrt(d_k)``."""
        q = self._heads(self.linear_q(x), self.d_k)
        k = self._heads(self.linear_k(x), self.d_k)
        p = self._heads(self.linear_pos(pos_emb), self.d_k)  # (1, H, 2T-1, d_k)
        q_u = q + self.pos_bias_u[None, :, None, :]
        q_v = (q + self.pos_bias_v[None, :, None, :]) / math.sqrt(self.d_k)  # scale the (T, d_k) side
        return q_u, k, relative_position_scores(q_v, p)

    def attention_map(self, x: torch.Tensor, pos_emb: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        """The ``(B, H, T, T)`` row-stochastic map (before dropout); padded keys get zero weight."""
        if self.reuse:
            raise RuntimeError("a reuse layer computes no attention map of its own")
        q_u, k, pos_bias = self._score_terms(x, pos_emb)
        scores = q_u @ k.transpose(-2, -1) / math.sqrt(self.d_k) + pos_bias
        if key_padding_mask is not None:
            scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        if self.was_gamma is not None:
            attn = weak_attention_suppression(attn, key_padding_mask, self.was_gamma)
        return attn

    def forward(self, x: torch.Tensor, pos_emb: torch.Tensor | None, key_padding_mask: torch.Tensor | None = None,
                shared_attn: torch.Tensor | None = None, need_weights: bool = False,
                head_mask: torch.Tensor | None = None,
                value_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns ``(output (B, T, d), attention map or None)``.

        The map is returned when ``need_weights`` (or given as ``shared_attn``); without either,
        a computing layer runs ``scaled_dot_product_attention`` with the positional term as an
        additive bias and never materialises the probabilities. ``head_mask (H,)`` zeroes the
        output of heads with a 0 before the output projection; ``value_mask (B, T)`` multiplies the
        value vectors of each frame in every head (0 = value zeroing, for context-mixing analysis).
        """
        v = self._heads(self.linear_v(x), self.d_v)
        if value_mask is not None:
            v = v * value_mask.to(v.dtype)[:, None, :, None]
        if self.reuse and shared_attn is None:
            raise ValueError("a reuse layer needs the shared attention map (shared_attn)")
        if shared_attn is None and not need_weights and self.was_gamma is None:
            q_u, k, pos_bias = self._score_terms(x, pos_emb)
            if key_padding_mask is not None:
                pos_bias = pos_bias.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            context = F.scaled_dot_product_attention(q_u, k, v, attn_mask=pos_bias,
                                                     dropout_p=self.dropout_p if self.training else 0.0)
            attn = None
        else:
            attn = shared_attn if shared_attn is not None else self.attention_map(x, pos_emb, key_padding_mask)
            if attn.shape[1] != self.num_heads:
                raise ValueError(f"shared map has {attn.shape[1]} heads; this layer has {self.num_heads}")
            context = self.dropout(attn) @ v
        if head_mask is not None:
            context = context * head_mask.to(context.dtype)[None, :, None, None]
        b, _, t, _ = context.shape
        return self.linear_out(context.transpose(1, 2).reshape(b, t, -1)), attn
