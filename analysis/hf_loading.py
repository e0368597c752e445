"""Opening a transformers speech model for :class:`analysis.hf.HFUpstream`: the folder or hub id
check, the model-type dispatch (wav2vec2 / HuBERT with a CTC head or without, Whisper; WavLM refused),
the feature extractor / processor and the model with eager attention; the encoders' frame counts
(:func:`conv_frames`, :func:`conv_receptive_field`, :func:`whisper_frames`) and the waveform
featurizer the report's loader uses.

transformers is an optional extra (``pip install '.[hf]'``; tested with transformers 5.23.0).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import torch

HF_HELP = (
    "transformers is not installed; install the optional extra with `pip install '.[hf]'` "
    "(or `pip install transformers==5.23.0`)"
)
# model_type -> (family, base model class, classes with a head that are loaded as such)
FAMILIES = {
    "wav2vec2": ("ctc", "Wav2Vec2Model", ("Wav2Vec2ForCTC",)),
    "hubert": ("ctc", "HubertModel", ("HubertForCTC",)),
    "whisper": ("whisper", "WhisperForConditionalGeneration", ("WhisperForConditionalGeneration",)),
}
REFUSED = {
    "wavlm": "transformers' WavLM attention runs torch's fused multi_head_attention_forward and returns "
    "head-averaged weights: per-head maps, head ablation and Value Zeroing are not available"
}


def import_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"{HF_HELP} ({e})") from None
    return transformers


def conv_frames(samples: int, kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Frames of a stack of unpadded 1-d convolutions over ``samples`` inputs."""
    n = samples
    for k, s in zip(kernels, strides):
        n = max(0, (n - k) // s + 1)
    return n


def conv_receptive_field(kernels: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Inputs one output frame of the stack sees."""
    r, jump = 1, 1
    for k, s in zip(kernels, strides):
        r += (k - 1) * jump
        jump *= s
    return r


def whisper_frames(samples: int, stride: int) -> int:
    """Whisper encoder frames whose centre (k * stride samples) lies in ``samples`` of audio."""
    return math.ceil(samples / stride)


class WaveFeaturizer:
    """16 kHz waveform ``(samples,)`` -> ``(samples, 1)``: the model's own feature extractor runs in
    :meth:`HFUpstream.encode`. ``num_frames`` counts samples (for batching and length checks)."""

    def __call__(self, wave: torch.Tensor) -> torch.Tensor:
        return wave.float().reshape(-1, 1)

    def num_frames(self, samples: int) -> int:
        return int(samples)


def check_folder(source: str | Path) -> str:
    """A model folder (with ``config.json``) or a hub id; a path that is not a model folder fails here."""
    p = Path(source)
    if p.exists():
        if not (p.is_dir() and (p / "config.json").is_file()):
            raise ValueError(
                f"--upstream-ckpt {source}: not a Hugging Face model folder (no config.json; "
                f"give the folder save_pretrained wrote, or a hub id)"
            )
        return str(p)
    if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:
        raise FileNotFoundError(f"--upstream-ckpt {source}: no such model folder")
    return str(source)


class Loaded(NamedTuple):
    """What :func:`load` opened: the ``family`` ("ctc" or "whisper"), the transformers class name
    ``arch``, the checked ``source``, ``processor`` (Whisper; None otherwise), ``feature_extractor``."""

    family: str
    arch: str
    source: str
    config: object
    processor: object
    feature_extractor: object
    model: torch.nn.Module


def load(source: str | Path, device: str = "cpu") -> Loaded:
    """The model (eager attention, eval mode, on ``device``) and its own feature extractor / processor;
    a folder that is not a model, an unreadable config or an unsupported model type fails here."""
    tf = import_transformers()
    source = check_folder(source)
    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise ValueError(f"--upstream-ckpt {source}: cannot read a transformers config ({e})") from None
    mt = config.model_type
    archs = ", ".join(getattr(config, "architectures", None) or []) or "no architecture named"
    if mt in REFUSED:
        raise ValueError(f"--upstream-ckpt {source}: {mt} ({archs}) is not supported: {REFUSED[mt]}")
    if mt not in FAMILIES:
        raise ValueError(
            f"--upstream-ckpt {source}: model type {mt!r} ({archs}) is not supported; expected one "
            f"of {', '.join(FAMILIES)} (Wav2Vec2ForCTC, HubertForCTC, their base models, "
            f"WhisperForConditionalGeneration)"
        )
    family, base, heads = FAMILIES[mt]
    arch = next((a for a in (config.architectures or []) if a in heads), base)
    try:
        if family == "whisper":
            processor = tf.AutoProcessor.from_pretrained(source)
            feature_extractor = processor.feature_extractor
        else:
            feature_extractor = tf.AutoFeatureExtractor.from_pretrained(source)
            processor = None
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--upstream-ckpt {source}: no usable feature extractor / processor ({e})") from None
    model = getattr(tf, arch).from_pretrained(source, attn_implementation="eager").eval().to(device)
    return Loaded(family, arch, source, config, processor, feature_extractor, model)
