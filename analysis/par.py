"""Phoneme attention relationship (PAR) and its coverage (Shim, Choi, Sung, ICLR 2022, Eqs. 4-6).

For one utterance and head, with ``C_p`` the frames of class p and ``E_p(i)`` the run of class p
that contains frame i::

    P[p,q] = T / (|C_p| |C_q|) sum_{i in C_p} sum_{j in C_q} A[i,j]                         p != q
    P[p,p] = T / |C_p| sum_{i in C_p} 1 / (|C_p| - |E_p(i)|) sum_{j in C_p \\ E_p(i)} A[i,j]

A uniform map gives 1 everywhere. Entries with no contributing frame are NaN.
"""

from __future__ import annotations

import torch

from analysis.silence import drop_silence


def _runs(labels: torch.Tensor) -> torch.Tensor:
    """Run index of each frame (consecutive equal labels share one)."""
    change = torch.ones_like(labels, dtype=torch.long)
    change[1:] = (labels[1:] != labels[:-1]).long()
    return torch.cumsum(change, 0) - 1


def par(attn: torch.Tensor, labels: torch.Tensor, num_classes: int = 36) -> torch.Tensor:
    """PAR of one utterance: ``attn (H, T, T)``, ``labels (T,)`` (classes ``0..num_classes-1``,
    silence ``-1`` or 36) -> ``(H, C, C)`` with NaN where undefined. Silence frames are dropped
    and rows renormalised first; ``T`` is then the number of speech frames."""
    if attn.dim() != 3:
        raise ValueError(f"par expects one utterance's maps (H, T, T); got {tuple(attn.shape)}")
    return par_speech(*drop_silence(attn.double(), labels), num_classes)


def par_speech(a: torch.Tensor, y: torch.Tensor, num_classes: int = 36) -> torch.Tensor:
    """:func:`par` of maps ``a (H, T, T)`` already restricted to speech frames (labels ``y``)."""
    a = a.double()
    if (y >= num_classes).any():
        raise ValueError(f"label {int(y.max())} is outside the {num_classes} phoneme classes")
    H, T = a.shape[0], a.shape[-1]
    out = torch.full((H, num_classes, num_classes), float("nan"), dtype=torch.float64, device=a.device)
    if T == 0:
        return out.float()
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (T, C)
    n = onehot.sum(0)  # |C_p|
    mass = onehot.t() @ a @ onehot  # (H, C, C): sum over i in C_p, j in C_q
    denom = n[:, None] * n[None, :]
    off = torch.where(denom > 0, T * mass / denom.clamp_min(1), torch.full_like(mass, float("nan")))
    # diagonal: same class, other runs
    runs = _runs(y)
    same_class = y[:, None] == y[None, :]
    other_run = runs[:, None] != runs[None, :]
    run_len = torch.bincount(runs)[runs].double()  # |E_p(i)|
    others = n[y] - run_len  # |C_p| - |E_p(i)|
    num = (a * (same_class & other_run)).sum(-1)  # (H, T)
    val = torch.where(others > 0, num / others.clamp_min(1), torch.zeros_like(num))
    diag = T * (val @ onehot) / n.clamp_min(1)  # (H, C)
    defined = (onehot * (others > 0)[:, None].double()).sum(0) > 0  # class has >= 2 runs
    diag = torch.where(defined, diag, torch.full_like(diag, float("nan")))
    idx = torch.arange(num_classes, device=a.device)
    off[:, idx, idx] = diag
    return off.float()


def par_coverage(par: torch.Tensor, ref: torch.Tensor, top_k: int = 10) -> float:
    """Coverage of ``par (C, C)`` against ``ref (C, C)`` (Shim, Choi, Sung, ICLR 2022, Eq. 6)::

        R[p,q] = min(P[p,q] / P_ref[p,q], 1);  R = mean_p mean_{q in Q_p} R[p,q]

    with ``Q_p`` the ``top_k`` classes of largest ``P_ref[p, q]``. NaN entries of the reference
    are never chosen; pairs where ``par`` is NaN are left out; rows with no pair are left out.
    """
    if par.shape != ref.shape or par.dim() != 2:
        raise ValueError(f"par and ref must be the same (C, C) shape; got {tuple(par.shape)} and {tuple(ref.shape)}")
    rows = []
    for p in range(ref.shape[0]):
        r = ref[p]
        finite = torch.nonzero(torch.isfinite(r) & (r > 0), as_tuple=True)[0]
        if len(finite) == 0:
            continue
        q = finite[torch.argsort(r[finite], descending=True)[:top_k]]
        ratio = par[p, q] / r[q]
        ratio = ratio[torch.isfinite(ratio)]
        if len(ratio):
            rows.append(ratio.clamp(max=1.0).mean())
    if not rows:
        raise ValueError("coverage is undefined: no class pair is defined in both PARs")
    return float(torch.stack(rows).mean())
