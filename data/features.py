"""Audio -> features: 80-dim log-Mel filterbank, global CMVN and SpecAugment (Park et al., 2019).

Audio is read with ``soundfile`` (torchaudio's own loader needs torchcodec). Filterbanks come
from ``torchaudio.compliance.kaldi.fbank`` (25 ms window, 10 ms shift), masks from
``torchaudio.functional.mask_along_axis``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torchaudio.compliance.kaldi as kaldi
import torchaudio.functional as AF

from common.io import atomic_write_text

SAMPLE_RATE = 16000
NUM_MEL_BINS = 80
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0


class AudioError(ValueError):
    """Audio that cannot be used; the message names the file."""


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """Mono float waveform (samples,) in [-1, 1] at ``sample_rate`` (resampled if needed)."""
    import soundfile as sf

    try:
        wav, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / OSError
        raise AudioError(f"{path}: cannot read audio ({e})") from None
    if wav.shape[0] == 0:
        raise AudioError(f"{path}: audio has no samples")
    wav = torch.from_numpy(wav).mean(dim=1)
    if sr != sample_rate:
        wav = AF.resample(wav, sr, sample_rate)
    return wav


def fbank(wave: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Log-Mel filterbank (frames, ``num_mel_bins``) of a mono waveform in [-1, 1].

    Frames: ``1 + (samples - 400) // 160`` at 16 kHz (Kaldi's ``snip_edges``). No dither, so
    features are deterministic.
    """
    if wave.dim() != 1:
        raise ValueError(f"fbank expects a mono waveform (samples,), got shape {tuple(wave.shape)}")
    min_samples = int(sample_rate * FRAME_LENGTH_MS / 1000)
    if wave.numel() < min_samples:
        raise ValueError(f"waveform of {wave.numel()} samples is shorter than one {FRAME_LENGTH_MS:g} ms frame")
    return kaldi.fbank(
        wave.unsqueeze(0) * 32768.0,
        num_mel_bins=num_mel_bins,
        frame_length=FRAME_LENGTH_MS,
        frame_shift=FRAME_SHIFT_MS,
        dither=0.0,
        energy_floor=0.0,
        sample_frequency=sample_rate,
    )


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of fbank frames for ``num_samples`` samples (Kaldi ``snip_edges=True``)."""
    win = int(sample_rate * FRAME_LENGTH_MS / 1000)
    hop = int(sample_rate * FRAME_SHIFT_MS / 1000)
    return 0 if num_samples < win else 1 + (num_samples - win) // hop


class GlobalCMVN(torch.nn.Module):
    """Global mean and variance normalisation: ``(x - mean) / std`` over the feature axis.

    Statistics are accumulated with :meth:`accumulate` (sums in float64) and stored as JSON.
    """

    def __init__(self, mean: torch.Tensor | None = None, std: torch.Tensor | None = None, dim: int = NUM_MEL_BINS):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim) if mean is None else torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.ones(dim) if std is None else torch.as_tensor(std, dtype=torch.float32))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.mean) / self.std

    @staticmethod
    def accumulate(stats: dict | None, feats: torch.Tensor) -> dict:
        """Add the frames of ``feats (T, D)`` to running sums; start with ``stats=None``."""
        f = feats.double()
        if stats is None:
            stats = {
                "count": 0,
                "sum": torch.zeros(f.shape[1], dtype=torch.float64),
                "sumsq": torch.zeros(f.shape[1], dtype=torch.float64),
            }
        stats["count"] += f.shape[0]
        stats["sum"] += f.sum(0)
        stats["sumsq"] += (f * f).sum(0)
        return stats

    @classmethod
    def from_stats(cls, stats: dict, floor: float = 1e-5) -> GlobalCMVN:
        if not stats or stats["count"] == 0:
            raise ValueError("CMVN statistics are empty: no frames were accumulated")
        mean = stats["sum"] / stats["count"]
        var = (stats["sumsq"] / stats["count"] - mean * mean).clamp_min(floor)
        return cls(mean.float(), var.sqrt().float(), dim=mean.numel())

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"mean": self.mean.tolist(), "std": self.std.tolist()}))

    @classmethod
    def load(cls, path: str | Path) -> GlobalCMVN:
        try:
            d = json.loads(Path(path).read_text())
            return cls(torch.tensor(d["mean"]), torch.tensor(d["std"]), dim=len(d["mean"]))
        except (OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a CMVN statistics file ({e})") from None


class SpecAugment(torch.nn.Module):
    """SpecAugment without time warping (Park et al., 2019, section 2; the adaptive time masks
    of Park et al., 2020, "SpecAugment on large scale datasets"): ``freq_masks`` masks of width
    up to ``freq_width`` bins and ``time_masks`` masks of width up to ``time_ratio`` of the
    utterance. The defaults (2 x 27 bins, 10 x 5 %) are Park et al.'s LibriSpeech policy as the
    Conformer used it (Gulati et al., 2020, section 3.1).

    Works on one utterance ``(T, F)``; masked values are set to ``mask_value`` (0 = the mean
    after CMVN). Active only in training mode.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 10,
        time_ratio: float = 0.05,
        mask_value: float = 0.0,
    ):
        super().__init__()
        if freq_masks < 0 or time_masks < 0 or freq_width < 0 or not 0 <= time_ratio <= 1:
            raise ValueError("SpecAugment: mask counts and widths must be >= 0 and time_ratio in [0, 1]")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_ratio = time_masks, time_ratio
        self.mask_value = mask_value

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return feats
        spec = feats.t().unsqueeze(0)  # (1, F, T)
        for _ in range(self.freq_masks):
            spec = AF.mask_along_axis(spec, self.freq_width + 1, self.mask_value, axis=1)
        width = int(self.time_ratio * feats.shape[0])
        if width > 0:
            for _ in range(self.time_masks):
                spec = AF.mask_along_axis(spec, width + 1, self.mask_value, axis=2)
        return spec.squeeze(0).t()
