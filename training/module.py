"""The Lightning module of Conformer-CTC training (:class:`CTCModule`) and its learning-rate schedule."""

from __future__ import annotations

import os
import zlib
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch

from data.tokenizer import Tokenizer
from models import ConformerCTC
from models.checkpoint import CheckpointRecord, DataRecord
from models.config import MODEL_KEYS, takes_model_options
from models.ctc import ctc_loss
from models.decoding import greedy_decode, word_errors


def lr_lambda(step: int, warmup: int, hold: int, decay: int, final_scale: float) -> float:
    """The LR factor at optimiser step ``s`` (from 0): ``(s + 1) / warmup`` while ``s < warmup``, then 1
    for ``hold`` steps, then ``1 + (final_scale - 1) * min(1, (s - warmup - hold) / decay)``: a linear
    decay to ``final_scale`` (the recipes' defaults: 5 K / 95 K / 100 K steps, final scale 0.01)."""
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
        lr, weight_decay, betas, eps: AdamW (the recipes' values: 1.5e-3, 1e-5, (0.9, 0.99), 1e-8).
        warmup_steps, hold_steps, decay_steps, final_lr_scale: the LR schedule, in optimiser steps.
        weight_noise, weight_noise_start: variational weight noise std and first step (0 = off).
        init_from: start from a trained checkpoint of the same size (a retrofit when ``reuse`` is a
            reuse plan and the checkpoint a baseline: see :mod:`models.retrofit`); its tokenizer must be
            the data's. A resumed run (``--ckpt_path``) then restores its own weights over these.
        The model options (``reuse``, ``d_model``, ... ``input_layer``): the fields of
            :class:`models.config.ModelConfig`, keyword arguments listed in the signature (the
            recipes' ``model:`` keys and ``--model.*`` flags).
    """

    @takes_model_options
    def __init__(
        self,
        tokenizer_path: str,
        *,
        lr: float = 1.5e-3,
        weight_decay: float = 1e-5,
        betas: tuple[float, float] = (0.9, 0.99),
        eps: float = 1e-8,
        warmup_steps: int = 5000,
        hold_steps: int = 95000,
        decay_steps: int = 100000,
        final_lr_scale: float = 0.01,
        weight_noise: float = 0.0,
        weight_noise_start: int = 0,
        init_from: str | None = None,
        **model_options,
    ):
        training = {k: v for k, v in locals().items() if k not in ("self", "tokenizer_path", "model_options")}
        # not super(): its implicit ``__class__`` would make save_hyperparameters read this frame's
        # locals by the generated signature, where the model options are one **model_options
        L.LightningModule.__init__(self)
        # resolved: a checkpoint names its data folder whatever folder reads it
        self.tokenizer_path = str(Path(tokenizer_path).resolve())
        self.data_dir = Path(self.tokenizer_path).parent
        self.tokenizer = Tokenizer.open(self.tokenizer_path)  # in the order of a tokens.txt beside it, if any
        self.model = ConformerCTC(self.tokenizer.vocab_size, **model_options)
        # the hyper-parameters: the model's options and the training options (LightningCLI parses them
        # back from a checkpoint given as --ckpt_path FILE); the tokenizer, its data folder and the
        # CMVN statistics are the checkpoint's data record (:meth:`checkpoint_record`)
        self.save_hyperparameters({**self.model.model_config.options(), **training})
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
        from models.retrofit import retrofit

        base, tokenizer, hp = load_model(path)
        if tokenizer.digest != self.tokenizer.digest:
            raise ValueError(
                f"--model.init_from {path}: trained with another tokenizer (sha256 {tokenizer.digest}) than "
                f"{self.tokenizer_path} (sha256 {self.tokenizer.digest})"
            )
        ours, theirs = self.model.model_config.options("function"), base.model_config.options("function")
        differ = [f"{k} {theirs[k]} vs {ours[k]}" for k in ours if theirs[k] != ours[k]]
        if differ:
            raise ValueError(
                f"--model.init_from {path}: the checkpoint's model is not this recipe's size and function "
                f"({', '.join(differ)})"
            )
        differ = input_differences(hp, self.data_dir)
        if differ:
            raise ValueError(
                f"--model.init_from {path}: {'; '.join(differ)}: the fine-tuning would not start from the "
                f"checkpoint's function (prepare the data folder with the checkpoint's inputs)"
            )
        if base.reuse != self.model.reuse:
            base = retrofit(base, self.model.reuse)
        self.model.load_state_dict(base.state_dict())

    def ctc_loss(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        log_probs, out_lengths = self.model(batch["features"], batch["feature_lengths"])
        loss = ctc_loss(log_probs, out_lengths, batch["targets"], batch["target_lengths"]) / log_probs.shape[0]
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
        c = word_errors(batch["texts"], hyps)
        n = len(batch["ids"])
        self._val_counts += torch.tensor(
            [c["substitutions"] + c["deletions"] + c["insertions"], c["words"], float(loss) * n, n],
            dtype=torch.float64,
        )

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
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": h.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=h.lr,
            betas=tuple(h.betas),
            eps=h.eps,
        )
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_lambda(s, h.warmup_steps, h.hold_steps, h.decay_steps, h.final_lr_scale)
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --- exact resumption ------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Seed the global RNG (dropout, weight noise) from (seed, step, rank): a run resumed at any
        step draws what the uninterrupted run drew, whatever Lightning did with the RNG meanwhile.
        SpecAugment has its own per-utterance seeds (``data.datamodule``)."""
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        torch.manual_seed(zlib.crc32(f"{seed}/{self.global_step}/{self.global_rank}".encode()))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Makes the checkpoint self-contained (:meth:`checkpoint_record`), so that evaluation,
        analysis and resumption work from any folder, after the data folder is gone."""
        checkpoint["skipped_steps"] = self.skipped_steps
        checkpoint.update(self.checkpoint_record().entries())
        if (choice := self._precision_record()) is not None:
            checkpoint["precision"] = choice

    def checkpoint_record(self) -> CheckpointRecord:
        """The model's options, the hyper-parameters, and the data record: the SentencePiece model
        itself (with its digest and vocabulary size), the data folder, and the CMVN statistics and
        front-end record (a converted model's ``features.json``) of the data module, if any."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data = DataRecord.of(self.tokenizer, self.data_dir, getattr(dm, "cmvn", None), getattr(dm, "features", None))
        return CheckpointRecord(
            self.model.model_config, data, {k: v for k, v in self.hparams.items() if k not in MODEL_KEYS}
        )

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
        saved = CheckpointRecord.read(checkpoint).data.tokenizer.get("sha256")
        if saved is not None and saved != self.tokenizer.digest:
            raise ValueError(
                f"checkpoint was trained with another tokenizer (sha256 {saved}) than "
                f"{self.tokenizer_path} (sha256 {self.tokenizer.digest})"
            )
        self.skipped_steps = checkpoint.get("skipped_steps", 0)
