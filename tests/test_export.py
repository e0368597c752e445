"""ONNX export (models/export.py): ONNX Runtime equals PyTorch at several lengths and on a padded
batch for a baseline, a reuse plan and a plan whose groups differ in heads; the graph keeps the
reuse (the reuse layers read their computing layer's softmax); the CLI writes a usable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxscript", reason="the onnx extra is not installed (pip install '.[onnx]')")
pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")

from models import ConformerCTC  # noqa: E402
from models.export import attention_softmaxes, export_model, op_counts  # noqa: E402
from models.onnx_runtime import ATOL, compare, session  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(d_model=32, num_layers=4, ffn_dim=64, kernel_size=5, subsampling_channels=8, input_dim=80)
# plan -> readers (value products) of each computing layer's softmax
PLANS = {"1(H4)x4": [1, 1, 1, 1], "2(H4)x2": [2, 2], "2(H8)+1(H4)+1(H2)": [2, 1, 1]}


def tiny_model(plan: str) -> ConformerCTC:
    torch.manual_seed(0)
    model = ConformerCTC(17, reuse=plan, **TINY).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics, so that they are part of what is compared
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module", params=list(PLANS))
def exported(request, tmp_path_factory):
    """``(plan, model, path of its export, (state and output at 1031 frames before the export))``."""
    model = tiny_model(request.param)
    x = torch.randn(1, 1031, 80, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        before = model(x, torch.tensor([1031]))[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_model(model, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return request.param, model, path, (state, x, before)


def test_onnx_runtime_equals_pytorch(exported):
    """At 7 (the shortest), 64, 203 and 1031 fbank frames (1 to 256 encoder frames: PyTorch chunks its
    attention from 256 on, the graph never does) and on a padded batch of all four."""
    plan, model, path, _ = exported
    sess = session(path, threads=1)
    results = compare(model, sess)  # raises past ATOL
    assert [r["case"] for r in results] == ["T=7", "T=64", "T=203", "T=1031", "padded [1031, 203, 64, 7]"]
    assert all(r["max_abs_diff"] <= ATOL and r["lengths_equal"] for r in results), results
    # batch and time are symbolic in the graph
    features, lengths = sess.get_inputs()
    assert (features.name, lengths.name) == ("features", "lengths")
    assert isinstance(features.shape[0], str) and isinstance(features.shape[1], str) and features.shape[2] == 80
    assert [o.name for o in sess.get_outputs()] == ["log_probs", "out_lengths"]


def test_session_after_the_global_pool(exported):
    """Once the latency benchmark has made ONNX Runtime's global thread pool (it cannot be undone in
    a process), a session with its own threads is refused by ONNX Runtime; ``session`` must then use
    the global pool and still compute the model. In a subprocess: the pool would outlive this test."""
    import subprocess
    import sys

    plan, model, path, _ = exported
    code = (
        "import sys; from models.onnx_runtime import compare, session, shared_thread_pool; "
        "from tests.test_export import tiny_model; shared_thread_pool(1); "
        f"r = compare(tiny_model({plan!r}), session({str(path)!r}, threads=1)); "
        "print(max(x['max_abs_diff'] for x in r))"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert float(r.stdout.split()[-1]) <= ATOL


def test_graph_keeps_the_reuse_plan(exported):
    """One Softmax per computing layer (the CTC head's is a LogSoftmax), read by the value product of
    every layer of its group: the reuse layers consume the computing layer's map."""
    plan, model, path, _ = exported
    assert attention_softmaxes(path) == PLANS[plan]
    computing = sum(not p.reuses for p in model.plans)
    assert op_counts(path)["Softmax"] == computing and op_counts(path)["LogSoftmax"] == 1


def test_export_leaves_the_model_as_it_was(exported):
    """Exporting changes nothing in the eager model (weights, caches): its output is bit for bit the
    same afterwards, at a length where eager chunks its attention."""
    plan, model, path, (state, x, before) = exported
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.inference_mode():
        torch.testing.assert_close(model(x, torch.tensor([1031]))[0], before, rtol=0, atol=0)
    assert model.frontend.min_frames == 7


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    from tests.test_train import trained_checkpoint

    return trained_checkpoint(prepared, tmp_path_factory, "export_ckpt")


def test_cli_writes_model_sidecar_and_tokenizer(checkpoint, tmp_path, capsys):
    from data.tokenizer import Tokenizer
    from models.checkpoint import load_model
    from models.export import main

    info = main(["--ckpt", str(checkpoint), "--out", str(tmp_path / "onnx")])
    out = tmp_path / "onnx"
    assert {p.name for p in out.iterdir()} >= {"model.onnx", "model.json", "tokenizer.model", "tokens.txt"}
    sidecar = json.loads((out / "model.json").read_text())
    assert sidecar == json.loads(json.dumps(info))
    model, tokenizer, hp = load_model(checkpoint)
    assert sidecar["reuse"] == model.reuse and sidecar["vocab_size"] == model.vocab_size == len(sidecar["tokens"])
    assert sidecar["tokens"] == tokenizer.symbols() == (out / "tokens.txt").read_text().splitlines()
    assert sidecar["blank"] == 0
    assert Tokenizer(out / "tokenizer.model").digest == tokenizer.digest == sidecar["tokenizer"]["sha256"]
    assert sidecar["cmvn"] is not None and len(sidecar["cmvn"]["mean"]) == len(sidecar["cmvn"]["std"]) == 80
    assert sidecar["min_frames"] == 7 and sidecar["opset"] >= 18
    assert [r["max_abs_diff"] <= ATOL for r in sidecar["check"]] == [True] * 5
    assert sidecar["attention_softmaxes"] == [1] * model.num_layers
    assert "max |ONNX Runtime - PyTorch|" in capsys.readouterr().out


def test_cli_errors(tmp_path):
    from models.export import main

    with pytest.raises(SystemExit, match="error:"):
        main(["--ckpt", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "o")])


def test_export_tokens_table_decodes_a_model_in_another_order(prepared, tmp_path):
    """A model whose outputs follow another order than the SentencePiece ids (a converted ESPnet
    model: its ``token_list``) decodes by the export's rule: output ``i`` is line ``i`` of
    ``tokens.txt``, whose pieces SentencePiece joins (``tokenizer.model``), as the checkpoint's own
    tokenizer decodes them."""
    import random

    import sentencepiece as spm

    from data.tokenizer import Tokenizer
    from models.checkpoint import save_model_checkpoint
    from models.decoding import greedy_decode
    from models.export import main

    sp = spm.SentencePieceProcessor(model_file=str(prepared / "bpe.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if i != sp.unk_id()]
    random.Random(0).shuffle(pieces)
    tok = Tokenizer(prepared / "bpe.model", token_list=["<blank>", "<unk>", *pieces, "<sos/eos>"])
    torch.manual_seed(0)
    model = ConformerCTC(tok.vocab_size, reuse="1(H4)x2", **{**TINY, "num_layers": 2}).eval()
    with torch.no_grad():
        model.head.bias[0] = -10.0  # never blank: a long hypothesis
    hp = {
        "reuse": model.reuse,
        **{**TINY, "num_layers": 2},
        "tokenizer_path": str(prepared / "bpe.model"),
        "checkpoints": ["shuffled"],
        "cmvn": None,
    }
    save_model_checkpoint(tmp_path / "shuffled.ckpt", model, tok, hp)
    main(["--ckpt", str(tmp_path / "shuffled.ckpt"), "--out", str(tmp_path / "onnx"), "--no-check"])
    out = tmp_path / "onnx"
    table = (out / "tokens.txt").read_text().splitlines()
    sidecar = json.loads((out / "model.json").read_text())
    assert table == sidecar["tokens"] and len(table) == model.vocab_size and table[0] == "<blank>"
    assert "tokens.txt" in sidecar["tokenizer"]["decode"]
    x = torch.randn(1, 300, 80, generator=torch.Generator().manual_seed(0))
    log_probs, n = session(out / "model.onnx").run(None, {"features": x.numpy(), "lengths": [300]})
    ids = greedy_decode(torch.from_numpy(log_probs), torch.from_numpy(n))[0]
    assert len(ids) > 5
    by_rule = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model")).decode_pieces(
        [table[i] for i in ids if table[i] not in ("<blank>", "<sos/eos>")]
    )
    assert by_rule == tok.decode(ids)
    assert Tokenizer.open(out / "tokenizer.model").decode(ids) == tok.decode(ids)  # tokens.txt beside it


def test_evaluate_with_onnxruntime_engine_equals_torch(checkpoint, prepared, tmp_path, capsys):
    """evaluate.py --engine onnxruntime exports the checkpoint, checks the graph against PyTorch and
    decodes the manifest through ONNX Runtime with the same decoders: the same hypotheses and WERs
    as the torch engine."""
    import evaluate

    common = [
        "--ckpt",
        str(checkpoint),
        "--sets",
        "mini-test",
        "--data-dir",
        str(prepared),
        "--beam-size",
        "4",
        "--device",
        "cpu",
    ]
    evaluate.main([*common, "--out", str(tmp_path / "torch")])
    evaluate.main([*common, "--engine", "onnxruntime", "--out", str(tmp_path / "ort")])
    res = {e: json.loads((tmp_path / e / "results.json").read_text()) for e in ("torch", "ort")}
    assert res["ort"]["engine"] == "onnxruntime" and res["torch"]["engine"] == "torch"
    for dec in ("greedy", "beam"):
        assert res["ort"]["sets"]["mini-test"][dec]["wer"] == res["torch"]["sets"]["mini-test"][dec]["wer"]
    assert (tmp_path / "ort" / "mini-test.hyp.tsv").read_text() == (
        tmp_path / "torch" / "mini-test.hyp.tsv"
    ).read_text()
    assert res["ort"]["onnx_check"] and all(r["max_abs_diff"] <= ATOL for r in res["ort"]["onnx_check"])
    with pytest.raises(SystemExit, match="holds results of --engine torch; give another --out"):
        evaluate.main([*common, "--engine", "onnxruntime", "--no-beam", "--out", str(tmp_path / "torch")])
    with pytest.raises(SystemExit, match="error: --engine onnxruntime runs fp32 on the CPU"):
        evaluate.main([*common, "--engine", "onnxruntime", "--dtype", "bf16", "--out", str(tmp_path / "bad")])


def test_check_refuses_a_graph_that_differs(exported):
    """The one equality check (:func:`models.onnx_runtime.check_session`) fails a graph whose
    log-probabilities or lengths differ from the module's, naming the case."""
    from models.onnx_runtime import OnnxMismatch, check_inputs, check_session

    plan, model, path, _ = exported
    sess = session(path, threads=1)
    cases = check_inputs(80, (64,))
    assert check_session(model, sess, cases)[0]["lengths_equal"]

    def shifted(features, lengths):
        log_probs, out_lengths = model(features, lengths)
        return log_probs + 10 * ATOL, out_lengths

    def longer(features, lengths):
        log_probs, out_lengths = model(features, lengths)
        return log_probs, out_lengths + 1

    with pytest.raises(OnnxMismatch, match=r"on T=64: max \|diff\| 0.001"):
        check_session(shifted, sess, cases)
    with pytest.raises(OnnxMismatch, match="integer outputs"):
        check_session(longer, sess, cases)
    assert issubclass(OnnxMismatch, AssertionError)  # evaluate.py and the export CLI catch AssertionError
