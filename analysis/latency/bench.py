"""The models, inputs and timed callables of one benchmark run (:class:`Bench`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from analysis.latency.config import INPUT_DIM, INPUT_LAYER, BenchConfig
from analysis.latency.engines import OnnxRows, wrap
from analysis.latency.modules import Peer, Timed, autocast_call, espnet_peer_module, uncached
from analysis.latency.timing import measure, summarise
from data.framing import input_frames
from models import ConformerCTC
from models.ctc import ctc_loss
from models.flops import count_flops
from models.subsampling import Conv2dSubsampling


class Bench:
    """Builds the models and the inputs of one run of ``config``, and times them."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.dtype = config.torch_dtype
        self.device = config.device
        self.autocast = config.autocast
        # the dtype the rows' weights and inputs are cast to (autocast keeps them fp32)
        self.weights_dtype = torch.float32 if self.autocast else self.dtype
        self.engine = config.engine
        self.onnx = OnnxRows()

    def model(self, reuse: str) -> ConformerCTC:
        """Our model with plan ``reuse`` at the run's size (random weights, ``torch.manual_seed(0)``)."""
        torch.manual_seed(0)
        c = self.config
        return ConformerCTC(
            c.vocab_size,
            d_model=c.d_model,
            num_layers=c.num_layers,
            ffn_dim=c.ffn_dim,
            kernel_size=c.kernel_size,
            reuse=reuse,
            subsampling_channels=c.d_model,
            input_dim=INPUT_DIM,
            input_layer=INPUT_LAYER,
        )

    def peer(self, name: str = "torchaudio", ours: ConformerCTC | None = None) -> nn.Module:
        """The peer row ``name``: torchaudio's Conformer (random weights, ``torch.manual_seed(0)``), or espnet2's
        ``ConformerEncoder`` carrying the weights of ``ours`` (a plan-free baseline)."""
        if name == "espnet":
            return espnet_peer_module(ours)
        import torchaudio

        torch.manual_seed(0)
        c = self.config
        conformer = torchaudio.models.Conformer(
            input_dim=c.d_model,
            num_heads=c.peer_heads,
            ffn_dim=c.ffn_dim,
            num_layers=c.num_layers,
            depthwise_conv_kernel_size=c.kernel_size,
        )
        # the front end of self.model()'s: fbank bins in, d_model channels
        frontend = Conv2dSubsampling(INPUT_DIM, c.d_model, c.d_model, INPUT_LAYER) if c.include_frontend else None
        return Peer(conformer, frontend)

    def inputs(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, lengths)`` of ``T`` encoder frames (seeded by ``T``), full length: fbank features
        ``(B, input_frames(T), 80)`` with the front end, else encoder inputs ``(B, T, d_model)``."""
        g = torch.Generator().manual_seed(T)
        c = self.config
        if c.include_frontend:
            x = torch.randn(c.batch_size, input_frames(T, INPUT_LAYER), INPUT_DIM, generator=g)
        else:
            x = torch.randn(c.batch_size, T, c.d_model, generator=g)
        return x.to(self.device), torch.full((c.batch_size,), x.shape[1], dtype=torch.long, device=self.device)

    def forward_fn(self, kind: str, module, T: int) -> Callable:
        """A zero-argument callable running one encoder forward of ``kind`` at length ``T``: what
        :meth:`prepare` compiles and captures (so, while captured, it reads no tensor back to the host)."""
        x, lengths = self.inputs(T)
        x = x.to(self.weights_dtype)
        if self.autocast:
            return autocast_call(Timed(kind, module, self.config.include_frontend), x, lengths, self.device, self.dtype)
        if kind == "peer":
            return lambda: module(x, lengths)
        if self.config.include_frontend:
            return lambda: module.encode(x, lengths, return_attentions=(kind == "materialised"))
        return lambda: module.encoder(x, None, return_attentions=(kind == "materialised"))

    def export(self, kind: str, module) -> None:
        """The ONNX Runtime engine's session of a row (:meth:`analysis.latency.engines.OnnxRows.export`)."""
        self.onnx.export(kind, module, self.config.include_frontend, self.inputs)

    def onnx_fn(self, kind: str, module, T: int) -> Callable:
        """The ONNX Runtime engine's callable for a row at length ``T`` (after :meth:`export`)."""
        return self.onnx.callable(module, *self.inputs(T))

    def prepare(self, kind: str, module, T: int) -> tuple[Callable, float]:
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
        c = self.config
        try:
            timed = wrap(plain, self.device, c.compile_backend if c.compile else None, c.cuda_graphs)
        except torch._dynamo.exc.FailOnRecompileLimitHit as e:
            name = getattr(module, "reuse", "torchaudio")
            raise RuntimeError(
                f"--compile: compiling {name} ({kind}) at length {T} hit dynamo's recompile limit "
                f"({torch._dynamo.config.recompile_limit}); refusing to time it eagerly"
            ) from e
        return timed, count_flops(plain) / 1e9

    def latencies(self, entries: list[tuple[str, object]], T: int) -> list[dict]:
        """Time every ``(kind, module)`` at length ``T``, interleaved: ``rounds`` passes over all of
        them, each timing ``runs / rounds`` calls, so that drift of the machine (clock, neighbours,
        allocator state) spreads over every configuration instead of biasing whichever ran last."""
        c = self.config
        with torch.inference_mode():
            prepared = [self.prepare(kind, module, T) for kind, module in entries]
            for fn, _ in prepared:
                measure(fn, self.device, c.warmup, 0)
            times: list[list[float]] = [[] for _ in entries]
            rounds = max(1, min(c.rounds, c.runs))
            for r in range(rounds):
                n = c.runs // rounds + (r < c.runs % rounds)
                for i, (fn, _) in enumerate(prepared):
                    times[i] += measure(fn, self.device, 0, n)
        return [{**summarise(t), "gflop": gflop} for t, (_, gflop) in zip(times, prepared)]

    def train_step(self, reuse: str) -> dict:
        """Median time of one training step (forward, CTC loss, backward, AdamW) on a fixed padded
        batch of ``train_length`` encoder frames, and peak GPU memory."""
        c = self.config
        model = self.model(reuse).to(self.device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(1)
        frames = input_frames(c.train_length, INPUT_LAYER)
        x = torch.randn(c.train_batch, frames, INPUT_DIM, generator=g).to(self.device)
        lengths = torch.full((c.train_batch,), frames, dtype=torch.long, device=self.device)
        # a label for every 4th encoder frame
        targets = torch.randint(1, c.vocab_size, (c.train_batch, c.train_length // 4), generator=g).to(self.device)
        target_lengths = torch.full((c.train_batch,), targets.shape[1], dtype=torch.long, device=self.device)
        amp = self.dtype != torch.float32

        def step():
            with torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=amp):
                log_probs, out_lengths = model(x, lengths)
            loss = ctc_loss(log_probs, out_lengths, targets, target_lengths) / log_probs.shape[0]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        result = summarise(measure(step, self.device, max(1, c.warmup // 2), c.train_runs))
        if self.device.startswith("cuda"):
            result["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
        return result
