"""One benchmark run (:func:`run`): every row built, checked (the ESPnet peer against our baseline,
each ONNX graph against PyTorch), timed at every length, then the training steps; the results as
the JSON record that :mod:`analysis.latency.output` prints."""

from __future__ import annotations

import torch
from torch import nn

from analysis.latency.bench import Bench
from analysis.latency.config import BenchConfig
from analysis.latency.engines import compiling
from analysis.latency.modules import Timed
from analysis.latency.timing import device_name, malloc_setting
from models import ConformerCTC
from models.precision import precision_warning

PEER_ATOL = 1e-4  # the ESPnet peer against our baseline, fp32, before timing


def check_peer(bench: Bench, peer: nn.Module, ours: ConformerCTC, lengths=(32, 64)) -> dict:
    """The peer's output against our baseline's on the benchmark's inputs (fp32, inference mode):
    ``{"max_abs_diff": ..., "lengths": [...]}``; raises ``RuntimeError`` above :data:`PEER_ATOL`,
    so that a row that does not compute our function is never timed."""
    worst = 0.0
    with torch.inference_mode():
        for T in lengths:
            x, lens = bench.inputs(T)
            ref = Timed("fused", ours, bench.config.include_frontend)(x, lens).float()
            out = peer(x, lens).float()
            if out.shape != ref.shape:
                raise RuntimeError(f"--peer espnet: output {tuple(out.shape)} at length {T}, ours {tuple(ref.shape)}")
            worst = max(worst, (out - ref).abs().max().item())
    if not worst <= PEER_ATOL:
        raise RuntimeError(
            f"--peer espnet: espnet2's encoder with our weights differs from ours by {worst:.3g} "
            f"(tolerance {PEER_ATOL:g}); refusing to time it as the same model"
        )
    return {"max_abs_diff": worst, "lengths": list(lengths)}


def header(c: BenchConfig, malloc: str) -> dict:
    """The record's description of the run (before any row)."""
    from models.onnx_runtime import version

    return {
        "device": device_name(c.device),
        "device_type": c.device,
        "torch": torch.__version__,
        "dtype": c.dtype,
        "precision_mode": c.precision_mode if c.dtype != "fp32" else None,
        "engine": c.engine,
        "precision_warning": precision_warning(c.dtype, c.device),
        "onnxruntime": version() if c.engine == "onnxruntime" else None,
        "threads": torch.get_num_threads(),
        "batch_size": c.batch_size,
        "include_frontend": c.include_frontend,
        "compile": c.compile,
        "compile_backend": c.compile_backend if c.compile else None,
        "cuda_graphs": c.cuda_graphs,
        "lengths": list(c.lengths),
        "malloc": malloc,
        "warmup": c.warmup,
        "runs": c.runs,
        "rounds": c.rounds,
        "model": c.model_size,
        "inference": [],
        "training": [],
    }


def build_rows(bench: Bench, results: dict) -> tuple[list[tuple[str, nn.Module]], list[dict]]:
    """``(kind, module)`` of every row of the run and its record entry (``config``, ``kind``,
    ``parameters``). The materialised row runs the same model as its fused row; the ESPnet peer
    carries our baseline's weights (drawn as its row's) and is checked equal to it in fp32
    (:func:`check_peer`, ``results["peer_check"]``) before it is cast."""
    c = bench.config
    built, modules, entries = {}, [], []
    for name, kind in c.rows():
        if name not in built:
            if kind == "peer":
                ours = bench.model(c.baseline_plan()).to(bench.device).eval() if name == "espnet" else None
                built[name] = bench.peer(name, ours).to(bench.device).eval()
                if name == "espnet":
                    results["peer_check"] = {"espnet": check_peer(bench, built[name], ours)}
                built[name] = built[name].to(bench.device, bench.weights_dtype)
            else:
                built[name] = bench.model(name).to(bench.device, bench.weights_dtype).eval()
        module = built[name]
        modules.append((kind, module))
        entries.append(
            {
                "config": name if kind != "materialised" else f"{name}+materialised",
                "kind": kind,
                "parameters": sum(p.numel() for p in module.parameters()),
                "by_length": {},
            }
        )
    return modules, entries


def ratios(results: dict) -> None:
    """Adds each row's ``speedup_vs_first`` (the first row's time over the row's) and, per peer, our
    first row's speed-up over it (``speedup_over_peer``: the peer's time over ours)."""
    first = results["inference"][0]["by_length"]
    for entry in results["inference"]:
        for T, r in entry["by_length"].items():
            r["speedup_vs_first"] = first[T]["median_ms"] / r["median_ms"]
    results["speedup_over_peer"] = {
        e["config"]: {T: r["median_ms"] / first[T]["median_ms"] for T, r in e["by_length"].items()}
        for e in results["inference"]
        if e["kind"] == "peer"
    }


def run(c: BenchConfig) -> dict:
    """The run's record (see :func:`analysis.latency.output.print_table` for how it reads)."""
    from tqdm import tqdm

    if c.threads:
        torch.set_num_threads(c.threads)
    malloc = malloc_setting(c.malloc, c.device)
    bench = Bench(c)
    results = header(c, malloc)
    modules, entries = build_rows(bench, results)
    if c.engine == "onnxruntime":
        for (kind, module), entry in zip(tqdm(modules, desc="export", unit="row", disable=c.quiet), entries):
            bench.export(kind, module)
            entry["onnx_max_abs_diff"] = bench.onnx.check[id(module)]
        results["onnxruntime_threads"] = bench.onnx.threads
    with compiling(c.compile, len(modules) * len(c.lengths)):
        for T in tqdm(c.lengths, desc="latency", unit="length", disable=c.quiet):
            for entry, r in zip(entries, bench.latencies(modules, T)):
                entry["by_length"][str(T)] = r
    results["inference"] = entries
    del modules
    ratios(results)
    if c.train_runs > 0:
        for name in tqdm(c.reuse, desc="training", unit="config", disable=c.quiet):
            results["training"].append(
                {"config": name, "length": c.train_length, "batch": c.train_batch, **bench.train_step(name)}
            )
        base = results["training"][0]["median_ms"]
        for r in results["training"]:
            r["relative_to_first"] = r["median_ms"] / base
    return results
