"""The framing table (data.framing): frames out for frames in, its inverse, receptive fields,
the minimum frames and the label framing, checked against the front-end modules themselves."""

from __future__ import annotations

import pytest
import torch

from data.framing import (
    ENCODER_SHIFT,
    ENCODER_WINDOW,
    INPUT_LAYERS,
    MIN_FRAMES,
    LabelFraming,
    encoder_frames,
    frame_times,
    input_frames,
    receptive_field,
    subsampled_count,
    subsampled_lengths,
    subsampling_factor,
    too_short,
)
from models.subsampling import Conv2dSubsampling

#: the layouts' numbers, written out by hand: (factor, receptive field)
EXPECTED = {"conv2d": (4, 7), "conv2d6": (6, 11), "conv2d8": (8, 15)}


@pytest.mark.parametrize("input_layer", list(INPUT_LAYERS))
def test_input_frames_is_the_fewest_that_give_t_frames(input_layer):
    for T in range(0, 300):
        n = input_frames(T, input_layer)
        assert subsampled_count(n, input_layer) == T
        if T > 0:
            assert subsampled_count(n - 1, input_layer) == T - 1
    factor, field = EXPECTED[input_layer]
    assert subsampling_factor(input_layer) == factor and receptive_field(input_layer) == field
    # T frames need factor (T - 1) + r input frames: frame T - 1 sees factor (T - 1) .. factor (T - 1) + r - 1
    assert all(input_frames(T, input_layer) == factor * (T - 1) + field for T in range(1, 100))
    assert input_frames(1, input_layer) == receptive_field(input_layer)


def test_input_frames_of_the_default_front_end_and_bad_input():
    assert [input_frames(T) for T in (1, 2, 64)] == [4 * T + 3 for T in (1, 2, 64)]
    with pytest.raises(ValueError, match="encoder_frames must be >= 0"):
        input_frames(-1)
    with pytest.raises(
        ValueError, match="input_layer 'conv2d5' is not supported; expected one of conv2d, conv2d6, conv2d8"
    ):
        input_frames(3, "conv2d5")


@pytest.mark.parametrize("input_layer", list(INPUT_LAYERS))
def test_counts_equal_the_front_end_module(input_layer):
    front = Conv2dSubsampling(input_dim=20, d_model=8, channels=2, input_layer=input_layer)
    assert front.min_frames == receptive_field(input_layer)
    lengths = torch.arange(front.min_frames, 80)
    _, counted = front(torch.zeros(1, 79, 20), lengths)
    for n, c in zip(lengths.tolist(), counted.tolist()):
        out, _ = front(torch.zeros(1, n, 20), torch.tensor([n]))
        assert out.shape[1] == c == subsampled_count(n, input_layer)
    assert subsampled_lengths(torch.tensor([0, 3]), input_layer).tolist() == [0, 0]


def test_minimum_frames_and_default_framing_derive_from_the_table():
    assert MIN_FRAMES == receptive_field("conv2d") == 7
    assert too_short(6) == "too short: 6 frames of 10 ms, the model needs >= 7" and too_short(7) is None
    assert (ENCODER_SHIFT, ENCODER_WINDOW) == (0.04, 0.085)  # 4 x 10 ms; 6 x 10 ms + one 25 ms window
    assert [encoder_frames(n) for n in (6, 7, 100)] == [0, 1, 24]
    default, table = LabelFraming(), LabelFraming.of_front_end("conv2d")
    assert (table.shift, table.window) == pytest.approx((default.shift, default.window))
    assert table.min_frames == default.min_frames == 7
    assert [table.count(n) for n in range(200)] == [default.count(n) for n in range(200)]
    assert LabelFraming(subsampled=False).count(13) == 13 and LabelFraming(subsampled=False).too_short(1) is None


@pytest.mark.parametrize("input_layer", list(INPUT_LAYERS))
def test_framing_of_a_front_end_equals_the_model_inputs_framing(input_layer):
    """LabelFraming.of_front_end gives the framing models.checkpoint.model_inputs builds for a
    model of that front end over ESPnet's 8 ms STFT frames (first centred at 0: ``center=True``)."""
    from models.checkpoint import model_inputs
    from models.ctc import ConformerCTC

    model = ConformerCTC(
        5,
        d_model=32,
        num_layers=1,
        ffn_dim=32,
        kernel_size=3,
        reuse="1(H2)x1",
        subsampling_channels=32,
        input_layer=input_layer,
        input_dim=80,
    )
    hp = {
        "features": {"type": "espnet", "config": {"fs": 16000, "n_fft": 512, "hop_length": 128}},
        "cmvn": {"mean": torch.zeros(80), "std": torch.ones(80)},
        "checkpoints": ["x"],
    }
    _, featurizer, theirs = model_inputs(model, hp)
    ours = LabelFraming.of_front_end(
        input_layer, featurizer.hop_length / featurizer.fs, featurizer.first_centre, featurizer.frame_ms
    )
    assert (ours.shift, ours.window, ours.min_frames, ours.frame_ms) == pytest.approx(
        (theirs.shift, theirs.window, theirs.min_frames, theirs.frame_ms)
    )
    assert [ours.count(n) for n in range(120)] == [theirs.count(n) for n in range(120)]
    factor, field = EXPECTED[input_layer]
    assert frame_times(input_layer, 0.008, 0.0) == pytest.approx((factor * 0.008, (field - 1) * 0.008))
