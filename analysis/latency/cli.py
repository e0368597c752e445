"""``python -m analysis.latency``: the command line (:func:`parser`), its configuration
(:func:`parse_config`) and :func:`main` (check, run, print, write)."""

from __future__ import annotations

import argparse
import sys

from analysis.latency.benchmark import run
from analysis.latency.config import ENGINES, MALLOCS, PAPER, PEERS, BenchConfig
from analysis.latency.output import plot, print_table, write_json
from common.cli import add_device, user_errors
from models.precision import DTYPES, MODES, precision_warning


def parser() -> argparse.ArgumentParser:
    doc = sys.modules["analysis.latency"].__doc__
    p = argparse.ArgumentParser(prog="python -m analysis.latency", description=doc.split("\n\n")[0])
    p.add_argument(
        "--reuse", nargs="+", default=list(PAPER), help="reuse plans; the first is the baseline of the ratios"
    )
    p.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512, 768], help="encoder frames")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument(
        "--precision-mode",
        choices=MODES,
        default="weights",
        help="bf16 / fp16: cast the weights and inputs (weights) or run torch.autocast over fp32 weights",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="torch",
        help="torch (eager; --compile, --cuda-graphs) or onnxruntime (each row exported to ONNX; CPU, fp32)",
    )
    p.add_argument(
        "--peer",
        nargs="+",
        choices=PEERS,
        default=["torchaudio"],
        help="peer rows: torchaudio's Conformer (always, unless --no-peer), espnet2's ConformerEncoder "
        "with our baseline's weights (espnet)",
    )
    add_device(p)
    p.add_argument("--include-frontend", action="store_true", help="time from fbank features (Table 3 excludes it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the timed function")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay a captured CUDA graph")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50, help="timed calls per configuration and length")
    p.add_argument(
        "--rounds", type=int, default=5, help="interleaved passes over the configurations that share the runs"
    )
    p.add_argument(
        "--malloc",
        choices=MALLOCS,
        default="steady",
        help="CPU: keep freed large blocks in glibc's heap (steady) or leave the allocator as it is",
    )
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer rows")
    p.add_argument("--no-materialised", action="store_true", help="skip the materialised-path baseline")
    p.add_argument("--train-length", type=int, default=512, help="encoder frames of the training batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-runs", type=int, default=10, help="timed training steps (0 = skip)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--kernel-size", type=int, default=31)
    p.add_argument("--peer-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=129)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot latency against length here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse_config(argv: list[str] | None = None) -> BenchConfig:
    """The :class:`~analysis.latency.config.BenchConfig` of a command line (not checked)."""
    return BenchConfig.from_args(parser().parse_args(argv))


def main(argv: list[str] | None = None) -> dict:
    """Checks the command line (one ``error:`` line naming the option, before any work), runs the
    benchmark, prints its table, and writes ``--json`` / ``--png``; returns the record."""
    p = parser()
    a = p.parse_args(argv)
    config = BenchConfig.from_args(a)
    try:
        config.check()
    except ValueError as e:
        p.error(str(e))
    if warning := precision_warning(config.dtype, config.device):
        print(f"warning: {warning}", file=sys.stderr)
    with user_errors():  # a bad option is a usage error; a missing package or an unwritable file one line
        try:
            results = run(config)
        except ValueError as e:
            p.error(str(e))
        print_table(results)
        if a.json:
            write_json(results, a.json)
        if a.png:
            plot(results, a.png)
    return results
