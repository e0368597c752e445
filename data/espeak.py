"""English speech synthesis with per-word and per-phoneme timings, through espeak-ng.

The library and its data come from the ``espeakng-loader`` wheel (no system package); the C
API is reached with :mod:`ctypes`. One :class:`Synthesizer` per process: espeak-ng keeps global
state, so the synthesiser is not thread-safe (use processes for parallelism).

Phoneme events carry espeak's own English phoneme mnemonics (``h``, ``@``, ``aI``...).
:func:`to_arpabet` maps them to ARPAbet with stress digits, as Montreal Forced Aligner writes.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import zlib

import numpy as np

# espeak_EVENT_TYPE
_EV_LIST_TERMINATED = 0
_EV_WORD = 1
_EV_END = 5
_EV_MSG_TERMINATED = 6
_EV_PHONEME = 7

_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_PHONEME_EVENTS = 0x0001
_POS_CHARACTER = 1
_CHARS_UTF8 = 1

# espeak_PARAMETER
_RATE = 1
_VOLUME = 2
_PITCH = 3
_RANGE = 4


class _EventId(ctypes.Union):
    _fields_ = [("number", ctypes.c_int), ("name", ctypes.c_char_p), ("string", ctypes.c_char * 8)]


class _Event(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", _EventId),
    ]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclasses.dataclass
class Synthesis:
    """One synthesised sentence. Times are in seconds from the start of ``audio``."""

    audio: np.ndarray  # int16 mono at ``sample_rate``
    sample_rate: int
    words: list[tuple[float, float, str]]
    phones: list[tuple[float, float, str]]  # espeak mnemonics, silences omitted


# espeak-ng English mnemonics (phsource/ph_english) -> ARPAbet. The digit written here is a
# placeholder: the stress digit comes from espeak's own mark (' primary -> 1, , secondary -> 2,
# none -> 0). Multi-phone entries expand to several ARPAbet phones that share the espeak
# phoneme's interval equally.
_ARPABET = {
    # vowels
    "@": "AH0",
    "@2": "AH0",
    "@5": "AH0",
    "a#": "AH0",
    "V": "AH1",
    "3": "ER0",
    "3:": "ER1",
    "@L": "AH0 L",
    "a": "AE1",
    "aa": "AA1",
    "A:": "AA1",
    "A@": "AA1 R",
    "A#": "AA1",
    "e": "EH1",
    "E": "EH1",
    "e@": "EH1 R",
    "E2": "EH1",
    "E#": "EH1",
    "eI": "EY1",
    "i": "IY0",
    "i:": "IY1",
    "i@": "IH1 R",
    "i@3": "IH1 R",
    "I": "IH1",
    "I2": "IH0",
    "I#": "IH0",
    "I2#": "IH0",
    "y": "IY0",
    "0": "AA1",
    "0#": "AA1",
    "O:": "AO1",
    "O@": "AO1 R",
    "O": "AO1",
    "o@": "AO1 R",
    "oU": "OW1",
    "oU#": "OW1",
    "O2": "AO1",
    "OI": "OY1",
    "u:": "UW1",
    "U": "UH1",
    "U@": "UH1 R",
    "u": "UW0",
    "aI": "AY1",
    "aI@": "AY1 ER0",
    "aI3": "AY1 ER0",
    "aU": "AW1",
    "aU@": "AW1 ER0",
    # consonants
    "p": "P",
    "b": "B",
    "t": "T",
    "d": "D",
    "k": "K",
    "g": "G",
    "f": "F",
    "v": "V",
    "T": "TH",
    "D": "DH",
    "s": "S",
    "z": "Z",
    "S": "SH",
    "Z": "ZH",
    "h": "HH",
    "m": "M",
    "n": "N",
    "N": "NG",
    "l": "L",
    "r": "R",
    "r-": "R",
    "w": "W",
    "j": "Y",
    "tS": "CH",
    "dZ": "JH",
    "t#": "T",
    "t2": "T",
    "t[": "T",
    "d#": "D",
    "n-": "N",
    "l/": "L",
    "l/2": "L",
    "m-": "M",
    "?": "T",
    "x": "K",
    "*": "R",
    "z#": "Z",
    "s2": "S",
    "w#": "W",
    "nt": "N T",
}
_SILENT = {"_", "_:", "_!", "_^_", "||", "|", ""}
# Marks that are not phones of their own (";" links two vowels across a word boundary): the
# preceding phone is extended over them.
_LINKS = {";"}


def to_arpabet(mnemonic: str) -> list[str]:
    """ARPAbet phones (vowels with stress digits) for one espeak English phoneme mnemonic.

    espeak's stress mark before a vowel (``'`` primary, ``,`` secondary) gives the digit 1 or 2;
    an unmarked vowel gets 0. Raises ``KeyError`` naming the mnemonic when it has no ARPAbet
    equivalent.
    """
    stress = "1" if "'" in mnemonic else "2" if "," in mnemonic else "0"
    key = re.sub(r"[',%=]", "", mnemonic)
    if key in _SILENT:
        return []
    if key not in _ARPABET:
        raise KeyError(f"espeak phoneme {mnemonic!r} has no ARPAbet mapping")
    return [p[:-1] + stress if p[-1].isdigit() else p for p in _ARPABET[key].split()]


class Synthesizer:
    """espeak-ng English synthesiser that records word and phoneme events."""

    def __init__(self, voice: str = "en-us"):
        import espeakng_loader

        self._lib = ctypes.CDLL(espeakng_loader.get_library_path())
        data = espeakng_loader.get_data_path().encode()
        rate = self._lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data, _INITIALIZE_PHONEME_EVENTS)
        if rate <= 0:
            raise RuntimeError(f"espeak-ng failed to initialise with data at {data.decode()}")
        self.sample_rate = int(rate)
        self._lib.espeak_Synth.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_uint,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.c_uint,
            ctypes.POINTER(ctypes.c_uint),
            ctypes.c_void_p,
        ]
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int, str]] = []
        self._callback = _CALLBACK(self._on_audio)  # keep a reference: the C side holds it
        self._lib.espeak_SetSynthCallback(self._callback)
        self.set_voice(voice)

    def _on_audio(self, wav, numsamples, events) -> int:
        if numsamples > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(numsamples,)).copy())
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            ev = events[i]
            name = ev.id.string.decode("utf-8", "replace") if ev.type == _EV_PHONEME else ""
            self._events.append((ev.type, ev.sample, ev.text_position, ev.length, name))
            i += 1
        return 0

    def set_voice(self, voice: str, rate: int = 175, pitch: int = 50, pitch_range: int = 50) -> None:
        """Select a voice (``en-us``, ``en-us+f3``...) with speaking rate (words/min) and pitch (0-100)."""
        if self._lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise ValueError(f"espeak-ng has no voice {voice!r}")
        for param, value in ((_RATE, rate), (_PITCH, pitch), (_RANGE, pitch_range), (_VOLUME, 100)):
            self._lib.espeak_SetParameter(param, int(value), 0)

    def synthesize(self, text: str) -> Synthesis:
        """Speak ``text`` and return the audio with word and phoneme intervals."""
        self._chunks, self._events = [], []
        # espeak-ng draws noise (aspiration, frication) from a random generator: seed it from the
        # text so that the same sentence in the same voice always gives the same samples.
        if hasattr(self._lib, "espeak_ng_SetRandSeed"):
            self._lib.espeak_ng_SetRandSeed(ctypes.c_long(zlib.crc32(text.encode("utf-8"))))
        buf = ctypes.create_string_buffer(text.encode("utf-8"))
        err = self._lib.espeak_Synth(buf, len(buf), 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
        if err != 0:
            raise RuntimeError(f"espeak-ng synthesis failed (error {err}) for text {text!r}")
        audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
        sr = float(self.sample_rate)
        end = len(audio) / sr
        # Phoneme intervals: each phoneme lasts until the next phoneme event (or the end).
        marks = [(s / sr, name) for t, s, _, _, name in self._events if t == _EV_PHONEME and name not in _LINKS]
        marks.append((end, ""))
        phones = [(a, b, n) for (a, n), (b, _) in zip(marks[:-1], marks[1:]) if b > a and n not in _SILENT]
        words = []
        word_events = [(s / sr, pos, length) for t, s, pos, length, _ in self._events if t == _EV_WORD]
        for k, (start, pos, length) in enumerate(word_events):
            token = text.encode("utf-8")[pos - 1 : pos - 1 + length].decode("utf-8", "replace")
            # A word ends at the end of its last non-silent phoneme before the next word starts.
            stop = word_events[k + 1][0] if k + 1 < len(word_events) else end
            inside = [p for p in phones if start - 1e-6 <= p[0] < stop]
            if inside:
                words.append((inside[0][0], inside[-1][1], token))
        return Synthesis(audio=audio, sample_rate=self.sample_rate, words=words, phones=phones)
