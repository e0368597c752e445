"""TextGrid reading, the 36+1 label collapse, and the centre rule at 10 ms and 40 ms."""

from __future__ import annotations

import pytest

from data.alignments import (
    LABEL_NAMES,
    NUM_LABELS,
    PHONE_CLASSES,
    SILENCE,
    AlignmentError,
    frame_labels,
    phone_class,
    read_textgrid,
    write_textgrid,
)


def test_class_order_matches_spec():
    assert (
        PHONE_CLASSES
        == ("AA AE AW AY AH EH ER EY IY IH O UH UW L R M N NG B D DH G K P T F CH SH TH S Z V JH W Y HH").split()
    )
    assert NUM_LABELS == 37 and SILENCE == 36 and LABEL_NAMES[36] == "sil"


@pytest.mark.parametrize(
    "label,expected",
    [
        ("AA1", "AA"),
        ("AO0", "AA"),
        ("AO", "AA"),
        ("OW1", "O"),
        ("OY2", "O"),
        ("SH", "SH"),
        ("ZH", "SH"),
        ("HH", "HH"),
        ("ER0", "ER"),
        ("iy1", "IY"),
    ],
)
def test_collapse(label, expected):
    assert PHONE_CLASSES[phone_class(label)] == expected


@pytest.mark.parametrize("label", ["", "sil", "sp", "spn", "SIL"])
def test_silence(label):
    assert phone_class(label) == SILENCE


def test_every_arpabet_phone_in_range():
    from data.alignments import ARPABET

    classes = {phone_class(p + s) for p in ARPABET for s in ("", "0", "1", "2")}
    assert classes == set(range(36))


@pytest.mark.parametrize("label", ["XX", "Q", "AA3", "a"])
def test_non_arpabet_rejected(label):
    with pytest.raises(ValueError, match=repr(label).strip("'")):
        phone_class(label)


def test_centre_rule_10ms_and_40ms():
    # [0, 0.05) silence, [0.05, 0.12) AA, [0.12, 0.2) S
    phones = [(0.05, 0.12, phone_class("AA1")), (0.12, 0.20, phone_class("S"))]
    aa, s, sil = PHONE_CLASSES.index("AA"), PHONE_CLASSES.index("S"), SILENCE
    # 10 ms frames, centre k*0.01 + 0.005: frames 0-4 sil, 5-11 AA, 12-19 S, 20-21 sil
    lab10 = frame_labels(phones, 22, 0.01)
    assert lab10.tolist() == [sil] * 5 + [aa] * 7 + [s] * 8 + [sil] * 2
    # 25 ms windows: centre k*0.01 + 0.0125 -> frame 4 (0.0525) is already AA
    lab25 = frame_labels(phones, 22, 0.01, window=0.025)
    assert lab25.tolist() == [sil] * 4 + [aa] * 7 + [s] * 8 + [sil] * 3
    # 40 ms frames, centres 0.02, 0.06, 0.10, 0.14, 0.18, 0.22
    lab40 = frame_labels(phones, 6, 0.04)
    assert lab40.tolist() == [sil, aa, aa, s, s, sil]


def test_centre_on_boundary_goes_to_later_interval():
    phones = [(0.0, 0.02, 0), (0.02, 0.08, 1)]
    assert frame_labels(phones, 2, 0.04).tolist() == [1, 1]


def _write(tmp_path, phones, words=None, duration=1.0):
    path = tmp_path / "u.TextGrid"
    write_textgrid(path, words or [(0.1, 0.5, "HELLO")], phones, duration)
    return path


def test_textgrid_round_trip_and_word_frames(tmp_path):
    path = _write(
        tmp_path,
        [(0.1, 0.2, "HH"), (0.2, 0.3, "AH0"), (0.3, 0.4, "L"), (0.4, 0.5, "OW1")],
        [(0.1, 0.3, "HEL"), (0.3, 0.5, "LO")],
    )
    ali = read_textgrid(path)
    assert [p for _, _, p in ali.phones] == ["HH", "AH0", "L", "OW1"]
    assert ali.duration == pytest.approx(1.0)
    words = ali.word_frames(25, 0.04)
    assert words == [("HEL", [2, 3, 4, 5, 6]), ("LO", [7, 8, 9, 10, 11])]
    labels = ali.frame_labels(25, 0.04)
    assert labels[2].item() == PHONE_CLASSES.index("HH") and labels[0].item() == SILENCE


def test_bad_label_names_file_and_line(tmp_path):
    path = _write(tmp_path, [(0.1, 0.2, "HH"), (0.2, 0.3, "QQ1")])
    with pytest.raises(AlignmentError) as e:
        read_textgrid(path)
    line = next(n for n, l in enumerate(path.read_text().splitlines(), 1) if '"QQ1"' in l)
    assert f"{path}:{line}" in str(e.value) and "QQ1" in str(e.value)


def test_missing_tier_and_missing_file(tmp_path):
    from praatio import textgrid

    tg = textgrid.Textgrid()
    tg.addTier(textgrid.IntervalTier("words", [(0.0, 0.5, "A")], 0, 1))
    tg.save(str(tmp_path / "w.TextGrid"), format="long_textgrid", includeBlankSpaces=True)
    with pytest.raises(AlignmentError, match="no tier named 'phones'"):
        read_textgrid(tmp_path / "w.TextGrid")
    with pytest.raises(AlignmentError, match="no such TextGrid"):
        read_textgrid(tmp_path / "absent.TextGrid")
    (tmp_path / "junk.TextGrid").write_text("not a textgrid")
    with pytest.raises(AlignmentError, match="junk.TextGrid"):
        read_textgrid(tmp_path / "junk.TextGrid")


def test_textgrid_shorter_than_audio(tmp_path):
    ali = read_textgrid(_write(tmp_path, [(0.1, 0.2, "HH")], duration=1.0))
    ali.check_covers(1.02)
    with pytest.raises(AlignmentError, match=r"covers 1.000 s but the audio lasts 2.000 s"):
        ali.check_covers(2.0)


def test_frame_labels_all_in_range(mini_corpus):
    for tg in list((mini_corpus / "alignments").rglob("*.TextGrid"))[:20]:
        ali = read_textgrid(tg)
        labels = ali.frame_labels(int(ali.duration / 0.04), 0.04, 0.085)
        assert labels.min() >= 0 and labels.max() < NUM_LABELS
        assert (labels != SILENCE).any()
