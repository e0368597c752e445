"""Loading trained checkpoints (train.py's Lightning checkpoints), with checkpoint averaging."""
from __future__ import annotations

from pathlib import Path

import torch

from data.tokenizer import Tokenizer, tokenizer_digest
from models.ctc import ConformerCTC

MODEL_KEYS = ("reuse", "d_model", "num_layers", "ffn_dim", "kernel_size", "dropout", "attention_dropout",
              "was_gamma", "bn_momentum", "subsampling_channels", "input_dim")


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
    epochs = sorted(ckpt.glob("epoch*.ckpt"), key=lambda p: p.stat().st_mtime)
    if len(epochs) < max(1, average):
        raise ValueError(f"{ckpt}: {len(epochs)} epoch checkpoints, fewer than --average {average}")
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


def load_model(ckpt: str | Path, average: int = 1, tokenizer_path: str | Path | None = None,
               device: str = "cpu") -> tuple[ConformerCTC, Tokenizer, dict]:
    """Model (eval mode), tokenizer and hyper-parameters from a training checkpoint (or several,
    averaged). A tokenizer other than the one the model was trained with is refused."""
    paths = checkpoint_paths(ckpt, average)
    loaded = [torch.load(p, map_location="cpu", weights_only=False) for p in paths]
    hp = loaded[-1].get("hyper_parameters") if isinstance(loaded[-1], dict) else None
    if not hp or "vocab_size" not in hp or "reuse" not in hp:
        raise ValueError(f"{paths[-1]}: not a checkpoint of train.py's CTCModule (no model hyper-parameters)")
    tokenizer_path = Path(tokenizer_path or hp["tokenizer_path"])
    tokenizer = Tokenizer(tokenizer_path)
    if tokenizer.vocab_size != hp["vocab_size"] or tokenizer_digest(tokenizer_path) != hp.get("tokenizer_sha256"):
        raise ValueError(f"tokenizer {tokenizer_path} ({tokenizer.vocab_size} outputs) is not the one {paths[-1]} "
                         f"was trained with ({hp['vocab_size']} outputs, sha256 {hp.get('tokenizer_sha256')})")
    model = ConformerCTC(hp["vocab_size"], **{k: hp[k] for k in MODEL_KEYS if k in hp})
    states = [{k[len("model."):]: v for k, v in c["state_dict"].items() if k.startswith("model.")} for c in loaded]
    try:
        model.load_state_dict(average_state_dicts(states) if len(states) > 1 else states[0])
    except RuntimeError as e:
        raise ValueError(f"{paths[-1]}: weights do not fit the model its hyper-parameters describe ({e})") from None
    return model.to(device).eval(), tokenizer, {**hp, "checkpoints": [str(p) for p in paths]}
