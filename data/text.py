"""Transcript normalisation: the one rule for training targets, references and lexicons.

LibriSpeech transcripts are upper case over ``A-Z``, the apostrophe and single spaces, and the
models output that alphabet; a reference in any other form (lower case, punctuation) would be
scored against hypotheses it can never match. :func:`normalise`:

1. Unicode NFKD, accents dropped (``café`` -> ``CAFE``); curly quotes ``’ ‘`` become ``'``;
2. upper case;
3. every other character that is not a letter, a digit or ``'`` (punctuation, hyphens, symbols)
   becomes a space; apostrophes at the edges of a word are dropped (quotes, not contractions);
4. runs of white space become one space, none at the ends.

What is left outside ``A-Z ' space`` (digits, letters of other scripts) cannot be spelt in
LibriSpeech's alphabet: :func:`unsupported` names those characters, preparation skips such
utterances (reported), and the tokenizer refuses to turn them into ``<unk>`` targets.
"""

from __future__ import annotations

import re
import unicodedata

ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZ' ")
_QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})
_EDGE_APOSTROPHES = re.compile(r"(?<![A-Z0-9])'+|'+(?![A-Z0-9])")


def normalise(text: str) -> str:
    """``text`` in LibriSpeech's form (see the module docstring); idempotent."""
    decomposed = unicodedata.normalize("NFKD", text.translate(_QUOTES))
    chars = []
    for c in decomposed.upper():
        if unicodedata.combining(c):
            continue
        chars.append(c if c.isalnum() or c == "'" else " ")
    return " ".join(_EDGE_APOSTROPHES.sub(" ", "".join(chars)).split())


def unsupported(text: str) -> str:
    """The characters of a normalised ``text`` outside LibriSpeech's alphabet, sorted ('' if none)."""
    return "".join(sorted(set(text) - ALPHABET))
