"""The model side of the saliency analysis (:mod:`analysis.saliency`): the :class:`SaliencyModel`
interface, the scored :class:`Token` and the :class:`Capture` of one forward pass, and
:class:`CTCSaliency`, the interface for :class:`~models.ctc.ConformerCTC` (ours, reuse models,
converted ESPnet models). Transformers models (wav2vec2 / HuBERT CTC, Whisper): :mod:`analysis.saliency_hf`.

Tokens: the greedy CTC path (arg-max per frame), collapsed; each token is scored by its
log-probability *at its emitting frame*, the first frame of its run (where the collapse emits it).
The sum over the run's frames, or the CTC posterior of the transcript, would mix frames; one frame
has one attention row to compare with.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch


@dataclasses.dataclass(frozen=True)
class Token:
    """One scored output token: vocabulary ``id``, encoder ``frame`` that emits it (CTC) or None."""

    id: int
    frame: int | None


@dataclasses.dataclass
class Capture:
    """What one differentiable forward pass of an utterance gives (``N`` tokens, ``T'`` encoder frames).

    scores: ``(N,)`` log-probability of each token; rows: one ``(H_l, N, T')`` per attention layer, the
    attention each token's query puts on the encoder frames; maps: one ``(H_l, T', T')`` per layer
    for self-attention encoders (for rollout), or None; states: one ``(1, T', d)`` (or ``(T', d)``) per
    layer, what that layer's attention mixes: the tensor the forward pass used (a view taken afterwards
    is not on the path to ``scores`` and gets no gradient).
    """

    scores: torch.Tensor
    rows: list[torch.Tensor]
    maps: list[torch.Tensor] | None
    states: list[torch.Tensor]


class SaliencyModel(Protocol):
    """What the saliency analysis needs from a model.

    ``computes``: per attention layer, whether it computes its own map (False: it reuses another's);
    ``subsampling`` / ``receptive_field`` / ``frame_offset``: feature frames per encoder frame, feature
    frames one encoder frame sees, and the front end's left padding (frame ``m`` sees
    ``subsampling * m - frame_offset .. subsampling * m - frame_offset + receptive_field - 1``).
    """

    computes: list[bool]
    subsampling: int
    receptive_field: int
    frame_offset: int

    def tokens(self, features: torch.Tensor) -> list[Token]:
        """``features (T, F)`` normalised -> the tokens of the greedy transcript."""

    def score(self, features: torch.Tensor, tokens: list[Token]) -> torch.Tensor:
        """``features (B, T, F)`` -> ``(B, N)`` log-probability of each token (differentiable)."""

    def capture(self, features: torch.Tensor, tokens: list[Token]) -> Capture:
        """``features (T, F)`` -> :class:`Capture` (one forward pass with gradients)."""


def ctc_emissions(log_probs: torch.Tensor, blank: int = 0) -> list[Token]:
    """``log_probs (T', V)`` -> the tokens of the greedy CTC path, each at the first frame of its run."""
    path = log_probs.argmax(-1).tolist()
    return [Token(v, t) for t, v in enumerate(path) if v != blank and (t == 0 or path[t - 1] != v)]


class CTCSaliency:
    """:class:`SaliencyModel` of a :class:`~models.ctc.ConformerCTC` (eval mode; blank = 0)."""

    def __init__(self, model):
        from data.framing import receptive_field, subsampling_factor

        self.model = model.eval()
        self.computes = [not p.reuses for p in model.plans]
        self.subsampling = subsampling_factor(model.frontend.input_layer)
        self.receptive_field = receptive_field(model.frontend.input_layer)
        self.frame_offset = 0  # unpadded convolutions

    def _log_probs(self, features: torch.Tensor) -> torch.Tensor:
        lengths = torch.full((features.shape[0],), features.shape[1], dtype=torch.long, device=features.device)
        return self.model(features, lengths)[0]

    def tokens(self, features: torch.Tensor) -> list[Token]:
        with torch.no_grad():
            return ctc_emissions(self._log_probs(features[None])[0])

    def score(self, features: torch.Tensor, tokens: list[Token]) -> torch.Tensor:
        frames, ids = token_index(tokens, features.device)
        return self._log_probs(features)[:, frames, ids]

    def capture(self, features: torch.Tensor, tokens: list[Token]) -> Capture:
        frames, ids = token_index(tokens, features.device)
        lengths = torch.full((1,), features.shape[0], dtype=torch.long, device=features.device)
        enc = self.model.encode(features[None], lengths, return_attentions=True, return_hidden_states=True)
        log_probs = torch.log_softmax(self.model.head(enc.output).float(), -1)[0]
        maps = [a[0].float() for a in enc.attentions]
        return Capture(log_probs[frames, ids], [m[:, frames] for m in maps], maps, enc.hidden_states[:-1])


def token_index(tokens: list[Token], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(frames, ids)`` of CTC tokens as tensors on ``device``."""
    return (torch.tensor([t.frame for t in tokens], device=device), torch.tensor([t.id for t in tokens], device=device))
