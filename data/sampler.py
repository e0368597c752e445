"""Frame-bounded batches: a length-bucketing batch sampler (resumable, DDP-aware), the resumable
training loader, and the fixed-order loader of evaluation and analysis."""

from __future__ import annotations

import math
import random
import warnings

import torch
from torch.utils.data import DataLoader, Sampler

from data.dataset import ManifestDataset, collate


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

    def __init__(
        self,
        lengths: list[int],
        max_frames: int,
        shuffle: bool = True,
        num_buckets: int = 30,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        tag_epoch: bool = False,
        even: bool | None = None,
    ):
        if max_frames <= 0:
            raise ValueError(f"max_frames must be positive, got {max_frames}")
        too_long = [i for i, n in enumerate(lengths) if n > max_frames]
        if too_long:
            warnings.warn(
                f"{len(too_long)} utterances longer than max_frames={max_frames} get batches of their own", stacklevel=2
            )
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
            bucket = [i for i in order[b : b + size] if self.lengths[i] <= self.max_frames]
            batches += [[i] for i in order[b : b + size] if self.lengths[i] > self.max_frames]
            if not bucket:
                continue
            per_batch = max(1, self.max_frames // max(1, max(self.lengths[i] for i in bucket)))
            if self.shuffle:
                rng.shuffle(bucket)
            batches += [bucket[k : k + per_batch] for k in range(0, len(bucket), per_batch)]
        if self.shuffle:
            rng.shuffle(batches)
        if self.world_size > 1:
            if self.even:
                batches = batches[self.rank : len(batches) // self.world_size * self.world_size : self.world_size]
            else:  # every batch once; ranks short of one get an empty batch (None after collate)
                share = batches[self.rank :: self.world_size]
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
