"""CTC decoding: greedy best path, and lexicon-free beam search (torchaudio / flashlight-text)."""
from __future__ import annotations

import torch

from data.tokenizer import BLANK, Tokenizer


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. ``log_probs (B, T, V)``."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for seq, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(seq[:n])
        out.append([int(t) for t in seq if t != BLANK])
    return out


def write_lexicon(words, tokenizer: Tokenizer, path) -> int:
    """A flashlight lexicon (``WORD piece piece ...`` per line) spelling each word, normalised
    (:func:`data.text.normalise`), with the tokenizer's pieces; returns the number of words. Words
    the pieces cannot spell (they would need ``<unk>``) are left out with a warning."""
    import warnings
    from pathlib import Path

    from data.text import normalise

    words = sorted({n for w in words for n in normalise(w).split()})
    unspellable = [w for w in words if not tokenizer.spellable(w)]
    if unspellable:
        warnings.warn(f"lexicon {path}: {len(unspellable)} words the tokenizer cannot spell are left out, "
                      f"e.g. {', '.join(unspellable[:5])}", stacklevel=2)
        words = sorted(set(words) - set(unspellable))
    lines = [f"{w} {' '.join(tokenizer.sp.encode(w, out_type=str))}\n" for w in words]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(lines))
    return len(words)


class BeamSearch:
    """CTC beam search over the tokenizer's pieces (no language model): lexicon-free by default,
    or restricted to the words of a ``lexicon`` file (see :func:`write_lexicon`)."""

    def __init__(self, tokenizer: Tokenizer, beam_size: int = 32, lexicon=None):
        from torchaudio.models.decoder import ctc_decoder

        pieces = tokenizer.pieces()
        self.tokenizer = tokenizer
        self.sil = pieces.index("<unk>")  # flashlight needs a silence token: <unk> never occurs in targets
        self.lexicon = None if lexicon is None else str(lexicon)
        self.decoder = ctc_decoder(lexicon=self.lexicon, tokens=pieces, lm=None, beam_size=beam_size,
                                   blank_token="<blk>", sil_token="<unk>", unk_word="<unk>", nbest=1)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Best hypothesis per utterance, as output indices (blank and silence removed)."""
        hyps = self.decoder(log_probs.float().cpu().contiguous(), lengths.to(torch.int32).cpu())
        if self.lexicon is not None:  # word-constrained: re-spell the decoded words
            return [self.tokenizer.encode(" ".join(h[0].words)) if h else [] for h in hyps]
        return [[int(t) for t in h[0].tokens if int(t) not in (BLANK, self.sil)] if h else [] for h in hyps]
