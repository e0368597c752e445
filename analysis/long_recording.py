"""A long recording made of a manifest's utterances, transcribed by transcribe.py in fp32 and
bf16: real-time factor, peak memory, WER against its reference and, where the manifest has
alignments, how well the word times fall in the words' TextGrid intervals.

    python -m analysis.long_recording --ckpt exp/demo/train/checkpoints/last.ckpt \\
        --manifest exp/demo/data/manifests/mini-test.jsonl --minutes 10 --out exp/long10

writes ``OUT/long.flac`` (utterances in manifest order, ``--silence`` seconds apart, up to
``--minutes``), ``OUT/reference.txt``, ``OUT/<dtype>/long.json`` (transcribe.py's) and
``OUT/results.json``, and prints the table. Each precision runs in a process of its own (its peak
resident memory is the process's ``ru_maxrss``); the real-time factor is wall time over audio
time, model loading included.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from common.cli import add_ckpt, add_out, user_errors
from data.framing import ENCODER_SHIFT, ENCODER_WINDOW

ROOT = Path(__file__).resolve().parents[1]


def concatenate(
    entries: list[dict], path: str | Path, silence: float = 1.0, max_seconds: float | None = None
) -> tuple[list[dict], list[float]]:
    """Writes the utterances of ``entries`` (manifest entries) one after another, ``silence``
    seconds of faint noise apart, as a 16 kHz FLAC at ``path``, stopping before ``max_seconds``; returns the
    entries used and each one's offset (seconds)."""
    import soundfile as sf

    from data.features import SAMPLE_RATE, load_audio

    pieces, used, offsets, samples = [], [], [], 0
    # a pause holds the quiet noise of a room (as the mini corpus's utterances do), not digital zeros
    gap = 1e-3 * torch.randn(int(silence * SAMPLE_RATE), generator=torch.Generator().manual_seed(0))
    for e in entries:
        wave = load_audio(e["audio"])
        if max_seconds is not None and (samples + wave.numel()) / SAMPLE_RATE > max_seconds:
            break
        used.append(e)
        offsets.append(samples / SAMPLE_RATE)
        pieces += [wave, gap]
        samples += wave.numel() + gap.numel()
    if not pieces:
        raise ValueError("no utterance to concatenate")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), torch.cat(pieces).clamp(-1, 1).numpy(), SAMPLE_RATE, subtype="PCM_16")
    return used, offsets


def word_time_errors(reference: list[tuple[str, float, float]], words: list[dict], tolerance: float) -> dict:
    """Word times of a transcript (``words``: ``{"word", "start", "end"}`` in seconds, as transcribe.py
    writes them) against the reference's intervals ``(word, start, end)``: the words jiwer's alignment
    pairs as equal are compared; for each, the distance of its midpoint from its reference interval (0
    inside). Returns ``matched`` (how many), ``midpoint_inside`` and ``midpoint_within`` (fractions with
    the midpoint inside the interval, and within ``tolerance`` seconds of it), ``span_within`` (the
    fraction whose whole ``[start, end]`` lies in the interval widened by ``tolerance`` on each side),
    ``worst_s`` (the largest midpoint distance) and ``tolerance_s``."""
    import jiwer

    if not reference or not words:
        raise ValueError("word times: an empty reference or transcript")
    out = jiwer.process_words(" ".join(w for w, _, _ in reference), " ".join(w["word"] for w in words))
    pairs = [
        (reference[i], words[j])
        for chunk in out.alignments[0]
        if chunk.type == "equal"
        for i, j in zip(range(chunk.ref_start_idx, chunk.ref_end_idx), range(chunk.hyp_start_idx, chunk.hyp_end_idx))
    ]
    if not pairs:
        raise ValueError("word times: no word of the transcript matches the reference")
    dist = [max(0.0, s - (h["start"] + h["end"]) / 2, (h["start"] + h["end"]) / 2 - e) for (_, s, e), h in pairs]
    spans = [s - tolerance <= h["start"] and h["end"] <= e + tolerance for (_, s, e), h in pairs]
    n = len(pairs)
    return {
        "matched": n,
        "midpoint_inside": round(sum(d == 0 for d in dist) / n, 4),
        "midpoint_within": round(sum(d <= tolerance for d in dist) / n, 4),
        "span_within": round(sum(spans) / n, 4),
        "worst_s": round(max(dist), 3),
        "tolerance_s": tolerance,
    }


def reference_words(used: list[dict], offsets: list[float]) -> list[tuple[str, float, float]] | None:
    """The words of the recording with their TextGrid intervals shifted by each utterance's offset, or
    None where an utterance has no alignment."""
    from data.alignments import read_textgrid

    if not all(e.get("alignment") for e in used):
        return None
    return [(w, s + o, e + o) for u, o in zip(used, offsets) for s, e, w in read_textgrid(u["alignment"]).words]


def run_transcribe(args: list[str]) -> tuple[float, int]:
    """Runs transcribe.py in a process of its own; its wall time (seconds) and peak resident memory (bytes)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(ROOT / "transcribe.py"), *args], cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"transcribe.py {' '.join(args)} failed (exit status {proc.returncode})")
    return wall, usage.ru_maxrss * 1024  # kilobytes on Linux


def main(argv: list[str] | None = None) -> None:
    from data.manifest import read_manifest
    from models.inference import score

    p = argparse.ArgumentParser(prog="python -m analysis.long_recording", description=__doc__.split("\n\n")[0])
    add_ckpt(p, help="checkpoint of train.py, as transcribe.py takes it")
    p.add_argument("--manifest", required=True, help="manifest (.jsonl) whose utterances make the recording")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--silence", type=float, default=1.0, help="seconds between utterances")
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    add_out(p, help="output folder (long.flac, reference.txt, <dtype>/long.json, results.json)")
    p.add_argument("--max-segment", type=float, default=20.0)
    p.add_argument(
        "--tolerance",
        type=float,
        default=round(ENCODER_SHIFT + ENCODER_WINDOW, 3),
        help="seconds a word time may lie outside its TextGrid interval (default: one encoder frame plus its window)",
    )
    a = p.parse_args(argv)
    out = Path(a.out)
    with user_errors():
        entries = read_manifest(a.manifest)
        used, offsets = concatenate(entries, out / "long.flac", a.silence, a.minutes * 60)
        timed = reference_words(used, offsets)
    reference = " ".join(e["text"] for e in used)
    (out / "reference.txt").write_text(reference + "\n")
    rows = []
    for dtype in a.dtypes:
        wall, peak = run_transcribe(
            [
                "--ckpt",
                a.ckpt,
                str(out / "long.flac"),
                "--out",
                str(out / dtype),
                "--format",
                "json",
                "--dtype",
                dtype,
                "--max-segment",
                str(a.max_segment),
            ]
        )
        result = json.loads((out / dtype / "long.json").read_text())
        rows.append(
            {
                "dtype": dtype,
                "audio_s": result["duration"],
                "wall_s": round(wall, 2),
                "rtf": round(wall / result["duration"], 4),
                "peak_rss_mib": round(peak / 2**20, 1),
                "segments": len(result["segments"]),
                **score([reference], [result["text"]]),
                "word_times": None if timed is None else word_time_errors(timed, result["words"], a.tolerance),
            }
        )
    (out / "results.json").write_text(
        json.dumps(
            {
                "ckpt": a.ckpt,
                "manifest": a.manifest,
                "utterances": len(used),
                "threads": torch.get_num_threads(),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"{'dtype':6s} {'audio s':>8s} {'wall s':>8s} {'RTF':>7s} {'peak MiB':>9s} {'WER%':>7s} {'in time%':>9s}")
    for r in rows:
        in_time = "-" if r["word_times"] is None else f"{100 * r['word_times']['span_within']:.1f}"
        print(
            f"{r['dtype']:6s} {r['audio_s']:8.1f} {r['wall_s']:8.1f} {r['rtf']:7.4f} "
            f"{r['peak_rss_mib']:9.1f} {r['wer']:7.2f} {in_time:>9s}"
        )
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
