"""Conformer blocks and the encoder that wires a reuse plan through them (Shim, Choi, Sung, ICLR 2022, Section
4, Appendix A.1).

Block (ESPnet / Gulati et al.): macaron FFN (half step) -> multi-head self-attention -> convolution
module -> FFN (half step) -> LayerNorm, each sub-layer pre-normed with a residual connection.
"""

from __future__ import annotations

import torch
from torch import nn

from models.attention import MultiHeadSelfAttention, RelPositionalEncoding
from models.reuse import LayerPlan


class FeedForward(nn.Module):
    """LayerNorm -> Linear(d, f) -> Swish -> Dropout -> Linear(f, d)."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float, eps: float = 1e-5):
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(d_model, eps=eps),
            nn.Linear(d_model, ffn_dim),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, d_model),
        )

    def forward(self, x):
        return self.net(x)


class ConvModule(nn.Module):
    """LayerNorm -> pointwise d->2d -> GLU -> depthwise k -> BatchNorm -> Swish -> pointwise d->d.

    Padded frames are zeroed before the depthwise convolution so that they never leak into valid
    frames.
    """

    def __init__(self, d_model: int, kernel_size: int, bn_momentum: float = 0.005, eps: float = 1e-5):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"conv kernel_size must be odd, got {kernel_size}")
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.pointwise1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.depthwise = nn.Conv1d(d_model, d_model, kernel_size, padding=kernel_size // 2, groups=d_model)
        self.batch_norm = nn.BatchNorm1d(d_model, momentum=bn_momentum, eps=1e-5)
        self.pointwise2 = nn.Conv1d(d_model, d_model, 1)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.pointwise1(self.norm(x).transpose(1, 2))
        x = nn.functional.glu(x, dim=1)
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[:, None, :], 0.0)
        x = nn.functional.silu(self.batch_norm(self.depthwise(x)))
        return self.pointwise2(x).transpose(1, 2)


class ConformerBlock(nn.Module):
    """One Conformer layer; ``plan.reuses`` makes its attention a reuse layer. ``eps``: of every
    LayerNorm (ours 1e-5; ESPnet's 1e-12)."""

    def __init__(
        self,
        d_model: int,
        ffn_dim: int,
        kernel_size: int,
        plan: LayerPlan,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        was_gamma: float | None = None,
        bn_momentum: float = 0.005,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.plan = plan
        self.ffn1 = FeedForward(d_model, ffn_dim, dropout, eps)
        self.norm_mha = nn.LayerNorm(d_model, eps=eps)
        self.self_attn = MultiHeadSelfAttention(d_model, plan.num_heads, plan.reuses, attention_dropout, was_gamma)
        self.conv = ConvModule(d_model, kernel_size, bn_momentum, eps)
        self.ffn2 = FeedForward(d_model, ffn_dim, dropout, eps)
        self.norm_final = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, pos_emb, padding_mask, shared_attn=None, need_weights=False, head_mask=None, value_mask=None):
        """Returns ``(output, attention map applied or None)``."""
        x = x + 0.5 * self.dropout(self.ffn1(x))
        a, attn = self.self_attn(
            self.norm_mha(x), pos_emb, padding_mask, shared_attn, need_weights, head_mask, value_mask
        )
        x = x + self.dropout(a)
        x = x + self.dropout(self.conv(x, padding_mask))
        x = x + 0.5 * self.dropout(self.ffn2(x))
        return self.norm_final(x), attn

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the self-attention of this block sees for block input ``x`` (after the macaron
        half-step FFN and the pre-norm)."""
        return self.norm_mha(x + 0.5 * self.dropout(self.ffn1(x)))


class ConformerEncoder(nn.Module):
    """Positional encoding + Conformer blocks following a reuse plan (+ ESPnet's ``after_norm``
    LayerNorm after the last block when ``final_norm``).

    A computing layer materialises its map only when a later layer of its group reuses it or
    the caller asks for maps; otherwise it runs the fused SDPA kernel.
    """

    def __init__(
        self,
        plans: list[LayerPlan],
        d_model: int,
        ffn_dim: int,
        kernel_size: int,
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        was_gamma: float | None = None,
        bn_momentum: float = 0.005,
        eps: float = 1e-5,
        final_norm: bool = False,
    ):
        super().__init__()
        self.plans = plans
        self.pos_enc = RelPositionalEncoding(d_model, dropout)
        self.layers = nn.ModuleList(
            ConformerBlock(d_model, ffn_dim, kernel_size, p, dropout, attention_dropout, was_gamma, bn_momentum, eps)
            for p in plans
        )
        self.after_norm = nn.LayerNorm(d_model, eps=eps) if final_norm else None
        for layer in self.layers:
            if not layer.plan.reuses:
                layer.self_attn.position_source = self.pos_enc
        reused = {p.source for p in plans if p.reuses}
        self._map_needed = [i in reused for i in range(len(plans))]

    def forward(
        self,
        x,
        padding_mask,
        return_attentions=False,
        return_hidden_states=False,
        head_mask=None,
        map_sources: list[int] | None = None,
    ):
        """``x (B, T, d)`` -> ``(output, attentions list or None, hidden_states list or None)``;
        ``head_mask`` is a list (one ``(H,)`` tensor or None per layer) or None. ``map_sources``
        (zero-shot reuse, checked by :meth:`ConformerCTC.map_sources`): layer ``i`` applies the map
        that layer ``map_sources[i] <= i`` applied, to its own values (itself: its own map)."""
        x, pos_emb = self.pos_enc(x)
        attentions, hidden = [], [x]
        applied: dict[int, torch.Tensor] = {}
        needed = self._map_needed
        if map_sources is not None:
            borrowed = {s for i, s in enumerate(map_sources) if s != i}
            needed = [n or i in borrowed for i, n in enumerate(needed)]
        for i, (layer, plan) in enumerate(zip(self.layers, self.plans)):
            if plan.reuses:
                shared = applied[plan.source]
            elif map_sources is not None and map_sources[i] != i:
                shared = applied[map_sources[i]]
            else:
                shared = None
            need = return_attentions or needed[i]
            x, attn = layer(x, pos_emb, padding_mask, shared, need, None if head_mask is None else head_mask[i])
            if attn is not None:
                applied[i] = attn
            attentions.append(attn)
            hidden.append(x)
        if self.after_norm is not None:  # the output only; hidden states stay the blocks' outputs
            x = self.after_norm(x)
        return x, attentions if return_attentions else None, hidden if return_hidden_states else None
