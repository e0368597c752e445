"""Precision: chosen for the hardware when training (``precision: auto``), and inference in
reduced precision (``evaluate.py --dtype``, ``python -m analysis.latency --dtype``).

**Training** (:func:`resolve_training_precision`, the recipes' ``trainer.precision: auto``): bf16
mixed precision on CUDA devices that compute in bf16 (compute capability >= 8.0) and on CPUs with bf16
matrix instructions (x86 ``avx512_bf16`` or ``amx_bf16``, Arm ``bf16``); fp16 mixed precision (with a
gradient scaler) on CUDA devices without bf16 (V100, T4); fp32 on every other CPU, where PyTorch can
only emulate bf16 (several times slower than fp32: ``recipes/mini/RESULTS.md``). An explicit precision
is kept, with a warning where the hardware emulates it.

The CPU's instruction set is what the kernels may use, not only what the chip has: PyTorch's
``ATEN_CPU_CAPABILITY`` (``default``, ``avx2``) and oneDNN's ``ONEDNN_MAX_CPU_ISA`` (e.g. ``AVX2``)
cap it, and a capped bf16 CPU computes bf16 as an AVX2 CPU does (emulated, slower than fp32, with
AVX2's rounding). Both are honoured here, so ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2``
simulates an ordinary AVX2 machine on a bf16 one (``make test`` runs part of the suite that way).

**Inference.** Two ways to run a model in bf16 / fp16:

- ``weights`` (the default): the weights, buffers and inputs are cast to the low precision once;
  every operator then runs in it (the attention softmax and the final log-softmax in fp32, as the
  model does in every precision).
- ``autocast``: the weights stay fp32 and ``torch.autocast`` casts them for the matrix products and
  convolutions at each call (normalisations, softmax and the residual stream stay fp32).

Both are about equally accurate and ``weights`` is a little faster where bf16 is native
(``recipes/librispeech/RESULTS.md`` has the measurements), so it is the default. fp16 is refused on
a CPU without half-precision matrix instructions (x86 ``avx512_fp16`` / ``amx_fp16``, Arm
``asimdhp``): PyTorch emulates it there, an order of magnitude slower than fp32; bf16 on a CPU
without bf16 instructions runs, with a warning.
"""

from __future__ import annotations

import contextlib
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("weights", "autocast")


# oneDNN's instruction sets in increasing order (``ONEDNN_MAX_CPU_ISA``, oneDNN's "CPU dispatcher
# control"); bf16 matrix instructions from AVX512_CORE_BF16 on, fp16 from AVX512_CORE_FP16 on
_ONEDNN_ISAS = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX10_1_512",
    "AVX512_CORE_FP16",
    "AVX10_1_512_AMX",
    "AVX512_CORE_AMX",
    "AVX10_1_512_AMX_FP16",
    "AVX512_CORE_AMX_FP16",
)
_X86_BF16, _X86_FP16 = {"avx512_bf16", "amx_bf16"}, {"avx512_fp16", "amx_fp16"}
_ARM_BF16, _ARM_FP16 = {"bf16"}, {"asimdhp"}


def _cpuinfo() -> str:
    """``/proc/cpuinfo``'s text (empty where it cannot be read)."""
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags: the ``flags`` line of ``/proc/cpuinfo`` on x86, ``Features`` on Arm
    (empty where that cannot be read). ``cpuinfo``: that file's text, for tests."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        key = line.split(":", 1)[0].strip()
        if key in ("flags", "Features") and ":" in line:
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model(cpuinfo: str | None = None) -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; the platform's words elsewhere)."""
    for line in (_cpuinfo() if cpuinfo is None else cpuinfo).splitlines():
        if line.split(":", 1)[0].strip() == "model name" and ":" in line:
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_description(flags: set[str] | None = None) -> str:
    """The CPU in a few words for every measured figure: model, widest vector ISA, whether bf16 is
    native, and an instruction-set cap in force (e.g. ``AMD EPYC 7B12 (AVX2; bf16 emulated)``)."""
    flags = cpu_flags() if flags is None else flags
    isa = (
        "AVX-512 + AMX"
        if "amx_tile" in flags
        else "AVX-512"
        if "avx512f" in flags
        else "AVX2"
        if "avx2" in flags
        else "SVE"
        if "sve" in flags
        else "NEON"
        if "asimd" in flags
        else "baseline"
    )
    bf16 = "bf16 native" if cpu_native("bf16", flags)[0] else "bf16 emulated"
    cap = _isa_cap("bf16") if flags & _X86_BF16 else None
    return f"{cpu_model()} ({isa}; {bf16}{f', capped by {cap}' if cap else ''})"


def _isa_cap(dtype: str) -> str | None:
    """Why the kernels may not use the x86 CPU's ``dtype`` instructions although it has them, or None:
    ``ATEN_CPU_CAPABILITY`` below AVX-512 (PyTorch's own kernels) or ``ONEDNN_MAX_CPU_ISA`` below
    ``AVX512_CORE_BF16`` / ``AVX512_CORE_FP16`` (oneDNN's matrix products and convolutions)."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").strip().lower()
    if aten and aten not in ("avx512",):
        return f"ATEN_CPU_CAPABILITY={aten}"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "")).strip().upper()
    first = "AVX512_CORE_BF16" if dtype == "bf16" else "AVX512_CORE_FP16"
    if onednn in _ONEDNN_ISAS and _ONEDNN_ISAS.index(onednn) < _ONEDNN_ISAS.index(first):
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    return None


def cpu_native(dtype: str, flags: set[str] | None = None) -> tuple[bool, str]:
    """Whether this CPU computes ``dtype`` ("bf16" or "fp16") with its own matrix instructions, and
    the evidence in words. ``flags``: :func:`cpu_flags` unless given (tests)."""
    flags = cpu_flags() if flags is None else flags
    wanted = (_X86_BF16 | _ARM_BF16) if dtype == "bf16" else (_X86_FP16 | _ARM_FP16)
    have = sorted(flags & wanted)
    if not have:
        where = "avx512_bf16 / amx_bf16 / Arm bf16" if dtype == "bf16" else "avx512_fp16 / amx_fp16 / Arm asimdhp"
        return False, f"this CPU has no {dtype} matrix instructions ({where}), so PyTorch emulates {dtype}"
    cap = _isa_cap(dtype)
    if cap and set(have) & (_X86_BF16 | _X86_FP16):
        return False, f"this CPU has {' / '.join(have)}, but {cap} keeps the kernels from using it"
    return True, f"this CPU has {' / '.join(have)}"


# Lightning's spellings of each precision, by the dtype its matrix products use
_LOW = {"bf16": ("bf16-mixed", "bf16-true", "bf16"), "fp16": ("16-mixed", "16-true", "16", 16)}


@dataclass(frozen=True)
class PrecisionChoice:
    """What ``trainer.precision`` became and why. ``requested``: as the recipe or command line gave
    it (``auto`` or an explicit precision); ``warning``: set where an explicit precision is emulated."""

    precision: str
    requested: str
    device: str
    reason: str
    warning: str | None = None

    def describe(self) -> str:
        how = "auto" if self.requested == "auto" else "as requested"
        return f"precision: {self.precision} ({how} on {self.device}: {self.reason})"


def _device_kind(accelerator) -> str:
    """``cpu``, ``cuda`` or ``mps``: where a Trainer with ``accelerator`` runs (Lightning's ``auto``
    picks CUDA, then MPS, then the CPU)."""
    name = accelerator if isinstance(accelerator, str) else type(accelerator).__name__.lower()
    name = (name or "auto").lower()
    if name in ("gpu", "cuda") or "cuda" in name:
        return "cuda"
    if name == "mps" or "mps" in name:
        return "mps"
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return "mps"
    return "cpu"


def resolve_training_precision(
    requested, accelerator="auto", flags: set[str] | None = None, cuda_bf16: bool | None = None
) -> PrecisionChoice:
    """The Lightning precision for ``requested`` (``"auto"`` or any of Lightning's values) on
    ``accelerator`` (as given to the Trainer). See the module's doc for the rule. ``flags`` (CPU) and
    ``cuda_bf16`` (whether the GPU computes bf16 natively) default to the machine's; tests set them."""
    device = _device_kind(accelerator)
    if device == "cpu" and flags is None:
        flags = cpu_flags()  # read once for both precisions
    if device == "cuda":
        name = "this GPU"
        if cuda_bf16 is None:
            cuda_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
            name = torch.cuda.get_device_name()
        native = {
            "bf16": (cuda_bf16, f"{name} {'computes' if cuda_bf16 else 'does not compute'} bf16 natively"),
            "fp16": (True, f"{name} computes fp16 natively"),
        }
    elif device == "cpu":
        native = {"bf16": cpu_native("bf16", flags), "fp16": cpu_native("fp16", flags)}
    else:
        native = {
            "bf16": (False, "mixed precision on MPS is not verified here"),
            "fp16": (False, "mixed precision on MPS is not verified here"),
        }
    where = {"cuda": "the GPU", "cpu": "the CPU", "mps": "MPS"}[device]
    if str(requested) == "auto":
        if native["bf16"][0]:
            return PrecisionChoice("bf16-mixed", "auto", where, native["bf16"][1])
        if device == "cuda":
            return PrecisionChoice("16-mixed", "auto", where, native["bf16"][1] + "; fp16 with a gradient scaler")
        return PrecisionChoice("32-true", "auto", where, native["bf16"][1])
    for dtype, names in _LOW.items():
        if requested in names:
            ok, why = native[dtype]
            warning = (
                None
                if ok
                else (
                    f"trainer.precision {requested} on {where}: {why}; this run will be much "
                    f"slower than with precision: auto"
                )
            )
            return PrecisionChoice(str(requested), str(requested), where, why, warning)
    return PrecisionChoice(str(requested), str(requested), where, "full precision")


def precision_problem(dtype: str, device: str, flags: set[str] | None = None) -> str | None:
    """Why ``dtype`` (a key of :data:`DTYPES`) is not practical on ``device`` (inference), or None."""
    if dtype not in DTYPES:
        return f"unknown precision {dtype!r}; choose one of {', '.join(DTYPES)}"
    kind = torch.device(device).type
    if dtype == "fp16" and kind == "cpu":
        flags = cpu_flags() if flags is None else flags  # read once for both precisions
        ok, why = cpu_native("fp16", flags)
        if not ok:
            bf16 = " (bf16 is native here: use --dtype bf16)" if cpu_native("bf16", flags)[0] else ""
            return f"--dtype fp16 on the CPU: {why}, an order of magnitude slower than fp32; fp16 is for GPUs{bf16}"
    if dtype == "bf16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        return "--dtype bf16: this GPU does not support bf16; use --dtype fp16"
    return None


def precision_warning(dtype: str, device: str, flags: set[str] | None = None) -> str | None:
    """A warning where ``dtype`` runs but is emulated (bf16 on a CPU without bf16 instructions,
    slower than fp32), or None."""
    if dtype == "bf16" and torch.device(device).type == "cpu":
        ok, why = cpu_native("bf16", flags)
        if not ok:
            return f"--dtype bf16 on the CPU: {why}; expect it to be slower than fp32 (--dtype fp32)"
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
