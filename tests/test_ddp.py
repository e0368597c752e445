"""DDP on the CPU: ``train.py fit`` with 2 gloo processes (accelerator cpu, strategy ddp), as the
GPU recipes run it apart from the device. Slow (each run starts two processes): marked ``ddp``,
run by ``make test`` and CI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from data.manifest import read_manifest, write_manifest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.ddp
TINY_ARGS = [
    "--model.d_model",
    "32",
    "--model.ffn_dim",
    "64",
    "--model.kernel_size",
    "5",
    "--model.subsampling_channels",
    "8",
]


def _ddp(args: list[str], out: Path, env: dict | None = None, timeout: int = 420) -> subprocess.CompletedProcess:
    """Runs ``tests/ddp_fit.py fit ... --trainer.devices 2`` in its own process group, killed whole on
    timeout (a hang must fail the test, not the CI job)."""
    env = {**os.environ, "DDP_TEST_OUT": str(out), "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [
        sys.executable,
        str(ROOT / "tests" / "ddp_fit.py"),
        "fit",
        *args,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.enable_progress_bar",
        "false",
        "--data.num_workers",
        "0",
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"DDP run did not finish in {timeout} s (hang?)\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _ranks(out: Path) -> list[dict]:
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _assert_replicas_equal(out: Path) -> None:
    a, b = (torch.load(out / f"rank{r}.pt") for r in range(2))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"replicas differ in {k}"


@pytest.fixture(scope="module")
def nan_run(prepared, tmp_path_factory):
    """One epoch on 2 ranks with a NaN loss on rank 1 at step 1, validated on 5 dev utterances
    (one per batch: 3 on rank 0, 2 on rank 1)."""
    tmp = tmp_path_factory.mktemp("ddp")
    dev5 = tmp / "dev5.jsonl"
    write_manifest(dev5, read_manifest(prepared / "manifests" / "mini-dev.jsonl")[:5])
    out = tmp / "out"
    # fp32, as evaluate.py scores: the validation WER then equals a single-process evaluation by
    # construction (under the recipe's ``auto``, a bf16 CPU would validate in bf16, whose rounding
    # flips near-tied frames of an untrained model: 206.38 against 204.26 on one AVX2 machine)
    r = _ddp(
        [
            "--config",
            "recipes/mini/base.yaml",
            *TINY_ARGS,
            "--model.num_layers",
            "2",
            "--model.reuse",
            "1(H2)x2",
            "--trainer.precision",
            "32-true",
            "--model.weight_noise",
            "0.01",
            "--data.data_dir",
            str(prepared),
            "--data.valid_sets",
            f"[{dev5}]",
            "--data.max_frames",
            "2500",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "4",
            "--trainer.max_time",
            "null",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp / "run"),
        ],
        out,
        env={"DDP_TEST_NAN": "1:1"},
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return tmp, out, dev5


def test_ddp_nan_on_one_rank_skips_the_step_on_every_rank(nan_run):
    tmp, out, _ = nan_run
    ranks = _ranks(out)
    assert [x["world_size"] for x in ranks] == [2, 2]
    assert [x["skipped_steps"] for x in ranks] == [1, 1]  # decided jointly: rank 0's loss was finite
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    _assert_replicas_equal(out)  # no rank stepped alone; weight noise removed exactly on each
    metrics = (tmp / "run" / "csv" / "version_0" / "metrics.csv").read_text()
    assert "train/skipped_steps" in metrics.splitlines()[0]


def test_ddp_validation_scores_every_utterance_once(nan_run):
    tmp, out, dev5 = nan_run
    ranks = _ranks(out)
    last = [x["validated"][-1] for x in ranks]
    assert sorted(len(v) for v in last) == [2, 3]  # unequal shares, none dropped
    assert sorted(last[0] + last[1]) == sorted(e["id"] for e in read_manifest(dev5))
    # val_wer over both ranks equals a single-process evaluation of the same weights
    assert ranks[0]["val_wer"] == ranks[1]["val_wer"]
    ckpt = tmp / "run" / "checkpoints" / "last.ckpt"
    evaluate.main(
        ["--ckpt", str(ckpt), "--sets", str(dev5), "--no-beam", "--out", str(tmp / "eval"), "--device", "cpu"]
    )
    single = json.loads((tmp / "eval" / "results.json").read_text())["sets"]["dev5"]["greedy"]
    assert single["utterances"] == 5
    assert ranks[0]["val_wer"] == pytest.approx(single["wer"], abs=1e-3)


def test_librispeech_recipe_runs_under_ddp(prepared, tmp_path):
    """recipes/librispeech/base.yaml + a reuse recipe as written (16 layers, 4(H4)x4, precision auto:
    bf16-mixed on a bf16 CPU, fp32 on others; weight noise, step-wise validation) apart from sizes,
    data and the device."""
    out = tmp_path / "out"
    r = _ddp(
        [
            "--config",
            "recipes/librispeech/base.yaml",
            "--config",
            "recipes/librispeech/conformer_m_4x4.yaml",
            *TINY_ARGS,
            "--model.weight_noise_start",
            "1",
            "--model.warmup_steps",
            "2",
            "--data.data_dir",
            str(prepared),
            "--data.train_sets",
            "[mini-train]",
            "--data.valid_sets",
            "[mini-dev]",
            "--data.test_sets",
            "[mini-test]",
            "--data.max_frames",
            "2500",
            "--data.max_duration",
            "20.0",
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "2",
            "--trainer.log_every_n_steps",
            "1",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        out,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = _ranks(out)
    assert [x["global_step"] for x in ranks] == [3, 3] and [x["skipped_steps"] for x in ranks] == [0, 0]
    dev = sorted(e["id"] for e in read_manifest(prepared / "manifests" / "mini-dev.jsonl"))
    assert sorted(ranks[0]["validated"][-1] + ranks[1]["validated"][-1]) == dev  # sanity check, then step 2
    _assert_replicas_equal(out)
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["hyper_parameters"]["reuse"] == "4(H4)x4" and ckpt["hyper_parameters"]["num_layers"] == 16


def test_ddp_validation_with_a_rank_that_gets_no_batch(prepared, tmp_path):
    """One dev utterance on two ranks: rank 1 validates nothing and must still enter the reduction
    (before, a rank without references skipped the collective the other entered: a hang)."""
    dev1 = tmp_path / "dev1.jsonl"
    write_manifest(dev1, read_manifest(prepared / "manifests" / "mini-dev.jsonl")[:1])
    out = tmp_path / "out"
    r = _ddp(
        [
            "--config",
            "recipes/mini/base.yaml",
            *TINY_ARGS,
            "--model.num_layers",
            "2",
            "--model.reuse",
            "1(H2)x2",
            "--data.data_dir",
            str(prepared),
            "--data.valid_sets",
            f"[{dev1}]",
            "--data.max_frames",
            "2500",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.max_time",
            "null",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
        ],
        out,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    ranks = _ranks(out)
    assert sorted(len(x["validated"][-1]) for x in ranks) == [0, 1]
    assert ranks[0]["val_wer"] == ranks[1]["val_wer"] is not None
