"""The engines that run a row: eager PyTorch, ``torch.compile`` and CUDA graphs (:func:`wrap`), and
ONNX Runtime (:class:`OnnxRows`).

``--compile`` compiles each row at each length (``torch.compile(dynamic=False)``) from a fresh dynamo
cache. The rows' callables share code objects, on which dynamo keeps one entry per (row, length):
its recompile limit is raised to cover them, and hitting it is an error instead of dynamo's silent
fall-back to eager (:func:`compiling`, settings restored after the run). ``--cuda-graphs`` captures
each callable, which therefore reads no tensor back to the host (``ConformerCTC`` skips its checks
of input values while a capture is under way).

``--engine onnxruntime``: each row's :class:`~analysis.latency.modules.Timed` module is exported
once with torch's dynamo exporter (:func:`models.export.export_onnx`; dynamic time axis) and run by
an ONNX Runtime CPU session (:mod:`models.onnx_runtime`) on one intra-op pool shared by every row's
session, after its output has been checked equal to PyTorch's.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from analysis.latency.modules import Timed


def compile_settings(entries: int) -> dict:
    """``torch._dynamo.config`` of a ``--compile`` run of ``entries`` (row, length) pairs. The rows'
    callables are lambdas of a few source lines, so they share code objects, and dynamo keeps one
    cache entry per (row, length) on each: its recompile limit (8 by default) must cover them all,
    and reaching it must be an error, as dynamo otherwise runs the code eagerly, silently."""
    return {
        "recompile_limit": max(8, entries),
        "accumulated_recompile_limit": max(256, entries),
        "fail_on_recompile_limit_hit": True,
    }


def compiling(compile: bool, entries: int):
    """The context of a run's timings: with ``compile``, dynamo's cache emptied (entries of earlier
    runs on the shared code objects would count to the limit) and :func:`compile_settings` in force."""
    if not compile:
        return contextlib.nullcontext()
    torch._dynamo.reset()  # (torch._dynamo is imported on first use)
    return torch._dynamo.config.patch(**compile_settings(entries))


def wrap(fn: Callable[[], object], device: str, compile_backend: str | None, cuda_graphs: bool) -> Callable:
    """``fn`` as timed: compiled by ``compile_backend`` (and called once, so that it is compiled before
    any timing) unless None, a captured CUDA graph's replay with ``cuda_graphs``."""
    if compile_backend is not None:
        fn = torch.compile(fn, backend=compile_backend, dynamic=False)
        fn()
    if cuda_graphs:
        if not device.startswith("cuda"):
            raise ValueError("--cuda-graphs needs --device cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay
    return fn


class OnnxRows:
    """The ONNX Runtime sessions of a run's rows, one per module, made by :meth:`export`.
    :attr:`check`: ``id(module) -> max |ONNX Runtime - PyTorch|`` of its row; :attr:`threads`: the
    intra-op threads of the shared pool (None before the first export)."""

    CHECK_LENGTHS = (16, 64)  # encoder frames of the check before timing

    def __init__(self):
        self.sessions: dict[int, object] = {}
        self.check: dict[int, float] = {}
        self.threads: int | None = None
        self._dir: tempfile.TemporaryDirectory | None = None

    def export(
        self,
        kind: str,
        module: nn.Module,
        include_frontend: bool,
        inputs: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """Exports the row ``(kind, module)`` (once per module, outside inference mode; dynamic time
        axis from the front end's receptive field, or 2 encoder frames, to ``module.max_frames``
        where it has one) and loads it; ``inputs(T)``: the row's ``(x, lengths)`` at ``T`` encoder
        frames. Raises ``RuntimeError`` where the graph's output differs from the module's."""
        from torch.export import Dim

        from analysis.latency.config import INPUT_LAYER
        from data.framing import receptive_field
        from models.export import export_onnx
        from models.onnx_runtime import OnnxMismatch, check_session, session, shared_thread_pool

        key = id(module)
        if key in self.sessions:
            return
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="latency-onnx-")
            # the rows' sessions share one pool: none spins against another's threads
            self.threads = shared_thread_pool(torch.get_num_threads())
        timed = Timed(kind, module, include_frontend).eval()
        shortest = receptive_field(INPUT_LAYER) if include_frontend else 2
        time = Dim("time", min=shortest, max=getattr(module, "max_frames", None))
        path = export_onnx(
            timed,
            inputs(64),
            Path(self._dir.name) / f"row{len(self.sessions)}.onnx",
            ["x", "lengths"],
            ["output"],
            {"x": {1: time}, "lengths": None},
        )
        self.sessions[key] = sess = session(path, shared_pool=True)
        cases = [(f"T={T}", dict(zip(("x", "lengths"), inputs(T)))) for T in self.CHECK_LENGTHS]
        try:  # the graph computes the row's function: checked before any timing
            checked = check_session(timed, sess, cases)
        except OnnxMismatch as e:
            raise RuntimeError(
                f"--engine onnxruntime: the exported {kind} row differs from PyTorch ({e}); refusing to time it"
            ) from None
        self.check[key] = max(r["max_abs_diff"] for r in checked)

    def callable(self, module: nn.Module, x: torch.Tensor, lengths: torch.Tensor) -> Callable[[], list]:
        """The session of ``module``'s row (after :meth:`export`) on ``(x, lengths)``, as a callable."""
        from models.onnx_runtime import feeds

        sess = self.sessions[id(module)]
        inputs = feeds(sess, {"x": x, "lengths": lengths})
        return lambda: sess.run(None, inputs)
