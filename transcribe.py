"""Transcribe recordings of any length and format with a trained checkpoint, with word timestamps.

    python transcribe.py --ckpt exp/demo/train/checkpoints/last.ckpt talk.flac interviews/
    python transcribe.py --ckpt CKPT FOLDER --out DIR --format txt json ctm srt [--lm LM --lexicon L]
    python transcribe.py --ckpt CKPT FILE --dtype bf16 | --engine onnxruntime | --device cuda

Reads what soundfile reads (WAV, FLAC, OGG, MP3 where libsndfile has it), at any sample rate
(resampled to 16 kHz by torchaudio) and channel count (mixed to mono); folders are searched
recursively. A recording longer than ``--max-segment`` seconds is cut at the pauses of its own
short-time energy (:func:`split_at_pauses`), and a piece still longer at its quietest stretch, so
that no segment is longer and attention memory stays bounded; the segments are decoded in batches
of ``--max-frames`` padded frames, and their words placed in the whole recording. Word times come from a CTC
forced alignment
of the hypothesis (:func:`models.decoding.align_words`). The model, its inputs, the decoders
(greedy; beam, lexicon and LM as in evaluate.py), the precision and the engine are evaluate.py's
(:func:`models.inference.open_model`, :func:`~models.inference.make_decoders`,
:func:`~models.inference.computing_model`).

Without ``--out`` one line per file, ``path<TAB>text``, on stdout; with it ``OUT/<stem>.<format>``
per file and format: ``txt`` (the text), ``json`` (``text``, ``duration``, ``words``
``[{"word", "start", "end"}]`` and ``segments`` ``[{"start", "end", "text"}]``, seconds from the
start of the file), ``ctm`` (``stem 1 start duration word``) and ``srt`` (cues of words). A file
that cannot be read, or is empty, is reported and skipped; the real-time factor is printed at the
end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from common.cli import add_ckpt, add_out, fail, user_errors
from common.io import atomic_write_text, check_writable
from data.dataset import collate
from data.features import SAMPLE_RATE, AudioError, fbank, load_audio
from models.decoding import align_words, greedy_decode
from models.inference import add_model_arguments, computing_model, make_decoders, open_model, synchronize

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".au", ".caf", ".w64", ".sph"}
FORMATS = ("txt", "json", "ctm", "srt")


def audio_files(paths: list[str]) -> list[Path]:
    """The files named, and the audio files (by suffix) under the folders named, recursively, in
    order; ``ValueError`` for a path that does not exist or a folder without audio."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in AUDIO_SUFFIXES)
            if not found:
                raise ValueError(f"{p}: no audio file in this folder (looked for {', '.join(sorted(AUDIO_SUFFIXES))})")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise ValueError(f"{p}: no such file or folder")
    return list(dict.fromkeys(out))


def quiet_runs(quiet: list[bool]) -> list[tuple[int, int]]:
    """``[(first, end)]`` of the runs of True in ``quiet``."""
    runs, first = [], None
    for i, q in enumerate(quiet + [False]):
        if q and first is None:
            first = i
        elif not q and first is not None:
            runs.append((first, i))
            first = None
    return runs


def split_at_pauses(
    wave: torch.Tensor,
    max_segment: float,
    sample_rate: int = SAMPLE_RATE,
    frame: float = 0.01,
    smooth: float = 0.2,
    min_pause: float = 0.3,
    min_segment: float = 1.0,
    margin: float = 0.05,
) -> list[tuple[int, int]]:
    """``[(first sample, end sample)]`` of the speech in ``wave``, none longer than ``max_segment``
    seconds: an energy-based end-point detector (Rabiner and Sambur, 1975). A ``wave`` no longer
    than ``max_segment`` is one segment, as it is.
    The energy of ``frame``-long frames, averaged over ``smooth`` seconds, is quiet below
    ``max(10th percentile + 6 dB, 95th percentile - 40 dB)`` (the noise floor, or far below the
    speech), and at least 10 dB below the 95th percentile (a steady sound has no pause); every quiet run of
    ``min_pause`` seconds or more, inside the recording, is a cut. A
    piece still longer than ``max_segment`` is cut, while it is, in the middle of the longest
    stretch within 3 dB of the quietest in ``[start + min_segment, start + max_segment]``. Each
    piece then loses the quiet frames at its ends (``margin`` seconds kept); a piece that is all
    pause is dropped."""
    hop, limit = int(frame * sample_rate), int(max_segment * sample_rate)
    n = wave.numel() // hop
    if wave.numel() <= limit or n < 2:
        return [(0, wave.numel())]
    energy = wave[: n * hop].reshape(n, hop).pow(2).mean(1)
    k = max(1, int(round(smooth / frame)))
    energy = torch.nn.functional.avg_pool1d(energy[None, None], k, 1, k // 2, count_include_pad=False)[0, 0, :n]
    db = 10 * torch.log10(energy + 1e-10)
    loud = float(db.quantile(0.95))
    threshold = min(max(float(db.quantile(0.1)) + 6, loud - 40), loud - 10)
    pauses = [
        (a + b) // 2 * hop
        for a, b in quiet_runs((db < threshold).tolist())
        if b - a >= min_pause / frame and a > 0 and b < n
    ]
    edges = [0, *pauses, wave.numel()]
    bounds = []
    for start, end in zip(edges[:-1], edges[1:]):
        while end - start > limit:
            lo, hi = (start + int(min(min_segment, max_segment / 2) * sample_rate)) // hop, (start + limit) // hop
            window = db[lo:hi]
            first, last = max(quiet_runs((window <= window.min() + 3).tolist()), key=lambda r: r[1] - r[0])
            cut = (lo + (first + last) // 2) * hop
            bounds.append((start, cut))
            start = cut
        bounds.append((start, end))
    return [
        trimmed for s, e in bounds if (trimmed := trim_pauses(db >= threshold, s, e, hop, int(margin * sample_rate)))
    ]


def trim_pauses(loud: torch.Tensor, start: int, end: int, hop: int, margin: int) -> tuple[int, int] | None:
    """Samples ``start .. end`` without the quiet frames (``loud`` False) at either end, ``margin``
    samples kept around the loud ones; None when no frame is loud (a pause only)."""
    frames = loud[start // hop : end // hop].nonzero().flatten()
    if not len(frames):
        return None
    first, last = (start // hop + int(frames[0])) * hop, (start // hop + int(frames[-1]) + 1) * hop
    return max(start, first - margin), min(end, last + margin)


def frame_seconds(first: int, last: int, framing) -> tuple[float, float]:
    """Start and end (seconds) of model frames ``first .. last``: frame ``k`` is centred at
    ``k * shift + window / 2`` (:class:`data.framing.LabelFraming`) and stands for ``shift``."""
    centre = lambda k: k * framing.shift + framing.window / 2  # noqa: E731
    return max(0.0, centre(first) - framing.shift / 2), centre(last) + framing.shift / 2


@torch.inference_mode()
def transcribe_wave(
    wave: torch.Tensor,
    model,
    tokenizer,
    cmvn,
    featurizer,
    framing,
    decoder,
    max_segment: float,
    max_frames: int = 20000,
    device: str = "cpu",
) -> dict:
    """``{"text", "duration", "words", "segments"}`` of a 16 kHz mono waveform (see the module's
    doc), and ``"compute"``: seconds spent in the model and the decoder."""
    duration = wave.numel() / SAMPLE_RATE
    bounds = split_at_pauses(wave, max_segment)
    featurize = featurizer or fbank
    items = []
    for i, (s, e) in enumerate(bounds):
        feats = featurize(wave[s:e]) if e - s >= SAMPLE_RATE * 0.025 else None
        if feats is None or framing.too_short(len(feats)):
            continue  # a sliver too short for the model (the end of a recording): nothing to say
        items.append({"id": i, "text": "", "features": cmvn(feats) if cmvn is not None else feats})
    segments = {}
    compute = 0.0
    symbols = tokenizer.symbols()
    batch, longest = [], 0
    batches = []
    for item in sorted(items, key=lambda x: len(x["features"])):  # similar lengths together, little padding
        longest_if = max(longest, len(item["features"]))
        if batch and longest_if * (len(batch) + 1) > max_frames:
            batches.append(batch)
            batch, longest_if = [], len(item["features"])
        batch.append(item)
        longest = longest_if
    batches += [batch] if batch else []
    for group in batches:
        b = collate(group)
        synchronize(device)
        t0 = time.perf_counter()
        log_probs, lengths = model(b["features"].to(device), b["feature_lengths"].to(device))
        log_probs, lengths = log_probs.float().cpu(), lengths.cpu()
        hyps = decoder(log_probs, lengths)
        compute += time.perf_counter() - t0
        for i, ids, lp, n in zip(b["ids"], hyps, log_probs, lengths.tolist()):
            offset = bounds[i][0] / SAMPLE_RATE
            try:
                spans = align_words(lp[:n], ids, symbols)
                words = [(w, *frame_seconds(f, l, framing)) for w, f, l in spans]
            except ValueError:  # a lexicon's re-spelling too long for the frames: spread the words evenly
                text = tokenizer.decode(ids).split()
                step = (bounds[i][1] - bounds[i][0]) / SAMPLE_RATE / max(1, len(text))
                words = [(w, k * step, (k + 1) * step) for k, w in enumerate(text)]
            segments[i] = [
                {"word": w, "start": round(offset + s, 3), "end": round(min(offset + e, duration), 3)}
                for w, s, e in words
            ]
    words = [w for i in sorted(segments) for w in segments[i]]
    return {
        "text": " ".join(w["word"] for w in words),
        "duration": round(duration, 3),
        "words": words,
        "segments": [
            {
                "start": round(s / SAMPLE_RATE, 3),
                "end": round(e / SAMPLE_RATE, 3),
                "text": " ".join(w["word"] for w in segments.get(i, [])),
            }
            for i, (s, e) in enumerate(bounds)
        ],
        "compute": compute,
    }


def srt_time(t: float) -> str:
    ms = int(round(t * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def subtitle_cues(words: list[dict], max_words: int = 12, max_gap: float = 1.0, max_span: float = 6.0) -> list[dict]:
    """Words grouped into subtitle cues ``{"start", "end", "text"}``: a new cue after a pause of
    ``max_gap`` seconds, or once a cue holds ``max_words`` words or spans ``max_span`` seconds."""
    cues = []
    for w in words:
        c = cues[-1] if cues else None
        if (
            c is None
            or w["start"] - c["end"] > max_gap
            or len(c["words"]) >= max_words
            or w["end"] - c["start"] > max_span
        ):
            cues.append({"start": w["start"], "end": w["end"], "words": [w["word"]]})
        else:
            c["end"], c["words"] = max(c["end"], w["end"]), c["words"] + [w["word"]]
    return [{"start": c["start"], "end": c["end"], "text": " ".join(c["words"])} for c in cues]


def render(result: dict, fmt: str, name: str) -> str:
    """One file's transcript in ``fmt`` (txt, json, ctm or srt)."""
    if fmt == "txt":
        return result["text"] + "\n"
    if fmt == "json":
        return json.dumps({k: result[k] for k in ("text", "duration", "words", "segments")}, indent=2) + "\n"
    if fmt == "ctm":
        return "".join(
            f"{name} 1 {w['start']:.3f} {max(0.0, w['end'] - w['start']):.3f} {w['word']}\n" for w in result["words"]
        )
    return "".join(
        f"{i}\n{srt_time(c['start'])} --> {srt_time(c['end'])}\n{c['text']}\n\n"
        for i, c in enumerate(subtitle_cues(result["words"]), 1)
    )


def output_names(files: list[Path], roots: list[str]) -> dict[Path, str]:
    """``OUT``-relative name (without suffix) of each file: its stem; a file found in a folder keeps
    its path under that folder (``a/b/stem``), so that equal stems in different folders do not
    collide. ``ValueError`` if two still share a name."""
    names = {}
    for f in files:
        root = next((Path(r) for r in roots if Path(r).is_dir() and Path(r) in f.parents), None)
        names[f] = str(f.relative_to(root).with_suffix("")) if root is not None else f.stem
    seen: dict[str, Path] = {}
    for f, n in names.items():
        if n in seen:
            raise ValueError(f"{seen[n]} and {f} would both be written as {n}.*: transcribe them into different --out")
        seen[n] = f
    return names


def main(argv: list[str] | None = None) -> None:
    from tqdm import tqdm

    p = argparse.ArgumentParser(prog="python transcribe.py", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", metavar="FILE_OR_FOLDER", help="audio files, or folders searched recursively")
    add_ckpt(p)
    p.add_argument("--average", type=int, default=1, help="average the K latest epoch checkpoints of the folder")
    add_model_arguments(p, sweep=False)
    p.add_argument("--decoder", choices=("greedy", "beam"), help="default: beam with --lexicon or --lm, else greedy")
    p.add_argument(
        "--max-segment",
        type=float,
        default=20.0,
        help="longest segment decoded at once, seconds (longer recordings are cut at pauses)",
    )
    add_out(p, required=False, help="output folder (default: print path<TAB>text per file)")
    p.add_argument("--format", nargs="+", choices=FORMATS, help="files written per recording in --out (default: txt)")
    a = p.parse_args(argv)
    with user_errors():
        if a.format and not a.out:
            raise ValueError("--format writes files: give --out DIR (without it, path<TAB>text is printed)")
        a.format = a.format or ["txt"]
        if a.max_segment < 1:
            raise ValueError(f"--max-segment {a.max_segment:g}: must be at least 1 second")
        files = audio_files(a.paths)
        names = output_names(files, a.paths)
        out = check_writable(a.out) if a.out else None
        model, tokenizer, hp, data_dir, (cmvn, featurizer, framing) = open_model(a)
        beam = a.decoder == "beam" or (a.decoder is None and (a.lexicon or a.lm))
        if a.decoder == "greedy" and (a.lexicon or a.lm):
            raise ValueError("--lexicon and --lm are beam searches: not with --decoder greedy")
        with tempfile.TemporaryDirectory(prefix="transcribe-") as tmp:  # --lexicon train's word list
            _, search, lm_beams = make_decoders(a, tokenizer, data_dir, out or Path(tmp), beam=beam and not a.lm)
        model, _ = computing_model(model, a)
    search = lm_beams.get("lm") or search
    decoder = search or greedy_decode
    audio_seconds, compute, skipped, started = 0.0, 0.0, [], time.perf_counter()
    for f in tqdm(files, desc="transcribe", unit="file", disable=None):
        try:
            wave = load_audio(f)
            if wave.numel() < SAMPLE_RATE * 0.025:
                raise AudioError(f"{f}: shorter than one 25 ms frame")
        except AudioError as e:
            print(f"error: {e}; skipped", file=sys.stderr)
            skipped.append(f)
            continue
        result = transcribe_wave(
            wave, model, tokenizer, cmvn, featurizer, framing, decoder, a.max_segment, a.max_frames, a.device
        )
        audio_seconds += result["duration"]
        compute += result["compute"]
        if out is None:
            print(f"{f}\t{result['text']}", flush=True)
            continue
        for fmt in a.format:
            atomic_write_text(out / f"{names[f]}.{fmt}", render(result, fmt, Path(names[f]).name))
    wall = time.perf_counter() - started
    done = len(files) - len(skipped)
    print(
        f"transcribed {done} of {len(files)} files ({audio_seconds:.1f} s of audio) in {wall:.1f} s: real-time "
        f"factor {wall / max(audio_seconds, 1e-9):.4f} "
        f"(model and decoder alone: {compute / max(audio_seconds, 1e-9):.4f})"
        + (f"; skipped {len(skipped)}: {', '.join(map(str, skipped))}" if skipped else "")
        + (f"; wrote {out}" if out else ""),
        file=sys.stderr,
    )
    if not done:
        fail("no file could be transcribed")


if __name__ == "__main__":
    main()
