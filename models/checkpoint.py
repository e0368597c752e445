"""Loading trained checkpoints (train.py's Lightning checkpoints), with checkpoint averaging."""
from __future__ import annotations

from pathlib import Path

import torch

from data.features import GlobalCMVN
from data.tokenizer import Tokenizer
from models.ctc import ConformerCTC

MODEL_KEYS = ("reuse", "d_model", "num_layers", "ffn_dim", "kernel_size", "dropout", "attention_dropout",
              "was_gamma", "bn_momentum", "subsampling_channels", "input_dim", "layer_norm_eps", "final_norm",
              "input_layer")


def checkpoint_paths(ckpt: str | Path, average: int = 1) -> list[Path]:
    """The checkpoint file; or, for a checkpoint folder, ``last.ckpt`` (``average`` 1) or its
    ``average`` latest ``epoch*.ckpt``."""
    ckpt = Path(ckpt)
    if ckpt.is_file():
        if average > 1:
            raise ValueError(f"--average {average} needs a checkpoint folder, not the file {ckpt}")
        return [ckpt]
    if not ckpt.is_dir():
        raise FileNotFoundError(f"{ckpt}: no such checkpoint file or folder")
    if average <= 1 and (ckpt / "last.ckpt").is_file():
        return [ckpt / "last.ckpt"]
    import re

    # one file per complete epoch, ``epochNNN.ckpt`` (train.py writes no other): by epoch number,
    # not by time, and never a versioned ``epochNNN-v1.ckpt`` of an older naming
    numbered = {int(m.group(1)): p for p in ckpt.glob("epoch*.ckpt") if (m := re.fullmatch(r"epoch(\d+)\.ckpt", p.name))}
    epochs = [numbered[e] for e in sorted(numbered)]
    if len(epochs) < max(1, average):
        raise ValueError(f"{ckpt}: {len(epochs)} epoch checkpoints (epochNNN.ckpt), fewer than --average {average}")
    return epochs[-max(1, average):]


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of floating-point tensors; integer buffers (BatchNorm counters) from the last."""
    out = {}
    for key, value in states[-1].items():
        if torch.is_floating_point(value):
            out[key] = sum(s[key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            out[key] = value
    return out


def tokenizer_record(checkpoint: dict) -> tuple[int | None, str | None, bytes | None]:
    """``(vocab_size, sha256, model bytes or None)`` of a checkpoint: from its embedded tokenizer, or
    (checkpoints written before tokenizers were embedded) from its hyper-parameters."""
    tok = checkpoint.get("tokenizer")
    if isinstance(tok, dict):
        return tok.get("vocab_size"), tok.get("sha256"), tok.get("model")
    hp = checkpoint.get("hyper_parameters") or {}
    return hp.get("vocab_size"), hp.get("tokenizer_sha256"), None


def embedded_tokenizer(tokenizer: Tokenizer) -> dict:
    """The tokenizer as a checkpoint embeds it (what :func:`tokenizer_record` reads back); with the
    output order of a converted ESPnet model (``token_list``) where it has one."""
    record = {"sha256": tokenizer.digest, "vocab_size": tokenizer.vocab_size, "model": tokenizer.model_bytes,
              "name": Path(tokenizer.path).name}
    if tokenizer.token_list is not None:
        record["token_list"] = list(tokenizer.token_list)
    return record


def training_data_dir(hp: dict, data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else the prepared folder the model was trained from (its tokenizer's
    folder at training time; it may have moved since)."""
    return Path(data_dir) if data_dir else Path(hp.get("tokenizer_path", ".")).parent


def load_model(ckpt: str | Path, average: int = 1, tokenizer_path: str | Path | None = None,
               device: str = "cpu") -> tuple[ConformerCTC, Tokenizer, dict]:
    """Model (eval mode), tokenizer and hyper-parameters from a training checkpoint (or several,
    averaged). The tokenizer is the one embedded in the checkpoint (older checkpoints: the file
    they name); ``tokenizer_path`` may name a file, which must be the same model. The returned
    hyper-parameters carry ``vocab_size``, ``tokenizer_sha256``, ``checkpoints`` and ``cmvn``
    (the embedded statistics ``{"mean", "std"}``, or None; see :func:`model_cmvn`)."""
    paths = checkpoint_paths(ckpt, average)
    loaded = []
    for p in paths:
        try:
            loaded.append(torch.load(p, map_location="cpu", weights_only=False))
        except Exception as e:  # truncated, empty or not a torch file at all
            raise ValueError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    hp = loaded[-1].get("hyper_parameters") if isinstance(loaded[-1], dict) else None
    vocab_size, digest, model_bytes = tokenizer_record(loaded[-1]) if hp else (None, None, None)
    if not hp or vocab_size is None or "reuse" not in hp:
        raise ValueError(f"{paths[-1]}: not a checkpoint of train.py's CTCModule (no model hyper-parameters)")
    if tokenizer_path is not None or model_bytes is None:
        tokenizer_path = Path(tokenizer_path or hp["tokenizer_path"])
        tokenizer = Tokenizer(tokenizer_path)
    else:
        tokenizer = Tokenizer(hp.get("tokenizer_path", "bpe.model"), model_bytes,
                              (loaded[-1].get("tokenizer") or {}).get("token_list"))
    if tokenizer.vocab_size != vocab_size or (digest is not None and tokenizer.digest != digest):
        raise ValueError(f"tokenizer {tokenizer.path} ({tokenizer.vocab_size} outputs) is not the one {paths[-1]} "
                         f"was trained with ({vocab_size} outputs, sha256 {digest})")
    model = ConformerCTC(vocab_size, **{k: hp[k] for k in MODEL_KEYS if k in hp})
    states = [{k[len("model."):]: v for k, v in c["state_dict"].items() if k.startswith("model.")} for c in loaded]
    try:
        model.load_state_dict(average_state_dicts(states) if len(states) > 1 else states[0])
    except RuntimeError as e:
        raise ValueError(f"{paths[-1]}: weights do not fit the model its hyper-parameters describe ({e})") from None
    info = {**hp, "vocab_size": vocab_size, "tokenizer_sha256": digest, "checkpoints": [str(p) for p in paths],
            "cmvn": loaded[-1].get("cmvn"), "features": loaded[-1].get("features")}
    return model.to(device).eval(), tokenizer, info


def model_cmvn(hp: dict, data_dir: str | Path | None = None) -> GlobalCMVN:
    """The feature normalisation a model was trained with: the statistics embedded in its
    checkpoint, or (older checkpoints) ``data_dir/cmvn.json``. Stays on the CPU, where the
    dataset applies it; batches are moved to the model's device afterwards."""
    if hp.get("cmvn") is not None:
        return GlobalCMVN(hp["cmvn"]["mean"], hp["cmvn"]["std"], dim=len(hp["cmvn"]["mean"]))
    if data_dir is None:
        raise ValueError(f"{hp['checkpoints'][-1]}: the checkpoint holds no CMVN statistics; give --data-dir "
                         "(the prepared data folder with cmvn.json)")
    return GlobalCMVN.load(Path(data_dir) / "cmvn.json")


def input_differences(hp: dict, data_dir: str | Path) -> list[str]:
    """How the inputs a checkpoint's model takes (its CMVN statistics, its feature record) differ
    from those a prepared folder gives (``cmvn.json``, ``features.json``): a model fine-tuned from
    the checkpoint on that folder would not start from the checkpoint's function. Empty if none
    (a checkpoint without statistics is not compared on them)."""
    import json

    from data.dataset import model_features

    data_dir = Path(data_dir)
    out = []
    if hp.get("cmvn") is not None and (data_dir / "cmvn.json").is_file():
        ours, folder = model_cmvn(hp), GlobalCMVN.load(data_dir / "cmvn.json")
        if ours.mean.shape != folder.mean.shape or not (
                torch.allclose(ours.mean, folder.mean, rtol=1e-5, atol=1e-6)
                and torch.allclose(ours.std, folder.std, rtol=1e-5, atol=1e-6)):
            out.append(f"its CMVN statistics differ from {data_dir / 'cmvn.json'}'s")
    record, _, _ = model_features(data_dir / "features.json")
    if hp.get("features") != record:
        kind = lambda r: "fbank" if r is None else repr(r.get("type"))  # noqa: E731
        a, b = kind(hp.get("features")), kind(record)
        if a == b:
            a, b = json.dumps(hp.get("features"), sort_keys=True), json.dumps(record, sort_keys=True)
        out.append(f"its front end (features {a}) differs from the data folder's ({b}) in {data_dir}")
    return out


def model_inputs(model: ConformerCTC, hp: dict, data_dir: str | Path | None = None):
    """``(cmvn, featurizer, framing)``: the features a model takes, for
    :class:`~data.dataset.ManifestDataset`. Ours: None and None (the dataset's 80-dim fbank) and
    the framing of its front end; a converted ESPnet model: its ``DefaultFrontend``
    (:class:`~data.espnet_frontend.EspnetFrontend`) from the checkpoint's ``features`` record, and
    its frames placed in time by its STFT hop. ``cmvn``: :func:`model_cmvn`."""
    from functools import partial

    from data.espnet_frontend import frontend_of
    from data.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS
    from data.framing import LabelFraming, receptive_field, subsampled_count, subsampling_factor

    cmvn = model_cmvn(hp, data_dir)
    layer = model.frontend.input_layer
    spec = hp.get("features")
    if spec is None:
        featurizer, hop, first_centre, frame_ms = None, FRAME_SHIFT_MS / 1000, FRAME_LENGTH_MS / 2000, FRAME_SHIFT_MS
    else:
        try:
            featurizer = frontend_of(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{hp['checkpoints'][-1]}: its feature record cannot be used ({e})") from None
        hop, first_centre, frame_ms = featurizer.hop_length / featurizer.fs, featurizer.first_centre, featurizer.frame_ms
    r = receptive_field(layer)
    # model frame m sees feature frames f m .. f m + r - 1: centred on feature frame f m + (r - 1) / 2
    framing = LabelFraming(shift=subsampling_factor(layer) * hop, window=(r - 1) * hop + 2 * first_centre,
                           count=partial(subsampled_count, input_layer=layer), min_frames=r, frame_ms=frame_ms)
    return cmvn, featurizer, framing


def save_model_checkpoint(path: str | Path, model: ConformerCTC, tokenizer: Tokenizer, hp: dict) -> None:
    """A self-contained checkpoint (weights, hyper-parameters, tokenizer, CMVN, the feature record
    of a converted model) that :func:`load_model` reads, e.g. averaged weights."""
    from common.io import atomic_write

    init = {k: v for k, v in hp.items() if k not in ("checkpoints", "cmvn", "vocab_size", "tokenizer_sha256", "features")}
    ckpt = {"hyper_parameters": init, "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "tokenizer": embedded_tokenizer(tokenizer)}
    if hp.get("cmvn") is not None:
        ckpt["cmvn"] = hp["cmvn"]
    if hp.get("features") is not None:
        ckpt["features"] = hp["features"]
    atomic_write(path, lambda tmp: torch.save(ckpt, tmp))
