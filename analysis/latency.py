"""Encoder latency and training cost of reuse configurations (the paper's Table 3), measured honestly.

    python -m analysis.latency [--reuse "1(H4)x16" "4(H4)x4" ...] [--lengths 128 256 512 768]
        [--batch-size 1] [--dtype fp32|fp16|bf16 [--precision-mode weights|autocast]] [--device cpu|cuda]
        [--include-frontend] [--engine torch|onnxruntime] [--peer torchaudio espnet]
        [--compile [--compile-backend inductor]] [--cuda-graphs] [--train-length 512 --train-batch 8]
        [--json F] [--png F]

Inference: random (seeded) encoder inputs ``(B, T, d)`` after the front end (``--include-frontend``
times from fbank features instead), ``torch.inference_mode``, warm-up, then the median and spread
of many runs (CUDA events on GPU, a monotonic clock on CPU). Baselines in the same run:

- our ``1x16`` on its fused path (SDPA; every row of the table) and on the materialised path
  (``+materialised``: maps computed explicitly, as a reuse model must for its computing layers);
- ``torchaudio.models.Conformer`` of the same width, depth, heads, FFN and kernel (absolute
  positions, no rel-pos): the peer (``torchaudio``). Its layers run with no padding mask, which is
  its ``forward`` on inputs of full length (all of ours are) without the host read of
  ``lengths.max()`` by which that builds its mask; with ``--include-frontend`` behind a front end
  like ours (:class:`Peer`), so that every row times front end + encoder;
- with ``--peer espnet`` (espnet importable; with ``--include-frontend``, as espnet2's encoder
  starts with its own Conv2d front end), espnet2's ``ConformerEncoder`` of the same architecture
  (relative positions, macaron FFN, the same convolution module) carrying the weights of our
  plan-free baseline ``1(H{peer-heads})x{num-layers}`` (seed 0: the ``1(H4)x16`` row's), mapped by
  :func:`models.espnet.espnet_peer`: its output is checked equal to ours in fp32 (within
  :data:`PEER_ATOL`) before any timing, or the run stops (``peer_check`` in the JSON), so the row
  times the same function as our baseline (``espnet``). Our first row's speed-up over each peer
  (the peer's time over ours) is printed and kept (``speedup_over_peer``).

Precision (``--dtype``): ``bf16`` / ``fp16`` run the rows with their weights and inputs cast
(``--precision-mode weights``, the default) or under ``torch.autocast`` with fp32 weights
(``autocast``); see :mod:`models.precision` for which is faster and how accurate each is.

Engine (``--engine``): ``torch`` (eager, or ``--compile`` / ``--cuda-graphs``) or ``onnxruntime``:
each row is exported once with torch's dynamo exporter (:mod:`models.export`; dynamic time axis,
the same module the torch engine times) and run by an ONNX Runtime CPU session with ``--threads``
intra-op threads (one pool shared by every row's session, :func:`models.export.shared_thread_pool`),
fp32 only. Each exported row is checked against PyTorch before timing (within :data:`ONNX_ATOL`;
``onnx_max_abs_diff`` in the JSON). The ``+materialised`` row is left out (a graph has no fused
kernel to compare it with). A row's GFLOP counts what the graph computes: the positional
projection, cached by PyTorch eager, at every call, and all ``T x (2T - 1)`` positional scores of
each computing layer in one chunk, where eager on CPU takes the query rows in chunks (the model run
on the exporter's path, :func:`models.export.as_exported`).

``--compile`` compiles each row at each length (``torch.compile(dynamic=False)``, backend
``--compile-backend``) before timing it, from a fresh dynamo cache. The rows' callables share code
objects, on which dynamo keeps one entry per (row, length): its recompile limit is raised to cover
them, and hitting it is an error instead of dynamo's silent fall-back to eager (settings restored
after the run). ``--cuda-graphs`` captures each callable, which therefore reads no tensor back to
the host (``ConformerCTC`` skips its checks of input values while a capture is under way).

Work: the GFLOP of one forward at each length, counted by ``torch.utils.flop_counter`` (matrix
products, convolutions and attention kernels; element-wise work is not counted), beside the times, so
that a ratio can be read against the arithmetic it saves.

Training cost: one optimiser step (forward + CTC loss + backward + AdamW) on a fixed padded batch,
median time, and peak GPU memory.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from models import ConformerCTC
from models.precision import DTYPES, MODES, cpu_description, precision_problem, precision_warning
from models.subsampling import Conv2dSubsampling

PAPER = ["1(H4)x16", "2(H4)x8", "4(H4)x4", "8(H4)x2", "4(H8)x4"]
PEERS = ("torchaudio", "espnet")
ONNX_ATOL = 1e-4  # ONNX Runtime against PyTorch, fp32, before timing
ENGINES = ("torch", "onnxruntime")


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_description()


def measure(fn, device: str, warmup: int, runs: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(runs):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1000)
    return times


def steady_malloc() -> bool:
    """Make glibc's allocator keep freed large blocks (mmap threshold 32 MiB, trim threshold 1 GiB),
    as jemalloc / tcmalloc do: by default each freed multi-MiB tensor goes back to the system and
    the next one is page-faulted in afresh, and how often depends on the history of earlier
    allocations, which on CPU moves a layer's time by 10-20 % from run to run. False where the C
    library is not glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn) -> int:
    """FLOP of one call of ``fn`` (matrix products, convolutions, attention), by
    ``torch.utils.flop_counter``; CPU's fused attention kernel, which it does not know, is counted
    as the attention it computes (``2 T S (d_k + d_v)`` per head, mask and softmax not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def summarise(times: list[float]) -> dict:
    # inclusive: deciles within the range of the runs (the default extrapolates beyond it, below 0 for few runs)
    q = statistics.quantiles(times, n=10, method="inclusive") if len(times) >= 2 else [times[0]] * 9
    return {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1], "runs": len(times)}


def compile_settings(entries: int) -> dict:
    """``torch._dynamo.config`` of a ``--compile`` run of ``entries`` (row, length) pairs. The rows'
    callables are lambdas of a few source lines, so they share code objects, and dynamo keeps one
    cache entry per (row, length) on each: its recompile limit (8 by default) must cover them all,
    and reaching it must be an error, as dynamo otherwise runs the code eagerly, silently."""
    return {"recompile_limit": max(8, entries), "accumulated_recompile_limit": max(256, entries),
            "fail_on_recompile_limit_hit": True}


class Peer(torch.nn.Module):
    """The peer row: ``torchaudio.models.Conformer`` (:attr:`conformer`), behind :attr:`frontend`
    (our :class:`~models.subsampling.Conv2dSubsampling` at our rows' sizes) when the rows time the
    front end too, else None.

    ``forward(x (B, T, d), lengths (B,))``, or fbank features ``(B, 4T + 3, 80)`` with the front
    end, -> ``(B, T, d)``: the conformer's layers on the ``(T, B, d)``-transposed input with no key
    padding mask. That is ``conformer(x, lengths)`` where every length is full, as in the benchmark
    (its mask is then all False), without the host read (``lengths.max().item()``) by which it
    builds the mask, which a CUDA graph capture does not allow. Not for padded batches.
    """

    def __init__(self, conformer: torch.nn.Module, frontend: Conv2dSubsampling | None = None):
        super().__init__()
        self.conformer, self.frontend = conformer, frontend

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.frontend is not None:
            x, lengths = self.frontend(x, lengths)
        x = x.transpose(0, 1)
        for layer in self.conformer.conformer_layers:
            x = layer(x, None)
        return x.transpose(0, 1)


def autocast_call(module: nn.Module, x: torch.Tensor, lengths: torch.Tensor, device: str, dtype: torch.dtype):
    """A zero-argument callable: ``module(x, lengths)`` under ``torch.autocast`` to ``dtype``."""
    device_type = torch.device(device).type

    def call():
        with torch.autocast(device_type, dtype=dtype):
            return module(x, lengths)

    return call


def uncached(module: nn.Module) -> None:
    """Drops our model's position table and its cached projections, so that its next call computes
    them as a traced graph does (for the FLOP count of an ONNX row)."""
    from models.attention import RelPositionalEncoding, clear_position_caches

    for m in module.modules():
        if isinstance(m, RelPositionalEncoding):
            m.table = None
    clear_position_caches(module)


def espnet_importable() -> str | None:
    """Why the ``espnet`` peer cannot be built here, or None."""
    try:
        import espnet2.asr.encoder.conformer_encoder  # noqa: F401

        from models.espnet import espnet_peer  # noqa: F401
    except ImportError as e:
        return f"espnet2's ConformerEncoder is not importable ({e})"
    return None


def espnet_peer_module(ours: ConformerCTC | None) -> nn.Module:
    """The ``espnet`` peer row: espnet2's ``ConformerEncoder`` (with its Conv2d front end) holding the
    weights of ``ours`` (our plan-free baseline), by :func:`models.espnet.espnet_peer`."""
    from models.espnet import espnet_peer

    return EspnetRow(espnet_peer(ours))


class EspnetRow(nn.Module):
    """The ``espnet`` row, called as the other peer: ``forward(features, lengths)`` -> ``(B, T', d)``
    (espnet2's front end + encoder; :class:`models.espnet.EspnetPeer` also returns the lengths)."""

    def __init__(self, peer: nn.Module):
        super().__init__()
        self.peer = peer

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.peer(x, lengths)[0]

    @property
    def max_frames(self) -> int | None:
        """Longest fbank input without growing espnet's position table (an export bound: ``extend_pe``
        branches on it), for the conv2d front end; None if there is no such table."""
        for m in self.peer.modules():
            pe = getattr(m, "pe", None)
            if isinstance(pe, torch.Tensor) and pe.dim() == 3:
                return 4 * ((pe.size(1) + 1) // 2) + 6
        return None


class Timed(nn.Module):
    """What a row of ``kind`` times, as a module (the ONNX engine exports it):
    ``forward(x, lengths)`` -> the encoder output ``(B, T, d)``, as :meth:`Bench.forward_fn` calls it."""

    def __init__(self, kind: str, module: nn.Module, include_frontend: bool):
        super().__init__()
        self.kind, self.module, self.include_frontend = kind, module, include_frontend

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "peer":
            return self.module(x, lengths)
        materialised = self.kind == "materialised"
        if self.include_frontend:
            return self.module.encode(x, lengths, return_attentions=materialised).output
        return self.module.encoder(x, None, return_attentions=materialised)[0]


class Bench:
    """Builds the models and the inputs of one benchmark run."""

    def __init__(self, a):
        self.a = a
        self.dtype = DTYPES[a.dtype]
        self.device = a.device
        self.autocast = a.precision_mode == "autocast" and self.dtype != torch.float32
        # the dtype the rows' weights and inputs are cast to (autocast keeps them fp32)
        self.weights_dtype = torch.float32 if self.autocast else self.dtype
        self.engine = getattr(a, "engine", "torch")
        self._onnx: dict[int, object] = {}  # id(Timed module's model) -> ONNX Runtime session
        self.onnx_check: dict[int, float] = {}  # id(module) -> max |ONNX Runtime - PyTorch| of its row
        self.onnx_threads: int | None = None  # intra-op threads of ONNX Runtime's shared pool
        self._onnx_dir = None

    def model(self, reuse: str) -> ConformerCTC:
        torch.manual_seed(0)
        a = self.a
        return ConformerCTC(a.vocab_size, d_model=a.d_model, num_layers=a.num_layers, ffn_dim=a.ffn_dim,
                            kernel_size=a.kernel_size, reuse=reuse, subsampling_channels=a.d_model)

    def peer(self, name: str = "torchaudio", ours: ConformerCTC | None = None) -> nn.Module:
        """The peer row ``name``: torchaudio's Conformer (random weights, seed 0), or espnet2's
        ``ConformerEncoder`` carrying the weights of ``ours`` (a plan-free baseline)."""
        if name == "espnet":
            return espnet_peer_module(ours)
        import torchaudio

        torch.manual_seed(0)
        a = self.a
        conformer = torchaudio.models.Conformer(input_dim=a.d_model, num_heads=a.peer_heads, ffn_dim=a.ffn_dim,
                                                num_layers=a.num_layers, depthwise_conv_kernel_size=a.kernel_size)
        # the front end of self.model()'s: 80 fbank bins, d_model channels
        return Peer(conformer, Conv2dSubsampling(80, a.d_model, a.d_model) if a.include_frontend else None)

    def inputs(self, T: int):
        g = torch.Generator().manual_seed(T)
        B, a = self.a.batch_size, self.a
        if a.include_frontend:
            frames = 4 * T + 3  # ((F - 1) // 2 - 1) // 2 == T
            x = torch.randn(B, frames, 80, generator=g)
        else:
            x = torch.randn(B, T, a.d_model, generator=g)
        return x.to(self.device), torch.full((B,), x.shape[1], dtype=torch.long, device=self.device)

    def forward_fn(self, kind: str, module, T: int):
        """A zero-argument callable running one encoder forward of ``kind`` at length ``T``: what
        :meth:`wrap` compiles and captures (so, while captured, it reads no tensor back to the host)."""
        x, lengths = self.inputs(T)
        x = x.to(self.weights_dtype)
        if self.autocast:
            return autocast_call(Timed(kind, module, self.a.include_frontend), x, lengths, self.device, self.dtype)
        if kind == "peer":
            return lambda: module(x, lengths)
        if self.a.include_frontend:
            return lambda: module.encode(x, lengths, return_attentions=(kind == "materialised"))
        return lambda: module.encoder(x, None, return_attentions=(kind == "materialised"))

    def export(self, kind: str, module) -> None:
        """The ONNX Runtime engine's session of a row: its :class:`Timed` module exported (once per
        module, outside inference mode; dynamic time axis) and loaded with ``--threads`` threads."""
        import tempfile

        from models.export import export_onnx, session, shared_thread_pool
        from data.framing import receptive_field
        from torch.export import Dim

        key = id(module)
        if key in self._onnx:
            return
        if self._onnx_dir is None:
            self._onnx_dir = tempfile.TemporaryDirectory(prefix="latency-onnx-")
            # the rows' sessions share one pool: none spins against another's threads
            self.onnx_threads = shared_thread_pool(torch.get_num_threads())
        timed = Timed(kind, module, self.a.include_frontend).eval()
        x, lengths = self.inputs(64)
        time = Dim("time", min=receptive_field() if self.a.include_frontend else 2, max=getattr(module, "max_frames", None))
        path = export_onnx(timed, (x, lengths), Path(self._onnx_dir.name) / f"row{len(self._onnx)}.onnx",
                           ["x", "lengths"], ["output"], {"x": {1: time}, "lengths": None})
        self._onnx[key] = sess = session(path, shared_pool=True)
        # the graph computes the row's function: checked at two lengths before any timing
        worst = 0.0
        with torch.inference_mode():
            for T in (16, 64):
                x, lengths = self.inputs(T)
                out = torch.from_numpy(sess.run(None, onnx_feeds(sess, x, lengths))[0])
                worst = max(worst, (out - timed(x, lengths)).abs().max().item())
        if not worst <= ONNX_ATOL:
            raise RuntimeError(f"--engine onnxruntime: the exported {kind} row differs from PyTorch by {worst:.3g} "
                               f"(tolerance {ONNX_ATOL:g}); refusing to time it")
        self.onnx_check[key] = worst

    def onnx_fn(self, kind: str, module, T: int):
        """The ONNX Runtime engine's callable for a row at length ``T`` (after :meth:`export`)."""
        sess = self._onnx[id(module)]
        feeds = onnx_feeds(sess, *self.inputs(T))
        return lambda: sess.run(None, feeds)

    def wrap(self, fn):
        """``fn`` as timed: compiled (and called once, so that it is compiled before any timing) with
        ``--compile``, a captured CUDA graph's replay with ``--cuda-graphs``."""
        if self.a.compile:
            fn = torch.compile(fn, backend=self.a.compile_backend, dynamic=False)
            fn()
        if self.a.cuda_graphs:
            if not self.device.startswith("cuda"):
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

    def prepare(self, kind: str, module, T: int):
        """``(timed callable, GFLOP of one call)`` for ``kind`` at length ``T``; call under inference mode."""
        plain = self.forward_fn(kind, module, T)
        if self.engine == "onnxruntime":
            from models.export import as_exported

            timed = self.onnx_fn(kind, module, T)
            timed()
            uncached(module)  # the graph projects the positions at every call: count it
            with as_exported():  # and all T x (2T - 1) positional scores, in one chunk
                return timed, count_flops(plain) / 1e9
        plain()  # steady state: input-independent work cached by the model is not counted
        try:
            timed = self.wrap(plain)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            name = getattr(module, "reuse", "torchaudio")
            raise RuntimeError(f"--compile: compiling {name} ({kind}) at length {T} hit dynamo's recompile limit "
                               f"({torch._dynamo.config.recompile_limit}); refusing to time it eagerly") from e
        return timed, count_flops(plain) / 1e9

    def latencies(self, entries: list[tuple[str, object]], T: int) -> list[dict]:
        """Time every ``(kind, module)`` at length ``T``, interleaved: ``rounds`` passes over all of
        them, each timing ``runs / rounds`` calls, so that drift of the machine (clock, neighbours,
        allocator state) spreads over every configuration instead of biasing whichever ran last."""
        a = self.a
        with torch.inference_mode():
            prepared = [self.prepare(kind, module, T) for kind, module in entries]
            for fn, _ in prepared:
                measure(fn, self.device, a.warmup, 0)
            times: list[list[float]] = [[] for _ in entries]
            rounds = max(1, min(a.rounds, a.runs))
            for r in range(rounds):
                n = a.runs // rounds + (r < a.runs % rounds)
                for i, (fn, _) in enumerate(prepared):
                    times[i] += measure(fn, self.device, 0, n)
        return [{**summarise(t), "gflop": gflop} for t, (_, gflop) in zip(times, prepared)]

    def train_step(self, reuse: str) -> dict:
        """Median time of one training step and peak GPU memory."""
        a = self.a
        model = self.model(reuse).to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        frames = 4 * a.train_length + 3
        x = torch.randn(a.train_batch, frames, 80, generator=g).to(self.device)
        lengths = torch.full((a.train_batch,), frames, dtype=torch.long, device=self.device)
        targets = torch.randint(1, a.vocab_size, (a.train_batch, a.train_length // 4), generator=g).to(self.device)
        target_lengths = torch.full((a.train_batch,), targets.shape[1], dtype=torch.long, device=self.device)
        amp = self.dtype != torch.float32

        def step():
            with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=amp):
                log_probs, out_lengths = model(x, lengths)
            loss = torch.nn.functional.ctc_loss(log_probs.float().transpose(0, 1), targets, out_lengths,
                                                target_lengths, zero_infinity=True)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = summarise(measure(step, self.device, max(1, a.warmup // 2), a.train_runs))
        if self.device.startswith("cuda"):
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return result


def onnx_feeds(sess, x: torch.Tensor, lengths: torch.Tensor) -> dict:
    """A row's ONNX Runtime inputs; one the graph does not read (``lengths`` without the front end)
    has been dropped from it by the exporter, and is left out."""
    names = {i.name for i in sess.get_inputs()}
    return {k: v.numpy() for k, v in (("x", x), ("lengths", lengths)) if k in names}


def baseline_plan(a) -> str:
    """Our plan-free baseline at the benchmark's size (the plan the ESPnet peer's weights come from)."""
    return f"1(H{a.peer_heads})x{a.num_layers}"


PEER_ATOL = 1e-4


def check_peer(bench: Bench, peer: nn.Module, ours: ConformerCTC, lengths=(32, 64)) -> dict:
    """The peer's output against our baseline's on the benchmark's inputs (fp32, inference mode):
    ``{"max_abs_diff": ..., "lengths": [...]}``; raises ``RuntimeError`` above :data:`PEER_ATOL`,
    so that a row that does not compute our function is never timed."""
    worst = 0.0
    with torch.inference_mode():
        for T in lengths:
            x, lens = bench.inputs(T)
            ref = Timed("fused", ours, bench.a.include_frontend)(x, lens).float()
            out = peer(x, lens).float()
            if out.shape != ref.shape:
                raise RuntimeError(f"--peer espnet: output {tuple(out.shape)} at length {T}, ours {tuple(ref.shape)}")
            worst = max(worst, (out - ref).abs().max().item())
    if not worst <= PEER_ATOL:
        raise RuntimeError(f"--peer espnet: espnet2's encoder with our weights differs from ours by {worst:.3g} "
                           f"(tolerance {PEER_ATOL:g}); refusing to time it as the same model")
    return {"max_abs_diff": worst, "lengths": list(lengths)}


def onnxruntime_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def run(a) -> dict:
    from tqdm import tqdm

    if a.threads:
        torch.set_num_threads(a.threads)
    malloc = "default"
    if a.malloc == "steady" and not a.device.startswith("cuda"):
        malloc = "steady (glibc mmap threshold 32 MiB, trim threshold 1 GiB)" if steady_malloc() else "default (not glibc)"
    bench = Bench(a)
    rows: list[tuple[str, str]] = [(r, "fused") for r in a.reuse]
    if not a.no_materialised:
        rows.insert(1, (a.reuse[0], "materialised"))
    if a.engine == "onnxruntime" and not a.no_materialised:
        rows.pop(1)  # a graph has no fused kernel to compare the materialised path with
    if not a.no_peer:
        rows += [(name, "peer") for name in PEERS if name in (a.peer or ["torchaudio"]) or name == "torchaudio"]
    results = {"device": device_name(a.device), "device_type": a.device, "torch": torch.__version__, "dtype": a.dtype,
               "precision_mode": a.precision_mode if a.dtype != "fp32" else None, "engine": a.engine,
               "precision_warning": precision_warning(a.dtype, a.device),
               "onnxruntime": onnxruntime_version() if a.engine == "onnxruntime" else None,
               "threads": torch.get_num_threads(), "batch_size": a.batch_size, "include_frontend": a.include_frontend,
               "compile": a.compile, "compile_backend": a.compile_backend if a.compile else None,
               "cuda_graphs": a.cuda_graphs, "lengths": a.lengths, "malloc": malloc,
               "warmup": a.warmup, "runs": a.runs, "rounds": a.rounds,
               "model": {k: getattr(a, k) for k in ("d_model", "num_layers", "ffn_dim", "kernel_size")},
               "inference": [], "training": []}
    built, modules, entries = {}, [], []
    for name, kind in rows:
        if name not in built:  # the materialised row runs the same model as its fused row
            if kind == "peer":
                # espnet: our baseline's weights (seed 0, as its row's), checked in fp32 before any cast
                ours = bench.model(baseline_plan(a)).to(bench.device).eval() if name == "espnet" else None
                built[name] = bench.peer(name, ours).to(bench.device).eval()
                if name == "espnet":
                    results["peer_check"] = {"espnet": check_peer(bench, built[name], ours)}
                built[name] = built[name].to(bench.device, bench.weights_dtype)
            else:
                built[name] = bench.model(name).to(bench.device, bench.weights_dtype).eval()
        module = built[name]
        modules.append((kind, module))
        entries.append({"config": name if kind != "materialised" else f"{name}+materialised", "kind": kind,
                        "parameters": sum(p.numel() for p in module.parameters()), "by_length": {}})
    if a.engine == "onnxruntime":
        for (kind, module), entry in zip(tqdm(modules, desc="export", unit="row", disable=a.quiet), entries):
            bench.export(kind, module)
            entry["onnx_max_abs_diff"] = bench.onnx_check[id(module)]
        results["onnxruntime_threads"] = bench.onnx_threads
    compiling = contextlib.nullcontext()
    if a.compile:  # (torch._dynamo is imported on first use)
        torch._dynamo.reset()  # entries of earlier runs on the shared code objects would count to the limit
        compiling = torch._dynamo.config.patch(**compile_settings(len(rows) * len(a.lengths)))
    with compiling:
        for T in tqdm(a.lengths, desc="latency", unit="length", disable=a.quiet):
            for entry, r in zip(entries, bench.latencies(modules, T)):
                entry["by_length"][str(T)] = r
    results["inference"] = entries
    del built, modules
    first = results["inference"][0]["by_length"]
    for entry in results["inference"]:
        for T, r in entry["by_length"].items():
            r["speedup_vs_first"] = first[T]["median_ms"] / r["median_ms"]
    # how much faster our first row is than each peer (the peer's time over ours)
    results["speedup_over_peer"] = {e["config"]: {T: r["median_ms"] / first[T]["median_ms"]
                                                  for T, r in e["by_length"].items()}
                                    for e in results["inference"] if e["kind"] == "peer"}
    if a.train_runs > 0:
        for name in tqdm(a.reuse, desc="training", unit="config", disable=a.quiet):
            results["training"].append({"config": name, "length": a.train_length, "batch": a.train_batch,
                                        **bench.train_step(name)})
        base = results["training"][0]["median_ms"]
        for r in results["training"]:
            r["relative_to_first"] = r["median_ms"] / base
    return results


def print_table(results: dict) -> None:
    lengths = results["lengths"]
    engine = results.get("engine", "torch")
    precision = results["dtype"] + (f" ({results['precision_mode']})" if results.get("precision_mode") else "")
    print(f"# {results['device']} | "
          + (f"onnxruntime {results.get('onnxruntime')} | " if engine == "onnxruntime" else "")
          + f"torch {results['torch']} | {precision} | {results['threads']} threads | "
          f"batch {results['batch_size']} | front-end {'included' if results['include_frontend'] else 'excluded'} | "
          f"{results['runs']} runs in {results['rounds']} interleaved rounds | malloc {results['malloc']}"
          + (f" | torch.compile ({results.get('compile_backend')})" if results.get("compile") else "")
          + (" | CUDA graphs" if results.get("cuda_graphs") else ""))
    print(f"{'configuration':26s}" + "".join(f"{f'{T} ms':>11s}{'x':>6s}" for T in lengths))
    for e in results["inference"]:
        cells = "".join(f"{e['by_length'][str(T)]['median_ms']:11.2f}{e['by_length'][str(T)]['speedup_vs_first']:6.2f}"
                        for T in lengths)
        print(f"{e['config']:26s}{cells}")
    print("(median of runs; x = speed-up over the first row; spread p10-p90 in the JSON)")
    first = results["inference"][0]["config"]
    for peer, ratios in results.get("speedup_over_peer", {}).items():
        print(f"{first} speed-up over {peer} ({peer} time / {first} time): "
              + ", ".join(f"{ratios[str(T)]:.2f}x at {T}" for T in lengths))
    for peer, check in (results.get("peer_check") or {}).items():
        print(f"{peer} peer: max |output - ours| = {check['max_abs_diff']:.2e} before timing (our weights mapped)")
    print(f"\n{'GFLOP per forward':26s}" + "".join(f"{f'{T}':>11s}{'rel.':>6s}" for T in lengths))
    first = results["inference"][0]["by_length"]
    for e in results["inference"]:
        cells = "".join(f"{e['by_length'][str(T)]['gflop']:11.4g}"
                        f"{e['by_length'][str(T)]['gflop'] / first[str(T)]['gflop']:6.2f}" for T in lengths)
        print(f"{e['config']:26s}{cells}")
    if results["training"]:
        print(f"\n{'training step':26s}{'ms':>11s}{'rel.':>7s}{'peak MB':>10s}")
        for r in results["training"]:
            mem = f"{r['peak_memory_mb']:10.0f}" if "peak_memory_mb" in r else f"{'-':>10s}"
            print(f"{r['config']:26s}{r['median_ms']:11.1f}{r['relative_to_first']:7.2f}{mem}")


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for e in results["inference"]:
        lengths = [int(T) for T in e["by_length"]]
        ax.plot(lengths, [e["by_length"][str(T)]["median_ms"] for T in lengths], marker="o", label=e["config"],
                ls="--" if e["kind"] != "fused" else "-")
    ax.set(xlabel="encoder frames (after subsampling)", ylabel="latency (ms)",
           title=f"encoder latency, {results['device']}, {results['dtype']}")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m analysis.latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--reuse", nargs="+", default=PAPER, help="reuse plans; the first is the baseline of the ratios")
    p.add_argument("--lengths", nargs="+", type=int, default=[128, 256, 512, 768], help="encoder frames")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--precision-mode", choices=MODES, default="weights",
                   help="bf16 / fp16: cast the weights and inputs (weights) or run torch.autocast over fp32 weights")
    p.add_argument("--engine", choices=ENGINES, default="torch",
                   help="torch (eager; --compile, --cuda-graphs) or onnxruntime (each row exported to ONNX; CPU, fp32)")
    p.add_argument("--peer", nargs="+", choices=PEERS, default=["torchaudio"],
                   help="peer rows: torchaudio's Conformer (always, unless --no-peer), espnet2's ConformerEncoder "
                        "with our baseline's weights (espnet)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--include-frontend", action="store_true", help="time from fbank features (Table 3 excludes it)")
    p.add_argument("--compile", action="store_true", help="torch.compile the timed function")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (with --compile)")
    p.add_argument("--cuda-graphs", action="store_true", help="replay a captured CUDA graph")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--runs", type=int, default=50, help="timed calls per configuration and length")
    p.add_argument("--rounds", type=int, default=5, help="interleaved passes over the configurations that share the runs")
    p.add_argument("--malloc", choices=["steady", "default"], default="steady",
                   help="CPU: keep freed large blocks in glibc's heap (steady) or leave the allocator as it is")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--no-peer", action="store_true", help="skip the peer rows")
    p.add_argument("--no-materialised", action="store_true", help="skip the materialised-path baseline")
    p.add_argument("--train-length", type=int, default=512, help="encoder frames of the training batch")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-runs", type=int, default=10, help="timed training steps (0 = skip)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=16)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--kernel-size", type=int, default=31)
    p.add_argument("--peer-heads", type=int, default=4)
    p.add_argument("--vocab-size", type=int, default=129)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--png", help="plot latency against length here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> dict:
    p = parser()
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda, but no CUDA device is available")
    if "espnet" in a.peer and not a.no_peer:
        if (why := espnet_importable()) is not None:
            p.error(f"--peer espnet: {why}")
        if not a.include_frontend:
            p.error("--peer espnet needs --include-frontend (espnet2's encoder starts with its own Conv2d front end)")
    if problem := precision_problem(a.dtype, a.device):
        p.error(problem)
    if warning := precision_warning(a.dtype, a.device):
        print(f"warning: {warning}", file=sys.stderr)
    if a.engine == "onnxruntime":
        if a.device != "cpu" or a.dtype != "fp32" or a.compile or a.cuda_graphs:
            p.error("--engine onnxruntime times fp32 on the CPU (no --dtype fp16/bf16, --compile or --cuda-graphs)")
        try:
            onnxruntime_version()
        except ImportError:
            p.error("--engine onnxruntime needs onnx, onnxscript and onnxruntime (pip install '.[onnx]')")
    try:
        for r in a.reuse:
            ConformerCTC(a.vocab_size, d_model=a.d_model, num_layers=a.num_layers, ffn_dim=a.ffn_dim,
                         kernel_size=a.kernel_size, reuse=r, subsampling_channels=8)
        results = run(a)
    except ValueError as e:
        p.error(str(e))
    print_table(results)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(results, indent=1))
    if a.png:
        plot(results, a.png)
    return results


if __name__ == "__main__":
    main()
