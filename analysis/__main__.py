"""Attention analyses of a checkpoint over an aligned manifest.

    python -m analysis report --ckpt CKPT --manifest M --out DIR [--alignments A] [--reference REF]
    python -m analysis report --upstream tera --upstream-ckpt TERA.ckpt --manifest M.jsonl --out DIR
    python -m analysis report --upstream hf --upstream-ckpt HF_FOLDER_OR_ID --manifest M.jsonl --out DIR
                                            (wav2vec2 / HuBERT / Whisper through transformers; analysis/hf.py)
    python -m analysis {cad,par,heads,probe,ablation,mixing} --ckpt CKPT --manifest M --out DIR ...
    python -m analysis suggest-reuse --ckpt BASE --manifest M --out DIR [--groups K ...] [--limit N]
                                            (which layers could share maps; see analysis/suggest.py)
    python -m analysis saliency --ckpt CKPT | --upstream hf --upstream-ckpt DIR --manifest M --out DIR [--limit N]
                                [--method perturbation|ig|ixg]   (attention against input saliency; see
                                analysis/saliency.py, for wav2vec2 / HuBERT CTC and Whisper analysis/saliency_hf.py)
    python -m analysis latency ...          (encoder latency benchmark; see analysis/latency/)

``--manifest`` is a prepared subset name (``mini-test``) or a ``.jsonl`` path; utterances without
alignment are skipped and counted. ``--reference`` is a baseline checkpoint or a saved ``par.json``
(coverage is measured against its lower-half PAR; default: the model's own lower half).
"""

from __future__ import annotations

import argparse
import sys

from analysis.report import OPTIONAL_STEPS, STEPS, UPSTREAM_STEPS, Report
from analysis.report_model import UPSTREAMS
from common.cli import add_ckpt, add_device, add_out, user_errors


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "latency":
        from analysis import latency

        return latency.main(argv[1:])
    a = _parser().parse_args(argv)
    if a.command == "suggest-reuse":
        return _suggest_reuse(a)
    with user_errors():
        report = _report(a)
        results = report.run(_steps(a))
    if "saliency" in results:
        from analysis.saliency_report import format_table

        print(format_table(report._saliency))
    for name, path in results["figures"].items():
        print(f"{name:10s} {path}")
    print(f"numbers: {report.out / 'report.json'} (and CSV files beside it)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "suggest-reuse", help="rank reuse plans for a trained baseline (map similarity, zero-shot WER, GFLOP saved)"
    )
    add_ckpt(s, help="baseline checkpoint of train.py (every layer computes its maps)")
    s.add_argument("--manifest", required=True, help="prepared subset name (e.g. mini-dev) or .jsonl manifest")
    add_out(s, help="output folder: suggest.json, similarity.png, candidates.png")
    s.add_argument("--groups", type=int, nargs="+", help="numbers of groups K to consider (default 2 .. L-1)")
    s.add_argument("--per-k", type=int, default=8, help="best partitions kept per K by within-group similarity")
    s.add_argument("--limit", type=int, help="only the first N utterances")
    s.add_argument("--data-dir", help="prepared data folder, to name manifests by subset")
    add_device(s)
    s.add_argument("--max-frames", type=int, default=20000)
    for name in ("report", *STEPS, *OPTIONAL_STEPS):
        s = sub.add_parser(name, help="every analysis" if name == "report" else f"the {name} analysis only")
        _add_report_arguments(s)
        if name == "report":
            s.add_argument(
                "--suggest", action="store_true", help="also rank reuse plans (suggest-reuse) into OUT/suggest"
            )
            s.add_argument(
                "--saliency", action="store_true", help="also compare attention with input saliency (OUT/saliency.json)"
            )
        if name in ("report", "saliency"):
            _saliency_options(s)
        add_device(s, help="where the model runs, e.g. cpu, cuda (features stay on the CPU and each batch is moved)")
    return p


def _add_report_arguments(s) -> None:
    """The model, data and output options of ``report`` and of each single step."""
    add_ckpt(s, required=False, help="checkpoint of train.py (file, or folder with last.ckpt)")
    s.add_argument(
        "--upstream",
        choices=UPSTREAMS,
        help="analyse another model instead: TERA / Mockingjay (s3prl) or "
        "hf (a transformers wav2vec2 / HuBERT / Whisper)",
    )
    s.add_argument(
        "--upstream-ckpt",
        help="the upstream's checkpoint (.ckpt as s3prl's hub downloads it; "
        "for hf a save_pretrained folder or a hub id)",
    )
    s.add_argument(
        "--decoder-text",
        choices=("greedy", "reference"),
        default="greedy",
        help="Whisper context mixing: teacher-force the decoder on its greedy transcript or the reference",
    )
    s.add_argument("--data-dir", help="prepared data folder, to name manifests by subset")
    s.add_argument("--manifest", required=True, help="prepared subset name or .jsonl manifest")
    add_out(s, help="output folder for PNG / JSON / CSV")
    s.add_argument("--alignments", help="MFA TextGrid root, for manifests without alignment paths")
    s.add_argument("--reference", help="baseline checkpoint or par.json for PAR coverage")
    s.add_argument("--probe-train", help="manifest to train the probes on (default: half of --manifest)")
    s.add_argument("--limit", type=int, help="analyse only the first N aligned utterances")
    s.add_argument("--utterance", help="utterance id for the context-mixing figure (default: the first)")
    s.add_argument("--probe-epochs", type=int, default=15)
    s.add_argument("--max-frames", type=int, default=20000)


def _suggest_reuse(a) -> None:
    from analysis.suggest import print_table, suggest

    with user_errors():
        result = suggest(
            a.ckpt, a.manifest, a.out, a.groups, a.limit, a.per_k, a.device, a.data_dir, max_frames=a.max_frames
        )
    print_table(result)
    print(f"wrote {a.out}/suggest.json, similarity.png, candidates.png")


def _report(a) -> Report:
    """The :class:`Report` the parsed arguments ask for (bad options fail here, before any work)."""
    saliency = _saliency_settings(a) if a.command in ("report", "saliency") else None
    return Report(
        a.ckpt,
        a.manifest,
        a.out,
        a.alignments,
        a.reference,
        a.probe_train,
        a.limit,
        a.utterance,
        a.max_frames,
        a.probe_epochs,
        upstream=a.upstream,
        upstream_ckpt=a.upstream_ckpt,
        data_dir=a.data_dir,
        device=a.device,
        need_alignments=a.command != "saliency",
        saliency_options=saliency,
        decoder_text=a.decoder_text,
    )


def _steps(a) -> list[str]:
    if a.command != "report":
        return [a.command]
    return [
        *(UPSTREAM_STEPS if a.upstream in ("tera", "mockingjay") else STEPS),
        *(["suggest"] if a.suggest else []),
        *(["saliency"] if a.saliency else []),
    ]


def _saliency_options(s) -> None:
    from analysis.saliency import METHODS
    from analysis.saliency import PerturbationSettings as P

    s.add_argument(
        "--method",
        choices=METHODS,
        default="perturbation",
        help="input saliency: SPES-like random masks (default), integrated gradients or gradient x input",
    )
    s.add_argument("--masks", type=int, default=P.masks, help=f"perturbation masks per utterance (default {P.masks})")
    s.add_argument(
        "--mask-sizes",
        default=",".join(f"{t}x{f}" for t, f in P.sizes),
        help="mask cells, feature frames x mel bins, used in turn (default %(default)s; clipped to the input; "
        "wav2vec2 / HuBERT: 5 ms waveform segments x 1)",
    )
    s.add_argument("--mask-p", type=float, default=P.p, help=f"probability a cell is masked (default {P.p})")
    s.add_argument("--seed", type=int, default=P.seed, help="seed of the masks and of the random deletion baseline")
    s.add_argument("--ig-steps", type=int, default=32, help="integrated-gradients steps (--method ig)")


def _saliency_settings(a) -> dict:
    """The keyword arguments of ``analysis.saliency_report.run``, checked before any work."""
    from analysis.saliency import PerturbationSettings, parse_mask_sizes

    if a.ig_steps < 1:
        raise ValueError(f"--ig-steps must be positive, got {a.ig_steps}")
    return {
        "method": a.method,
        "n_steps": a.ig_steps,
        "perturbation": PerturbationSettings(parse_mask_sizes(a.mask_sizes), a.masks, a.mask_p, a.seed),
    }


if __name__ == "__main__":
    main()
