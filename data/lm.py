"""Word n-gram language models for the LM beam search (``evaluate.py --lm``).

    python -m data.lm download 4-gram 3-gram.pruned.1e-7 --dest DIR [--tokenizer bpe.model]
    python -m data.lm arpa --data-dir exp/demo/data [--order 3] [--out FILE]

``download`` fetches LibriSpeech's LM resources (openslr resource 11) with resume and SHA-256
checks (:func:`data.librispeech.download_file`), decompresses the ``.arpa.gz`` files (flashlight
reads plain ARPA) and, given our SentencePiece model, writes the LM's vocabulary spelled with our
BPE pieces as a flashlight lexicon (``DIR/librispeech-lexicon.bpe.txt``) for ``--lexicon``.
SHA-256 sums published by others are pinned in :data:`SHA256`; a file with no known sum is
trusted on first download, its sum recorded in a sidecar ``FILE.sha256`` beside it and checked on
every later download or resume.

``arpa`` writes a word n-gram of a prepared folder's training transcripts (the ``*train*``
manifests, as ``--lexicon train`` uses) as an ARPA file. No package from PyPI writes a correct
ARPA model (KenLM's ``lmplz`` is not in its PyPI wheel; NLTK's ``nltk.lm`` has no ARPA output;
``arpabo`` 0.3.0 writes back-off weights of 1 for its Good-Turing and Kneser-Ney models, so its
probabilities do not sum to one), so :func:`build_arpa` is ours: interpolated Kneser-Ney (Chen and
Goodman 1998) with one absolute discount per order, ``D = n1 / (n1 + 2 n2)`` from the counts of
counts (clamped to [0.1, 0.9] for tiny corpora), KenLM's conventions (``<s>``-initial n-grams keep
their raw counts, the unigrams interpolate with a uniform over the vocabulary, ``<unk>``
included), no pruning. Interpolated Kneser-Ney is written exactly in ARPA form (the back-off
weight of a history is its interpolation weight); ``tests/test_lm.py`` checks every conditional
distribution against an independent recomputation and its sum against 1.
"""

from __future__ import annotations

import argparse
import gzip
import math
import shutil
import sys
import zlib
from collections import Counter, defaultdict
from pathlib import Path

from common.cli import add_out, user_errors
from common.io import atomic_write, atomic_write_text
from data.lexicon import write_lexicon
from data.librispeech import download_file, sha256sum
from data.manifest import training_transcripts

OPENSLR_LM_URL = "https://www.openslr.org/resources/11"
#: the files of openslr resource 11 this module knows, by short name
LM_FILES = {
    "3-gram": "3-gram.arpa.gz",
    "3-gram.pruned.1e-7": "3-gram.pruned.1e-7.arpa.gz",
    "3-gram.pruned.3e-7": "3-gram.pruned.3e-7.arpa.gz",
    "4-gram": "4-gram.arpa.gz",
    "lexicon": "librispeech-lexicon.txt",
    "vocab": "librispeech-vocab.txt",
}
#: SHA-256 sums published with RWTH's i6_experiments recipes (``common/datasets/librispeech``,
#: checked by their DownloadJob); the other files are trusted on first download (``FILE.sha256``)
SHA256 = {
    "3-gram.arpa.gz": "263649573475c2991d3e755eb4e690c9d2656f2b3283a1eb589e1e4e174bf874",
    "4-gram.arpa.gz": "f2b2d1507637ddf459d3579159f7e8099ed7d77452ff1059aeeeaea33d274613",
    "librispeech-lexicon.txt": "d722bc29908cd338ae738edd70f61826a6fca29aaa704a9493f0006773f79d71",
    "librispeech-vocab.txt": "3014e72dffff09cb1a9657f31cfe2e04c1301610a6127a807d1d708b986b5474",
}
BPE_LEXICON = "librispeech-lexicon.bpe.txt"


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def fetch(
    file: str, dest: str | Path, base_url: str = OPENSLR_LM_URL, sha256: str | None = None, progress: bool = True
) -> Path:
    """Downloads one file of the resource into ``dest`` (resuming a ``.part``), checking its
    SHA-256: the pinned one, else the one recorded in ``FILE.sha256`` by an earlier download, else
    none, and then records it (trust on first use). Returns the file's path."""
    dest = Path(dest)
    path = dest / file
    sidecar = _sidecar(path)
    recorded = (sidecar.read_text().split() or [None])[0] if sidecar.is_file() else None
    expected = sha256 or SHA256.get(file) or recorded
    if recorded and expected != recorded:
        raise ValueError(
            f"{sidecar} records sha256 {recorded}, but {file} should have {expected}: remove the "
            f"file and its .sha256 to download it again"
        )
    download_file(f"{base_url.rstrip('/')}/{file}", path, expected, progress)
    if not sidecar.is_file():
        digest = expected or sha256sum(path)
        atomic_write_text(sidecar, f"{digest}  {file}\n")
        if not expected and progress:
            print(
                f"{file}: no published SHA-256; recorded {digest} in {sidecar} (checked on later downloads)",
                file=sys.stderr,
            )
    return path


def gunzip(src: Path, dst: Path) -> Path:
    """``src`` (gzip) decompressed to ``dst`` through a temporary file (never a half ARPA)."""

    def write(tmp):
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout:
            shutil.copyfileobj(fin, fout, 1 << 20)

    try:
        atomic_write(dst, write)
    except (OSError, EOFError, zlib.error) as e:  # a damaged deflate stream raises zlib.error, not an OSError
        raise ValueError(f"{src}: cannot decompress it ({e}); remove it and its .sha256 to download it again") from None
    return dst


def download_lm(
    names: list[str], dest: str | Path, tokenizer=None, base_url: str = OPENSLR_LM_URL, progress: bool = True
) -> dict[str, Path]:
    """Fetches the named resources (short names of :data:`LM_FILES` or file names) into ``dest``;
    each ``.arpa.gz`` is decompressed beside it (``4-gram.arpa``). With a ``tokenizer`` (ours)
    the lexicon is fetched too and its words written spelled with our pieces to
    ``dest/librispeech-lexicon.bpe.txt``. Returns name -> path of what to use (ARPA, lexicon)."""
    files = []
    for name in names:
        file = LM_FILES.get(name, name)
        if file not in LM_FILES.values():
            raise ValueError(f"unknown openslr LM resource {name!r}; expected one of {', '.join(LM_FILES)}")
        files.append(file)
    if tokenizer is not None and LM_FILES["lexicon"] not in files:
        files.append(LM_FILES["lexicon"])
    dest = Path(dest)
    out = {}
    for file in dict.fromkeys(files):
        path = fetch(file, dest, base_url, progress=progress)
        if file.endswith(".arpa.gz"):
            arpa = path.with_suffix("")  # 4-gram.arpa.gz -> 4-gram.arpa
            if not arpa.is_file() or arpa.stat().st_mtime < path.stat().st_mtime:  # none yet, or a newer download
                gunzip(path, arpa)
            out[file] = arpa
        else:
            out[file] = path
    if tokenizer is not None:
        lexicon = out[LM_FILES["lexicon"]]
        words = [line.split(maxsplit=1)[0] for line in lexicon.read_text(encoding="utf-8").splitlines() if line.strip()]
        n = write_lexicon(words, tokenizer, dest / BPE_LEXICON)
        out[BPE_LEXICON] = dest / BPE_LEXICON
        if progress:
            print(f"wrote {dest / BPE_LEXICON}: {n} words spelled with {tokenizer.path}'s pieces", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# An ARPA word n-gram of transcripts: interpolated Kneser-Ney

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def count_ngrams(sentences, order: int) -> list[Counter]:
    """Raw counts of the n-grams (tuples) of orders 1..``order`` in the sentences (lists of
    words), each padded ``<s> ... </s>``; ``<s>`` alone is not counted (it is never predicted)."""
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        toks = [BOS, *words, EOS]
        for n in range(1, order + 1):
            c = counts[n - 1]
            for i in range(len(toks) - n + 1):
                c[tuple(toks[i : i + n])] += 1
    counts[0].pop((BOS,), None)
    return counts


def kneser_ney(sentences, order: int = 3) -> tuple[list[dict], list[dict], list[float]]:
    """Interpolated Kneser-Ney of the sentences (lists of words). Returns, per order ``n``, the
    probability of every seen n-gram (``probs[n-1][ngram]``, interpolated with the lower orders),
    the back-off (interpolation) weight of every seen history (``bows[n-1][ngram]``, orders below
    ``order``) and the discounts. ``probs[0]`` covers the whole vocabulary, ``</s>`` and ``<unk>``
    included; any other word gets ``bows[n-1][history] * p(word | shorter history)``."""
    if order < 1:
        raise ValueError(f"order must be at least 1, got {order}")
    sentences = [list(s) for s in sentences if s]
    if not sentences:
        raise ValueError("no sentence to estimate an LM from")
    for s in sentences:
        bad = [w for w in s if w in (BOS, EOS)]
        if bad:
            raise ValueError(f"a sentence holds the reserved word {bad[0]}: {' '.join(s)[:60]}")
    raw = count_ngrams(sentences, order)
    # adjusted counts: raw at the top order and for <s>-initial n-grams, else the number of
    # distinct words seen before the n-gram (continuation counts)
    adjusted = [Counter() for _ in range(order)]
    adjusted[-1] = Counter(raw[-1])
    for n in range(order - 1, 0, -1):  # n: an order below the top, 1-based
        cont = Counter(g[1:] for g in raw[n])  # keys of raw[n] (order n+1) are distinct
        adjusted[n - 1] = Counter({g: (c if g[0] == BOS else cont[g]) for g, c in raw[n - 1].items()})
    discounts = []
    for n in range(order):
        n1 = sum(1 for c in adjusted[n].values() if c == 1)
        n2 = sum(1 for c in adjusted[n].values() if c == 2)
        d = n1 / (n1 + 2 * n2) if n1 and n2 else 0.5
        discounts.append(min(max(d, 0.1), 0.9))

    vocab = sorted({g[0] for g in raw[0]} | {EOS, UNK})
    probs: list[dict] = [dict() for _ in range(order)]
    bows: list[dict] = [dict() for _ in range(order)]
    # unigrams: interpolated with the uniform distribution over the vocabulary
    total = sum(adjusted[0].values())
    d = discounts[0]
    gamma = d * len(adjusted[0]) / total
    for w in vocab:
        probs[0][(w,)] = max(adjusted[0].get((w,), 0) - d, 0.0) / total + gamma / len(vocab)
    for n in range(1, order):
        d = discounts[n]
        by_history: dict[tuple, list] = defaultdict(list)
        for g, c in adjusted[n].items():
            by_history[g[:-1]].append((g[-1], c))
        for h, successors in by_history.items():
            total = sum(c for _, c in successors)
            gamma = d * len(successors) / total
            bows[n - 1][h] = gamma
            lower = probs[n - 1]
            for w, c in successors:
                probs[n][h + (w,)] = (c - d) / total + gamma * lower[h[1:] + (w,)]
    return probs, bows, discounts


def write_arpa(probs: list[dict], bows: list[dict], path: str | Path) -> Path:
    """An ARPA file of :func:`kneser_ney`'s output (log10; ``<s>`` at -99 with its back-off
    weight), written through a temporary file."""
    sections = [{**probs[0], (BOS,): None}, *probs[1:]]

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\\data\\\n")
            for n, sec in enumerate(sections, 1):
                f.write(f"ngram {n}={len(sec)}\n")
            for n, sec in enumerate(sections, 1):
                f.write(f"\n\\{n}-grams:\n")
                for g in sorted(sec):
                    p = sec[g]
                    lp = "-99" if p is None else f"{math.log10(p):.7f}"
                    bow = bows[n - 1].get(g) if n < len(sections) else None
                    f.write(f"{lp}\t{' '.join(g)}" + ("" if bow is None else f"\t{math.log10(bow):.7f}") + "\n")
            f.write("\n\\end\\\n")

    atomic_write(path, write)
    return Path(path)


def build_arpa(sentences, path: str | Path, order: int = 3) -> dict:
    """Interpolated Kneser-Ney of ``sentences`` (strings or word lists) written to ``path`` as
    ARPA; returns a summary (order, n-gram counts, discounts, words)."""
    if order < 2:
        raise ValueError(f"--order {order}: KenLM reads bigram models and up")
    sentences = [s.split() if isinstance(s, str) else list(s) for s in sentences]
    probs, bows, discounts = kneser_ney(sentences, order)
    write_arpa(probs, bows, path)
    return {
        "path": str(path),
        "order": order,
        "sentences": len(sentences),
        "ngrams": [len(p) + (1 if n == 0 else 0) for n, p in enumerate(probs)],
        "discounts": [round(d, 4) for d in discounts],
        "words": len(probs[0]),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m data.lm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="fetch openslr resource 11's LM files (resume, SHA-256)")
    d.add_argument("names", nargs="+", metavar="NAME", help=f"any of {', '.join(LM_FILES)} (or their file names)")
    d.add_argument("--dest", required=True, help="folder for the files (e.g. /data/librispeech/lm)")
    d.add_argument(
        "--tokenizer",
        help="our SentencePiece model (a prepared folder's bpe.model): also write "
        f"DEST/{BPE_LEXICON}, the LM's words spelled with its pieces",
    )
    d.add_argument("--base-url", default=OPENSLR_LM_URL, help="a mirror of openslr resource 11")
    a_ = sub.add_parser("arpa", help="an ARPA word n-gram of a prepared folder's training transcripts")
    a_.add_argument("--data-dir", required=True, help="prepared folder (its manifests/*train*.jsonl are read)")
    a_.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    add_out(a_, required=False, help="ARPA file to write (default DATA_DIR/lm/<order>gram.arpa)")
    a = p.parse_args(argv)
    with user_errors():
        if a.command == "download":
            from data.tokenizer import Tokenizer

            tokenizer = Tokenizer(a.tokenizer) if a.tokenizer else None
            out = download_lm(a.names, a.dest, tokenizer, a.base_url)
            for path in out.values():
                print(path)
        else:
            sentences, manifests = training_transcripts(a.data_dir)
            out = Path(a.out) if a.out else Path(a.data_dir) / "lm" / f"{a.order}gram.arpa"
            s = build_arpa(sentences, out, a.order)
            print(
                f"wrote {out}: {s['order']}-gram of {s['sentences']} transcripts "
                f"({', '.join(m.name for m in manifests)}), "
                f"n-grams {' / '.join(map(str, s['ngrams']))}, discounts {' / '.join(map(str, s['discounts']))}"
            )


if __name__ == "__main__":
    main()
