"""Attention-head scores, head categories and phoneme relation maps (Gopinath & Rodriguez,
"Probing self-attention in self-supervised speech models for cross-linguistic differences", following
Yang, Liu, Lee, Interspeech 2020).

Per map (natural logarithm, H = entropy)::

    G = (1/T) sum_q H(A[q,:])                  globalness
    V = -H((1/T) sum_q A[q,:])                 verticality
    D = -(1/T^2) sum_q sum_k |q-k| A[q,k]      diagonality

averaged over utterances by the corpus runner. A head's category is the score on which its rank
among all heads is best (rank 1 = highest score); ties go to diagonal, then vertical, then global.
"""

from __future__ import annotations

import numpy as np
import torch

CATEGORIES = ("diagonal", "vertical", "global")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def head_scores(attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``attn (..., T, T)`` -> ``(G, V, D)``, each ``(...)``."""
    if attn.dim() < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be (..., T, T); got {tuple(attn.shape)}")
    T = attn.shape[-1]
    a = attn.double()
    g = _entropy(a).mean(-1)
    v = -_entropy(a.mean(-2))
    idx = torch.arange(T, device=a.device, dtype=a.dtype)
    d = -(a * (idx[:, None] - idx[None, :]).abs()).sum((-1, -2)) / T**2
    return g.to(attn.dtype), v.to(attn.dtype), d.to(attn.dtype)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Rank of each value, 1 = highest; equal values share the best rank."""
    order = -x
    return np.array([1 + int((order < o).sum()) for o in order])


def classify_heads(G, V, D) -> np.ndarray:
    """Category (``"diagonal"``, ``"vertical"`` or ``"global"``) of each head, same shape as the scores."""
    G, V, D = (np.asarray(torch.as_tensor(s).detach().cpu(), dtype=np.float64) for s in (G, V, D))
    if not (G.shape == V.shape == D.shape):
        raise ValueError(f"G, V, D must have one shape; got {G.shape}, {V.shape}, {D.shape}")
    if G.size == 0:
        raise ValueError("no heads to classify")
    if not (np.isfinite(G).all() and np.isfinite(V).all() and np.isfinite(D).all()):
        raise ValueError("head scores contain NaN or inf")
    ranks = np.stack([_ranks(D.ravel()), _ranks(V.ravel()), _ranks(G.ravel())])  # priority order
    best = ranks.argmin(0)  # argmin returns the first minimum: diagonal, then vertical, then global
    return np.array(CATEGORIES, dtype=object)[best].reshape(G.shape)


def category_ranking(G, V, D) -> dict[str, list[int]]:
    """Heads (flat indices) of each category, best-ranked first (rank within that category's score)."""
    cats = classify_heads(G, V, D).ravel()
    scores = {
        "diagonal": np.asarray(D, dtype=np.float64).ravel(),
        "vertical": np.asarray(V, dtype=np.float64).ravel(),
        "global": np.asarray(G, dtype=np.float64).ravel(),
    }
    return {c: sorted(np.nonzero(cats == c)[0].tolist(), key=lambda h: -scores[c][h]) for c in CATEGORIES}


def phoneme_relation(
    attn: torch.Tensor, labels: torch.Tensor, num_classes: int = 36
) -> tuple[torch.Tensor, torch.Tensor]:
    """One utterance's terms of the phoneme relation map, silence dropped first:
    ``P'[m,n] = (1/T) sum_q sum_k 1[y_q=m] 1[y_k=n] A[q,k]`` per head ``(H, C, C)`` and the same with
    uniform attention ``P_U[m,n] = |C_m| |C_n| / T^2`` ``(C, C)``."""
    from analysis.silence import drop_silence

    return phoneme_relation_speech(*drop_silence(attn.double(), labels), num_classes)


def phoneme_relation_speech(
    a: torch.Tensor, y: torch.Tensor, num_classes: int = 36
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`phoneme_relation` of maps already restricted to speech frames (labels ``y``)."""
    a = a.double()
    T = a.shape[-1]
    if T == 0:
        raise ValueError("utterance has no speech frame")
    onehot = torch.nn.functional.one_hot(y, num_classes).double()
    p = onehot.t() @ a @ onehot / T
    n = onehot.sum(0)
    return p.float(), (n[:, None] * n[None, :] / T**2).float()


def prm(attn: torch.Tensor, labels: torch.Tensor, num_classes: int = 36) -> torch.Tensor:
    """Phoneme relation map of one utterance ``(P' - P_U) / P_U`` per head ``(H, C, C)``; NaN where
    a class is absent. The corpus PRM averages ``P'`` and ``P_U`` over utterances first."""
    p, pu = phoneme_relation(attn, labels, num_classes)
    return torch.where(pu > 0, (p - pu) / pu.clamp_min(1e-30), torch.full_like(p, float("nan")))
