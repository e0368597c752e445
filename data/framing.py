"""The framing of a model's front end: how many input (feature) frames give how many encoder
frames, the fewest input frames a model takes, and where each encoder frame lies in time.

The front ends are ESPnet's ``input_layer`` options (Watanabe et al., 2018, ESPnet; the Conv2d
subsampling of the Conformer, Gulati et al., 2020, section 2): Conv2d layers with ReLU, no
padding, so that a layer of kernel ``k`` and stride ``s`` maps ``L`` frames to
``(L - k) // s + 1``. One table, :data:`INPUT_LAYERS`, gives every other number:

=========  ===========================  ======  ==================  =====================
name       Conv2d (kernel, stride)      factor  receptive field     input frames for T
=========  ===========================  ======  ==================  =====================
conv2d     (3, 2), (3, 2)               4       7 input frames      4 T + 3
conv2d6    (3, 2), (5, 3)               6       11 input frames     6 T + 5
conv2d8    (3, 2), (3, 2), (3, 2)       8       15 input frames     8 T + 7
=========  ===========================  ======  ==================  =====================

Encoder frame ``m`` sees input frames ``factor m .. factor m + r - 1`` (``r``: the receptive
field). Over our 10 ms / 25 ms fbank frames the default front end gives 40 ms encoder frames, frame
``m`` covering audio ``[0.04 m, 0.04 m + 0.085)`` s (:data:`ENCODER_SHIFT`, :data:`ENCODER_WINDOW`).
"""

from __future__ import annotations

import torch

from data.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS

#: front end name -> its Conv2d layers' (kernel, stride) along time, first layer first
INPUT_LAYERS: dict[str, tuple[tuple[int, int], ...]] = {
    "conv2d": ((3, 2), (3, 2)),
    "conv2d6": ((3, 2), (5, 3)),
    "conv2d8": ((3, 2), (3, 2), (3, 2)),
}
DEFAULT_INPUT_LAYER = "conv2d"


def front_end_layers(input_layer: str = DEFAULT_INPUT_LAYER) -> tuple[tuple[int, int], ...]:
    """The ``(kernel, stride)`` of each Conv2d layer of ``input_layer``; ``ValueError`` naming the
    supported ones for another name."""
    if input_layer not in INPUT_LAYERS:
        raise ValueError(f"input_layer {input_layer!r} is not supported; expected one of {', '.join(INPUT_LAYERS)}")
    return INPUT_LAYERS[input_layer]


def subsampled_lengths(lengths: torch.Tensor, input_layer: str = DEFAULT_INPUT_LAYER) -> torch.Tensor:
    """Output frames of the front end for ``lengths (B,)`` input frames (conv2d: ``((L - 1) // 2 - 1) // 2``)."""
    for k, s in front_end_layers(input_layer):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


def subsampled_count(frames: int, input_layer: str = DEFAULT_INPUT_LAYER) -> int:
    """:func:`subsampled_lengths` of one integer."""
    for k, s in front_end_layers(input_layer):
        frames = (frames - k) // s + 1
    return max(0, frames)


def input_frames(encoder_frames: int, input_layer: str = DEFAULT_INPUT_LAYER) -> int:
    """The fewest input frames that give ``encoder_frames`` output frames: each layer inverted,
    last first, ``L = (L' - 1) s + k`` (conv2d: ``4 T + 3``); 0 for 0."""
    if encoder_frames < 0:
        raise ValueError(f"encoder_frames must be >= 0, got {encoder_frames}")
    if encoder_frames == 0:
        return 0
    frames = encoder_frames
    for k, s in reversed(front_end_layers(input_layer)):
        frames = (frames - 1) * s + k
    return frames


def subsampling_factor(input_layer: str = DEFAULT_INPUT_LAYER) -> int:
    """Input frames per output frame (4, 6 or 8): the product of the strides."""
    factor = 1
    for _, s in front_end_layers(input_layer):
        factor *= s
    return factor


def receptive_field(input_layer: str = DEFAULT_INPUT_LAYER) -> int:
    """Input frames one output frame sees (output frame ``m`` sees frames ``factor m .. factor m + r - 1``);
    also the fewest input frames that give one output frame."""
    r, jump = 1, 1
    for k, s in front_end_layers(input_layer):
        r += (k - 1) * jump
        jump *= s
    return r


def frame_times(
    input_layer: str = DEFAULT_INPUT_LAYER,
    hop: float = FRAME_SHIFT_MS / 1000,
    first_centre: float = FRAME_LENGTH_MS / 2000,
) -> tuple[float, float]:
    """``(shift, window)`` in seconds of the model frames of ``input_layer`` over feature frames
    ``hop`` seconds apart, the first centred at ``first_centre`` (our fbank: 10 ms, 12.5 ms). Model
    frame ``m`` sees feature frames ``f m .. f m + r - 1`` and is centred on feature frame
    ``f m + (r - 1) / 2``: ``shift = f hop``, ``window = (r - 1) hop + 2 first_centre``."""
    return subsampling_factor(input_layer) * hop, (receptive_field(input_layer) - 1) * hop + 2 * first_centre


#: The fewest 10 ms frames the default front end takes (its receptive field): shorter utterances
#: are dropped at preparation and skipped (and reported) wherever a manifest is read.
MIN_FRAMES = receptive_field(DEFAULT_INPUT_LAYER)
#: seconds between the default front end's encoder frames over our fbank (0.04), and the audio
#: one of them covers (0.085; rounded to the nanosecond, not 0.08499999999999999)
ENCODER_SHIFT, ENCODER_WINDOW = (round(t, 9) for t in frame_times(DEFAULT_INPUT_LAYER))


def too_short(frames: int, min_frames: int = MIN_FRAMES, frame_ms: float = FRAME_SHIFT_MS) -> str | None:
    """Why an utterance of ``frames`` feature frames (of ``frame_ms``; our fbank's 10 ms by default)
    cannot be used by a model that needs ``min_frames``, or None if it can."""
    if frames < min_frames:
        return f"too short: {frames} frames of {frame_ms:g} ms, the model needs >= {min_frames}"
    return None


def encoder_frames(num_frames: int) -> int:
    """Encoder frames of the default (4x) front end for ``num_frames`` 10 ms frames."""
    return subsampled_count(num_frames, DEFAULT_INPUT_LAYER)


class LabelFraming:
    """How a model's frames map to time, for frame labels: ``count(num_feature_frames)`` model
    frames, frame ``k`` centred at ``k * shift + window / 2`` seconds. Default: our 40 ms encoder
    frames over 10 ms fbank frames.

    ``count``: feature frames -> model frames (default: ours, :func:`encoder_frames`; the identity
    when not ``subsampled``); ``min_frames``: the fewest feature frames the model takes (ours: 7;
    1 when not subsampled); ``frame_ms``: the feature frame shift, for messages. A picklable
    ``count`` (e.g. a ``functools.partial``) keeps loader workers possible. :meth:`of_front_end`
    gives the framing of any front end of the table over any feature frames."""

    def __init__(
        self,
        shift: float = ENCODER_SHIFT,
        window: float = ENCODER_WINDOW,
        subsampled: bool = True,
        count=None,
        min_frames: int | None = None,
        frame_ms: float = FRAME_SHIFT_MS,
    ):
        self.shift, self.window, self.subsampled = shift, window, subsampled
        self._count = count or (encoder_frames if subsampled else None)
        self.min_frames = min_frames if min_frames is not None else (MIN_FRAMES if subsampled else 1)
        self.frame_ms = frame_ms

    @classmethod
    def of_front_end(
        cls,
        input_layer: str = DEFAULT_INPUT_LAYER,
        hop: float = FRAME_SHIFT_MS / 1000,
        first_centre: float = FRAME_LENGTH_MS / 2000,
        frame_ms: float = FRAME_SHIFT_MS,
    ) -> LabelFraming:
        """The framing of ``input_layer`` over feature frames ``hop`` seconds apart, the first
        centred at ``first_centre`` seconds (:func:`frame_times`)."""
        from functools import partial

        shift, window = frame_times(input_layer, hop, first_centre)
        return cls(
            shift=shift,
            window=window,
            count=partial(subsampled_count, input_layer=input_layer),
            min_frames=receptive_field(input_layer),
            frame_ms=frame_ms,
        )

    def count(self, num_frames: int) -> int:
        return self._count(num_frames) if self._count is not None else num_frames

    def too_short(self, num_frames: int) -> str | None:
        """Why ``num_frames`` feature frames are too few for the model, or None."""
        return too_short(num_frames, self.min_frames, self.frame_ms) if self.subsampled else None
