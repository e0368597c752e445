"""The end of ``make demo``: pick the plan to retrofit, and print the story's table.

    python -m analysis.demo best-plan SUGGEST.json [--groups 2]     # prints the best K-group plan
    python -m analysis.demo table EXP                                # prints and writes EXP/summary.json

``table`` reads what the demo wrote under ``EXP``: ``eval/results.json`` (baseline) and
``eval_retrofit/results.json``, ``latency.json`` (one interleaved CPU run of both plans), ``stages.tsv``
(seconds per stage, written by the Makefile) and the two checkpoints (parameters, steps).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import user_errors


def best_plan(suggest_json: str | Path, groups: int = 2) -> str:
    """The best-ranked candidate with ``groups`` groups in a ``suggest-reuse`` result; where there is
    none (a baseline of ``groups`` layers or fewer), the best with the most groups below, saying so
    on stderr."""
    result = json.loads(Path(suggest_json).read_text())
    fewer = [c for c in result["candidates"] if c["num_groups"] <= groups]
    if not fewer:
        raise ValueError(f"{suggest_json}: no candidate plan with {groups} groups or fewer")
    most = max(c["num_groups"] for c in fewer)
    if most != groups:
        print(f"note: {suggest_json}: no candidate plan with {groups} groups; the best with {most}", file=sys.stderr)
    return next(c["reuse"] for c in fewer if c["num_groups"] == most)


def table(exp: str | Path) -> dict:
    import torch

    exp = Path(exp)
    stages = {}
    if (exp / "stages.tsv").is_file():
        for line in (exp / "stages.tsv").read_text().splitlines():
            name, seconds = line.split("\t")
            stages[name] = int(seconds)
    latency = json.loads((exp / "latency.json").read_text())
    rows = []
    for name, eval_dir, ckpt in (("baseline", "eval", "train"), ("retrofit", "eval_retrofit", "retrofit")):
        res = json.loads((exp / eval_dir / "results.json").read_text())
        test = res["sets"]["mini-test"]
        c = torch.load(exp / ckpt / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        params = sum(
            v.numel()
            for k, v in c["state_dict"].items()
            if k.startswith("model.") and "running" not in k and "num_batches" not in k
        )
        lat = next(e for e in latency["inference"] if e["config"] == res["reuse"])
        rows.append(
            {
                "model": name,
                "reuse": res["reuse"],
                "parameters": params,
                "steps": c["global_step"],
                "wer_greedy": test["greedy"]["wer"],
                "wer_beam": test.get("beam", {}).get("wer"),
                "latency_ms": {T: round(v["median_ms"], 2) for T, v in lat["by_length"].items()},
                "speedup": {T: round(v["speedup_vs_first"], 3) for T, v in lat["by_length"].items()},
                "training_seconds": stages.get(f"train {name}"),
                "precision": (c.get("precision") or {}).get("precision"),
                "precision_reason": (c.get("precision") or {}).get("reason"),
            }
        )
    summary = {
        "rows": rows,
        "stages_seconds": stages,
        "latency": {k: latency[k] for k in ("device", "dtype", "threads", "runs", "rounds")},
    }
    lengths = list(rows[0]["latency_ms"])
    print(
        f"\n{'model':10s} {'plan':16s} {'params':>9s} {'steps':>6s} {'WER greedy':>11s} {'WER beam':>9s} "
        + "".join(f"{f'{T} fr. ms':>11s}" for T in lengths)
        + f" {'speed-up':>9s} {'train time':>10s}"
    )
    for r in rows:
        t = r["training_seconds"]
        print(
            f"{r['model']:10s} {r['reuse']:16s} {r['parameters'] / 1e6:8.2f}M {r['steps']:6d} {r['wer_greedy']:10.2f}% "
            f"{r['wer_beam']:8.2f}% "
            + "".join(f"{r['latency_ms'][T]:11.2f}" for T in lengths)
            + f" {r['speedup'][lengths[-1]]:8.2f}x {'-' if t is None else f'{t // 60}m{t % 60:02d}s':>10s}"
        )
    print(
        f"(CPU encoder latency with the front end, {latency['device']}, {latency['dtype']}, {latency['threads']} "
        f"threads, one interleaved run; speed-up at {lengths[-1]} frames)"
    )
    trained = ", ".join(f"{r['model']} {r['precision']}" for r in rows)
    print(f"(training precision: {trained}; {rows[0]['precision_reason']})")
    print("stages: " + ", ".join(f"{k} {v // 60}m{v % 60:02d}s" for k, v in stages.items()))
    (exp / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m analysis.demo", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("best-plan", help="the best-ranked plan with --groups groups of a suggest.json")
    b.add_argument("suggest_json")
    b.add_argument("--groups", type=int, default=2)
    t = sub.add_parser("table", help="print the demo's final table and write EXP/summary.json")
    t.add_argument("exp")
    a = p.parse_args(argv)
    with user_errors(KeyError, StopIteration):
        if a.command == "best-plan":
            print(best_plan(a.suggest_json, a.groups))
        else:
            table(a.exp)


if __name__ == "__main__":
    main()
