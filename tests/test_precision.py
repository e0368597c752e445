"""Precision (models/precision.py): the training precision chosen for the hardware (every simulated
device and CPU flag set, the instruction-set caps, train.py's record of the choice), and inference in
reduced precision: bf16 evaluation end to end, both bf16 modes close to fp32, fp16 refused where the
CPU cannot run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from models import ConformerCTC, precision
from models.precision import (
    InferencePrecision,
    cpu_flags,
    inference_precision,
    precision_problem,
    precision_warning,
    resolve_training_precision,
)

ROOT = Path(__file__).resolve().parents[1]
AVX2 = {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}  # an ordinary AVX2 x86 CPU (AMD EPYC Zen 2 / 3)
ZEN4 = AVX2 | {"avx512f", "avx512bw", "avx512_bf16"}  # AVX-512 BF16, no fp16
SPR = ZEN4 | {"amx_bf16", "amx_tile", "avx512_fp16"}  # Xeon with AMX and AVX-512 FP16
ARM_BF16 = {"fp", "asimd", "asimdhp", "bf16", "sve"}  # e.g. Neoverse V1 / Graviton 3
ARM_OLD = {"fp", "asimd"}  # e.g. Cortex-A72: neither
SIMULATED_AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.fixture
def no_isa_cap(monkeypatch):
    for var in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize(
    "flags, expected",
    [
        (ZEN4, "bf16-mixed"),
        (SPR, "bf16-mixed"),
        (AVX2, "32-true"),
        (ARM_BF16, "bf16-mixed"),
        (ARM_OLD, "32-true"),
        (set(), "32-true"),
    ],
    ids=["zen4", "amx", "avx2", "arm-bf16", "arm-old", "unknown"],
)
def test_auto_on_each_cpu(flags, expected, no_isa_cap):
    choice = resolve_training_precision("auto", "cpu", flags=flags)
    assert (choice.precision, choice.requested, choice.warning) == (expected, "auto", None)
    assert ("emulates bf16" in choice.reason) == (expected == "32-true")
    assert choice.describe().startswith(f"precision: {expected} (auto on the CPU: ")


@pytest.mark.parametrize("cuda_bf16, expected", [(True, "bf16-mixed"), (False, "16-mixed")], ids=["a100", "v100"])
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_auto_on_each_gpu(cuda_bf16, expected, accelerator, no_isa_cap):
    """bf16 mixed where the GPU computes bf16; fp16 mixed (Lightning adds the gradient scaler) where not.
    The CPU's flags play no part."""
    choice = resolve_training_precision("auto", accelerator, flags=AVX2, cuda_bf16=cuda_bf16)
    assert (choice.precision, choice.device, choice.warning) == (expected, "the GPU", None)
    assert ("gradient scaler" in choice.reason) == (expected == "16-mixed")


def test_accelerator_auto_follows_lightning(monkeypatch, no_isa_cap):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_training_precision("auto", "auto", flags=AVX2, cuda_bf16=False).precision == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert resolve_training_precision("auto", "auto", flags=ZEN4).precision == "bf16-mixed"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_training_precision("auto", "auto", flags=ZEN4).precision == "32-true"


@pytest.mark.parametrize(
    "requested, flags, warned",
    [
        ("bf16-mixed", AVX2, True),
        ("bf16-true", ARM_OLD, True),
        ("bf16-mixed", ZEN4, False),
        ("16-mixed", ZEN4, True),
        ("16-mixed", SPR, False),
        ("16-true", ARM_BF16, False),
        ("32-true", AVX2, False),
        ("64-true", AVX2, False),
        (32, AVX2, False),
    ],
)
def test_explicit_precision_kept_and_warned_where_emulated(requested, flags, warned, no_isa_cap):
    choice = resolve_training_precision(requested, "cpu", flags=flags)
    assert choice.precision == str(requested) and choice.requested == str(requested)
    assert (choice.warning is not None) == warned
    if warned:
        assert f"trainer.precision {requested} on the CPU" in choice.warning and "emulates" in choice.warning


def test_explicit_bf16_on_a_gpu_without_it_is_warned(no_isa_cap):
    assert "does not compute bf16" in resolve_training_precision("bf16-mixed", "gpu", cuda_bf16=False).warning
    assert resolve_training_precision("16-mixed", "gpu", cuda_bf16=False).warning is None


@pytest.mark.parametrize(
    "env, native",
    [
        ({"ATEN_CPU_CAPABILITY": "avx2"}, False),
        ({"ATEN_CPU_CAPABILITY": "default"}, False),
        ({"ATEN_CPU_CAPABILITY": "avx512"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "avx512_core"}, False),
        ({"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}, True),
        ({"ONEDNN_MAX_CPU_ISA": "ALL"}, True),
        (SIMULATED_AVX2, False),
    ],
)
def test_instruction_set_caps_make_a_bf16_cpu_an_avx2_one(env, native, monkeypatch, no_isa_cap):
    """PyTorch's and oneDNN's caps keep the kernels from the bf16 instructions (measured: bf16 then
    runs emulated, slower than fp32, and rounds as on an AVX2 CPU), so the resolver treats the CPU as
    the caps make it. The caps say nothing about a CPU that lacks the instructions anyway."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    choice = resolve_training_precision("auto", "cpu", flags=ZEN4)
    assert choice.precision == ("bf16-mixed" if native else "32-true")
    if not native:
        assert "keeps the kernels from using it" in choice.reason and next(iter(env)) in choice.reason
    assert resolve_training_precision("auto", "cpu", flags=AVX2).precision == "32-true"
    assert resolve_training_precision("auto", "cpu", flags=ARM_BF16).precision == "bf16-mixed"  # x86 caps only


def test_cpu_flags_read_x86_and_arm():
    x86 = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512_bf16\nbugs\t\t: x\n"
    arm = "processor\t: 0\nBogoMIPS\t: 243.75\nFeatures\t: fp asimd asimdhp bf16 sve\nCPU part\t: 0xd40\n"
    assert cpu_flags(x86) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(arm) == {"fp", "asimd", "asimdhp", "bf16", "sve"}
    assert cpu_flags("processor\t: 0\n") == set()


def test_inference_precision_problems_and_warnings(no_isa_cap):
    """fp16 on the CPU: refused without fp16 instructions (x86 and Arm read alike: an Arm CPU with
    ``asimdhp`` is not refused); bf16: warned where emulated."""
    assert "no fp16 matrix instructions" in precision_problem("fp16", "cpu", flags=ZEN4)
    assert "use --dtype bf16" in precision_problem("fp16", "cpu", flags=ZEN4)
    assert "use --dtype bf16" not in precision_problem("fp16", "cpu", flags=AVX2)
    assert precision_problem("fp16", "cpu", flags=ARM_BF16) is None
    assert precision_problem("fp16", "cpu", flags=SPR) is None
    assert precision_problem("bf16", "cpu", flags=AVX2) is None  # runs, with a warning
    assert "slower than fp32" in precision_warning("bf16", "cpu", flags=AVX2)
    assert precision_warning("bf16", "cpu", flags=ZEN4) is None and precision_warning("fp32", "cpu", flags=AVX2) is None
    assert "unknown precision" in precision_problem("int8", "cpu")


TINY_CLI = [
    "--model.d_model",
    "32",
    "--model.ffn_dim",
    "64",
    "--model.kernel_size",
    "5",
    "--model.num_layers",
    "2",
    "--model.reuse",
    "1(H2)x2",
    "--model.subsampling_channels",
    "8",
    "--data.max_frames",
    "2500",
    "--data.num_workers",
    "0",
    "--trainer.max_epochs",
    "1",
    "--trainer.limit_train_batches",
    "2",
    "--trainer.limit_val_batches",
    "1",
    "--trainer.enable_progress_bar",
    "false",
]


def _fit_cli(prepared, root, extra=(), env=None):
    r = subprocess.run(
        [
            sys.executable,
            "train.py",
            "fit",
            "--config",
            "recipes/mini/base.yaml",
            *TINY_CLI,
            "--data.data_dir",
            str(prepared),
            "--trainer.default_root_dir",
            str(root),
            *extra,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return r, torch.load(root / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def test_train_resolves_auto_says_why_and_records_it(prepared, tmp_path):
    """The recipes' ``precision: auto`` on this machine: the choice and its reason printed first, in
    the checkpoint and in the logged hyper-parameters; the per-epoch progress line shows signs of life."""
    r, ckpt = _fit_cli(prepared, tmp_path)
    expected = resolve_training_precision("auto", "cpu")  # this process has the subprocess's environment
    assert expected.describe() in r.stderr and "warning: trainer.precision" not in r.stderr
    assert ckpt["precision"] == {
        "precision": expected.precision,
        "requested": "auto",
        "device": "the CPU",
        "reason": expected.reason,
        "warning": None,
    }
    hparams = (tmp_path / "csv" / "version_0" / "hparams.yaml").read_text()
    assert f"precision/precision: {expected.precision}" in hparams and "precision/reason:" in hparams
    assert "training: 2 steps planned (1 epochs of 2 batches)" in r.stdout
    assert "epoch 1/1  step 2  train loss " in r.stdout and " dev WER " in r.stdout
    saved = (tmp_path / "csv" / "version_0" / "config.yaml").read_text()
    assert "precision: auto" in saved  # the run's config stays portable: another machine chooses again


def test_train_on_simulated_avx2_picks_fp32_and_warns_explicit_bf16(prepared, tmp_path):
    """With the instruction-set caps of an AVX2 machine, on whatever CPU runs the tests: ``auto``
    becomes fp32; an explicit ``bf16-mixed`` is kept, with a warning."""
    r, ckpt = _fit_cli(prepared, tmp_path / "auto", env=SIMULATED_AVX2)
    assert "precision: 32-true (auto on the CPU: " in r.stderr
    assert ckpt["precision"]["precision"] == "32-true"
    r, ckpt = _fit_cli(prepared, tmp_path / "bf16", ["--trainer.precision", "bf16-mixed"], env=SIMULATED_AVX2)
    assert "precision: bf16-mixed (as requested on the CPU: " in r.stderr
    assert "warning: trainer.precision bf16-mixed on the CPU: " in r.stderr and "much slower" in r.stderr
    assert ckpt["precision"]["precision"] == "bf16-mixed" and ckpt["precision"]["warning"]


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    from tests.test_train import trained_checkpoint

    return trained_checkpoint(prepared, tmp_path_factory, "precision_ckpt", max_epochs=2)


def test_bf16_evaluation_end_to_end(prepared, checkpoint, tmp_path):
    """``evaluate.py --dtype bf16`` decodes and scores a set; its default output folder is its own
    (``last-bf16``), so bf16 results never merge into fp32's; the greedy outputs are fp32's almost
    everywhere."""
    evaluate.main(
        ["--ckpt", str(checkpoint), "--sets", "mini-test", "--out", str(tmp_path / "fp32"), "--beam-size", "4"]
    )
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
    from data.dataset import ManifestDataset
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
    model = ConformerCTC(
        9, d_model=16, num_layers=2, ffn_dim=32, kernel_size=3, reuse="1(H2)x2", subsampling_channels=4
    )
    assert inference_precision(model, "fp32", "cpu") is model
    wrapped = inference_precision(model, "bf16", "cpu")
    assert isinstance(wrapped, InferencePrecision) and next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="precision mode"):
        InferencePrecision(model, "bf16", "half")


def test_fp16_on_cpu_refused_clearly(checkpoint, tmp_path, monkeypatch):
    """On a CPU without fp16 instructions (simulated: Zen 4's flags, whatever this CPU has)."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: ZEN4)
    assert "fp16 on the CPU" in precision_problem("fp16", "cpu")
    with pytest.raises(SystemExit, match="fp16 on the CPU.*no fp16 matrix instructions"):
        evaluate.main(
            [
                "--ckpt",
                str(checkpoint),
                "--sets",
                "mini-test",
                "--dtype",
                "fp16",
                "--device",
                "cpu",
                "--out",
                str(tmp_path / "e"),
            ]
        )
    assert not (tmp_path / "e").exists()  # refused before any work


def test_isa_check_runs_each_setting_in_its_own_process(tmp_path, no_isa_cap):
    """``python -m analysis.isa``: each setting's caps reach its process (PyTorch reports the capped
    capability and ``auto`` resolves to fp32 under the AVX2 caps on any CPU), figures are positive,
    and the JSON holds what the table prints."""
    from analysis import isa

    out = tmp_path / "isa.json"
    results = isa.main(["--rounds", "1", "--runs", "1", "--settings", "native", "avx2", "--json", str(out)])
    assert json.loads(out.read_text()) == results
    native, avx2 = results["settings"]["native"], results["settings"]["avx2"]
    assert avx2["env"] == SIMULATED_AVX2 and avx2["capability"] == "AVX2" and avx2["resolved"] == "32-true"
    assert native["resolved"] == resolve_training_precision("auto", "cpu").precision  # caps removed here too
    assert all(v > 0 for row in (native, avx2) for k, v in row.items() if k.endswith(" ms"))
    assert len(native["bf16 product digest"]) == 12
    with pytest.raises(SystemExit):
        isa.main(["--rounds", "0"])
