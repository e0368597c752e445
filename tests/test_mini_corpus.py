"""The embedded mini corpus: LibriSpeech layout, MFA-style TextGrids, determinism, held-out text."""

from __future__ import annotations

import re

import soundfile as sf

from data import mini, sentences
from data.alignments import ARPABET, read_textgrid
from data.espeak import to_arpabet


def test_layout_and_content(mini_corpus):
    root = mini_corpus / "LibriSpeech"
    assert sorted(p.name for p in root.iterdir()) == ["mini-dev", "mini-test", "mini-train"]
    for subset in mini.SUBSETS:
        trans_files = list((root / subset).glob("*/*/*.trans.txt"))
        assert trans_files
        for trans in trans_files:
            spk, chapter = trans.parent.parent.name, trans.parent.name
            assert trans.name == f"{spk}-{chapter}.trans.txt"
            for line in trans.read_text().splitlines():
                utt_id, text = line.split(" ", 1)
                assert re.fullmatch(rf"{spk}-{chapter}-\d{{4}}", utt_id)
                assert re.fullmatch(r"[A-Z' ]+", text), text
                flac = trans.parent / f"{utt_id}.flac"
                info = sf.info(str(flac))
                assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
                tg = mini_corpus / "alignments" / subset / spk / f"{utt_id}.TextGrid"
                ali = read_textgrid(tg)
                assert [w for _, _, w in ali.words] == text.split()
                assert abs(ali.duration - info.frames / 16000) < 0.01
                assert all(re.sub(r"[012]$", "", p) in ARPABET for _, _, p in ali.phones)
                # every vowel carries a stress digit, as MFA writes
                assert all(p[-1] in "012" for _, _, p in ali.phones if p[0] in "AEIOU")


def test_textgrid_has_silences_as_empty_intervals(mini_corpus):
    tg = next((mini_corpus / "alignments" / "mini-train").glob("*/*.TextGrid")).read_text()
    assert 'name = "words"' in tg and 'name = "phones"' in tg
    assert 'text = ""' in tg  # leading silence


def test_speakers_disjoint_and_no_test_sentence_in_training(mini_corpus):
    root = mini_corpus / "LibriSpeech"

    def texts_and_speakers(subset):
        lines = [l for t in (root / subset).glob("*/*/*.trans.txt") for l in t.read_text().splitlines()]
        return {l.split(" ", 1)[1] for l in lines}, {p.name for p in (root / subset).iterdir()}

    train_t, train_s = texts_and_speakers("mini-train")
    for held in ("mini-dev", "mini-test"):
        t, s = texts_and_speakers(held)
        assert not t & train_t
        assert not s & train_s


def test_plan_is_deterministic_and_seed_dependent():
    n = {"mini-train": 30, "mini-dev": 5, "mini-test": 5}
    assert mini.plan(n, 3) == mini.plan(n, 3)
    assert mini.plan(n, 3) != mini.plan(n, 4)


def test_generation_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        mini.build(out, train=3, dev=1, test=1, seed=7, jobs=1, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_sentences_distinct_and_excluded():
    test = sentences.generate(50, 1)
    train = sentences.generate(500, 2, exclude=set(test))
    assert len(set(train)) == 500 and not set(train) & set(test)
    assert all(w.lower() in sentences.VOCABULARY for s in train for w in s.split())


def test_to_arpabet_stress_and_errors():
    assert to_arpabet("'aI") == ["AY1"]
    assert to_arpabet(",oU") == ["OW2"]
    assert to_arpabet("@") == ["AH0"]
    assert to_arpabet("tS") == ["CH"]
    assert to_arpabet("'A@") == ["AA1", "R"]
    assert to_arpabet("_") == []
    try:
        to_arpabet("Q!")
    except KeyError as e:
        assert "Q!" in str(e)
    else:
        raise AssertionError("unknown mnemonic accepted")
