"""ESPnet's feature extraction, without librosa: ``DefaultFrontend`` (STFT -> power spectrum ->
log-Mel) and ``GlobalMVN`` statistics (``feats_stats.npz``), for models converted from ESPnet
(:mod:`models.espnet`).

``DefaultFrontend`` computes, for a waveform in [-1, 1]::

    X = torch.stft(x, n_fft, hop_length, win_length, window=<window>_window(win_length), center,
                   pad_mode="reflect", normalized, onesided)
    feats = log(max(|X|^2 @ M, 1e-10))

with ``M`` librosa's Mel filters (``librosa.filters.mel(sr=fs, n_fft, n_mels, fmin=0 if None,
fmax=fs/2 if None, htk)``: Slaney-normalised triangles on the Slaney or the HTK Mel scale), which
torchaudio's ``melscale_fbanks(norm="slaney", mel_scale="slaney" | "htk")`` builds equally.
``GlobalMVN`` then gives ``(feats - mean) / std`` with ``mean = sum / count`` and
``std = sqrt(max(sum_square / count - mean^2, eps))``, each part optional (``norm_means``,
``norm_vars``). The tests check both against espnet2's own modules.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from data.features import AudioError, GlobalCMVN

WINDOWS = ("hann", "hamming", "blackman", "bartlett", "kaiser")


def mel_filters(
    fs: int, n_fft: int, n_mels: int, fmin: float | None = None, fmax: float | None = None, htk: bool = False
) -> torch.Tensor:
    """``(n_fft // 2 + 1, n_mels)`` Mel filter matrix, equal to ESPnet's ``LogMel.melmat``
    (librosa's ``filters.mel(...).T``)."""
    import torchaudio.functional as AF

    fmin = 0.0 if fmin is None else float(fmin)
    fmax = fs / 2 if fmax is None else float(fmax)
    if not 0 <= fmin < fmax <= fs / 2:
        raise ValueError(f"Mel filters need 0 <= fmin < fmax <= fs / 2; got fmin {fmin}, fmax {fmax}, fs {fs}")
    return AF.melscale_fbanks(
        n_fft // 2 + 1, fmin, fmax, n_mels, fs, norm="slaney", mel_scale="htk" if htk else "slaney"
    )


class EspnetFrontend(nn.Module):
    """ESPnet's ``DefaultFrontend`` (single channel, no WPE / beamformer): waveform -> log-Mel.

    Called on one waveform ``(samples,)`` in [-1, 1] it returns ``(frames, n_mels)`` with
    ``frames = 1 + samples // hop_length`` (``center=True``) or ``1 + (samples - n_fft) // hop_length``,
    as a dataset's ``featurizer``; :meth:`batch` takes padded waveforms as ESPnet does.
    """

    def __init__(
        self,
        fs: int = 16000,
        n_fft: int = 512,
        win_length: int | None = None,
        hop_length: int = 128,
        window: str | None = "hann",
        center: bool = True,
        normalized: bool = False,
        onesided: bool = True,
        n_mels: int = 80,
        fmin: float | None = None,
        fmax: float | None = None,
        htk: bool = False,
    ):
        super().__init__()
        if window is not None and window not in WINDOWS:
            raise ValueError(f"frontend window {window!r} is not supported; expected one of {', '.join(WINDOWS)}")
        if not onesided:
            raise ValueError("frontend onesided=false (a two-sided spectrum) is not supported")
        win_length = win_length or n_fft
        if not 0 < win_length <= n_fft or hop_length <= 0:
            raise ValueError(
                f"frontend needs 0 < win_length <= n_fft and hop_length > 0; got n_fft {n_fft}, "
                f"win_length {win_length}, hop_length {hop_length}"
            )
        self.config = dict(
            fs=int(fs),
            n_fft=n_fft,
            win_length=win_length,
            hop_length=hop_length,
            window=window,
            center=center,
            normalized=normalized,
            onesided=onesided,
            n_mels=n_mels,
            fmin=fmin,
            fmax=fmax,
            htk=htk,
        )
        self.fs, self.n_fft, self.win_length, self.hop_length = int(fs), n_fft, win_length, hop_length
        self.window, self.center, self.normalized, self.n_mels = window, center, normalized, n_mels
        self.register_buffer("melmat", mel_filters(self.fs, n_fft, n_mels, fmin, fmax, htk), persistent=False)

    @property
    def frame_ms(self) -> float:
        return 1000.0 * self.hop_length / self.fs

    @property
    def first_centre(self) -> float:
        """Time (s) of the centre of feature frame 0: 0 with ``center``, else half the FFT frame."""
        return 0.0 if self.center else self.n_fft / 2 / self.fs

    def num_frames(self, num_samples: int) -> int:
        """Feature frames of ``num_samples`` samples (ESPnet's ``Stft`` lengths)."""
        n = num_samples + (2 * (self.n_fft // 2) if self.center else 0)
        return max(0, (n - self.n_fft) // self.hop_length + 1)

    def _window(self, device, dtype):
        if self.window is None:
            return None
        return getattr(torch, f"{self.window}_window")(self.win_length, device=device, dtype=dtype)

    def batch(self, waves: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``waves (B, samples)`` -> ``(feats (B, frames, n_mels), frames (B,))``, padded frames zero."""
        x = waves.float()
        spec = torch.stft(
            x,
            self.n_fft,
            self.hop_length,
            self.win_length,
            self._window(x.device, x.dtype),
            center=self.center,
            normalized=self.normalized,
            onesided=True,
            return_complex=True,
        )
        power = spec.real.pow(2) + spec.imag.pow(2)  # (B, F, frames)
        feats = torch.clamp(power.transpose(1, 2) @ self.melmat.to(power), min=1e-10).log()
        if lengths is None:
            lengths = torch.full((x.shape[0],), x.shape[1], dtype=torch.long)
        frames = torch.tensor([self.num_frames(int(n)) for n in lengths], dtype=torch.long)
        pad = torch.arange(feats.shape[1])[None, :] >= frames[:, None]
        return feats.masked_fill(pad[:, :, None].to(feats.device), 0.0), frames

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        if wave.dim() != 1:
            raise ValueError(f"the ESPnet front end expects a mono waveform (samples,), got shape {tuple(wave.shape)}")
        if self.center and wave.numel() <= self.n_fft // 2:  # reflect padding needs more samples than it pads
            raise AudioError(
                f"waveform of {wave.numel()} samples is too short for the front end's "
                f"{self.n_fft}-point STFT (needs > {self.n_fft // 2})"
            )
        if not self.center and wave.numel() < self.n_fft:
            raise AudioError(f"waveform of {wave.numel()} samples is shorter than one {self.n_fft}-point frame")
        return self.batch(wave[None])[0][0]


def frontend_of(record: dict) -> EspnetFrontend:
    """The front end a feature record names (``features.json`` beside a converted model, or a
    checkpoint's ``features``): ``{"type": "espnet", "config": EspnetFrontend's arguments, ...}``."""
    if not isinstance(record, dict) or record.get("type") != "espnet":
        raise ValueError(f"unknown feature type {record.get('type') if isinstance(record, dict) else record!r}")
    return EspnetFrontend(**record["config"])


def global_mvn(
    stats_file: str | Path, norm_means: bool = True, norm_vars: bool = True, eps: float = 1e-20
) -> GlobalCMVN:
    """ESPnet's ``GlobalMVN`` of ``feats_stats.npz`` (``count``, ``sum``, ``sum_square``; or a
    Kaldi-style ``.npy`` of two rows, sums then squares, the count last in the first) as our
    :class:`~data.features.GlobalCMVN` (``(x - mean) / std``); a part turned off is 0 / 1."""
    import numpy as np

    try:
        stats = np.load(stats_file)
        if isinstance(stats, np.ndarray):  # Kaldi-like statistics
            count, total, sq = (
                float(stats[0].flatten()[-1]),
                stats[0, :-1].astype(np.float64),
                stats[1, :-1].astype(np.float64),
            )
        else:
            count, total, sq = (
                float(stats["count"]),
                np.asarray(stats["sum"], np.float64),
                np.asarray(stats["sum_square"], np.float64),
            )
    except (OSError, KeyError, ValueError, IndexError) as e:
        raise ValueError(f"{stats_file}: not an ESPnet feats_stats.npz (count, sum, sum_square): {e}") from None
    if count <= 0:
        raise ValueError(f"{stats_file}: count is {count}; no frames were accumulated")
    mean = total / count
    std = np.sqrt(np.maximum(sq / count - mean * mean, eps))
    mean_t = torch.as_tensor(mean if norm_means else np.zeros_like(mean), dtype=torch.float32)
    std_t = torch.as_tensor(std if norm_vars else np.ones_like(std), dtype=torch.float32)
    return GlobalCMVN(mean_t, std_t, dim=mean.size)
