"""fbank shapes, CMVN statistics, SpecAugment bounds."""

from __future__ import annotations

import math

import pytest
import torch

from data.features import GlobalCMVN, SpecAugment, fbank, num_frames


@pytest.mark.parametrize("samples", [400, 401, 559, 560, 16000, 16123])
def test_fbank_shape(samples):
    wav = torch.sin(torch.arange(samples) * 0.05) * 0.3
    feats = fbank(wav)
    assert feats.shape == (num_frames(samples), 80)
    assert feats.shape[0] == 1 + (samples - 400) // 160
    assert torch.isfinite(feats).all()


def test_fbank_rejects_bad_input():
    with pytest.raises(ValueError, match="shorter than one 25 ms frame"):
        fbank(torch.zeros(399))
    with pytest.raises(ValueError, match=r"mono waveform.*\(2, 1000\)"):
        fbank(torch.zeros(2, 1000))


def test_fbank_tone_peaks_in_the_right_band():
    t = torch.arange(16000) / 16000
    low, high = fbank(torch.sin(2 * math.pi * 300 * t) * 0.5), fbank(torch.sin(2 * math.pi * 4000 * t) * 0.5)
    assert low.mean(0).argmax() < high.mean(0).argmax()


def test_cmvn_statistics_match_direct_computation(tmp_path):
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, 80, generator=g) * 3 + 5 for n in (50, 70, 30)]
    stats = None
    for c in chunks:
        stats = GlobalCMVN.accumulate(stats, c)
    cmvn = GlobalCMVN.from_stats(stats)
    allf = torch.cat(chunks).double()
    assert torch.allclose(cmvn.mean.double(), allf.mean(0), atol=1e-5)
    assert torch.allclose(cmvn.std.double(), allf.std(0, unbiased=False), atol=1e-4)
    cmvn.save(tmp_path / "c.json")
    again = GlobalCMVN.load(tmp_path / "c.json")
    assert torch.equal(again.mean, cmvn.mean) and torch.equal(again.std, cmvn.std)
    with pytest.raises(ValueError, match="empty"):
        GlobalCMVN.from_stats({"count": 0, "sum": None, "sumsq": None})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        GlobalCMVN.load(tmp_path / "bad.json")


def _mask_runs(mask: torch.Tensor) -> list[int]:
    """Lengths of runs of True in a 1-D bool tensor."""
    runs, n = [], 0
    for v in mask.tolist() + [False]:
        if v:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("seed", range(20))
def test_specaugment_masks_within_bounds(seed):
    torch.manual_seed(seed)
    T = 400
    feats = torch.randn(T, 80) + 10  # no natural zeros
    aug = SpecAugment(freq_masks=2, freq_width=27, time_masks=10, time_ratio=0.05)
    out = aug(feats)
    zero = out == 0
    freq_masked = zero.all(0)
    time_masked = zero.all(1)
    # at most 2 frequency masks, each <= 27 bins; at most 10 time masks, each <= 5 % of T
    assert freq_masked.sum() <= 2 * 27 and all(r <= 2 * 27 for r in _mask_runs(freq_masked))
    assert time_masked.sum() <= 10 * int(0.05 * T)
    # everything not masked is untouched
    keep = ~zero
    assert torch.equal(out[keep], feats[keep])
    # every zero lies in a masked row or column
    assert torch.equal(zero, freq_masked[None, :] | time_masked[:, None])


def test_specaugment_single_masks_bounded():
    torch.manual_seed(0)
    widths_f, widths_t = [], []
    for _ in range(200):
        out = SpecAugment(freq_masks=1, freq_width=27, time_masks=1, time_ratio=0.05)(torch.ones(200, 80))
        widths_f.append(int((out == 0).all(0).sum()))
        widths_t.append(int((out == 0).all(1).sum()))
    assert max(widths_f) <= 27 and max(widths_f) >= 20
    assert max(widths_t) <= 10 and max(widths_t) >= 7


def test_specaugment_off_in_eval_and_rejects_bad_config():
    aug = SpecAugment().eval()
    x = torch.randn(100, 80)
    assert torch.equal(aug(x), x)
    with pytest.raises(ValueError):
        SpecAugment(time_ratio=1.5)
