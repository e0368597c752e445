"""Manifests of a prepared folder (``python -m data.prepare``): JSONL files, one utterance a line
(``id``, ``audio``, ``duration``, ``text``; ``num_frames``, ``alignment``, ``speaker``, ``chapter``
where known), under ``DATA_DIR/manifests/<set>.jsonl``.

One place reads and writes them, checks that a folder's preparation finished, resolves a set
name to its file, and gathers the training transcripts (for a lexicon or a word LM).
"""

from __future__ import annotations

import json
from pathlib import Path

from common.io import atomic_write_text

#: marks a prepared folder whose outputs are being moved into place (refused by the readers)
INCOMPLETE = ".incomplete"
REQUIRED_KEYS = ("id", "audio", "duration", "text")


def write_manifest(path: str | Path, entries: list[dict]) -> None:
    """``entries`` as JSONL, written through a temporary file (never a half manifest)."""
    atomic_write_text(path, "".join(json.dumps(e) + "\n" for e in entries))


def read_manifest(path: str | Path) -> list[dict]:
    """Entries of a JSONL manifest; a malformed line raises ``ValueError`` naming file and line."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e.msg})") from None
            missing = set(REQUIRED_KEYS) - set(entry)
            if missing:
                raise ValueError(f"{path}:{n}: manifest entry lacks {', '.join(sorted(missing))}")
            out.append(entry)
    return out


def check_prepared(data_dir: str | Path) -> Path:
    """Refuses a prepared folder that a preparation left incomplete."""
    data_dir = Path(data_dir)
    if (data_dir / INCOMPLETE).exists():
        raise ValueError(f"{data_dir}: preparation did not finish (it holds {INCOMPLETE}); run data.prepare again")
    return data_dir


def resolve_manifest(name: str | Path, data_dir: str | Path | None = None, hint: str = "") -> Path:
    """The manifest of a set: ``name`` itself if it ends in ``.jsonl``, else
    ``data_dir/manifests/<name>.jsonl``. Raises ``FileNotFoundError`` ("manifest PATH does not
    exist" and ``hint``) when there is no such file, ``ValueError`` for a set name without a
    ``data_dir``."""
    path = Path(name)
    if path.suffix != ".jsonl":
        if data_dir is None:
            raise ValueError(f"manifest {str(name)!r}: give a .jsonl path, or --data-dir for prepared subset names")
        path = Path(data_dir) / "manifests" / f"{name}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist{hint}")
    return path


def training_transcripts(data_dir: str | Path) -> tuple[list[str], list[Path]]:
    """The transcripts of a prepared folder's ``*train*`` manifests, normalised
    (:func:`data.text.normalise`, as the references are), and those manifests: the words of a
    ``--lexicon train`` and the sentences of ``python -m data.lm arpa``."""
    from data.text import normalise

    manifests = sorted((Path(data_dir) / "manifests").glob("*train*.jsonl"))
    if not manifests:
        raise FileNotFoundError(f"no *train*.jsonl manifest under {Path(data_dir) / 'manifests'}")
    return [normalise(e["text"]) for m in manifests for e in read_manifest(m)], manifests
