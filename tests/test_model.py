"""ConformerCTC over a matrix of small models and reuse plans (forward and backward)."""

from __future__ import annotations

import math

import pytest
import torch

from models import ConformerCTC
from models.attention import (
    MultiHeadSelfAttention,
    RelPositionalEncoding,
    clear_position_caches,
    rel_shift,
    weak_attention_suppression,
)
from models.summary import PAPER_MILLIONS, count

CONFIGS = ["1(H4)x4", "2(H4)x2", "4(H2)", "2(H8)+2(H4)", "1(H2)+3(H4)", "1(H4)+2(H4)+1(H2)"]
DIMS = [32, 64]


def make(reuse="2(H4)x2", d=32, **kw):
    torch.manual_seed(0)
    kw.setdefault("num_layers", 4)
    return ConformerCTC(
        11, input_dim=20, d_model=d, ffn_dim=2 * d, kernel_size=5, reuse=reuse, subsampling_channels=8, **kw
    )


def batch(lengths=(60, 45, 33), dim=20, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), dim, generator=g)
    lens = torch.tensor(lengths)
    x = x.masked_fill(torch.arange(max(lengths))[None, :, None] >= lens[:, None, None], 0.0)
    return x, lens


@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("reuse", CONFIGS)
def test_forward_backward_and_ownership(reuse, d):
    model = make(reuse, d)
    x, lens = batch()
    log_probs, out_lens = model(x, lens)
    assert log_probs.shape == (3, out_lens.max(), 11) and log_probs.dtype == torch.float32
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-5)
    assert out_lens.tolist() == [((n - 1) // 2 - 1) // 2 for n in lens.tolist()]
    loss = torch.nn.functional.ctc_loss(
        log_probs.transpose(0, 1), torch.randint(1, 11, (3, 4)), out_lens, torch.tensor([4, 3, 2])
    )
    loss.backward()
    for plan, layer in zip(model.plans, model.encoder.layers):
        attn = layer.self_attn
        names = {n for n, _ in attn.named_parameters()}
        if plan.reuses:
            assert names == {"linear_v.weight", "linear_v.bias", "linear_out.weight", "linear_out.bias"}
            assert attn.linear_v.out_features == 2 * d and attn.linear_out.in_features == 2 * d
        else:
            assert {"linear_q.weight", "linear_k.weight", "linear_pos.weight", "pos_bias_u", "pos_bias_v"} <= names
            assert attn.linear_v.out_features == d
        for n, p in attn.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("reuse", ["2(H4)x2", "4(H2)", "1(H4)+2(H4)+1(H2)"])
def test_shared_map_gets_gradient_from_reuse_layer(reuse):
    model = make(reuse)
    x, lens = batch()
    feats, out_lens = model.frontend(x, lens)
    mask = torch.arange(feats.shape[1])[None] >= out_lens[:, None]
    h, pos = (t.detach() for t in model.encoder.pos_enc(feats))
    for i, plan in enumerate(model.plans):
        if not plan.reuses:
            continue
        src = model.encoder.layers[plan.source].self_attn
        reuser = model.encoder.layers[i].self_attn
        model.zero_grad()
        shared = src.attention_map(h, pos, mask)
        out, applied = reuser(h, pos, mask, shared_attn=shared)
        assert applied is shared
        out.pow(2).sum().backward()
        assert src.linear_q.weight.grad.abs().sum() > 0
        assert src.linear_k.weight.grad.abs().sum() > 0
        assert src.pos_bias_v.grad.abs().sum() > 0
        # and only through the map: with the map detached, the query gets nothing
        model.zero_grad()
        out, _ = reuser(h, pos, mask, shared_attn=src.attention_map(h, pos, mask).detach())
        out.pow(2).sum().backward()
        assert src.linear_q.weight.grad is None or src.linear_q.weight.grad.abs().sum() == 0


@pytest.mark.parametrize("reuse", CONFIGS)
def test_maps_row_stochastic_and_reused(reuse):
    model = make(reuse).eval()
    x, lens = batch()
    enc = model.encode(x, lens, return_attentions=True, return_hidden_states=True)
    assert len(enc.attentions) == 4 and len(enc.hidden_states) == 5
    assert all(h.shape == (3, enc.output.shape[1], 32) for h in enc.hidden_states)
    assert torch.equal(enc.hidden_states[-1], enc.output)
    T = enc.output.shape[1]
    for plan, a in zip(model.plans, enc.attentions):
        assert a.shape == (3, plan.num_heads, T, T)
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5)
        for b, n in enumerate(enc.lengths.tolist()):
            assert (a[b, :, :, n:] == 0).all()
        assert a is enc.attentions[plan.source]  # a reuse layer reports the map it applied


@pytest.mark.parametrize("reuse", CONFIGS)
def test_sdpa_and_materialised_paths_agree(reuse):
    model = make(reuse).eval()
    x, lens = batch()
    fast = model.encode(x, lens).output
    slow = model.encode(x, lens, return_attentions=True).output
    assert torch.allclose(fast, slow, atol=1e-5)


def test_sdpa_path_used_when_no_map_needed(monkeypatch):
    model = make("1(H4)x4").eval()
    calls = []
    orig = MultiHeadSelfAttention.attention_map

    def spy(self, *a, **k):
        calls.append(self)
        return orig(self, *a, **k)

    monkeypatch.setattr(MultiHeadSelfAttention, "attention_map", spy)
    x, lens = batch()
    model.encode(x, lens)
    assert calls == []  # no layer's map is reused: SDPA everywhere
    model = make("1(H4)+3(H4)").eval()
    model.encode(x, lens)
    assert calls == [model.encoder.layers[1].self_attn]  # layer 0 fused; layer 1 materialised once for 2 and 3
    calls.clear()
    model = make("2(H4)x2").eval()
    model.encode(x, lens)
    assert calls == [model.encoder.layers[0].self_attn, model.encoder.layers[2].self_attn]  # once per group


@pytest.mark.parametrize("reuse", ["1(H4)x4", "2(H4)x2"])
def test_padding_invariance(reuse):
    model = make(reuse).eval()
    x, lens = batch((60, 45, 33))
    padded, plens = model(x, lens)
    for b in range(3):
        alone, alens = model(x[b : b + 1, : lens[b]], lens[b : b + 1])
        n = alens.item()
        assert plens[b] == n
        assert torch.allclose(padded[b, :n], alone[0], atol=1e-5)


def test_head_mask_changes_output_and_full_mask_removes_attention():
    model = make("2(H4)x2").eval()
    x, lens = batch()
    base, _ = model(x, lens)
    for spec in ({0: [1]}, {1: [0, 3]}):
        masked, _ = model(x, lens, head_mask=spec)
        assert not torch.allclose(masked, base, atol=1e-4)
    tensor_mask = torch.ones(4, 4)
    tensor_mask[1, 0] = tensor_mask[1, 3] = 0
    assert torch.allclose(model(x, lens, head_mask=tensor_mask)[0], model(x, lens, head_mask={1: [0, 3]})[0])
    assert torch.allclose(model(x, lens, head_mask=torch.ones(4, 4))[0], base)
    # all heads of a layer masked == that attention contributes nothing (output bias zeroed)
    for layer in (0, 1):  # a computing and a reuse layer
        with torch.no_grad():
            model.encoder.layers[layer].self_attn.linear_out.bias.zero_()
        masked, _ = model(x, lens, head_mask={layer: [0, 1, 2, 3]})
        handle = model.encoder.layers[layer].self_attn.register_forward_hook(
            lambda m, i, o: (torch.zeros_like(o[0]), o[1])
        )
        removed, _ = model(x, lens)
        handle.remove()
        assert torch.allclose(masked, removed, atol=1e-6)


def test_head_mask_errors():
    model = make("2(H8)+2(H4)")
    x, lens = batch()
    with pytest.raises(ValueError, match=r"must be \(num_layers, max_heads\) = \(4, 8\); got \(4, 4\)"):
        model(x, lens, head_mask=torch.ones(4, 4))
    bad = torch.ones(4, 8)
    bad[3, 6] = 0
    with pytest.raises(ValueError, match="masks a head >= 4 in layer 3, which has only 4 heads"):
        model(x, lens, head_mask=bad)
    with pytest.raises(ValueError, match="head 4 of layer 2, which has heads 0..3"):
        model(x, lens, head_mask={2: [4]})
    with pytest.raises(ValueError, match="names layer 7"):
        model(x, lens, head_mask={7: [0]})


def test_bad_inputs():
    model = make()
    x, lens = batch()
    with pytest.raises(ValueError, match=r"features must be \(B, T, 20\); got \(3, 60, 21\)"):
        model(torch.zeros(3, 60, 21), lens)
    with pytest.raises(ValueError, match=r"lengths must be \(3,\) to match the batch; got \(2,\)"):
        model(x, lens[:2])
    with pytest.raises(ValueError, match=r"must lie in 1..60"):
        model(x, torch.tensor([61, 10, 10]))
    with pytest.raises(ValueError, match=r"6 frames is too short for the conv2d subsampling \(needs >= 7"):
        model(x[:, :6], torch.tensor([6, 6, 6]))
    with pytest.raises(ValueError, match=r"has 3 layers; the encoder has 4"):
        make("1(H4)x3")
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        ConformerCTC(11, input_dim=20, d_model=32, num_layers=1, ffn_dim=64, kernel_size=4, reuse="1(H4)")


def test_rel_shift_matches_gather():
    torch.manual_seed(0)
    T = 7
    x = torch.randn(2, 3, T, 2 * T - 1)
    shifted = rel_shift(x)
    i, j = torch.meshgrid(torch.arange(T), torch.arange(T), indexing="ij")
    expected = x[:, :, i, (T - 1) - i + j]  # column k of x encodes relative position T-1-k = i-j
    assert torch.equal(shifted, expected)


@pytest.mark.parametrize("T,chunk", [(7, None), (9, 2), (10, 3), (300, None), (33, 32)])
def test_chunked_relative_scores_equal_full_shift(T, chunk):
    from models.attention import relative_position_scores

    torch.manual_seed(T)
    q, p = torch.randn(2, 3, T, 8, requires_grad=True), torch.randn(1, 3, 2 * T - 1, 8, requires_grad=True)
    full = rel_shift(q @ p.transpose(-2, -1))
    got = relative_position_scores(q, p, chunk)
    assert got.is_contiguous() and torch.allclose(got, full, atol=1e-5)
    g = torch.randn_like(full)
    (gq_full, gp_full) = torch.autograd.grad((full * g).sum(), (q, p))
    (gq, gp) = torch.autograd.grad((got * g).sum(), (q, p))
    assert torch.allclose(gq, gq_full, atol=1e-4) and torch.allclose(gp, gp_full, atol=1e-4)


@pytest.mark.parametrize("T", [40, 300])  # one SDPA call; query rows in chunks (CPU, T >= 256)
def test_fused_attention_equals_materialised_with_padding(T):
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4, dropout=0.0)
    enc = RelPositionalEncoding(32, dropout=0.0)
    x = torch.randn(2, T, 32, requires_grad=True)
    mask = torch.arange(T)[None] >= torch.tensor([T, T - 37])[:, None]
    pos = enc.encodings(T)
    fused, none = attn(x, pos, mask)
    ref, maps = attn(x, pos, mask, need_weights=True)
    assert none is None and maps is not None
    torch.testing.assert_close(fused, ref, atol=2e-5, rtol=1e-4)
    g_fused = torch.autograd.grad(fused.pow(2).sum(), [x, attn.linear_pos.weight, attn.pos_bias_v])
    g_ref = torch.autograd.grad(ref.pow(2).sum(), [x, attn.linear_pos.weight, attn.pos_bias_v])
    for a, b in zip(g_fused, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)


def test_position_table_grows_and_slices():
    enc = RelPositionalEncoding(8, dropout=0.0)
    long = enc.encodings(9)
    assert long.shape == (1, 17, 8) and enc.table.shape == (1, 17, 8)
    short = enc.encodings(5)
    assert enc.table.shape == (1, 17, 8)  # shorter inputs slice the table, no rebuild
    assert enc.table_offset(short) == 4 and enc.table_offset(long) == 0
    assert torch.equal(short, RelPositionalEncoding(8).encodings(5))
    # row k is relative position length-1-k: the centre row is position 0 (sin 0, cos 0)
    assert torch.equal(short[0, 4], torch.tensor([0.0, 1.0] * 4))
    pos = torch.arange(4, -5, -1, dtype=torch.float32)
    assert torch.allclose(short[0, :, 0], torch.sin(pos)) and torch.allclose(short[0, :, 1], torch.cos(pos))
    assert enc.table_offset(short.clone()) is None  # not a slice of the table
    assert enc.encodings(12).shape == (1, 23, 8) and enc.table.shape == (1, 23, 8)


def test_position_projection_cached_in_inference_only():
    model = make("1(H4)+3(H4)", num_layers=4).eval()
    x, lens = batch()
    feats, out_lens = model.frontend(x, lens)
    feats = feats.detach()
    mask = torch.arange(feats.shape[1])[None] >= out_lens[:, None]
    computing = model.encoder.layers[0].self_attn
    assert computing.position_source is model.encoder.pos_enc
    reuser = next(i for i, plan in enumerate(model.plans) if plan.reuses)
    assert model.encoder.layers[reuser].self_attn.position_source is None  # a reuse layer projects nothing
    assert not any("position" in k and "linear_pos" not in k for k in model.state_dict())

    def uncached(h, m):
        with torch.enable_grad():
            return model.encoder(h, m)[0].detach()

    for T in (feats.shape[1], 5, feats.shape[1] + 4):  # same, shorter (slice), longer (table grows)
        h = feats[:, :T] if T <= feats.shape[1] else torch.cat([feats, feats[:, :4]], 1)
        m = mask[:, :T] if T <= mask.shape[1] else torch.cat([mask, mask[:, :4]], 1)
        with torch.inference_mode():
            fast = model.encoder(h, m)[0]
        assert computing._position_cache is not None
        torch.testing.assert_close(fast, uncached(h, m), atol=1e-5, rtol=1e-5)
    # new weights invalidate the cache
    with torch.no_grad():
        before = model.encoder(feats, mask)[0]
        computing.linear_pos.weight.mul_(3.0)
        after = model.encoder(feats, mask)[0]
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, uncached(feats, mask), atol=1e-5, rtol=1e-5)
    # training right after inference-mode calls: no cache, full gradient to linear_pos
    model.train()
    model.zero_grad()
    model.encoder(feats, mask)[0].pow(2).sum().backward()
    assert computing.linear_pos.weight.grad.abs().sum() > 0


def _tiny_encoder_inputs():
    """A 2-layer d=32 model in eval mode (one computing, one reuse layer) and encoder inputs."""
    model = make("2(H4)", num_layers=2).eval()
    x, lens = batch()
    feats, out_lens = model.frontend(x, lens)
    mask = torch.arange(feats.shape[1])[None] >= out_lens[:, None]
    return model, feats.detach(), mask


def _uncached(model, h, m):
    with torch.enable_grad():  # autograd on: position_keys projects afresh
        return model.encoder(h, m)[0].detach()


@pytest.mark.parametrize("context", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("step_mode", ["eval", "train"])
def test_position_cache_sees_fused_optimizer_step(step_mode, context):
    """Fused AdamW changes the weights without bumping their ``_version``: the global optimizer
    step hook still invalidates the cached projection (whether the step ran in eval mode or
    between train() and eval())."""
    model, feats, mask = _tiny_encoder_inputs()
    computing = model.encoder.layers[0].self_attn
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    ctx = getattr(torch, context)
    # gradients first: a forward outside inference mode after the fill would rebuild the position
    # table (and so drop the cache by itself); only the step may change anything here
    model.encoder(feats, mask)[0].pow(2).sum().backward()
    with ctx():  # cache filled in this context, checked below in the same one (same cache key)
        model.encoder(feats, mask)
    assert computing._position_cache is not None
    before = computing.linear_pos.weight.detach().clone()
    if step_mode == "train":  # train() and eval() drop the cache
        model.train()
        opt.step()
        model.eval()
    else:  # the model stays in eval mode: only the optimizer step hook can tell
        opt.step()
    assert not torch.equal(before, computing.linear_pos.weight)
    with ctx():
        after = model.encoder(feats, mask)[0]
    torch.testing.assert_close(after, _uncached(model, feats, mask), atol=1e-5, rtol=1e-5)


def test_position_cache_cleared_by_mode_switch_apply_and_load():
    model, feats, mask = _tiny_encoder_inputs()
    computing = model.encoder.layers[0].self_attn

    def fill():
        with torch.no_grad():
            out = model.encoder(feats, mask)[0]
        assert computing._position_cache is not None
        return out

    fill()
    model.train()
    assert computing._position_cache is None
    model.eval()
    fill()
    model.eval()  # every call clears, not only a change of mode
    assert computing._position_cache is None
    # a write through .data bumps no version: train()/eval() or clear_position_cache() picks it up
    fill()
    computing.linear_pos.weight.data.mul_(3.0)
    model.train().eval()
    torch.testing.assert_close(fill(), _uncached(model, feats, mask), atol=1e-5, rtol=1e-5)
    computing.linear_pos.weight.data.mul_(0.5)
    computing.clear_position_cache()
    torch.testing.assert_close(fill(), _uncached(model, feats, mask), atol=1e-5, rtol=1e-5)
    computing.linear_pos.weight.data.mul_(0.5)
    assert clear_position_caches(model) == 2  # both attention modules (the reuse layer has no cache)
    assert computing._position_cache is None
    torch.testing.assert_close(fill(), _uncached(model, feats, mask), atol=1e-5, rtol=1e-5)
    # .to() / .double() (_apply) and load_state_dict drop it too
    model.double()
    assert computing._position_cache is None
    model.float()
    fill()
    other = make("2(H4)", num_layers=2)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.1)
    model.load_state_dict(other.state_dict(), assign=True)
    assert computing._position_cache is None
    torch.testing.assert_close(fill(), _uncached(model, feats, mask), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("autocast_first", [True, False])
def test_position_cache_keyed_on_autocast(autocast_first):
    """An fp32 model run with and without CPU bf16 autocast, in either order: the cached projection
    (bf16 under autocast) is not reused across the switch."""
    model, feats, mask = _tiny_encoder_inputs()
    ref_fp32 = _uncached(model, feats, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_bf16 = _uncached(model, feats, mask)
    computing, outs = model.encoder.layers[0].self_attn, {}
    for autocast in [True, False] if autocast_first else [False, True]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs[autocast] = model.encoder(feats, mask)[0]
        assert computing._position_cache[2].dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(outs[False], ref_fp32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[True], ref_bf16, atol=1e-3, rtol=1e-3)  # same bf16 ops as uncached
    assert not torch.allclose(outs[True], ref_fp32, atol=1e-5)  # bf16 really ran


def test_score_inputs_in_query_dtype():
    """The fp32 biases ``u``, ``v`` do not promote a bf16 query under autocast; in fp32 the inputs
    are exactly ``q + u``, ``(q + v) / sqrt(d_k)``, ``k``, ``linear_pos(pos_emb)``."""
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(32, 4).eval()
    x = torch.randn(2, 7, 32)
    pos_emb = RelPositionalEncoding(32).encodings(7)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = attn._score_inputs(x, pos_emb)
            fused_low = attn(x, pos_emb)[0]
        assert [t.dtype for t in low] == [torch.bfloat16] * 4
        assert fused_low.dtype == torch.bfloat16
        got = attn._score_inputs(x, pos_emb)
        assert [t.dtype for t in got] == [torch.float32] * 4
        q = attn._heads(attn.linear_q(x), attn.d_k)
        expected = (
            q + attn.pos_bias_u[None, :, None, :],
            (q + attn.pos_bias_v[None, :, None, :]) / math.sqrt(attn.d_k),
            attn._heads(attn.linear_k(x), attn.d_k),
            attn._heads(attn.linear_pos(pos_emb), attn.d_k),
        )
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_weak_attention_suppression():
    torch.manual_seed(0)
    attn = torch.softmax(torch.randn(2, 3, 9, 9) * 2, -1)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    attn = attn.masked_fill(mask[:, None, None, :], 0)
    attn = attn / attn.sum(-1, keepdim=True)
    out = weak_attention_suppression(attn, mask, 0.5)
    assert torch.allclose(out.sum(-1), torch.ones(()), atol=1e-6)
    # reference for one row of the padded utterance
    row = attn[1, 0, 0, :6]
    thr = row.mean() - 0.5 * row.std(unbiased=False)
    ref = torch.where(row >= thr, row, torch.zeros(()))
    assert torch.allclose(out[1, 0, 0, :6], ref / ref.sum(), atol=1e-6)
    assert (out[1, :, :, 6:] == 0).all()
    model = make("2(H4)x2", was_gamma=0.5).eval()
    x, lens = batch()
    enc = model.encode(x, lens, return_attentions=True)
    assert (enc.attentions[0] == 0).sum() > (
        make("2(H4)x2").eval().encode(x, lens, return_attentions=True).attentions[0] == 0
    ).sum()


def test_uniform_map_when_scores_vanish():
    attn = MultiHeadSelfAttention(16, 4)
    for p in attn.parameters():
        torch.nn.init.zeros_(p)
    x = torch.randn(1, 5, 16)
    m = attn.attention_map(x, torch.randn(1, 9, 16), None)
    assert torch.allclose(m, torch.full_like(m, 1 / 5))


def test_paper_parameter_counts():
    for reuse, millions in PAPER_MILLIONS.items():
        c = count(ConformerCTC(129, reuse=reuse))
        assert abs(c["blocks_and_head"] / 1e6 - millions) / millions < 0.005, (reuse, c)
    base = count(ConformerCTC(129, reuse="1(H4)x16"))["blocks_and_head"]
    one = count(ConformerCTC(129, reuse="2(H4)+1(H4)x14"))["blocks_and_head"]
    assert math.isclose(base - one, 66_304)  # one reuse layer: linear_pos + biases gone, values doubled


@pytest.mark.parametrize("reuse", ["1(H4)x4", "2(H4)x2"])
def test_encoder_traces_as_one_graph(reuse):
    """``torch.compile`` (used by ``analysis.latency --compile``) captures the whole encoder: the
    shift, the chunked positional term and the position cache break no graph."""
    model = make(reuse).eval()
    x = torch.randn(2, 300, 32)  # long enough for the chunked positional term
    with torch.inference_mode():
        explained = torch._dynamo.explain(lambda h: model.encoder(h, None)[0])(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons


def test_one_model_configuration():
    """``ModelConfig`` is the one list of model options: the constructor's signature lists each
    field with its default, a config and keyword options build the same model, an unknown option
    names itself, and the function options are those a plan change keeps."""
    import dataclasses
    import inspect

    from models.config import FUNCTION_OPTIONS, MODEL_KEYS, ModelConfig

    params = inspect.signature(ConformerCTC).parameters
    for f in dataclasses.fields(ModelConfig):
        assert params[f.name].default == f.default and params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
    assert [p for p in params if p in MODEL_KEYS] == list(MODEL_KEYS)
    cfg = ModelConfig(
        reuse="1(H2)+1(H2)",
        d_model=16,
        num_layers=2,
        ffn_dim=32,
        kernel_size=3,
        input_dim=20,
        subsampling_channels=4,
        was_gamma=0.5,
    )
    a, b = ConformerCTC(9, cfg), ConformerCTC(9, **cfg.options())
    assert a.model_config == b.model_config == cfg.replace(reuse="1(H2)x2") and a.reuse == "1(H2)x2"
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert ConformerCTC(**a.config).model_config == a.model_config  # config: the constructor's arguments
    assert ConformerCTC(9, cfg, d_model=32).d_model == 32  # keyword options over the config
    with pytest.raises(TypeError, match="'d_modle'"):
        ConformerCTC(9, d_modle=32)
    assert set(FUNCTION_OPTIONS) == set(MODEL_KEYS) - {"reuse", "dropout", "attention_dropout", "bn_momentum"}
    assert ModelConfig.from_mapping({"d_model": 16, "lr": 1e-3}) == ModelConfig(d_model=16)  # others ignored
