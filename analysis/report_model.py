"""The model a report analyses, opened from its options: a checkpoint of ours (or a converted ESPnet
model) with its own features and frame rate, or an upstream (TERA / Mockingjay through s3prl,
:mod:`analysis.upstreams`; a transformers wav2vec2 / HuBERT / Whisper, :mod:`analysis.hf`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from analysis.runner import load_par
from data.features import SAMPLE_RATE
from data.framing import LabelFraming
from models.checkpoint import load_model, model_inputs, training_data_dir

UPSTREAMS = ("tera", "mockingjay", "hf")  # hf: transformers wav2vec2 / HuBERT / Whisper (analysis/hf.py)


@dataclass
class ReportModel:
    """``model`` with the capture interface; ``hp`` (at least ``checkpoints`` and ``reuse``); the data
    folder manifests are named in; ``cmvn`` (None: the upstream normalises its own features),
    ``featurizer`` and ``framing`` (None: ours); ``max_frames`` per batch in the featurizer's units."""

    model: object
    hp: dict
    data_dir: Path | None
    cmvn: object
    featurizer: object
    framing: LabelFraming | None
    max_frames: int
    tokenizer: object = None


def open_model(
    ckpt: str | None,
    upstream: str | None,
    upstream_ckpt: str | None,
    data_dir: str | None,
    device: str,
    max_frames: int,
) -> ReportModel:
    """Opens the report's model; a missing or unknown option fails here, before any work."""
    if upstream is None:
        if not ckpt:
            raise ValueError("give --ckpt (a checkpoint of train.py) or --upstream with --upstream-ckpt")
        model, tokenizer, hp = load_model(ckpt, device=device)
        data = training_data_dir(hp, data_dir)
        # the model's own features and frame rate (ours, or a converted ESPnet model's); CPU-side
        cmvn, featurizer, framing = model_inputs(model, hp, data)
        return ReportModel(model, hp, data, cmvn, featurizer, framing, max_frames, tokenizer)
    if upstream not in UPSTREAMS:
        raise ValueError(f"unknown upstream {upstream!r}; expected one of {', '.join(UPSTREAMS)}")
    if not upstream_ckpt:
        raise ValueError(
            f"--upstream {upstream} needs --upstream-ckpt ("
            + ("a transformers model folder or hub id)" if upstream == "hf" else "the .ckpt s3prl's hub downloads)")
        )
    if upstream == "hf":  # the waveform in, the model's own frame rate
        from analysis.hf import HFUpstream

        model = HFUpstream.from_pretrained(upstream_ckpt, device)
        max_frames *= SAMPLE_RATE // 100  # --max-frames counts 10 ms frames; the hf loader counts samples
        featurizer, framing = model.featurizer, model.framing
    else:
        from analysis.upstreams import TeraUpstream

        model = TeraUpstream.from_checkpoint(upstream_ckpt).to(device)
        featurizer = model.features
        framing = LabelFraming(model.frame_shift, model.frame_window, subsampled=False)
    hp = {"checkpoints": [str(upstream_ckpt)], "reuse": f"{upstream} ({model.num_layers} layers)"}
    # the upstream normalises its own features
    return ReportModel(model, hp, Path(data_dir) if data_dir else None, None, featurizer, framing, max_frames)


def open_reference(reference: str | None, device: str):
    """``--reference``, read before any work so that a bad file fails first: ``(par, None)`` for a
    saved ``par.json`` (the per-layer PAR), ``(None, model)`` for a baseline checkpoint, or
    ``(None, None)`` without one."""
    if reference is None:
        return None, None
    if Path(reference).suffix == ".json":
        return load_par(reference), None
    model, _, _ = load_model(reference, device=device)
    return None, model
