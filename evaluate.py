"""Decode manifests with a trained checkpoint and score WER / CER.

    python evaluate.py --ckpt exp/demo/train/checkpoints/last.ckpt --sets mini-test [--out DIR]
    python evaluate.py --ckpt exp/demo/train/checkpoints --average 5 --sets dev-clean dev-other ...
    python evaluate.py --ckpt exp/demo/train/checkpoints/last.ckpt --sets mini-test --engine onnxruntime

Greedy CTC and lexicon-free beam search (torchaudio's ``ctc_decoder``, beam 32 by default) are
scored with jiwer; ``--lexicon`` restricts the beam to a word list, and ``--lm FILE`` (an ARPA file
or KenLM binary) adds a word n-gram LM beam search, the ``lm`` decoder (``--lm-weight`` and
``--word-score`` take several values: every point is decoded on the first set, the best kept).
Writes ``OUT/results.json`` (per set and decoder: WER, CER, substitutions, deletions, insertions,
words, real-time factor) and ``OUT/<set>.hyp.tsv`` (id, reference,
hypotheses), and prints the table.

``--engine onnxruntime`` exports the checkpoint's model to ONNX (:mod:`models.export`, in a
temporary folder), checks ONNX Runtime against PyTorch as the export does, and computes the
log-probabilities with ONNX Runtime (CPU, fp32); features, CMVN and the decoders are the same
(results in ``<name>-onnxruntime`` by default, with the check under ``onnx_check``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common.cli import add_ckpt, add_out, user_errors
from common.io import atomic_write_text, check_writable
from data.dataset import ManifestDataset
from data.manifest import resolve_manifest
from data.sampler import ordered_loader
from models.checkpoint import save_model_checkpoint
from models.decoding import BeamSearch, greedy_decode
from models.inference import add_model_arguments, computing_model, make_decoders, open_model, score, synchronize

__all__ = ["BeamSearch", "choose_lm", "default_out", "evaluate_set", "greedy_decode", "main", "merge_results", "score"]


@torch.inference_mode()
def evaluate_set(
    model,
    tokenizer,
    cmvn,
    manifest: Path | ManifestDataset,
    beam: BeamSearch | None,
    max_frames: int = 20000,
    device: str = "cpu",
    progress: bool = True,
    extra: dict[str, BeamSearch] | None = None,
) -> tuple[dict, list[tuple[str, ...]]]:
    """Decodes one manifest (or its dataset). Data-side work stays on the CPU (features, ``cmvn``);
    each batch is moved to ``device`` explicitly and the log-probabilities come back to the CPU for
    decoding (torchaudio's beam search reads CPU tensors). The real-time factors time the model
    with the device synchronised. Utterances left out (too short, unreadable) are listed under
    ``skipped`` with their reason. ``extra`` decoders (e.g. ``{"lm": BeamSearch(..., lm=...)}``)
    are scored under their names, with their settings."""
    from tqdm import tqdm

    ds = manifest if isinstance(manifest, ManifestDataset) else ManifestDataset([manifest], tokenizer=None, cmvn=cmvn)
    name = Path(ds.manifests[0]).stem
    loader = ordered_loader(ds, max_frames)
    extra = extra or {}
    rows, compute, audio = [], {"greedy": 0.0, "beam": 0.0, **{k: 0.0 for k in extra}}, 0.0
    durations = {e["id"]: e["duration"] for e in ds.entries}
    for batch in tqdm(loader, desc=name, unit="batch", disable=not progress):
        if batch is None:
            continue
        synchronize(device)
        t0 = time.perf_counter()
        log_probs, lengths = model(batch["features"].to(device), batch["feature_lengths"].to(device))
        log_probs, lengths = log_probs.cpu(), lengths.cpu()  # waits for the device
        t1 = time.perf_counter()
        g = [tokenizer.decode(h) for h in greedy_decode(log_probs, lengths)]
        t2 = time.perf_counter()
        b = [tokenizer.decode(h) for h in beam(log_probs, lengths)] if beam else [""] * len(g)
        t3 = time.perf_counter()
        compute["greedy"] += t2 - t0
        compute["beam"] += (t1 - t0) + (t3 - t2)
        hyps = []
        for k, dec in extra.items():
            t4 = time.perf_counter()
            hyps.append([tokenizer.decode(h) for h in dec(log_probs, lengths)])
            compute[k] += (t1 - t0) + (time.perf_counter() - t4)
        audio += sum(durations[i] for i in batch["ids"])
        rows += list(zip(batch["ids"], batch["texts"], g, b, *hyps))
    decoded = {r[0] for r in rows}
    skipped = [{"id": i, "reason": r} for i, r in ds.skipped.items()]
    skipped += [
        {"id": e["id"], "reason": "failed to load"}
        for e in ds.entries
        if e["id"] not in decoded and e["id"] not in ds.skipped
    ]
    if not rows:
        raise ValueError(f"{name}: no utterance could be decoded ({len(skipped)} skipped)")
    refs = [r[1] for r in rows]
    results = {"greedy": {**score(refs, [r[2] for r in rows]), "rtf": round(compute["greedy"] / max(audio, 1e-9), 5)}}
    if beam:
        results["beam"] = {**score(refs, [r[3] for r in rows]), "rtf": round(compute["beam"] / max(audio, 1e-9), 5)}
    for i, (k, dec) in enumerate(extra.items()):
        results[k] = {
            **score(refs, [r[4 + i] for r in rows]),
            "rtf": round(compute[k] / max(audio, 1e-9), 5),
            **dec.settings(),
        }
    for r in results.values():
        r["audio_hours"] = round(audio / 3600, 4)
    results["skipped"] = skipped
    return results, rows


def choose_lm(results: dict, lm_beams: dict[str, BeamSearch], tuned_on: str) -> tuple[BeamSearch, dict]:
    """The LM sweep's point of lowest WER on this set (the first on ties) becomes ``lm``; every
    point is kept under ``lm_sweep``."""
    sweep = [results.pop(k) for k in lm_beams]
    best = min(range(len(sweep)), key=lambda i: sweep[i]["wer"])
    results["lm"] = {**sweep[best], "tuned_on": tuned_on}
    results["lm_sweep"] = sweep
    return list(lm_beams.values())[best], results


def default_out(ckpt: Path, paths: list[str], average: int) -> Path:
    """``RUN/eval/<checkpoint>``: one folder per checkpoint (``last``, ``epoch003``,
    ``avg5-epoch009`` for an average), so evaluations of different checkpoints never share one."""
    run = (ckpt if ckpt.is_dir() else ckpt.parent).parent
    name = Path(paths[-1]).stem
    return run / "eval" / (f"avg{len(paths)}-{name}" if average > 1 else name)


def merge_results(path: Path, report: dict, set_name: str, results: dict) -> dict:
    """Adds one set's results to ``path`` (results.json) under a lock, keeping the sets already
    there; refuses a file that holds results of other checkpoints."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = {**report, "sets": {}}
        if path.is_file():
            try:
                old = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not a results file ({e})") from None
            if old.get("checkpoints") != report["checkpoints"]:
                raise ValueError(
                    f"{path} holds results of other checkpoints ({', '.join(old.get('checkpoints', []))}); "
                    f"give another --out"
                )
            if old.get("engine", "torch") != report.get("engine", "torch"):
                raise ValueError(f"{path} holds results of --engine {old.get('engine', 'torch')}; give another --out")
            merged["sets"] = old.get("sets", {})
        merged["sets"][set_name] = results
        atomic_write_text(path, json.dumps(merged, indent=2))
    return merged


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__.split("\n\n")[0])
    add_ckpt(p)
    p.add_argument("--average", type=int, default=1, help="average the K latest epoch checkpoints of the folder")
    p.add_argument("--sets", nargs="+", required=True, help="manifest names under DATA_DIR/manifests, or .jsonl paths")
    add_model_arguments(p)
    p.add_argument("--no-beam", action="store_true", help="greedy decoding only (with --lm: and the LM beam)")
    add_out(
        p, required=False, help="output folder (default: next to the checkpoint, eval/; <name>-bf16 for --dtype bf16)"
    )
    p.add_argument("--save-averaged", help="write the averaged weights as a checkpoint to this path")
    a = p.parse_args(argv)
    with user_errors():
        model, tokenizer, hp, data_dir, (cmvn, featurizer, framing) = open_model(a)
        moved = "" if a.data_dir else " (has the data folder moved? give --data-dir or the .jsonl path)"
        manifests = [resolve_manifest(s, data_dir, "" if s.endswith(".jsonl") else moved) for s in a.sets]
        out = output_folder(a, hp["checkpoints"])
        check_writable(out)
        # every set is read (and its audio found) before any is decoded
        datasets = [
            ManifestDataset([m], tokenizer=None, cmvn=cmvn, featurizer=featurizer, framing=framing) for m in manifests
        ]
        lexicon, beam, lm_beams = make_decoders(a, tokenizer, data_dir, out, beam=not a.no_beam)
    if a.save_averaged:
        save_model_checkpoint(a.save_averaged, model, tokenizer, hp)
    report = {
        "checkpoints": hp["checkpoints"],
        "reuse": hp["reuse"],
        "engine": a.engine,
        "device": a.device,
        "dtype": a.dtype,
        "threads": torch.get_num_threads(),
    }
    with user_errors():  # after saving: weights saved in fp32
        model, check = computing_model(model, a)
    if check is not None:
        report["onnx_check"] = check
    decoder = {"beam_size": None if a.no_beam else a.beam_size, "lexicon": None if lexicon is None else str(lexicon)}
    with user_errors():
        merged = decode_sets(
            model,
            tokenizer,
            cmvn,
            dict(zip(manifests, datasets)),
            beam,
            lm_beams,
            a.max_frames,
            a.device,
            out,
            report,
            decoder,
        )
    print_results(merged)
    print(f"wrote {out / 'results.json'} and {out}/<set>.hyp.tsv")


def output_folder(a: argparse.Namespace, checkpoints: list[str]) -> Path:
    """``--out``, or by default :func:`default_out` with ``-<dtype>`` (not fp32) and ``-<engine>``
    (not torch) appended to its name."""
    if a.out:
        return Path(a.out)
    out = default_out(Path(a.ckpt), checkpoints, a.average)
    out = out if a.dtype == "fp32" else out.with_name(f"{out.name}-{a.dtype}")
    return out if a.engine == "torch" else out.with_name(f"{out.name}-{a.engine}")


def decode_sets(
    model,
    tokenizer,
    cmvn,
    sets: dict[Path, ManifestDataset],
    beam: BeamSearch | None,
    lm_beams: dict[str, BeamSearch],
    max_frames: int,
    device: str,
    out: Path,
    report: dict,
    decoder: dict,
) -> dict:
    """Decodes and scores each set in turn, writing ``OUT/<set>.hyp.tsv`` and merging its results
    into ``OUT/results.json`` set by set (a later failure keeps what was computed); with an LM
    sweep, the point is chosen on the first set. Returns the merged results."""
    merged, chosen, tuned_on = None, lm_beams.get("lm"), None
    for m, ds in sets.items():
        extra = {"lm": chosen} if chosen else lm_beams
        results, rows = evaluate_set(model, tokenizer, cmvn, ds, beam, max_frames, device, extra=extra)
        if chosen is None and lm_beams:
            chosen, results = choose_lm(results, lm_beams, m.stem)
            tuned_on = m.stem
        elif len(lm_beams) > 1:
            results["lm"]["tuned_on"] = tuned_on
        atomic_write_text(
            out / f"{m.stem}.hyp.tsv",
            "\t".join(["id", "reference", "greedy", "beam", *extra])
            + "\n"
            + "".join("\t".join(r) + "\n" for r in rows),
        )
        dec = {**decoder, "lm": chosen.settings()} if chosen else decoder
        merged = merge_results(out / "results.json", report, m.stem, {**results, "decoder": dec})
    return merged


def print_results(merged: dict) -> None:
    """The table of every set and decoder in ``merged`` (results.json), the LM sweep and the skipped utterances."""
    print(
        f"{'set':14s} {'decoder':8s} {'WER%':>7s} {'CER%':>7s} "
        f"{'sub':>6s} {'del':>6s} {'ins':>6s} {'words':>7s} {'RTF':>8s}"
    )
    for s, res in merged["sets"].items():
        for dec in ("greedy", "beam", "lm"):
            if dec in res:
                r = res[dec]
                print(
                    f"{s:14s} {dec:8s} {r['wer']:7.2f} {r['cer']:7.2f} {r['substitutions']:6d} {r['deletions']:6d} "
                    f"{r['insertions']:6d} {r['words']:7d} {r['rtf']:8.4f}"
                )
    for s, res in merged["sets"].items():
        for r in res.get("lm_sweep", []):
            print(
                f"lm sweep on {s}: --lm-weight {r['lm_weight']:g} --word-score {r['word_score']:g}  WER {r['wer']:.2f}"
                + (
                    "   <- chosen"
                    if (r["lm_weight"], r["word_score"]) == (res["lm"]["lm_weight"], res["lm"]["word_score"])
                    else ""
                )
            )
    for s, res in merged["sets"].items():
        for skip in res.get("skipped", []):
            print(f"skipped {s} {skip['id']}: {skip['reason']}")


if __name__ == "__main__":
    main()
