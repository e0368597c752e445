"""The front end's frame arithmetic: :func:`models.subsampling.input_frames` inverts
:func:`models.subsampling.subsampled_count` (fewest input frames for a number of output frames)."""
from __future__ import annotations

import pytest
import torch

from models.subsampling import (INPUT_LAYERS, Conv2dSubsampling, input_frames, receptive_field, subsampled_count,
                                subsampling_factor)


@pytest.mark.parametrize("input_layer", list(INPUT_LAYERS))
def test_input_frames_is_the_fewest_giving_that_many_outputs(input_layer):
    """By search over every input length: ``input_frames(T)`` gives ``T`` output frames and one frame
    fewer gives ``T - 1``."""
    fewest = {}
    for n in range(0, 8 * 60 + 20):
        fewest.setdefault(subsampled_count(n, input_layer), n)
    for T in range(1, 60):
        assert input_frames(T, input_layer) == fewest[T], T
        assert subsampled_count(input_frames(T, input_layer), input_layer) == T
        assert subsampled_count(input_frames(T, input_layer) - 1, input_layer) == T - 1
    assert input_frames(0, input_layer) == 0
    assert input_frames(1, input_layer) == receptive_field(input_layer)


@pytest.mark.parametrize("input_layer,offset", [("conv2d", 3), ("conv2d6", 5), ("conv2d8", 7)])
def test_input_frames_closed_form(input_layer, offset):
    """``factor T + factor - 1``: the receptive field of ``r`` frames plus ``factor`` per further frame."""
    factor = subsampling_factor(input_layer)
    assert [input_frames(T, input_layer) for T in (1, 2, 64)] == [factor * T + offset for T in (1, 2, 64)]


@pytest.mark.parametrize("input_layer", list(INPUT_LAYERS))
def test_front_end_gives_the_frames_asked_for(input_layer):
    """The module itself, on ``input_frames(T)`` frames, returns ``T`` frames."""
    frontend = Conv2dSubsampling(80, 16, 4, input_layer)
    for T in (1, 5):
        frames = input_frames(T, input_layer)
        out, lengths = frontend(torch.zeros(1, frames, 80), torch.tensor([frames]))
        assert out.shape[1] == T and lengths.tolist() == [T]


def test_input_frames_bad_input():
    with pytest.raises(ValueError, match="frames must be >= 0"):
        input_frames(-1)
    with pytest.raises(ValueError, match="input_layer 'conv3d' is not supported"):
        input_frames(4, "conv3d")
