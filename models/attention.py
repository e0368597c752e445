"""Relative positional multi-head self-attention, with layer-wise map reuse (Shim, Choi, Sung, ICLR 2022,
Section 4, Appendix A.1).

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
from torch.optim.optimizer import register_optimizer_step_post_hook

# Bumped after every optimizer step (any optimizer, fused or not, in any mode): part of the key of
# the inference position cache, since fused optimizers (e.g. fused AdamW) update the weights
# without bumping ``weight._version``. Only compared for equality.
_parameter_generation = 0


def _note_optimizer_step(optimizer, args, kwargs) -> None:
    global _parameter_generation
    _parameter_generation += 1


_OPTIMIZER_HOOK = register_optimizer_step_post_hook(_note_optimizer_step)  # once, at import


def _autocast_state(device_type: str) -> tuple:
    """``(enabled, dtype or None)`` of autocast for ``device_type`` (part of the cache key)."""
    try:
        if torch.is_autocast_enabled(device_type):
            return True, torch.get_autocast_dtype(device_type)
    except RuntimeError:  # a device type autocast does not know: it cannot be on
        pass
    return False, None


def clear_position_caches(module: nn.Module) -> int:
    """Drops the inference position cache of every :class:`MultiHeadSelfAttention` in ``module``
    (see :meth:`MultiHeadSelfAttention.clear_position_cache`); returns how many were cleared."""
    n = 0
    for m in module.modules():
        if isinstance(m, MultiHeadSelfAttention):
            m.clear_position_cache()
            n += 1
    return n


class RelPositionalEncoding(nn.Module):
    """Sinusoidal encodings of relative positions ``T-1, ..., 0, ..., -(T-1)`` (ESPnet's
    ``RelPositionalEncoding``). Also scales the input by ``sqrt(d_model)`` and applies dropout.

    Like ESPnet's ``extend_pe``, the encodings of the longest input seen are kept as a table and
    shorter inputs get a slice of it (rows are relative positions, centred on 0), so in inference
    attention layers can recognise the slice and reuse their projection of the table
    (:meth:`MultiHeadSelfAttention.position_keys`).
    """

    def __init__(self, d_model: int, dropout: float = 0.1):
        super().__init__()
        self.d_model = d_model
        self.xscale = math.sqrt(d_model)
        self.dropout = nn.Dropout(dropout)
        self.table: torch.Tensor | None = None  # (1, 2 L - 1, d_model), relative positions L-1 .. -(L-1)

    def _build(self, length: int, device, dtype) -> torch.Tensor:
        pos = torch.arange(length - 1, -length, -1, device=device, dtype=torch.float32).unsqueeze(1)
        div = torch.exp(
            torch.arange(0, self.d_model, 2, device=device, dtype=torch.float32) * -(math.log(10000.0) / self.d_model)
        )
        pe = torch.zeros(2 * length - 1, self.d_model, device=device)
        pe[:, 0::2] = torch.sin(pos * div)
        pe[:, 1::2] = torch.cos(pos * div)
        return pe.unsqueeze(0).to(dtype or torch.float32)

    def encodings(self, length: int, device=None, dtype=None) -> torch.Tensor:
        """``(1, 2 * length - 1, d_model)``: row ``k`` encodes relative position ``length - 1 - k``
        (a view of :attr:`table`, which grows to the longest length asked for)."""
        if torch.compiler.is_compiling():  # a traced graph computes them (and keeps no table)
            return self._build(length, device, dtype)
        t = self.table
        device = torch.device(device) if device is not None else torch.device("cpu")
        dtype = dtype or torch.float32
        if (
            t is None
            or t.size(1) < 2 * length - 1
            or t.device != device
            or t.dtype != dtype
            or t.is_inference() != torch.is_inference_mode_enabled()
        ):
            longest = length if t is None else max(length, (t.size(1) + 1) // 2)
            with torch.no_grad():
                t = self.table = self._build(longest, device, dtype)
        centre = (t.size(1) - 1) // 2
        return t[:, centre - length + 1 : centre + length]

    def table_offset(self, pos_emb: torch.Tensor) -> int | None:
        """First row of :attr:`table` that ``pos_emb`` is a slice of, or None if it is not one."""
        t = self.table
        if (
            t is None
            or pos_emb.dim() != 3
            or pos_emb.size(-1) != self.d_model
            or pos_emb.device != t.device
            or pos_emb.dtype != t.dtype
            or pos_emb.stride() != t.stride()
            or pos_emb.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
        ):
            return None
        return (pos_emb.storage_offset() - t.storage_offset()) // t.stride(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos_emb = self.encodings(x.size(1), x.device, x.dtype)
        return self.dropout(x * self.xscale), self.dropout(pos_emb) if self.training else pos_emb


def _skew(y: torch.Tensor, t: int) -> torch.Tensor:
    """``out[..., i, j] = y[..., i, c-1-i+j]`` for ``y (B, H, c, n)`` scores of rows ``i`` against
    ``n = t + c - 1`` relative positions, as a view (no copy): in the flattened rows element
    ``(i, j)`` lies at ``i (n-1) + j + c-1``, so a slice of them read as rows of ``n - 1`` is the
    shift. Plain slicing and viewing (no ``as_strided``), so ``torch.compile`` traces it."""
    b, h, c, n = y.shape
    if n - 1 < t:  # a single row (c == 1) is already aligned
        return y[..., :t]
    flat = y.contiguous().reshape(b, h, c * n)[..., c - 1 : c - 1 + c * (n - 1)]
    return flat.view(b, h, c, n - 1)[..., :t]


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, T, 2T-1)`` scores against relative positions ``T-1..-(T-1)`` -> ``(B, H, T, T)``
    with ``out[..., i, j] = x[..., i, T-1-i+j]``, the score at relative position ``i - j``
    (Transformer-XL's shift, done as a view rather than by zero-padding and copying)."""
    b, h, t, n = x.shape
    if n != 2 * t - 1:
        raise ValueError(f"rel_shift expects (B, H, T, 2T-1) scores; got {tuple(x.shape)}")
    return _skew(x, t)


def relative_position_rows(q: torch.Tensor, p: torch.Tensor, chunk: int | None = None):
    """Yields ``(first row, rel_shift(q @ p^T) for rows first .. first+c-1)``, each ``(B, H, c, T)``,
    for ``q (B, H, T, d_k)`` and ``p (1 or B, H, 2T-1, d_k)``.

    Row ``i`` only needs positions ``T-1-i .. 2T-2-i``, so rows are taken ``chunk`` at a time,
    each against the ``T + chunk - 1`` positions it needs: ``T (T + chunk)`` dot products instead of
    ``T (2T - 1)``. Default chunk: ``T / 8`` for long inputs (one chunk below 256 frames).
    """
    t = q.shape[-2]
    if torch.compiler.is_exporting():  # one chunk, shifted by a gather: the length stays symbolic (models.export)
        i = torch.arange(t, device=q.device)
        yield 0, torch.gather(q @ p.transpose(-2, -1), -1, (t - 1 - i[:, None] + i[None, :]).expand(*q.shape[:-1], t))
        return
    chunk = chunk or (t if t < 256 else max(32, -(-t // 8)))
    for a in range(0, t, chunk):  # one chunk (chunk >= T): all 2T-1 positions, rel_shift's case
        c = min(chunk, t - a)
        window = p[..., t - a - c : 2 * t - 1 - a, :]  # positions needed by rows a .. a+c-1
        yield a, _skew(q[..., a : a + c, :] @ window.transpose(-2, -1), t)  # (B, H, c, T + c - 1) -> (B, H, c, T)


def relative_position_scores(q: torch.Tensor, p: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """``rel_shift(q @ p^T)`` as one contiguous ``(B, H, T, T)`` tensor (see
    :func:`relative_position_rows`)."""
    return torch.cat([rows for _, rows in relative_position_rows(q, p, chunk)], dim=-2).contiguous()


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

    def __init__(
        self, d_model: int, num_heads: int, reuse: bool = False, dropout: float = 0.1, was_gamma: float | None = None
    ):
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
        self.position_source: RelPositionalEncoding | None = None  # set by the encoder (not a submodule)
        self._position_cache: tuple | None = None

    def __setattr__(self, name, value):
        if name == "position_source":  # a reference, not a child: keep it out of modules() / state_dict
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def position_keys(self, pos_emb: torch.Tensor) -> torch.Tensor:
        """``linear_pos(pos_emb)`` as heads, ``(1, H, 2T-1, d_k)``.

        Positions do not depend on the input: in inference (eval mode, no autograd), when
        ``pos_emb`` is a slice of :attr:`position_source`'s table, the projection of the whole
        table is computed once and sliced alike, so each layer projects its positions once rather
        than once per batch.

        The cached projection is recomputed when any of these changes: the table; the storage,
        ``_version`` or dtype of ``linear_pos.weight``; inference mode; the autocast state (on or
        off, and its dtype) of the table's device; or the global count of optimizer steps (a
        post-hook on every optimizer, so fused optimizers, which do not bump ``_version``, count
        too). It is also dropped by every :meth:`train` / ``eval()`` call, by ``.to()`` /
        ``.half()`` / ``.cuda()`` (``_apply``) and by ``load_state_dict``.

        Not detected: writing the weights in place outside an optimizer without bumping their
        version (through ``.data``, or by a foreign kernel) while the model stays in eval mode.
        Call :meth:`clear_position_cache` (or :func:`clear_position_caches` on the whole model)
        after such a write, or toggle ``model.train(); model.eval()``.
        """
        src, w = self.position_source, self.linear_pos.weight
        offset = None
        if (
            src is not None
            and not torch.compiler.is_compiling()
            and not self.training
            and not torch.is_grad_enabled()
            and not w.is_inference()
        ):
            offset = src.table_offset(pos_emb)  # (weights made in inference mode have no version to watch)
        if offset is None:
            return self._heads(self.linear_pos(pos_emb), self.d_k)
        key = (
            w.data_ptr(),
            w._version,
            w.dtype,
            torch.is_inference_mode_enabled(),
            _autocast_state(pos_emb.device.type),
            _parameter_generation,
        )
        cached = self._position_cache
        if cached is None or cached[0] is not src.table or cached[1] != key:
            projected = self._heads(self.linear_pos(src.table), self.d_k).contiguous()
            cached = self._position_cache = (src.table, key, projected)
        return cached[2][:, :, offset : offset + pos_emb.size(1)]

    def clear_position_cache(self) -> None:
        """Drops the cached projection of the position table (:meth:`position_keys`); the next
        inference call projects it afresh. Needed only after in-place weight writes it cannot see."""
        self._position_cache = None

    def train(self, mode: bool = True):
        self._position_cache = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self._position_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._position_cache = None
        return super()._load_from_state_dict(*args, **kwargs)

    def _heads(self, x: torch.Tensor, width: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, width).transpose(1, 2)  # (B, H, T, width)

    def _score_inputs(self, x, pos_emb):
        """``q + u``, ``(q + v) / sqrt(d_k)``, ``k`` and the position keys ``p``, as heads."""
        q = self._heads(self.linear_q(x), self.d_k)
        k = self._heads(self.linear_k(x), self.d_k)
        p = self.position_keys(pos_emb)  # (1, H, 2T-1, d_k)
        # biases in the query's dtype: under autocast fp32 biases would promote the low-precision
        # query back to fp32 (a no-op in fp32)
        q_u = q + self.pos_bias_u.to(q.dtype)[None, :, None, :]
        q_v = (q + self.pos_bias_v.to(q.dtype)[None, :, None, :]) / math.sqrt(self.d_k)  # scale the (T, d_k) side
        return q_u, q_v, k, p

    def _score_terms(self, x, pos_emb):
        """(q + u), k and the scaled positional bias ``rel_shift((q + v) p^T) / sqrt(d_k)``."""
        q_u, q_v, k, p = self._score_inputs(x, pos_emb)
        return q_u, k, relative_position_scores(q_v, p)

    def _fused_attention(self, x, pos_emb, v, key_padding_mask):
        """Attention output ``(B, H, T, d_v)`` by ``scaled_dot_product_attention`` with the positional
        term as its additive mask; the probabilities are never materialised.

        On CPU the query rows go in chunks, each with the positional bias of its rows only, so no
        ``T x T`` tensor is built: at 768 frames this is faster and, unlike one large bias per
        layer, does not depend on how the C allocator recycles big blocks. On GPU one call takes
        the whole bias."""
        q_u, q_v, k, p = self._score_inputs(x, pos_emb)
        dropout_p = self.dropout_p if self.training else 0.0
        pad = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        t = q_u.shape[-2]
        chunk = max(64, -(-t // 4)) if x.device.type == "cpu" and not torch.compiler.is_exporting() and t >= 256 else t
        parts = []
        for a, bias in relative_position_rows(q_v, p, chunk):
            if pad is not None:
                bias = bias.masked_fill(pad, float("-inf"))
            elif chunk >= t:
                bias = bias.contiguous()  # one dense, aligned (B, H, T, T) mask, as the GPU kernels want
            parts.append(
                F.scaled_dot_product_attention(
                    q_u[..., a : a + bias.shape[-2], :], k, v, attn_mask=bias, dropout_p=dropout_p
                )
            )
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)

    def attention_map(
        self, x: torch.Tensor, pos_emb: torch.Tensor, key_padding_mask: torch.Tensor | None
    ) -> torch.Tensor:
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

    def forward(
        self,
        x: torch.Tensor,
        pos_emb: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None = None,
        shared_attn: torch.Tensor | None = None,
        need_weights: bool = False,
        head_mask: torch.Tensor | None = None,
        value_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
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
            context, attn = self._fused_attention(x, pos_emb, v, key_padding_mask), None
        else:
            attn = shared_attn if shared_attn is not None else self.attention_map(x, pos_emb, key_padding_mask)
            if attn.shape[1] != self.num_heads:
                raise ValueError(f"shared map has {attn.shape[1]} heads; this layer has {self.num_heads}")
            context = self.dropout(attn) @ v
        if head_mask is not None:
            context = context * head_mask.to(context.dtype)[None, :, None, None]
        b, _, t, _ = context.shape
        return self.linear_out(context.transpose(1, 2).reshape(b, t, -1)), attn
