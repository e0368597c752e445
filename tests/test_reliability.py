"""No silent wrong numbers, no run lost to one bad utterance (issue 13): text normalisation,
too-short utterances, tokenizer replacement, cut schedules, results that are kept, audio checked
at preparation, early argument checks, one-line errors, and the small things."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from test_train import TINY, _fit

import evaluate
from data.manifest import read_manifest, write_manifest
from data.prepare import prepare
from data.text import normalise, unsupported
from data.tokenizer import Tokenizer
from training.callbacks import default_callbacks
from training.cli import AtomicCheckpointIO, tokenizer_of
from training.module import CTCModule

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    _fit(prepared, root, max_epochs=3, limit=None)
    return root / "checkpoints" / "last.ckpt"


def _corpus_copy(mini_corpus, tmp_path) -> Path:
    root = tmp_path / "corpus"
    shutil.copytree(mini_corpus, root)
    return root


def _trans_files(root: Path, subset: str) -> list[Path]:
    return sorted((root / "LibriSpeech" / subset).glob("*/*/*.trans.txt"))


# --- 1. text normalisation -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello, world!", "HELLO WORLD"),
        ("don't  STOP", "DON'T STOP"),
        ("'quoted' words", "QUOTED WORDS"),
        ("café au lait", "CAFE AU LAIT"),
        ("twenty-one", "TWENTY ONE"),
        ("it\u2019s", "IT'S"),
        ("  A \t b ", "A B"),
        ("ROOM 7", "ROOM 7"),
    ],
)
def test_normalise_rule(raw, expected):
    assert normalise(raw) == expected and normalise(expected) == expected
    assert unsupported(normalise(raw)) == ("7" if "7" in raw else "")


def test_lower_case_punctuated_references_score_like_their_normalised_twin(prepared, ckpt, tmp_path):
    entries = read_manifest(prepared / "manifests" / "mini-test.jsonl")
    messy = [{**e, "text": e["text"].lower().replace(" ", ", ", 1) + "."} for e in entries]
    write_manifest(tmp_path / "clean.jsonl", entries)
    write_manifest(tmp_path / "messy.jsonl", messy)
    evaluate.main(
        [
            "--ckpt",
            str(ckpt),
            "--sets",
            str(tmp_path / "clean.jsonl"),
            str(tmp_path / "messy.jsonl"),
            "--no-beam",
            "--out",
            str(tmp_path / "e"),
        ]
    )
    sets = json.loads((tmp_path / "e" / "results.json").read_text())["sets"]
    drop = lambda r: {k: v for k, v in r.items() if k != "rtf"}  # noqa: E731
    assert drop(sets["messy"]["greedy"]) == drop(sets["clean"]["greedy"])
    refs = lambda n: [l.split("\t")[1] for l in (tmp_path / "e" / f"{n}.hyp.tsv").read_text().splitlines()]  # noqa: E731
    assert refs("messy") == refs("clean")


def test_unspellable_text_is_never_an_unk_target(prepared, tmp_path):
    from data.lexicon import write_lexicon

    tok = Tokenizer(prepared / "bpe.model")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary: 'Ω'"):
        tok.encode("THE Ω")
    with pytest.warns(UserWarning, match="1 words the tokenizer cannot spell"):
        n = write_lexicon(["the", "THE", "Ω", "old, man"], tok, tmp_path / "lex.txt")
    assert n == 3 and (tmp_path / "lex.txt").read_text().split("\n")[0].startswith("MAN ")


def test_prepare_normalises_and_skips_unspellable_transcripts(mini_corpus, tmp_path):
    root = _corpus_copy(mini_corpus, tmp_path)
    trans = _trans_files(root, "mini-train")[0]
    lines = trans.read_text().splitlines()
    first_id = lines[0].split()[0]
    lines[0] = first_id + " " + lines[0].split(" ", 1)[1].lower() + "!"
    lines[1] = lines[1].split()[0] + " ROOM 7 IS HERE"
    trans.write_text("\n".join(lines) + "\n")
    report = prepare(root, tmp_path / "out", vocab_size=40, progress=False)
    assert report["normalised_transcripts"]["mini-train"] == 1
    assert any("outside LibriSpeech's alphabet: '7'" in p for p in report["problems"])
    texts = {e["id"]: e["text"] for e in read_manifest(tmp_path / "out" / "manifests" / "mini-train.jsonl")}
    assert texts[first_id] == normalise(texts[first_id]) and texts[first_id].isupper()


# --- 2. too-short utterances -----------------------------------------------------------------------
def _short_entry(tmp_path, seconds=0.05) -> dict:
    audio = tmp_path / "short.flac"
    sf.write(audio, (np.random.default_rng(0).standard_normal(int(16000 * seconds)) * 0.01).astype("float32"), 16000)
    return {"id": "9-9-9", "audio": str(audio), "duration": seconds, "text": "THE DOG", "num_frames": 3}


def test_prepare_drops_too_short_utterances(mini_corpus, tmp_path):
    root = _corpus_copy(mini_corpus, tmp_path)
    flac = sorted((root / "LibriSpeech" / "mini-test").glob("*/*/*.flac"))[0]
    sf.write(flac, np.zeros(800, dtype="float32"), 16000)  # 0.05 s: 3 fbank frames
    report = prepare(root, tmp_path / "out", vocab_size=40, progress=False)
    assert any(flac.name in p and "too short: 3 frames" in p for p in report["problems"])
    assert flac.stem not in {e["id"] for e in read_manifest(tmp_path / "out" / "manifests" / "mini-test.jsonl")}


def test_training_and_evaluation_survive_a_three_frame_utterance(prepared, ckpt, tmp_path):
    entries = read_manifest(prepared / "manifests" / "mini-train.jsonl")
    write_manifest(tmp_path / "train.jsonl", entries[:6] + [_short_entry(tmp_path)] + entries[6:12])
    from data.datamodule import ASRDataModule

    with pytest.warns(UserWarning, match="1 utterances are too short"):
        dm = ASRDataModule(str(prepared), [str(tmp_path / "train.jsonl")], ["mini-dev"], max_frames=2500, num_workers=0)
        ds = dm.dataset([str(tmp_path / "train.jsonl")], train=True)
    assert "9-9-9" in ds.skipped and len(ds) == 12
    test = read_manifest(prepared / "manifests" / "mini-test.jsonl")
    write_manifest(tmp_path / "test.jsonl", test + [_short_entry(tmp_path)])
    evaluate.main(
        ["--ckpt", str(ckpt), "--sets", str(tmp_path / "test.jsonl"), "--no-beam", "--out", str(tmp_path / "e")]
    )
    res = json.loads((tmp_path / "e" / "results.json").read_text())["sets"]["test"]
    assert res["greedy"]["utterances"] == len(test)
    assert res["skipped"] == [{"id": "9-9-9", "reason": "too short: 3 frames of 10 ms, the model needs >= 7"}]


def test_fit_with_a_three_frame_utterance_trains_to_the_end(prepared, tmp_path, monkeypatch):
    entries = read_manifest(prepared / "manifests" / "mini-train.jsonl")
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    write_manifest(data / "manifests" / "mini-train.jsonl", [_short_entry(tmp_path)] + entries)
    losses, module, trainer = _fit(data, tmp_path / "run", max_epochs=1, limit=None)
    assert trainer.global_step > 0 and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


# --- 3. preparing again into the same folder ----------------------------------------------------------
def test_prepare_refuses_to_orphan_checkpoints(mini_corpus, tmp_path):
    out = tmp_path / "out"
    prepare(mini_corpus, out, vocab_size=40, progress=False)
    before = (out / "bpe.model").read_bytes()
    with pytest.raises(ValueError, match="would no longer evaluate or resume.*--force"):
        prepare(mini_corpus, out, vocab_size=48, progress=False)  # another tokenizer
    assert (out / "bpe.model").read_bytes() == before and not list(out.glob(".staging-*"))
    prepare(mini_corpus, out, vocab_size=40, progress=False)  # the same tokenizer: fine
    prepare(mini_corpus, out, vocab_size=48, progress=False, force=True)
    assert (out / "bpe.model").read_bytes() != before


def test_an_interrupted_preparation_is_refused(prepared, tmp_path):
    from data.datamodule import ASRDataModule

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    (data / ".incomplete").write_text("")
    with pytest.raises(ValueError, match="preparation did not finish"):
        ASRDataModule(str(data), ["mini-train"])


# --- 4. a schedule cut by max_time -----------------------------------------------------------------
def test_cut_schedule_is_reported_saved_and_never_named_an_epoch(prepared, tmp_path, capsys):
    from test_train import Recorder

    from models.checkpoint import checkpoint_paths

    full = Recorder()
    _fit(prepared, tmp_path / "full", max_epochs=3, limit=4, recorder=full)
    _fit(prepared, tmp_path, max_epochs=3, limit=4, stop_at=6)  # stops inside epoch 1
    err = capsys.readouterr().err
    assert "TRAINING CUT SHORT" in err and "step 6 of 12 planned" in err and "after 2 of 4 batches" in err
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "epoch000.ckpt").is_file() and not list(ckpts.glob("epoch001*"))
    assert torch.load(ckpts / "last.ckpt", weights_only=False)["global_step"] == 6  # saved where it stopped
    resumed = Recorder()
    _fit(prepared, tmp_path, max_epochs=3, limit=4, ckpt_path=str(ckpts / "last.ckpt"), recorder=resumed)
    assert resumed.batches == full.batches[6:]  # nothing lost, nothing repeated
    assert resumed.losses == pytest.approx(full.losses[6:], abs=1e-5)
    assert sorted(p.name for p in ckpts.glob("epoch*")) == ["epoch001.ckpt", "epoch002.ckpt"]  # keep_last 2
    shutil.copy(ckpts / "epoch001.ckpt", ckpts / "epoch001-v1.ckpt")  # an older naming's duplicate
    assert [p.name for p in checkpoint_paths(ckpts, 2)] == ["epoch001.ckpt", "epoch002.ckpt"]


def test_max_time_names_itself(prepared, tmp_path, capsys):
    import lightning as L

    from data.datamodule import ASRDataModule

    L.seed_everything(0)
    dm = ASRDataModule(str(prepared), ["mini-train"], ["mini-dev"], max_frames=2500, num_workers=0)
    module = CTCModule(str(prepared / "bpe.model"), **TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=2,
        max_time={"seconds": 0.001},
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=default_callbacks(2),
        default_root_dir=str(tmp_path),
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, dm)
    assert "TRAINING CUT SHORT by max_time: step 1 of" in capsys.readouterr().err


# --- 5. results that are kept -----------------------------------------------------------------------
def test_evaluations_into_one_folder_keep_every_set(prepared, ckpt, tmp_path):
    out = tmp_path / "e"
    evaluate.main(["--ckpt", str(ckpt), "--sets", "mini-test", "--no-beam", "--out", str(out)])
    evaluate.main(["--ckpt", str(ckpt), "--sets", "mini-dev", "--no-beam", "--out", str(out)])
    assert set(json.loads((out / "results.json").read_text())["sets"]) == {"mini-test", "mini-dev"}
    other = ckpt.parent / "epoch001.ckpt"
    with pytest.raises(SystemExit, match="holds results of other checkpoints"):
        evaluate.main(["--ckpt", str(other), "--sets", "mini-dev", "--no-beam", "--out", str(out)])
    evaluate.main(["--ckpt", str(other), "--sets", "mini-dev", "--no-beam"])  # default: one folder per checkpoint
    assert (ckpt.parent.parent / "eval" / "epoch001" / "results.json").is_file()


def test_results_of_earlier_sets_survive_a_failing_set(prepared, ckpt, tmp_path):
    bad = tmp_path / "bad.jsonl"
    write_manifest(bad, [_short_entry(tmp_path)])  # nothing decodable
    with pytest.raises(SystemExit, match="no usable utterance|no utterance could be decoded"):
        evaluate.main(["--ckpt", str(ckpt), "--sets", "mini-test", str(bad), "--no-beam", "--out", str(tmp_path / "e")])


# --- 6. test audio is checked at preparation; skipped utterances are listed ------------------------------
def test_truncated_test_audio_is_caught_at_preparation(mini_corpus, tmp_path):
    root = _corpus_copy(mini_corpus, tmp_path)
    flac = sorted((root / "LibriSpeech" / "mini-test").glob("*/*/*.flac"))[1]
    flac.write_bytes(flac.read_bytes()[: flac.stat().st_size // 3])
    from data.features import AudioError, load_audio

    with pytest.raises(AudioError):  # what evaluation would meet (and skip) later
        load_audio(flac)
    report = prepare(root, tmp_path / "out", vocab_size=40, progress=False)
    ids = {e["id"] for e in read_manifest(tmp_path / "out" / "manifests" / "mini-test.jsonl")}
    assert flac.stem not in ids and any(flac.name in p for p in report["problems"])


def test_evaluation_lists_unreadable_utterances(prepared, ckpt, tmp_path, capsys):
    entries = read_manifest(prepared / "manifests" / "mini-test.jsonl")
    broken = tmp_path / "broken.flac"
    broken.write_bytes(b"not audio at all" * 100)
    write_manifest(tmp_path / "t.jsonl", entries + [{**entries[0], "id": "8-8-8", "audio": str(broken)}])
    evaluate.main(["--ckpt", str(ckpt), "--sets", str(tmp_path / "t.jsonl"), "--no-beam", "--out", str(tmp_path / "e")])
    res = json.loads((tmp_path / "e" / "results.json").read_text())["sets"]["t"]
    assert [s["id"] for s in res["skipped"]] == ["8-8-8"] and "cannot read audio" in res["skipped"][0]["reason"]
    assert "skipped t 8-8-8: " in capsys.readouterr().out


# --- 7. the analysis report checks its arguments first and keeps what it computed ------------------------
def test_report_checks_the_utterance_before_any_work(prepared, ckpt, tmp_path):
    from analysis.report import Report

    r = Report(str(ckpt), "mini-test", str(tmp_path / "r"), utterance="no-such-id", progress=False)
    with pytest.raises(ValueError, match="--utterance no-such-id is not among"):
        r.run()
    assert "attention_pass" not in r.results


def test_report_writes_what_it_computed_when_a_step_fails(prepared, ckpt, tmp_path, monkeypatch):
    from analysis.report import Report

    r = Report(str(ckpt), "mini-test", str(tmp_path / "r"), progress=False)
    monkeypatch.setattr(Report, "step_par", lambda self: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        r.run(["cad", "par"])
    saved = json.loads((tmp_path / "r" / "report.json").read_text())
    assert "cad" in saved and saved["failed_step"] == {"step": "par", "error": "RuntimeError: boom"}


# --- 8. one line naming the file, no traceback -------------------------------------------------------
def _run(args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def _one_error_line(r, *names):
    lines = [l for l in r.stderr.strip().splitlines() if "Warning" not in l and "warn" not in l]
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-1500:]
    assert lines[-1].startswith("error:") or any(l.startswith("error:") for l in lines), r.stderr
    error = next(l for l in lines if l.startswith("error:"))
    for n in names:
        assert str(n) in error, error


def test_bad_inputs_exit_with_one_line(mini_corpus, prepared, ckpt, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[:5000])
    for bad in (text, empty, truncated):
        _one_error_line(_run(["evaluate.py", "--ckpt", str(bad), "--sets", "mini-test"]), bad)
    r = _run(
        [
            "-m",
            "analysis",
            "par",
            "--ckpt",
            str(ckpt),
            "--manifest",
            "mini-test",
            "--out",
            str(tmp_path / "a"),
            "--reference",
            str(text),
        ]
    )
    _one_error_line(r, text)
    assert "attention" not in r.stderr  # refused before the attention pass
    _one_error_line(
        _run(
            [
                "-m",
                "analysis",
                "report",
                "--upstream",
                "tera",
                "--upstream-ckpt",
                str(text),
                "--manifest",
                str(prepared / "manifests" / "mini-test.jsonl"),
                "--out",
                str(tmp_path / "a"),
            ]
        ),
        text,
    )
    _one_error_line(
        _run(["-m", "data.prepare", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]),
        tmp_path / "nowhere",
    )
    _one_error_line(_run(["-m", "data.prepare", "--root", str(mini_corpus), "--out", str(text / "sub")]), text)
    base = [
        "train.py",
        "fit",
        "--config",
        "recipes/mini/base.yaml",
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "t"),
    ]
    _one_error_line(_run(base + ["--data.data_dir", str(tmp_path / "missing")]), tmp_path / "missing")
    moved = tmp_path / "moved"
    shutil.copytree(prepared, moved)
    entries = read_manifest(moved / "manifests" / "mini-train.jsonl")
    write_manifest(moved / "manifests" / "mini-train.jsonl", [{**e, "audio": e["audio"] + ".gone"} for e in entries])
    _one_error_line(_run(base + ["--data.data_dir", str(moved)]), "mini-train.jsonl")


def test_a_full_disk_while_checkpointing_is_one_clear_error(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous")

    def full(obj, f, *a, **k):
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 123 vs 45")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match=r"last.ckpt: cannot write the checkpoint .*disk full"):
        AtomicCheckpointIO().save_checkpoint({"x": 1}, path)
    assert path.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# --- 9. accepted silently before: now warned or skipped -------------------------------------------------
def test_textgrid_longer_than_its_audio_is_skipped(mini_corpus, tmp_path):
    from data.alignments import AlignmentError, read_textgrid

    root = _corpus_copy(mini_corpus, tmp_path)
    tg = sorted((root / "alignments" / "mini-test").rglob("*.TextGrid"))[0]
    grid = read_textgrid(tg)
    with pytest.raises(AlignmentError, match="covers"):
        grid.check_covers(grid.duration / 3)  # a TextGrid of 3x the audio's length: another file's
    grid.check_covers(grid.duration)


def test_alignments_path_typo_is_an_error(mini_corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="--alignments .*no such folder"):
        prepare(mini_corpus, tmp_path / "o", alignments=tmp_path / "alignmnets", vocab_size=40, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no TextGrid found for any utterance"):
        prepare(mini_corpus, tmp_path / "o", alignments=tmp_path / "empty", vocab_size=40, progress=False)


def test_latin1_transcript_line_is_reported(mini_corpus, tmp_path):
    from data import librispeech

    root = _corpus_copy(mini_corpus, tmp_path)
    trans = _trans_files(root, "mini-dev")[0]
    lines = trans.read_bytes().splitlines()
    lines[0] = lines[0] + " CAF\xc9".encode("latin-1")
    trans.write_bytes(b"\n".join(lines) + b"\n")
    entries, problems = librispeech.scan_subset(root, "mini-dev")
    assert any(f"{trans}:1" in str(p) and "not UTF-8" in str(p) for p in problems)
    assert not any("\ufffd" in e["text"] for e in entries)
    assert not any("audio with no transcript line" in str(p) for p in problems)  # the line's audio is not orphaned


# --- 10. small things ----------------------------------------------------------------------------------
def test_killed_checkpoint_temporaries_are_removed_and_files_are_readable(tmp_path):
    from common.io import atomic_write_text

    stale = tmp_path / ".last.ckpt.abc123"
    stale.write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"x": torch.ones(2)}, tmp_path / "last.ckpt")
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert not stale.exists()
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_lexicon_is_replaced_whole_never_rewritten_in_place(prepared, tmp_path):
    """evaluate.py runs sharing an --out folder write OUT/lexicon.txt while another run's beam
    search may be reading it: the file is replaced by a rename, so a reader holding the old one
    reads it whole, never a truncated or mixed file."""
    from data.lexicon import write_lexicon

    tok = Tokenizer(prepared / "bpe.model")
    lexicon = tmp_path / "lexicon.txt"
    write_lexicon(["THE", "OLD", "MAN"], tok, lexicon)
    before = lexicon.read_text()
    with open(lexicon) as reader:  # a concurrent run's decoder, mid-read
        write_lexicon(["THE", "SEA"], tok, lexicon)
        assert reader.read() == before
    assert lexicon.read_text().startswith("SEA ") and not list(tmp_path.glob(".lexicon.txt.*"))


def test_checkpoint_remembers_its_data_folder_resolved(prepared, tmp_path, monkeypatch):
    """Trained with a relative ``--data.data_dir`` (make demo's exp/demo/data), the checkpoint
    names the folder resolved, so evaluate.py --sets finds its manifests from any folder."""
    from models.checkpoint import CheckpointRecord, training_data_dir

    monkeypatch.chdir(prepared.parent)
    module = CTCModule(tokenizer_of(prepared.name), **{k: v for k, v in TINY.items()})
    monkeypatch.chdir(tmp_path)
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)  # what every checkpoint of the module records
    assert training_data_dir(CheckpointRecord.read(checkpoint).info([])) == prepared.resolve()
