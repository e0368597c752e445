"""ONNX export of a trained Conformer-CTC: front end + encoder (with its reuse plan) + CTC head.

    python -m models.export --ckpt exp/demo/train/checkpoints/last.ckpt --out exp/demo/onnx [--opset 18]
        [--average K] [--no-check]

writes

- ``OUT/model.onnx``: inputs ``features (B, T, 80)`` float32 (log-Mel fbank after the checkpoint's
  CMVN) and ``lengths (B,)`` int64; outputs ``log_probs (B, T', V)`` float32 (CTC, blank 0) and
  ``out_lengths (B,)`` int64, ``T' = ((T - 1) // 2 - 1) // 2`` (the default conv2d front end); batch
  and time dynamic, ``T >= 7`` as in PyTorch;
- ``OUT/model.json``: what using it needs (plan, model sizes, vocabulary, feature settings, the CMVN
  statistics, input / output names, the check below);
- ``OUT/tokens.txt``: the token table, one symbol a line: output ``i`` is line ``i`` (from 0,
  ``<blank>`` first), in the model's own order (SentencePiece's ids shifted by one for ours,
  ESPnet's ``token_list`` for a converted model);
- ``OUT/tokenizer.model``: the SentencePiece model, whose ``decode_pieces`` joins the symbols of a
  hypothesis (blanks, repeats and ``<sos/eos>`` dropped). ``Tokenizer.open(OUT/tokenizer.model)``
  reads the table beside it.

The graph is torch's dynamo exporter's (``torch.onnx.export(dynamo=True)``: ``torch.export`` then
onnxscript): it traces the model as it runs, so a reuse plan's graph is the model's own, in which
the reuse layers consume the softmax of their group's computing layer (one ``Softmax`` per computing
layer, :func:`attention_softmaxes`). While exporting (``torch.compiler.is_exporting()``), the
model's attention takes all query rows in one chunk, as it does in eager mode below 256 frames, and
makes the relative-position shift by a gather of the same elements instead of a strided view (whose
symbolic slice bounds ``torch.export`` cannot resolve), so the time axis stays symbolic
(``models/attention.py``); it skips its host-side input checks and position caches as under
``torch.compile``. The positional encodings and their projections are computed in the graph at
each call (PyTorch eager caches the projection).

Unless ``--no-check``, the exported model is run by ONNX Runtime and compared with PyTorch's eager
forward at several lengths (one of them past 256 encoder frames, where eager chunks its attention)
and on a padded batch (:func:`models.onnx_runtime.compare`): every output within
:data:`~models.onnx_runtime.ATOL` (log-probabilities) and equal lengths, or the export fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from common.cli import add_ckpt, add_out, user_errors
from data.framing import input_frames
from models.onnx_runtime import OnnxCTC, compare, session


@contextlib.contextmanager
def _quiet():
    """Silences the dynamo exporter's progress lines and its warnings about what it does not need
    (torchvision's operators, deprecations inside torch)."""
    import io
    import logging
    import warnings

    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", (UserWarning, FutureWarning, DeprecationWarning))
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def as_exported():
    """Runs eager code on the path torch's exporter traces (``torch.compiler.is_exporting()`` true):
    the attention's query rows in one chunk against all ``2T - 1`` positions, shifted by a gather
    (``models/attention.py``). What runs is then what :func:`export_model`'s graph computes, so
    that ``torch.utils.flop_counter`` counts the graph's FLOP (the latency benchmark's ONNX rows)."""
    from unittest import mock

    with mock.patch.object(torch.compiler, "is_exporting", lambda: True):
        yield


def export_onnx(
    module: nn.Module,
    args: tuple,
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    dynamic_shapes: dict,
    opset: int | None = None,
) -> Path:
    """Exports ``module(*args)`` (eval mode) to ``path`` with torch's dynamo exporter; weights are
    kept inside the file (no external data: models here are far below ONNX's 2 GiB limit)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), _quiet():
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dynamic_shapes,
            opset_version=opset,
            external_data=False,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=False)
    return path


def example_features(batch: int = 2, frames: int = input_frames(64), input_dim: int = 80, seed: int = 0):
    """``(features (batch, frames, input_dim), lengths (batch,))``, random, every utterance of full length:
    the example the exporter traces (by default 64 encoder frames of the conv2d front end)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, frames, input_dim, generator=g), torch.full((batch,), frames, dtype=torch.long)


def export_model(model: nn.Module, path: str | Path, opset: int | None = None) -> Path:
    """``model`` (a :class:`~models.ctc.ConformerCTC`; its ``forward(features, lengths)``) as ONNX at
    ``path``, dynamic batch and time (``T >= model.frontend.min_frames``, one encoder frame, as in PyTorch)."""
    from torch.export import Dim

    model = model.eval()
    frames = input_frames(64, model.frontend.input_layer)  # 64 encoder frames: below eager's attention chunking
    features, lengths = example_features(frames=frames, input_dim=model.input_dim)
    batch, time = Dim("batch", min=1), Dim("time", min=model.frontend.min_frames)
    return export_onnx(
        model,
        (features, lengths),
        path,
        ["features", "lengths"],
        ["log_probs", "out_lengths"],
        {"features": {0: batch, 1: time}, "lengths": {0: batch}},
        opset,
    )


def onnx_engine(model: nn.Module, folder: str | Path, threads: int | None = None) -> tuple[OnnxCTC, list[dict]]:
    """``model`` exported to ``folder/model.onnx``, loaded by ONNX Runtime and checked against PyTorch
    (:func:`models.onnx_runtime.compare`, raises ``AssertionError`` past :data:`~models.onnx_runtime.ATOL`);
    returns it with the check."""
    runner = OnnxCTC(export_model(model, Path(folder) / "model.onnx"), threads)
    return runner, compare(model, runner.session)


def attention_softmaxes(path: str | Path) -> list[int]:
    """For each ``Softmax`` node of the ONNX graph at ``path``, how many ``MatMul`` nodes read its output
    (through ``Cast`` / ``Identity``): in an exported reuse plan, one Softmax per computing layer,
    read by the value products of every layer of its group."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    readers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)

    def matmuls(name: str) -> int:
        n = 0
        for node in readers.get(name, []):
            if node.op_type == "MatMul":
                n += 1
            elif node.op_type in ("Cast", "Identity"):
                n += sum(matmuls(o) for o in node.output)
        return n

    return [matmuls(node.output[0]) for node in graph.node if node.op_type == "Softmax"]


def op_counts(path: str | Path) -> dict[str, int]:
    import collections

    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(collections.Counter(node.op_type for node in graph.node))


def sidecar(model, tokenizer, hp: dict, opset: int | None, check: list[dict] | None) -> dict:
    """What :func:`main` writes as ``model.json``."""
    from data import features as F

    cmvn = hp.get("cmvn")
    return {
        "format": "attn-reuse-asr ctc onnx 1",
        "model": "model.onnx",
        "reuse": model.reuse,
        "computing_layers": [i for i, p in enumerate(model.plans) if not p.reuses],
        "config": model.config,
        "checkpoints": hp.get("checkpoints"),
        "inputs": {
            "features": "float32 (B, T, input_dim): fbank, then (x - cmvn.mean) / cmvn.std; zero padding",
            "lengths": f"int64 (B,): valid frames of each utterance, {model.frontend.min_frames} <= lengths <= T",
        },
        "outputs": {
            "log_probs": "float32 (B, T', vocab_size): CTC log-probabilities, blank 0",
            "out_lengths": "int64 (B,): valid output frames (conv2d: ((lengths - 1) // 2 - 1) // 2)",
        },
        "min_frames": model.frontend.min_frames,
        "input_layer": getattr(model.frontend, "input_layer", "conv2d"),
        # ours: Kaldi fbank (data.features.fbank); a converted ESPnet model: its front end's record
        "features": hp["features"]
        if hp.get("features") is not None
        else {
            "kind": "kaldi fbank (torchaudio.compliance.kaldi.fbank)",
            "sample_rate": F.SAMPLE_RATE,
            "num_mel_bins": model.input_dim,
            "frame_length_ms": F.FRAME_LENGTH_MS,
            "frame_shift_ms": F.FRAME_SHIFT_MS,
            "dither": 0.0,
            "energy_floor": 0.0,
            "snip_edges": True,
            "waveform_scale": 32768.0,
        },
        "cmvn": None
        if cmvn is None
        else {"mean": [float(v) for v in cmvn["mean"]], "std": [float(v) for v in cmvn["std"]]},
        "vocab_size": model.vocab_size,
        "blank": 0,
        "tokens": tokenizer.symbols(),
        "tokenizer": {
            "file": "tokenizer.model",
            "table": "tokens.txt",
            "sha256": tokenizer.digest,
            "decode": "drop blanks and repeats; output i is line i (from 0) of tokens.txt; join the "
            "symbols but <blank> and <sos/eos> with tokenizer.model's SentencePiece decode_pieces",
        },
        "opset": opset,
        "torch": torch.__version__,
        "check": check,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m models.export", description=__doc__.split("\n\n")[0])
    add_ckpt(p)
    p.add_argument("--average", type=int, default=1, help="average the K latest epoch checkpoints of the folder")
    add_out(p, help="output folder (model.onnx, model.json, tokenizer.model, tokens.txt)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: torch's exporter's)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    a = p.parse_args(argv)
    from common.io import atomic_write_bytes, atomic_write_text, check_writable
    from models.checkpoint import load_model

    with user_errors():
        model, tokenizer, hp = load_model(a.ckpt, a.average, None, "cpu")
        out = check_writable(a.out)
    path = export_model(model, out / "model.onnx", a.opset)
    import onnx

    opset = next(
        (o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain == ""), a.opset
    )
    check = None
    if not a.no_check:
        with user_errors(AssertionError):
            check = compare(model, session(path))
    softmaxes = attention_softmaxes(path)
    info = sidecar(model, tokenizer, hp, opset, check)
    info["attention_softmaxes"] = softmaxes
    atomic_write_text(out / "model.json", json.dumps(info, indent=1))
    atomic_write_bytes(out / "tokenizer.model", tokenizer.model_bytes)
    atomic_write_text(out / "tokens.txt", "".join(t + "\n" for t in tokenizer.symbols()))
    size = path.stat().st_size / 2**20
    print(
        f"wrote {path} ({size:.1f} MiB, opset {opset}, plan {model.reuse}: {len(softmaxes)} attention softmaxes, "
        f"read by {softmaxes} value products), {out / 'model.json'}, {out / 'tokenizer.model'}, {out / 'tokens.txt'}"
    )
    for r in check or []:
        print(f"  check {r['case']:28s} max |ONNX Runtime - PyTorch| = {r['max_abs_diff']:.2e}")
    return info


if __name__ == "__main__":
    main()
