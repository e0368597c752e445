"""File I/O shared by every package: atomic writes (a temporary file beside the target, then a
rename: never a half file) and a writable-folder check made before long work starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(folder: str | Path) -> Path:
    """Creates ``folder`` if needed and proves a file can be written there, before long work
    starts; raises ``OSError`` naming the folder otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"{folder}: cannot write there ({e.strerror or e})") from None
    return folder


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: never a half file."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: never a half file."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write(path: str | Path, write) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which is then given the umask's mode
    and renamed into place: an interrupted write never leaves a half file, and leaves no temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
