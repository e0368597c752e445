"""Cumulative attention diagonality (Shim, Choi, Sung, ICLR 2022, Eq. 3).

    CAD = integral_0^1 (1/T) sum_i sum_j A[i,j] 1[|i-j| <= r (T-1)] dr
        = 1 - sum_i sum_j A[i,j] |i-j| / (T (T-1))

1 for the identity map, ``1 - (T+1) / (3T)`` for the uniform map.
"""

from __future__ import annotations

import torch


def cad(attn: torch.Tensor) -> torch.Tensor:
    """CAD of each ``(T, T)`` map in ``attn (..., T, T)`` -> ``(...)``. A single-frame map scores 1."""
    if attn.dim() < 2 or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attention maps must be (..., T, T); got {tuple(attn.shape)}")
    T = attn.shape[-1]
    if T < 2:
        return torch.ones(attn.shape[:-2], dtype=attn.dtype, device=attn.device)
    idx = torch.arange(T, device=attn.device, dtype=attn.dtype)
    dist = (idx[:, None] - idx[None, :]).abs()
    return 1.0 - (attn * dist).sum((-1, -2)) / (T * (T - 1))
