"""Zero-shot reuse in the capture API and ``python -m analysis suggest-reuse``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_train import _fit, trained_checkpoint

from analysis.suggest import (
    LayerSimilarity,
    candidate_groups,
    js_divergence,
    pareto_front,
    partitions,
    plan_string,
    suggest,
)
from models import ConformerCTC

SMALL = dict(d_model=32, ffn_dim=64, kernel_size=5, subsampling_channels=8)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 120, 80, generator=g)
    return x, torch.tensor([120, 97, 64])


@pytest.mark.parametrize("plan", ["1(H4)x4", "2(H4)x2", "1(H2)+1(H4)x3"])
def test_identity_assignment_is_the_model_bit_for_bit(plan):
    torch.manual_seed(0)
    model = ConformerCTC(20, num_layers=4, reuse=plan, **SMALL).eval()
    x, n = _inputs()
    with torch.no_grad():
        ref, _ = model(x, n)
        identity = [p.source if p.reuses else i for i, p in enumerate(model.plans)]
        assert torch.equal(model(x, n, map_sources={})[0], ref)
        if not any(p.reuses for p in model.plans):
            assert torch.equal(model(x, n, map_sources=identity)[0], ref)


def test_zero_shot_layer_applies_the_earlier_map_to_its_own_values():
    torch.manual_seed(0)
    model = ConformerCTC(20, num_layers=3, reuse="1(H4)x3", **SMALL).eval()
    x, n = _inputs()
    with torch.no_grad():
        enc = model.encode(x, n, return_attentions=True, map_sources={2: 0})
        own = model.encode(x, n, return_attentions=True)
    assert torch.equal(enc.attentions[2], enc.attentions[0])
    assert torch.allclose(enc.attentions[0], own.attentions[0]) and not torch.allclose(enc.output, own.output)
    # by hand: layer 2's block with layer 0's map as its shared map
    block = model.encoder.layers[2]
    with torch.no_grad():
        full = model.encode(x, n, return_attentions=True, return_hidden_states=True, map_sources={2: 0})
        pos = model.encoder.pos_enc.encodings(full.output.shape[1], x.device)
        pad = torch.arange(full.output.shape[1])[None, :] >= full.lengths[:, None]
        out, _ = block(full.hidden_states[2], pos, pad, shared_attn=full.attentions[0])
    assert torch.allclose(out, full.output, atol=1e-6)


@pytest.mark.parametrize(
    "assignment, message",
    [
        ({1: 2}, "layer 1 cannot take the map of the later layer 2"),
        ({5: 0}, "names layer 5; the encoder has layers 0..3"),
        ({2: -1}, "layer 2 takes the map of layer -1, outside 0..3"),
        ({1: 0}, "layer 1 has 4 heads, layer 0 has 2"),
        ([0, 1, 2], "gives 3 sources; the encoder has 4 layers"),
    ],
)
def test_bad_assignments_are_refused(assignment, message):
    model = ConformerCTC(20, num_layers=4, reuse="1(H2)+1(H4)x3", **SMALL)
    x, n = _inputs()
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        model(x, n, map_sources=assignment)


def test_reuse_layer_cannot_take_another_map():
    model = ConformerCTC(20, num_layers=4, reuse="2(H4)x2", **SMALL)
    with pytest.raises(ValueError, match="layer 1 already reuses the map of layer 0"):
        model.map_sources({1: 0})
    with pytest.raises(ValueError, match="layer 3 already reuses the map of layer 2"):
        model.map_sources({3: 0})


def test_js_divergence_equals_a_plain_loop():
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(torch.randn(2, 5, 7, generator=g) * 2, -1)
    q = torch.softmax(torch.randn(2, 5, 7, generator=g) * 2, -1)
    q[0, 1] = 0.0
    q[0, 1, 3] = 1.0  # a one-hot row: 0 log 0 terms
    got = js_divergence(p, q)
    for h in range(2):
        for i in range(5):
            m = [(a + b) / 2 for a, b in zip(p[h, i].tolist(), q[h, i].tolist())]
            kl = lambda x, m=m: sum(a * math.log(a / c) for a, c in zip(x, m) if a > 0)  # noqa: E731
            assert float(got[h, i]) == pytest.approx(0.5 * kl(p[h, i].tolist()) + 0.5 * kl(q[h, i].tolist()), abs=1e-12)
    assert torch.allclose(js_divergence(p, p), torch.zeros(2, 5, dtype=torch.float64))
    one_hot = torch.eye(4)
    assert torch.allclose(
        js_divergence(one_hot, one_hot.roll(1, 0)), torch.full((4,), math.log(2), dtype=torch.float64)
    )


def test_partitions_plans_and_pareto():
    assert list(partitions(4, 2)) == [[[0], [1, 2, 3]], [[0, 1], [2, 3]], [[0, 1, 2], [3]]]
    assert sum(1 for _ in partitions(16, 5)) == math.comb(15, 4)
    assert plan_string([[0, 1], [2, 3]], [4, 4, 4, 4]) == "2(H4)x2"
    assert plan_string([[0], [1, 2, 3]], [8, 4, 4, 4]) == "1(H8)+3(H4)"
    sim = torch.eye(4, dtype=torch.float64)
    sim[0, 1] = sim[1, 0] = sim[2, 3] = sim[3, 2] = 1.0
    assert candidate_groups(sim, [4] * 4, [2], 1) == [[[0, 1], [2, 3]]]
    assert candidate_groups(sim, [4, 4, 2, 2], [2], 8) == [[[0, 1], [2, 3]]]  # groups may not mix head counts
    assert sorted(pareto_front([(1, 5), (2, 5), (2, 9), (3, 20), (0, 1)])) == [1, 3, 4]


def _constructed_baseline(tokenizer_vocab: int) -> ConformerCTC:
    """4 layers in two groups, [0, 1] and [2, 3], whose maps are identical within a group: query and
    key weights zero (content scores constant per row), query bias, position biases and position
    projection shared in the group, so the map depends on positions only, and on the group."""
    torch.manual_seed(0)
    model = ConformerCTC(tokenizer_vocab, num_layers=4, reuse="1(H4)x4", **SMALL).eval()
    layers = [b.self_attn for b in model.encoder.layers]
    with torch.no_grad():
        for a in layers:
            a.linear_q.weight.zero_()
            a.linear_k.weight.zero_()
        for first, other in ((0, 1), (2, 3)):
            src, dst = layers[first], layers[other]
            for name in ("linear_q.bias", "linear_k.bias", "pos_bias_u", "pos_bias_v", "linear_pos.weight"):
                dst.get_parameter(name).copy_(src.get_parameter(name))
        for a in layers[2:]:
            a.linear_pos.weight.mul_(-3.0)  # the second group's maps differ from the first's
            a.pos_bias_v.mul_(2.0)
        model.head.bias[0] = -10.0  # never blank: every utterance gets a hypothesis
    return model


def test_suggest_finds_constructed_groups(prepared, tmp_path):
    from data.dataset import ManifestDataset
    from data.manifest import read_manifest, write_manifest
    from data.sampler import ordered_loader
    from data.tokenizer import Tokenizer
    from models.checkpoint import model_cmvn, save_model_checkpoint

    tok = Tokenizer(prepared / "bpe.model")
    model = _constructed_baseline(tok.vocab_size)
    hp = {
        "reuse": model.reuse,
        "num_layers": 4,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "bn_momentum": 0.1,
        "tokenizer_path": str(prepared / "bpe.model"),
        "checkpoints": ["constructed"],
        "cmvn": {
            "mean": model_cmvn({"cmvn": None, "checkpoints": ["x"]}, prepared).mean,
            "std": model_cmvn({"cmvn": None, "checkpoints": ["x"]}, prepared).std,
        },
        **SMALL,
    }
    ckpt = tmp_path / "constructed.ckpt"
    save_model_checkpoint(ckpt, model, tok, hp)
    # references = the baseline's own hypotheses: its WER is 0, and only what changes its output counts
    entries = read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    ds = ManifestDataset(
        [prepared / "manifests" / "mini-dev.jsonl"],
        tokenizer=None,
        cmvn=model_cmvn({"cmvn": hp["cmvn"], "checkpoints": ["x"]}),
    )
    hyps = {}
    with torch.no_grad():
        for batch in ordered_loader(ds, 20000):
            from models.decoding import greedy_decode

            lp, n = model(batch["features"], batch["feature_lengths"])
            hyps.update(zip(batch["ids"], (tok.decode(h) for h in greedy_decode(lp, n))))
    write_manifest(tmp_path / "own.jsonl", [{**e, "text": hyps[e["id"]]} for e in entries])
    result = suggest(str(ckpt), str(tmp_path / "own.jsonl"), str(tmp_path / "out"), ks=[2], progress=False)
    sim = torch.tensor(result["similarity"])
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-9) and sim[2, 3] == pytest.approx(1.0, abs=1e-9)
    assert sim[1, 2] < 0.99 and sim[0, 3] < 0.99
    assert result["baseline"]["wer"] == 0.0
    best_k2 = next(c for c in result["candidates"] if c["num_groups"] == 2)
    assert best_k2["groups"] == [[0, 1], [2, 3]] and best_k2["reuse"] == "2(H4)x2"
    assert best_k2["zero_shot_wer"] == result["baseline"]["wer"] and best_k2["similarity"] == pytest.approx(1.0)
    assert best_k2["zero_shot_loss"] == pytest.approx(result["baseline"]["loss"], rel=1e-5)
    others = [c for c in result["candidates"] if c["groups"] != [[0, 1], [2, 3]]]
    assert others and all(c["zero_shot_loss"] != pytest.approx(result["baseline"]["loss"], rel=1e-5) for c in others)


def test_layer_similarity_of_identical_and_different_maps():
    acc = LayerSimilarity(3)
    a = torch.softmax(torch.randn(2, 6, 6), -1).double()
    b = torch.softmax(torch.randn(4, 6, 6), -1).double()
    acc.add([a, a.clone(), b])
    sim = acc.similarity()
    assert sim[0, 1] == pytest.approx(1.0) and torch.equal(sim, sim.t())
    assert sim[0, 2] == pytest.approx(1 - float(js_divergence(a.mean(0), b.mean(0)).mean()) / math.log(2))


@pytest.fixture(scope="module")
def three_layer(prepared, tmp_path_factory):
    return trained_checkpoint(prepared, tmp_path_factory, "suggest", reuse="1(H2)x3", num_layers=3)


def test_cli_end_to_end(prepared, three_layer, tmp_path, capsys):
    from analysis.__main__ import main
    from analysis.report import Report

    main(["suggest-reuse", "--ckpt", str(three_layer), "--manifest", "mini-dev", "--out", str(tmp_path / "s")])
    r = json.loads((tmp_path / "s" / "suggest.json").read_text())
    assert {"baseline", "similarity", "cad", "coverage", "candidates"} <= set(r)
    assert len(r["similarity"]) == 3 and len(r["cad"]) == 3 and len(r["coverage"]) == 3
    assert [c["num_groups"] for c in r["candidates"]] and {c["num_groups"] for c in r["candidates"]} == {2}
    for c in r["candidates"]:
        assert {"reuse", "groups", "zero_shot_wer", "zero_shot_loss", "similarity", "gflop_saving"} <= set(c)
        assert c["gflop_saving"] > 0
    assert (tmp_path / "s" / "similarity.png").stat().st_size > 0 and (tmp_path / "s" / "candidates.png").is_file()
    assert "GFLOP saved" in capsys.readouterr().out
    report = Report(str(three_layer), "mini-dev", str(tmp_path / "rep"), progress=False).run(["suggest"])
    assert report["suggest"]["candidates"] and (tmp_path / "rep" / "suggest" / "similarity.png").is_file()


def test_bad_arguments(prepared, three_layer, tmp_path):
    from analysis.__main__ import main

    base = ["suggest-reuse", "--ckpt", str(three_layer), "--manifest", "mini-dev", "--out", str(tmp_path / "s")]
    with pytest.raises(SystemExit, match="--groups 4: a plan of 3 layers has 1 to 3 groups"):
        main(base + ["--groups", "2", "4"])
    with pytest.raises(SystemExit, match="--per-k must be at least 1"):
        main(base + ["--per-k", "0"])
    with pytest.raises(SystemExit, match="no-such-set.jsonl does not exist"):
        main(["suggest-reuse", "--ckpt", str(three_layer), "--manifest", "no-such-set", "--out", str(tmp_path / "s")])
    reuse_root = tmp_path / "reuse"
    _fit(prepared, reuse_root, max_epochs=1, limit=1, reuse="2(H2)", num_layers=2)
    with pytest.raises(SystemExit, match="a reuse model"):
        main(
            [
                "suggest-reuse",
                "--ckpt",
                str(reuse_root / "checkpoints" / "last.ckpt"),
                "--manifest",
                "mini-dev",
                "--out",
                str(tmp_path / "s"),
            ]
        )


def test_demo_picks_the_best_plan_with_k_groups(tmp_path):
    from analysis.demo import best_plan

    path = tmp_path / "suggest.json"
    path.write_text(
        json.dumps(
            {
                "candidates": [
                    {"num_groups": 3, "reuse": "2(H4)+1(H4)x2"},
                    {"num_groups": 2, "reuse": "3(H4)+1(H4)"},
                    {"num_groups": 2, "reuse": "2(H4)x2"},
                ]
            }
        )
    )
    assert best_plan(path, 2) == "3(H4)+1(H4)" and best_plan(path, 3) == "2(H4)+1(H4)x2"
    assert best_plan(path, 4) == "2(H4)+1(H4)x2"  # none with 4: the best with the most groups below
    with pytest.raises(ValueError, match="no candidate plan with 1 groups or fewer"):
        best_plan(path, 1)


def test_two_layer_baseline_gets_a_candidate_and_a_demo_plan(prepared, tmp_path_factory, tmp_path):
    """With two layers the only reuse plan has one group (layer 1 takes layer 0's map): the default
    K range gives it, and best-plan --groups 2 (the demo's) falls back to it, saying so."""
    from analysis.demo import main as demo_main

    two = trained_checkpoint(prepared, tmp_path_factory, "suggest2", reuse="1(H2)x2", num_layers=2)
    result = suggest(str(two), "mini-dev", str(tmp_path / "s"), limit=4, progress=False)
    assert [c["reuse"] for c in result["candidates"]] == ["2(H2)"]
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        demo_main(["best-plan", str(tmp_path / "s" / "suggest.json"), "--groups", "2"])
    assert out.getvalue().strip() == "2(H2)" and "no candidate plan with 2 groups" in err.getvalue()


def test_gflop_saving_is_the_reuse_models_own_count(prepared, three_layer, tmp_path):
    """A candidate's saving is the baseline's encoder GFLOP minus that of the trained reuse model
    of its plan, each counted on a CPU copy whatever --device (not a per-layer difference times
    the reuse layers, which also counts layer 0's change from the fused to the materialised
    attention path once per reuse layer)."""
    from analysis.suggest import encoder_gflop
    from models.checkpoint import load_model
    from models.retrofit import check_plan

    result = suggest(str(three_layer), "mini-dev", str(tmp_path / "s"), ks=[1, 2], limit=2, progress=False)
    base, _, _ = load_model(three_layer)
    base_gflop = encoder_gflop(base, 768)
    assert result["encoder_gflop_768"] == pytest.approx(base_gflop, abs=1e-4)
    for c in result["candidates"]:
        own = encoder_gflop(check_plan(base, c["reuse"]).eval(), 768)
        assert c["gflop_saving"] == pytest.approx(base_gflop - own, abs=1e-4), c["reuse"]


def test_demo_table_names_the_training_precision_and_its_reason(tmp_path, capsys):
    """The demo's final table: WERs, steps and latency of both runs, and the precision each trained
    in with the reason (from the checkpoints), so that a figure always says which CPU path gave it."""
    import torch

    from analysis.demo import table

    choice = {
        "precision": "32-true",
        "requested": "auto",
        "device": "the CPU",
        "warning": None,
        "reason": "this CPU has no bf16 matrix instructions (...), so PyTorch emulates bf16",
    }
    latency = {
        "device": "AMD EPYC (AVX2; bf16 emulated)",
        "dtype": "fp32",
        "threads": 2,
        "runs": 5,
        "rounds": 2,
        "inference": [],
    }
    for name, plan, steps in (("train", "1(H4)x4", 895), ("retrofit", "3(H4)+1(H4)", 179)):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        torch.save(
            {"state_dict": {"model.w": torch.zeros(10, 3)}, "global_step": steps, "precision": choice},
            tmp_path / name / "checkpoints" / "last.ckpt",
        )
        eval_dir = tmp_path / ("eval" if name == "train" else "eval_retrofit")
        eval_dir.mkdir()
        eval_dir.joinpath("results.json").write_text(
            json.dumps({"reuse": plan, "sets": {"mini-test": {"greedy": {"wer": 4.0}, "beam": {"wer": 3.5}}}})
        )
        latency["inference"].append({"config": plan, "by_length": {"64": {"median_ms": 2.0, "speedup_vs_first": 1.0}}})
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    (tmp_path / "stages.tsv").write_text("train baseline\t600\ntrain retrofit\t120\n")
    summary = table(tmp_path)
    out = capsys.readouterr().out
    assert [r["precision"] for r in summary["rows"]] == ["32-true", "32-true"]
    assert "(training precision: baseline 32-true, retrofit 32-true; this CPU has no bf16" in out
    assert "AMD EPYC (AVX2; bf16 emulated)" in out and "10m00s" in out and "2m00s" in out
