"""Encoder latency and training cost of reuse configurations (the paper's Table 3), measured honestly.

    python -m analysis.latency [--reuse "1(H4)x16" "4(H4)x4" ...] [--lengths 128 256 512 768]
        [--batch-size 1] [--dtype fp32|fp16|bf16] [--device cpu|cuda] [--include-frontend]
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
  like ours (:class:`Peer`), so that every row times front end + encoder.

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
import platform
import statistics
import time
from pathlib import Path

import torch

from models import ConformerCTC
from models.subsampling import Conv2dSubsampling

PAPER = ["1(H4)x16", "2(H4)x8", "4(H4)x4", "8(H4)x2", "4(H8)x4"]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


class Bench:
    """Builds the models and the inputs of one benchmark run."""

    def __init__(self, a):
        self.a = a
        self.dtype = DTYPES[a.dtype]
        self.device = a.device

    def model(self, reuse: str) -> ConformerCTC:
        torch.manual_seed(0)
        a = self.a
        return ConformerCTC(a.vocab_size, d_model=a.d_model, num_layers=a.num_layers, ffn_dim=a.ffn_dim,
                            kernel_size=a.kernel_size, reuse=reuse, subsampling_channels=a.d_model)

    def peer(self) -> Peer:
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
        x = x.to(self.dtype)
        if kind == "peer":
            return lambda: module(x, lengths)
        if self.a.include_frontend:
            return lambda: module.encode(x, lengths, return_attentions=(kind == "materialised"))
        return lambda: module.encoder(x, None, return_attentions=(kind == "materialised"))

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
    if not a.no_peer:
        rows.append(("torchaudio", "peer"))
    results = {"device": device_name(a.device), "device_type": a.device, "torch": torch.__version__, "dtype": a.dtype,
               "threads": torch.get_num_threads(), "batch_size": a.batch_size, "include_frontend": a.include_frontend,
               "compile": a.compile, "compile_backend": a.compile_backend if a.compile else None,
               "cuda_graphs": a.cuda_graphs, "lengths": a.lengths, "malloc": malloc,
               "warmup": a.warmup, "runs": a.runs, "rounds": a.rounds,
               "model": {k: getattr(a, k) for k in ("d_model", "num_layers", "ffn_dim", "kernel_size")},
               "inference": [], "training": []}
    built, modules, entries = {}, [], []
    for name, kind in rows:
        if name not in built:  # the materialised row runs the same model as its fused row
            built[name] = (bench.peer() if kind == "peer" else bench.model(name)).to(bench.device, bench.dtype).eval()
        module = built[name]
        modules.append((kind, module))
        entries.append({"config": name if kind != "materialised" else f"{name}+materialised", "kind": kind,
                        "parameters": sum(p.numel() for p in module.parameters()), "by_length": {}})
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
    print(f"# {results['device']} | torch {results['torch']} | {results['dtype']} | {results['threads']} threads | "
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
    p.add_argument("--no-peer", action="store_true", help="skip torchaudio's Conformer")
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
