"""Attention against saliency: a constructed frame-local model with identity attention, integrated
gradients' completeness, seeded perturbations, plain-loop references of the pooling / rollout /
correlation, the deletion test on a small trained model, bad arguments, and the command end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from analysis.saliency import (
    PerturbationSettings,
    analyse_utterance,
    delete_frames,
    frame_windows,
    gradient_saliency,
    parse_mask_sizes,
    pearson,
    perturbation_saliency,
    pool_to_frames,
    rollout,
    top_frames,
)
from analysis.saliency_model import Capture, CTCSaliency, Token, ctc_emissions
from data.framing import receptive_field, subsampled_count, subsampling_factor
from models.ctc import ConformerCTC


class FrameLocal:
    """A :class:`~analysis.saliency.SaliencyModel` whose output at frame ``t`` depends only on input
    frame ``t`` (``log_softmax(x_t W)``), with identity attention in every layer and head."""

    subsampling = 1
    receptive_field = 1
    frame_offset = 0

    def __init__(self, F=6, V=5, seed=0):
        self.computes = [True, False]
        g = torch.Generator().manual_seed(seed)
        self.W = torch.randn(F, V, generator=g, dtype=torch.float64)

    def _log_probs(self, x):
        return torch.log_softmax(x.double() @ self.W, -1)

    def tokens(self, features):
        return ctc_emissions(self._log_probs(features))

    def score(self, features, tokens):
        f, i = torch.tensor([t.frame for t in tokens]), torch.tensor([t.id for t in tokens])
        return self._log_probs(features)[:, f, i]

    def capture(self, features, tokens):
        s0 = features.detach().double().requires_grad_(True)
        states = [s0, s0 * 2.0]  # on the path to the scores, frame-local
        T = features.shape[0]
        maps = [torch.eye(T, dtype=torch.float64).expand(2, T, T)] * 2
        f, i = torch.tensor([t.frame for t in tokens]), torch.tensor([t.id for t in tokens])
        lp = torch.log_softmax((states[1] / 2) @ self.W, -1)
        return Capture(lp[f, i], [m[:, f] for m in maps], maps, states)


def _tiny_model(seed=0, reuse="1(H2)+1(H2)"):
    torch.manual_seed(seed)
    return ConformerCTC(
        17, input_dim=20, d_model=32, num_layers=2, ffn_dim=64, kernel_size=5, reuse=reuse, subsampling_channels=8
    ).eval()


# --- the constructed frame-local model --------------------------------------------------------------


@pytest.mark.parametrize("method", ["ixg", "ig", "perturbation"])
def test_frame_local_model_saliency_sits_on_the_token_frame(method):
    model = FrameLocal()
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    r = analyse_utterance(model, x, method, PerturbationSettings(sizes=((1, 6), (1, 3)), masks=400, p=0.3), n_steps=64)
    assert r is not None and len(r.tokens) >= 5
    frames = torch.tensor([t.frame for t in r.tokens])
    # saliency concentrates on the token's own frame
    assert torch.equal(r.frame_saliency.abs().argmax(-1), frames)
    if method == "perturbation":  # a Monte-Carlo estimate: elsewhere only noise, well below the own frame
        others = r.frame_saliency.abs().clone()
        others[torch.arange(len(frames)), frames] = 0
        assert (r.frame_saliency.abs()[torch.arange(len(frames)), frames] > 2 * others.amax(-1)).all()
        assert (r.input_per_layer > 0.75).all() and (r.input_per_head > 0.75).all()
    else:  # gradients are exactly frame-local: correlation with the identity row is 1
        others = r.frame_saliency.clone()
        others[torch.arange(len(frames)), frames] = 0
        assert (others == 0).all()
        for c in (r.input_per_layer, r.input_per_head, r.input_mean, r.input_rollout):
            assert torch.allclose(c, torch.ones_like(c), atol=1e-9)
    # the layer inputs' saliency is frame-local too (gradient x input): correlation 1 with the identity map
    for c in (r.states_per_layer, r.states_per_head, r.states_mean):
        assert torch.allclose(c, torch.ones_like(c), atol=1e-9)
    # removing the token's own frame (the top of its saliency) is what hurts it; at 5 % of 30 frames
    # the random frame is rarely its own
    assert (r.deletion["saliency"][:, 0] >= r.deletion["random"][:, 0] - 1e-9).all()
    assert r.deletion["saliency"][:, 0].mean() > 0


# --- methods -----------------------------------------------------------------------------------------


def test_integrated_gradients_completeness():
    sm = CTCSaliency(_tiny_model())
    x = torch.randn(60, 20, generator=torch.Generator().manual_seed(2))
    tokens = sm.tokens(x)
    assert tokens
    score = lambda z: sm.score(z, tokens)
    attr, delta = gradient_saliency(score, x, len(tokens), "ig", n_steps=128, return_delta=True)
    with torch.no_grad():
        diff = score(x[None])[0] - score(torch.zeros_like(x)[None])[0]  # independent of captum's own delta
    assert attr.shape == (len(tokens), 60, 20)
    assert torch.allclose(attr.sum((1, 2)), diff, rtol=0.02, atol=0.02)
    assert torch.allclose(attr.sum((1, 2)) - diff, delta.to(diff.dtype), atol=1e-4)


def test_perturbation_is_seeded_and_recovers_an_additive_model():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(12, 8, generator=g)
    x = torch.randn(12, 8, generator=g)
    score = lambda z: (z * w).sum((1, 2))[:, None]

    s = PerturbationSettings(sizes=((1, 1),), masks=3000, p=0.3, seed=7, batch=500)
    a, b = perturbation_saliency(score, x, s), perturbation_saliency(score, x, s)
    c = perturbation_saliency(score, x, PerturbationSettings(sizes=((1, 1),), masks=3000, p=0.3, seed=8, batch=500))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the masks do not depend on how many are drawn per forward pass
    assert torch.allclose(a, perturbation_saliency(score, x, dataclasses.replace(s, batch=7)), atol=1e-5)
    assert pearson(a[0].flatten(), (w * x).flatten()) > 0.9


def test_pooling_rollout_pearson_and_deletion_against_loops():
    for layer in ("conv2d", "conv2d6", "conv2d8"):
        T = 101
        Tp = subsampled_count(T, layer)
        w = frame_windows(Tp, T, subsampling_factor(layer), receptive_field(layer))
        assert w.shape == (Tp, T) and (w.sum(1) == receptive_field(layer)).all()  # every window inside the input
    s = torch.randn(3, 30, 4, dtype=torch.float64)
    w = frame_windows(6, 30, 4, 7).double()
    pooled = pool_to_frames(s, w)
    ref = [
        [np.mean([s[n, t].sum().item() for t in range(4 * m, min(30, 4 * m + 7))]) for m in range(6)] for n in range(3)
    ]
    assert np.allclose(pooled.numpy(), ref)
    g = torch.Generator().manual_seed(4)
    maps = [torch.softmax(torch.randn(2, 5, 5, generator=g, dtype=torch.float64), -1) for _ in range(3)]
    r = rollout(maps)
    ref = np.eye(5)
    for m in maps:
        ref = (0.5 * m.mean(0).numpy() + 0.5 * np.eye(5)) @ ref
    assert np.allclose(r[-1].numpy(), ref) and np.allclose(r[-1].sum(-1).numpy(), 1)
    a, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, 9, generator=g, dtype=torch.float64)
    assert np.allclose(pearson(a, b).numpy(), [np.corrcoef(a[i], b[i])[0, 1] for i in range(4)])
    assert torch.isnan(pearson(torch.ones(9), b[0]))
    assert top_frames(torch.tensor([0.1, 0.5, 0.3, 0.9]), 40).tolist() == [3, 1]
    assert top_frames(torch.tensor([0.1, 0.5, 0.3, 0.9]), 5).tolist() == [3]  # at least one frame
    x = torch.ones(30, 2)
    d = delete_frames(x, torch.tensor([1]), frame_windows(6, 30, 4, 7))
    assert d[:, 0].tolist() == [1] * 4 + [0] * 7 + [1] * 19
    with pytest.raises(ValueError, match="deletion percentage"):
        top_frames(torch.ones(3), 0)


def test_ctc_emissions_first_frame_of_each_run():
    lp = torch.log(torch.tensor([[0.1, 0.9, 0], [0.1, 0.9, 0], [0.9, 0.1, 0], [0.1, 0.9, 0], [0.1, 0, 0.9]]) + 1e-9)
    assert ctc_emissions(lp) == [Token(1, 0), Token(1, 3), Token(2, 4)]


def test_ctc_adapter_marks_reused_layers_and_captures_rows():
    sm = CTCSaliency(_tiny_model(reuse="2(H2)"))
    assert sm.computes == [True, False] and (sm.subsampling, sm.receptive_field) == (4, 7)
    x = torch.randn(50, 20)
    tokens = sm.tokens(x)
    cap = sm.capture(x, tokens)
    assert len(cap.rows) == 2 and cap.rows[0].shape == (2, len(tokens), subsampled_count(50))
    assert torch.equal(cap.maps[0], cap.maps[1])  # the reuse layer applies the computing layer's map
    with torch.no_grad():
        assert torch.allclose(cap.scores, sm.score(x[None], tokens)[0], atol=1e-5)


def test_bad_settings():
    with pytest.raises(ValueError, match="--mask-sizes"):
        parse_mask_sizes("5by10")
    with pytest.raises(ValueError, match="--masks"):
        PerturbationSettings(masks=1)
    with pytest.raises(ValueError, match="--mask-p"):
        PerturbationSettings(p=1.5)
    with pytest.raises(ValueError, match="unknown saliency method"):
        analyse_utterance(FrameLocal(), torch.randn(5, 6), "lrp")


# --- a small trained model, and the command --------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    """A random-weight checkpoint of ours (tiny-model size, 3 layers, the last reusing layer 2's map)
    for the prepared folder's tokenizer and CMVN: a few-step trained tiny model emits only blanks, a
    random one emits tokens everywhere; the blank's bias is raised so about half the frames are blank."""
    from data.features import GlobalCMVN
    from data.tokenizer import Tokenizer
    from models.checkpoint import save_model_checkpoint

    tok = Tokenizer(prepared / "bpe.model")
    size = {
        "d_model": 32,
        "num_layers": 3,
        "ffn_dim": 64,
        "kernel_size": 5,
        "subsampling_channels": 8,
        "bn_momentum": 0.1,
    }
    torch.manual_seed(5)
    model = ConformerCTC(tok.vocab_size, reuse="1(H2)+2(H2)", **size).eval()
    with torch.no_grad():
        model.head.bias[0] += 0.8
    cmvn = GlobalCMVN.load(prepared / "cmvn.json")
    path = tmp_path_factory.mktemp("sal") / "random.ckpt"
    hp = {
        "reuse": model.reuse,
        **size,
        "checkpoints": [str(path)],
        "tokenizer_path": str(prepared / "bpe.model"),
        "cmvn": {"mean": cmvn.mean, "std": cmvn.std},
    }
    save_model_checkpoint(path, model, tok, hp)
    return path


def test_saliency_command_end_to_end(checkpoint, prepared, tmp_path, capsys):
    from analysis.__main__ import main
    from data.manifest import read_manifest, write_manifest

    entries = read_manifest(prepared / "manifests" / "mini-train.jsonl")[:6]
    bad = tmp_path / "bad.flac"
    bad.write_bytes(b"not audio at all" * 100)
    entries.insert(1, {**entries[0], "id": "bad-utt", "audio": str(bad), "alignment": None})
    write_manifest(tmp_path / "m.jsonl", entries)
    with pytest.warns(UserWarning, match="bad-utt"):
        main(
            [
                "saliency",
                "--ckpt",
                str(checkpoint),
                "--manifest",
                str(tmp_path / "m.jsonl"),
                "--out",
                str(tmp_path / "o"),
                "--limit",
                "7",
                "--masks",
                "64",
                "--seed",
                "3",
            ]
        )
    r = json.loads((tmp_path / "o" / "saliency.json").read_text())
    assert {"settings", "tokens", "correlation", "deletion"} <= set(r)
    assert r["tokens"] > 0 and r["utterances"]["scored"] >= 1
    assert [s["id"] for s in r["utterances"]["skipped"]] == ["bad-utt"]
    for side in ("input", "encoder_output"):
        c = r["correlation"][side]
        assert len(c["per_layer"]) == 3 and np.array(c["per_head"], dtype=float).shape == (3, 2)
        assert -1 <= c["mean_over_layers"] <= 1
    assert len(r["correlation"]["input"]["rollout"]) == 3
    assert [d["computes"] for d in r["layers"]] == [True, True, False]
    assert r["deletion"]["k"] == [5, 10, 20, 40]
    for n in ("attention", "saliency", "random"):
        assert len(r["deletion"][n]) == 4
    # faithfulness: removing the frames saliency ranks first hurts at least as much as random ones
    assert all(s >= q for s, q in zip(r["deletion"]["saliency"], r["deletion"]["random"]))
    for fig in ("correlation", "utterance", "deletion"):
        assert (tmp_path / "o" / r["figures"][fig].split("/")[-1]).stat().st_size > 1000, fig
    out = capsys.readouterr().out
    assert "r(input)" in out and "deletion k%" in out and "reused" in out
    assert r["settings"]["perturbation"]["seed"] == 3 and r["settings"]["receptive_field"] == 7


def test_saliency_command_bad_arguments(checkpoint, prepared, tmp_path):
    from analysis.__main__ import main

    base = ["saliency", "--ckpt", str(checkpoint), "--manifest", "mini-dev", "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit, match="--mask-sizes"):
        main([*base, "--mask-sizes", "10"])
    with pytest.raises(SystemExit, match="--masks"):
        main([*base, "--masks", "0"])
    with pytest.raises(SystemExit, match="--ig-steps"):
        main([*base, "--method", "ig", "--ig-steps", "0"])
    with pytest.raises(SystemExit, match="manifest .* does not exist"):
        main(
            [
                "saliency",
                "--ckpt",
                str(checkpoint),
                "--manifest",
                str(tmp_path / "none.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
