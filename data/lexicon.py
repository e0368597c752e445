"""Flashlight lexicons (``WORD piece piece ...`` per line) for the lexicon-constrained CTC beam
search of :mod:`models.decoding`: written with our tokenizer's pieces, and read back."""

from __future__ import annotations

import warnings
from pathlib import Path

from common.io import atomic_write_text
from data.text import normalise


def write_lexicon(words, tokenizer, path: str | Path) -> int:
    """A flashlight lexicon spelling each word, normalised (:func:`data.text.normalise`), with the
    pieces of ``tokenizer`` (a :class:`data.tokenizer.Tokenizer`); returns the number of words.
    Words the pieces cannot spell (they would need ``<unk>``) are left out with a warning. The file
    is replaced by a rename, never rewritten in place (evaluate.py runs may share a folder)."""
    words = sorted({n for w in words for n in normalise(w).split()})
    unspellable = [w for w in words if not tokenizer.spellable(w)]
    if unspellable:
        warnings.warn(
            f"lexicon {path}: {len(unspellable)} words the tokenizer cannot spell are left out, "
            f"e.g. {', '.join(unspellable[:5])}",
            stacklevel=2,
        )
        words = sorted(set(words) - set(unspellable))
    lines = [f"{w} {' '.join(tokenizer.sp.encode(w, out_type=str))}\n" for w in words]
    atomic_write_text(path, "".join(lines))  # a concurrent run's decoder may be reading the old one
    return len(words)


def lexicon_words(lexicon: str | Path) -> list[str]:
    """The words of a flashlight lexicon file, in its order, each once."""
    with open(lexicon, encoding="utf-8") as f:
        return list(dict.fromkeys(line.split(maxsplit=1)[0] for line in f if line.strip()))
