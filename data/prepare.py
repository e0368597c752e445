"""Prepare a LibriSpeech-layout corpus (real or mini) for training and analysis.

    python -m data.prepare --root CORPUS --out DIR [--alignments ALIGN_ROOT] [--subsets ...]
                           [--train-subsets ...] [--vocab-size 128] [--cmvn-utterances 2000]

writes::

    DIR/manifests/<subset>.jsonl   one utterance a line: id, audio, duration, speaker, chapter,
                                   text, num_frames (10 ms fbank frames), alignment (if any)
    DIR/bpe.model, DIR/bpe.vocab   SentencePiece BPE trained on the training subsets' text
    DIR/cmvn.json                  global mean / std of the 80-dim fbank over training audio
    DIR/report.json                counts and every skipped utterance with its reason

With ``--inputs FOLDER`` (the output folder of ``python -m models.convert``), the tokenizer, its
output order and the normalisation are the converted model's (``bpe.model``, ``tokens.txt``,
``cmvn.json`` and ``features.json``, which selects the model's own front end in training),
instead of a new BPE and fbank CMVN: a folder to fine-tune that model on.

Bad utterances (unreadable or missing audio, transcript lines with no audio and audio with no
line, empty transcripts, TextGrids that do not cover the audio or hold non-ARPAbet phones) are
skipped, reported with the file and line at fault, and counted. Every output is written to a
temporary file and renamed, so an interrupted run never leaves a half manifest.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from common.cli import add_out, user_errors
from common.io import atomic_write_text, check_writable
from data import librispeech
from data.alignments import AlignmentError, find_alignment, read_textgrid
from data.features import SAMPLE_RATE, AudioError, GlobalCMVN, fbank, load_audio, num_frames
from data.framing import too_short
from data.librispeech import Problem
from data.manifest import INCOMPLETE, write_manifest
from data.text import normalise, unsupported
from data.tokenizer import Tokenizer


def attach_alignments(entries: list[dict], align_root: Path, subset: str) -> tuple[list[dict], list[Problem], int]:
    """Add ``alignment`` to entries that have a valid TextGrid; skip those whose TextGrid is bad.

    Returns (kept entries, problems, number of entries with no TextGrid at all).
    """
    kept, problems, missing = [], [], 0
    for e in entries:
        path = find_alignment(align_root, subset, e)
        if path is None:
            missing += 1
            kept.append(e)
            continue
        try:
            read_textgrid(path).check_covers(e["duration"])
        except AlignmentError as err:  # its message reads "FILE[:LINE]: why"
            problems.append(Problem(*str(err).split(": ", 1)))
            continue
        kept.append({**e, "alignment": str(path.resolve())})
    return kept, problems, missing


def compute_cmvn(
    entries: list[dict], max_utterances: int, progress: bool = True
) -> tuple[GlobalCMVN, set[str], list[Problem]]:
    """Global CMVN over up to ``max_utterances`` evenly spread entries; also returns the ids whose
    audio failed to decode (to drop from the manifests) with their problems."""
    from tqdm import tqdm

    step = max(1, len(entries) // max(1, max_utterances))
    stats, bad, problems = None, set(), []
    for e in tqdm(entries[::step][:max_utterances], desc="cmvn", unit="utt", disable=not progress):
        try:
            feats = fbank(load_audio(e["audio"]))
        except AudioError as err:  # its message reads "FILE: why"
            bad.add(e["id"])
            problems.append(Problem(*str(err).split(": ", 1)))
            continue
        except ValueError as err:
            bad.add(e["id"])
            problems.append(Problem(e["audio"], str(err)))
            continue
        stats = GlobalCMVN.accumulate(stats, feats)
    return GlobalCMVN.from_stats(stats), bad, problems


def normalise_entries(entries: list[dict]) -> tuple[list[dict], list[Problem], int]:
    """Transcripts in LibriSpeech's form (:func:`data.text.normalise`); utterances with characters
    that cannot be spelt in its alphabet (digits, other scripts) are skipped. Returns (kept,
    problems, number of transcripts the normalisation changed)."""
    kept, problems, changed = [], [], 0
    for e in entries:
        text = normalise(e["text"])
        bad = unsupported(text)
        if bad:
            problems.append(Problem(e["audio"], f"transcript has characters outside LibriSpeech's alphabet: {bad!r}"))
            continue
        if not text:
            problems.append(Problem(e["audio"], "transcript is empty once normalised"))
            continue
        changed += text != e["text"]
        kept.append({**e, "text": text})
    return kept, problems, changed


def check_audio(entries: list[dict], progress: bool = True, desc: str = "audio") -> tuple[list[dict], list[Problem]]:
    """Decodes every utterance: those that do not decode, or give fewer frames than the model
    needs, are skipped (dev and test sets must not shrink silently at evaluation)."""
    from tqdm import tqdm

    kept, problems = [], []
    for e in tqdm(entries, desc=desc, unit="utt", disable=not progress):
        try:
            why = too_short(fbank(load_audio(e["audio"])).shape[0])
        except (AudioError, ValueError) as err:
            why = str(err).split(": ", 1)[-1]
        if why:
            problems.append(Problem(e["audio"], why))
            continue
        kept.append(e)
    return kept, problems


MODEL_INPUTS = ("bpe.model", "tokens.txt", "cmvn.json", "features.json")


def check_arguments(
    root, out: Path, alignments, subsets: list[str] | None, train_subsets: list[str] | None, inputs
) -> tuple[list[str], list[str]]:
    """``(subsets, train_subsets)`` with their defaults (every subset found; those named
    ``*train*``), after every check that needs no audio: one error naming the option at fault."""
    subsets = subsets or librispeech.list_subsets(root)
    if not subsets:
        raise FileNotFoundError(f"{root}: no LibriSpeech subsets (folders with */*/*.trans.txt) found")
    train_subsets = train_subsets or [s for s in subsets if "train" in s]
    if not train_subsets:
        raise ValueError(f"no training subset among {subsets}; name one with --train-subsets")
    unknown = sorted(set(train_subsets) - set(subsets))
    if unknown:
        raise ValueError(f"training subsets {unknown} are not among the subsets prepared {subsets}")
    if alignments is not None and not Path(alignments).is_dir():
        raise FileNotFoundError(f"--alignments {alignments}: no such folder")
    if inputs is not None:
        missing = [f for f in MODEL_INPUTS if not (Path(inputs) / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"--inputs {inputs}: no {missing[0]} (give the output folder of python -m models.convert)"
            )
    check_writable(out)
    return subsets, train_subsets


def scan_subsets(root, subsets: list[str], train_subsets: list[str], alignments, progress: bool = True):
    """``(manifests, problems, normalised, no_alignment)``: each subset's usable entries (read,
    normalised, evaluation sets decoded once, TextGrids attached), the skipped utterances, and per
    subset the number of transcripts normalised and of entries without a TextGrid."""
    manifests: dict[str, list[dict]] = {}
    problems: list[Problem] = []
    no_alignment: dict[str, int] = {}
    normalised: dict[str, int] = {}
    for subset in subsets:
        entries, probs = librispeech.scan_subset(root, subset)
        problems += probs
        entries, probs, normalised[subset] = normalise_entries(entries)
        problems += probs
        if subset not in train_subsets:  # evaluation sets: every utterance is decoded once here
            entries, probs = check_audio(entries, progress, desc=f"check {subset}")
            problems += probs
        if alignments is not None:
            entries, probs, no_alignment[subset] = attach_alignments(entries, Path(alignments), subset)
            problems += probs
        manifests[subset] = entries
    if alignments is not None and not any(sum("alignment" in e for e in v) for v in manifests.values()):
        raise ValueError(f"--alignments {alignments}: no TextGrid found for any utterance (is the path right?)")
    return manifests, problems, normalised, no_alignment


def count_frames(manifests: dict[str, list[dict]], bad: set[str]) -> list[Problem]:
    """Gives every entry its ``num_frames`` (fbank frames of its duration), in place; leaves out
    the ids in ``bad`` and the entries too short for the model, returning the latter's problems."""
    problems = []
    for subset, entries in manifests.items():
        kept = []
        for e in entries:
            n = num_frames(round(e["duration"] * SAMPLE_RATE))
            if e["id"] in bad:
                continue
            if why := too_short(n):
                problems.append(Problem(e["audio"], why))
                continue
            kept.append({**e, "num_frames": n})
        manifests[subset] = kept
    return problems


def stage_tokenizer(stage: Path, out: Path, texts, vocab_size: int, cmvn: GlobalCMVN, inputs, force: bool) -> Tokenizer:
    """Writes the tokenizer and the normalisation into ``stage``: a BPE trained on ``texts`` and
    our fbank CMVN, or (``inputs``) the converted model's own files. Refuses a tokenizer other than
    the one already in ``out`` (checkpoints trained on it need it) unless ``force``."""
    import shutil

    if inputs is None:
        tokenizer = Tokenizer.train(texts, stage / "bpe", vocab_size)
        cmvn.save(stage / "cmvn.json")
    else:  # the converted model's own tokenizer, order, normalisation and front end
        for f in MODEL_INPUTS:
            shutil.copyfile(Path(inputs) / f, stage / f)
        tokenizer = Tokenizer.open(stage / "bpe.model")
    old = out / "bpe.model"
    old_digest = Tokenizer.open(old).digest if old.is_file() else None  # with its tokens.txt order, if any
    if old_digest is not None and old_digest != tokenizer.digest and not force:
        raise ValueError(
            f"{old} exists and the new tokenizer differs from it (sha256 {old_digest} -> "
            f"{tokenizer.digest}): checkpoints trained on it would no longer evaluate or resume. "
            f"Prepare into another --out, or pass --force to replace it"
        )
    return tokenizer


def install(stage: Path, out: Path) -> None:
    """Moves the staged outputs into ``out``, ``out/.incomplete`` marking the folder meanwhile; a
    converted model's files of an earlier ``--inputs`` run that this run did not make are removed."""
    (out / INCOMPLETE).write_text("prepare was interrupted while moving its outputs into place; run it again\n")
    (out / "manifests").mkdir(exist_ok=True)
    for f in ("tokens.txt", "features.json"):  # a converted model's, from an earlier --inputs run
        if not (stage / f).exists():
            (out / f).unlink(missing_ok=True)
    for f in sorted(stage.rglob("*")):
        if f.is_file():
            os.replace(f, out / f.relative_to(stage))
    (out / INCOMPLETE).unlink()


def prepare(
    root: str | Path,
    out: str | Path,
    alignments: str | Path | None = None,
    subsets: list[str] | None = None,
    train_subsets: list[str] | None = None,
    vocab_size: int = 128,
    cmvn_utterances: int = 2000,
    progress: bool = True,
    force: bool = False,
    inputs: str | Path | None = None,
) -> dict:
    """Run the whole preparation; returns the report (also written to ``out/report.json``).

    Outputs are made in a staging folder and moved into ``out`` at the end (:func:`install`), a
    folder left incomplete being refused by the loaders. A tokenizer different from the one
    already in ``out`` is not replaced unless ``force`` (:func:`stage_tokenizer`)."""
    import shutil
    import tempfile

    t0 = time.perf_counter()
    out = Path(out)
    subsets, train_subsets = check_arguments(root, out, alignments, subsets, train_subsets, inputs)
    manifests, problems, normalised, no_alignment = scan_subsets(root, subsets, train_subsets, alignments, progress)
    train_entries = [e for s in train_subsets for e in manifests[s]]
    if not train_entries:
        raise ValueError(f"training subsets {train_subsets} hold no usable utterance")
    cmvn, bad, probs = compute_cmvn(train_entries, cmvn_utterances, progress)
    problems += probs + count_frames(manifests, bad)

    stage = Path(tempfile.mkdtemp(prefix=".staging-", dir=out))
    try:
        texts = (e["text"] for s in train_subsets for e in manifests[s])
        tokenizer = stage_tokenizer(stage, out, texts, vocab_size, cmvn, inputs, force)
        for subset, entries in manifests.items():
            write_manifest(stage / "manifests" / f"{subset}.jsonl", entries)
        report = {
            "root": str(librispeech.find_root(root)),
            "subsets": {
                s: {
                    "utterances": len(v),
                    "hours": round(sum(e["duration"] for e in v) / 3600, 3),
                    "aligned": sum("alignment" in e for e in v),
                }
                for s, v in manifests.items()
            },
            "train_subsets": train_subsets,
            "vocab_size": tokenizer.vocab_size - 1,
            "inputs": None if inputs is None else str(inputs),
            "normalised_transcripts": normalised,
            "skipped": len(problems),
            "problems": [str(p) for p in problems],
            "no_alignment": no_alignment,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        atomic_write_text(stage / "report.json", json.dumps(report, indent=2))
        install(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m data.prepare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--root", required=True, help="LibriSpeech root (the folder holding the subsets, or its parent)")
    add_out(p)
    p.add_argument("--alignments", help="MFA TextGrid root (e.g. CORPUS/alignments)")
    p.add_argument("--subsets", nargs="+", help="subsets to prepare (default: every subset found)")
    p.add_argument("--train-subsets", nargs="+", help="subsets for BPE and CMVN (default: those named *train*)")
    p.add_argument("--vocab-size", type=int, default=128, help="BPE units, blank excluded (default 128)")
    p.add_argument("--cmvn-utterances", type=int, default=2000, help="training utterances read for CMVN")
    p.add_argument("--force", action="store_true", help="replace a different tokenizer already in --out")
    p.add_argument(
        "--inputs",
        help="take the tokenizer, normalisation and front end of a converted model "
        "(the --out folder of python -m models.convert) instead of training them",
    )
    p.add_argument(
        "--download",
        nargs="+",
        metavar="SUBSET",
        help=f"first download these subsets into --root ({', '.join(librispeech.SUBSETS)})",
    )
    a = p.parse_args(argv)
    with user_errors():
        for subset in a.download or []:
            librispeech.download(subset, a.root)
        report = prepare(
            a.root,
            a.out,
            a.alignments,
            a.subsets,
            a.train_subsets,
            a.vocab_size,
            a.cmvn_utterances,
            force=a.force,
            inputs=a.inputs,
        )
    for line in report["problems"]:
        print(f"skipped {line}", file=sys.stderr)
    for s, v in report["subsets"].items():
        print(f"{s:16s} {v['utterances']:7d} utterances {v['hours']:8.3f} h  {v['aligned']:7d} aligned")
    print(f"skipped {report['skipped']}; BPE {report['vocab_size']} units; took {report['seconds']} s; wrote {a.out}")


if __name__ == "__main__":
    main()
