"""Analysis metrics: analytic cases, plain-loop references, silence handling, NaN where undefined,
head classification, value zeroing, coverage, and the corpus report end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from analysis.cad import cad
from analysis.context_mixing import context_mixing
from analysis.head_types import category_ranking, classify_heads, head_scores, phoneme_relation, prm
from analysis.par import par, par_coverage
from analysis.silence import drop_silence


def rand_maps(H, T, seed=0, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(H, T, T, generator=g, dtype=torch.float64) * sharp, -1)


# --- CAD ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 3, 10, 57])
def test_cad_identity_and_uniform(T):
    assert cad(torch.eye(T)).item() == pytest.approx(1.0)
    assert cad(torch.full((T, T), 1.0 / T, dtype=torch.float64)).item() == pytest.approx(1 - (T + 1) / (3 * T))


def test_cad_equals_the_integral_definition():
    A = rand_maps(3, 9, seed=4)
    T = 9
    # numerical integral over r of D(r) = (1/T) sum_i sum_{|i-j| <= r (T-1)} A[i,j]
    rs = np.linspace(0, 1, 20001)
    ref = []
    for h in range(3):
        D = [
            sum(A[h, i, j].item() for i in range(T) for j in range(T) if abs(i - j) <= r * (T - 1)) / T
            for r in rs[::500]
        ]
        # D is a step function of r: integrate exactly on its breakpoints
        exact = 0.0
        for k in range(T):  # |i-j| = k enters when r >= k/(T-1)
            mass = sum(A[h, i, j].item() for i in range(T) for j in range(T) if abs(i - j) == k) / T
            exact += mass * (1 - k / (T - 1))
        ref.append(exact)
        assert D[-1] == pytest.approx(1.0)
    assert torch.allclose(cad(A), torch.tensor(ref, dtype=torch.float64), atol=1e-12)
    assert cad(A[None]).shape == (1, 3)


# --- silence -----------------------------------------------------------------------------------


def test_drop_silence_removes_rows_columns_and_renormalises():
    A = rand_maps(2, 6, seed=1)
    labels = torch.tensor([36, 3, 5, -1, 3, 7])
    a, y = drop_silence(A, labels)
    keep = [1, 2, 4, 5]
    assert y.tolist() == [3, 5, 3, 7]
    sub = A[:, keep][:, :, keep]
    assert torch.allclose(a, sub / sub.sum(-1, keepdim=True))
    assert torch.allclose(a.sum(-1), torch.ones(2, 4, dtype=torch.float64))


# --- PAR ---------------------------------------------------------------------------------------


def par_loop(A, labels, C):
    """Plain loops over PAR (Shim, Choi, Sung, ICLR 2022, Eqs. 4-6), after dropping silence."""
    a, y = drop_silence(A, labels)
    H, T = a.shape[0], a.shape[-1]
    y = y.tolist()
    runs, r = [], -1
    for i, v in enumerate(y):
        if i == 0 or v != y[i - 1]:
            r += 1
        runs.append(r)
    out = torch.full((H, C, C), float("nan"), dtype=torch.float64)
    for h in range(H):
        for p in range(C):
            Cp = [i for i in range(T) if y[i] == p]
            if not Cp:
                continue
            for q in range(C):
                Cq = [j for j in range(T) if y[j] == q]
                if not Cq:
                    continue
                if p != q:
                    out[h, p, q] = T / (len(Cp) * len(Cq)) * sum(a[h, i, j] for i in Cp for j in Cq)
                else:
                    contrib = []
                    for i in Cp:
                        others = [j for j in Cp if runs[j] != runs[i]]
                        if others:
                            contrib.append(sum(a[h, i, j] for j in others) / len(others))
                    if contrib:
                        out[h, p, p] = T / len(Cp) * sum(contrib)
    return out


def test_par_equals_loop_reference_on_random_maps():
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        T, C = 23, 6
        labels = torch.randint(-1, C, (T,), generator=g)
        labels[:3] = torch.tensor([2, 2, 4])
        A = rand_maps(3, T, seed=seed)
        got, ref = par(A, labels, C).double(), par_loop(A, labels, C)
        assert torch.equal(torch.isnan(got), torch.isnan(ref))
        ok = ~torch.isnan(ref)
        assert torch.allclose(got[ok], ref[ok], atol=1e-5)


def test_par_of_uniform_map_is_one_where_defined():
    labels = torch.tensor([0, 0, 1, 2, 2, 0, 1, 36, 3, 0])
    T = len(labels)
    P = par(torch.full((2, T, T), 1.0 / T), labels, num_classes=5)
    defined = ~torch.isnan(P)
    assert torch.allclose(P[defined], torch.ones(()), atol=1e-6)
    # class 3 has one run: its diagonal is undefined; class 4 is absent: row and column undefined
    assert torch.isnan(P[:, 3, 3]).all() and torch.isnan(P[:, 4]).all() and torch.isnan(P[:, :, 4]).all()
    assert not torch.isnan(P[:, 0, 0]).any() and not torch.isnan(P[:, 3, 0]).any()


def test_par_of_within_class_map():
    # frames: A A B A B ; each frame attends uniformly to the frames of its own class
    labels = torch.tensor([0, 0, 1, 0, 1])
    T = 5
    A = torch.zeros(1, T, T)
    for i in range(T):
        same = (labels == labels[i]).float()
        A[0, i] = same / same.sum()
    P = par(A, labels, num_classes=2)[0]
    assert P[0, 1].item() == pytest.approx(0.0) and P[1, 0].item() == pytest.approx(0.0)
    # class 0: runs {0,1} and {3}. Frames 0,1 send 1/3 to frame 3 (1 other frame) -> 1/3 each;
    # frame 3 sends 2/3 to frames 0,1 (2 other frames) -> 1/3. P = T/|C| * (1/3 * 3) = 5/3
    assert P[0, 0].item() == pytest.approx(5 / 3)
    # class 1: runs {2} and {4}; each sends 1/2 to the other -> P = 5/2 * (1/2 + 1/2) = 5/2
    assert P[1, 1].item() == pytest.approx(5 / 2)


def test_par_bad_input():
    with pytest.raises(ValueError, match=r"\(H, T, T\)"):
        par(torch.ones(4, 4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the 3 phoneme classes"):
        par(torch.ones(1, 3, 3) / 3, torch.tensor([0, 5, 1]), num_classes=3)


def test_coverage():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(8, 8, generator=g, dtype=torch.float64) + 0.1
    assert par_coverage(ref, ref) == pytest.approx(1.0)
    assert par_coverage(ref * 2, ref) == pytest.approx(1.0)  # capped at 1
    assert par_coverage(ref / 2, ref, top_k=3) == pytest.approx(0.5)
    # top-k picks the largest reference entries of each row
    p = ref.clone()
    row_top = torch.argsort(ref[0], descending=True)[:2]
    p[0] = 0
    p[0, row_top] = ref[0, row_top]
    cov = par_coverage(p, ref, top_k=2)
    assert cov == pytest.approx(1.0)
    nan_ref = ref.clone()
    nan_ref[:] = float("nan")
    with pytest.raises(ValueError, match="undefined"):
        par_coverage(ref, nan_ref)


# --- head scores ---------------------------------------------------------------------------------


def test_head_scores_equal_loops():
    A = rand_maps(3, 7, seed=2)
    G, V, D = head_scores(A)
    T = 7
    for h in range(3):
        g = sum(-sum(A[h, q, k] * math.log(A[h, q, k]) for k in range(T)) for q in range(T)) / T
        col = [sum(A[h, q, k] for q in range(T)) / T for k in range(T)]
        v = sum(c * math.log(c) for c in col)
        d = -sum(abs(q - k) * A[h, q, k] for q in range(T) for k in range(T)) / T**2
        assert (G[h].item(), V[h].item(), D[h].item()) == pytest.approx((float(g), float(v), float(d)), abs=1e-9)


def test_classify_constructed_heads():
    T = 12
    diagonal = torch.eye(T)
    vertical = torch.zeros(T, T)
    vertical[:, 3] = 1.0
    uniform = torch.full((T, T), 1.0 / T)
    G, V, D = head_scores(torch.stack([diagonal, vertical, uniform]).double())
    assert classify_heads(G, V, D).tolist() == ["diagonal", "vertical", "global"]
    ranking = category_ranking(G, V, D)
    assert ranking == {"diagonal": [0], "vertical": [1], "global": [2]}
    # ties go to diagonal, then vertical
    assert classify_heads([1.0], [1.0], [1.0]).tolist() == ["diagonal"]
    assert classify_heads([1.0, 0.0], [1.0, 0.0], [0.0, 1.0]).tolist() == ["vertical", "diagonal"]
    with pytest.raises(ValueError, match="NaN"):
        classify_heads([float("nan")], [0.0], [0.0])


def test_prm_uniform_is_zero_and_matches_definition():
    labels = torch.tensor([0, 1, 1, 2, 36, 0])
    T = 5  # speech frames
    U = torch.full((1, 6, 6), 1.0 / 6)
    assert torch.allclose(prm(U, labels, 4)[:, :3, :3], torch.zeros(1, 3, 3), atol=1e-6)
    A = rand_maps(1, 6, seed=3)
    p, pu = phoneme_relation(A, labels, 4)
    a, y = drop_silence(A, labels)
    ref = torch.zeros(4, 4, dtype=torch.float64)
    for q in range(T):
        for k in range(T):
            ref[y[q], y[k]] += a[0, q, k] / T
    assert torch.allclose(p[0].double(), ref, atol=1e-6)
    assert pu[0, 1].item() == pytest.approx(2 * 2 / 25)  # |C_0| = |C_1| = 2, T = 5
    assert torch.isnan(prm(A, labels, 4)[0, 3]).all()


# --- context mixing ------------------------------------------------------------------------------


def _tiny_model(reuse="1(H2)+1(H2)"):
    from models import ConformerCTC

    torch.manual_seed(0)
    return ConformerCTC(
        9, input_dim=20, d_model=16, num_layers=2, ffn_dim=32, kernel_size=3, reuse=reuse, subsampling_channels=4
    ).eval()


@pytest.mark.parametrize("reuse", ["1(H2)x2", "2(H2)"])
def test_context_mixing_shapes_and_attention_equals_loop(reuse):
    model = _tiny_model(reuse)
    feats = torch.randn(60, 20)
    groups = [[0, 1, 2], [3, 4], [5, 6, 7, 8, 9], [10, 11, 12]]
    out = context_mixing(model, feats, groups)
    for m in ("attention", "attention_norm", "value_zeroing"):
        assert out[m].shape == (2, 4, 4) and torch.isfinite(out[m]).all()
    assert torch.allclose(out["value_zeroing"].sum(-1), torch.ones(2, 4), atol=1e-5)
    enc = model.encode(feats[None], torch.tensor([60]), return_attentions=True)
    A = enc.attentions[1][0].mean(0)
    assert out["attention"][1, 2, 0].item() == pytest.approx(A[5:10, 0:3].mean().item(), abs=1e-6)


def test_attention_norm_equals_loop():
    model = _tiny_model("1(H2)x2")
    feats = torch.randn(40, 20)
    groups = [[0, 1], [2, 3, 4], [5, 6, 7]]
    got = context_mixing(model, feats, groups, layers=[0], methods=["attention_norm"])["attention_norm"][0]
    enc = model.encode(feats[None], torch.tensor([40]), return_attentions=True, return_hidden_states=True)
    block = model.encoder.layers[0]
    sa = block.self_attn
    x = block.attention_input(enc.hidden_states[0])[0]
    v = sa.linear_v(x).view(-1, sa.num_heads, sa.d_v)
    A = enc.attentions[0][0]
    for gi, I in enumerate(groups):
        for gj, J in enumerate(groups):
            vals = []
            for q in I:
                f = sum(
                    A[h, q, k] * (v[k, h] @ sa.linear_out.weight[:, h * sa.d_v : (h + 1) * sa.d_v].t())
                    for h in range(sa.num_heads)
                    for k in J
                )
                vals.append(f.norm())
            assert got[gi, gj].item() == pytest.approx(torch.stack(vals).mean().item(), rel=1e-4)


def test_value_zeroing_of_unattended_group_scores_zero(monkeypatch):
    model = _tiny_model("2(H2)")  # layer 1 reuses layer 0's map
    feats = torch.randn(48, 20)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    from models.attention import MultiHeadSelfAttention

    real = MultiHeadSelfAttention.attention_map

    def nobody_looks_at_group_1(self, x, pos, mask):
        a = real(self, x, pos, mask).clone()
        a[..., 3:6] = 0
        return a / a.sum(-1, keepdim=True)

    monkeypatch.setattr(MultiHeadSelfAttention, "attention_map", nobody_looks_at_group_1)
    out = context_mixing(model, feats, groups, methods=["value_zeroing", "attention"])
    assert torch.allclose(out["value_zeroing"][:, :, 1], torch.zeros(2, 3), atol=1e-6)
    assert (out["value_zeroing"][:, :, [0, 2]] > 0).all()
    assert torch.allclose(out["attention"][:, :, 1], torch.zeros(2, 3), atol=1e-7)
    with pytest.raises(ValueError, match="group 1 has no frame"):
        context_mixing(model, feats, [[0], []])
    with pytest.raises(ValueError, match="unknown context-mixing method"):
        context_mixing(model, feats, groups, methods=["saliency"])


# --- probes, runner, report --------------------------------------------------------------------


def test_probe_learns_separable_labels():
    from analysis.probe import FrameCache, probe_accuracy, train_probes

    g = torch.Generator().manual_seed(0)
    N, d = 3000, 8
    labels = torch.randint(0, 37, (N,), generator=g)
    centres = torch.randn(37, d, generator=g) * 3
    informative = centres[labels] + 0.3 * torch.randn(N, d, generator=g)
    noise = torch.randn(N, d, generator=g)
    cache = FrameCache(torch.stack([noise, informative], 1), labels)
    probes = train_probes(FrameCache(cache.hidden[:2000], labels[:2000]), epochs=6, batch_size=64)
    acc = probe_accuracy(probes, FrameCache(cache.hidden[2000:], labels[2000:]))
    assert acc[1] > 0.9 and acc[0] < 0.15
    with pytest.raises(ValueError, match="labels must lie in 0..36"):
        FrameCache(torch.zeros(2, 1, 3), torch.tensor([0, 40]))


def test_cumulative_ablation_order():
    from analysis.ablation import cumulative_ablation, head_of

    assert head_of(5, [4, 2, 4]) == (1, 1) and head_of(6, [4, 2, 4]) == (2, 0)
    seen = []

    def metric(mask):
        seen.append(mask)
        return float(sum(len(v) for v in (mask or {}).values()))

    out = cumulative_ablation({"diagonal": [5, 0], "vertical": [], "global": [2]}, [4, 2], metric)
    assert out["baseline"] == 0 and out["all_masked"] == 6
    assert [s["metric"] for s in out["steps"]["diagonal"]] == [1, 2]
    assert seen[2] == {1: [1]} and seen[3] == {1: [1], 0: [0]}
    assert out["steps"]["vertical"] == []


def test_runner_never_averages_over_nothing():
    from analysis.runner import AttentionStats

    stats = AttentionStats([2, 2])
    assert not stats.add([torch.ones(2, 3, 3) / 3] * 2, torch.tensor([36, 36, 5]))  # one speech frame only
    with pytest.raises(ValueError, match="nothing to average"):
        stats.cad()


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    from tests.test_train import _fit

    root = tmp_path_factory.mktemp("ana")
    _fit(prepared, root, max_epochs=1, limit=2)
    return root / "checkpoints" / "last.ckpt"


def test_report_end_to_end(checkpoint, prepared, tmp_path):
    from analysis.__main__ import main

    main(
        [
            "report",
            "--ckpt",
            str(checkpoint),
            "--manifest",
            "mini-train",
            "--out",
            str(tmp_path / "r"),
            "--probe-epochs",
            "2",
            "--probe-train",
            "mini-dev",
        ]
    )
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    for fig in ("cad", "par", "coverage", "heads", "prm", "probe", "ablation", "mixing"):
        assert (tmp_path / "r" / r["figures"][fig].split("/")[-1]).stat().st_size > 1000, fig
    assert len(r["cad"]["per_head"]) == 2 and len(r["probe"]["accuracy"]) == 3
    assert r["par"]["coverage_accumulated"][0] == pytest.approx(1.0)  # self-reference = lower half = layer 1
    assert all(0 <= c <= 1 for c in r["par"]["coverage_per_layer"])
    assert r["attention_pass"]["utterances"] == r["alignment_counts"]["aligned"]
    # the per-head CAD of the report equals a direct recomputation on one utterance set
    assert all(0.5 < c <= 1 for row in r["cad"]["per_head"] for c in row)
    assert set(sum(r["heads"]["category"], [])) <= {"diagonal", "vertical", "global"}


def test_reference_from_checkpoint_equals_reference_from_saved_par(checkpoint, prepared, tmp_path):
    from analysis.__main__ import main

    main(
        [
            "par",
            "--ckpt",
            str(checkpoint),
            "--manifest",
            "mini-dev",
            "--out",
            str(tmp_path / "a"),
            "--reference",
            str(checkpoint),
        ]
    )
    main(
        [
            "par",
            "--ckpt",
            str(checkpoint),
            "--manifest",
            "mini-dev",
            "--out",
            str(tmp_path / "b"),
            "--reference",
            str(tmp_path / "a" / "par.json"),
        ]
    )
    a = json.loads((tmp_path / "a" / "report.json").read_text())["par"]
    b = json.loads((tmp_path / "b" / "report.json").read_text())["par"]
    assert a["coverage_accumulated"] == pytest.approx(b["coverage_accumulated"], abs=1e-9)
    assert a["coverage_per_layer"] == pytest.approx(b["coverage_per_layer"], abs=1e-9)
    # a model against its own lower half: the lower layers are fully covered
    assert a["coverage_accumulated"][0] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="not a saved PAR file"):
        (tmp_path / "bad.json").write_text("{}")
        main(
            [
                "par",
                "--ckpt",
                str(checkpoint),
                "--manifest",
                "mini-dev",
                "--out",
                str(tmp_path / "c"),
                "--reference",
                str(tmp_path / "bad.json"),
            ]
        )


def test_report_bad_inputs(checkpoint, prepared, tmp_path):
    from analysis.__main__ import main
    from data.manifest import read_manifest, write_manifest

    entries = [
        {k: v for k, v in e.items() if k != "alignment"}
        for e in read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    ]
    write_manifest(tmp_path / "noali.jsonl", entries)
    with pytest.raises(SystemExit, match="no utterance has an alignment"):
        main(
            [
                "cad",
                "--ckpt",
                str(checkpoint),
                "--manifest",
                str(tmp_path / "noali.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(SystemExit, match="not a checkpoint of train.py"):
        main(["cad", "--ckpt", str(tmp_path / "other.ckpt"), "--manifest", "mini-dev", "--out", str(tmp_path / "o")])
    # some utterances without alignment: skipped, counted, reported
    mixed = read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    mixed[0] = {k: v for k, v in mixed[0].items() if k != "alignment"}
    write_manifest(tmp_path / "mixed.jsonl", mixed)
    with pytest.warns(UserWarning, match="1 of .* have no alignment"):
        main(
            [
                "cad",
                "--ckpt",
                str(checkpoint),
                "--manifest",
                str(tmp_path / "mixed.jsonl"),
                "--out",
                str(tmp_path / "m"),
            ]
        )
    r = json.loads((tmp_path / "m" / "report.json").read_text())
    assert r["alignment_counts"]["skipped_no_alignment"] == 1


# --- the report's word frames follow the model's own front end ------------------------------------


def _front_end_checkpoint(prepared, path, input_layer):
    """A 2-layer model with the ``input_layer`` front end (the 6x / 8x layouts of converted ESPnet
    models) for the prepared folder's tokenizer and CMVN."""
    from data.features import GlobalCMVN
    from data.tokenizer import Tokenizer
    from models import ConformerCTC
    from models.checkpoint import save_model_checkpoint

    tok = Tokenizer(prepared / "bpe.model")
    small = dict(d_model=32, ffn_dim=64, kernel_size=5, subsampling_channels=8, input_layer=input_layer)
    model = ConformerCTC(tok.vocab_size, num_layers=2, reuse="1(H2)x2", **small)
    cmvn = GlobalCMVN.load(prepared / "cmvn.json")
    hp = {
        "reuse": model.reuse,
        "num_layers": 2,
        **small,
        "checkpoints": [str(path)],
        "tokenizer_path": str(prepared / "bpe.model"),
        "cmvn": {"mean": cmvn.mean, "std": cmvn.std},
    }
    save_model_checkpoint(path, model.eval(), tok, hp)
    return model


@pytest.mark.parametrize("input_layer,factor,field", [("conv2d6", 6, 11), ("conv2d8", 8, 15)])
def test_report_word_frames_of_a_6x_and_an_8x_front_end(prepared, tmp_path, input_layer, factor, field):
    """The report's context-mixing check counts an utterance's words in the model's own frames: a
    6x / 8x front end gives fewer frames than the 4x default, and a word after the model's last
    frame has no frame (the check refuses the utterance, as the mixing step itself would after the
    attention pass). Frame counts are recomputed here by running the model's front end."""
    from analysis.report import Report
    from data.alignments import write_textgrid
    from data.manifest import read_manifest, write_manifest

    model = _front_end_checkpoint(prepared, tmp_path / "m.ckpt", input_layer)
    base = read_manifest(prepared / "manifests" / "mini-dev.jsonl")[0]
    T = 20
    N = factor * T + field - 1  # the most input frames that still give T model frames
    with torch.no_grad():
        _, lengths = model.frontend(torch.zeros(1, N, 80), torch.tensor([N]))
    assert int(lengths) == T and N - 1 > 4 * T + 3  # the 4x count would give more frames
    hop = 0.01
    shift, window = factor * hop, (field - 1) * hop + 0.025
    duration = (N - 1) * hop + 0.025
    last, after = (T - 1) * shift + window / 2, T * shift + window / 2  # centres of frames T-1 and T
    assert after < duration - 0.01  # frame T would lie inside the audio, were it a model frame
    entries = []
    for uid, start in (("late", (last + after) / 2), ("inside", last - 0.01)):
        grid = tmp_path / f"{uid}.TextGrid"
        write_textgrid(grid, [(0.0, start, "ONE"), (start, duration, "TWO")], [(0.0, duration, "AH0")], duration)
        entries.append({**base, "id": uid, "duration": duration, "num_frames": N, "alignment": str(grid)})
    write_manifest(tmp_path / "words.jsonl", entries)
    for uid, ok in (("inside", True), ("late", False)):
        report = Report(
            str(tmp_path / "m.ckpt"),
            str(tmp_path / "words.jsonl"),
            str(tmp_path / uid),
            utterance=uid,
            data_dir=str(prepared),
            progress=False,
        )
        if ok:
            assert report._check_mixing_utterance()["id"] == uid
        else:
            with pytest.raises(ValueError, match="late has fewer than two aligned words"):
                report._check_mixing_utterance()
