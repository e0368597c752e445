"""LibriSpeech: scan a corpus root into manifests, and download the standard subsets.

The layout is LibriSpeech's own (the mini corpus uses it too)::

    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac
    ROOT/<subset>/<speaker>/<chapter>/<speaker>-<chapter>.trans.txt

Scanning never stops at a bad utterance: it is skipped and reported as ``Problem``, naming the
file and line at fault.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

OPENSLR_URL = "https://www.openslr.org/resources/12"
SUBSETS = (
    "dev-clean",
    "dev-other",
    "test-clean",
    "test-other",
    "train-clean-100",
    "train-clean-360",
    "train-other-500",
)
SHA256 = {
    "dev-clean": "76f87d090650617fca0cac8f88b9416e0ebf80350acb97b343a85fa903728ab3",
    "dev-other": "12661c48e8c3fe1de2c1caa4c3e135193bfb1811584f11f569dd12645aa84365",
    "test-clean": "39fde525e59672dc6d1551919b1478f724438a95aa55f874b576be21967e6c23",
    "test-other": "d09c181bba5cf717b3dee7d4d592af11a3ee3a09e08ae025c5506f6ebe961c29",
    "train-clean-100": "d4ddd1d5a6ab303066f14971d768ee43278a5f2a0aa43dc716b0e64ecbbbf6e2",
    "train-clean-360": "146a56496217e96c14334a160df97fffedd6e0a04e66b9c5af0d40be3c792ecf",
    "train-other-500": "ddb22f27f96ec163645d53215559df6aa36515f26e01dd70798188350adcb6d2",
}


@dataclasses.dataclass
class Problem:
    """One skipped utterance (or file): where, and why."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


def find_root(path: str | Path) -> Path:
    """The folder that holds the subsets: ``path`` itself or ``path/LibriSpeech``."""
    path = Path(path)
    if (path / "LibriSpeech").is_dir():
        return path / "LibriSpeech"
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such LibriSpeech root")
    return path


def list_subsets(root: str | Path) -> list[str]:
    """Subset folders under a root (those that contain at least one ``*.trans.txt``)."""
    root = find_root(root)
    return sorted(d.name for d in root.iterdir() if d.is_dir() and next(d.glob("*/*/*.trans.txt"), None))


def scan_subset(root: str | Path, subset: str, audio_ext: str = ".flac") -> tuple[list[dict], list[Problem]]:
    """Manifest entries of one subset (sorted by id) and the problems met on the way.

    Each entry: ``id, audio, duration, speaker, chapter, text`` (audio as an absolute path).
    """
    import soundfile as sf

    folder = find_root(root) / subset
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such subset folder")
    entries: list[dict] = []
    problems: list[Problem] = []
    for trans in sorted(folder.glob("*/*/*.trans.txt")):
        chapter_dir = trans.parent
        listed: set[str] = set()
        for n, raw_bytes in enumerate(trans.read_bytes().splitlines(), 1):
            try:
                line = raw_bytes.decode("utf-8").strip()
            except UnicodeDecodeError as e:  # e.g. a Latin-1 file: report, never guess
                problems.append(
                    Problem(f"{trans}:{n}", f"not UTF-8 text (byte 0x{raw_bytes[e.start]:02x} at column {e.start + 1})")
                )
                listed.add(raw_bytes.split(b" ", 1)[0].decode("ascii", "replace"))
                continue
            if not line:
                continue
            utt_id, _, text = line.partition(" ")
            where = f"{trans}:{n}"
            listed.add(utt_id)
            text = " ".join(text.split())
            if not text:
                problems.append(Problem(where, f"empty transcript for {utt_id}"))
                continue
            parts = utt_id.split("-")
            if len(parts) != 3 or not all(p.isdigit() for p in parts):
                problems.append(Problem(where, f"utterance id {utt_id!r} is not SPEAKER-CHAPTER-UTT"))
                continue
            audio = chapter_dir / f"{utt_id}{audio_ext}"
            if not audio.is_file():
                problems.append(Problem(where, f"no audio file {audio.name} for this transcript line"))
                continue
            try:
                info = sf.info(str(audio))
                duration = info.frames / info.samplerate
            except Exception as e:
                problems.append(Problem(str(audio), f"cannot read audio ({e})"))
                continue
            if duration <= 0:
                problems.append(Problem(str(audio), "audio has no samples"))
                continue
            entries.append(
                {
                    "id": utt_id,
                    "audio": str(audio.resolve()),
                    "duration": round(duration, 4),
                    "speaker": parts[0],
                    "chapter": parts[1],
                    "text": text,
                }
            )
        for audio in sorted(chapter_dir.glob(f"*{audio_ext}")):
            if audio.stem not in listed:
                problems.append(Problem(str(audio), f"audio with no transcript line in {trans.name}"))
    entries.sort(key=lambda e: e["id"])
    return entries, problems


# ---------------------------------------------------------------------------------------------
# Download (for users with internet; tested here against local URLs only)


def sha256sum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def download_file(url: str, dest: str | Path, sha256: str | None = None, progress: bool = True) -> Path:
    """Download ``url`` to ``dest``, resuming a partial ``dest.part`` (HTTP Range) and checking
    the SHA-256 when given. A file already at ``dest`` with the right checksum is kept. A ``.part``
    already complete (a run killed during the check or the rename) is finished without a download:
    by its checksum, or where there is none, by the server's answer 416 to a range from its end
    with the same size in ``Content-Range``; a ``.part`` longer than the file is downloaded anew."""
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and (sha256 is None or sha256sum(dest) == sha256):
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    if have and sha256 is not None and sha256sum(part) == sha256:
        os.replace(part, dest)
        return dest
    try:
        resp = urllib.request.urlopen(
            urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {}), timeout=60
        )
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise
        # the range starts at or past the end: .part is whole (Content-Range: bytes */SIZE) or too long
        size = (e.headers.get("Content-Range") or "").rpartition("/")[2]
        if size == str(have) and sha256 is None:
            os.replace(part, dest)
            return dest
        have, resp = 0, urllib.request.urlopen(url, timeout=60)
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        resumed = have > 0 and status == 206
        if not resumed:
            have = 0  # server ignored the range (or nothing to resume): start over
        size = resp.headers.get("Content-Length")
        total = have + int(size) if size else None
        with (
            open(part, "ab" if resumed else "wb") as out,
            tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, disable=not progress) as bar,
        ):
            while block := resp.read(1 << 20):
                out.write(block)
                bar.update(len(block))
    if sha256 is not None:
        got = sha256sum(part)
        if got != sha256:
            part.unlink()
            raise ValueError(f"{url}: checksum mismatch (expected sha256 {sha256}, got {got}); partial file removed")
    os.replace(part, dest)
    return dest


def download(
    subset: str,
    dest: str | Path,
    base_url: str = OPENSLR_URL,
    extract: bool = True,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download (resumably) and extract one LibriSpeech subset into ``dest/LibriSpeech/<subset>``."""
    if sha256 is None:
        if subset not in SHA256:
            raise ValueError(f"unknown LibriSpeech subset {subset!r}; expected one of {', '.join(SUBSETS)}")
        sha256 = SHA256[subset]
    dest = Path(dest)
    archive = download_file(f"{base_url.rstrip('/')}/{subset}.tar.gz", dest / f"{subset}.tar.gz", sha256, progress)
    if extract and not (dest / "LibriSpeech" / subset).is_dir():
        tmp = dest / f".extract-{subset}"
        shutil.rmtree(tmp, ignore_errors=True)
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(tmp)
        (dest / "LibriSpeech").mkdir(parents=True, exist_ok=True)
        os.replace(tmp / "LibriSpeech" / subset, dest / "LibriSpeech" / subset)
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / "LibriSpeech" / subset
