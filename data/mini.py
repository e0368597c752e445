"""Embedded mini corpus: synthetic English speech in exactly LibriSpeech's layout.

    python -m data.mini OUT_DIR [--train N] [--dev N] [--test N] [--seed S] [--jobs J]

writes::

    OUT_DIR/LibriSpeech/mini-{train,dev,test}/<spk>/<chapter>/<spk>-<chapter>-<utt>.flac   16 kHz mono
    OUT_DIR/LibriSpeech/mini-*/<spk>/<chapter>/<spk>-<chapter>.trans.txt                   upper case
    OUT_DIR/alignments/mini-*/<spk>/<spk>-<chapter>-<utt>.TextGrid                         MFA-style

The TextGrids have a ``words`` and a ``phones`` tier (ARPAbet with stress digits, silences as
empty intervals), made from espeak-ng's own phoneme timings, so they are exact, not estimated.
A "speaker" is an espeak voice (accent + variant) with its own speaking rate and pitch; the
speakers of the three subsets are disjoint, and no test or dev sentence occurs in training.
The output is deterministic for a seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing as mp
import random
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from common.cli import user_errors
from data import sentences

SAMPLE_RATE = 16000
SUBSETS = ("mini-train", "mini-dev", "mini-test")
ACCENTS = ("en-us", "en-us-nyc", "en", "en-gb-x-rp", "en-029")
VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m6", "m7", "f1", "f2", "f3", "f4", "f5")
UTTS_PER_CHAPTER = 40


@dataclasses.dataclass(frozen=True)
class Speaker:
    id: int
    voice: str  # espeak voice name, accent[+variant]
    rate: int  # words per minute
    pitch: int  # 0..100


@dataclasses.dataclass(frozen=True)
class Job:
    subset: str
    speaker: Speaker
    chapter: int
    index: int
    text: str

    @property
    def utt_id(self) -> str:
        return f"{self.speaker.id}-{self.chapter}-{self.index:04d}"


def make_speakers(counts: dict[str, int], seed: int) -> dict[str, list[Speaker]]:
    """Disjoint speakers per subset: each a distinct (voice, rate, pitch) combination."""
    rng = random.Random(seed)
    used: set[tuple[str, int, int]] = set()
    out: dict[str, list[Speaker]] = {}
    next_id = 100
    for subset, n in counts.items():
        out[subset] = []
        while len(out[subset]) < n:
            variant = rng.choice(VARIANTS)
            voice = rng.choice(ACCENTS) + (f"+{variant}" if variant else "")
            key = (voice, rng.randrange(140, 200, 5), rng.randrange(35, 80, 5))
            if key in used:
                continue
            used.add(key)
            out[subset].append(Speaker(next_id, *key))
            next_id += 7 + rng.randrange(50)
    return out


def plan(num: dict[str, int], seed: int) -> list[Job]:
    """Every utterance to synthesise: speaker, chapter, index and text, deterministic for ``seed``."""
    # Held-out text first, so that training never sees a test or dev sentence.
    test = sentences.generate(num["mini-test"], seed + 3)
    dev = sentences.generate(num["mini-dev"], seed + 2, exclude=set(test))
    train = sentences.generate(num["mini-train"], seed + 1, exclude=set(test) | set(dev))
    texts = {"mini-train": train, "mini-dev": dev, "mini-test": test}
    n_speakers = {s: max(1, min(len(texts[s]), round(len(texts[s]) ** 0.5 * 1.1))) for s in SUBSETS}
    speakers = make_speakers(n_speakers, seed)
    jobs = []
    for subset in SUBSETS:
        counters: dict[int, int] = {}
        for k, text in enumerate(texts[subset]):
            spk = speakers[subset][k % len(speakers[subset])]
            n = counters.get(spk.id, 0)
            counters[spk.id] = n + 1
            chapter = spk.id * 100 + n // UTTS_PER_CHAPTER
            jobs.append(Job(subset, spk, chapter, n % UTTS_PER_CHAPTER, text))
    return jobs


_SYNTH = None


def _synthesise(job: Job, out_dir: str) -> tuple[Job, float, str | None]:
    """Synthesise one utterance and write its FLAC and TextGrid. Returns (job, seconds, error)."""
    import soundfile as sf
    import torch
    import torchaudio.functional as AF

    from data.alignments import write_textgrid
    from data.espeak import Synthesizer, to_arpabet

    global _SYNTH
    if _SYNTH is None:  # one synthesiser per worker process
        torch.set_num_threads(1)
        _SYNTH = Synthesizer()
    spk = job.speaker
    _SYNTH.set_voice(spk.voice, rate=spk.rate, pitch=spk.pitch)
    out = _SYNTH.synthesize(job.text.lower())
    try:
        phones = []
        for start, end, name in out.phones:
            arpa = to_arpabet(name)
            step = (end - start) / len(arpa) if arpa else 0
            phones += [(start + i * step, start + (i + 1) * step, p) for i, p in enumerate(arpa)]
    except KeyError as e:
        return job, 0.0, f"{job.utt_id} ({spk.voice}): {e.args[0]}"
    if len(out.words) != len(job.text.split()):
        return job, 0.0, f"{job.utt_id} ({spk.voice}): espeak reported {len(out.words)} words for {job.text!r}"

    rng = np.random.default_rng(zlib.crc32(job.utt_id.encode()))
    wav = torch.from_numpy(out.audio.astype(np.float32) / 32768.0)
    wav = AF.resample(wav, out.sample_rate, SAMPLE_RATE).numpy()
    lead, tail = rng.uniform(0.1, 0.35), rng.uniform(0.1, 0.35)
    wav = np.concatenate(
        [np.zeros(int(lead * SAMPLE_RATE), np.float32), wav, np.zeros(int(tail * SAMPLE_RATE), np.float32)]
    )
    wav = wav / max(1e-3, float(np.abs(wav).max())) * rng.uniform(0.3, 0.8)
    wav = wav + rng.normal(0.0, 10 ** rng.uniform(-3.8, -3.0), wav.shape).astype(np.float32)  # room noise
    wav = np.clip(wav, -1.0, 1.0)
    duration = len(wav) / SAMPLE_RATE

    chapter_dir = Path(out_dir, "LibriSpeech", job.subset, str(spk.id), str(job.chapter))
    chapter_dir.mkdir(parents=True, exist_ok=True)
    sf.write(chapter_dir / f"{job.utt_id}.flac", wav, SAMPLE_RATE, subtype="PCM_16")
    words = [(s + lead, e + lead, w.upper()) for s, e, w in out.words]
    phones = [(s + lead, e + lead, p) for s, e, p in phones]
    write_textgrid(
        Path(out_dir, "alignments", job.subset, str(spk.id), f"{job.utt_id}.TextGrid"), words, phones, duration
    )
    return job, duration, None


CHUNK = 100  # utterances per worker process


def _synthesise_chunk(chunk: list[Job], out_dir: str) -> list[tuple[Job, float, str | None]]:
    return [_synthesise(job, out_dir) for job in chunk]


def _star(args):
    return _synthesise_chunk(*args)


def build(
    out_dir: str | Path,
    train: int = 6000,
    dev: int = 300,
    test: int = 300,
    seed: int = 0,
    jobs: int = 2,
    progress: bool = True,
) -> dict:
    """Generate the corpus under ``out_dir``; returns a summary (counts, hours, failures, seconds).

    espeak-ng keeps hidden state between utterances (its pitch flutter runs on), so each fixed
    chunk of utterances is synthesised by a fresh process that loads the library anew: the output
    is the same whatever the number of processes.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    todo = plan({"mini-train": train, "mini-dev": dev, "mini-test": test}, seed)
    done: dict[str, list[Job]] = {s: [] for s in SUBSETS}
    seconds = {s: 0.0 for s in SUBSETS}
    failures: list[str] = []
    chunks = [(todo[i : i + CHUNK], str(out_dir)) for i in range(0, len(todo), CHUNK)]
    ctx = mp.get_context("forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload(
            ["data.espeak", "data.alignments", "numpy", "torch", "torchaudio", "soundfile", "praatio.textgrid"]
        )
    with (
        ctx.Pool(max(1, jobs), maxtasksperchild=1) as pool,
        tqdm(total=len(todo), desc="synthesising", unit="utt", disable=not progress) as bar,
    ):
        for results in pool.imap(_star, chunks):
            for job, dur, err in results:
                if err:
                    failures.append(err)
                    continue
                done[job.subset].append(job)
                seconds[job.subset] += dur
            bar.update(len(results))
    for subset, items in done.items():
        by_chapter: dict[tuple[int, int], list[Job]] = {}
        for job in items:
            by_chapter.setdefault((job.speaker.id, job.chapter), []).append(job)
        for (spk, chapter), chapter_jobs in by_chapter.items():
            lines = [f"{j.utt_id} {j.text}\n" for j in sorted(chapter_jobs, key=lambda j: j.index)]
            path = out_dir / "LibriSpeech" / subset / str(spk) / str(chapter) / f"{spk}-{chapter}.trans.txt"
            path.write_text("".join(lines))
    for f in failures:
        print(f"skipped {f}", file=sys.stderr)
    return {
        "utterances": {s: len(v) for s, v in done.items()},
        "hours": {s: round(v / 3600, 3) for s, v in seconds.items()},
        "speakers": {s: len({j.speaker.id for j in v}) for s, v in done.items()},
        "failures": failures,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m data.mini", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--train", type=int, default=6000, help="training utterances (default 6000)")
    p.add_argument("--dev", type=int, default=300)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=min(2, mp.cpu_count()), help="synthesis processes")
    a = p.parse_args(argv)
    if min(a.train, a.dev, a.test) < 1:
        p.error("--train, --dev and --test must each be at least 1")
    with user_errors():
        summary = build(a.out_dir, a.train, a.dev, a.test, a.seed, a.jobs)
    for s in SUBSETS:
        print(
            f"{s:11s} {summary['utterances'][s]:6d} utterances  {summary['hours'][s]:6.3f} h  "
            f"{summary['speakers'][s]:3d} speakers"
        )
    print(
        f"skipped {len(summary['failures'])}; took {summary['seconds']} s; "
        f"wrote {Path(a.out_dir) / 'LibriSpeech'} and {Path(a.out_dir) / 'alignments'}"
    )


if __name__ == "__main__":
    main()
