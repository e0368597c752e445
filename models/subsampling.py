"""Convolutional front end: two Conv2d (kernel 3, stride 2) + ReLU, time / 4 (SPEC section 1)."""
from __future__ import annotations

import torch
from torch import nn


def subsampled_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """Output frames of the front end for ``lengths`` input frames: ``((L - 1) // 2 - 1) // 2``."""
    return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor").clamp_min(0)


class Conv2dSubsampling(nn.Module):
    """``(B, T, input_dim)`` -> ``(B, T', d_model)`` with ``T' = ((T - 1) // 2 - 1) // 2``.

    Needs at least 7 input frames (one output frame sees input frames ``4m .. 4m + 6``).
    """

    MIN_FRAMES = 7

    def __init__(self, input_dim: int = 80, d_model: int = 256, channels: int = 256):
        super().__init__()
        self.input_dim = input_dim
        self.conv = nn.Sequential(
            nn.Conv2d(1, channels, 3, 2), nn.ReLU(),
            nn.Conv2d(channels, channels, 3, 2), nn.ReLU(),
        )
        freq = ((input_dim - 1) // 2 - 1) // 2
        if freq < 1:
            raise ValueError(f"input_dim={input_dim} is too small for two stride-2 convolutions (need >= 7)")
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), subsampled_lengths(lengths)
