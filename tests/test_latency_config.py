"""The latency benchmark's typed configuration: every command-line option reaches it, its rows,
and its checks name the option at fault before any model is built."""

from __future__ import annotations

import dataclasses

import pytest

from analysis import latency
from analysis.latency.config import PAPER, BenchConfig

SMALL = ["--d-model", "32", "--num-layers", "2", "--ffn-dim", "64", "--kernel-size", "3", "--device", "cpu"]


def test_every_option_reaches_the_configuration():
    """Each option is a field of the same name, but for the row switches (folded into ``peers`` /
    ``materialised``) and the output files (the command's, not the run's)."""
    dests = {a.dest for a in latency.parser()._actions if a.dest != "help"}
    fields = {f.name for f in dataclasses.fields(BenchConfig)}
    assert dests - fields == {"peer", "no_peer", "no_materialised", "json", "png"}
    assert fields - dests == {"peers", "materialised"}
    c = latency.parse_config([*SMALL, "--lengths", "16", "48", "--threads", "3", "--train-runs", "0"])
    assert (c.d_model, c.num_layers, c.ffn_dim, c.kernel_size, c.lengths, c.threads, c.train_runs) == (
        32,
        2,
        64,
        3,
        (16, 48),
        3,
        0,
    )
    assert c.reuse == PAPER and c.device == "cpu" and c.dtype == "fp32"
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 64


@pytest.mark.parametrize(
    "args,peers,rows",
    [
        (
            [],
            ("torchaudio",),
            [("1(H4)x2", "fused"), ("1(H4)x2", "materialised"), ("2(H4)x1", "fused"), ("torchaudio", "peer")],
        ),
        (
            ["--no-peer", "--peer", "espnet"],
            (),
            [("1(H4)x2", "fused"), ("1(H4)x2", "materialised"), ("2(H4)x1", "fused")],
        ),
        (
            ["--peer", "espnet"],
            ("torchaudio", "espnet"),
            [
                ("1(H4)x2", "fused"),
                ("1(H4)x2", "materialised"),
                ("2(H4)x1", "fused"),
                ("torchaudio", "peer"),
                ("espnet", "peer"),
            ],
        ),
        (["--no-materialised"], ("torchaudio",), [("1(H4)x2", "fused"), ("2(H4)x1", "fused"), ("torchaudio", "peer")]),
        (
            ["--engine", "onnxruntime"],
            ("torchaudio",),
            [("1(H4)x2", "fused"), ("2(H4)x1", "fused"), ("torchaudio", "peer")],
        ),
    ],
)
def test_rows(args, peers, rows):
    c = latency.parse_config(["--reuse", "1(H4)x2", "2(H4)x1", *SMALL, *args])
    assert c.peers == peers and c.rows() == rows
    assert c.baseline_plan() == "1(H4)x2"


@pytest.mark.parametrize(
    "change,message",
    [
        ({"dtype": "fp64"}, "--dtype 'fp64': choose one of fp32, bf16, fp16"),
        ({"precision_mode": "int8"}, "--precision-mode 'int8'"),
        ({"engine": "tensorrt"}, "--engine 'tensorrt'"),
        ({"lengths": (16, 0)}, "--lengths"),
        ({"reuse": ("1(H4)x3",)}, "reuse"),
        ({"engine": "onnxruntime", "dtype": "bf16"}, "--engine onnxruntime times fp32 on the CPU"),
        ({"engine": "onnxruntime", "compile": True}, "--engine onnxruntime times fp32 on the CPU"),
        ({"peers": ("torchaudio", "espnet")}, "--peer espnet"),
    ],
)
def test_check_names_the_option(change, message):
    c = dataclasses.replace(latency.parse_config(["--reuse", "1(H4)x2", *SMALL]), **change)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        c.check()


def test_check_passes_a_good_configuration():
    latency.parse_config(["--reuse", "1(H4)x2", "2(H4)x1", *SMALL, "--include-frontend"]).check()
