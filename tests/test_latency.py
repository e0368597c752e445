"""The latency benchmark end to end at tiny sizes: well-formed JSON, inference mode, errors."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from analysis import latency
from analysis.latency import bench as bench_module
from analysis.latency import engines
from models.flops import count_flops

TINY = [
    "--d-model",
    "32",
    "--num-layers",
    "4",
    "--ffn-dim",
    "64",
    "--kernel-size",
    "5",
    "--lengths",
    "16",
    "32",
    "--warmup",
    "1",
    "--runs",
    "3",
    "--train-length",
    "16",
    "--train-batch",
    "2",
    "--train-runs",
    "2",
    "--quiet",
]


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread in these tests (at these sizes a second one only waits, and on a busy
    machine spins: tens of times slower), given back after each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_benchmark_end_to_end(tmp_path, monkeypatch, capsys):
    modes = []
    real = bench_module.measure

    def spy(fn, device, warmup, runs):
        def checked():
            modes.append(torch.is_inference_mode_enabled())
            return fn()

        return real(checked, device, warmup, runs)

    monkeypatch.setattr(bench_module, "measure", spy)
    out = latency.main(
        ["--reuse", "1(H4)x4", "2(H4)x2", *TINY, "--json", str(tmp_path / "r.json"), "--png", str(tmp_path / "r.png")]
    )
    data = json.loads((tmp_path / "r.json").read_text())
    assert data == json.loads(json.dumps(out))
    for key in (
        "device",
        "device_type",
        "torch",
        "dtype",
        "threads",
        "batch_size",
        "lengths",
        "inference",
        "training",
        "malloc",
        "runs",
        "rounds",
        "warmup",
    ):
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
    a = latency.parse_config(TINY)
    bench = latency.Bench(a)
    T, d, f, k, n = 16, 32, 64, 5, 4
    common = 8 * T * d * f + 8 * T * d * d + 4 * T * T * d + 6 * T * d * d + 2 * T * d * k  # FFNs, q k v o, SDPA, conv
    rel_pos = 2 * T * (2 * T - 1) * d  # (q + v) p^T against all 2T-1 positions (one chunk below 256 frames)
    model, peer = bench.model("1(H4)x4").eval(), bench.peer().eval()
    with torch.inference_mode():
        ours = bench.forward_fn("fused", model, T)
        assert count_flops(ours) == n * (common + rel_pos + 2 * (2 * T - 1) * d * d)  # + linear_pos
        # the projection of the position table is cached after the first call
        assert count_flops(ours) == n * (common + rel_pos)
        assert count_flops(bench.forward_fn("peer", peer, T)) == n * common


def test_reuse_model_matches_parameter_budget_of_peer_shape():
    a = latency.parse_config(TINY)
    bench = latency.Bench(a)
    peer = bench.peer()
    assert sum(p.numel() for p in peer.parameters()) > 0
    x, lengths = bench.inputs(16)
    assert x.shape == (1, 16, 32)
    bench = latency.Bench(dataclasses.replace(a, include_frontend=True))
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
    real = bench_module.measure

    def spy(fn, device, warmup, runs):
        calls.append((fn, warmup, runs))
        return real(fn, device, warmup, runs)

    monkeypatch.setattr(bench_module, "measure", spy)
    args = list(TINY)
    i = args.index("--lengths")
    del args[i + 2]  # one length: 16
    args[args.index("--runs") + 1] = "5"
    out = latency.main(
        ["--reuse", "1(H4)x4", "2(H4)x2", "--no-materialised", *args, "--train-runs", "0", "--rounds", "2"]
    )
    timed = [(fn, runs) for fn, warmup, runs in calls if runs]
    fns = [fn for fn, _ in timed[:3]]
    assert len(set(fns)) == 3  # the two configurations and the peer
    assert [fn for fn, _ in timed] == fns * 2 and [r for _, r in timed] == [3, 3, 3, 2, 2, 2]
    assert all(e["by_length"]["16"]["runs"] == 5 for e in out["inference"])


SMALL = (
    "--d-model 32 --num-layers 2 --ffn-dim 64 --kernel-size 3 --lengths 16 32 --runs 2 --warmup 1 "
    "--train-runs 0 --rounds 1 --quiet"
).split()


class HostReads(TorchDispatchMode):
    """Counts the operators that read a tensor's value back to the host (a scalar, a truth value, an
    equality, or a data-dependent shape), which a CUDA stream capture does not allow."""

    READS = {
        torch.ops.aten._local_scalar_dense,
        torch.ops.aten.item,
        torch.ops.aten.is_nonzero,
        torch.ops.aten.equal,
        torch.ops.aten.nonzero,
    }

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.READS:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def host_reads(fn) -> list[str]:
    with HostReads() as probe:
        fn()
    return probe.reads


@pytest.mark.parametrize("frontend", [False, True])
def test_peer_runs_torchaudio_layers_without_mask(frontend):
    """The peer row's callable computes what ``torchaudio.models.Conformer.forward`` computes on the
    benchmark's full-length inputs (behind our front end with ``--include-frontend``)."""
    a = latency.parse_config([*SMALL, "--batch-size", "2"] + (["--include-frontend"] if frontend else []))
    bench = latency.Bench(a)
    peer = bench.peer().eval()
    x, lengths = bench.inputs(16)
    with torch.inference_mode():
        out = bench.forward_fn("peer", peer, 16)()
        if frontend:
            x, lengths = peer.frontend(x, lengths)
        ref, _ = peer.conformer(x, lengths)
    assert out.shape == (2, 16, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("frontend", [False, True])
def test_captured_callables_read_nothing_back(frontend, monkeypatch):
    """What ``--cuda-graphs`` captures (the fused rows, the materialised row, the peer) reads no
    tensor back to the host while a capture is under way (simulated on CPU)."""
    a = latency.parse_config([*SMALL, "--cuda-graphs"] + (["--include-frontend"] if frontend else []))
    bench = latency.Bench(a)
    model, peer = bench.model("1(H4)x2").eval(), bench.peer().eval()
    with torch.inference_mode():
        fns = {
            kind: bench.forward_fn(kind, module, 16)
            for kind, module in (("fused", model), ("materialised", model), ("peer", peer))
        }
        for fn in fns.values():
            fn()  # as wrap() does before capturing: input-independent caches are built
        # the probe sees host reads where there are some: torchaudio's own forward, our input checks
        x, lengths = bench.inputs(16)
        if frontend:
            x, lengths = peer.frontend(x, lengths)
        assert host_reads(lambda: peer.conformer(x, lengths))
        if frontend:
            assert host_reads(fns["fused"]) and host_reads(fns["materialised"])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
        for kind, fn in fns.items():
            assert host_reads(fn) == [], kind


def test_frontend_with_peer_end_to_end():
    """``--include-frontend`` times the peer too, behind the same front end as ours."""
    out = latency.main(["--reuse", "1(H4)x2", "2(H4)x1", *SMALL, "--include-frontend"])
    assert [e["config"] for e in out["inference"]] == ["1(H4)x2", "1(H4)x2+materialised", "2(H4)x1", "torchaudio"]
    assert out["include_frontend"]
    for e in out["inference"]:
        for T in ("16", "32"):
            assert e["by_length"][T]["median_ms"] > 0 and e["by_length"][T]["gflop"] > 0
    # both rows add the same front end: the same GFLOP with it as without it
    a = latency.parse_config(SMALL)
    with_frontend = latency.Bench(latency.parse_config([*SMALL, "--include-frontend"]))
    bench = latency.Bench(a)
    model = bench.model("1(H4)x2").eval()
    gflop = {}
    with torch.inference_mode():
        for b in (bench, with_frontend):
            for kind, module in (("fused", model), ("peer", b.peer().eval())):
                fn = b.forward_fn(kind, module, 16)
                fn()  # as prepare() does: our position projection is cached, not counted
                gflop[kind, b.config.include_frontend] = count_flops(fn)
    assert gflop["fused", True] - gflop["fused", False] == gflop["peer", True] - gflop["peer", False] > 0


@pytest.fixture
def fresh_dynamo():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()
    counters.clear()


COMPILED = [
    "--reuse",
    "1(H4)x2",
    "2(H4)x1",
    *SMALL,
    "--lengths",
    "16",
    "24",
    "32",
    "--compile",
    "--compile-backend",
    "eager",
]
# 4 rows x 3 lengths; our 3 rows' lambdas share a code object: 9 entries on it, over dynamo's default limit of 8


def test_compile_compiles_every_row_and_length(fresh_dynamo, monkeypatch):
    """``--compile`` compiles every (row, length) before timing it; none falls back to eager."""
    counters = fresh_dynamo
    limit = torch._dynamo.config.recompile_limit
    compiled = []
    real = latency.Bench.prepare

    def spy(self, kind, module, T):
        before = counters["frames"]["ok"]
        out = real(self, kind, module, T)
        compiled.append((kind, T, counters["frames"]["ok"] - before))
        return out

    monkeypatch.setattr(latency.Bench, "prepare", spy)
    out = latency.main(COMPILED)
    assert out["compile"] and out["compile_backend"] == "eager"
    # one new compiled frame per (row, length), before timing; none later, none refused, no graph breaks
    assert len(compiled) == 12 and all(n == 1 for _, _, n in compiled), compiled
    assert counters["frames"]["ok"] == counters["frames"]["total"] == 12
    assert counters["stats"]["unique_graphs"] == 12
    assert not counters["unimplemented"] and not counters["graph_break"]
    assert torch._dynamo.config.recompile_limit == limit  # the run's settings did not leak


def test_compile_refuses_to_fall_back_to_eager(fresh_dynamo, monkeypatch):
    """A recompile limit too small for the run is an error, not a silent fall-back to eager."""
    config = torch._dynamo.config
    before = (config.recompile_limit, config.fail_on_recompile_limit_hit)
    real = engines.compile_settings
    monkeypatch.setattr(engines, "compile_settings", lambda entries: {**real(entries), "recompile_limit": 1})
    with pytest.raises(RuntimeError, match="recompile limit"):
        latency.main(COMPILED)
    assert (config.recompile_limit, config.fail_on_recompile_limit_hit) == before


def test_compile_with_frontend_compiles_whole_graphs(fresh_dynamo):
    """With the front end, our rows (through ``ConformerCTC.encode``, whose input checks read values)
    and the peer compile to one graph each: no graph break."""
    counters = fresh_dynamo
    latency.main(
        [
            "--reuse",
            "1(H4)x2",
            *SMALL,
            "--lengths",
            "16",
            "--include-frontend",
            "--compile",
            "--compile-backend",
            "eager",
        ]
    )
    assert counters["frames"]["ok"] == counters["frames"]["total"] == counters["stats"]["unique_graphs"] == 3
    assert not counters["graph_break"]
