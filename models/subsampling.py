"""Convolutional front end: Conv2d layers + ReLU subsampling time by 4, 6 or 8 (Shim, Choi, Sung, ICLR 2022, Appendix A.1).

The layouts are ESPnet's ``input_layer`` options (same layers, same parameter names):

=========  ===========================  ======  ==================
name       Conv2d (kernel, stride)      factor  receptive field
=========  ===========================  ======  ==================
conv2d     (3, 2), (3, 2)               4       7 input frames
conv2d6    (3, 2), (5, 3)               6       11 input frames
conv2d8    (3, 2), (3, 2), (3, 2)       8       15 input frames
=========  ===========================  ======  ==================
"""
from __future__ import annotations

import torch
from torch import nn

INPUT_LAYERS: dict[str, tuple[tuple[int, int], ...]] = {
    "conv2d": ((3, 2), (3, 2)),
    "conv2d6": ((3, 2), (5, 3)),
    "conv2d8": ((3, 2), (3, 2), (3, 2)),
}


def _layers(input_layer: str) -> tuple[tuple[int, int], ...]:
    if input_layer not in INPUT_LAYERS:
        raise ValueError(f"input_layer {input_layer!r} is not supported; expected one of {', '.join(INPUT_LAYERS)}")
    return INPUT_LAYERS[input_layer]


def subsampled_lengths(lengths: torch.Tensor, input_layer: str = "conv2d") -> torch.Tensor:
    """Output frames of the front end for ``lengths`` input frames (conv2d: ``((L - 1) // 2 - 1) // 2``)."""
    for k, s in _layers(input_layer):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def subsampled_count(frames: int, input_layer: str = "conv2d") -> int:
    """:func:`subsampled_lengths` of one integer."""
    for k, s in _layers(input_layer):
        frames = (frames - k) // s + 1
    return max(0, frames)


def input_frames(frames: int, input_layer: str = "conv2d") -> int:
    """The fewest input frames that give ``frames`` output frames (0 for none): each layer's
    ``(n - k) // s + 1`` inverted, ``(n - 1) s + k``, from the last layer back (conv2d: ``4 T + 3``,
    conv2d6: ``6 T + 5``, conv2d8: ``8 T + 7``); ``input_frames(1)`` is :func:`receptive_field`."""
    if frames < 0:
        raise ValueError(f"frames must be >= 0, got {frames}")
    if frames == 0:
        return 0
    for k, s in reversed(_layers(input_layer)):
        frames = (frames - 1) * s + k
    return frames


def subsampling_factor(input_layer: str = "conv2d") -> int:
    """Input frames per output frame (4, 6 or 8)."""
    factor = 1
    for _, s in _layers(input_layer):
        factor *= s
    return factor


def receptive_field(input_layer: str = "conv2d") -> int:
    """Input frames one output frame sees (output frame ``m`` sees frames ``factor m .. factor m + r - 1``);
    also the fewest input frames that give one output frame."""
    r, jump = 1, 1
    for k, s in _layers(input_layer):
        r += (k - 1) * jump
        jump *= s
    return r


class Conv2dSubsampling(nn.Module):
    """``(B, T, input_dim)`` -> ``(B, T', d_model)``; ``T'`` by :func:`subsampled_lengths`.

    Needs at least :attr:`min_frames` input frames (the receptive field: 7 for conv2d).
    """

    def __init__(self, input_dim: int = 80, d_model: int = 256, channels: int = 256, input_layer: str = "conv2d"):
        super().__init__()
        self.input_dim, self.input_layer = input_dim, input_layer
        self.min_frames = receptive_field(input_layer)
        layers, freq, c_in = [], input_dim, 1
        for k, s in _layers(input_layer):
            layers += [nn.Conv2d(c_in, channels, k, s), nn.ReLU()]
            freq, c_in = (freq - k) // s + 1, channels
        if freq < 1:
            raise ValueError(f"input_dim={input_dim} is too small for the {input_layer} front end")
        self.conv = nn.Sequential(*layers)
        self.out = nn.Linear(channels * freq, d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv(x.unsqueeze(1))  # (B, C, T', F')
        b, c, t, f = x.shape
        return self.out(x.transpose(1, 2).reshape(b, t, c * f)), subsampled_lengths(lengths, self.input_layer)
