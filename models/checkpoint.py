"""Checkpoints: one record of what a checkpoint holds (:class:`CheckpointRecord`, with its data
folder explicit in :class:`DataRecord`), one writer (:func:`write_checkpoint`), and loading, with
checkpoint averaging, of train.py's Lightning checkpoints and of :func:`save_model_checkpoint`'s.

Layout (``torch.save`` of a dict; Lightning's own entries, optimiser and loop states, beside):

- ``hyper_parameters``: the model options (:class:`models.config.ModelConfig`) and the other
  hyper-parameters (training options such as ``lr``, provenance such as ``init_from`` /
  ``retrofit_from``), one flat mapping, as Lightning and ``--ckpt_path FILE`` expect;
- ``data``: ``dir`` (the prepared data folder, resolved when training started; it may have moved
  since), ``tokenizer`` (the SentencePiece model embedded: ``sha256``, ``vocab_size``, ``model``
  bytes, ``name``, and a converted model's ``token_list``), ``cmvn`` (``{"mean": (F,), "std": (F,)}``)
  and ``features`` (a converted model's front-end record, or None for our fbank);
- ``state_dict``: the weights as ``model.*`` (the training module's attribute).

Older layouts keep loading (:meth:`CheckpointRecord.read`): until the data record, the tokenizer,
``cmvn`` and ``features`` stood at the top level and the folder was named by
``hyper_parameters.tokenizer_path``; before tokenizers were embedded, ``vocab_size`` and
``tokenizer_sha256`` stood among the hyper-parameters and the tokenizer was read from its path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common.io import atomic_write
from data.features import GlobalCMVN
from data.tokenizer import Tokenizer
from models.config import MODEL_KEYS, ModelConfig
from models.ctc import ConformerCTC

# hyper-parameters that older layouts held and that are run-time data, not hyper-parameters (the
# tokenizer and its data folder), or Lightning's CLI bookkeeping
_NOT_HYPER_PARAMETERS = ("tokenizer_path", "vocab_size", "tokenizer_sha256", "_instantiator", "_class_path")
# what load_model's information adds beside the hyper-parameters
_INFO_KEYS = ("tokenizer_path", "data_dir", "vocab_size", "tokenizer_sha256", "checkpoints", "cmvn", "features")


@dataclass
class DataRecord:
    """What a model takes and was trained on, kept in its checkpoint so that evaluation, analysis
    and resumption work from any folder after the data folder is gone (see the module docstring)."""

    dir: str | None
    tokenizer: dict
    cmvn: dict | None = None
    features: dict | None = None

    @classmethod
    def of(
        cls,
        tokenizer: Tokenizer,
        data_dir: str | Path | None,
        cmvn: GlobalCMVN | dict | None = None,
        features: dict | None = None,
    ) -> DataRecord:
        """The record of a tokenizer (embedded whole) and the CMVN statistics and front-end record
        of the data it was trained on."""
        if isinstance(cmvn, GlobalCMVN):
            cmvn = {"mean": cmvn.mean.detach().cpu().clone(), "std": cmvn.std.detach().cpu().clone()}
        return cls(None if data_dir is None else str(data_dir), embedded_tokenizer(tokenizer), cmvn, features)

    @property
    def tokenizer_path(self) -> Path:
        """Where the tokenizer was when training started (read only for checkpoints that do not embed it)."""
        name = self.tokenizer.get("name") or "bpe.model"
        return Path(self.dir) / name if self.dir else Path(name)


@dataclass
class CheckpointRecord:
    """A checkpoint's model options, data record and other hyper-parameters (see the module docstring)."""

    model: ModelConfig
    data: DataRecord
    hparams: dict = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.data.tokenizer["vocab_size"]

    def hyper_parameters(self) -> dict:
        """The flat ``hyper_parameters`` entry: the model options, then the others."""
        return {**self.model.options(), **self.hparams}

    def entries(self) -> dict:
        """The checkpoint entries of this record (to which the weights and Lightning's states are added)."""
        return {"hyper_parameters": self.hyper_parameters(), "data": asdict(self.data)}

    @classmethod
    def read(cls, checkpoint, where: str | Path = "checkpoint") -> CheckpointRecord:
        """The record of a loaded checkpoint dict, in any layout this repository has written;
        ``ValueError`` naming ``where`` for anything else."""
        hp = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
        if not hp or "reuse" not in hp:
            raise ValueError(f"{where}: not a checkpoint of train.py's CTCModule (no model hyper-parameters)")
        data = checkpoint.get("data")
        if isinstance(data, dict):
            record = DataRecord(**data)
        else:  # the top-level layout
            path = Path(hp.get("tokenizer_path", "bpe.model"))
            tok = checkpoint.get("tokenizer")
            if not isinstance(tok, dict):  # before tokenizers were embedded
                tok = {"vocab_size": hp.get("vocab_size"), "sha256": hp.get("tokenizer_sha256"), "model": None}
            tok = {"name": path.name, **tok}
            record = DataRecord(
                str(path.parent) if "tokenizer_path" in hp else None,
                tok,
                checkpoint.get("cmvn"),
                checkpoint.get("features"),
            )
        if record.tokenizer.get("vocab_size") is None:
            raise ValueError(f"{where}: not a checkpoint of train.py's CTCModule (no vocabulary size)")
        rest = {k: v for k, v in hp.items() if k not in MODEL_KEYS and k not in _NOT_HYPER_PARAMETERS}
        return cls(ModelConfig.from_mapping(hp), record, rest)

    def info(self, paths: list[Path]) -> dict:
        """The flat mapping :func:`load_model` returns: the hyper-parameters, ``tokenizer_path``,
        ``data_dir``, ``vocab_size``, ``tokenizer_sha256``, ``checkpoints``, ``cmvn``, ``features``."""
        return {
            **self.hyper_parameters(),
            "tokenizer_path": str(self.data.tokenizer_path),
            "data_dir": self.data.dir,
            "vocab_size": self.vocab_size,
            "tokenizer_sha256": self.data.tokenizer.get("sha256"),
            "checkpoints": [str(p) for p in paths],
            "cmvn": self.data.cmvn,
            "features": self.data.features,
        }

    def tokenizer(self, path: str | Path | None = None, where: str | Path = "the checkpoint") -> Tokenizer:
        """The embedded tokenizer, or (``path`` given, or a checkpoint that does not embed it) the
        file, which must be the one the model was trained with (``ValueError`` naming ``where``)."""
        tok = self.data.tokenizer
        if path is not None or tok.get("model") is None:
            tokenizer = Tokenizer(path or self.data.tokenizer_path)
        else:
            tokenizer = Tokenizer(self.data.tokenizer_path, tok["model"], tok.get("token_list"))
        if tokenizer.vocab_size != self.vocab_size or (
            tok.get("sha256") is not None and tokenizer.digest != tok["sha256"]
        ):
            raise ValueError(
                f"tokenizer {tokenizer.path} ({tokenizer.vocab_size} outputs) is not the one {where} "
                f"was trained with ({self.vocab_size} outputs, sha256 {tok.get('sha256')})"
            )
        return tokenizer


def write_checkpoint(path: str | Path, checkpoint: dict) -> None:
    """The one writer of checkpoint files (train.py's, through its checkpoint I/O, and
    :func:`save_model_checkpoint`'s): to a temporary file renamed into place, so that an
    interrupted write leaves the previous checkpoint intact; temporaries of a killed write are
    removed first. A full disk is one clear ``OSError``."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*"):  # left by a write that was killed (SIGKILL)
        stale.unlink(missing_ok=True)
    try:
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    except (OSError, RuntimeError) as e:  # disk full: torch reports "unexpected pos"
        raise OSError(
            f"{path}: cannot write the checkpoint ({str(e).splitlines()[0]}); is the disk full? "
            f"The previous checkpoint there is intact"
        ) from None


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
    numbered = {
        int(m.group(1)): p for p in ckpt.glob("epoch*.ckpt") if (m := re.fullmatch(r"epoch(\d+)\.ckpt", p.name))
    }
    epochs = [numbered[e] for e in sorted(numbered)]
    if len(epochs) < max(1, average):
        raise ValueError(f"{ckpt}: {len(epochs)} epoch checkpoints (epochNNN.ckpt), fewer than --average {average}")
    return epochs[-max(1, average) :]


def average_state_dicts(states: list[dict]) -> dict:
    """Element-wise mean of floating-point tensors; integer buffers (BatchNorm counters) from the last."""
    out = {}
    for key, value in states[-1].items():
        if torch.is_floating_point(value):
            out[key] = sum(s[key].double() for s in states).div(len(states)).to(value.dtype)
        else:
            out[key] = value
    return out


def embedded_tokenizer(tokenizer: Tokenizer) -> dict:
    """The tokenizer as a checkpoint embeds it (what :func:`tokenizer_record` reads back); with the
    output order of a converted ESPnet model (``token_list``) where it has one."""
    record = {
        "sha256": tokenizer.digest,
        "vocab_size": tokenizer.vocab_size,
        "model": tokenizer.model_bytes,
        "name": Path(tokenizer.path).name,
    }
    if tokenizer.token_list is not None:
        record["token_list"] = list(tokenizer.token_list)
    return record


def training_data_dir(hp: dict, data_dir: str | Path | None = None) -> Path:
    """``data_dir`` if given, else the prepared folder the model was trained from (``hp`` as
    :func:`load_model` returns it; the folder may have moved since)."""
    if data_dir:
        return Path(data_dir)
    if hp.get("data_dir"):
        return Path(hp["data_dir"])
    return Path(hp.get("tokenizer_path", ".")).parent


def load_model(
    ckpt: str | Path, average: int = 1, tokenizer_path: str | Path | None = None, device: str = "cpu"
) -> tuple[ConformerCTC, Tokenizer, dict]:
    """Model (eval mode), tokenizer and information (:meth:`CheckpointRecord.info`) from a
    checkpoint (or several, averaged). The tokenizer is the one embedded in the checkpoint (older
    checkpoints: the file they name); ``tokenizer_path`` may name a file, which must be the same
    model. ``cmvn`` in the information is the embedded statistics or None (see :func:`model_cmvn`)."""
    paths = checkpoint_paths(ckpt, average)
    loaded = []
    for p in paths:
        try:
            loaded.append(torch.load(p, map_location="cpu", weights_only=False))
        except Exception as e:  # truncated, empty or not a torch file at all
            raise ValueError(f"{p}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    record = CheckpointRecord.read(loaded[-1], paths[-1])
    tokenizer = record.tokenizer(tokenizer_path, paths[-1])
    model = ConformerCTC(record.vocab_size, record.model)
    states = [{k[len("model.") :]: v for k, v in c["state_dict"].items() if k.startswith("model.")} for c in loaded]
    try:
        model.load_state_dict(average_state_dicts(states) if len(states) > 1 else states[0])
    except RuntimeError as e:
        raise ValueError(f"{paths[-1]}: weights do not fit the model its hyper-parameters describe ({e})") from None
    return model.to(device).eval(), tokenizer, record.info(paths)


def model_cmvn(hp: dict, data_dir: str | Path | None = None) -> GlobalCMVN:
    """The feature normalisation a model was trained with: the statistics embedded in its
    checkpoint, or (older checkpoints) ``data_dir/cmvn.json``. Stays on the CPU, where the
    dataset applies it; batches are moved to the model's device afterwards."""
    if hp.get("cmvn") is not None:
        return GlobalCMVN(hp["cmvn"]["mean"], hp["cmvn"]["std"], dim=len(hp["cmvn"]["mean"]))
    if data_dir is None:
        raise ValueError(
            f"{hp['checkpoints'][-1]}: the checkpoint holds no CMVN statistics; give --data-dir "
            "(the prepared data folder with cmvn.json)"
        )
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
            and torch.allclose(ours.std, folder.std, rtol=1e-5, atol=1e-6)
        ):
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
    from data.espnet_frontend import frontend_of
    from data.features import FRAME_LENGTH_MS, FRAME_SHIFT_MS
    from data.framing import LabelFraming

    cmvn = model_cmvn(hp, data_dir)
    spec = hp.get("features")
    if spec is None:
        featurizer, hop, first_centre, frame_ms = None, FRAME_SHIFT_MS / 1000, FRAME_LENGTH_MS / 2000, FRAME_SHIFT_MS
    else:
        try:
            featurizer = frontend_of(spec)
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{hp['checkpoints'][-1]}: its feature record cannot be used ({e})") from None
        hop, first_centre, frame_ms = (
            featurizer.hop_length / featurizer.fs,
            featurizer.first_centre,
            featurizer.frame_ms,
        )
    framing = LabelFraming.of_front_end(model.frontend.input_layer, hop, first_centre, frame_ms)
    return cmvn, featurizer, framing


def save_model_checkpoint(path: str | Path, model: ConformerCTC, tokenizer: Tokenizer, hp: dict) -> None:
    """A self-contained checkpoint of ``model`` (weights, options, tokenizer, CMVN, the feature
    record of a converted model) that :func:`load_model` reads, e.g. averaged weights. ``hp``:
    :func:`load_model`'s information, or any mapping with ``cmvn``, ``features`` and the data folder
    (``data_dir``, or ``tokenizer_path``'s folder); its other entries that are not model options
    (``lr``, ``retrofit_from``, ...) are kept as hyper-parameters. The options are the model's own."""
    data_dir = hp.get("data_dir") or (Path(hp["tokenizer_path"]).parent if hp.get("tokenizer_path") else None)
    record = CheckpointRecord(
        model.model_config,
        DataRecord.of(tokenizer, data_dir, hp.get("cmvn"), hp.get("features")),
        {k: v for k, v in hp.items() if k not in MODEL_KEYS and k not in _INFO_KEYS},
    )
    write_checkpoint(path, {**record.entries(), "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}})
