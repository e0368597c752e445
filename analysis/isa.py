"""Does capping the instruction set make this CPU behave as an ordinary AVX2 one? Speed and rounding
of fp32 and bf16 under each cap, in one interleaved run.

    python -m analysis.isa [--rounds 3] [--json OUT.json]

PyTorch's ``ATEN_CPU_CAPABILITY`` (its own vectorised kernels) and oneDNN's ``ONEDNN_MAX_CPU_ISA``
(matrix products and convolutions) are read once, when the library loads, so each setting runs in a
fresh process; the settings take turns, ``--rounds`` times, and the median of the rounds is reported.
Each process times, with 2 threads, a linear layer of the mini recipe's feed-forward size (fp32,
bf16 weights, bf16 autocast), the front end's second convolution (fp32, bf16 autocast) and one
training step of a small Conformer-CTC (fp32, bf16 autocast), and reports a digest of a fixed bf16
matrix product, whose bits show which kernel computed it. ``resolved`` is what
``precision: auto`` chooses under that setting (:func:`models.precision.resolve_training_precision`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common.cli import user_errors

SETTINGS = {
    "native": {},
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
}
CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")


def _ms(fn, runs: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(runs):
        fn()
    return (time.perf_counter() - start) / runs * 1e3


def measure(runs: int = 10) -> dict:
    """The figures of one process (its environment's caps in force)."""
    import torch

    from models import ConformerCTC
    from models.precision import resolve_training_precision

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2800, 96, generator=g), torch.randn(384, 96, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    conv = torch.nn.Conv2d(32, 32, 3, stride=2)
    img = torch.randn(8, 32, 200, 39, generator=g)
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    out = {
        "capability": torch.backends.cpu.get_cpu_capability(),
        "resolved": resolve_training_precision("auto", "cpu").precision,
    }
    out["linear fp32 ms"] = _ms(lambda: torch.nn.functional.linear(x, w), runs)
    out["linear bf16 ms"] = _ms(lambda: torch.nn.functional.linear(xb, wb), runs)

    def linear_autocast():
        with autocast():
            torch.nn.functional.linear(x, w)

    def conv_autocast():
        with autocast():
            conv(img)

    out["linear autocast ms"] = _ms(linear_autocast, runs)
    with torch.no_grad():
        out["conv fp32 ms"] = _ms(lambda: conv(img), max(1, runs // 2))
        out["conv autocast ms"] = _ms(conv_autocast, max(1, runs // 2))
    torch.manual_seed(0)
    model = ConformerCTC(
        129,
        d_model=96,
        num_layers=2,
        ffn_dim=384,
        kernel_size=15,
        reuse="1(H4)x2",
        subsampling_channels=32,
        dropout=0.0,
        attention_dropout=0.0,
    )
    feats, lengths = torch.randn(16, 700, 80, generator=g), torch.full((16,), 700)

    def step(low: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low):
            log_probs, _ = model(feats, lengths)
        log_probs.float().logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    out["train step fp32 ms"] = _ms(lambda: step(False), max(1, runs // 5))
    out["train step autocast ms"] = _ms(lambda: step(True), max(1, runs // 5))
    y = torch.nn.functional.linear(xb, wb)
    out["bf16 product digest"] = hashlib.sha1(y.view(torch.int16).numpy().tobytes()).hexdigest()[:12]
    return out


def run(rounds: int, runs: int, settings: list[str]) -> dict:
    """Each setting in a fresh process, taking turns ``rounds`` times; medians per figure."""
    from tqdm import tqdm

    from models.precision import cpu_description

    base = {k: v for k, v in os.environ.items() if k not in CAPS}
    per: dict[str, list[dict]] = {s: [] for s in settings}
    root = Path(__file__).resolve().parents[1]
    for _ in tqdm(range(rounds), desc="rounds", disable=not sys.stderr.isatty()):
        for name in settings:
            r = subprocess.run(
                [sys.executable, "-m", "analysis.isa", "--child", "--runs", str(runs)],
                cwd=root,
                env={**base, **SETTINGS[name]},
                capture_output=True,
                text=True,
                check=True,
            )
            per[name].append(json.loads(r.stdout.strip().splitlines()[-1]))
    results = {"cpu": cpu_description(), "threads": 2, "rounds": rounds, "settings": {}}
    for name, figs in per.items():
        row = {"env": SETTINGS[name]}
        for key, value in figs[0].items():
            row[key] = round(statistics.median(f[key] for f in figs), 3) if isinstance(value, float) else value
        results["settings"][name] = row
    return results


def print_table(results: dict) -> None:
    rows = results["settings"]
    keys = [k for k in next(iter(rows.values())) if k != "env"]
    print(f"CPU: {results['cpu']}, {results['threads']} threads, median of {results['rounds']} interleaved rounds")
    print(f"{'':24s}" + "".join(f"{n:>14s}" for n in rows))
    for k in keys:
        print(f"{k:24s}" + "".join(f"{str(r[k]):>14s}" for r in rows.values()))


def main(argv: list[str] | None = None) -> dict | None:
    p = argparse.ArgumentParser(prog="python -m analysis.isa", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=10, help="calls per timed figure")
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.rounds < 1 or a.runs < 1:
        p.error("--rounds and --runs must be at least 1")
    if a.child:
        print(json.dumps(measure(a.runs)))
        return None
    with user_errors():
        results = run(a.rounds, a.runs, a.settings)
        print_table(results)
        if a.json:
            Path(a.json).parent.mkdir(parents=True, exist_ok=True)
            Path(a.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
