"""SentencePiece BPE tokenizer with the CTC blank at index 0.

Model outputs are ``blank (0)`` followed by the SentencePiece pieces (piece ``k`` -> output
``k + 1``), so a 128-unit BPE model gives a 129-way CTC head, as in SPEC section 1.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path

BLANK = 0


def tokenizer_digest(path: str | Path | bytes) -> str:
    """Short SHA-256 of a SentencePiece model (its file, or its bytes): checkpoints record it to
    refuse another one."""
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return hashlib.sha256(data).hexdigest()[:16]


class Tokenizer:
    """Text <-> CTC output indices through a SentencePiece model file.

    ``model_bytes``: the serialised model itself (as a checkpoint embeds it); ``model_path`` is
    then only its name (the file need not exist).
    """

    def __init__(self, model_path: str | Path, model_bytes: bytes | None = None):
        import sentencepiece as spm

        self.path = str(model_path)
        if model_bytes is None:
            if not Path(model_path).is_file():
                raise FileNotFoundError(f"{model_path}: no such SentencePiece model")
            model_bytes = Path(model_path).read_bytes()
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)

    @property
    def digest(self) -> str:
        return tokenizer_digest(self.model_bytes)

    @property
    def vocab_size(self) -> int:
        """Number of CTC outputs, blank included."""
        return self.sp.get_piece_size() + 1

    def encode(self, text: str) -> list[int]:
        """CTC targets of ``text``; a character the model cannot spell raises ``ValueError``
        (it would otherwise silently become an ``<unk>`` target)."""
        ids = self.sp.encode(text.upper())
        unk = self.sp.unk_id()
        if unk in ids:
            bad = sorted({c for c in text.upper() if not c.isspace() and unk in self.sp.encode(c)})
            raise ValueError(f"{text!r}: characters outside the tokenizer's vocabulary: {''.join(bad)!r}")
        return [i + 1 for i in ids]

    def spellable(self, word: str) -> bool:
        """Whether ``word`` is spelt by the tokenizer's pieces without ``<unk>``."""
        return self.sp.unk_id() not in self.sp.encode(word.upper())

    def decode(self, ids) -> str:
        """Text of a sequence of output indices (blanks and repeats must already be removed)."""
        return self.sp.decode([int(i) - 1 for i in ids if int(i) != BLANK])

    def pieces(self) -> list[str]:
        """Output symbols by index, ``"<blk>"`` first (e.g. for a beam-search token list)."""
        return ["<blk>"] + [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]

    @staticmethod
    def train(texts, model_prefix: str | Path, vocab_size: int = 128) -> "Tokenizer":
        """Train a BPE model on an iterable of transcripts; writes ``model_prefix.{model,vocab}``."""
        import sentencepiece as spm

        texts = [t.upper() for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train a tokenizer on no text")
        Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, unk_id=0, bos_id=-1, eos_id=-1, hard_vocab_limit=False,
            num_threads=2, minloglevel=2,
        )
        path = Path(f"{model_prefix}.model")
        tmp = path.with_suffix(".model.tmp")
        tmp.write_bytes(model.getvalue())
        tmp.replace(path)
        return Tokenizer(path)
