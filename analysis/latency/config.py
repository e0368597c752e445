"""The benchmark's configuration: what one run measures, typed, built from the command line
(:meth:`BenchConfig.from_args`) or in code, and checked (:meth:`BenchConfig.check`) before any work."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields

import torch

from models.precision import DTYPES, MODES, precision_problem

PAPER = ("1(H4)x16", "2(H4)x8", "4(H4)x4", "8(H4)x2", "4(H8)x4")  # the reuse plans of Shim et al. (2022), Table 3
PEERS = ("torchaudio", "espnet")
ENGINES = ("torch", "onnxruntime")
MALLOCS = ("steady", "default")
INPUT_LAYER = "conv2d"  # the front end of every row, ours and the peers'
INPUT_DIM = 80  # fbank bins of the front end's input


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark run. Rows: our ``reuse`` plans (the first is the baseline of every ratio), our
    first plan on its materialised path (``materialised``; not with the ONNX Runtime engine), then
    the ``peers``; each timed at every encoder length of ``lengths``. The model sizes are the rows'
    (``peer_heads``: the torchaudio peer's heads, and those of the plan the ESPnet peer's weights
    come from). ``train_runs`` 0 skips the training step."""

    reuse: tuple[str, ...] = PAPER
    lengths: tuple[int, ...] = (128, 256, 512, 768)
    batch_size: int = 1
    dtype: str = "fp32"
    precision_mode: str = "weights"
    engine: str = "torch"
    peers: tuple[str, ...] = ("torchaudio",)
    materialised: bool = True
    device: str = "cpu"
    include_frontend: bool = False
    compile: bool = False
    compile_backend: str = "inductor"
    cuda_graphs: bool = False
    warmup: int = 10
    runs: int = 50
    rounds: int = 5
    malloc: str = "steady"
    threads: int | None = None
    train_length: int = 512
    train_batch: int = 8
    train_runs: int = 10
    d_model: int = 256
    num_layers: int = 16
    ffn_dim: int = 1024
    kernel_size: int = 31
    peer_heads: int = 4
    vocab_size: int = 129
    quiet: bool = False

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> BenchConfig:
        """From :func:`analysis.latency.cli.parser`'s arguments: ``--no-peer`` / ``--peer`` give
        :attr:`peers` (torchaudio's always, espnet's with ``--peer espnet``), ``--no-materialised``
        :attr:`materialised`; the other fields are the options of the same names."""
        peers = () if a.no_peer else tuple(p for p in PEERS if p == "torchaudio" or p in (a.peer or ()))
        names = {f.name for f in fields(cls)} - {"peers", "materialised"}
        values = {k: v for k, v in vars(a).items() if k in names}
        return cls(
            **{
                **values,
                "reuse": tuple(a.reuse),
                "lengths": tuple(a.lengths),
                "peers": peers,
                "materialised": not a.no_materialised,
            }
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def autocast(self) -> bool:
        """Whether the rows run under ``torch.autocast`` (low precision, ``precision_mode`` autocast)."""
        return self.precision_mode == "autocast" and self.dtype != "fp32"

    @property
    def model_size(self) -> dict:
        """The sizes every row shares (the JSON's ``model``)."""
        return {
            "d_model": self.d_model,
            "num_layers": self.num_layers,
            "ffn_dim": self.ffn_dim,
            "kernel_size": self.kernel_size,
        }

    def rows(self) -> list[tuple[str, str]]:
        """``(name, kind)`` of every row in order, kind ``fused``, ``materialised`` or ``peer``."""
        rows = [(r, "fused") for r in self.reuse]
        if self.materialised and self.engine != "onnxruntime":  # a graph has no fused kernel to compare it with
            rows.insert(1, (self.reuse[0], "materialised"))
        return rows + [(name, "peer") for name in self.peers]

    def baseline_plan(self) -> str:
        """Our plan-free baseline at the run's size (the plan the ESPnet peer's weights come from)."""
        return f"1(H{self.peer_heads})x{self.num_layers}"

    def check(self) -> None:
        """Raises ``ValueError`` naming the option at fault where this run cannot be done here
        (before any model is built): an unknown choice, a missing device or library, an engine
        with an option it does not take, a precision the hardware does not practise, a plan that
        does not fit the model."""
        for name, value, choices in (
            ("--dtype", self.dtype, DTYPES),
            ("--precision-mode", self.precision_mode, MODES),
            ("--engine", self.engine, ENGINES),
            ("--malloc", self.malloc, MALLOCS),
        ):
            if value not in choices:
                raise ValueError(f"{name} {value!r}: choose one of {', '.join(choices)}")
        if not self.reuse or not self.lengths or min(self.lengths) < 1:
            raise ValueError("--reuse and --lengths need at least one plan and lengths of at least 1 frame")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda, but no CUDA device is available")
        if "espnet" in self.peers:
            _check_espnet(self.include_frontend)
        if problem := precision_problem(self.dtype, self.device):
            raise ValueError(problem)
        if self.engine == "onnxruntime":
            _check_onnxruntime(self)
        from models import ConformerCTC

        for r in self.reuse:
            ConformerCTC(
                self.vocab_size,
                d_model=self.d_model,
                num_layers=self.num_layers,
                ffn_dim=self.ffn_dim,
                kernel_size=self.kernel_size,
                reuse=r,
                subsampling_channels=8,
            )


def _check_espnet(include_frontend: bool) -> None:
    from analysis.latency.modules import espnet_importable

    if (why := espnet_importable()) is not None:
        raise ValueError(f"--peer espnet: {why}")
    if not include_frontend:
        raise ValueError(
            "--peer espnet needs --include-frontend (espnet2's encoder starts with its own Conv2d front end)"
        )


def _check_onnxruntime(c: BenchConfig) -> None:
    if c.device != "cpu" or c.dtype != "fp32" or c.compile or c.cuda_graphs:
        raise ValueError(
            "--engine onnxruntime times fp32 on the CPU (no --dtype fp16/bf16, --compile or --cuda-graphs)"
        )
    try:
        from models.onnx_runtime import version

        version()
    except ImportError:
        raise ValueError(
            "--engine onnxruntime needs onnx, onnxscript and onnxruntime (pip install '.[onnx]')"
        ) from None
