"""Inference in reduced precision (models/precision.py): bf16 evaluation end to end, both bf16
modes close to fp32, fp16 refused where the CPU cannot run it."""
from __future__ import annotations

import json

import pytest
import torch

import evaluate
from models import ConformerCTC
from models.precision import InferencePrecision, cpu_flags, inference_precision, precision_problem


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    from tests.test_train import trained_checkpoint

    return trained_checkpoint(prepared, tmp_path_factory, "precision_ckpt", max_epochs=2)


def test_bf16_evaluation_end_to_end(prepared, checkpoint, tmp_path):
    """``evaluate.py --dtype bf16`` decodes and scores a set; its default output folder is its own
    (``last-bf16``), so bf16 results never merge into fp32's; the greedy outputs are fp32's almost
    everywhere."""
    evaluate.main(["--ckpt", str(checkpoint), "--sets", "mini-test", "--out", str(tmp_path / "fp32"),
                   "--beam-size", "4"])
    evaluate.main(["--ckpt", str(checkpoint), "--sets", "mini-test", "--dtype", "bf16", "--beam-size", "4"])
    bf16_dir = checkpoint.parent.parent / "eval" / "last-bf16"
    bf16 = json.loads((bf16_dir / "results.json").read_text())
    fp32 = json.loads((tmp_path / "fp32" / "results.json").read_text())
    assert bf16["dtype"] == "bf16" and fp32["dtype"] == "fp32"
    for dec in ("greedy", "beam"):
        a, b = fp32["sets"]["mini-test"][dec], bf16["sets"]["mini-test"][dec]
        assert a["words"] == b["words"] > 0 and b["utterances"] == a["utterances"]
        assert abs(a["wer"] - b["wer"]) <= 10.0, (a, b)
    rows = [line.split("\t") for line in (bf16_dir / "mini-test.hyp.tsv").read_text().splitlines()[1:]]
    assert len(rows) == fp32["sets"]["mini-test"]["greedy"]["utterances"]


def test_bf16_log_probs_close_to_fp32(checkpoint, prepared):
    """Both bf16 modes on the trained model and real features: log-probabilities within a few tenths of
    fp32's and the same best output on almost every frame."""
    from data.datamodule import ManifestDataset
    from models.checkpoint import load_model, model_cmvn

    model, _, hp = load_model(checkpoint)
    ds = ManifestDataset([prepared / "manifests" / "mini-test.jsonl"], tokenizer=None, cmvn=model_cmvn(hp, prepared))
    item = ds[0]
    x, lengths = item["features"][None], torch.tensor([item["features"].shape[0]])
    with torch.inference_mode():
        ref, ref_lengths = model(x, lengths)
        for mode in ("autocast", "weights"):
            low = InferencePrecision(load_model(checkpoint)[0], "bf16", mode).eval()
            out, out_lengths = low(x, lengths)
            assert out.dtype == torch.float32 and torch.equal(out_lengths, ref_lengths)
            assert (out - ref).abs().max() < 0.5, mode
            assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9, mode


def test_fp32_is_the_model_itself_and_modes_are_checked():
    model = ConformerCTC(9, d_model=16, num_layers=2, ffn_dim=32, kernel_size=3, reuse="1(H2)x2",
                         subsampling_channels=4)
    assert inference_precision(model, "fp32", "cpu") is model
    wrapped = inference_precision(model, "bf16", "cpu")
    assert isinstance(wrapped, InferencePrecision) and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision mode"):
        InferencePrecision(model, "bf16", "half")


@pytest.mark.skipif(bool(cpu_flags() & {"avx512_fp16", "amx_fp16"}), reason="this CPU has fp16 matrix instructions")
def test_fp16_on_cpu_refused_clearly(checkpoint, tmp_path):
    assert "fp16 on the CPU" in precision_problem("fp16", "cpu")
    with pytest.raises(SystemExit, match="fp16 on the CPU.*no half-precision matrix instructions"):
        evaluate.main(["--ckpt", str(checkpoint), "--sets", "mini-test", "--dtype", "fp16", "--device", "cpu",
                       "--out", str(tmp_path / "e")])
    assert not (tmp_path / "e").exists()  # refused before any work
