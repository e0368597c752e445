"""SentencePiece BPE tokenizer with the CTC blank at index 0.

Model outputs are ``blank (0)`` followed by the SentencePiece pieces (piece ``k`` -> output
``k + 1``), so a 128-unit BPE model gives a 129-way CTC head.

A model converted from ESPnet keeps ESPnet's output order instead: its ``token_list``
(``<blank>`` first, then ``<unk>``, the pieces by their training-text frequency, ``<sos/eos>``
last), given as ``token_list``; output ``i`` is then ``token_list[i]``.
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
    then only its name (the file need not exist). ``token_list``: the output symbols in the
    model's order (an ESPnet model's), blank first; default: blank + the SentencePiece pieces.
    """

    SPECIAL = ("<blank>", "<unk>", "<sos/eos>")

    def __init__(self, model_path: str | Path, model_bytes: bytes | None = None, token_list: list[str] | None = None):
        import sentencepiece as spm

        self.path = str(model_path)
        if model_bytes is None:
            if not Path(model_path).is_file():
                raise FileNotFoundError(f"{model_path}: no such SentencePiece model")
            model_bytes = Path(model_path).read_bytes()
        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        self.token_list = None if token_list is None else [str(t) for t in token_list]
        if self.token_list is not None:
            if len(self.token_list) < 2 or self.token_list[BLANK] != "<blank>":
                raise ValueError(f"token_list must start with the CTC blank '<blank>'; got {self.token_list[:3]}")
            if len(set(self.token_list)) != len(self.token_list):
                dup = next(t for t in self.token_list if self.token_list.count(t) > 1)
                raise ValueError(f"token_list holds {dup!r} twice")
            unknown = [
                t for t in self.token_list if t not in self.SPECIAL and self.sp.piece_to_id(t) == self.sp.unk_id()
            ]
            if unknown:
                raise ValueError(
                    f"token_list holds {len(unknown)} symbols that are not pieces of {self.path}, "
                    f"e.g. {unknown[:3]} (another BPE model?)"
                )
            self._index = {t: i for i, t in enumerate(self.token_list)}

    @classmethod
    def open(cls, model_path: str | Path) -> Tokenizer:
        """The tokenizer of a prepared folder's ``bpe.model``, in the output order of the
        ``tokens.txt`` beside it where there is one (a folder prepared for a converted ESPnet model,
        ``python -m data.prepare --inputs``)."""
        tokens = Path(model_path).with_name("tokens.txt")
        token_list = [t for t in tokens.read_text().split("\n") if t.strip()] if tokens.is_file() else None
        return cls(model_path, token_list=token_list)

    @property
    def digest(self) -> str:
        if self.token_list is None:
            return tokenizer_digest(self.model_bytes)
        return tokenizer_digest(self.model_bytes + "\n".join(self.token_list).encode())

    @property
    def vocab_size(self) -> int:
        """Number of CTC outputs, blank included."""
        return len(self.token_list) if self.token_list is not None else self.sp.get_piece_size() + 1

    def _pieces_of(self, text: str) -> list[str]:
        return self.sp.encode(text.upper(), out_type=str)

    def encode(self, text: str) -> list[int]:
        """CTC targets of ``text``; a character the model cannot spell raises ``ValueError``
        (it would otherwise silently become an ``<unk>`` target)."""
        if not self.spellable(text):
            bad = sorted({c for c in text.upper() if not c.isspace() and not self.spellable(c)})
            raise ValueError(f"{text!r}: characters outside the tokenizer's vocabulary: {''.join(bad)!r}")
        if self.token_list is not None:
            return [self._index[p] for p in self._pieces_of(text)]
        return [i + 1 for i in self.sp.encode(text.upper())]

    def spellable(self, word: str) -> bool:
        """Whether ``word`` is spelt by the tokenizer's outputs without ``<unk>``."""
        if self.sp.unk_id() in self.sp.encode(word.upper()):
            return False
        return self.token_list is None or all(p in self._index for p in self._pieces_of(word))

    def decode(self, ids) -> str:
        """Text of a sequence of output indices (blanks and repeats must already be removed)."""
        if self.token_list is not None:  # ESPnet: ids -> tokens -> SentencePiece's decode_pieces
            tokens = [self.token_list[int(i)] for i in ids if int(i) != BLANK]
            return self.sp.decode_pieces([t for t in tokens if t not in ("<blank>", "<sos/eos>")])
        return self.sp.decode([int(i) - 1 for i in ids if int(i) != BLANK])

    def symbols(self) -> list[str]:
        """Output symbols by index, ``"<blank>"`` first: the token table (``tokens.txt``) whose
        pieces, blanks and ``<sos/eos>`` left out, SentencePiece's ``decode_pieces`` joins."""
        if self.token_list is not None:
            return list(self.token_list)
        return ["<blank>"] + [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())]

    def pieces(self) -> list[str]:
        """Output symbols by index, ``"<blk>"`` first (e.g. for a beam-search token list)."""
        return ["<blk>"] + self.symbols()[1:]

    @staticmethod
    def train(texts, model_prefix: str | Path, vocab_size: int = 128) -> Tokenizer:
        """Train a BPE model on an iterable of transcripts; writes ``model_prefix.{model,vocab}``."""
        import sentencepiece as spm

        texts = [t.upper() for t in texts if t.strip()]
        if not texts:
            raise ValueError("cannot train a tokenizer on no text")
        Path(model_prefix).parent.mkdir(parents=True, exist_ok=True)
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=vocab_size,
            model_type="bpe",
            character_coverage=1.0,
            unk_id=0,
            bos_id=-1,
            eos_id=-1,
            hard_vocab_limit=False,
            num_threads=2,
            minloglevel=2,
        )
        path = Path(f"{model_prefix}.model")
        tmp = path.with_suffix(".model.tmp")
        tmp.write_bytes(model.getvalue())
        tmp.replace(path)
        return Tokenizer(path)
