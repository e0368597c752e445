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
import sys
import time
from pathlib import Path

import jiwer
import torch

from common.io import atomic_write_text, check_writable
from data.dataset import ManifestDataset
from data.lexicon import write_lexicon
from data.manifest import resolve_manifest, training_transcripts
from data.sampler import ordered_loader
from models.decoding import BeamSearch, greedy_decode, parse_weight
from models.checkpoint import load_model, model_inputs, save_model_checkpoint, training_data_dir
from models.precision import DTYPES, inference_precision, precision_problem, precision_warning

def score(refs: list[str], hyps: list[str]) -> dict:
    """WER / CER (percent) with the error counts, from jiwer."""
    if not refs:
        raise ValueError("nothing to score: no reference")
    m = jiwer.process_words(refs, hyps)
    words = m.hits + m.substitutions + m.deletions
    return {"wer": round(100 * m.wer, 3), "cer": round(100 * jiwer.cer(refs, hyps), 3), "substitutions": m.substitutions,
            "deletions": m.deletions, "insertions": m.insertions, "words": words, "utterances": len(refs)}


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that host timers measure it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def evaluate_set(model, tokenizer, cmvn, manifest: Path | ManifestDataset, beam: BeamSearch | None,
                 max_frames: int = 20000, device: str = "cpu", progress: bool = True,
                 extra: dict[str, BeamSearch] | None = None) -> tuple[dict, list[tuple[str, ...]]]:
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
    skipped += [{"id": e["id"], "reason": "failed to load"} for e in ds.entries
                if e["id"] not in decoded and e["id"] not in ds.skipped]
    if not rows:
        raise ValueError(f"{name}: no utterance could be decoded ({len(skipped)} skipped)")
    refs = [r[1] for r in rows]
    results = {"greedy": {**score(refs, [r[2] for r in rows]), "rtf": round(compute["greedy"] / max(audio, 1e-9), 5)}}
    if beam:
        results["beam"] = {**score(refs, [r[3] for r in rows]), "rtf": round(compute["beam"] / max(audio, 1e-9), 5)}
    for i, (k, dec) in enumerate(extra.items()):
        results[k] = {**score(refs, [r[4 + i] for r in rows]), "rtf": round(compute[k] / max(audio, 1e-9), 5),
                      **dec.settings()}
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
                raise ValueError(f"{path} holds results of other checkpoints ({', '.join(old.get('checkpoints', []))}); "
                                 f"give another --out")
            if old.get("engine", "torch") != report.get("engine", "torch"):
                raise ValueError(f"{path} holds results of --engine {old.get('engine', 'torch')}; give another --out")
            merged["sets"] = old.get("sets", {})
        merged["sets"][set_name] = results
        atomic_write_text(path, json.dumps(merged, indent=2))
    return merged


def add_model_arguments(p: argparse.ArgumentParser, sweep: bool = True) -> None:
    """The options of the model and its decoders that evaluate.py and transcribe.py share: data
    folder, tokenizer, beam size, lexicon, LM (and its weights: several make a sweep where
    ``sweep``), batch size, engine, device and precision."""
    p.add_argument("--data-dir", help="prepared data folder holding manifests/ (default: the folder the checkpoint "
                                      "was trained from); the tokenizer and CMVN come from the checkpoint")
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's; must match it)")
    p.add_argument("--beam-size", type=int, default=32)
    p.add_argument("--lexicon", help="restrict the beam search to a word list: a flashlight lexicon file, or "
                                     "'train' to spell the words of the data dir's *train* manifests (the default "
                                     "with --lm)")
    p.add_argument("--lm", help="word n-gram LM (ARPA file or KenLM binary) for an LM beam search over the lexicon, "
                                "scored as the decoder 'lm' (see python -m data.lm)")
    p.add_argument("--lm-weight", nargs="+" if sweep else None, metavar="W", help="weight of the LM's log10 probabilities (default 1); "
                   "several values (and --word-score values) are a sweep: every point is decoded on the first of "
                   "--sets (a dev set) and the best there is used for the others" if sweep else "")
    p.add_argument("--word-score", nargs="+" if sweep else None, metavar="S", help="score added per word with --lm (default 0)")
    p.add_argument("--max-frames", type=int, default=20000, help="padded 10 ms frames per batch")
    p.add_argument("--engine", choices=("torch", "onnxruntime"), default="torch",
                   help="what computes the log-probabilities: PyTorch, or ONNX Runtime on the checkpoint's ONNX "
                        "export (CPU, fp32; needs the .[onnx] extra)")
    p.add_argument("--device", help="where the model runs (features are made on the CPU and moved per batch; "
                                    "default: cuda if available, cpu with --engine onnxruntime)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision of the model: bf16 / fp16 cast "
                   "its weights (models.precision); fp16 only on GPUs and CPUs with fp16 matrix instructions")


def open_model(a: argparse.Namespace):
    """``(model, tokenizer, hp, data_dir, (cmvn, featurizer, framing))`` for the options of
    :func:`add_model_arguments` (and ``--ckpt``, ``--average``): the device defaulted (``a.device``
    is set), the engine / device / precision checked (``ValueError``), a bf16 emulated by the CPU
    warned on stderr, the checkpoint loaded with its own inputs (:func:`models.checkpoint.model_inputs`)."""
    a.device = a.device or ("cuda" if torch.cuda.is_available() and a.engine == "torch" else "cpu")
    if a.engine == "onnxruntime" and (a.dtype != "fp32" or a.device != "cpu"):
        raise ValueError(f"--engine onnxruntime runs fp32 on the CPU (not --dtype {a.dtype} --device {a.device})")
    if problem := precision_problem(a.dtype, a.device):
        raise ValueError(problem)
    if warning := precision_warning(a.dtype, a.device):
        print(f"warning: {warning}", file=sys.stderr)
    model, tokenizer, hp = load_model(a.ckpt, getattr(a, "average", 1), a.tokenizer, a.device)
    data_dir = training_data_dir(hp, a.data_dir)
    # the model's own features (ours, or a converted ESPnet model's), made and normalised on the CPU
    return model, tokenizer, hp, data_dir, model_inputs(model, hp, data_dir)


def make_decoders(a: argparse.Namespace, tokenizer, data_dir: Path, folder: Path,
                  beam: bool = True) -> tuple[Path | str | None, BeamSearch | None, dict[str, BeamSearch]]:
    """``(lexicon, beam, lm_beams)`` for the options of :func:`add_model_arguments`: the lexicon
    (``--lexicon train`` spells the data folder's training words into ``folder/lexicon.txt``; the
    default with ``--lm``), the beam search (None unless ``beam``) and the LM beam searches, one per
    point of the ``--lm-weight`` x ``--word-score`` grid (``{"lm": ...}`` for one point)."""
    weights, scores = (v if isinstance(v, list) else [v] for v in (a.lm_weight, a.word_score))
    if (weights != [None] or scores != [None]) and not a.lm:
        raise ValueError("--lm-weight and --word-score need --lm")
    weights = [parse_weight("--lm-weight", w) for w in weights if w is not None] or [1.0]
    word_scores = [parse_weight("--word-score", w) for w in scores if w is not None] or [0.0]
    lexicon = a.lexicon if a.lexicon or not a.lm else "train"  # a word LM needs a lexicon
    if lexicon == "train":
        try:
            sentences, _ = training_transcripts(data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--lexicon train: {e}") from None
        words = {w for s in sentences for w in s.split()}
        lexicon = folder / "lexicon.txt"
        write_lexicon(words, tokenizer, lexicon)
    elif lexicon is not None and not Path(lexicon).is_file():
        raise FileNotFoundError(f"lexicon {lexicon} does not exist")
    searcher = BeamSearch(tokenizer, a.beam_size, lexicon) if beam else None
    lm_beams = {}
    if a.lm:
        lm_beam = BeamSearch(tokenizer, a.beam_size, lexicon, a.lm, weights[0], word_scores[0])
        grid = [(w, s) for w in weights for s in word_scores]
        lm_beams = {"lm": lm_beam} if len(grid) == 1 else {
            f"lm w={w:g} s={s:g}": lm_beam.with_weights(w, s) for w, s in grid}
    return lexicon, searcher, lm_beams


def computing_model(model, a: argparse.Namespace):
    """``(what computes the log-probabilities, the ONNX check or None)``: ``model`` at ``--dtype``
    (:func:`models.precision.inference_precision`), or with ``--engine onnxruntime`` its ONNX export
    run by ONNX Runtime, checked against PyTorch (:func:`models.export.onnx_engine`; a failed
    check or a missing ONNX Runtime raises ``ValueError``)."""
    model = inference_precision(model, a.dtype, a.device)
    if a.engine != "onnxruntime":
        return model, None
    import tempfile

    from models.export import onnx_engine

    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-onnx-") as tmp:  # the session keeps the graph
            return onnx_engine(model, tmp, torch.get_num_threads())
    except (ImportError, AssertionError) as e:
        raise ValueError(f"--engine onnxruntime: {e}") from None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python evaluate.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", required=True, help="checkpoint file, or checkpoint folder (with --average)")
    p.add_argument("--average", type=int, default=1, help="average the K latest epoch checkpoints of the folder")
    p.add_argument("--sets", nargs="+", required=True, help="manifest names under DATA_DIR/manifests, or .jsonl paths")
    add_model_arguments(p)
    p.add_argument("--no-beam", action="store_true", help="greedy decoding only (with --lm: and the LM beam)")
    p.add_argument("--out", help="output folder (default: next to the checkpoint, eval/; <name>-bf16 for --dtype bf16)")
    p.add_argument("--save-averaged", help="write the averaged weights as a checkpoint to this path")
    a = p.parse_args(argv)
    try:
        model, tokenizer, hp, data_dir, (cmvn, featurizer, framing) = open_model(a)
        moved = "" if a.data_dir else " (has the data folder moved? give --data-dir or the .jsonl path)"
        manifests = [resolve_manifest(s, data_dir, "" if s.endswith(".jsonl") else moved) for s in a.sets]
        ckpt = Path(a.ckpt)
        out = Path(a.out) if a.out else default_out(ckpt, hp["checkpoints"], a.average)
        out = out if a.out or a.dtype == "fp32" else out.with_name(f"{out.name}-{a.dtype}")
        out = out if a.out or a.engine == "torch" else out.with_name(f"{out.name}-{a.engine}")
        check_writable(out)
        # every set is read (and its audio found) before any is decoded
        datasets = [ManifestDataset([m], tokenizer=None, cmvn=cmvn, featurizer=featurizer, framing=framing)
                    for m in manifests]
        lexicon, beam, lm_beams = make_decoders(a, tokenizer, data_dir, out, beam=not a.no_beam)
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    if a.save_averaged:
        save_model_checkpoint(a.save_averaged, model, tokenizer, hp)
    report = {"checkpoints": hp["checkpoints"], "reuse": hp["reuse"], "engine": a.engine, "device": a.device,
              "dtype": a.dtype, "threads": torch.get_num_threads()}
    try:  # after saving: weights saved in fp32
        model, check = computing_model(model, a)
    except ValueError as e:
        sys.exit(f"error: {e}")
    if check is not None:
        report["onnx_check"] = check
    decoder = {"beam_size": None if a.no_beam else a.beam_size, "lexicon": None if lexicon is None else str(lexicon)}
    merged, chosen = None, lm_beams.get("lm")  # with an LM sweep, chosen on the first set
    for m, ds in zip(manifests, datasets):
        try:
            extra = {"lm": chosen} if chosen else lm_beams
            results, rows = evaluate_set(model, tokenizer, cmvn, ds, beam, a.max_frames, a.device, extra=extra)
            if chosen is None and lm_beams:
                chosen, results = choose_lm(results, lm_beams, m.stem)
                tuned_on = m.stem
            elif len(lm_beams) > 1:
                results["lm"]["tuned_on"] = tuned_on
            # written set by set: a later failure keeps what was computed
            atomic_write_text(out / f"{m.stem}.hyp.tsv", "\t".join(["id", "reference", "greedy", "beam", *extra]) + "\n"
                              + "".join("\t".join(r) + "\n" for r in rows))
            dec = {**decoder, "lm": chosen.settings()} if chosen else decoder
            merged = merge_results(out / "results.json", report, m.stem, {**results, "decoder": dec})
        except (FileNotFoundError, ValueError, OSError) as e:
            sys.exit(f"error: {e}")
    print(f"{'set':14s} {'decoder':8s} {'WER%':>7s} {'CER%':>7s} {'sub':>6s} {'del':>6s} {'ins':>6s} {'words':>7s} {'RTF':>8s}")
    for s, res in merged["sets"].items():
        for dec in ("greedy", "beam", "lm"):
            if dec in res:
                r = res[dec]
                print(f"{s:14s} {dec:8s} {r['wer']:7.2f} {r['cer']:7.2f} {r['substitutions']:6d} {r['deletions']:6d} "
                      f"{r['insertions']:6d} {r['words']:7d} {r['rtf']:8.4f}")
    for s, res in merged["sets"].items():
        for r in res.get("lm_sweep", []):
            print(f"lm sweep on {s}: --lm-weight {r['lm_weight']:g} --word-score {r['word_score']:g}  WER {r['wer']:.2f}"
                  + ("   <- chosen" if (r["lm_weight"], r["word_score"]) == (res["lm"]["lm_weight"], res["lm"]["word_score"])
                     else ""))
    for s, res in merged["sets"].items():
        for skip in res.get("skipped", []):
            print(f"skipped {s} {skip['id']}: {skip['reason']}")
    print(f"wrote {out / 'results.json'} and {out}/<set>.hyp.tsv")


if __name__ == "__main__":
    main()
