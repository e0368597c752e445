"""CTC decoding: greedy best path, and beam search (torchaudio / flashlight-text): lexicon-free, over
a lexicon, or over a lexicon with a word n-gram LM (ARPA / KenLM)."""

from __future__ import annotations

import math
from pathlib import Path

import jiwer
import torch

from data.lexicon import lexicon_words
from data.tokenizer import BLANK, Tokenizer


def word_errors(refs: list[str], hyps: list[str]) -> dict[str, int]:
    """Word error counts of ``hyps`` against ``refs`` (jiwer's alignment): ``substitutions``,
    ``deletions``, ``insertions`` and the reference ``words`` (hits + substitutions + deletions);
    WER = (substitutions + deletions + insertions) / words. Counts add over batches and ranks."""
    m = jiwer.process_words(refs, hyps)
    return {
        "substitutions": m.substitutions,
        "deletions": m.deletions,
        "insertions": m.insertions,
        "words": m.hits + m.substitutions + m.deletions,
    }


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
    """Best path: argmax per frame, merge repeats, drop blanks. ``log_probs (B, T, V)``."""
    best = log_probs.argmax(-1).cpu()
    out = []
    for seq, n in zip(best, lengths.tolist()):
        seq = torch.unique_consecutive(seq[:n])
        out.append([int(t) for t in seq if t != BLANK])
    return out


class BeamSearch:
    """CTC beam search over the tokenizer's pieces (torchaudio's ``ctc_decoder``, flashlight-text):
    lexicon-free by default, or restricted to the words of a ``lexicon`` file (see
    :func:`data.lexicon.write_lexicon`), and then optionally scored by a word n-gram ``lm`` (an ARPA file or a
    KenLM binary; flashlight needs the lexicon for a word LM). A hypothesis scores
    ``acoustic + lm_weight * log10 P_lm(words) + word_score * #words``. The LM file is checked
    first (:func:`check_lm`); ``lm_kenlm`` may pass an LM already loaded for the same lexicon
    (see :meth:`with_weights`), so that a sweep loads a large LM once."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        beam_size: int = 32,
        lexicon=None,
        lm=None,
        lm_weight: float = 1.0,
        word_score: float = 0.0,
        lm_kenlm=None,
    ):
        from torchaudio.models.decoder import ctc_decoder

        pieces = tokenizer.pieces()
        self.tokenizer = tokenizer
        self.sil = pieces.index("<unk>")  # flashlight needs a silence token: <unk> never occurs in targets
        self.lexicon = None if lexicon is None else str(lexicon)
        self.beam_size = beam_size
        self.lm = None if lm is None else str(lm)
        self.lm_weight, self.word_score = (
            parse_weight("--lm-weight", lm_weight),
            parse_weight("--word-score", word_score),
        )
        self.lm_info, self._kenlm = None, lm_kenlm
        if self.lm is not None:
            if self.lexicon is None:
                raise ValueError(f"LM {self.lm}: a word LM needs a lexicon (--lexicon FILE or --lexicon train)")
            if lm_kenlm is None:
                self.lm_info = check_lm(self.lm, self.lexicon)
                self._kenlm = load_kenlm(self.lm, self.lexicon)
        self.decoder = ctc_decoder(
            lexicon=self.lexicon,
            tokens=pieces,
            lm=self._kenlm,
            beam_size=beam_size,
            lm_weight=self.lm_weight,
            word_score=self.word_score,
            blank_token="<blk>",
            sil_token="<unk>",
            unk_word="<unk>",
            nbest=1,
        )

    def with_weights(self, lm_weight: float, word_score: float) -> BeamSearch:
        """The same search (tokenizer, beam, lexicon, the LM already loaded) with other weights."""
        other = BeamSearch(
            self.tokenizer, self.beam_size, self.lexicon, self.lm, lm_weight, word_score, lm_kenlm=self._kenlm
        )
        other.lm_info = self.lm_info
        return other

    def settings(self) -> dict:
        """What the search ran with, for results files."""
        out = {"beam_size": self.beam_size, "lexicon": self.lexicon}
        if self.lm is not None:
            out.update(
                lm=self.lm,
                lm_format=(self.lm_info or {}).get("format"),
                lm_order=(self.lm_info or {}).get("order"),
                lm_weight=self.lm_weight,
                word_score=self.word_score,
            )
        return out

    def __call__(self, log_probs: torch.Tensor, lengths: torch.Tensor) -> list[list[int]]:
        """Best hypothesis per utterance, as output indices (blank and silence removed)."""
        hyps = self.decoder(log_probs.float().cpu().contiguous(), lengths.to(torch.int32).cpu())
        if self.lexicon is not None:  # word-constrained: re-spell the decoded words
            return [self.tokenizer.encode(" ".join(h[0].words)) if h else [] for h in hyps]
        return [[int(t) for t in h[0].tokens if int(t) not in (BLANK, self.sil)] if h else [] for h in hyps]


# ---------------------------------------------------------------------------------------------
# Word n-gram LMs (ARPA or KenLM binary) for the lexicon beam search

KENLM_MAGIC = b"mmap lm http://kheafield.com/code"


def parse_weight(name: str, value) -> float:
    """``value`` as a finite float; ``ValueError`` naming the option otherwise."""
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{name} {value!r} is not a finite number")
    return out


def read_arpa_header(path) -> tuple[dict[int, int], set[str]]:
    """The n-gram counts of an ARPA file's ``\\data\\`` section and the words of its unigrams,
    reading no further than the end of the unigram section (so a multi-GB 4-gram is checked in
    seconds). A malformed file raises ``ValueError`` naming the file and line."""
    counts: dict[int, int] = {}
    words: set[str] = set()
    state = "start"
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise ValueError(f"{path}:{n}: not UTF-8 text (an ARPA file or a KenLM binary was expected)") from None
            if state == "start":
                if not line or line.startswith("#"):  # KenLM allows '#' comments before \data\
                    continue
                if line != "\\data\\":
                    raise ValueError(f"{path}:{n}: not an ARPA language model (expected '\\data\\', got {line[:40]!r})")
                state = "data"
            elif state == "data":
                if not line:
                    continue
                if line.startswith("ngram "):
                    order, _, count = line[6:].partition("=")
                    try:
                        counts[int(order)] = int(count)
                    except ValueError:
                        raise ValueError(f"{path}:{n}: bad n-gram count line {line!r}") from None
                elif line == "\\1-grams:":
                    if not counts or 1 not in counts:
                        raise ValueError(f"{path}:{n}: the \\data\\ section declares no unigram count")
                    state = "unigrams"
                else:
                    raise ValueError(f"{path}:{n}: unexpected line in the \\data\\ section: {line[:40]!r}")
            else:  # unigrams
                if not line:
                    continue
                if line.startswith("\\"):
                    break
                fields = line.split()
                try:
                    float(fields[0])
                    if len(fields) == 3:
                        float(fields[2])
                    elif len(fields) != 2:
                        raise ValueError
                except (ValueError, IndexError):
                    raise ValueError(
                        f"{path}:{n}: malformed unigram line {line[:60]!r} (expected 'log10-prob word [backoff]')"
                    ) from None
                words.add(fields[1])
    if state != "unigrams":
        raise ValueError(f"{path}: not an ARPA language model (no \\1-grams: section)")
    if len(words) != counts[1]:
        raise ValueError(
            f"{path}: the \\data\\ section declares {counts[1]} unigrams, the file holds {len(words)} (truncated?)"
        )
    return counts, words


def check_lm(path, lexicon=None, min_coverage: float = 0.5) -> dict:
    """Checks a word LM before decoding: the file exists and is an ARPA file (a ``\\data\\``
    header and well-formed unigrams) or a KenLM binary (by its magic bytes); a gzipped ARPA is
    refused (flashlight reads plain text). With a ``lexicon`` (ARPA only: a binary's words are
    not readable here), at least ``min_coverage`` of the lexicon's words must be LM unigrams, else
    ``ValueError`` (e.g. a lower-case LM for our upper-case words); fewer missing words give a
    warning (they are scored as the LM's ``<unk>``). Returns ``format``, ``order``, ``ngrams`` and,
    with a lexicon, ``lexicon_words`` and ``lexicon_words_in_lm``."""
    import warnings

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LM {path} does not exist")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:2] == b"\x1f\x8b":
        raise ValueError(
            f"LM {path} is gzip-compressed: decompress it first (gunzip -k {path}); "
            f"python -m data.lm download does so for openslr's files"
        )
    if head.startswith(KENLM_MAGIC):
        return {"format": "kenlm-binary", "order": None, "ngrams": None}
    counts, words = read_arpa_header(path)
    if max(counts) < 2:
        raise ValueError(f"LM {path} is a unigram model: KenLM reads bigram models and up")
    info = {"format": "arpa", "order": max(counts), "ngrams": [counts[k] for k in sorted(counts)]}
    if lexicon is not None:
        lex = lexicon_words(lexicon)
        missing = [w for w in lex if w not in words]
        info.update(lexicon_words=len(lex), lexicon_words_in_lm=len(lex) - len(missing))
        if lex and len(lex) - len(missing) < min_coverage * len(lex):
            upper = {w.upper() for w in words}
            hint = (
                " (the LM's words differ in case: use an upper-case LM)"
                if sum(w.upper() in upper for w in missing) > len(missing) / 2
                else ""
            )
            raise ValueError(
                f"LM {path} lacks {len(missing)} of the {len(lex)} words of lexicon {lexicon}, e.g. "
                f"{', '.join(missing[:5])}{hint}: is it the LM of this lexicon?"
            )
        if missing:
            warnings.warn(
                f"LM {path}: {len(missing)} of the {len(lex)} lexicon words are not in it and are scored "
                f"as <unk>, e.g. {', '.join(missing[:5])}",
                stacklevel=2,
            )
    return info


def load_kenlm(path, lexicon):
    """The LM as flashlight's KenLM, indexed by the words of ``lexicon`` as torchaudio's
    ``ctc_decoder`` indexes them; a file KenLM cannot read raises ``ValueError`` naming it."""
    try:
        from flashlight.lib.text.decoder.kenlm import KenLM
    except ImportError:  # flashlight-text before 0.0.5
        from flashlight.lib.text.decoder import KenLM
    from flashlight.lib.text.dictionary import create_word_dict, load_words

    word_dict = create_word_dict(load_words(str(lexicon)))
    try:
        return KenLM(str(path), word_dict)
    except Exception as e:  # KenLM's own format errors: "FILE:LINE in FUNCTION threw X.\nwhy"
        why = " ".join(str(e).split(" threw ", 1)[-1].split())
        raise ValueError(f"LM {path}: KenLM cannot read it ({why[:300]})") from None


def align_words(log_probs: torch.Tensor, ids: list[int], symbols: list[str]) -> list[tuple[str, int, int]]:
    """Words of a hypothesis with the model frames they span, ``(word, first, last)``, from a CTC
    forced alignment of its output indices ``ids`` to the frames' ``log_probs (T, V)``
    (torchaudio's ``forced_align``: the Viterbi path of CTC, Graves et al. 2006, section 3.2, that
    emits exactly ``ids``). A word starts at a SentencePiece piece beginning with ``▁`` (Kudo and
    Richardson, 2018); ``symbols`` are the outputs by index (:meth:`Tokenizer.symbols`). Empty when
    ``ids`` is; ``ValueError`` when the frames are too few to emit ``ids``."""
    import torchaudio.functional as AF

    if not ids:
        return []
    targets = torch.tensor([ids], dtype=torch.int32)
    try:
        path, scores = AF.forced_align(log_probs.float().cpu().unsqueeze(0), targets, blank=BLANK)
    except RuntimeError as e:  # more targets (with the blanks between repeats) than frames
        raise ValueError(f"cannot align {len(ids)} outputs to {log_probs.shape[0]} frames ({e})") from None
    spans = AF.merge_tokens(path[0], scores[0].exp())
    words: list[list] = []
    for span in spans:
        piece = symbols[span.token]
        if piece.startswith("\u2581") or not words:
            words.append([piece.lstrip("\u2581"), span.start, span.end - 1])
        else:
            words[-1][0] += piece
            words[-1][2] = span.end - 1
    return [(w, s, e) for w, s, e in words if w]
