"""Loading a checkpoint for inference with its decoders, as ``evaluate.py`` and ``transcribe.py``
(and the analyses that run them) share them: the command-line options of the model and its decoders
(:func:`add_model_arguments`), the model with its own inputs (:func:`open_model`), the greedy / beam /
LM decoders (:func:`make_decoders`), what computes the log-probabilities (:func:`computing_model`:
PyTorch at a precision, or ONNX Runtime), and WER / CER scoring (:func:`score`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jiwer
import torch

from common.cli import add_device, default_device
from data.lexicon import write_lexicon
from data.manifest import training_transcripts
from models.checkpoint import load_model, model_inputs, training_data_dir
from models.decoding import BeamSearch, parse_weight, word_errors
from models.precision import DTYPES, inference_precision, precision_problem, precision_warning


def score(refs: list[str], hyps: list[str]) -> dict:
    """WER / CER (percent) with the error counts, from jiwer."""
    if not refs:
        raise ValueError("nothing to score: no reference")
    counts = word_errors(refs, hyps)
    errors = counts["substitutions"] + counts["deletions"] + counts["insertions"]
    return {
        "wer": round(100 * errors / max(counts["words"], 1), 3),
        "cer": round(100 * jiwer.cer(refs, hyps), 3),
        **counts,
        "utterances": len(refs),
    }


def synchronize(device: str | torch.device) -> None:
    """Waits for the device's queued work (CUDA), so that host timers measure it; no-op on CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def add_model_arguments(p: argparse.ArgumentParser, sweep: bool = True) -> None:
    """The options of the model and its decoders that evaluate.py and transcribe.py share: data
    folder, tokenizer, beam size, lexicon, LM (and its weights: several make a sweep where
    ``sweep``), batch size, engine, device and precision."""
    p.add_argument(
        "--data-dir",
        help="prepared data folder holding manifests/ (default: the folder the checkpoint "
        "was trained from); the tokenizer and CMVN come from the checkpoint",
    )
    p.add_argument("--tokenizer", help="SentencePiece model (default: the checkpoint's; must match it)")
    p.add_argument("--beam-size", type=int, default=32)
    p.add_argument(
        "--lexicon",
        help="restrict the beam search to a word list: a flashlight lexicon file, or "
        "'train' to spell the words of the data dir's *train* manifests (the default "
        "with --lm)",
    )
    p.add_argument(
        "--lm",
        help="word n-gram LM (ARPA file or KenLM binary) for an LM beam search over the lexicon, "
        "scored as the decoder 'lm' (see python -m data.lm)",
    )
    p.add_argument(
        "--lm-weight",
        nargs="+" if sweep else None,
        metavar="W",
        help="weight of the LM's log10 probabilities (default 1); "
        "several values (and --word-score values) are a sweep: every point is decoded on the first of "
        "--sets (a dev set) and the best there is used for the others"
        if sweep
        else "",
    )
    p.add_argument(
        "--word-score", nargs="+" if sweep else None, metavar="S", help="score added per word with --lm (default 0)"
    )
    p.add_argument("--max-frames", type=int, default=20000, help="padded 10 ms frames per batch")
    p.add_argument(
        "--engine",
        choices=("torch", "onnxruntime"),
        default="torch",
        help="what computes the log-probabilities: PyTorch, or ONNX Runtime on the checkpoint's ONNX "
        "export (CPU, fp32; needs the .[onnx] extra)",
    )
    add_device(
        p,
        "where the model runs (features are made on the CPU and moved per batch; cpu with --engine onnxruntime)",
        resolve_later=True,
    )
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="fp32",
        help="precision of the model: bf16 / fp16 cast "
        "its weights (models.precision); fp16 only on GPUs and CPUs with fp16 matrix instructions",
    )


def open_model(a: argparse.Namespace):
    """``(model, tokenizer, hp, data_dir, (cmvn, featurizer, framing))`` for the options of
    :func:`add_model_arguments` (and ``--ckpt``, ``--average``): the device defaulted (``a.device``
    is set), the engine / device / precision checked (``ValueError``), a bf16 emulated by the CPU
    warned on stderr, the checkpoint loaded with its own inputs (:func:`models.checkpoint.model_inputs`)."""
    a.device = a.device or ("cpu" if a.engine == "onnxruntime" else default_device())
    if a.engine == "onnxruntime" and (a.dtype != "fp32" or a.device != "cpu"):
        raise ValueError(f"--engine onnxruntime runs fp32 on the CPU (not --dtype {a.dtype} --device {a.device})")
    if problem := precision_problem(a.dtype, a.device):
        raise ValueError(problem)
    if warning := precision_warning(a.dtype, a.device):
        print(f"warning: {warning}", file=sys.stderr)
    model, tokenizer, hp = load_model(a.ckpt, getattr(a, "average", 1), a.tokenizer, a.device)
    data_dir = training_data_dir(hp, a.data_dir)
    # the model's own features (ours, or a converted ESPnet model's), made and normalised on the CPU
    return model, tokenizer, hp, data_dir, model_inputs(model, hp, data_dir)


def make_decoders(
    a: argparse.Namespace, tokenizer, data_dir: Path, folder: Path, beam: bool = True
) -> tuple[Path | str | None, BeamSearch | None, dict[str, BeamSearch]]:
    """``(lexicon, beam, lm_beams)`` for the options of :func:`add_model_arguments`: the lexicon
    (``--lexicon train`` spells the data folder's training words into ``folder/lexicon.txt``; the
    default with ``--lm``), the beam search (None unless ``beam``) and the LM beam searches, one per
    point of the ``--lm-weight`` x ``--word-score`` grid (``{"lm": ...}`` for one point)."""
    weights, scores = (v if isinstance(v, list) else [v] for v in (a.lm_weight, a.word_score))
    if (weights != [None] or scores != [None]) and not a.lm:
        raise ValueError("--lm-weight and --word-score need --lm")
    weights = [parse_weight("--lm-weight", w) for w in weights if w is not None] or [1.0]
    word_scores = [parse_weight("--word-score", w) for w in scores if w is not None] or [0.0]
    lexicon = a.lexicon if a.lexicon or not a.lm else "train"  # a word LM needs a lexicon
    if lexicon == "train":
        try:
            sentences, _ = training_transcripts(data_dir)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--lexicon train: {e}") from None
        words = {w for s in sentences for w in s.split()}
        lexicon = folder / "lexicon.txt"
        write_lexicon(words, tokenizer, lexicon)
    elif lexicon is not None and not Path(lexicon).is_file():
        raise FileNotFoundError(f"lexicon {lexicon} does not exist")
    searcher = BeamSearch(tokenizer, a.beam_size, lexicon) if beam else None
    lm_beams = {}
    if a.lm:
        lm_beam = BeamSearch(tokenizer, a.beam_size, lexicon, a.lm, weights[0], word_scores[0])
        grid = [(w, s) for w in weights for s in word_scores]
        lm_beams = (
            {"lm": lm_beam} if len(grid) == 1 else {f"lm w={w:g} s={s:g}": lm_beam.with_weights(w, s) for w, s in grid}
        )
    return lexicon, searcher, lm_beams


def computing_model(model, a: argparse.Namespace):
    """``(what computes the log-probabilities, the ONNX check or None)``: ``model`` at ``--dtype``
    (:func:`models.precision.inference_precision`), or with ``--engine onnxruntime`` its ONNX export
    run by ONNX Runtime, checked against PyTorch (:func:`models.export.onnx_engine`; a failed
    check or a missing ONNX Runtime raises ``ValueError``)."""
    model = inference_precision(model, a.dtype, a.device)
    if a.engine != "onnxruntime":
        return model, None
    import tempfile

    from models.export import onnx_engine

    try:
        with tempfile.TemporaryDirectory(prefix="evaluate-onnx-") as tmp:  # the session keeps the graph
            return onnx_engine(model, tmp, torch.get_num_threads())
    except (ImportError, AssertionError) as e:
        raise ValueError(f"--engine onnxruntime: {e}") from None
