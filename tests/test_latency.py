"""The latency benchmark end to end at tiny sizes: well-formed JSON, inference mode, errors."""
from __future__ import annotations

import json

import pytest
import torch

from analysis import latency

TINY = ["--d-model", "32", "--num-layers", "4", "--ffn-dim", "64", "--kernel-size", "5", "--lengths", "16", "32",
        "--warmup", "1", "--runs", "3", "--train-length", "16", "--train-batch", "2", "--train-runs", "2", "--quiet"]


def test_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    modes = []
    real = latency.measure

    def spy(fn, device, warmup, runs):
        def checked():
            modes.append(torch.is_inference_mode_enabled())
            return fn()

        return real(checked, device, warmup, runs)

    monkeypatch.setattr(latency, "measure", spy)
    out = latency.main(["--reuse", "1(H4)x4", "2(H4)x2", *TINY, "--json", str(tmp_path / "r.json"),
                        "--png", str(tmp_path / "r.png")])
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(json.dumps(out))
    for key in ("device", "device_type", "torch", "dtype", "threads", "batch_size", "lengths", "inference", "training",
                "malloc", "runs", "rounds", "warmup"):
        assert key in data, key
    assert data["torch"] == torch.__version__ and data["dtype"] == "fp32" and data["threads"] >= 1
    assert data["malloc"].startswith("steady") or data["malloc"] == "default (not glibc)"
    configs = [e["config"] for e in data["inference"]]
    assert configs == ["1(H4)x4", "1(H4)x4+materialised", "2(H4)x2", "torchaudio"]
    for e in data["inference"]:
        assert e["parameters"] > 0
        for T in ("16", "32"):
            r = e["by_length"][T]
            assert r["runs"] == 3 and 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] and r["speedup_vs_first"] > 0
            assert r["gflop"] > 0
    assert data["inference"][0]["by_length"]["16"]["speedup_vs_first"] == 1.0
    gflop = {e["config"]: e["by_length"]["32"]["gflop"] for e in data["inference"]}
    assert gflop["2(H4)x2"] < gflop["1(H4)x4"] and gflop["torchaudio"] < gflop["1(H4)x4"]
    assert [r["config"] for r in data["training"]] == ["1(H4)x4", "2(H4)x2"]
    assert all(r["median_ms"] > 0 for r in data["training"])
    # inference timings ran under inference_mode; training steps did not
    n_inference = 4 * 2 * (1 + 3)
    assert all(modes[:n_inference]) and not any(modes[n_inference:])
    assert (tmp_path / "r.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "1(H4)x4+materialised" in table and "torchaudio" in table and "training step" in table
    assert "GFLOP per forward" in table


def test_flop_count_matches_the_architecture():
    """An independent count of the matrix products of one encoder forward (d 32, FFN 64, kernel 5,
    4 layers, T 16, batch 1): ours adds the positional projection-free rel-pos term to the peer's."""
    a = latency.parser().parse_args(TINY)
    bench = latency.Bench(a)
    T, d, f, k, n = 16, 32, 64, 5, 4
    common = 8 * T * d * f + 8 * T * d * d + 4 * T * T * d + 6 * T * d * d + 2 * T * d * k  # FFNs, q k v o, SDPA, conv
    rel_pos = 2 * T * (2 * T - 1) * d  # (q + v) p^T against all 2T-1 positions (one chunk below 256 frames)
    model, peer = bench.model("1(H4)x4").eval(), bench.peer().eval()
    with torch.inference_mode():
        ours = bench.forward_fn("fused", model, T)
        assert latency.count_flops(ours) == n * (common + rel_pos + 2 * (2 * T - 1) * d * d)  # + linear_pos
        # the projection of the position table is cached after the first call
        assert latency.count_flops(ours) == n * (common + rel_pos)
        assert latency.count_flops(bench.forward_fn("peer", peer, T)) == n * common


def test_reuse_model_matches_parameter_budget_of_peer_shape():
    a = latency.parser().parse_args(TINY)
    bench = latency.Bench(a)
    peer = bench.peer()
    assert sum(p.numel() for p in peer.parameters()) > 0
    x, lengths = bench.inputs(16)
    assert x.shape == (1, 16, 32)
    a.include_frontend = True
    x, lengths = bench.inputs(16)
    assert x.shape[1] == 67 and ((67 - 1) // 2 - 1) // 2 == 16


def test_bad_arguments():
    with pytest.raises(SystemExit):
        latency.main(["--reuse", "1(H4)x3", *TINY])
    with pytest.raises(SystemExit):
        latency.main(["--dtype", "fp64", *TINY])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            latency.main(["--device", "cuda", *TINY])


def test_runs_interleaved_over_configurations(monkeypatch):
    calls = []
    real = latency.measure

    def spy(fn, device, warmup, runs):
        calls.append((fn, warmup, runs))
        return real(fn, device, warmup, runs)

    monkeypatch.setattr(latency, "measure", spy)
    args = list(TINY)
    i = args.index("--lengths")
    del args[i + 2]  # one length: 16
    args[args.index("--runs") + 1] = "5"
    out = latency.main(["--reuse", "1(H4)x4", "2(H4)x2", "--no-materialised", *args, "--train-runs", "0",
                        "--rounds", "2"])
    timed = [(fn, runs) for fn, warmup, runs in calls if runs]
    fns = [fn for fn, _ in timed[:3]]
    assert len(set(fns)) == 3  # the two configurations and the peer
    assert [fn for fn, _ in timed] == fns * 2 and [r for _, r in timed] == [3, 3, 3, 2, 2, 2]
    assert all(e["by_length"]["16"]["runs"] == 5 for e in out["inference"])
