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

from training.callbacks import default_callbacks
from training.cli import ASRCLI, ASRTrainer, AtomicCheckpointIO, main, tokenizer_of
from training.module import CTCModule, lr_lambda

__all__ = [
    "ASRCLI",
    "ASRTrainer",
    "AtomicCheckpointIO",
    "CTCModule",
    "default_callbacks",
    "lr_lambda",
    "main",
    "tokenizer_of",
]

if __name__ == "__main__":
    main()
