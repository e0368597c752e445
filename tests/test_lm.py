"""Word n-gram LM decoding (issue 17): an ARPA LM moves the lexicon beam's choice between two
acoustically tied words the way it prefers and is the lexicon beam at weight 0; our ARPA writer
(interpolated Kneser-Ney) against an independent recomputation; the openslr downloader's checksum
and resume logic against a local server; evaluate.py's ``lm`` decoder, its sweep and bad inputs."""

from __future__ import annotations

import gzip
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from data import lm as data_lm
from data import sentences
from data.lexicon import write_lexicon
from data.librispeech import sha256sum
from data.tokenizer import Tokenizer
from models.decoding import BeamSearch, check_lm, load_kenlm, parse_weight
from tests.range_server import RangeServer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    return Tokenizer.train(sentences.generate(400, seed=0), tmp_path_factory.mktemp("tok") / "bpe", vocab_size=64)


def _tied_words(tok):
    """Two vocabulary words spelled with as many pieces, differing in every piece."""
    spell = {w.upper(): tok.encode(w.upper()) for w in sentences.VOCABULARY}
    return next(
        (a, b)
        for a in spell
        for b in spell
        if a < b and len(spell[a]) == len(spell[b]) >= 2 and all(x != y for x, y in zip(spell[a], spell[b]))
    )


def _emissions(tok, words, favour: dict[str, str] | None = None, p: float = 0.52):
    """Log-probs spelling ``words`` (each piece on one frame, then a blank: flashlight's lexicon
    decoder cannot repeat a word's last piece once the word is emitted); for a word in ``favour``
    the frames are split between it (``p``) and its rival (``1 - p``)."""
    frames = []
    for w in words:
        rival = (favour or {}).get(w)
        for i, piece in enumerate(tok.encode(w)):
            frames += [(piece, tok.encode(rival)[i] if rival else None), (0, None)]
    log_probs = torch.full((1, len(frames), tok.vocab_size), -30.0)
    for t, (best, second) in enumerate(frames):
        if second is None:
            log_probs[0, t, best] = 0.0
        else:
            log_probs[0, t, best], log_probs[0, t, second] = math.log(p), math.log(1 - p)
    return log_probs, torch.tensor([len(frames)])


def _unigram_arpa(path: Path, logprobs: dict[str, float]) -> Path:
    """An ARPA LM of these word unigrams (and one bigram: KenLM reads bigram models and up)."""
    lines = [f"{lp}\t{w}" for w, lp in {"<unk>": -3.0, "</s>": -0.5, **logprobs}.items()]
    path.write_text(
        "\\data\\\nngram 1={}\nngram 2=1\n\n\\1-grams:\n-99\t<s>\t0\n{}\n\n\\2-grams:\n-0.1\t<s> </s>\n\n"
        "\\end\\\n".format(len(lines) + 1, "\n".join(lines))
    )
    return path


# --- LM beam search ---------------------------------------------------------------------------


def test_lm_moves_a_tied_decision_its_way_and_weight_zero_is_the_lexicon_beam(tok, tmp_path):
    w1, w2 = _tied_words(tok)
    lexicon = tmp_path / "lex.txt"
    assert write_lexicon([w1, w2, "THE", "DOG"], tok, lexicon) == 4
    log_probs, lengths = _emissions(tok, [w2], favour={w2: w1})  # the acoustics favour w2, narrowly
    decode = lambda **kw: tok.decode(BeamSearch(tok, 8, lexicon, **kw)(log_probs, lengths)[0])
    assert decode() == w2
    prefers_w1 = _unigram_arpa(tmp_path / "w1.arpa", {w1: -0.2, w2: -2.0, "THE": -1.0, "DOG": -1.0})
    prefers_w2 = _unigram_arpa(tmp_path / "w2.arpa", {w1: -2.0, w2: -0.2, "THE": -1.0, "DOG": -1.0})
    assert decode(lm=prefers_w1, lm_weight=1.0) == w1  # the LM overrides a narrow acoustic preference
    assert decode(lm=prefers_w2, lm_weight=1.0) == w2
    assert decode(lm=prefers_w1, lm_weight=0.0) == decode()  # weight 0: the lexicon beam's decision
    assert decode(lm=prefers_w1, lm_weight=0.01) == w2  # a small weight cannot outweigh the acoustics
    # a dead tie (0.5 / 0.5) goes the LM's way whichever word it prefers
    tie, lengths = _emissions(tok, [w1], favour={w1: w2}, p=0.5)
    for arpa, want in ((prefers_w1, w1), (prefers_w2, w2)):
        assert tok.decode(BeamSearch(tok, 8, lexicon, lm=arpa)(tie, lengths)[0]) == want


def test_weight_zero_equals_lexicon_beam_on_noisy_sentences(tok, tmp_path):
    import jiwer

    lexicon = tmp_path / "lex.txt"
    write_lexicon(sentences.VOCABULARY, tok, lexicon)
    arpa = tmp_path / "lm.arpa"
    data_lm.build_arpa(sentences.generate(400, seed=3), arpa, order=3)
    plain = BeamSearch(tok, 8, lexicon)
    with pytest.warns(UserWarning, match="lexicon words are not in it and are scored as <unk>"):
        lm0 = BeamSearch(tok, 8, lexicon, lm=arpa, lm_weight=0.0)  # a few words are not in 400 sentences
    lm1 = lm0.with_weights(1.0, 0.5)
    gen = torch.Generator().manual_seed(0)
    refs, hyps = [], {"plain": [], "lm0": [], "lm1": []}
    for k in range(8):
        refs.append(sentences.generate(1, seed=100 + k)[0])
        log_probs, lengths = _emissions(tok, refs[-1].split())
        noisy = torch.log_softmax(0.1 * log_probs + torch.randn(log_probs.shape, generator=gen), -1)  # ambiguous
        for name, search in (("plain", plain), ("lm0", lm0), ("lm1", lm1)):
            hyps[name].append(tok.decode(search(noisy, lengths)[0]))
    assert hyps["lm0"] == hyps["plain"]  # weight 0: the lexicon beam's hypotheses, every one
    assert hyps["lm1"] != hyps["plain"]
    assert jiwer.wer(refs, hyps["lm1"]) < jiwer.wer(refs, hyps["plain"])  # the grammar's LM helps
    assert lm1.settings() == {
        "beam_size": 8,
        "lexicon": str(lexicon),
        "lm": str(arpa),
        "lm_format": "arpa",
        "lm_order": 3,
        "lm_weight": 1.0,
        "word_score": 0.5,
    }


# --- our ARPA writer ----------------------------------------------------------------------------


def _read_arpa(path: Path) -> tuple[dict, dict]:
    """(log10 prob, log10 back-off) per n-gram tuple, parsed here independently of data.lm."""
    prob, bow, order = {}, {}, 0
    for line in path.read_text().splitlines():
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1 : line.index("-")])
        elif order and line.strip() and not line.startswith("\\"):
            f = line.split("\t")
            g = tuple(f[1].split())
            assert len(g) == order
            prob[g] = float(f[0])
            if len(f) == 3:
                bow[g] = float(f[2])
    return prob, bow


def _arpa_p(prob, bow, w, h):
    """P(w | h) by the ARPA back-off rule."""
    h = tuple(h)
    if h + (w,) in prob:
        return 10 ** prob[h + (w,)]
    if not h:
        raise KeyError(w)
    return 10 ** bow.get(h, 0.0) * _arpa_p(prob, bow, w, h[1:])


def _kn_reference(corpus: list[str], order: int):
    """Interpolated Kneser-Ney straight from its definition, by brute-force counting."""
    padded = [["<s>", *s.split(), "</s>"] for s in corpus]
    grams = Counter(tuple(t[i : i + n]) for t in padded for n in range(1, order + 1) for i in range(len(t) - n + 1))
    vocab = sorted({w for t in padded for w in t} - {"<s>"} | {"<unk>"})

    def a(g):
        if len(g) == order or g[0] == "<s>":
            return grams[g]
        return sum(1 for v in vocab + ["<s>"] if grams[(v, *g)])

    def discount(n):
        cs = [a(g) for g in grams if len(g) == n and g != ("<s>",)]
        n1, n2 = cs.count(1), cs.count(2)
        return min(max(n1 / (n1 + 2 * n2) if n1 and n2 else 0.5, 0.1), 0.9)

    D = [None] + [discount(n) for n in range(1, order + 1)]

    def p(w, h):
        h = tuple(h)[-(order - 1) :] if order > 1 else ()
        n = len(h) + 1
        counts = {x: a(h + (x,)) for x in vocab}
        total = sum(counts.values())
        if total == 0:
            return p(w, h[1:])
        gamma = D[n] * sum(1 for c in counts.values() if c) / total
        lower = 1 / len(vocab) if not h else p(w, h[1:])
        return max(counts[w] - D[n], 0) / total + gamma * lower

    return p, vocab


@pytest.mark.parametrize("order", [2, 3, 4])
def test_kneser_ney_arpa_matches_recomputation_and_sums_to_one(tmp_path, order):
    corpus = ["A B C", "A B D", "B C A", "C A B C", "D", "A A B", "B B", "C D A B"]
    summary = data_lm.build_arpa(corpus, tmp_path / "lm.arpa", order=order)
    prob, bow = _read_arpa(tmp_path / "lm.arpa")
    ref, vocab = _kn_reference(corpus, order)
    assert summary["ngrams"] == [sum(1 for g in prob if len(g) == n) for n in range(1, order + 1)]
    assert check_lm(tmp_path / "lm.arpa")["ngrams"] == summary["ngrams"]
    words = vocab + ["<s>"]
    histories = [()] + [(w,) for w in words] + [(u, v) for u in words for v in vocab]
    histories += [h + (x,) for h in histories if len(h) == 2 for x in vocab] if order == 4 else []
    for h in histories:
        if "<s>" in h[1:]:
            continue
        ps = {w: _arpa_p(prob, bow, w, h) for w in vocab}
        assert sum(ps.values()) == pytest.approx(1.0, abs=1e-5), h
        for w in vocab:
            assert ps[w] == pytest.approx(ref(w, h), rel=1e-5), (h, w)


def test_kenlm_reads_our_arpa_as_we_do(tmp_path, tok):
    from flashlight.lib.text.dictionary import create_word_dict, load_words

    corpus = sentences.generate(50, seed=1)
    data_lm.build_arpa(corpus, tmp_path / "lm.arpa", order=3)
    lexicon = tmp_path / "lex.txt"
    write_lexicon([w for s in corpus for w in s.split()], tok, lexicon)
    kenlm, words = load_kenlm(tmp_path / "lm.arpa", lexicon), create_word_dict(load_words(str(lexicon)))
    prob, bow = _read_arpa(tmp_path / "lm.arpa")
    for s in [corpus[0], corpus[7], " ".join(reversed(corpus[3].split())), f"{corpus[1]} {corpus[2]}"]:
        state, total, h, ours = kenlm.start(False), 0.0, ["<s>"], 0.0
        for w in s.split():
            state, score = kenlm.score(state, words.get_index(w))
            total += score
            ours += math.log10(_arpa_p(prob, bow, w, h[-2:]))
            h.append(w)
        total += kenlm.finish(state)[1]
        ours += math.log10(_arpa_p(prob, bow, "</s>", h[-2:]))
        assert total == pytest.approx(ours, abs=1e-4), s


def test_arpa_of_training_transcripts_cli(prepared, tmp_path):
    data_lm.main(["arpa", "--data-dir", str(prepared), "--order", "2", "--out", str(tmp_path / "2gram.arpa")])
    info = check_lm(tmp_path / "2gram.arpa")
    assert info["format"] == "arpa" and info["order"] == 2
    with pytest.raises(SystemExit, match="error: no \\*train\\*.jsonl manifest"):
        data_lm.main(["arpa", "--data-dir", str(tmp_path)])


# --- the openslr downloader -------------------------------------------------------------------------


def test_download_lm_checksums_resume_gunzip_and_bpe_lexicon(tmp_path, tok, monkeypatch):
    srv = tmp_path / "srv"
    srv.mkdir()
    data_lm.build_arpa(sentences.generate(30, seed=2), tmp_path / "plain.arpa", order=2)
    arpa_text = (tmp_path / "plain.arpa").read_bytes()
    (srv / "3-gram.pruned.3e-7.arpa.gz").write_bytes(gzip.compress(arpa_text, mtime=0))
    (srv / "librispeech-lexicon.txt").write_text("THE\tDH AH0\nTHE\tDH IY1\nOLD\tOW1 L D\nMAN\tM AE1 N\n")
    monkeypatch.setitem(data_lm.SHA256, "librispeech-lexicon.txt", sha256sum(srv / "librispeech-lexicon.txt"))
    dest = tmp_path / "lm"
    dest.mkdir()
    gz = (srv / "3-gram.pruned.3e-7.arpa.gz").read_bytes()
    (dest / "3-gram.pruned.3e-7.arpa.gz.part").write_bytes(gz[:40])  # an interrupted download
    with RangeServer(srv) as server:
        out = data_lm.download_lm(["3-gram.pruned.3e-7"], dest, tok, base_url=server.url, progress=False)
        assert ("/3-gram.pruned.3e-7.arpa.gz", "bytes=40-") in server.seen  # resumed
        assert (dest / "3-gram.pruned.3e-7.arpa.gz").read_bytes() == gz
        assert out["3-gram.pruned.3e-7.arpa.gz"] == dest / "3-gram.pruned.3e-7.arpa"
        assert (dest / "3-gram.pruned.3e-7.arpa").read_bytes() == arpa_text  # gunzipped for flashlight
        # no published sum: recorded on first download, checked afterwards
        assert (dest / "3-gram.pruned.3e-7.arpa.gz.sha256").read_text().split()[0] == sha256sum(
            srv / "3-gram.pruned.3e-7.arpa.gz"
        )
        lex = (dest / data_lm.BPE_LEXICON).read_text().splitlines()
        assert [l.split()[0] for l in lex] == ["MAN", "OLD", "THE"]
        assert all(tok.decode(tok.encode(l.split()[0])) == l.split()[0] for l in lex)
        assert all("".join(l.split()[1:]).replace("\u2581", "") == l.split()[0] for l in lex)
        n = len(server.seen)
        data_lm.download_lm(["3-gram.pruned.3e-7"], dest, tok, base_url=server.url, progress=False)
        assert len(server.seen) == n  # everything verified in place: nothing fetched again
        # the served file changes: a fresh download no longer matches the recorded sum
        (dest / "3-gram.pruned.3e-7.arpa.gz").unlink()
        (srv / "3-gram.pruned.3e-7.arpa.gz").write_bytes(gzip.compress(arpa_text + b"\n", mtime=0))
        with pytest.raises(ValueError, match="checksum mismatch"):
            data_lm.fetch("3-gram.pruned.3e-7.arpa.gz", dest, server.url, progress=False)
        assert not (dest / "3-gram.pruned.3e-7.arpa.gz.part").exists()
        # a pinned sum that the file does not have
        monkeypatch.setitem(data_lm.SHA256, "librispeech-vocab.txt", "0" * 64)
        (srv / "librispeech-vocab.txt").write_text("THE\nOLD\n")
        with pytest.raises(ValueError, match="checksum mismatch"):
            data_lm.download_lm(["vocab"], dest, base_url=server.url, progress=False)
    with pytest.raises(ValueError, match="unknown openslr LM resource '5-gram'"):
        data_lm.download_lm(["5-gram"], dest, progress=False)


# --- bad inputs ------------------------------------------------------------------------------------


def test_bad_lm_files_and_weights_get_one_clear_message(tok, tmp_path):
    lexicon = tmp_path / "lex.txt"
    write_lexicon(["THE", "OLD", "MAN"], tok, lexicon)
    good = _unigram_arpa(tmp_path / "good.arpa", {"THE": -1, "OLD": -1, "MAN": -1})
    cases = {
        "missing.arpa": (None, "does not exist"),
        "notes.txt": (b"these are my notes\n", "not an ARPA language model"),
        "lm.arpa.gz": (gzip.compress(good.read_bytes()), "gzip-compressed"),
        "short.arpa": (good.read_bytes().replace(b"ngram 1=6", b"ngram 1=9"), "declares 9 unigrams, the file holds 6"),
        "bad-line.arpa": (good.read_bytes().replace(b"-1\tOLD", b"x\tOLD"), "bad-line.arpa:10: malformed unigram line"),
        "lower.arpa": (good.read_bytes().lower(), "differ in case"),
        "other-words.arpa": (
            _unigram_arpa(tmp_path / "x", {"CAT": -1, "SAT": -1}).read_bytes(),
            "lacks 3 of the 3 words",
        ),
        "binary.bin": (b"\x93\xff\x00garbage" * 10, "not UTF-8"),
    }
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises((ValueError, FileNotFoundError), match=message) as e:
            BeamSearch(tok, 4, lexicon, lm=tmp_path / name)
        assert name in str(e.value) and "\n" not in str(e.value)
    # KenLM's own errors past the unigrams come back as one message too
    broken = good.read_bytes().replace(b"-0.1\t<s> </s>", b"not a bigram line at all")
    (tmp_path / "broken.arpa").write_bytes(broken)
    with pytest.raises(ValueError, match="broken.arpa: KenLM cannot read it"):
        BeamSearch(tok, 4, lexicon, lm=tmp_path / "broken.arpa")
    (tmp_path / "unigram.arpa").write_text("\\data\\\nngram 1=1\n\n\\1-grams:\n-1\tTHE\n\n\\end\\\n")
    with pytest.raises(ValueError, match="unigram.arpa is a unigram model"):
        BeamSearch(tok, 4, lexicon, lm=tmp_path / "unigram.arpa")
    with pytest.raises(ValueError, match="needs a lexicon"):
        BeamSearch(tok, 4, None, lm=good)
    for bad in ("abc", "nan", "inf", ""):
        with pytest.raises(ValueError, match="--lm-weight .* not a (finite )?number"):
            parse_weight("--lm-weight", bad)
    with pytest.warns(UserWarning, match="1 of the 3 lexicon words are not in it"):
        check_lm(_unigram_arpa(tmp_path / "most.arpa", {"THE": -1, "OLD": -1}), lexicon)
    assert BeamSearch(tok, 4, lexicon, lm=good).lm_info["format"] == "arpa"


# --- evaluate.py --lm ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_setup(prepared, tmp_path_factory):
    from test_train import _fit

    root = tmp_path_factory.mktemp("lm_eval")
    _fit(prepared, root, max_epochs=2, limit=3)
    data_lm.main(["arpa", "--data-dir", str(prepared), "--out", str(root / "3gram.arpa")])
    return root / "checkpoints" / "last.ckpt", root / "3gram.arpa"


def test_evaluate_lm_decoder_and_weight_zero(lm_setup, tmp_path):
    import evaluate

    ckpt, arpa = lm_setup
    evaluate.main(
        [
            "--ckpt",
            str(ckpt),
            "--sets",
            "mini-test",
            "--lm",
            str(arpa),
            "--lm-weight",
            "0",
            "--beam-size",
            "4",
            "--out",
            str(tmp_path / "e"),
            "--device",
            "cpu",
        ]
    )
    res = json.loads((tmp_path / "e" / "results.json").read_text())["sets"]["mini-test"]
    assert {"greedy", "beam", "lm"} <= set(res)
    lm = res["lm"]
    assert (lm["lm"], lm["lm_weight"], lm["word_score"], lm["beam_size"], lm["lm_format"], lm["lm_order"]) == (
        str(arpa),
        0.0,
        0.0,
        4,
        "arpa",
        3,
    )
    assert lm["lexicon"] == res["decoder"]["lexicon"] == str(tmp_path / "e" / "lexicon.txt")  # --lexicon train
    assert res["decoder"]["lm"]["lm_weight"] == 0.0
    rows = [l.split("\t") for l in (tmp_path / "e" / "mini-test.hyp.tsv").read_text().splitlines()]
    assert rows[0] == ["id", "reference", "greedy", "beam", "lm"]
    assert all(r[3] == r[4] for r in rows[1:])  # weight 0: the lexicon beam's hypotheses
    assert res["lm"]["wer"] == res["beam"]["wer"]


def test_evaluate_lm_sweep_tunes_on_the_first_set(lm_setup, tmp_path, capsys):
    import evaluate

    ckpt, arpa = lm_setup
    evaluate.main(
        [
            "--ckpt",
            str(ckpt),
            "--sets",
            "mini-dev",
            "mini-test",
            "--lm",
            str(arpa),
            "--lm-weight",
            "0",
            "2",
            "--word-score",
            "0",
            "1",
            "--beam-size",
            "4",
            "--no-beam",
            "--out",
            str(tmp_path / "e"),
            "--device",
            "cpu",
        ]
    )
    sets = json.loads((tmp_path / "e" / "results.json").read_text())["sets"]
    sweep = sets["mini-dev"]["lm_sweep"]
    assert [(r["lm_weight"], r["word_score"]) for r in sweep] == [(0, 0), (0, 1), (2, 0), (2, 1)]
    best = min(sweep, key=lambda r: r["wer"])
    assert sets["mini-dev"]["lm"]["wer"] == best["wer"] and sets["mini-dev"]["lm"]["tuned_on"] == "mini-dev"
    test = sets["mini-test"]["lm"]
    assert "lm_sweep" not in sets["mini-test"] and test["tuned_on"] == "mini-dev"
    assert (test["lm_weight"], test["word_score"]) == (
        sets["mini-dev"]["lm"]["lm_weight"],
        sets["mini-dev"]["lm"]["word_score"],
    )
    assert "beam" not in sets["mini-test"]
    assert "<- chosen" in capsys.readouterr().out


def test_evaluate_bad_lm_arguments_exit_with_one_line(lm_setup, tmp_path):
    import evaluate

    ckpt, arpa = lm_setup
    common = ["--ckpt", str(ckpt), "--sets", "mini-test", "--out", str(tmp_path / "e"), "--device", "cpu"]
    for extra, message in (
        (["--lm", str(tmp_path / "none.arpa")], "error: LM .*none.arpa does not exist"),
        (["--lm", str(arpa), "--lm-weight", "heavy"], "error: --lm-weight 'heavy' is not a number"),
        (["--lm", str(arpa), "--word-score", "1", "x"], "error: --word-score 'x' is not a number"),
        (["--lm-weight", "1"], "error: --lm-weight and --word-score need --lm"),
    ):
        with pytest.raises(SystemExit, match=message) as e:
            evaluate.main(common + extra)
        assert "\n" not in str(e.value.code)
    assert not (tmp_path / "e" / "results.json").exists()


def test_corrupt_gzip_stream_is_one_clear_error(tmp_path):
    """A .gz whose deflate stream is damaged (a download without a pinned checksum) raises zlib.error
    inside gzip, not an OSError: it must still be one message naming the file."""
    import gzip
    import random

    from data.lm import gunzip

    payload = "\\n".join(f"-1.{i} WORD{i} -0.{i}" for i in range(20000)).encode()
    raw = bytearray(gzip.compress(payload))
    rng = random.Random(0)
    for i in range(len(raw) // 3, len(raw) // 3 + 64):
        raw[i] = rng.randrange(256)
    (tmp_path / "x.arpa.gz").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"x.arpa.gz: cannot decompress it"):
        gunzip(tmp_path / "x.arpa.gz", tmp_path / "x.arpa")
    assert not (tmp_path / "x.arpa").exists() and not list(tmp_path.glob(".x.arpa.*"))
