"""Shared fixtures: a tiny generated mini corpus and its preparation, built once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def mini_corpus(tmp_path_factory) -> Path:
    from data import mini

    out = tmp_path_factory.mktemp("mini")
    summary = mini.build(out, train=40, dev=6, test=6, seed=1, jobs=1, progress=False)
    assert summary["utterances"]["mini-train"] >= 36
    return out


@pytest.fixture(scope="session")
def prepared(mini_corpus, tmp_path_factory) -> Path:
    from data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(mini_corpus, out, alignments=mini_corpus / "alignments", vocab_size=64, progress=False)
    return out


@pytest.fixture(scope="session")
def hf_folders(tmp_path_factory) -> dict[str, Path]:
    """Tiny random transformers models (tests/hf_models.py), one folder per family."""
    from hf_models import build_all

    return build_all(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="session")
def hf_wave() -> torch.Tensor:
    from hf_models import tone

    return tone()
