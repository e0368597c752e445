"""``train.py`` as the DDP tests launch it: the real CLI, plus test instrumentation.

    python tests/ddp_fit.py fit --config ... --trainer.devices 2 --trainer.strategy ddp ...

Lightning's DDP launcher starts the other ranks by running this same command line, so every rank
gets the instrumentation:

- ``DDP_TEST_NAN=RANK:STEP``: the training loss of that rank at that optimiser step is NaN;
- ``DDP_TEST_OUT=DIR``: each rank writes ``DIR/rank<r>.json`` at the end of training (global
  step, skipped steps, the utterance ids of every validation pass) and ``DIR/rank<r>.pt`` (its
  final parameters), so that the test can compare the replicas.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from training import cli  # noqa: E402
from training.module import CTCModule  # noqa: E402


class Instrument(L.Callback):
    def __init__(self, out: Path):
        self.out, self.validated = out, []

    def on_validation_epoch_start(self, trainer, module):
        self.validated.append([])

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0):
        if batch is not None:
            self.validated[-1] += batch["ids"]

    def on_train_end(self, trainer, module):
        r = trainer.global_rank
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{r}.json").write_text(
            json.dumps(
                {
                    "rank": r,
                    "world_size": trainer.world_size,
                    "global_step": trainer.global_step,
                    "skipped_steps": module.skipped_steps,
                    "validated": self.validated,
                    "val_wer": float(trainer.callback_metrics["val_wer"])
                    if "val_wer" in trainer.callback_metrics
                    else None,
                }
            )
        )
        # parameters only: BatchNorm's running statistics are updated per rank after DDP broadcast
        # rank 0's at the start of the last forward (``broadcast_buffers``), so they differ by design
        torch.save({k: v.detach().cpu() for k, v in module.named_parameters()}, self.out / f"rank{r}.pt")


def main() -> None:
    nan_at = os.environ.get("DDP_TEST_NAN")
    if nan_at:
        rank, step = map(int, nan_at.split(":"))
        real = CTCModule.ctc_loss

        def poisoned(self, batch):
            loss, log_probs, out_lengths = real(self, batch)
            if self.training and self.global_rank == rank and self.global_step == step:
                loss = loss * float("nan")
            return loss, log_probs, out_lengths

        CTCModule.ctc_loss = poisoned
    out = os.environ.get("DDP_TEST_OUT")
    if out:
        callbacks = cli.default_callbacks

        def with_instrument(keep_last: int = 5):
            return [*callbacks(keep_last), Instrument(Path(out))]

        cli.default_callbacks = with_instrument  # what training.cli.main passes to the trainer
    cli.main()


if __name__ == "__main__":
    main()
