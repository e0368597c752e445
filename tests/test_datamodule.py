"""Batches: frame bound, bucketing, padding with lengths, labels, DDP sharding, bad utterances."""

from __future__ import annotations

import pytest
import torch

from data.alignments import NUM_LABELS
from data.datamodule import ASRDataModule
from data.dataset import ManifestDataset, collate
from data.framing import encoder_frames
from data.manifest import read_manifest, write_manifest
from data.sampler import FrameBucketSampler


def test_sampler_respects_frame_bound_and_covers_everything():
    lengths = [int(x) for x in torch.randint(100, 1500, (300,), generator=torch.Generator().manual_seed(0))]
    s = FrameBucketSampler(lengths, max_frames=6000, num_buckets=10, seed=1)
    batches = list(s)
    assert sorted(i for b in batches for i in b) == list(range(300))
    assert all(max(lengths[i] for i in b) * len(b) <= 6000 for b in batches)
    # bucketing keeps lengths in a batch close together
    spread = [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches]
    assert sum(spread) / len(spread) < 200
    s.set_epoch(1)
    assert list(s) != batches  # reshuffled each epoch
    s.set_epoch(0)
    assert list(s) == batches  # deterministic per epoch


def test_sampler_gives_every_epoch_as_many_batches_as_its_len_says():
    """Lightning reads ``len`` once: an epoch with fewer batches than that skips its end-of-epoch
    validation and checkpoint (seen on the mini corpus at 6,000 frames: 351 of 352 batches in the
    fifth epoch, its validation never ran, and the run was reported cut short). Reshuffled epochs
    must keep the count, and still respect the frame bound and differ."""
    lengths = [int(x) for x in torch.randint(100, 1500, (500,), generator=torch.Generator().manual_seed(0))]
    s = FrameBucketSampler(lengths, max_frames=6000, num_buckets=10, seed=1)
    expected = len(s)
    seen = []
    for epoch in range(12):
        s.set_epoch(epoch)
        batches = list(s)
        assert len(batches) == len(s) == expected, epoch
        assert sorted(i for b in batches for i in b) == list(range(500))
        assert all(max(lengths[i] for i in b) * len(b) <= 6000 for b in batches)
        seen.append(batches)
    assert len({str(b) for b in seen}) == 12  # membership and order reshuffled every epoch


def test_sampler_ddp_shards_are_disjoint_and_equal():
    lengths = list(range(100, 400))
    shards = [list(FrameBucketSampler(lengths, 2000, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    seen = [i for s in shards for b in s for i in b]
    assert len(seen) == len(set(seen))


def test_sampler_long_utterance_alone_and_bad_bound():
    with pytest.warns(UserWarning, match="longer than max_frames"):
        s = FrameBucketSampler([50, 5000, 60], max_frames=1000, shuffle=False, num_buckets=1)
    assert [5000 in [[50, 5000, 60][i] for i in b] and len(b) == 1 for b in s if 1 in b] == [True]
    with pytest.raises(ValueError):
        FrameBucketSampler([1], max_frames=0)


def test_batches_padding_and_labels(prepared):
    dm = ASRDataModule(str(prepared), ["mini-train"], ["mini-dev"], with_labels=True, num_workers=0, max_frames=3000)
    batch = next(iter(dm.val_dataloader()))
    B, T, F = batch["features"].shape
    assert F == 80 and batch["feature_lengths"].max() == T and len(batch["ids"]) == B
    assert batch["feature_lengths"].max() * B <= 3000 or B == 1
    for b in range(B):
        n = batch["feature_lengths"][b]
        assert (batch["features"][b, n:] == 0).all()
        ids = batch["targets"][b, : batch["target_lengths"][b]].tolist()
        assert dm.tokenizer.decode(ids) == batch["texts"][b]
        lab = batch["labels"][b]
        valid = lab[lab != -100]
        assert len(valid) == encoder_frames(int(n))
        assert valid.min() >= 0 and valid.max() < NUM_LABELS
    assert encoder_frames(7) == 1 and encoder_frames(6) == 0 and encoder_frames(100) == 24


def test_bad_utterance_skipped_not_fatal(prepared, tmp_path):
    entries = read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    (tmp_path / "broken.flac").write_bytes(b"corrupt")  # exists, but breaks when read mid-run
    entries[0] = {**entries[0], "audio": str(tmp_path / "broken.flac")}
    write_manifest(tmp_path / "m.jsonl", entries)
    ds = ManifestDataset([tmp_path / "m.jsonl"])
    with pytest.warns(UserWarning, match="broken.flac"):
        batch = collate([ds[0], ds[1]])
    assert batch["ids"] == [entries[1]["id"]]
    assert collate([None]) is None


def test_missing_audio_refused_up_front(prepared, tmp_path):
    entries = read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    entries[1] = {**entries[1], "audio": str(tmp_path / "gone.flac")}
    write_manifest(tmp_path / "m.jsonl", entries)
    with pytest.raises(
        FileNotFoundError,
        match=rf"m.jsonl: audio of 1 of {len(entries)} utterances is missing, "
        rf"e.g. {entries[1]['id']}: .*gone.flac",
    ):
        ManifestDataset([tmp_path / "m.jsonl"])


def test_datamodule_errors(prepared, tmp_path):
    with pytest.raises(FileNotFoundError, match="bpe.model: missing"):
        ASRDataModule(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nope.jsonl does not exist"):
        ASRDataModule(str(prepared), ["nope"])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no usable utterance"):
        ManifestDataset([tmp_path / "empty.jsonl"])


def test_encoder_frames_match_the_model_front_end():
    from data.framing import subsampled_lengths
    from models.subsampling import Conv2dSubsampling

    front = Conv2dSubsampling(input_dim=20, d_model=8, channels=2)
    for n in range(7, 60):
        out, lens = front(torch.zeros(1, n, 20), torch.tensor([n]))
        assert encoder_frames(n) == out.shape[1] == int(lens) == int(subsampled_lengths(torch.tensor(n)))
