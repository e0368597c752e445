"""The latency benchmark's engines, precisions and peers at tiny sizes: ONNX Runtime rows time the
function the torch rows time, bf16 by cast weights or autocast, and the ESPnet peer is checked
equal to our baseline before it is timed."""

from __future__ import annotations

import pytest
import test_latency
import torch

from analysis import latency
from analysis.latency import bench as bench_module
from analysis.latency import benchmark

SMALL = [*test_latency.SMALL, "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed (pip install '.[onnx]')")
@pytest.mark.parametrize("frontend", [False, True])
def test_onnxruntime_engine_end_to_end(frontend):
    args = ["--reuse", "1(H4)x2", "2(H4)x1", *SMALL] + (["--include-frontend"] if frontend else [])
    out = latency.main([*args, "--engine", "onnxruntime"])
    assert out["engine"] == "onnxruntime" and out["onnxruntime"]
    # no materialised row: a graph has no fused kernel to compare it with
    assert [e["config"] for e in out["inference"]] == ["1(H4)x2", "2(H4)x1", "torchaudio"]
    for e in out["inference"]:
        for T in ("16", "32"):
            assert e["by_length"][T]["median_ms"] > 0 and e["by_length"][T]["gflop"] > 0
    assert set(out["speedup_over_peer"]) == {"torchaudio"}
    # the graph projects the positions at each call, and its GFLOP count says so
    torch_run = latency.main([*args, "--no-materialised"])
    ours = {e["config"]: e["by_length"]["32"]["gflop"] for e in out["inference"]}
    eager = {e["config"]: e["by_length"]["32"]["gflop"] for e in torch_run["inference"]}
    assert ours["1(H4)x2"] > eager["1(H4)x2"] and ours["torchaudio"] == eager["torchaudio"]


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed (pip install '.[onnx]')")
def test_onnxruntime_rows_compute_the_torch_rows_function():
    a = latency.parse_config([*SMALL, "--engine", "onnxruntime", "--include-frontend"])
    bench = latency.Bench(a)
    model, peer = bench.model("2(H4)x1").eval(), bench.peer().eval()
    for kind, module in (("fused", model), ("peer", peer)):
        bench.export(kind, module)
        with torch.inference_mode():
            for T in (16, 40):
                (out,) = bench.onnx_fn(kind, module, T)()
                ref = latency.Timed(kind, module, True)(*bench.inputs(T))
                torch.testing.assert_close(torch.from_numpy(out), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["weights", "autocast"])
def test_bf16_modes(mode, monkeypatch):
    """bf16 rows run with cast weights or under autocast over fp32 weights; the JSON says which."""
    seen = set()

    def linear_output(module, args, output):
        if isinstance(module, torch.nn.Linear) and torch.is_inference_mode_enabled():
            seen.add(output.dtype)

    handle = torch.nn.modules.module.register_module_forward_hook(linear_output)
    try:
        out = latency.main(
            ["--reuse", "1(H4)x2", "2(H4)x1", *SMALL, "--dtype", "bf16", "--precision-mode", mode, "--include-frontend"]
        )
    finally:
        handle.remove()
    assert out["dtype"] == "bf16" and out["precision_mode"] == mode
    assert seen == {torch.bfloat16}  # every matrix product of every row, ours and the peer's
    bench = latency.Bench(latency.parse_config([*SMALL, "--dtype", "bf16", "--precision-mode", mode]))
    assert bench.weights_dtype == (torch.float32 if mode == "autocast" else torch.bfloat16)


def test_engine_and_peer_arguments_refused():
    with pytest.raises(SystemExit):
        latency.main([*SMALL, "--engine", "onnxruntime", "--dtype", "bf16"])
    with pytest.raises(SystemExit):
        latency.main([*SMALL, "--engine", "onnxruntime", "--compile"])
    with pytest.raises(SystemExit):
        latency.main([*SMALL, "--peer", "espnet"])  # espnet's encoder has its own front end: needs --include-frontend
    with pytest.raises(SystemExit):
        latency.main([*SMALL, "--precision-mode", "int8"])


ESPNET_MISSING = latency.espnet_importable()


@pytest.mark.skipif(ESPNET_MISSING is not None, reason=f"espnet is not importable: {ESPNET_MISSING}")
def test_espnet_peer_equals_ours_before_timing(monkeypatch):
    """The espnet row carries our baseline's weights and computes our function (checked before any
    timing, in the JSON); the torchaudio row is kept."""
    order = []
    real_check, real_measure = benchmark.check_peer, bench_module.measure
    monkeypatch.setattr(benchmark, "check_peer", lambda *a, **k: order.append("check") or real_check(*a, **k))
    monkeypatch.setattr(bench_module, "measure", lambda *a, **k: order.append("measure") or real_measure(*a, **k))
    out = latency.main(["--reuse", "1(H4)x2", "2(H4)x1", *SMALL, "--include-frontend", "--peer", "espnet"])
    assert [e["config"] for e in out["inference"]] == [
        "1(H4)x2",
        "1(H4)x2+materialised",
        "2(H4)x1",
        "torchaudio",
        "espnet",
    ]
    assert order[0] == "check" and order.count("check") == 1
    assert out["peer_check"]["espnet"]["max_abs_diff"] <= latency.PEER_ATOL
    assert set(out["speedup_over_peer"]) == {"torchaudio", "espnet"}
    # the same function: the same arithmetic as our baseline, up to the positional projection we cache
    gflop = {e["config"]: e["by_length"]["32"]["gflop"] for e in out["inference"]}
    assert gflop["espnet"] >= gflop["1(H4)x2"] > gflop["torchaudio"]


@pytest.mark.skipif(ESPNET_MISSING is not None, reason=f"espnet is not importable: {ESPNET_MISSING}")
def test_espnet_peer_that_differs_is_not_timed(monkeypatch):
    import models.espnet

    real = models.espnet.espnet_peer

    def broken(model):
        peer = real(model)
        with torch.no_grad():  # (a constant would be lost: the FFN's input is layer-normed to zero mean)
            w = next(p for n, p in peer.named_parameters() if "feed_forward.w_1.weight" in n)
            w.add_(0.1 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return peer

    monkeypatch.setattr(models.espnet, "espnet_peer", broken)
    monkeypatch.setattr(bench_module, "measure", lambda *a, **k: pytest.fail("timed a peer that differs"))
    with pytest.raises(RuntimeError, match="refusing to time it"):
        latency.main(["--reuse", "1(H4)x2", *SMALL, "--include-frontend", "--peer", "espnet"])


@pytest.mark.skipif(not onnx_available(), reason="the onnx extra is not installed (pip install '.[onnx]')")
@pytest.mark.parametrize(
    "plan,computing,chunk",
    [
        ("1(H4)x2", 2, lambda T: max(64, -(-T // 4))),  # fused path: CPU query chunks of T / 4
        ("2(H4)x1", 1, lambda T: max(32, -(-T // 8))),  # a map read by a reuse layer: materialised, chunks of T / 8
    ],
)
def test_onnxruntime_rows_count_the_graphs_full_positional_scores(plan, computing, chunk):
    """An ONNX row's GFLOP is what the exported graph computes: all ``T x (2T - 1)`` positional
    scores per computing layer in one chunk, where eager PyTorch on CPU takes the query rows in
    chunks of ``c`` (``c (T + c - 1)`` scores each) from 256 frames, and the positions' projection
    at every call."""
    T, d = 512, 32
    args = [
        "--d-model",
        str(d),
        "--num-layers",
        "2",
        "--ffn-dim",
        "64",
        "--kernel-size",
        "3",
        "--runs",
        "1",
        "--threads",
        "1",
    ]
    eager_bench = latency.Bench(latency.parse_config(args))
    onnx_bench = latency.Bench(latency.parse_config([*args, "--engine", "onnxruntime"]))
    model = onnx_bench.model(plan).eval()
    onnx_bench.export("fused", model)
    with torch.inference_mode():
        _, eager = eager_bench.prepare("fused", model, T)
        _, graph = onnx_bench.prepare("fused", model, T)
    c = chunk(T)
    chunked = sum(min(c, T - a) * (T + min(c, T - a) - 1) for a in range(0, T, c))
    extra = 2 * d * (T * (2 * T - 1) - chunked)  # batch 1, H heads x d_k = d
    projection = 2 * (2 * T - 1) * d * d  # the positions' projection, cached by eager, computed by the graph
    assert graph - eager == pytest.approx(computing * (extra + projection) / 1e9, rel=1e-6)
