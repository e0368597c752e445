"""A dataset over manifests: each utterance as features, token ids and optional frame labels,
and the collation of its items into padded batches.

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

import json
import os
import warnings
import zlib
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data.alignments import AlignmentError, read_textgrid
from data.features import SAMPLE_RATE, AudioError, GlobalCMVN, SpecAugment, fbank, load_audio
from data.framing import MIN_FRAMES, LabelFraming
from data.manifest import read_manifest
from data.text import normalise
from data.tokenizer import Tokenizer

IGNORE_LABEL = -100


def entry_frames(entry: dict, featurizer=None) -> int:
    """Feature frames of a manifest entry: by ``featurizer.num_frames(samples)`` where the
    featurizer has one (e.g. ESPnet's front end), else the entry's ``num_frames`` (our fbank,
    counted at preparation) or 100 a second."""
    if hasattr(featurizer, "num_frames"):
        return featurizer.num_frames(round(entry["duration"] * SAMPLE_RATE))
    return int(entry.get("num_frames") or round(entry["duration"] * 100))


class ManifestDataset(Dataset):
    """Utterances of one or more JSONL manifests, as features, token ids and optional labels.

    ``featurizer`` maps a 16 kHz waveform to features (default: our 80-dim fbank; one with a
    ``num_frames(samples)`` method, e.g. ESPnet's front end, sizes batches and finds too short
    utterances by its own frames); ``framing`` places the model's frames in time for the labels
    and says how many feature frames the model needs (default: 40 ms encoder frames, >= 7).
    """

    def __init__(
        self,
        manifests: list[str | Path],
        tokenizer: Tokenizer | None = None,
        cmvn: GlobalCMVN | None = None,
        spec_augment: SpecAugment | None = None,
        with_labels: bool = False,
        max_duration: float | None = None,
        seed: int = 0,
        featurizer=None,
        framing: LabelFraming | None = None,
    ):
        self.entries = []
        self.manifests = [str(m) for m in manifests]
        for m in manifests:
            entries = read_manifest(m)
            missing = [e for e in entries if not os.path.isfile(e["audio"])]
            if missing:  # a moved corpus: say so before any work starts
                raise FileNotFoundError(
                    f"{m}: audio of {len(missing)} of {len(entries)} utterances is missing, "
                    f"e.g. {missing[0]['id']}: {missing[0]['audio']}"
                )
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
            warnings.warn(
                f"{', '.join(map(str, manifests))}: {len(self.skipped)} utterances are too short for the "
                f"model and skipped, e.g. {next(iter(self.skipped))}",
                stacklevel=2,
            )
            self.entries = [e for e in self.entries if e["id"] not in self.skipped]
        if max_duration is not None:
            self.entries = [e for e in self.entries if e["duration"] <= max_duration]
        if with_labels:
            self.entries = [e for e in self.entries if e.get("alignment")]
        if not self.entries:
            raise ValueError(
                f"no usable utterance in {', '.join(map(str, manifests))}"
                + (" with an alignment" if with_labels else "")
            )
        self.tokenizer, self.cmvn, self.spec_augment, self.with_labels = tokenizer, cmvn, spec_augment, with_labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.entries)

    def _feature_frames(self, e: dict) -> int:
        return entry_frames(e, self.featurizer)

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
        batch["labels"] = torch.nn.utils.rnn.pad_sequence(
            [x["labels"] for x in items], batch_first=True, padding_value=IGNORE_LABEL
        )
    return batch


def model_features(path: str | Path):
    """``(record, featurizer, framing)`` of a prepared folder's ``features.json`` (written by
    ``python -m models.convert`` and copied by ``data.prepare --inputs``), or three None when there
    is none (our fbank). Only ``{"type": "espnet", "config": {...}, "min_frames": n}`` exists."""
    path = Path(path)
    if not path.is_file():
        return None, None, None
    try:
        from data.espnet_frontend import frontend_of

        record = json.loads(path.read_text())
        featurizer = frontend_of(record)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: not a feature record of python -m models.convert ({e})") from None
    return (
        record,
        featurizer,
        LabelFraming(min_frames=int(record.get("min_frames", MIN_FRAMES)), frame_ms=featurizer.frame_ms),
    )
