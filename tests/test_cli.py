"""common.cli: the one ``error:`` line and its exit status, the traceback switch, the device
default and the shared arguments; and a command that honours ``ASR_TRACEBACK`` end to end."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_traceback(monkeypatch):
    for name in cli.TRACEBACK_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize(
    "error",
    [FileNotFoundError("x.ckpt does not exist"), ValueError("--beam-size: bad"), ImportError("no module named kenlm")],
)
def test_a_user_error_is_one_line_and_status_1(error, no_traceback, capsys):
    with pytest.raises(SystemExit) as e, cli.user_errors():
        raise error
    assert e.value.code == f"error: {error}"
    assert "\n" not in e.value.code
    # sys.exit with a string prints it on stderr and exits with status 1
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "from common.cli import user_errors\nwith user_errors():\n    raise ValueError('bad --out')",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k not in cli.TRACEBACK_VARIABLES},
    )
    assert (r.returncode, r.stderr, r.stdout) == (1, "error: bad --out\n", "")


def test_other_errors_pass_through_unless_named(no_traceback):
    with pytest.raises(KeyError), cli.user_errors():
        raise KeyError("a bug, not a user's mistake")
    with pytest.raises(SystemExit, match="error: 'named'"), cli.user_errors(KeyError):
        raise KeyError("named")


@pytest.mark.parametrize("name", cli.TRACEBACK_VARIABLES)
def test_the_traceback_switch(name, no_traceback, monkeypatch):
    assert not cli.traceback_requested()
    monkeypatch.setenv(name, "0")
    assert not cli.traceback_requested()
    monkeypatch.setenv(name, "1")
    assert cli.traceback_requested()
    with pytest.raises(ValueError, match="the original"), cli.user_errors():
        raise ValueError("the original")


def test_device_default(monkeypatch):
    for available, device in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda available=available: available)
        assert cli.default_device() == device
        p = argparse.ArgumentParser()
        cli.add_device(p)
        assert p.parse_args([]).device == device
        assert p.parse_args(["--device", "cuda:1"]).device == "cuda:1"
        later = argparse.ArgumentParser()
        cli.add_device(later, resolve_later=True)
        assert later.parse_args([]).device is None


def test_common_arguments():
    p = argparse.ArgumentParser()
    cli.add_ckpt(p)
    cli.add_out(p, required=False, help="where")
    assert vars(p.parse_args(["--ckpt", "a.ckpt"])) == {"ckpt": "a.ckpt", "out": None}
    with pytest.raises(SystemExit):
        p.parse_args([])  # --ckpt is required
    assert "where" in p.format_help()


def test_a_command_honours_asr_traceback(tmp_path):
    """``python -m models.retrofit`` on a missing checkpoint: one ``error:`` line by default; the
    exception and its traceback with ASR_TRACEBACK=1."""
    missing = tmp_path / "missing.ckpt"
    argv = [
        sys.executable,
        "-m",
        "models.retrofit",
        "--ckpt",
        str(missing),
        "--reuse",
        "2(H4)x2",
        "--out",
        str(tmp_path / "o.ckpt"),
    ]
    env = {k: v for k, v in os.environ.items() if k not in cli.TRACEBACK_VARIABLES}
    plain = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=env)
    assert plain.returncode == 1 and "Traceback" not in plain.stderr, plain.stderr
    assert plain.stderr.strip().splitlines()[-1].startswith("error: ") and str(missing) in plain.stderr
    traced = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**env, "ASR_TRACEBACK": "1"})
    assert traced.returncode == 1 and "Traceback (most recent call last)" in traced.stderr, traced.stderr
    assert str(missing) in traced.stderr.strip().splitlines()[-1]


def test_every_command_goes_through_common_cli():
    """No command prints its own ``error:`` line or reads its own traceback variable: the one way
    is :func:`common.cli.user_errors` / :func:`common.cli.fail`."""
    import re

    sources = [ROOT / f"{c}.py" for c in ("train", "evaluate", "transcribe")]
    sources += [p for pkg in ("common", "data", "models", "training", "analysis") for p in (ROOT / pkg).rglob("*.py")]
    pattern = re.compile(r"""(sys\.exit|SystemExit)\(f?["']error|environ.*TRACEBACK""")
    bad = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sources
        if p != ROOT / "common" / "cli.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not bad, "own error lines or traceback switches (use common.cli):\n" + "\n".join(bad)
    assert len(sources) > 50
