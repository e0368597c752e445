"""The LightningDataModule of training: loaders over a prepared folder's manifests, with the
folder's tokenizer, CMVN and (for a converted model) front end. Batches: :mod:`data.dataset`."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import DataLoader

from data.dataset import ManifestDataset, collate, model_features
from data.features import GlobalCMVN, SpecAugment
from data.manifest import check_prepared, resolve_manifest
from data.sampler import FrameBucketSampler, ResumableLoader
from data.tokenizer import Tokenizer


def _lightning_base():
    import lightning

    return lightning.LightningDataModule


class ASRDataModule(_lightning_base()):
    """Training / validation / test loaders over prepared manifests.

    Args:
        data_dir: the ``--out`` folder of ``python -m data.prepare`` (manifests/, bpe.model, cmvn.json).
        train_sets, valid_sets, test_sets: manifest names (``mini-train``) or paths to ``.jsonl`` files.
        max_frames: padded 10 ms frames per batch (e.g. 20000 = 200 s of audio).
        num_workers: loader processes.
        spec_augment: apply SpecAugment (:class:`~data.features.SpecAugment`, the masks below) to training batches.
        with_labels: add encoder-frame phoneme labels (utterances without alignment are dropped).
        max_duration: drop training utterances longer than this (seconds).
    """

    def __init__(
        self,
        data_dir: str,
        train_sets: list[str] | None = None,
        valid_sets: list[str] | None = None,
        test_sets: list[str] | None = None,
        max_frames: int = 20000,
        num_workers: int = 2,
        spec_augment: bool = True,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 10,
        time_ratio: float = 0.05,
        num_buckets: int = 30,
        with_labels: bool = False,
        max_duration: float | None = None,
        seed: int = 0,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = check_prepared(data_dir)
        for required in ("bpe.model", "cmvn.json"):
            if not (self.data_dir / required).is_file():
                raise FileNotFoundError(
                    f"{self.data_dir / required}: missing; run `python -m data.prepare --out {data_dir}` first"
                )
        self.tokenizer = Tokenizer.open(self.data_dir / "bpe.model")  # in tokens.txt's order, if there is one
        self.cmvn = GlobalCMVN.load(self.data_dir / "cmvn.json")
        # a folder prepared for a converted model (data.prepare --inputs) names the model's own front end
        self.features, self.featurizer, self.framing = model_features(self.data_dir / "features.json")
        if self.features is not None and with_labels:
            raise ValueError(
                f"{self.data_dir / 'features.json'}: frame labels (with_labels) are not supported with "
                f"a converted model's front end in training"
            )
        for name in (train_sets or []) + (valid_sets or []) + (test_sets or []):
            self.manifest(name)

    def manifest(self, name: str) -> Path:
        """The manifest of a set name or ``.jsonl`` path (:func:`data.manifest.resolve_manifest`)."""
        return resolve_manifest(name, self.data_dir)

    def dataset(self, sets: list[str], train: bool = False) -> ManifestDataset:
        h = self.hparams
        aug = (
            SpecAugment(h.freq_masks, h.freq_width, h.time_masks, h.time_ratio) if (train and h.spec_augment) else None
        )
        return ManifestDataset(
            [self.manifest(s) for s in sets],
            self.tokenizer,
            self.cmvn,
            aug,
            h.with_labels,
            h.max_duration if train else None,
            seed=h.seed,
            featurizer=self.featurizer,
            framing=self.framing,
        )

    def loader(self, sets: list[str], train: bool = False) -> DataLoader:
        """Frame-bounded batches of ``sets``; for training shuffled, tagged with the epoch, and
        resumable (:class:`ResumableLoader`)."""
        ds = self.dataset(sets, train)
        sampler = FrameBucketSampler(
            [ds.num_frames(i) for i in range(len(ds))],
            self.hparams.max_frames,
            shuffle=train,
            num_buckets=self.hparams.num_buckets,
            seed=self.hparams.seed,
            tag_epoch=train,
        )
        kw = dict(
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.hparams.num_workers,
            persistent_workers=train and self.hparams.num_workers > 0,
        )
        return ResumableLoader(ds, self._train_progress, **kw) if train else DataLoader(ds, **kw)

    def train_dataloader(self):
        return self.loader(self.hparams.train_sets, train=True)

    def _train_progress(self) -> tuple[int, int | float]:
        """(batches of this epoch the trainer has processed, batches in its epoch). Processed, not
        completed: a checkpoint written at a batch's end (``every_n_train_steps``, a stop) is saved
        after the batch's step and before Lightning counts it completed."""
        t = self.trainer
        return t.fit_loop.epoch_loop.batch_progress.current.processed, t.num_training_batches

    def val_dataloader(self):
        return self.loader(self.hparams.valid_sets)

    def test_dataloader(self):
        return self.loader(self.hparams.test_sets)
