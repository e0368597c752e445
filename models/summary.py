"""Parameter counts of a Conformer-CTC configuration (the paper's Table 3 column).

    python -m models.summary --reuse "4(H8)x4" [--vocab-size 129] [--d-model 256] [--num-layers 16] ...

Prints the parameters of the Conformer blocks plus the CTC head (the figure the paper reports),
of the convolutional front end, and the total. With several ``--reuse`` strings, one row each.
"""

from __future__ import annotations

import argparse
import json

from common.cli import user_errors
from models.ctc import ConformerCTC

PAPER_MILLIONS = {"1(H4)x16": 25.45, "2(H4)x8": 24.92, "4(H4)x4": 24.66, "8(H4)x2": 24.52}


def count(model: ConformerCTC) -> dict[str, int]:
    """Parameter counts: ``blocks_and_head``, ``frontend``, ``total``."""

    def n(module):
        return sum(p.numel() for p in module.parameters())

    blocks_and_head = n(model.encoder) + n(model.head)
    return {"blocks_and_head": blocks_and_head, "frontend": n(model.frontend), "total": n(model)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.summary", description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", nargs="+", default=list(PAPER_MILLIONS), help="reuse plan strings")
    p.add_argument("--vocab-size", type=int, default=129, help="CTC outputs incl. blank (default 129)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--kernel-size", type=int, default=31)
    p.add_argument("--json", help="also write the table to this JSON file")
    a = p.parse_args(argv)
    rows = []
    print(f"{'configuration':28s} {'blocks+head':>12s} {'front-end':>10s} {'total':>12s} {'paper':>8s} {'diff':>7s}")
    for reuse in a.reuse:
        try:
            model = ConformerCTC(
                a.vocab_size,
                d_model=a.d_model,
                num_layers=a.num_layers,
                ffn_dim=a.ffn_dim,
                kernel_size=a.kernel_size,
                reuse=reuse,
            )
        except ValueError as e:
            p.error(str(e))
        c = count(model)
        paper = PAPER_MILLIONS.get(model.reuse) if (a.d_model, a.num_layers, a.vocab_size) == (256, 16, 129) else None
        diff = f"{100 * (c['blocks_and_head'] / 1e6 - paper) / paper:+.2f}%" if paper else ""
        print(
            f"{model.reuse:28s} {c['blocks_and_head'] / 1e6:11.2f}M {c['frontend'] / 1e6:9.2f}M "
            f"{c['total'] / 1e6:11.2f}M {(f'{paper:.2f}M' if paper else '-'):>8s} {diff:>7s}"
        )
        rows.append({"reuse": model.reuse, **c, "paper_millions": paper})
    if a.json:
        with user_errors(), open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
