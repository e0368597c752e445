"""ONNX Runtime: the CPU session of an exported graph, and its equality check against PyTorch.

Every ONNX graph of this repository runs through :func:`session` (the export's check, ``evaluate.py``
and ``transcribe.py --engine onnxruntime`` through :class:`OnnxCTC`, the latency benchmark's ONNX
rows) and is checked against the PyTorch module it was exported from by :func:`check_session`
before it is used: each floating output within :data:`ATOL` of PyTorch's (inference mode), each
integer output equal, the shapes equal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

ATOL = 1e-4  # ONNX Runtime against PyTorch, fp32 (log-probabilities, encoder outputs)
CHECK_LENGTHS = (64, 203, 1031)  # fbank frames (conv2d: 15, 50 and 257 encoder frames), after the shortest

_POOL_THREADS: int | None = None


class OnnxMismatch(AssertionError):
    """An ONNX Runtime output that differs from PyTorch's past the tolerance (or in shape / value)."""


def session(path: str | Path, threads: int | None = None, shared_pool: bool = False):
    """An ONNX Runtime CPU session of ``path`` (all graph optimisations; ``threads`` intra-op
    threads, one inter-op thread, sequential execution). ``shared_pool``: run on the process's
    global thread pool (:func:`shared_thread_pool`) instead of the session's own; once that pool
    exists every session runs on it (ONNX Runtime refuses a pool of its own then), ``threads``
    aside."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if shared_pool or _POOL_THREADS is not None:
        options.use_per_session_threads = False
    else:
        options.inter_op_num_threads = 1
        if threads:
            options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def shared_thread_pool(threads: int) -> int:
    """Gives ONNX Runtime one global pool of ``threads`` intra-op threads for the sessions made with
    ``shared_pool=True``, once per process (ONNX Runtime cannot replace it); returns the pool's size.
    Sessions with pools of their own, run by turns (as the latency benchmark's interleaved rows
    are), slow each other down: a session's threads keep spinning after its run while the next
    session's threads want the cores."""
    global _POOL_THREADS
    import onnxruntime.capi._pybind_state as C

    if _POOL_THREADS is not None:  # ONNX Runtime makes its global pools once per process
        return _POOL_THREADS
    C.set_global_thread_pool_sizes(threads, 1)
    _POOL_THREADS = threads
    return threads


def version() -> str:
    """ONNX Runtime's version (``ImportError`` where it is not installed)."""
    import onnxruntime

    return onnxruntime.__version__


def feeds(sess, inputs: dict[str, torch.Tensor]) -> dict:
    """``inputs`` as ``sess`` takes them (NumPy arrays); an input the graph does not read (which the
    exporter drops, e.g. ``lengths`` of an encoder without front end) is left out."""
    names = {i.name for i in sess.get_inputs()}
    return {k: v.detach().cpu().numpy() for k, v in inputs.items() if k in names}


def run(sess, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """``sess``'s outputs on ``inputs`` (:func:`feeds`), as CPU tensors."""
    return [torch.from_numpy(o) for o in sess.run(None, feeds(sess, inputs))]


def check_session(
    module: Callable, sess, cases: Sequence[tuple[str, dict[str, torch.Tensor]]], atol: float = ATOL
) -> list[dict]:
    """``sess`` against ``module`` (called with each case's inputs as positional arguments, in
    inference mode) on every ``(name, inputs)`` case: ``[{"case", "max_abs_diff", "lengths_equal"}]``,
    the largest difference over the floating outputs (every element, padding included) and whether
    the integer outputs (lengths) are equal. Raises :class:`OnnxMismatch` on the first case past
    ``atol``, with unequal integer outputs or with a shape that differs."""
    results = []
    with torch.inference_mode():
        for name, inputs in cases:
            ref = module(*inputs.values())
            ref = tuple(ref) if isinstance(ref, (tuple, list)) else (ref,)
            out = run(sess, inputs)
            shapes_equal = len(out) == len(ref) and all(o.shape == r.shape for o, r in zip(out, ref))
            diff, equal = 0.0, True
            for o, r in zip(out, ref):
                if r.is_floating_point():
                    diff = max(diff, (o.float() - r.float()).abs().max().item() if r.numel() else 0.0)
                else:
                    equal = equal and torch.equal(o, r.cpu())
            results.append({"case": name, "max_abs_diff": diff, "lengths_equal": equal})
            if not (diff <= atol and equal and shapes_equal):
                raise OnnxMismatch(
                    f"ONNX Runtime differs from PyTorch on {name}: max |diff| {diff:.3g} (tolerance {atol:g}), "
                    f"shapes {[tuple(o.shape) for o in out]} vs {[tuple(r.shape) for r in ref]}"
                    + (
                        ""
                        if equal
                        else f", integer outputs {[o.tolist() for o in out if not o.is_floating_point()]}"
                        f" vs {[r.tolist() for r in ref if not r.is_floating_point()]}"
                    )
                )
    return results


def check_inputs(input_dim: int = 80, lengths=CHECK_LENGTHS, seed: int = 1) -> list[tuple[str, dict]]:
    """``(name, {"features", "lengths"})`` of a CTC model's check: one utterance of each length, then a
    padded batch of all of them (the longest first: lengths from the longest down to the shortest)."""
    g = torch.Generator().manual_seed(seed)
    cases = []
    for T in lengths:
        cases.append((f"T={T}", {"features": torch.randn(1, T, input_dim, generator=g), "lengths": torch.tensor([T])}))
    longest = max(lengths)
    padded = torch.randn(len(lengths), longest, input_dim, generator=g)
    lens = torch.tensor(sorted(lengths, reverse=True))
    for i, T in enumerate(lens.tolist()):
        padded[i, T:] = 0.0  # as the loaders pad
    cases.append((f"padded {lens.tolist()}", {"features": padded, "lengths": lens}))
    return cases


def compare(model, sess, lengths=None, atol: float = ATOL) -> list[dict]:
    """An exported :class:`~models.ctc.ConformerCTC` (``features``, ``lengths`` -> ``log_probs``,
    ``out_lengths``) against the model by :func:`check_session` on :func:`check_inputs` (default
    lengths: the shortest the export takes, then :data:`CHECK_LENGTHS`)."""
    lengths = lengths or (model.frontend.min_frames, *CHECK_LENGTHS)
    return check_session(model, sess, check_inputs(model.input_dim, lengths), atol)


class OnnxCTC:
    """An exported ``model.onnx`` (:func:`models.export.export_model`) run by ONNX Runtime
    (:func:`session`), called as :class:`~models.ctc.ConformerCTC` is: ``(features (B, T, F), lengths
    (B,)) -> (log_probs (B, T', V), out_lengths (B,))``, CPU tensors, so that the decoders take its output."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.session = session(path, threads)

    def __call__(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs, out_lengths = run(self.session, {"features": features.float(), "lengths": lengths.long()})
        return log_probs, out_lengths
