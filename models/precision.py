"""Inference in reduced precision (``evaluate.py --dtype``, ``python -m analysis.latency --dtype``).

Two ways to run a model in bf16 / fp16:

- ``weights`` (the default): the weights, buffers and inputs are cast to the low precision once;
  every operator then runs in it (the attention softmax and the final log-softmax in fp32, as the
  model does in every precision).
- ``autocast``: the weights stay fp32 and ``torch.autocast`` casts them for the matrix products and
  convolutions at each call (normalisations, softmax and the residual stream stay fp32).

Measured on the 2-core AMD Zen 4 development machine (AVX-512 BF16), 2 threads, in one interleaved
run against fp32 (``recipes/librispeech/RESULTS.md``): Conformer-M 1(H4)x16 with its front end at
256 / 768 encoder frames, ``weights`` 1.81x / 1.99x faster than fp32, ``autocast`` 1.77x / 1.98x
(it casts every weight at each call); log-probabilities off fp32's by at most 0.032 (weights) and
0.034 (autocast) on random weights; on the demo checkpoint (mini-test, 2,635 words) both give
3.11 % greedy WER against fp32's 3.07 % (one substitution more), the largest log-probability
difference 0.19 / 0.20. ``weights`` is therefore the default, and what ``evaluate.py --dtype``
uses. fp16 is refused on a CPU without half-precision matrix instructions (``avx512_fp16`` /
``amx_fp16``, which Zen 4 lacks): PyTorch emulates it there, 24x slower than fp32 (Conformer-M,
256 frames: 3.7 s against 0.15 s); use bf16 on such CPUs and fp16 on GPUs.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("weights", "autocast")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where that cannot be read)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def precision_problem(dtype: str, device: str) -> str | None:
    """Why ``dtype`` (a key of :data:`DTYPES`) is not practical on ``device``, or None."""
    if dtype not in DTYPES:
        return f"unknown precision {dtype!r}; choose one of {', '.join(DTYPES)}"
    kind = torch.device(device).type
    if dtype == "fp16" and kind == "cpu":
        flags = cpu_flags()
        if not flags & {"avx512_fp16", "amx_fp16"}:
            bf16 = " (this CPU has avx512_bf16: use --dtype bf16)" if flags & {"avx512_bf16", "amx_bf16"} else ""
            return ("--dtype fp16 on the CPU: this CPU has no half-precision matrix instructions (avx512_fp16 / "
                    "amx_fp16), so PyTorch emulates fp16, about 24x slower than fp32 here; fp16 is for GPUs" + bf16)
    if dtype == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        return "--dtype bf16: this GPU does not support bf16; use --dtype fp16"
    return None


class InferencePrecision(nn.Module):
    """``model`` run in ``dtype`` by ``mode`` (see the module's doc), called as the model is:
    ``forward(features, lengths, **kwargs)`` with fp32 features; the model's float outputs come
    back as they are (``ConformerCTC`` returns fp32 log-probabilities in every precision).

    With ``mode="weights"`` the wrapped model itself is cast (in place, as ``.to`` does)."""

    def __init__(self, model: nn.Module, dtype: str = "fp32", mode: str = "weights"):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown precision mode {mode!r}; choose one of {', '.join(MODES)}")
        self.dtype_name, self.mode = dtype, mode
        self.dtype = DTYPES[dtype]
        self.model = model
        if mode == "weights" and self.dtype != torch.float32:
            model.to(self.dtype)

    def context(self, device_type: str):
        """The autocast context of a call (a null context unless ``mode="autocast"`` in low precision)."""
        if self.mode == "autocast" and self.dtype != torch.float32:
            return torch.autocast(device_type, dtype=self.dtype)
        return contextlib.nullcontext()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor, **kwargs):
        if self.mode == "weights":
            features = features.to(self.dtype)
        with self.context(features.device.type):
            return self.model(features, lengths, **kwargs)


def inference_precision(model: nn.Module, dtype: str, device: str, mode: str = "weights") -> nn.Module:
    """``model`` itself for fp32, else an :class:`InferencePrecision` wrapping it; raises
    ``ValueError`` with :func:`precision_problem`'s reason where ``dtype`` is not practical."""
    problem = precision_problem(dtype, device)
    if problem:
        raise ValueError(problem)
    return model if dtype == "fp32" else InferencePrecision(model, dtype, mode).eval()
