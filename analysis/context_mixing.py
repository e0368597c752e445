"""Context mixing between frame groups (e.g. words) in one layer (Mohebbi et al., 2023; Kobayashi et al., 2020).

Three scores ``S[i <- j]``, for groups ``i`` (rows, receivers) and ``j`` (columns, sources):

- ``attention``: mean of the layer's map over the frames of group i (rows), of group j (columns)
  and over heads;
- ``attention_norm`` (Kobayashi et al. 2020): ``|| sum_{k in j} sum_h A_h[q,k] v_h(x_k) W_O^h ||``
  averaged over the frames ``q`` of group i;
- ``value_zeroing`` (Mohebbi et al. 2023): zero the value vectors of group j in every head,
  recompute the layer's output with the map unchanged (FFN, conv, norms and residuals included),
  take the mean cosine distance to the original output over the frames of group i; rows are then
  normalised to sum to 1. All groups' variants run as one batch (``chunk`` at a time).

In a reuse layer the reused map is kept and only that layer's values are zeroed.
"""

from __future__ import annotations

import copy

import torch

from models import ConformerCTC

METHODS = ("attention", "attention_norm", "value_zeroing")


def _group_mask(groups: list[list[int]], T: int, device) -> torch.Tensor:
    """``(G, T)`` 0/1 membership of frames in groups, built on the CPU and moved once."""
    m = torch.zeros(len(groups), T)
    for g, frames in enumerate(groups):
        if not frames:
            raise ValueError(f"group {g} has no frame")
        if max(frames) >= T or min(frames) < 0:
            raise ValueError(f"group {g} names frame {max(frames)} outside 0..{T - 1}")
        m[g, frames] = 1.0
    return m.to(device)


def group_attention(attn: torch.Tensor, receivers: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """``attention`` score ``(R, G)``: the map ``attn (H, T, S)`` averaged over heads, over the frames of
    each receiving group (``receivers (R, T)`` 0/1) and over those of each source group
    (``sources (G, S)`` 0/1)."""
    return receivers @ attn.mean(0) @ sources.t() / (receivers.sum(1)[:, None] * sources.sum(1)[None, :])


def group_attention_norm(
    attn: torch.Tensor, vo: torch.Tensor, receivers: torch.Tensor, sources: torch.Tensor
) -> torch.Tensor:
    """``attention_norm`` score ``(R, G)`` (Kobayashi et al., 2020): ``|| sum_h sum_{k in j} A_h[q,k] vo_h[k] ||``
    averaged over the frames ``q`` of receiving group i; ``vo (H, S, d)`` the per-head values through
    the output projection, ``attn (H, T, S)``."""
    f = torch.einsum("hqk,gk,hkd->gqd", attn, sources, vo)  # (G, T, d)
    return (receivers @ f.norm(dim=-1).t()) / receivers.sum(1)[:, None]


def group_value_zeroing(dist: torch.Tensor, receivers: torch.Tensor) -> torch.Tensor:
    """``value_zeroing`` score ``(R, G)`` from the cosine distances ``dist (G, T)`` (source group zeroed,
    receiving frame): averaged over each receiving group's frames, rows normalised to sum to 1
    (a row with no distance at all stays 0)."""
    s_ij = (receivers @ dist.t()) / receivers.sum(1)[:, None]
    total = s_ij.sum(1, keepdim=True)
    return torch.where(total > 0, s_ij / total.clamp_min(1e-30), s_ij)


@torch.inference_mode()
def context_mixing(
    model: ConformerCTC,
    features: torch.Tensor,
    groups: list[list[int]],
    layers: list[int] | None = None,
    methods=METHODS,
    chunk: int = 64,
) -> dict[str, torch.Tensor]:
    """Scores for one utterance ``features (T, input_dim)`` between ``groups`` of encoder frames.

    Returns ``{method: (num_layers_selected, G, G)}`` with rows = receiving group i and columns =
    source group j.
    """
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown context-mixing method(s) {sorted(unknown)}; expected {METHODS}")
    model.eval()
    lengths = torch.full((1,), features.shape[0], dtype=torch.long, device=features.device)
    enc = model.encode(features[None], lengths, return_attentions=True, return_hidden_states=True)
    T = enc.output.shape[1]
    layers = list(range(model.num_layers)) if layers is None else layers
    gm = _group_mask(groups, T, features.device)  # (G, T)
    pos_emb = model.encoder.pos_enc.encodings(T, features.device, enc.output.dtype)
    out = {m: [] for m in methods}
    for l in layers:
        block = model.encoder.layers[l]
        attn = enc.attentions[l][0]  # (H, T, T), the map this layer applied
        x_in = enc.hidden_states[l]  # (1, T, d)
        if "attention" in methods:
            out["attention"].append(group_attention(attn, gm, gm))
        if "attention_norm" in methods:
            sa = block.self_attn
            v = sa._heads(sa.linear_v(block.attention_input(x_in)), sa.d_v)[0]  # (H, T, d_v)
            w = sa.linear_out.weight.t().reshape(sa.num_heads, sa.d_v, -1)  # (H, d_v, d)
            vo = torch.einsum("htv,hvd->htd", v, w)  # per-head transformed values
            out["attention_norm"].append(group_attention_norm(attn, vo, gm, gm))
        if "value_zeroing" in methods:
            # float64 copy of the layer: 1 - cos of two float32 outputs is noisy at the 1e-7 level
            block64 = copy.deepcopy(block).double()
            x64, attn64, pos64 = x_in.double(), attn.double(), pos_emb.double()
            dist = []
            for s in range(0, len(groups), chunk):
                # variant 0 is the unaltered layer: computed in the same batch, so that rounding
                # differences between batch shapes never show up as context mixing
                masks = torch.cat([torch.ones_like(gm[:1]), 1.0 - gm[s : s + chunk]])  # (n + 1, T)
                n = masks.shape[0]
                alt, _ = block64(
                    x64.expand(n, -1, -1),
                    pos64,
                    None,
                    shared_attn=attn64[None].expand(n, -1, -1, -1),
                    value_mask=masks.double(),
                )
                cos = torch.nn.functional.cosine_similarity(alt[1:], alt[:1].expand(n - 1, -1, -1), dim=-1)
                dist.append(1.0 - cos)
            d = torch.cat(dist).clamp_min(0).float()  # (G_j, T)
            out["value_zeroing"].append(group_value_zeroing(d, gm))
    return {m: torch.stack(v) for m, v in out.items()}
