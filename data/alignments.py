"""Phone and word alignments in Montreal Forced Aligner's TextGrid form, and frame labels.

MFA writes one TextGrid per utterance with a ``words`` and a ``phones`` tier; phones are ARPAbet
with stress digits, silences are empty intervals (or ``sil`` / ``sp`` / ``spn``). As in the
phonetic analysis of Shim, Choi and Sung (ICLR 2022), stress digits are stripped and AA+AO, OW+OY, SH+ZH are
merged, giving the 36
classes of :data:`PHONE_CLASSES` (indices 0..35) plus silence (:data:`SILENCE`, index 36).
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

PHONE_CLASSES = ("AA AE AW AY AH EH ER EY IY IH O UH UW L R M N NG B D DH G K P T F CH SH TH S Z V JH W Y HH").split()
NUM_PHONES = len(PHONE_CLASSES)  # 36
SILENCE = NUM_PHONES  # index 36
NUM_LABELS = NUM_PHONES + 1  # 37, the probe's outputs
LABEL_NAMES = PHONE_CLASSES + ["sil"]

ARPABET = set(
    "AA AE AH AO AW AY B CH D DH EH ER EY F G HH IH IY JH K L M N NG OW OY P R S SH T TH UH UW V W Y Z ZH".split()
)
SILENCE_LABELS = {"", "sil", "sp", "spn", "<eps>"}
_MERGE = {"AO": "AA", "OW": "O", "OY": "O", "ZH": "SH"}
_INDEX = {p: i for i, p in enumerate(PHONE_CLASSES)}

Interval = tuple[float, float, str]


class AlignmentError(ValueError):
    """A TextGrid that cannot be used; the message names the file (and line where known)."""


def phone_class(label: str) -> int:
    """Class index (0..35) of an ARPAbet phone with or without stress digit; 36 for silence.

    Raises ``ValueError`` naming the label when it is neither ARPAbet nor a silence mark.
    """
    if label.strip().lower() in SILENCE_LABELS:
        return SILENCE
    base = re.sub(r"[012]$", "", label.strip().upper())
    if base not in ARPABET:
        raise ValueError(f"phone label {label!r} is not ARPAbet (expected e.g. AA1, ZH, or sil/sp/spn)")
    return _INDEX[_MERGE.get(base, base)]


@dataclasses.dataclass
class Alignment:
    """One utterance's alignment: non-empty word and phone intervals, in seconds."""

    words: list[Interval]
    phones: list[Interval]
    duration: float  # the TextGrid's end time
    path: str = ""

    def phone_classes(self) -> list[tuple[float, float, int]]:
        return [(s, e, phone_class(p)) for s, e, p in self.phones]

    def frame_labels(self, num_frames: int, frame_shift: float, window: float | None = None) -> torch.Tensor:
        """Labels (``num_frames``,) of frames by the centre rule; see :func:`frame_labels`."""
        return frame_labels(self.phone_classes(), num_frames, frame_shift, window)

    def word_frames(
        self, num_frames: int, frame_shift: float, window: float | None = None
    ) -> list[tuple[str, list[int]]]:
        """Each word with the frames whose centre falls in its interval (words with no frame dropped)."""
        centres = _centres(num_frames, frame_shift, window)
        out = []
        for s, e, w in self.words:
            frames = [k for k, c in enumerate(centres) if s <= c < e]
            if frames:
                out.append((w, frames))
        return out

    def check_covers(self, audio_duration: float, tolerance: float = 0.05) -> None:
        """Raise :class:`AlignmentError` when the TextGrid's span differs from the audio's by more
        than ``tolerance`` seconds (ends before it, or runs past it: the TextGrid of another file)."""
        if abs(self.duration - audio_duration) > tolerance:
            raise AlignmentError(
                f"{self.path}: TextGrid covers {self.duration:.3f} s but the audio lasts {audio_duration:.3f} s"
            )


def _centres(num_frames: int, frame_shift: float, window: float | None) -> list[float]:
    half = (frame_shift if window is None else window) / 2
    return [k * frame_shift + half for k in range(num_frames)]


def frame_labels(
    phones: list[tuple[float, float, int]], num_frames: int, frame_shift: float, window: float | None = None
) -> torch.Tensor:
    """Frame ``k`` takes the class of the interval that contains its centre ``k * shift + window / 2``.

    ``window`` defaults to ``frame_shift`` (centre of a 40 ms encoder frame at ``k*0.04 + 0.02``);
    pass ``window=0.025`` for 25 ms / 10 ms fbank frames. Frames outside every interval are silence.
    Intervals are half-open ``[start, end)``.
    """
    labels = torch.full((num_frames,), SILENCE, dtype=torch.long)
    for start, end, cls in phones:
        # first frame whose centre >= start, first frame whose centre >= end
        half = (frame_shift if window is None else window) / 2
        k0 = max(0, math.ceil((start - half) / frame_shift - 1e-9))
        k1 = min(num_frames, math.ceil((end - half) / frame_shift - 1e-9))
        if k1 > k0:
            labels[k0:k1] = cls
    return labels


def _line_of(path: Path, text: str) -> str:
    try:
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if f'"{text}"' in line:
                return f"{path}:{n}"
    except OSError:
        pass
    return str(path)


def read_textgrid(path: str | Path, word_tier: str = "words", phone_tier: str = "phones") -> Alignment:
    """Read an MFA TextGrid; every phone label is checked against ARPAbet.

    Raises :class:`AlignmentError` naming the file (and the line of a bad label).
    """
    from praatio import textgrid

    path = Path(path)
    try:
        tg = textgrid.openTextgrid(str(path), includeEmptyIntervals=False)
    except FileNotFoundError:
        raise AlignmentError(f"{path}: no such TextGrid") from None
    except Exception as e:  # praatio raises several types for malformed files
        raise AlignmentError(f"{path}: not a readable TextGrid ({e})") from None
    tiers = {name.lower(): name for name in tg.tierNames}
    missing = [t for t in (word_tier, phone_tier) if t.lower() not in tiers]
    if missing:
        raise AlignmentError(f"{path}: no tier named {missing[0]!r} (tiers: {', '.join(tg.tierNames)})")

    def entries(name):
        return [(float(e.start), float(e.end), e.label.strip()) for e in tg.getTier(tiers[name.lower()]).entries]

    phones = [p for p in entries(phone_tier) if p[2].lower() not in SILENCE_LABELS]
    for s, e, label in phones:
        try:
            phone_class(label)
        except ValueError as err:
            raise AlignmentError(f"{_line_of(path, label)}: interval {s:.3f}-{e:.3f} s: {err}") from None
    words = [w for w in entries(word_tier) if w[2].lower() not in SILENCE_LABELS]
    return Alignment(words=words, phones=phones, duration=float(tg.maxTimestamp), path=str(path))


def write_textgrid(path: str | Path, words: list[Interval], phones: list[Interval], duration: float) -> None:
    """Write an MFA-style TextGrid (``words`` and ``phones`` tiers, gaps as empty intervals)."""
    from praatio import textgrid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tg = textgrid.Textgrid()
    for name, items in (("words", words), ("phones", phones)):
        clean = []
        for s, e, label in items:
            s, e = round(max(0.0, s), 4), round(min(duration, e), 4)
            if clean and s < clean[-1][1]:
                s = clean[-1][1]
            if e > s:
                clean.append((s, e, label))
        tg.addTier(textgrid.IntervalTier(name, clean, 0.0, round(duration, 4)))
    tg.save(str(path), format="long_textgrid", includeBlankSpaces=True)


def find_alignment(align_root: Path, subset: str, entry: dict) -> Path | None:
    """The TextGrid of an utterance under an MFA output root, trying the usual layouts."""
    spk, chap, uid = entry["speaker"], entry["chapter"], entry["id"]
    for candidate in (
        align_root / subset / spk / f"{uid}.TextGrid",
        align_root / subset / spk / chap / f"{uid}.TextGrid",
        align_root / spk / f"{uid}.TextGrid",
        align_root / spk / chap / f"{uid}.TextGrid",
    ):
        if candidate.is_file():
            return candidate
    return None
