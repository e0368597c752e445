"""train.py's callbacks: ``last.ckpt`` at every validation, epoch checkpoints of complete epochs
only, a checkpoint and a loud report where training stops inside an epoch, and progress lines."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, Timer


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
        if (
            self.save_last
            and not self._should_skip_saving_checkpoint(trainer)
            and self._should_save_on_train_epoch_end(trainer) == at_train_epoch_end
        ):
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
        where = (
            f"epoch {self.saved[1]} stopped after {self.saved[2]} of {trainer.num_training_batches} batches; "
            if self.saved
            else ""
        )
        saved = f"{self.saved[0]} holds step {step}; " if self.saved else ""
        if trainer.is_global_zero:
            print(
                f"warning: TRAINING CUT SHORT by {why}: step {step} of {planned} planned "
                f"({100 * step / planned:.0f} %), {where}the LR schedule ({schedule} steps) reached step "
                f"{min(step, schedule)} (lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}). {saved}No "
                f"checkpoint names the incomplete epoch. Resume with --ckpt_path last.",
                file=sys.stderr,
            )


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
            print(
                f"training: {planned if planned is not None else '?'} steps planned ({trainer.max_epochs} epochs of "
                f"{trainer.num_training_batches} batches), {sum(p.numel() for p in pl_module.parameters()) / 1e6:.2f}M "
                f"parameters, precision {trainer.precision}",
                flush=True,
            )

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
        BestAndLastCheckpoint(
            filename="best-{epoch}-{step}-{val_wer:.2f}",
            monitor="val_wer",
            mode="min",
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
        ),
        # epochNNN.ckpt once per epoch: a resumed run overwrites (no -v1), so averaging takes distinct epochs
        CompleteEpochCheckpoint(
            filename="epoch{epoch:03d}",
            monitor="step",
            mode="max",
            save_top_k=keep_last,
            auto_insert_metric_name=False,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        ),
        StopCheckpoint(),
        ProgressLines(),
    ]
