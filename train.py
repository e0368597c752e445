"""Train a Conformer-CTC recipe with Lightning.

    python train.py fit --config recipes/mini/conformer_1x4.yaml
    python train.py fit --config recipes/librispeech/conformer_m_4x4.yaml --trainer.devices 8
    python train.py fit --config ... --ckpt_path last            # resume (exactly, also inside an epoch)
    python train.py fit --config ... --ckpt_path RUN/checkpoints/epoch003.ckpt
    python train.py validate --config ... --ckpt_path FILE        # also test; DDP too

Everything is configured by the recipe YAML (``--print_config`` shows every key); an unknown key
or a bad value stops the run before anything is trained. Logs, checkpoints (``last.ckpt``, the
best by dev WER, and the latest ``keep_last`` for averaging) go to ``trainer.default_root_dir``.
"""
from __future__ import annotations

import os
import sys
import time
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import jiwer
import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.connector import _PRECISION_INPUT
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, Timer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from data.datamodule import ASRDataModule
from common.io import atomic_write
from data.tokenizer import BLANK, Tokenizer
from models import ConformerCTC
from models.checkpoint import embedded_tokenizer, tokenizer_record
from models.decoding import greedy_decode
from models.precision import PrecisionChoice, resolve_training_precision


def lr_lambda(step: int, warmup: int, hold: int, decay: int, final_scale: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, held ``hold`` steps, then linear decay to
    ``final_scale`` over ``decay`` steps (SPEC section 3: 5 K / 95 K / 100 K)."""
    if step < warmup:
        return (step + 1) / warmup
    if step < warmup + hold:
        return 1.0
    t = min(1.0, (step - warmup - hold) / max(1, decay))
    return 1.0 + (final_scale - 1.0) * t


class CTCModule(L.LightningModule):
    """Conformer-CTC training: CTC loss in fp32, AdamW with warm-up / hold / decay, greedy dev WER.

    Args:
        tokenizer_path: SentencePiece model (linked from ``data.data_dir``); fixes the vocabulary.
        reuse, d_model, num_layers, ffn_dim, kernel_size, dropout, attention_dropout, was_gamma,
            bn_momentum, subsampling_channels, layer_norm_eps, final_norm, input_layer: the model (see
            :class:`models.ConformerCTC`; the last three hold converted ESPnet models).
        lr, weight_decay, betas, eps: AdamW (SPEC: 1.5e-3, 1e-5, (0.9, 0.99), 1e-8).
        warmup_steps, hold_steps, decay_steps, final_lr_scale: the LR schedule, in optimiser steps.
        weight_noise, weight_noise_start: variational weight noise std and first step (0 = off).
        init_from: start from a trained checkpoint of the same size (a retrofit when ``reuse`` is a
            reuse plan and the checkpoint a baseline: see :mod:`models.retrofit`); its tokenizer must be
            the data's. A resumed run (``--ckpt_path``) then restores its own weights over these.
    """

    def __init__(self, tokenizer_path: str, reuse: str = "1(H4)x16", d_model: int = 256, num_layers: int = 16,
                 ffn_dim: int = 1024, kernel_size: int = 31, dropout: float = 0.1, attention_dropout: float = 0.1,
                 was_gamma: float | None = None, bn_momentum: float = 0.005, subsampling_channels: int = 256,
                 input_dim: int = 80, lr: float = 1.5e-3, weight_decay: float = 1e-5,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8, warmup_steps: int = 5000,
                 hold_steps: int = 95000, decay_steps: int = 100000, final_lr_scale: float = 0.01,
                 weight_noise: float = 0.0, weight_noise_start: int = 0, init_from: str | None = None,
                 layer_norm_eps: float = 1e-5, final_norm: bool = False, input_layer: str = "conv2d"):
        super().__init__()
        # resolved: a checkpoint names its data folder (training_data_dir) whatever folder reads it
        tokenizer_path = str(Path(tokenizer_path).resolve())
        self.tokenizer = Tokenizer.open(tokenizer_path)  # in the order of a tokens.txt beside it, if any
        # hyper-parameters are exactly the init arguments (LightningCLI parses them back from a
        # checkpoint given as --ckpt_path FILE); the tokenizer itself, its digest and the CMVN
        # statistics go into the checkpoint beside them (:meth:`on_save_checkpoint`)
        self.save_hyperparameters()
        self.model = ConformerCTC(self.tokenizer.vocab_size, input_dim=input_dim, d_model=d_model,
                                  num_layers=num_layers, ffn_dim=ffn_dim, kernel_size=kernel_size, reuse=reuse,
                                  dropout=dropout, attention_dropout=attention_dropout,
                                  subsampling_channels=subsampling_channels, was_gamma=was_gamma,
                                  bn_momentum=bn_momentum, layer_norm_eps=layer_norm_eps, final_norm=final_norm,
                                  input_layer=input_layer)
        if init_from:
            self._init_from(init_from)
        self.skipped_steps = 0
        self._skip_this_step = False
        self._clean_weights: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._val_counts = torch.zeros(4, dtype=torch.float64)  # errors, words, loss sum, utterances

    def _init_from(self, path: str) -> None:
        """Starts from the checkpoint's function (retrofitted to this recipe's plan, as models.retrofit
        does): refuses a recipe or data folder that would change it, naming the difference."""
        from models.checkpoint import input_differences, load_model
        from models.retrofit import FUNCTION_OPTIONS, retrofit

        base, tokenizer, hp = load_model(path)
        if tokenizer.digest != self.tokenizer.digest:
            raise ValueError(f"--model.init_from {path}: trained with another tokenizer (sha256 {tokenizer.digest}) than "
                             f"{self.hparams.tokenizer_path} (sha256 {self.tokenizer.digest})")
        differ = [f"{k} {base.config[k]} vs {self.model.config[k]}" for k in FUNCTION_OPTIONS
                  if base.config[k] != self.model.config[k]]
        if differ:
            raise ValueError(f"--model.init_from {path}: the checkpoint's model is not this recipe's size and function "
                             f"({', '.join(differ)})")
        differ = input_differences(hp, Path(self.hparams.tokenizer_path).parent)
        if differ:
            raise ValueError(f"--model.init_from {path}: {'; '.join(differ)}: the fine-tuning would not start from the "
                             f"checkpoint's function (prepare the data folder with the checkpoint's inputs)")
        if base.reuse != self.model.reuse:
            base = retrofit(base, self.model.reuse)
        self.model.load_state_dict(base.state_dict())

    def ctc_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs, out_lengths = self.model(batch["features"], batch["feature_lengths"])
        loss = F.ctc_loss(log_probs.float().transpose(0, 1), batch["targets"], out_lengths, batch["target_lengths"],
                          blank=BLANK, reduction="sum", zero_infinity=True) / log_probs.shape[0]
        return loss, log_probs, out_lengths

    # --- variational weight noise ----------------------------------------------------------
    def _add_weight_noise(self) -> None:
        """Adds Gaussian noise to every weight matrix for one forward/backward; the clean values are
        kept and copied back (not the noise subtracted: ``w + n - n`` is not ``w`` in floating point,
        and DDP replicas, whose noise differs per rank, would drift apart)."""
        std = self.hparams.weight_noise
        if std <= 0 or self.global_step < self.hparams.weight_noise_start:
            return
        with torch.no_grad():
            for p in self.model.parameters():
                if p.requires_grad and p.dim() > 1:
                    self._clean_weights.append((p, p.detach().clone()))
                    p.add_(torch.randn_like(p) * std)

    def _remove_weight_noise(self) -> None:
        with torch.no_grad():
            for p, clean in self._clean_weights:
                p.copy_(clean)
        self._clean_weights.clear()

    def on_after_backward(self) -> None:
        self._remove_weight_noise()

    # --- steps -------------------------------------------------------------------------------
    def _zero_loss(self) -> torch.Tensor:
        """0 times the sum of every trainable parameter: a loss whose backward gives zero gradients
        and still visits every parameter, so DDP's gradient all-reduce runs on this rank too."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def training_step(self, batch, batch_idx):
        """A batch that failed to load (None) or a non-finite loss skips the step. Under DDP the
        decision is taken jointly (one all-reduce of a flag): every rank then backpropagates a zero
        loss (the gradient all-reduce is entered on every rank, nothing hangs) and
        :meth:`on_before_optimizer_step` drops the gradients, so no rank changes its weights."""
        self._skip_this_step = False
        loss = None
        if batch is not None:
            self._add_weight_noise()
            loss, _, _ = self.ctc_loss(batch)
        # on the device, read once after the all-reduce: one host sync per step
        bad = torch.ones((), device=self.device) if loss is None else (~torch.isfinite(loss.detach())).float()
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce(bad, reduce_op="sum")
        if bad.item() > 0:
            self._remove_weight_noise()
            self._skip_this_step = True
            return self._zero_loss()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(batch["ids"]))
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, prog_bar=False)
        return loss

    def _count_skip(self) -> None:
        self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        """Drops the step when :meth:`training_step` decided to skip it or a gradient is not finite
        (checked with one fused reduction and one host read; under DDP the gradients are already
        all-reduced, so every rank decides alike). AdamW leaves parameters without gradient untouched."""
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        skip = self._skip_this_step
        if not skip and grads:
            norms = torch._foreach_norm(grads)
            skip = not bool(torch.isfinite(torch.stack(norms)).all())
        if skip:
            for p in self.parameters():
                p.grad = None
            self._count_skip()
        self._skip_this_step = False

    def validation_step(self, batch, batch_idx):
        if batch is None:
            return
        loss, log_probs, out_lengths = self.ctc_loss(batch)
        hyps = [self.tokenizer.decode(h) for h in greedy_decode(log_probs, out_lengths)]
        m = jiwer.process_words(batch["texts"], hyps)
        n = len(batch["ids"])
        self._val_counts += torch.tensor([m.substitutions + m.deletions + m.insertions,
                                          m.hits + m.substitutions + m.deletions, float(loss) * n, n],
                                         dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        """``val_wer`` and ``val/loss`` over every utterance of every rank: one all-reduce of the
        counts, entered by every rank (also one that got no batch), then logged unsynchronised."""
        t = self._val_counts.to(self.device)
        self._val_counts = torch.zeros_like(self._val_counts)
        if self.trainer.world_size > 1:
            t = self.trainer.strategy.reduce(t, reduce_op="sum")
        errors, words, loss_sum, utterances = t.tolist()
        if utterances == 0:
            return
        self.log("val_wer", 100.0 * errors / max(1.0, words), prog_bar=True)
        self.log("val/loss", loss_sum / utterances, prog_bar=True)
        self.log("val/utterances", utterances)

    def configure_optimizers(self):
        h = self.hparams
        decay, no_decay = [], []
        for n, p in self.model.named_parameters():
            (no_decay if p.dim() < 2 or n.endswith((".bias", "pos_bias_u", "pos_bias_v")) else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=h.lr, betas=tuple(h.betas), eps=h.eps)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, h.warmup_steps, h.hold_steps, h.decay_steps, h.final_lr_scale))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- exact resumption ------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Seed the global RNG (dropout, weight noise) from (seed, step, rank): a run resumed at any
        step draws what the uninterrupted run drew, whatever Lightning did with the RNG meanwhile.
        SpecAugment has its own per-utterance seeds (``data.datamodule``)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(zlib.crc32(f"{seed}/{self.global_step}/{self.global_rank}".encode()))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Makes the checkpoint self-contained: the SentencePiece model itself (with its digest and
        the vocabulary size) and the CMVN statistics of the data it was trained on, so that
        evaluation, analysis and resumption work from any folder, after the data folder is gone."""
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint["tokenizer"] = embedded_tokenizer(self.tokenizer)
        if (choice := self._precision_record()) is not None:
            checkpoint["precision"] = choice
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        cmvn = getattr(dm, "cmvn", None)
        if cmvn is not None:
            checkpoint["cmvn"] = {"mean": cmvn.mean.detach().cpu().clone(), "std": cmvn.std.detach().cpu().clone()}
        if getattr(dm, "features", None) is not None:  # a converted model's front end (features.json)
            checkpoint["features"] = dm.features

    def _precision_record(self) -> dict | None:
        """The trainer's precision and why it was chosen (:class:`ASRTrainer`), or None without a trainer."""
        if self._trainer is None:
            return None
        choice = getattr(self.trainer, "precision_choice", None)
        return asdict(choice) if choice is not None else {"precision": str(self.trainer.precision)}

    def on_fit_start(self) -> None:
        """Logs the precision (and its reason) beside the hyper-parameters (``hparams.yaml``, TensorBoard)."""
        record = self._precision_record()
        for logger in self.loggers:
            logger.log_hyperparams({f"precision/{k}": v for k, v in record.items() if v is not None})

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Refuses a checkpoint trained with another tokenizer (clear message before any step)."""
        saved = tokenizer_record(checkpoint)[1]
        if saved is not None and saved != self.tokenizer.digest:
            raise ValueError(f"checkpoint was trained with another tokenizer (sha256 {saved}) than "
                             f"{self.hparams.tokenizer_path} (sha256 {self.tokenizer.digest})")
        self.skipped_steps = checkpoint.get("skipped_steps", 0)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it into place, so an interrupted
    write leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        if "://" in str(path):  # remote storage: leave it to fsspec
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        for stale in path.parent.glob(f".{path.name}.*"):  # left by a write that was killed (SIGKILL)
            stale.unlink(missing_ok=True)
        try:
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
        except (OSError, RuntimeError) as e:  # disk full: torch reports "unexpected pos"
            raise OSError(f"{path}: cannot write the checkpoint ({str(e).splitlines()[0]}); is the disk full? "
                          f"The previous checkpoint there is intact") from None


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

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path FILE``: Lightning parses the checkpoint's hyper-parameters back as the
        model's init arguments. Only real init arguments are kept: not ``tokenizer_path`` (linked
        from ``data.data_dir``, the data given now; the checkpoint's tokenizer digest is checked
        against it on loading) nor what older checkpoints recorded beside them (``vocab_size``,
        ``tokenizer_sha256``)."""
        import inspect

        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return super()._parse_ckpt_path()
        try:
            ckpt = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        except Exception as e:
            raise SystemExit(f"error: --ckpt_path {ckpt_path}: not a readable checkpoint ({type(e).__name__}: {e})")
        # not init_from either: a resumed run restores its own weights (the base need not be there)
        init = set(inspect.signature(CTCModule.__init__).parameters) - {"self", "tokenizer_path", "init_from"}
        hparams = {k: v for k, v in (ckpt.get("hyper_parameters") or {}).items() if k in init}
        if hparams:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)


def _epoch_complete(trainer) -> bool:
    """Whether the running epoch has processed its last batch (``limit_train_batches`` counted)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed >= trainer.num_training_batches


class BestAndLastCheckpoint(ModelCheckpoint):
    """The best checkpoint by the monitored metric, and ``last.ckpt`` at *every* validation.
    Lightning 2.6 refreshes ``last.ckpt`` only when a top-k checkpoint was saved at the same step,
    so with ``save_top_k=1`` it stayed at the best step whenever the metric did not improve (and
    ``--ckpt_path last`` resumed from there). At the end of an epoch cut short it writes nothing
    (:class:`StopCheckpoint` saves where the run stopped, resumable inside the epoch)."""

    def _save_last_if_not_saved(self, trainer, at_train_epoch_end: bool) -> None:
        if (self.save_last and not self._should_skip_saving_checkpoint(trainer)
                and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if _epoch_complete(trainer):  # a cut epoch's last.ckpt is StopCheckpoint's, where it stopped
            self._save_last_if_not_saved(trainer, at_train_epoch_end=True)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        self._save_last_if_not_saved(trainer, at_train_epoch_end=False)


class CompleteEpochCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint written only at the end of a *complete* epoch (never after a run cut by
    ``max_time`` or a stop inside it), so that averaging takes whole epochs."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if _epoch_complete(trainer):
            super().on_train_epoch_end(trainer, pl_module)


class StopCheckpoint(Checkpoint):
    """When training stops inside an epoch (``max_time``, a stop signal, early stopping), saves
    ``last.ckpt`` at the step where it stopped, resumable exactly (the loader's position is in it),
    and says loudly, at the end of training, how far the schedule got, so that a cut run is never
    mistaken for a whole one. (A ``Checkpoint``: Lightning runs it after the other callbacks, so it
    sees the stop that ``Timer`` decides at the same batch.)"""

    def __init__(self):
        self.saved: tuple[Path, int, int] | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        ckpt_dir = getattr(trainer.checkpoint_callback, "dirpath", None)
        if trainer.should_stop and not _epoch_complete(trainer) and ckpt_dir:
            path = Path(ckpt_dir) / "last.ckpt"
            trainer.save_checkpoint(path)  # every rank calls it; rank 0 writes
            self.saved = (path, trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def on_train_end(self, trainer, pl_module) -> None:
        planned, step = _planned_steps(trainer), trainer.global_step
        if planned is None or step >= planned:
            return
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        remaining = timer.time_remaining() if timer is not None else None
        why = "max_time" if remaining is not None and remaining <= 0 else "a stop before the end"
        h = pl_module.hparams
        schedule = h.warmup_steps + h.hold_steps + h.decay_steps
        where = (f"epoch {self.saved[1]} stopped after {self.saved[2]} of {trainer.num_training_batches} batches; "
                 if self.saved else "")
        saved = f"{self.saved[0]} holds step {step}; " if self.saved else ""
        if trainer.is_global_zero:
            print(f"warning: TRAINING CUT SHORT by {why}: step {step} of {planned} planned "
                  f"({100 * step / planned:.0f} %), {where}the LR schedule ({schedule} steps) reached step "
                  f"{min(step, schedule)} (lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}). {saved}No "
                  f"checkpoint names the incomplete epoch. Resume with --ckpt_path last.", file=sys.stderr)


class ProgressLines(Callback):
    """Signs of life where the progress bar is off (``make demo``, log files): one line when training
    starts (steps planned, precision) and one per validation (epoch, step, mean training loss since
    the last line, dev WER and loss, elapsed time), on rank 0. Nothing where a progress bar is shown."""

    def __init__(self):
        self.start, self.loss_sum, self.loss_steps = 0.0, 0.0, 0

    def _active(self, trainer) -> bool:
        return trainer.is_global_zero and trainer.progress_bar_callback is None and not trainer.sanity_checking

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = time.monotonic()
        if self._active(trainer):
            planned = _planned_steps(trainer)
            print(f"training: {planned if planned is not None else '?'} steps planned ({trainer.max_epochs} epochs of "
                  f"{trainer.num_training_batches} batches), {sum(p.numel() for p in pl_module.parameters()) / 1e6:.2f}M "
                  f"parameters, precision {trainer.precision}", flush=True)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._active(trainer) and outputs is not None and not getattr(pl_module, "_skip_this_step", False):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            self.loss_sum = self.loss_sum + loss.detach()  # on the device: read once per line
            self.loss_steps += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._active(trainer) or trainer.state.fn != "fit":
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}", f"step {trainer.global_step}"]
        if self.loss_steps:
            parts.append(f"train loss {float(self.loss_sum) / self.loss_steps:.2f}")
        self.loss_sum, self.loss_steps = 0.0, 0
        for key, fmt in (("val_wer", "dev WER {:.2f} %"), ("val/loss", "dev loss {:.3f}")):
            if key in m:
                parts.append(fmt.format(float(m[key])))
        elapsed = int(time.monotonic() - self.start)
        parts.append(f"{elapsed // 60}m{elapsed % 60:02d}s")
        print("  ".join(parts), flush=True)


def _planned_steps(trainer) -> int | None:
    if trainer.max_steps and trainer.max_steps > 0:
        return trainer.max_steps
    if trainer.max_epochs is not None and trainer.max_epochs > 0 and trainer.num_training_batches != float("inf"):
        return int(trainer.max_epochs * -(-trainer.num_training_batches // trainer.accumulate_grad_batches))
    return None


def default_callbacks(keep_last: int = 5):
    """``last.ckpt``, the best by dev WER, the ``keep_last`` latest complete epochs (for averaging),
    and the end-of-training report of a cut schedule. A step interval for checkpoints (e.g. to
    lose little on an interruption) is one more callback in the recipe:
    ``trainer.callbacks: [{class_path: ModelCheckpoint, init_args: {every_n_train_steps: 1000}}]``."""
    return [
        BestAndLastCheckpoint(filename="best-{epoch}-{step}-{val_wer:.2f}", monitor="val_wer", mode="min",
                              save_top_k=1, save_last=True, auto_insert_metric_name=False),
        # epochNNN.ckpt once per epoch: a resumed run overwrites (no -v1), so averaging takes distinct epochs
        CompleteEpochCheckpoint(filename="epoch{epoch:03d}", monitor="step", mode="max", save_top_k=keep_last,
                                auto_insert_metric_name=False, save_on_train_epoch_end=True,
                                enable_version_counter=False),
        StopCheckpoint(),
        ProgressLines(),
    ]


def main(args=None):
    torch.set_float32_matmul_precision("high")
    try:
        ASRCLI(
            CTCModule, ASRDataModule, trainer_class=ASRTrainer, seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            trainer_defaults={"callbacks": default_callbacks(), "use_distributed_sampler": False},
            args=args,
        )
    except (OSError, ValueError) as e:  # bad data, paths, checkpoints: one line naming what is at fault
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        sys.exit(f"error: {e}\n(set TRAIN_TRACEBACK=1 for the traceback)")


if __name__ == "__main__":
    main()
