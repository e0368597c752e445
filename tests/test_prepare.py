"""LibriSpeech scanning and preparation: manifests, BPE, CMVN, alignments, and every bad input."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf

from data import librispeech
from data.alignments import write_textgrid
from data.manifest import read_manifest
from data.prepare import prepare
from data.tokenizer import BLANK, Tokenizer


def test_manifest_round_trip(mini_corpus, prepared):
    for subset in ("mini-train", "mini-dev", "mini-test"):
        entries = read_manifest(prepared / "manifests" / f"{subset}.jsonl")
        scanned, problems = librispeech.scan_subset(mini_corpus, subset)
        assert not problems
        assert [e["id"] for e in entries] == [e["id"] for e in scanned]
        for e in entries:
            info = sf.info(e["audio"])
            assert e["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
            assert e["speaker"] == e["id"].split("-")[0] and e["chapter"] == e["id"].split("-")[1]
            assert e["num_frames"] == 1 + (info.frames - 400) // 160
            assert e["alignment"].endswith(f"{e['id']}.TextGrid")
            trans = (
                mini_corpus
                / "LibriSpeech"
                / subset
                / e["speaker"]
                / e["chapter"]
                / f"{e['speaker']}-{e['chapter']}.trans.txt"
            )
            assert f"{e['id']} {e['text']}" in trans.read_text().splitlines()
    report = json.loads((prepared / "report.json").read_text())
    assert report["skipped"] == 0 and report["train_subsets"] == ["mini-train"]


def test_tokenizer_round_trip(prepared):
    tok = Tokenizer(prepared / "bpe.model")
    assert tok.vocab_size == 65  # 64 pieces + blank
    text = read_manifest(prepared / "manifests" / "mini-test.jsonl")[0]["text"]
    ids = tok.encode(text)
    assert BLANK not in ids and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    assert tok.pieces()[0] == "<blk>" and len(tok.pieces()) == tok.vocab_size


def test_cmvn_normalises_training_features(prepared):
    import torch

    from data.features import GlobalCMVN, fbank, load_audio

    cmvn = GlobalCMVN.load(prepared / "cmvn.json")
    feats = torch.cat(
        [fbank(load_audio(e["audio"])) for e in read_manifest(prepared / "manifests" / "mini-train.jsonl")]
    )
    normed = cmvn(feats)
    assert normed.mean(0).abs().max() < 1e-3
    assert (normed.std(0) - 1).abs().max() < 1e-2


def _copy_corpus(mini_corpus, tmp_path):
    root = tmp_path / "corpus"
    shutil.copytree(mini_corpus, root)
    return root, root / "LibriSpeech" / "mini-train"


def test_bad_inputs_reported_skipped_and_counted(mini_corpus, tmp_path):
    root, train = _copy_corpus(mini_corpus, tmp_path)
    trans = max(train.glob("*/*/*.trans.txt"), key=lambda t: len(t.read_text().splitlines()))
    lines = trans.read_text().splitlines()
    ids = [l.split(" ", 1)[0] for l in lines]
    chapter = trans.parent
    # 1: unreadable audio; 2: missing audio; 3: empty transcript; 4: audio with no transcript line
    (chapter / f"{ids[0]}.flac").write_bytes(b"not a flac file")
    (chapter / f"{ids[1]}.flac").unlink()
    lines[2] = ids[2]
    spare = ids[0].rsplit("-", 1)[0] + "-9999"
    sf.write(chapter / f"{spare}.flac", np.zeros(16000, np.float32), 16000)
    trans.write_text("\n".join(lines) + "\n")
    # 5: TextGrid shorter than the audio; 6: a phone label outside ARPAbet
    spk = ids[3].split("-")[0]
    write_textgrid(
        root / "alignments" / "mini-train" / spk / f"{ids[3]}.TextGrid", [(0.1, 0.2, "A")], [(0.1, 0.2, "AH0")], 0.3
    )
    write_textgrid(
        root / "alignments" / "mini-train" / spk / f"{ids[4]}.TextGrid", [(0.1, 0.2, "A")], [(0.1, 0.2, "XY1")], 60.0
    )

    report = prepare(root, tmp_path / "out", alignments=root / "alignments", vocab_size=64, progress=False)
    problems = report["problems"]
    assert report["skipped"] == 6, problems
    expect = [
        (f"{ids[0]}.flac", "cannot read audio"),
        ("", f"no audio file {ids[1]}.flac"),
        (f"{trans}:3", f"empty transcript for {ids[2]}"),
        (f"{spare}.flac", "audio with no transcript line"),
        (f"{ids[3]}.TextGrid", "TextGrid covers 0.300 s but the audio lasts"),
        (f"{ids[4]}.TextGrid:", "'XY1' is not ARPAbet"),
    ]
    for where, what in expect:
        assert any(where in p and what in p for p in problems), (where, what, problems)
    kept = {e["id"] for e in read_manifest(tmp_path / "out" / "manifests" / "mini-train.jsonl")}
    assert not kept & set(ids[:5]) and set(ids[5:]) <= kept
    before = len(read_manifest(tmp_path / "out" / "manifests" / "mini-dev.jsonl"))
    assert report["subsets"]["mini-dev"]["utterances"] == before


def test_unreadable_audio_names_file(tmp_path):
    from data.features import AudioError, load_audio

    bad = tmp_path / "x.flac"
    bad.write_bytes(b"junk")
    with pytest.raises(AudioError, match="x.flac"):
        load_audio(bad)
    with pytest.raises(AudioError, match="absent.flac"):
        load_audio(tmp_path / "absent.flac")


def test_no_half_manifest_on_failure(prepared, tmp_path, monkeypatch):
    from data import manifest as prep

    out = tmp_path / "out"
    shutil.copytree(prepared, out)
    before = (out / "manifests" / "mini-dev.jsonl").read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt  # interrupted between writing the temporary file and the rename

    monkeypatch.setattr("common.io.os.replace", boom)
    with pytest.raises(KeyboardInterrupt):
        prep.write_manifest(out / "manifests" / "mini-dev.jsonl", [{"id": "x"}])
    assert (out / "manifests" / "mini-dev.jsonl").read_text() == before
    assert not [p for p in (out / "manifests").iterdir() if p.name.startswith(".")]


def test_malformed_manifest_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"id": "a", "audio": "a.flac", "duration": 1.0, "text": "A"}\n{broken\n')
    with pytest.raises(ValueError, match=r"m.jsonl:2: not a JSON object"):
        read_manifest(m)
    m.write_text('{"id": "a"}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1: manifest entry lacks audio, duration, text"):
        read_manifest(m)


def test_no_training_subset(mini_corpus, tmp_path):
    with pytest.raises(ValueError, match="no training subset"):
        prepare(mini_corpus, tmp_path / "o", subsets=["mini-dev"], progress=False)
    with pytest.raises(FileNotFoundError, match="no such LibriSpeech root"):
        prepare(tmp_path / "absent", tmp_path / "o", progress=False)


# --- download helper, against local URLs only ------------------------------------------------


def _tarball(tmp_path, subset="dev-clean"):
    import tarfile

    src = tmp_path / "src" / "LibriSpeech" / subset / "1" / "2"
    src.mkdir(parents=True)
    (src / "1-2.trans.txt").write_text("1-2-0000 HELLO\n")
    sf.write(src / "1-2-0000.flac", np.zeros(8000, np.float32), 16000)
    archive = tmp_path / "srv" / f"{subset}.tar.gz"
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "LibriSpeech", arcname="LibriSpeech")
    return archive


def test_download_file_url_checksum_and_extract(tmp_path):
    archive = _tarball(tmp_path)
    digest = librispeech.sha256sum(archive)
    out = librispeech.download(
        "dev-clean", tmp_path / "dl", base_url=archive.parent.as_uri(), sha256=digest, progress=False
    )
    assert (out / "1" / "2" / "1-2-0000.flac").is_file()
    assert librispeech.list_subsets(tmp_path / "dl") == ["dev-clean"]
    with pytest.raises(ValueError, match="checksum mismatch"):
        librispeech.download_file(archive.as_uri(), tmp_path / "dl2" / "x.tar.gz", sha256="0" * 64, progress=False)
    assert not (tmp_path / "dl2" / "x.tar.gz.part").exists()
    with pytest.raises(ValueError, match="unknown LibriSpeech subset"):
        librispeech.download("train-clean-999", tmp_path)


def test_download_resumes_with_range(tmp_path):
    from tests.range_server import RangeServer

    archive = _tarball(tmp_path)
    data = archive.read_bytes()
    dest = tmp_path / "dl" / "dev-clean.tar.gz"
    dest.parent.mkdir()
    dest.with_name("dev-clean.tar.gz.part").write_bytes(data[:100])
    with RangeServer(archive.parent) as server:
        librispeech.download_file(
            f"{server.url}/{archive.name}", dest, sha256=librispeech.sha256sum(archive), progress=False
        )
    seen = [rng for _, rng in server.seen]
    assert seen == ["bytes=100-"]
    assert dest.read_bytes() == data


@pytest.mark.parametrize("checksum", [True, False])
def test_download_recovers_from_a_complete_or_overlong_part(tmp_path, checksum):
    """A kill during the hash check or the rename leaves a complete ``.part``: the next run finishes
    it (the server answers 416 to a range past the end) instead of failing every time; a ``.part``
    longer than the file (another version of it) is downloaded again from the start."""
    from tests.range_server import RangeServer

    archive = _tarball(tmp_path)
    data = archive.read_bytes()
    digest = librispeech.sha256sum(archive) if checksum else None
    for name, part in (("complete", data), ("overlong", data + b"stale tail")):
        dest = tmp_path / name / "dev-clean.tar.gz"
        dest.parent.mkdir()
        dest.with_name("dev-clean.tar.gz.part").write_bytes(part)
        with RangeServer(archive.parent) as server:
            librispeech.download_file(f"{server.url}/{archive.name}", dest, sha256=digest, progress=False)
        assert dest.read_bytes() == data and not dest.with_name("dev-clean.tar.gz.part").exists()


def test_resolve_manifest_and_training_transcripts(prepared, tmp_path):
    from data.manifest import resolve_manifest, training_transcripts
    from data.text import normalise

    assert resolve_manifest("mini-dev", prepared) == prepared / "manifests" / "mini-dev.jsonl"
    path = prepared / "manifests" / "mini-test.jsonl"
    assert resolve_manifest(str(path)) == path and resolve_manifest(path, tmp_path) == path  # a path wins
    with pytest.raises(FileNotFoundError, match=r"manifests/nope.jsonl does not exist \(hint\)$"):
        resolve_manifest("nope", prepared, " (hint)")
    with pytest.raises(FileNotFoundError, match="gone.jsonl does not exist"):
        resolve_manifest(tmp_path / "gone.jsonl", prepared)
    with pytest.raises(ValueError, match="'mini-dev': give a .jsonl path, or --data-dir"):
        resolve_manifest("mini-dev")
    sentences, manifests = training_transcripts(prepared)
    assert manifests == [prepared / "manifests" / "mini-train.jsonl"]
    assert sentences == [normalise(e["text"]) for e in read_manifest(manifests[0])] and all(sentences)
    with pytest.raises(FileNotFoundError, match="no \\*train\\*.jsonl manifest under"):
        training_transcripts(tmp_path)
