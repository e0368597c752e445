"""What every command-line entry point shares: the common arguments, one device default, one
``error:`` line for the mistakes a user can fix, and one switch that shows the traceback instead.

Every command (``train.py``, ``evaluate.py``, ``transcribe.py``, ``python -m analysis ...``,
``python -m models.*``, ``python -m data.*``) reports a bad file, option or checkpoint as one line
``error: ...`` on standard error and exits with status 1; with ``ASR_TRACEBACK=1`` in the environment
the exception propagates with its traceback (``TRAIN_TRACEBACK=1``, the name train.py used first,
works too).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

#: what a user can fix: a missing or unreadable file, a bad value, a missing optional package
USER_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, ImportError)
#: environment variables that turn the ``error:`` line back into the exception and its traceback
TRACEBACK_VARIABLES = ("ASR_TRACEBACK", "TRAIN_TRACEBACK")
DEVICE_HELP = "where the model runs, e.g. cpu, cuda, cuda:1"


def traceback_requested() -> bool:
    """Whether the environment asks for tracebacks instead of one-line errors (any of
    :data:`TRACEBACK_VARIABLES` set to something other than empty or ``0``)."""
    return any(os.environ.get(name, "") not in ("", "0") for name in TRACEBACK_VARIABLES)


def fail(message: object) -> NoReturn:
    """Exit with status 1 and the one line ``error: <message>`` on standard error."""
    sys.exit(f"error: {message}")


@contextmanager
def user_errors(*extra: type[BaseException]) -> Iterator[None]:
    """Turn :data:`USER_ERRORS` (and the ``extra`` exception types) raised inside the block into
    ``error: <message>`` and exit status 1, unless :func:`traceback_requested`."""
    try:
        yield
    except (*USER_ERRORS, *extra) as e:
        if traceback_requested():
            raise
        fail(e)


def default_device() -> str:
    """``cuda`` where PyTorch sees a GPU, else ``cpu``: the default of every command's ``--device``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_ckpt(
    parser: argparse.ArgumentParser,
    required: bool = True,
    help: str = "checkpoint file, or checkpoint folder (with --average)",
) -> None:
    """``--ckpt``: a checkpoint of train.py (file, or folder holding ``last.ckpt`` / ``epochNNN.ckpt``)."""
    parser.add_argument("--ckpt", required=required, help=help)


def add_out(parser: argparse.ArgumentParser, required: bool = True, help: str = "output folder") -> None:
    """``--out``: the folder (or file) a command writes."""
    parser.add_argument("--out", required=required, help=help)


def add_device(parser: argparse.ArgumentParser, help: str = DEVICE_HELP, resolve_later: bool = False) -> None:
    """``--device``, defaulting to :func:`default_device`. With ``resolve_later`` the parsed default
    is None, for a command whose other options decide (e.g. ``--engine onnxruntime`` runs on the
    CPU); it then calls :func:`default_device` itself."""
    parser.add_argument(
        "--device",
        default=None if resolve_later else default_device(),
        help=f"{help} (default: cuda if available, else cpu)",
    )
