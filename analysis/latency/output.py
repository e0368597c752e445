"""A run's record as a table on stdout, a plot of latency against length, and a JSON file."""

from __future__ import annotations

import json
from pathlib import Path


def _header_line(results: dict) -> str:
    engine = results.get("engine", "torch")
    precision = results["dtype"] + (f" ({results['precision_mode']})" if results.get("precision_mode") else "")
    return (
        f"# {results['device']} | "
        + (f"onnxruntime {results.get('onnxruntime')} | " if engine == "onnxruntime" else "")
        + f"torch {results['torch']} | {precision} | {results['threads']} threads | "
        f"batch {results['batch_size']} | front-end {'included' if results['include_frontend'] else 'excluded'} | "
        f"{results['runs']} runs in {results['rounds']} interleaved rounds | malloc {results['malloc']}"
        + (f" | torch.compile ({results.get('compile_backend')})" if results.get("compile") else "")
        + (" | CUDA graphs" if results.get("cuda_graphs") else "")
    )


def _print_latency(results: dict) -> None:
    lengths = results["lengths"]
    print(f"{'configuration':26s}" + "".join(f"{f'{T} ms':>11s}{'x':>6s}" for T in lengths))
    for e in results["inference"]:
        cells = "".join(
            f"{e['by_length'][str(T)]['median_ms']:11.2f}{e['by_length'][str(T)]['speedup_vs_first']:6.2f}"
            for T in lengths
        )
        print(f"{e['config']:26s}{cells}")
    print("(median of runs; x = speed-up over the first row; spread p10-p90 in the JSON)")
    first = results["inference"][0]["config"]
    for peer, ratios in results.get("speedup_over_peer", {}).items():
        print(
            f"{first} speed-up over {peer} ({peer} time / {first} time): "
            + ", ".join(f"{ratios[str(T)]:.2f}x at {T}" for T in lengths)
        )
    for peer, check in (results.get("peer_check") or {}).items():
        print(f"{peer} peer: max |output - ours| = {check['max_abs_diff']:.2e} before timing (our weights mapped)")


def _print_work(results: dict) -> None:
    lengths = results["lengths"]
    print(f"\n{'GFLOP per forward':26s}" + "".join(f"{f'{T}':>11s}{'rel.':>6s}" for T in lengths))
    first = results["inference"][0]["by_length"]
    for e in results["inference"]:
        cells = "".join(
            f"{e['by_length'][str(T)]['gflop']:11.4g}{e['by_length'][str(T)]['gflop'] / first[str(T)]['gflop']:6.2f}"
            for T in lengths
        )
        print(f"{e['config']:26s}{cells}")


def print_table(results: dict) -> None:
    """The run's description, each row's median latency and speed-up over the first row at each
    length, the speed-ups over the peers, the GFLOP of one forward, and the training steps."""
    print(_header_line(results))
    _print_latency(results)
    _print_work(results)
    if results["training"]:
        print(f"\n{'training step':26s}{'ms':>11s}{'rel.':>7s}{'peak MB':>10s}")
        for r in results["training"]:
            mem = f"{r['peak_memory_mb']:10.0f}" if "peak_memory_mb" in r else f"{'-':>10s}"
            print(f"{r['config']:26s}{r['median_ms']:11.1f}{r['relative_to_first']:7.2f}{mem}")


def plot(results: dict, path: str | Path) -> None:
    """Median latency of every row against the encoder length, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in results["inference"]:
        lengths = [int(T) for T in e["by_length"]]
        ax.plot(
            lengths,
            [e["by_length"][str(T)]["median_ms"] for T in lengths],
            marker="o",
            label=e["config"],
            ls="--" if e["kind"] != "fused" else "-",
        )
    ax.set(
        xlabel="encoder frames (after subsampling)",
        ylabel="latency (ms)",
        title=f"encoder latency, {results['device']}, {results['dtype']}",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(results: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))
