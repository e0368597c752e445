"""Batches for training and analysis: a dataset over manifests, a frame-bounded bucketing batch
sampler, and a LightningDataModule.

A batch is a dict::

    features        (B, T, 80) float, CMVN-normalised (SpecAugment in training)
    feature_lengths (B,)       long
    targets         (B, U)     long, CTC output indices padded with 0 (blank)
    target_lengths  (B,)       long
    labels          (B, T')    long, 37-way encoder-frame phoneme labels, -100 where unknown
                               (only with ``with_labels=True``)
    ids, texts                 lists of str

An utterance that fails to load is reported once and left out of its batch: a long run never
dies on one bad file.
"""
from __future__ import annotations

import math
import os
import random
import warnings
import zlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from data.alignments import AlignmentError, read_textgrid
from data.features import (FRAME_SHIFT_MS, MIN_FRAMES, SAMPLE_RATE, AudioError, GlobalCMVN, SpecAugment, fbank,
                           load_audio, too_short)
from data.prepare import check_prepared, read_manifest
from data.text import normalise
from data.tokenizer import Tokenizer

IGNORE_LABEL = -100
# The Conv2d front end (2 x kernel 3, stride 2) maps 10 ms frames to 40 ms encoder frames; each
# encoder frame m sees input frames 4m..4m+6, i.e. audio [0.04 m, 0.04 m + 0.085) s.
ENCODER_SHIFT = 0.04
ENCODER_WINDOW = 0.085


def encoder_frames(num_frames: int) -> int:
    """Encoder frames after the 4x Conv2d subsampling of ``num_frames`` 10 ms frames."""
    return max(0, ((num_frames - 1) // 2 - 1) // 2)


class LabelFraming:
    """How a model's frames map to time, for frame labels: ``count(num_feature_frames)`` model
    frames, frame ``k`` centred at ``k * shift + window / 2`` seconds. Default: our 40 ms encoder
    frames over 10 ms fbank frames.

    ``count``: feature frames -> model frames (default: ours, :func:`encoder_frames`; the identity
    when not ``subsampled``); ``min_frames``: the fewest feature frames the model takes (ours: 7;
    1 when not subsampled); ``frame_ms``: the feature frame shift, for messages. A picklable
    ``count`` (e.g. a ``functools.partial``) keeps loader workers possible."""

    def __init__(self, shift: float = ENCODER_SHIFT, window: float = ENCODER_WINDOW, subsampled: bool = True,
                 count=None, min_frames: int | None = None, frame_ms: float = FRAME_SHIFT_MS):
        self.shift, self.window, self.subsampled = shift, window, subsampled
        self._count = count or (encoder_frames if subsampled else None)
        self.min_frames = min_frames if min_frames is not None else (MIN_FRAMES if subsampled else 1)
        self.frame_ms = frame_ms

    def count(self, num_frames: int) -> int:
        return self._count(num_frames) if self._count is not None else num_frames

    def too_short(self, num_frames: int) -> str | None:
        """Why ``num_frames`` feature frames are too few for the model, or None."""
        return too_short(num_frames, self.min_frames, self.frame_ms) if self.subsampled else None


class ManifestDataset(Dataset):
    """Utterances of one or more JSONL manifests, as features, token ids and optional labels.

    ``featurizer`` maps a 16 kHz waveform to features (default: our 80-dim fbank; one with a
    ``num_frames(samples)`` method, e.g. ESPnet's front end, sizes batches and finds too short
    utterances by its own frames); ``framing`` places the model's frames in time for the labels
    and says how many feature frames the model needs (default: 40 ms encoder frames, >= 7).
    """

    def __init__(self, manifests: list[str | Path], tokenizer: Tokenizer | None = None, cmvn: GlobalCMVN | None = None,
                 spec_augment: SpecAugment | None = None, with_labels: bool = False, max_duration: float | None = None,
                 seed: int = 0, featurizer=None, framing: LabelFraming | None = None):
        self.entries = []
        self.manifests = [str(m) for m in manifests]
        for m in manifests:
            entries = read_manifest(m)
            missing = [e for e in entries if not os.path.isfile(e["audio"])]
            if missing:  # a moved corpus: say so before any work starts
                raise FileNotFoundError(f"{m}: audio of {len(missing)} of {len(entries)} utterances is missing, "
                                        f"e.g. {missing[0]['id']}: {missing[0]['audio']}")
            self.entries += entries
        self.featurizer = featurizer or fbank
        self.framing = framing or LabelFraming()
        # utterances left out, with the reason: too short here, unreadable when first loaded
        self.skipped: dict[str, str] = {}
        for e in self.entries:
            e["text"] = normalise(e["text"])  # one rule for targets and references (data.text)
            if why := self.framing.too_short(self._feature_frames(e)):
                self.skipped[e["id"]] = why
        if self.skipped:
            warnings.warn(f"{', '.join(map(str, manifests))}: {len(self.skipped)} utterances are too short for the "
                          f"model and skipped, e.g. {next(iter(self.skipped))}", stacklevel=2)
            self.entries = [e for e in self.entries if e["id"] not in self.skipped]
        if max_duration is not None:
            self.entries = [e for e in self.entries if e["duration"] <= max_duration]
        if with_labels:
            self.entries = [e for e in self.entries if e.get("alignment")]
        if not self.entries:
            raise ValueError(f"no usable utterance in {', '.join(map(str, manifests))}"
                             + (" with an alignment" if with_labels else ""))
        self.tokenizer, self.cmvn, self.spec_augment, self.with_labels = tokenizer, cmvn, spec_augment, with_labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def _feature_frames(self, e: dict) -> int:
        if hasattr(self.featurizer, "num_frames"):
            return self.featurizer.num_frames(round(e["duration"] * SAMPLE_RATE))
        return int(e.get("num_frames") or round(e["duration"] * 100))

    def num_frames(self, i: int) -> int:
        """Feature frames of utterance ``i`` (for batching by frames)."""
        return self._feature_frames(self.entries[i])

    def __getitem__(self, key: int | tuple[int, int]) -> dict | None:
        """Item ``key`` = index, or ``(index, epoch)`` from a sampler with ``tag_epoch=True``."""
        i, epoch = key if isinstance(key, tuple) else (key, 0)
        e = self.entries[i]
        try:
            feats = self.featurizer(load_audio(e["audio"]))
            if why := self.framing.too_short(feats.shape[0]):
                raise ValueError(why)
            item = {"id": e["id"], "text": e["text"]}
            if self.cmvn is not None:
                feats = self.cmvn(feats)
            if self.spec_augment is not None:
                # masks depend on (seed, epoch, utterance) only: the same whatever the worker count,
                # and a resumed run draws exactly the masks the uninterrupted run would have drawn
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(zlib.crc32(f"{self.seed}/{epoch}/{e['id']}".encode()))
                    feats = self.spec_augment(feats)
            item["features"] = feats
            if self.tokenizer is not None:
                item["targets"] = torch.tensor(self.tokenizer.encode(e["text"]), dtype=torch.long)
            if self.with_labels:
                n = self.framing.count(feats.shape[0])
                item["labels"] = read_textgrid(e["alignment"]).frame_labels(n, self.framing.shift, self.framing.window)
            return item
        except (AudioError, AlignmentError, ValueError) as err:
            if e["id"] not in self.skipped:
                self.skipped[e["id"]] = str(err)
                warnings.warn(f"skipping utterance {e['id']}: {err}", stacklevel=1)
            return None


def collate(items: list[dict | None]) -> dict | None:
    """Pad a list of dataset items into a batch; items that failed to load (None) are dropped."""
    items = [x for x in items if x is not None]
    if not items:
        return None
    lengths = torch.tensor([x["features"].shape[0] for x in items], dtype=torch.long)
    batch = {
        "ids": [x["id"] for x in items],
        "texts": [x["text"] for x in items],
        "features": torch.nn.utils.rnn.pad_sequence([x["features"] for x in items], batch_first=True),
        "feature_lengths": lengths,
    }
    if "targets" in items[0]:
        batch["targets"] = torch.nn.utils.rnn.pad_sequence([x["targets"] for x in items], batch_first=True)
        batch["target_lengths"] = torch.tensor([len(x["targets"]) for x in items], dtype=torch.long)
    if "labels" in items[0]:
        batch["labels"] = torch.nn.utils.rnn.pad_sequence([x["labels"] for x in items], batch_first=True,
                                                          padding_value=IGNORE_LABEL)
    return batch


class FrameBucketSampler(Sampler[list[int]]):
    """Batches whose padded size (``max frames x utterances``) stays under ``max_frames``.

    Utterances are sorted by length into ``num_buckets`` buckets; with ``shuffle`` the
    utterances inside each bucket and the order of the batches are shuffled, differently each
    epoch (:meth:`set_epoch`) but deterministically for a seed. With ``tag_epoch`` the batches
    hold ``(index, epoch)`` pairs (for per-epoch augmentation in the dataset).

    Under DDP (``world_size > 1``) each rank takes every ``world_size``-th batch. With ``even``
    (training) every rank gets the same number of batches, the last ``len % world_size`` being
    left out (DDP needs one gradient all-reduce per step on every rank); without it (evaluation)
    no batch is left out, so that every utterance is scored exactly once, and a rank short of a
    batch gets an empty one (which collates to None), so that every rank runs as many steps and
    none skips the evaluation loop, and the reductions at its end, for having nothing to do.

    Resumable: :meth:`state_dict` / :meth:`load_state_dict` hold ``(epoch, position)``, the
    epoch and the number of its batches already consumed; after :meth:`load_state_dict` the next
    iteration yields that epoch's batches from ``position`` on (or, if it was complete, the next
    epoch's), whatever epoch a trainer announces in between.
    """

    def __init__(self, lengths: list[int], max_frames: int, shuffle: bool = True, num_buckets: int = 30, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, tag_epoch: bool = False, even: bool | None = None):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        too_long = [i for i, n in enumerate(lengths) if n > max_frames]
        if too_long:
            warnings.warn(f"{len(too_long)} utterances longer than max_frames={max_frames} get batches of their own",
                          stacklevel=2)
        self.lengths, self.max_frames, self.shuffle = list(lengths), max_frames, shuffle
        self.num_buckets, self.seed, self.epoch, self.tag_epoch = max(1, num_buckets), seed, 0, tag_epoch
        self.even = shuffle if even is None else even
        if world_size is None and torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        self.rank, self.world_size = rank or 0, world_size or 1
        # Lightning calls ``set_epoch`` on ``batch_sampler.sampler`` (not on the batch sampler):
        # point that attribute at ourselves so that shuffling really changes every epoch.
        self.sampler = self
        self._cache: tuple[int, list[list[int]]] | None = None
        self._resume: tuple[int, int] | None = None

    def set_epoch(self, epoch: int) -> None:
        if self._resume is None:  # a restored state decides the epoch of the next iteration
            self.epoch = epoch

    def state_dict(self, position: int = 0) -> dict:
        """``{"epoch", "position"}``: ``position`` batches of the current epoch were consumed (the
        caller knows how many: loaders fetch ahead)."""
        return {"epoch": self.epoch, "position": int(position)}

    def load_state_dict(self, state: dict) -> None:
        self._resume = (int(state["epoch"]), int(state["position"]))

    def _batches(self, epoch: int | None = None) -> list[list[int]]:
        """The batches of ``epoch`` (default: the current one), built once per epoch (``len`` and
        ``iter`` share them)."""
        epoch = self.epoch if epoch is None else epoch
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._build(epoch))
        return self._cache[1]

    def _build(self, epoch: int) -> list[list[int]]:
        """Each bucket is cut into batches of one size, the most utterances of the bucket's longest
        that fit ``max_frames``: with ``shuffle`` the members change every epoch and the number of
        batches does not (Lightning reads ``len`` once; a shorter epoch would skip its validation).
        An utterance longer than ``max_frames`` gets a batch of its own."""
        rng = random.Random(self.seed + epoch)
        order = sorted(range(len(self.lengths)), key=lambda i: self.lengths[i])
        size = math.ceil(len(order) / self.num_buckets)
        batches = []
        for b in range(0, len(order), size):
            bucket = [i for i in order[b:b + size] if self.lengths[i] <= self.max_frames]
            batches += [[i] for i in order[b:b + size] if self.lengths[i] > self.max_frames]
            if not bucket:
                continue
            per_batch = max(1, self.max_frames // max(1, max(self.lengths[i] for i in bucket)))
            if self.shuffle:
                rng.shuffle(bucket)
            batches += [bucket[k:k + per_batch] for k in range(0, len(bucket), per_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:
            if self.even:
                batches = batches[self.rank: len(batches) // self.world_size * self.world_size: self.world_size]
            else:  # every batch once; ranks short of one get an empty batch (None after collate)
                share = batches[self.rank::self.world_size]
                batches = share + [[]] * (-(-len(batches) // self.world_size) - len(share))
        return batches

    def __iter__(self):
        # a generator: the batches are drawn at the first ``next``, after Lightning's ``set_epoch``
        start = 0
        if self._resume is not None:
            self.epoch, start = self._resume
            self._resume = None
            if start >= len(self._batches()):  # that epoch was complete: the next one
                self.epoch, start = self.epoch + 1, 0
        for b in self._batches()[start:]:
            yield [(i, self.epoch) for i in b] if self.tag_epoch else b

    def __len__(self) -> int:
        """Batches of the whole epoch (also while a resumed epoch yields only its remainder: the
        trainer counts the consumed ones itself)."""
        if self._resume is not None:
            epoch, start = self._resume
            n = len(self._batches(epoch))
            return n if start < n else len(self._batches(epoch + 1))
        return len(self._batches())


class ResumableLoader(DataLoader):
    """The training loader: Lightning saves its :meth:`state_dict` with every checkpoint and
    restores it on resumption (its ``_Stateful`` protocol), so a run resumed at an epoch boundary
    or at step ``k`` inside an epoch draws the uninterrupted run's batches.

    The state is the batch sampler's epoch and the number of its batches the trainer has
    processed, read from the trainer through ``progress() -> (processed, batches per epoch)``
    (the loader itself cannot count them: loaders and Lightning fetch ahead). A complete epoch
    (``processed`` >= batches per epoch, which ``limit_train_batches`` may cut) is recorded as the
    start of the next one.
    """

    def __init__(self, dataset, progress, **kwargs):
        super().__init__(dataset, **kwargs)
        self._progress = progress

    def state_dict(self) -> dict:
        done, per_epoch = self._progress()
        state = self.batch_sampler.state_dict(done)
        if done >= per_epoch:
            state = {"epoch": state["epoch"] + 1, "position": 0}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def ordered_loader(dataset: ManifestDataset, max_frames: int, num_workers: int = 0) -> DataLoader:
    """Frame-bounded, length-bucketed batches in a fixed order (evaluation and analysis)."""
    sampler = FrameBucketSampler([dataset.num_frames(i) for i in range(len(dataset))], max_frames, shuffle=False)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers)


def model_features(path: str | Path):
    """``(record, featurizer, framing)`` of a prepared folder's ``features.json`` (written by
    ``python -m models.convert`` and copied by ``data.prepare --inputs``), or three None when there
    is none (our fbank). Only ``{"type": "espnet", "config": {...}, "min_frames": n}`` exists."""
    import json

    path = Path(path)
    if not path.is_file():
        return None, None, None
    try:
        from data.espnet_frontend import frontend_of

        record = json.loads(path.read_text())
        featurizer = frontend_of(record)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a feature record of python -m models.convert ({e})") from None
    return record, featurizer, LabelFraming(min_frames=int(record.get("min_frames", MIN_FRAMES)),
                                            frame_ms=featurizer.frame_ms)


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
        spec_augment: apply SpecAugment to training batches; the mask sizes follow SPEC section 3.
        with_labels: add encoder-frame phoneme labels (utterances without alignment are dropped).
        max_duration: drop training utterances longer than this (seconds).
    """

    def __init__(self, data_dir: str, train_sets: list[str] | None = None, valid_sets: list[str] | None = None,
                 test_sets: list[str] | None = None, max_frames: int = 20000, num_workers: int = 2,
                 spec_augment: bool = True, freq_masks: int = 2, freq_width: int = 27, time_masks: int = 10,
                 time_ratio: float = 0.05, num_buckets: int = 30, with_labels: bool = False,
                 max_duration: float | None = None, seed: int = 0):
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = check_prepared(data_dir)
        for required in ("bpe.model", "cmvn.json"):
            if not (self.data_dir / required).is_file():
                raise FileNotFoundError(f"{self.data_dir / required}: missing; run `python -m data.prepare --out {data_dir}` first")
        self.tokenizer = Tokenizer.open(self.data_dir / "bpe.model")  # in tokens.txt's order, if there is one
        self.cmvn = GlobalCMVN.load(self.data_dir / "cmvn.json")
        # a folder prepared for a converted model (data.prepare --inputs) names the model's own front end
        self.features, self.featurizer, self.framing = model_features(self.data_dir / "features.json")
        if self.features is not None and with_labels:
            raise ValueError(f"{self.data_dir / 'features.json'}: frame labels (with_labels) are not supported with "
                             f"a converted model's front end in training")
        for name in (train_sets or []) + (valid_sets or []) + (test_sets or []):
            if not self.manifest(name).is_file():
                raise FileNotFoundError(f"manifest {self.manifest(name)} does not exist")

    def manifest(self, name: str) -> Path:
        return Path(name) if name.endswith(".jsonl") else self.data_dir / "manifests" / f"{name}.jsonl"

    def dataset(self, sets: list[str], train: bool = False) -> ManifestDataset:
        h = self.hparams
        aug = SpecAugment(h.freq_masks, h.freq_width, h.time_masks, h.time_ratio) if (train and h.spec_augment) else None
        return ManifestDataset([self.manifest(s) for s in sets], self.tokenizer, self.cmvn, aug, h.with_labels,
                               h.max_duration if train else None, seed=h.seed, featurizer=self.featurizer,
                               framing=self.framing)

    def loader(self, sets: list[str], train: bool = False) -> DataLoader:
        """Frame-bounded batches of ``sets``; for training shuffled, tagged with the epoch, and
        resumable (:class:`ResumableLoader`)."""
        ds = self.dataset(sets, train)
        sampler = FrameBucketSampler([ds.num_frames(i) for i in range(len(ds))], self.hparams.max_frames, shuffle=train,
                                     num_buckets=self.hparams.num_buckets, seed=self.hparams.seed, tag_epoch=train)
        kw = dict(batch_sampler=sampler, collate_fn=collate, num_workers=self.hparams.num_workers,
                  persistent_workers=train and self.hparams.num_workers > 0)
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
