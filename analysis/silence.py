"""Dropping silence frames from attention maps (as Shim, Choi, Sung, ICLR 2022 do, Appendix A.3).

Analyses other than the probe remove the rows and columns of silence frames (label -1 here, or
36 = ``data.alignments.SILENCE`` in the 37-label set) and renormalise each remaining row to 1.
"""

from __future__ import annotations

import torch

from data.alignments import SILENCE


def speech_frames(labels: torch.Tensor) -> torch.Tensor:
    """Indices of frames that are not silence (labels ``-1`` or 36 count as silence)."""
    return torch.nonzero((labels >= 0) & (labels != SILENCE), as_tuple=True)[0]


def drop_silence(attn: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``attn (..., T, T)``, ``labels (T,)`` -> maps over speech frames only, rows renormalised,
    and the speech frames' labels. A row whose speech weights are all zero stays zero."""
    if labels.shape[-1] != attn.shape[-1]:
        raise ValueError(f"{labels.shape[-1]} labels for maps over {attn.shape[-1]} frames")
    keep = speech_frames(labels)
    a = attn[..., keep[:, None], keep[None, :]]
    total = a.sum(-1, keepdim=True)
    return torch.where(total > 0, a / total.clamp_min(1e-30), a), labels[keep]
