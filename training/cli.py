"""train.py's command line: Lightning's CLI over :class:`~training.module.CTCModule` and
:class:`~data.datamodule.ASRDataModule`, with the trainer's precision resolved for the hardware,
atomic checkpoint writes, and CSV / TensorBoard logs by default."""

from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from common.cli import user_errors
from data.datamodule import ASRDataModule
from models.checkpoint import CheckpointRecord, write_checkpoint
from models.precision import PrecisionChoice, resolve_training_precision
from training.attention_maps import AttentionMaps
from training.callbacks import default_callbacks
from training.module import CTCModule


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint I/O through :func:`models.checkpoint.write_checkpoint`: an
    interrupted write leaves the previous checkpoint intact. Remote paths are left to fsspec."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        write_checkpoint(path, checkpoint)


class ASRTrainer(L.Trainer):
    """Lightning's ``Trainer`` whose ``precision`` may also be ``"auto"`` (every recipe's default):
    resolved for the hardware by :func:`models.precision.resolve_training_precision` (bf16 mixed
    precision where the GPU or CPU computes bf16, fp16 mixed on GPUs without bf16, fp32 otherwise).
    The choice and its reason are printed at the start (rank 0), kept as ``precision_choice``, logged
    with the hyper-parameters and written into every checkpoint (``checkpoint["precision"]``). An
    explicit precision is kept, with a warning where the hardware emulates it."""

    def __init__(self, *, precision: Literal["auto"] | _PRECISION_INPUT | None = "auto", **kwargs):
        choice = None
        if precision is not None:
            choice = resolve_training_precision(precision, kwargs.get("accelerator", "auto"))
            precision = choice.precision
            _announce(choice)
        self.precision_choice: PrecisionChoice | None = choice
        super().__init__(precision=precision, **kwargs)


@rank_zero_only
def _announce(choice: PrecisionChoice) -> None:
    print(choice.describe(), file=sys.stderr, flush=True)
    if choice.warning:
        print(f"warning: {choice.warning}", file=sys.stderr, flush=True)


def tokenizer_of(data_dir: str) -> str:
    return str(Path(data_dir) / "bpe.model")


class ASRCLI(LightningCLI):
    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        for cb in trainer.checkpoint_callbacks:  # one predictable folder, not per logger version
            if hasattr(cb, "dirpath") and cb.dirpath is None:
                cb.dirpath = str(Path(trainer.default_root_dir) / "checkpoints")
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        if (self.config[self.subcommand] if self.subcommand else self.config).get("attention_maps"):
            trainer.callbacks.append(AttentionMaps())  # off: not created, nothing computed
        return trainer

    def before_instantiate_classes(self) -> None:
        """Without a logger in the recipe, log CSV and TensorBoard under ``default_root_dir``."""
        from jsonargparse import Namespace

        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if trainer.logger is None or trainer.logger is True:
            root = trainer.default_root_dir or "exp"
            trainer.logger = [
                Namespace(class_path=f"lightning.pytorch.loggers.{cls}", init_args=Namespace(save_dir=root, name=name))
                for cls, name in (("CSVLogger", "csv"), ("TensorBoardLogger", "tensorboard"))
            ]

    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.data_dir", "model.tokenizer_path", compute_fn=tokenizer_of)
        parser.add_argument(
            "--attention_maps",
            type=bool,
            default=True,
            help="at each validation, log one dev utterance's attention maps and per-layer CAD "
            "to TensorBoard (training/attention_maps.py)",
        )

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path FILE``: the model is built with the checkpoint's hyper-parameters (what
        Lightning's own method does), read in every layout (:class:`models.checkpoint.CheckpointRecord`)
        and limited to the module's init arguments: not ``tokenizer_path`` (linked from
        ``data.data_dir``, the data given now; the checkpoint's tokenizer digest is checked against it
        on loading) nor ``init_from`` (a resumed run restores its own weights; the base need not be
        there), nor what older layouts recorded beside them (``vocab_size``, ``tokenizer_sha256``,
        Lightning's ``_instantiator``). Lightning's method, which runs right after parsing, would
        pass all of them to the parser (which refuses the unknown ones); a public hook
        (``parse_arguments``, ``before_instantiate_classes``) runs before or after it, not instead."""
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise ValueError(f"--ckpt_path {ckpt_path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
        init = set(inspect.signature(CTCModule).parameters) - {"tokenizer_path", "init_from"}
        hparams = CheckpointRecord.read(ckpt, f"--ckpt_path {ckpt_path}").hyper_parameters()
        self.config = self.parser.parse_object(
            {self.config.subcommand: {"model": {k: v for k, v in hparams.items() if k in init}}}, self.config
        )


def main(args=None):
    torch.set_float32_matmul_precision("high")
    with user_errors():  # bad data, paths, checkpoints: one line naming what is at fault
        ASRCLI(
            CTCModule,
            ASRDataModule,
            trainer_class=ASRTrainer,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": default_callbacks(), "use_distributed_sampler": False},
            args=args,
        )
