"""transcribe.py on the mini corpus: a long recording made of test utterances and silences, word
timestamps against the TextGrids, other sample rates and channel counts, the output formats, and
bad input."""

from __future__ import annotations

import argparse
import json
import re

import jiwer
import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio.functional as AF
from test_train import trained_checkpoint

import evaluate
import transcribe
from data.alignments import read_textgrid
from data.features import load_audio, num_frames
from data.manifest import read_manifest

SILENCE = 1.0  # seconds between utterances
MAX_SEGMENT = 8.0
EPOCHS = 40
MODEL = dict(d_model=64, ffn_dim=128, lr=5e-3, warmup_steps=10, hold_steps=1000, decay_steps=100, dropout=0.0)
TOLERANCE = 0.04 + 0.085  # one encoder frame plus its window (data.framing.ENCODER_SHIFT, ENCODER_WINDOW)


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory):
    """A tiny model trained on the test utterances themselves: it recognises most of their words, so
    that word times can be checked against the TextGrids (a tiny model trained on mini-train for
    seconds recognises none)."""
    last = trained_checkpoint(
        prepared, tmp_path_factory, "transcribe", max_epochs=EPOCHS, limit=None, train_sets=["mini-test"], **MODEL
    )
    return last.parent / f"epoch{EPOCHS - 1:03d}.ckpt"  # the last epoch's weights (last.ckpt: the last validation's)


@pytest.fixture(scope="module")
def utterances(prepared):
    return read_manifest(prepared / "manifests" / "mini-test.jsonl")


def run(capsys, *argv) -> tuple[str, str]:
    transcribe.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return captured.out, captured.err


def hypotheses(stdout: str) -> dict[str, str]:
    return {line.split("\t")[0]: line.split("\t")[1] for line in stdout.splitlines()}


@pytest.fixture(scope="module")
def long_recording(utterances, tmp_path_factory):
    """The test utterances one after another with ``SILENCE`` between, longer than ``MAX_SEGMENT``:
    its path and each utterance's offset (seconds)."""
    from analysis.long_recording import concatenate

    assert all(e["duration"] < MAX_SEGMENT for e in utterances)
    path = tmp_path_factory.mktemp("long") / "long.flac"
    used, offsets = concatenate(utterances, path, SILENCE)
    assert len(used) == len(utterances) and offsets[-1] > 2 * MAX_SEGMENT
    return path, offsets


def test_long_recording_segments_and_word_times(ckpt, utterances, long_recording, tmp_path, capsys):
    """The long recording is cut at its pauses only (each utterance in one segment of its own, none
    longer than the maximum); decoding it equals decoding each of its segments alone (batching and
    placing in time lose nothing); and the words of the transcript, aligned as transcribe.py aligns
    its hypotheses, lie in their TextGrid intervals shifted by the utterance's offsets: their
    midpoints, nine in ten within one encoder frame plus its window, none further than twice that
    (the tiny model's alignment drifts), and each inside its segment."""
    path, offsets = long_recording
    run(capsys, "--ckpt", ckpt, path, "--out", tmp_path, "--format", "json", "--max-segment", MAX_SEGMENT)
    result = json.loads((tmp_path / "long.json").read_text())
    segments = result["segments"]
    assert len(segments) == len(utterances) and all(s["end"] - s["start"] <= MAX_SEGMENT for s in segments)
    words = [read_textgrid(u["alignment"]).words for u in utterances]
    for seg, w, o in zip(segments, words, offsets):
        assert seg["start"] <= w[0][0] + o and w[-1][1] + o <= seg["end"], (seg, w[0][0] + o, w[-1][1] + o)
    # each segment alone, as a file of its own
    wave = load_audio(path)
    pieces = tmp_path / "pieces"
    pieces.mkdir()
    for i, seg in enumerate(segments):
        sf.write(
            pieces / f"{i:02d}.wav",
            wave[round(seg["start"] * 16000) : round(seg["end"] * 16000)].numpy(),
            16000,
            subtype="FLOAT",
        )
    alone, _ = run(capsys, "--ckpt", ckpt, pieces)
    alone = list(hypotheses(alone).values())
    assert [s["text"] for s in segments] == alone
    assert result["text"] == " ".join(a for a in alone if a) == " ".join(w["word"] for w in result["words"])
    # word times against the TextGrids, for the reference words themselves: the tiny model's own
    # hypotheses hold too few correct words to judge by (the pipeline is the same: segments, batches,
    # forced alignment, offsets)
    assert [w for ws in words for _, _, w in ws] == " ".join(e["text"] for e in utterances).split()
    a = argparse.Namespace(ckpt=ckpt, tokenizer=None, data_dir=None, device="cpu", engine="torch", dtype="fp32")
    model, tokenizer, _, _, (cmvn, featurizer, framing) = evaluate.open_model(a)
    by_frames = {
        framing.count(num_frames(round((s["end"] - s["start"]) * 16000))): tokenizer.encode(e["text"])
        for s, e in zip(segments, utterances)
    }
    assert len(by_frames) == len(segments)  # the segments' lengths tell them apart

    def oracle(log_probs, lengths):
        return [by_frames[n] for n in lengths.tolist()]

    aligned = transcribe.transcribe_wave(wave, model, tokenizer, cmvn, featurizer, framing, oracle, MAX_SEGMENT)
    reference = [(w, s + o, e + o) for ws, o in zip(words, offsets) for s, e, w in ws]
    assert [w["word"] for w in aligned["words"]] == [w for w, _, _ in reference]
    # a tiny model's CTC spikes drift from the words (measured: 48 of 52 midpoints inside their
    # interval within the tolerance, the worst 0.245 s outside it); the whole span is not checked
    outside = [
        max(0.0, start - (h["start"] + h["end"]) / 2, (h["start"] + h["end"]) / 2 - end)
        for (word, start, end), h in zip(reference, aligned["words"])
    ]
    assert sum(d <= TOLERANCE for d in outside) >= 0.9 * len(outside) and max(outside) <= 2 * TOLERANCE, outside
    for seg, ws in zip(segments, [aligned["words"][sum(map(len, words[:i])) :][: len(w)] for i, w in enumerate(words)]):
        assert all(seg["start"] <= w["start"] < w["end"] <= seg["end"] for w in ws)


def test_word_times_of_a_known_alignment(prepared):
    """Frames known: each piece spikes on its own frames, words placed from their first piece's
    first frame to their last piece's last frame, in seconds (frame k centred at 40 k + 42.5 ms)."""
    from data.framing import LabelFraming
    from data.tokenizer import Tokenizer
    from models.decoding import align_words

    tok = Tokenizer(prepared / "bpe.model")
    text = "THE OLD MAN SAW A DOG"
    ids = tok.encode(text)
    frames, spans = [0] * 5, []  # five frames of blank first
    for word in text.split():
        first = len(frames)
        for t in tok.encode(word):
            frames += [t, t, 0]
        spans.append((word, first, len(frames) - 2))
        frames += [0, 0]
    log_probs = torch.full((len(frames), tok.vocab_size), -20.0)
    log_probs[torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    log_probs = torch.log_softmax(log_probs, -1)
    assert align_words(log_probs, ids, tok.symbols()) == spans
    framing = LabelFraming()
    assert transcribe.frame_seconds(5, 6, framing) == pytest.approx(
        (5 * 0.04 + 0.0425 - 0.02, 6 * 0.04 + 0.0425 + 0.02)
    )


def test_split_at_pauses_cuts_in_silence():
    """Each burst of sound is one segment, the pauses between them left out, and no segment is
    longer than the maximum; sound without a pause is cut at the maximum length."""
    g = torch.Generator().manual_seed(0)
    sr, bursts = 16000, [3.0, 4.0, 2.5, 5.0]
    wave, spans, t = [], [], 0.0
    for b in bursts:
        wave += [0.3 * torch.randn(int(b * sr), generator=g), 1e-3 * torch.randn(int(0.6 * sr), generator=g)]
        spans.append((t, t + b))
        t += b + 0.6
    bounds = transcribe.split_at_pauses(torch.cat(wave), max_segment=8.0)
    assert len(bounds) == len(bursts)
    for (s, e), (a, b) in zip(bounds, spans):
        assert a - 0.2 <= s / sr <= a and b <= e / sr <= b + 0.2, (s / sr, e / sr, a, b)
    speech = 0.3 * torch.randn(20 * sr, generator=g)  # no pause at all: cut at the maximum length
    bounds = transcribe.split_at_pauses(speech, max_segment=8.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == speech.numel() and len(bounds) >= 3
    assert all(e - s <= 8 * sr for s, e in bounds) and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_sample_rates_and_channels(ckpt, utterances, tmp_path, capsys):
    """A stereo copy of an utterance gives the 16 kHz mono hypothesis, a 44.1 kHz one nearly; an 8 kHz copy
    gives the hypothesis of the 16 kHz recording band-limited to 4 kHz (what it holds: the upper
    half of the filterbank is empty at 8 kHz, whatever the resampler)."""
    e = utterances[0]
    wave = load_audio(e["audio"])
    folder = tmp_path / "copies"
    folder.mkdir()
    sf.write(folder / "mono16k.wav", wave.numpy(), 16000, subtype="FLOAT")
    sf.write(folder / "stereo16k.wav", torch.stack([wave, wave], 1).numpy(), 16000, subtype="FLOAT")
    narrow = AF.resample(wave, 16000, 8000)
    sf.write(folder / "mono8000.wav", narrow.numpy(), 8000, subtype="FLOAT")
    sf.write(folder / "band4k16k.wav", AF.resample(narrow, 8000, 16000).numpy(), 16000, subtype="FLOAT")
    sf.write(folder / "mono44100.flac", AF.resample(wave, 16000, 44100).clamp(-1, 1).numpy(), 44100, subtype="PCM_24")
    out, _ = run(capsys, "--ckpt", ckpt, folder)
    hyps = {k.rsplit("/", 1)[-1]: v for k, v in hypotheses(out).items()}
    assert len(hyps) == 5 and hyps["mono16k.wav"]
    # equal by construction: the same samples reach the model (two equal channels averaged; an 8 kHz
    # file resampled by the same function as its 16 kHz twin)
    assert hyps["stereo16k.wav"] == hyps["mono16k.wav"], hyps
    assert hyps["mono8000.wav"] == hyps["band4k16k.wav"], hyps
    # 44.1 kHz: resampled there and back and stored in 24 bits, so not the same samples: the audio the
    # command reads is the 16 kHz recording within resampling error, and the hypothesis is that one's up to
    # a near-tied frame of this tiny model (one CPU's rounding flipped one: CLOCK -> CLOK, AVX2 kernels)
    back = load_audio(folder / "mono44100.flac")
    n = min(len(back), len(wave))
    snr = 10 * torch.log10(wave[:n].pow(2).sum() / (back[:n] - wave[:n]).pow(2).sum())
    assert snr > 30, float(snr)
    assert jiwer.cer(hyps["mono16k.wav"], hyps["mono44100.flac"]) <= 0.2, hyps


def test_formats_parse_back(ckpt, utterances, tmp_path, capsys):
    e = utterances[1]
    out = tmp_path / "out"
    run(capsys, "--ckpt", ckpt, e["audio"], "--out", out, "--format", "txt", "json", "ctm", "srt")
    stem = e["id"]
    result = json.loads((out / f"{stem}.json").read_text())
    assert set(result) == {"text", "duration", "words", "segments"}
    assert result["duration"] == pytest.approx(e["duration"], abs=1e-3)
    assert (out / f"{stem}.txt").read_text() == result["text"] + "\n"
    ctm = [line.split() for line in (out / f"{stem}.ctm").read_text().splitlines()]
    assert [r[4] for r in ctm] == result["text"].split()
    for r, w in zip(ctm, result["words"]):
        assert r[:2] == [stem, "1"] and float(r[2]) == pytest.approx(w["start"], abs=1e-3)
        assert float(r[2]) + float(r[3]) == pytest.approx(w["end"], abs=2e-3)
    srt = (out / f"{stem}.srt").read_text()
    cues = re.findall(r"(\d+)\n(\d\d):(\d\d):(\d\d),(\d{3}) --> (\d\d):(\d\d):(\d\d),(\d{3})\n(.+)\n\n", srt)
    assert len(cues) == srt.count(" --> ")
    assert " ".join(c[-1] for c in cues) == result["text"]
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1))
    for c in cues:
        start = int(c[1]) * 3600 + int(c[2]) * 60 + int(c[3]) + int(c[4]) / 1000
        end = int(c[5]) * 3600 + int(c[6]) * 60 + int(c[7]) + int(c[8]) / 1000
        assert 0 <= start <= end <= result["duration"] + 1e-3


def test_bad_files_skipped_and_empty_folder_refused(ckpt, utterances, tmp_path, capsys):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = folder / "good.flac"
    good.write_bytes(open(utterances[2]["audio"], "rb").read())
    (folder / "broken.flac").write_text("not audio")
    sf.write(folder / "empty.wav", np.zeros(0, np.float32), 16000)
    out, err = run(capsys, "--ckpt", ckpt, folder)
    assert list(hypotheses(out)) == [str(good)]
    assert re.search(r"error: .*broken\.flac: cannot read audio", err) and re.search(
        r"error: .*empty\.wav: .*no samples", err
    )
    assert "transcribed 1 of 3 files" in err
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "notes.txt").write_text("no audio here")
    with pytest.raises(SystemExit, match=r"error: .*none: no audio file"):
        transcribe.main(["--ckpt", str(ckpt), str(tmp_path / "none")])
    with pytest.raises(SystemExit, match=r"error: .*missing\.wav: no such file"):
        transcribe.main(["--ckpt", str(ckpt), str(tmp_path / "missing.wav")])


def test_engines_decoders_and_bad_options(ckpt, utterances, tmp_path, capsys):
    """evaluate.py's engine and decoders through transcribe.py: ONNX Runtime gives PyTorch's
    hypotheses, the beam search runs; a bad option is one error line."""
    pytest.importorskip("onnxruntime")
    files = [e["audio"] for e in utterances[:3]]
    torch_out, _ = run(capsys, "--ckpt", ckpt, *files)
    ort_out, _ = run(capsys, "--ckpt", ckpt, *files, "--engine", "onnxruntime")
    assert hypotheses(ort_out) == hypotheses(torch_out) and any(hypotheses(torch_out).values())
    beam_out, _ = run(capsys, "--ckpt", ckpt, *files, "--decoder", "beam", "--beam-size", "4")
    assert list(hypotheses(beam_out)) == files
    for extra, message in (
        (["--lm-weight", "1"], "error: --lm-weight and --word-score need --lm"),
        (["--max-segment", "0"], "error: --max-segment 0: must be at least 1 second"),
        (["--decoder", "greedy", "--lexicon", "x"], "error: --lexicon and --lm are beam searches"),
        (["--format", "srt"], "error: --format writes files: give --out"),
    ):
        with pytest.raises(SystemExit, match=message) as e:
            transcribe.main(["--ckpt", str(ckpt), *files, *extra])
        assert "\n" not in str(e.value.code)


def test_word_time_errors_against_known_intervals():
    """Matched words only (a substitution is not judged); midpoints inside, within the tolerance or
    not; whole spans within the widened interval; the worst distance; empty input raises."""
    from analysis.long_recording import word_time_errors

    reference = [("A", 0.0, 1.0), ("B", 1.0, 2.0), ("C", 2.0, 3.0), ("D", 3.0, 4.0)]
    words = [
        {"word": "A", "start": 0.2, "end": 0.8},  # inside
        {"word": "X", "start": 1.2, "end": 1.8},  # substituted: not judged
        {"word": "C", "start": 2.9, "end": 3.2},  # midpoint 3.05: 0.05 s out, span 0.2 s out
        {"word": "D", "start": 4.2, "end": 4.6},  # midpoint 4.4: 0.4 s out
    ]
    r = word_time_errors(reference, words, tolerance=0.1)
    assert r["matched"] == 3 and r["worst_s"] == pytest.approx(0.4)
    assert r["midpoint_inside"] == pytest.approx(1 / 3, abs=1e-4)
    assert r["midpoint_within"] == pytest.approx(2 / 3, abs=1e-4)
    assert r["span_within"] == pytest.approx(1 / 3, abs=1e-4)  # C's end 3.2 > 3.0 + 0.1
    assert word_time_errors(reference, words, tolerance=0.25)["span_within"] == pytest.approx(2 / 3, abs=1e-4)
    with pytest.raises(ValueError, match="empty"):
        word_time_errors(reference, [], 0.1)
    with pytest.raises(ValueError, match="no word of the transcript matches"):
        word_time_errors(reference, [{"word": "Z", "start": 0, "end": 1}], 0.1)
