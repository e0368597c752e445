"""Convolutional front end: Conv2d layers + ReLU subsampling time by 4, 6 or 8 (the Conformer's
convolution subsampling, Gulati et al., 2020, section 2, in ESPnet's layouts).

The layouts and their geometry (frames out for frames in, receptive field, the fewest frames in)
are the table of :mod:`data.framing`; this module holds the layers (ESPnet's parameter names).
"""

from __future__ import annotations

import torch
from torch import nn

from data.framing import front_end_layers, receptive_field, subsampled_lengths


class Conv2dSubsampling(nn.Module):
    """``(B, T, input_dim)`` -> ``(B, T', d_model)``; ``T'`` by :func:`data.framing.subsampled_lengths`.

    Needs at least :attr:`min_frames` input frames (the receptive field: 7 for conv2d).
    """

    def __init__(self, input_dim: int = 80, d_model: int = 256, channels: int = 256, input_layer: str = "conv2d"):
        super().__init__()
        self.input_dim, self.input_layer = input_dim, input_layer
        self.min_frames = receptive_field(input_layer)
        layers, freq, c_in = [], input_dim, 1
        for k, s in front_end_layers(input_layer):
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
