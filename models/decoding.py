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


class BeamSearch:
    """Lexicon-free CTC beam search over the tokenizer's pieces, no language model."""

    def __init__(self, tokenizer: Tokenizer, beam_size: int = 32):
        from torchaudio.models.decoder import ctc_decoder

        pieces = tokenizer.pieces()
        self.sil = pieces.index("<unk>")  # flashlight needs a silence token: <unk> never occurs in targets
        self.decoder = ctc_decoder(lexicon=None, tokens=pieces, lm=None, beam_size=beam_size, blank_token="<blk>",
                                   sil_token="<unk>", unk_word="<unk>", nbest=1)

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        hyps = self.decoder(log_probs.float().cpu().contiguous(), lengths.to(torch.int32).cpu())
        return [[int(t) for t in h[0].tokens if int(t) not in (BLANK, self.sil)] if h else [] for h in hyps]
