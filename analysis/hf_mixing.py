"""Word-level context mixing of a Hugging Face speech transformer (:class:`analysis.hf.HFUpstream`):
the attention maps, their value-weighted norms (Kobayashi et al., 2020) and Value Zeroing (Mohebbi,
Zuidema, Chrupała, Alishahi, 2023, EACL), over the encoder and, for Whisper, the decoder's self- and
cross-attention (:func:`hf_context_mixing`). Value Zeroing re-runs each recorded layer call with
value vectors zeroed (:func:`value_zeroing_distances`); the group scores are
:mod:`analysis.context_mixing`'s.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch import nn

from analysis.hf import HFUpstream


def _doubled(x, n: int, expand: bool):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        x = x.double()
        return x.expand(n, *x.shape[1:]) if expand else x
    return x


@torch.inference_mode()
def value_zeroing_distances(
    layer: nn.Module,
    call: tuple,
    value_proj: nn.Module,
    masks: torch.Tensor,
    final_norm: nn.Module | None = None,
    chunk: int = 32,
) -> torch.Tensor:
    """Value Zeroing (Mohebbi, Zuidema, Chrupała, Alishahi, 2023, "Quantifying Context Mixing in
    Transformers", EACL, section 3): for each row of ``masks (G, S)`` (1 = keep the value vector of
    source position s, 0 = zero it in every head), re-run ``layer`` on its recorded ``call`` with
    the output of ``value_proj`` (a module inside ``layer``: its self- or cross-attention's value
    projection) multiplied by the mask, and everything else unchanged; returns the cosine distance
    ``(G, T)`` of each receiving position's output to the unaltered output (after ``final_norm``
    when given), exactly 0 where the output did not change. Runs in float64, the unaltered variant in the same
    batch as the altered ones."""
    names = {m: n for n, m in layer.named_modules()}
    if value_proj not in names:
        raise ValueError("value_proj is not a module of layer")
    layer64 = copy.deepcopy(layer).double()
    v64 = dict(layer64.named_modules())[names[value_proj]]
    norm64 = copy.deepcopy(final_norm).double() if final_norm is not None else None
    import inspect

    bound = inspect.signature(layer.forward).bind(*call[0], **call[1])  # positional arguments by name
    kwargs = {**{k: v for k, v in bound.arguments.items() if k != "kwargs"}, **bound.arguments.get("kwargs", {})}
    current = {}
    handle = v64.register_forward_hook(lambda m, i, o: o * current["mask"][:, :, None])
    try:
        out = []
        for s in range(0, masks.shape[0], chunk):
            m = torch.cat([torch.ones_like(masks[:1]), masks[s : s + chunk]]).double()
            n = m.shape[0]
            current["mask"] = m
            kw = {k: _doubled(v, n, k in ("hidden_states", "encoder_hidden_states")) for k, v in kwargs.items()}
            y = layer64(**kw)
            y = y[0] if isinstance(y, tuple) else y
            if norm64 is not None:
                y = norm64(y)
            ref = y[:1].expand(n - 1, -1, -1)
            cos = nn.functional.cosine_similarity(y[1:], ref, dim=-1)
            # an output left exactly as it was is at distance 0 (1 - cos of equal vectors rounds to ~1e-16)
            out.append(torch.where((y[1:] == ref).all(-1), torch.zeros_like(cos), 1.0 - cos))
    finally:
        handle.remove()
    return torch.cat(out).clamp_min(0).float()


# --- word-level context mixing ------------------------------------------------------------------------
def _members(groups: list[list[int]], size: int, device) -> torch.Tensor:
    from analysis.context_mixing import _group_mask

    return _group_mask(groups, size, device)


def _values_through_output(attn_module: nn.Module, v: torch.Tensor) -> torch.Tensor:
    """``v (1, S, H * d_h)`` value projections -> ``(H, S, d)`` per-head values through ``out_proj``."""
    H = attn_module.num_heads
    vh = v[0].unflatten(-1, (H, -1)).transpose(0, 1)  # (H, S, d_h)
    w = attn_module.out_proj.weight.t().reshape(H, vh.shape[-1], -1)  # (H, d_h, d)
    return torch.einsum("hsv,hvd->hsd", vh, w)


@contextlib.contextmanager
def _record_values(modules: list[nn.Module]):
    values, handles = [None] * len(modules), []
    for i, m in enumerate(modules):
        handles.append(m.v_proj.register_forward_hook(lambda mod, a, o, i=i: values.__setitem__(i, o)))
    try:
        yield values
    finally:
        for h in handles:
            h.remove()


def _scores(attn, vo, receivers, sources, dist, methods) -> dict[str, torch.Tensor]:
    from analysis.context_mixing import (
        group_attention,
        group_attention_norm,
        group_value_zeroing,
    )

    out = {}
    if "attention" in methods:
        out["attention"] = group_attention(attn, receivers, sources)
    if "attention_norm" in methods:
        out["attention_norm"] = group_attention_norm(attn, vo, receivers, sources)
    if "value_zeroing" in methods:
        out["value_zeroing"] = group_value_zeroing(dist, receivers)
    return out


@torch.inference_mode()
def hf_context_mixing(
    up: HFUpstream,
    wave: torch.Tensor,
    words: list[list[int]],
    decoder_ids: list[int] | None = None,
    methods=("attention", "attention_norm", "value_zeroing"),
) -> dict:
    """Word-level context mixing of one utterance ``wave (samples,)`` with ``words`` (encoder frame
    indices of each word). Returns ``{"encoder": {method: (L, W, W)}}`` and, for Whisper with
    ``decoder_ids`` (the teacher-forced decoder tokens, prompt included), ``"decoder"``
    ``{method: (L, N, N)}`` (causal: row i receives from tokens 0..i) and ``"cross"`` ``{method: (L, N, W)}``.
    Rows receive, columns give; the maps are the model's own (Whisper: over its whole window, the words
    lying in the frames that cover the audio)."""
    from analysis.context_mixing import METHODS

    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown context-mixing method(s) {sorted(unknown)}; expected {METHODS}")
    if len(words) < 2:
        raise ValueError("context mixing compares words: fewer than two aligned words")
    up.check_samples(wave.numel(), "utterance")
    with _record_values(up.attentions_modules) as values:
        maps, _, calls = up.run_encoder(wave)
    S = maps[0].shape[-1]
    gm = _members(words, S, maps[0].device)
    enc = {m: [] for m in methods}
    for l, layer in enumerate(up.layers):
        attn_mod = up.attentions_modules[l]
        vo = _values_through_output(attn_mod, values[l]) if "attention_norm" in methods else None
        dist = (
            value_zeroing_distances(
                layer, calls[l], attn_mod.v_proj, 1.0 - gm, up.final_norm if l == up.num_layers - 1 else None
            )
            if "value_zeroing" in methods
            else None
        )
        for m, v in _scores(maps[l][0].float(), vo, gm, gm, dist, methods).items():
            enc[m].append(v)
    out = {"encoder": {m: torch.stack(v).cpu() for m, v in enc.items()}}
    if up.family != "whisper" or decoder_ids is None:
        return out
    dec_layers = list(up.decoder.layers)
    self_mods = [layer.self_attn for layer in dec_layers]
    cross_mods = [layer.encoder_attn for layer in dec_layers]
    with _record_values(self_mods) as sv, _record_values(cross_mods) as cv:
        _, smaps, cmaps, _, dcalls = up.run_decoder(wave, decoder_ids)
    N = len(decoder_ids)
    eye = torch.eye(N, device=gm.device)
    dec, cross = {m: [] for m in methods}, {m: [] for m in methods}
    for l, layer in enumerate(dec_layers):
        final = up.decoder.layer_norm if l == len(dec_layers) - 1 else None
        vz = "value_zeroing" in methods
        d_self = value_zeroing_distances(layer, dcalls[l], layer.self_attn.v_proj, 1.0 - eye, final) if vz else None
        d_cross = value_zeroing_distances(layer, dcalls[l], layer.encoder_attn.v_proj, 1.0 - gm, final) if vz else None
        norm = "attention_norm" in methods
        vo_s = _values_through_output(layer.self_attn, sv[l]) if norm else None
        vo_c = _values_through_output(layer.encoder_attn, cv[l]) if norm else None
        for m, v in _scores(smaps[l][0].float(), vo_s, eye, eye, d_self, methods).items():
            dec[m].append(v)
        for m, v in _scores(cmaps[l][0].float(), vo_c, eye, gm, d_cross, methods).items():
            cross[m].append(v)
    out["decoder"] = {m: torch.stack(v).cpu() for m, v in dec.items()}
    out["cross"] = {m: torch.stack(v).cpu() for m, v in cross.items()}
    return out
