"""ESPnet import (models.convert espnet, models.espnet, data.espnet_frontend) against espnet2's own
modules: DefaultFrontend + GlobalMVN + ConformerEncoder + CTC of espnet 202511, installed beside the
venv by ``make setup`` (skipped, saying so, where it is not importable).

Each test writes an ESPnet model folder as the zoo packs one (config.yaml with relative paths, a
.pth state dict of randomly initialised espnet2 modules, feats_stats.npz, bpe.model), converts it
and compares features, encoder outputs, CTC log-probabilities and greedy hypotheses.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

conformer_encoder = pytest.importorskip(
    "espnet2.asr.encoder.conformer_encoder",
    reason="espnet is not importable: `make setup` installs espnet 202511 beside the venv (--no-deps)",
)
from espnet2.asr.ctc import CTC  # noqa: E402
from espnet2.asr.frontend.default import DefaultFrontend  # noqa: E402
from espnet2.layers.global_mvn import GlobalMVN  # noqa: E402

CONFORMER_M = dict(
    output_size=256, attention_heads=4, linear_units=1024, num_blocks=16, cnn_module_kernel=31, input_layer="conv2d"
)
LIBRISPEECH_FRONTEND = dict(n_fft=512, hop_length=160)
# another size and every option that changes the arithmetic: heads, kernel, conv2d6 / conv2d8, the
# front end's window, Mel range and scale, no variance normalisation
SMALL = dict(
    output_size=96, attention_heads=2, linear_units=160, num_blocks=3, cnn_module_kernel=7, input_layer="conv2d6"
)
SMALL_FRONTEND = dict(
    n_fft=400, win_length=320, hop_length=128, n_mels=64, fmin=40, fmax=7600, htk=True, window="hamming"
)
TINY8 = dict(
    output_size=64, attention_heads=8, linear_units=128, num_blocks=2, cnn_module_kernel=5, input_layer="conv2d8"
)
ENCODER_OPTIONS = dict(
    macaron_style=True,
    rel_pos_type="latest",
    pos_enc_layer_type="rel_pos",
    selfattention_layer_type="rel_selfattn",
    activation_type="swish",
    use_cnn_module=True,
    normalize_before=True,
    dropout_rate=0.1,
    positional_dropout_rate=0.1,
    attention_dropout_rate=0.1,
)


def _bpe(folder: Path) -> Path:
    from data.tokenizer import Tokenizer

    texts = [
        "THE CAT SAT ON THE MAT",
        "A DOG RAN IN THE PARK",
        "SHE SAW THE SEA",
        "WE ARE HERE NOW",
        "HOW NOW BROWN COW",
        "PACK MY BOX WITH FIVE DOZEN LIQUOR JUGS",
        "THE QUICK FOX JUMPS",
    ] * 4
    return Path(Tokenizer.train(texts, folder / "bpe", vocab_size=40).path)


def make_espnet_folder(
    root: Path,
    encoder: dict,
    frontend: dict,
    norm_vars: bool = True,
    hybrid: bool = False,
    seed: int = 0,
    bpe: Path | None = None,
) -> dict:
    """An ESPnet model folder as the zoo unpacks one; returns the espnet2 modules and paths."""
    import sentencepiece as spm

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    token_dir, stats_dir, exp = root / "data" / "token_list", root / "exp" / "stats", root / "exp" / "asr_train"
    for d in (token_dir, stats_dir, exp):
        d.mkdir(parents=True, exist_ok=True)
    src = bpe or _bpe(root / "bpe_src")
    (token_dir / "bpe.model").write_bytes(Path(src).read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(token_dir / "bpe.model"))
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if i != sp.unk_id()]
    random.Random(seed).shuffle(pieces)  # ESPnet orders pieces by their frequency, not by id
    token_list = ["<blank>", "<unk>"] + pieces + ["<sos/eos>"]
    n_mels = frontend.get("n_mels", 80)
    count = 5000.0
    mean = rng.normal(-8, 2, n_mels)
    var = rng.uniform(1, 9, n_mels)
    np.savez(stats_dir / "feats_stats.npz", count=np.array(count), sum=mean * count, sum_square=(var + mean**2) * count)
    fe = DefaultFrontend(fs=16000, **frontend).eval()
    mvn = GlobalMVN(stats_dir / "feats_stats.npz", norm_vars=norm_vars).eval()
    enc = conformer_encoder.ConformerEncoder(n_mels, **ENCODER_OPTIONS, **encoder).eval()
    ctc = CTC(len(token_list), encoder["output_size"]).eval()
    with torch.no_grad():  # trained-like BatchNorm statistics (fresh ones are 0 / 1)
        for m in enc.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    state = {}
    for prefix, module in (("frontend.", fe), ("normalize.", mvn), ("encoder.", enc), ("ctc.", ctc)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    if hybrid:  # an attention decoder beside the CTC head (its weights do not matter here)
        state["decoder.embed.0.weight"] = torch.randn(len(token_list), encoder["output_size"])
        state["decoder.output_layer.weight"] = torch.randn(len(token_list), encoder["output_size"])
    torch.save(state, exp / "valid.acc.ave.pth")
    config = {
        "encoder": "conformer",
        "encoder_conf": {**ENCODER_OPTIONS, **encoder},
        "frontend": "default",
        "frontend_conf": dict(frontend),
        "normalize": "global_mvn",
        "normalize_conf": {"stats_file": "exp/stats/feats_stats.npz", "norm_vars": norm_vars},
        "token_type": "bpe",
        "bpemodel": "data/token_list/bpe.model",
        "token_list": token_list,
        "model_conf": {"ctc_weight": 0.3 if hybrid else 1.0},
        "decoder": "transformer" if hybrid else None,
        "specaug": "specaug",
        "input_size": None,
    }
    (exp / "config.yaml").write_text(yaml.safe_dump(config))
    return {
        "frontend": fe,
        "normalize": mvn,
        "encoder": enc,
        "ctc": ctc,
        "config": exp / "config.yaml",
        "model": exp / "valid.acc.ave.pth",
        "token_list": token_list,
        "bpe": token_dir / "bpe.model",
    }


def waves(n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Speech-like test signals of 0.9 to 2.1 s: harmonics with a moving pitch, plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        samples = int(16000 * (0.9 + 0.6 * i))
        t = torch.arange(samples) / 16000
        f0 = 110 + 40 * torch.sin(2 * torch.pi * 0.7 * t)
        phase = 2 * torch.pi * torch.cumsum(f0, 0) / 16000
        x = sum(torch.sin(k * phase) / k for k in range(1, 8)) * 0.1 + 0.01 * torch.randn(samples, generator=g)
        out.append(x.float())
    return out


def espnet_outputs(ref: dict, wave: torch.Tensor) -> dict:
    with torch.no_grad():
        x, n = wave[None], torch.tensor([wave.numel()])
        feats, flens = ref["frontend"](x, n)
        normed, _ = ref["normalize"](feats.clone(), flens)
        enc, elens, _ = ref["encoder"](normed, flens)
        return {
            "feats": feats[0],
            "enc": enc[0],
            "log_probs": ref["ctc"].log_softmax(enc)[0],
            "greedy": [int(t) for t in torch.unique_consecutive(ref["ctc"].argmax(enc)[0]) if t != 0],
        }


def ours(ckpt: Path, wave: torch.Tensor) -> dict:
    from models.checkpoint import load_model, model_inputs
    from models.decoding import greedy_decode

    model, tokenizer, hp = load_model(ckpt)
    cmvn, featurizer, _ = model_inputs(model, hp)
    with torch.no_grad():
        feats = featurizer(wave)
        x = cmvn(feats)[None]
        n = torch.tensor([feats.shape[0]])
        enc = model.encode(x, n)
        log_probs, lengths = model(x, n)
    return {
        "feats": feats,
        "enc": enc.output[0],
        "log_probs": log_probs[0],
        "greedy": greedy_decode(log_probs, lengths)[0],
        "tokenizer": tokenizer,
        "model": model,
    }


def _convert(ref: dict, out: Path, **kw) -> dict:
    from models.convert import convert_espnet

    return convert_espnet(ref["config"], ref["model"], out, **kw)


@pytest.mark.parametrize(
    "encoder,frontend,norm_vars",
    [(CONFORMER_M, LIBRISPEECH_FRONTEND, True), (SMALL, SMALL_FRONTEND, False), (TINY8, {}, True)],
    ids=["conformer-m", "small-conv2d6", "tiny-conv2d8"],
)
def test_converted_model_equals_espnet(tmp_path, encoder, frontend, norm_vars):
    """Features, encoder output, CTC log-probabilities and greedy hypotheses equal espnet2's
    within 1e-4 on the same waveforms."""
    ref = make_espnet_folder(tmp_path / "zoo", encoder, frontend, norm_vars=norm_vars)
    record = _convert(ref, tmp_path / "converted")
    assert record["model"]["input_layer"] == encoder["input_layer"]
    from espnet2.text.sentencepiece_tokenizer import SentencepiecesTokenizer
    from espnet2.text.token_id_converter import TokenIDConverter

    from data.tokenizer import Tokenizer

    converter, sp = TokenIDConverter(ref["token_list"]), SentencepiecesTokenizer(str(ref["bpe"]))
    for wave in waves():
        want = espnet_outputs(ref, wave)
        got = ours(tmp_path / "converted" / "model.ckpt", wave)
        assert got["feats"].shape == want["feats"].shape
        torch.testing.assert_close(got["feats"], want["feats"], atol=1e-4, rtol=1e-5)
        assert got["enc"].shape == want["enc"].shape
        torch.testing.assert_close(got["enc"], want["enc"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=1e-4, rtol=1e-4)
        assert got["greedy"] == want["greedy"]
        tok: Tokenizer = got["tokenizer"]
        assert tok.decode(got["greedy"]) == sp.tokens2text(
            [t for t in converter.ids2tokens(want["greedy"]) if t not in ("<blank>", "<sos/eos>")]
        )


def test_frontend_alone_equals_espnet_default_frontend():
    """``EspnetFrontend`` (torchaudio Mel filters, no librosa) == espnet2's ``DefaultFrontend``
    (librosa's), batched with padding too; and the Mel matrix equals librosa's."""
    from data.espnet_frontend import EspnetFrontend

    for conf in ({}, LIBRISPEECH_FRONTEND, SMALL_FRONTEND, dict(n_fft=256, hop_length=64, n_mels=40, center=False)):
        ref, ours_fe = DefaultFrontend(fs=16000, **conf).eval(), EspnetFrontend(**conf)
        torch.testing.assert_close(ours_fe.melmat, ref.logmel.melmat, atol=1e-6, rtol=1e-5)
        w = waves(2)
        batch = torch.zeros(2, w[1].numel())
        batch[0, : w[0].numel()], batch[1] = w[0], w[1]
        lengths = torch.tensor([w[0].numel(), w[1].numel()])
        with torch.no_grad():
            want, want_n = ref(batch, lengths)
        got, got_n = ours_fe.batch(batch, lengths)
        assert got_n.tolist() == want_n.tolist() == [ours_fe.num_frames(int(n)) for n in lengths]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_global_mvn_equals_espnet(tmp_path):
    from data.espnet_frontend import global_mvn

    rng = np.random.default_rng(0)
    count, mean, var = 700.0, rng.normal(0, 3, 20), rng.uniform(0.1, 4, 20)
    np.savez(tmp_path / "s.npz", count=np.array(count), sum=mean * count, sum_square=(var + mean**2) * count)
    np.save(tmp_path / "kaldi.npy", np.stack([np.append(mean * count, count), np.append((var + mean**2) * count, 0)]))
    x = torch.randn(1, 9, 20) * 3
    for path in ("s.npz", "kaldi.npy"):
        for means, variances in ((True, True), (True, False), (False, True)):
            want, _ = GlobalMVN(tmp_path / path, norm_means=means, norm_vars=variances)(x.clone(), torch.tensor([9]))
            got = global_mvn(tmp_path / path, means, variances)(x)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_espnet_peer_equals_ours():
    """espnet2's encoder holding our baseline's weights (the latency peer) computes our function."""
    from models.ctc import ConformerCTC
    from models.espnet import ConversionError, espnet_peer

    torch.manual_seed(0)
    for kw in (
        dict(d_model=64, num_layers=3, ffn_dim=128, kernel_size=7, reuse="1(H4)x3", subsampling_channels=64),
        dict(
            d_model=64,
            num_layers=2,
            ffn_dim=96,
            kernel_size=5,
            reuse="1(H2)x2",
            subsampling_channels=64,
            layer_norm_eps=1e-12,
            final_norm=True,
            input_layer="conv2d8",
        ),
    ):
        model = ConformerCTC(11, **kw).eval()
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.BatchNorm1d):
                    m.running_mean.normal_(0, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
        peer = espnet_peer(model)
        x, n = torch.randn(1, 300, 80), torch.tensor([300])
        with torch.no_grad():
            out, lengths = peer(x, n)
            enc = model.encode(x, n)
        assert lengths.tolist() == enc.lengths.tolist()
        torch.testing.assert_close(out, enc.output, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConversionError, match="only a baseline"):
        espnet_peer(ConformerCTC(11, d_model=64, num_layers=2, ffn_dim=96, reuse="2(H4)x1", subsampling_channels=64))


def test_hybrid_model_keeps_encoder_and_ctc_and_notes_the_decoder(tmp_path):
    ref = make_espnet_folder(tmp_path / "zoo", TINY8, {}, hybrid=True)
    record = _convert(ref, tmp_path / "out")
    assert any("attention decoder" in n and "ignored" in n for n in record["notes"])
    want = espnet_outputs(ref, waves(1)[0])
    got = ours(tmp_path / "out" / "model.ckpt", waves(1)[0])
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=1e-4, rtol=1e-4)
    saved = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert saved["vocab_size"] == len(ref["token_list"]) and saved["notes"] == record["notes"]
    assert (tmp_path / "out" / "tokens.txt").read_text().split() == ref["token_list"]


def _edit_config(ref: dict, **changes) -> None:
    config = yaml.safe_load(ref["config"].read_text())
    for key, value in changes.items():
        section, _, option = key.partition("__")
        if option:
            config[section][option] = value
        else:
            config[section] = value
    ref["config"].write_text(yaml.safe_dump(config))


@pytest.mark.parametrize(
    "change,message",
    [
        ({"encoder": "transformer"}, r"encoder: 'transformer' is not supported"),
        ({"encoder_conf__rel_pos_type": "legacy"}, r"rel_pos_type: 'legacy' is not supported"),
        ({"encoder_conf__interctc_layer_idx": [1]}, r"interctc_layer_idx: \[1\] is not supported"),
        ({"encoder_conf__macaron_style": False}, r"macaron_style: False is not supported"),
        ({"encoder_conf__concat_after": True}, r"concat_after: True is not supported"),
        ({"encoder_conf__input_layer": "linear"}, r"input_layer: 'linear' is not supported"),
        ({"encoder_conf__shiny_option": 3}, r"option 'shiny_option' is not known"),
        ({"encoder_conf__num_blocks": 3}, r"lacks 'encoder.encoders.2."),
        ({"encoder_conf__linear_units": 100}, r"feed_forward.*shape"),
        ({"frontend": "s3prl"}, r"frontend: 's3prl' is not supported"),
        ({"frontend_conf__n_mels": 64}, r"(shape|melmat)"),
        ({"normalize": "utterance_mvn"}, r"normalize: 'utterance_mvn' is not supported"),
        ({"token_type": "char"}, r"token_type: 'char' is not supported"),
        ({"preencoder": "sinc"}, r"preencoder: 'sinc' is not supported"),
    ],
)
def test_unsupported_options_are_refused_by_name(tmp_path, change, message):
    from models.espnet import ConversionError

    ref = make_espnet_folder(tmp_path / "zoo", TINY8, {})
    _edit_config(ref, **change)
    with pytest.raises(ConversionError, match=message):
        _convert(ref, tmp_path / "out")


def test_refusals_of_files(tmp_path):
    from models.espnet import ConversionError

    ref = make_espnet_folder(tmp_path / "zoo", TINY8, {})
    state = torch.load(ref["model"])
    torch.save({k: v for k, v in state.items() if not k.startswith("ctc.")}, tmp_path / "noctc.pth")
    with pytest.raises(ConversionError, match="no CTC head"):
        from models.convert import convert_espnet

        convert_espnet(ref["config"], tmp_path / "noctc.pth", tmp_path / "o1")
    torch.save({**state, "postencoder.linear.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    with pytest.raises(ConversionError, match="'postencoder.linear.weight' is not part of"):
        convert_espnet(ref["config"], tmp_path / "extra.pth", tmp_path / "o2")
    with pytest.raises(FileNotFoundError, match="stats file nowhere.npz: not found"):
        convert_espnet(ref["config"], ref["model"], tmp_path / "o3", stats="nowhere.npz")
    (tmp_path / "bad.yaml").write_text("encoder: [unclosed")
    with pytest.raises(ValueError, match="bad.yaml: not a readable ESPnet config"):
        convert_espnet(tmp_path / "bad.yaml", ref["model"], tmp_path / "o4")
    # statistics of another model, while the .pth holds the model's own
    np.savez(tmp_path / "other.npz", count=np.array(10.0), sum=np.ones(80) * 50, sum_square=np.ones(80) * 900)
    with pytest.raises(ConversionError, match="other.npz: its mean differs from normalize.mean"):
        convert_espnet(ref["config"], ref["model"], tmp_path / "o5", stats=str(tmp_path / "other.npz"))


@pytest.fixture(scope="module")
def converted_mini(prepared, tmp_path_factory) -> Path:
    """An ESPnet folder built on the mini corpus's BPE model, converted by the CLI."""
    tmp = tmp_path_factory.mktemp("espnet_mini")
    ref = make_espnet_folder(
        tmp / "zoo",
        dict(
            output_size=64, attention_heads=4, linear_units=128, num_blocks=3, cnn_module_kernel=5, input_layer="conv2d"
        ),
        LIBRISPEECH_FRONTEND,
        bpe=prepared / "bpe.model",
    )
    out = tmp / "converted"
    run = [
        sys.executable,
        "-m",
        "models.convert",
        "espnet",
        "--config",
        str(ref["config"]),
        "--model",
        str(ref["model"]),
        "--out",
        str(out),
    ]
    r = subprocess.run(run, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "converted" in r.stdout and "3 blocks" in r.stdout
    return out


def test_end_to_end_evaluate_report_suggest_and_retrofit(prepared, converted_mini, tmp_path):
    """A converted ESPnet folder (built on the mini corpus's BPE model) runs through evaluate.py,
    the analysis report, suggest-reuse and the retrofit, unchanged."""
    from models.checkpoint import load_model
    from models.retrofit import retrofit

    ckpt = converted_mini / "model.ckpt"
    r = subprocess.run(
        [
            sys.executable,
            "evaluate.py",
            "--ckpt",
            str(ckpt),
            "--sets",
            "mini-test",
            "--data-dir",
            str(prepared),
            "--beam-size",
            "4",
            "--out",
            str(tmp_path / "eval"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "eval" / "results.json").read_text())["sets"]["mini-test"]
    assert res["greedy"]["words"] > 0 and res["skipped"] == []
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis",
            "report",
            "--ckpt",
            str(ckpt),
            "--manifest",
            "mini-test",
            "--data-dir",
            str(prepared),
            "--probe-train",
            "mini-dev",
            "--probe-epochs",
            "2",
            "--out",
            str(tmp_path / "report"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert set(report["figures"]) >= {"cad", "par", "heads", "probe", "ablation", "mixing"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "analysis",
            "suggest-reuse",
            "--ckpt",
            str(ckpt),
            "--manifest",
            "mini-dev",
            "--data-dir",
            str(prepared),
            "--out",
            str(tmp_path / "suggest"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    base, _, _ = load_model(ckpt)
    new = retrofit(base, "2(H4)+1(H4)")
    assert new.config["layer_norm_eps"] == 1e-12 and new.config["final_norm"] and new.config["input_layer"] == "conv2d"


def test_label_framing_follows_the_model_frame_rate(tmp_path):
    """Frame labels of a conv2d6 model over 8 ms STFT frames: frame m is centred on feature frame
    6 m + 5 (receptive field 11), at (6 m + 5) * 8 ms with ``center=True``."""
    from models.checkpoint import model_inputs
    from models.ctc import ConformerCTC

    model = ConformerCTC(
        5,
        d_model=32,
        num_layers=1,
        ffn_dim=32,
        kernel_size=3,
        reuse="1(H2)x1",
        subsampling_channels=32,
        input_layer="conv2d6",
        input_dim=80,
    )
    hp = {
        "features": {"type": "espnet", "config": {"fs": 16000, "n_fft": 512, "hop_length": 128}},
        "cmvn": {"mean": torch.zeros(80), "std": torch.ones(80)},
        "checkpoints": ["x"],
    }
    _, featurizer, framing = model_inputs(model, hp)
    assert framing.min_frames == 11 and framing.count(11) == 1 and framing.count(16) == 1 and framing.count(17) == 2
    centres = [m * framing.shift + framing.window / 2 for m in range(3)]
    assert centres == pytest.approx([(6 * m + 5) * 0.008 for m in range(3)])
    assert featurizer.num_frames(16000) == 1 + 16000 // 128
    # ours: 40 ms frames, centred on fbank frame 4 m + 3 (its 25 ms window starts at 10 ms steps)
    ours_model = ConformerCTC(
        5, d_model=32, num_layers=1, ffn_dim=32, kernel_size=3, reuse="1(H2)x1", subsampling_channels=32
    )
    _, none, framing = model_inputs(ours_model, {**hp, "features": None})
    assert none is None and framing.shift == pytest.approx(0.04) and framing.window == pytest.approx(0.085)


def test_fine_tune_a_converted_model(mini_corpus, prepared, converted_mini, tmp_path):
    """data.prepare --inputs takes the converted model's tokenizer (in ESPnet's order), CMVN and
    front end; train.py fits from it (init_from, with model.yaml's options and a reuse plan) on
    ESPnet's features, and its checkpoints carry them on."""
    import yaml as _yaml

    from data.datamodule import ASRDataModule
    from data.espnet_frontend import EspnetFrontend
    from data.prepare import prepare
    from models.checkpoint import load_model, model_inputs
    from tests.test_train import _fit

    data = tmp_path / "data"
    prepare(mini_corpus, data, subsets=["mini-train", "mini-dev"], progress=False, inputs=converted_mini)
    assert (data / "tokens.txt").read_text() == (converted_mini / "tokens.txt").read_text()
    dm = ASRDataModule(str(data), ["mini-train"], ["mini-dev"], max_frames=2500, num_workers=0)
    assert isinstance(dm.featurizer, EspnetFrontend) and dm.tokenizer.token_list is not None
    ds = dm.dataset(["mini-dev"])
    first = ds.entries[0]
    from data.features import GlobalCMVN, load_audio

    want = GlobalCMVN.load(converted_mini / "cmvn.json")(
        EspnetFrontend(**json.loads((converted_mini / "features.json").read_text())["config"])(
            load_audio(first["audio"])
        )
    )
    torch.testing.assert_close(ds[0]["features"], want)
    assert ds[0]["targets"].tolist() == dm.tokenizer.encode(first["text"])
    options = _yaml.safe_load((converted_mini / "model.yaml").read_text())["model"]
    assert options["init_from"] == str((converted_mini / "model.ckpt").resolve()) and options["final_norm"]
    _, module, _ = _fit(data, tmp_path / "run", max_steps=2, limit=2, **{**options, "reuse": "2(H4)+1(H4)"})
    model, tokenizer, hp = load_model(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert model.reuse == "2(H4)+1(H4)" and model.config["layer_norm_eps"] == 1e-12
    assert tokenizer.token_list == (converted_mini / "tokens.txt").read_text().split()
    _, featurizer, _ = model_inputs(model, hp)
    assert isinstance(featurizer, EspnetFrontend)
    assert featurizer.num_frames(round(first["duration"] * 16000)) > 0
    # a folder prepared with our own tokenizer order (the same BPE model, no tokens.txt) is refused
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        _fit(prepared, tmp_path / "refused", max_steps=1, limit=1, **options)


@pytest.mark.parametrize("input_layer", ["conv2d", "conv2d6", "conv2d8"])
@pytest.mark.parametrize("layout", ["out.0.", "out."])
def test_every_espnet_layout_of_the_subsampling_output_is_accepted(tmp_path, input_layer, layout):
    """ESPnet has stored the front end's output projection as ``encoder.embed.out.0.*`` (a
    Sequential with the positional encoding: every variant in releases up to 2023, conv2d /
    conv2d6 in 202511) and as ``encoder.embed.out.*`` (conv2d8 in 202511, every variant where
    the positional encoding stands alone); either converts to the same function."""
    ref = make_espnet_folder(
        tmp_path / "zoo",
        dict(
            output_size=32,
            attention_heads=2,
            linear_units=48,
            num_blocks=1,
            cnn_module_kernel=3,
            input_layer=input_layer,
        ),
        {},
    )
    state = torch.load(ref["model"])
    old = [k for k in state if k.startswith("encoder.embed.out.")]
    assert old
    state = {("encoder.embed." + layout + k.rsplit(".", 1)[1] if k in old else k): v for k, v in state.items()}
    torch.save(state, tmp_path / "layout.pth")
    from models.convert import convert_espnet

    convert_espnet(ref["config"], tmp_path / "layout.pth", tmp_path / "out")
    want = espnet_outputs(ref, waves(1)[0])
    got = ours(tmp_path / "out" / "model.ckpt", waves(1)[0])
    torch.testing.assert_close(got["log_probs"], want["log_probs"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("norm_means", [True, False])
def test_statistics_file_of_another_model_is_refused_by_its_std(tmp_path, norm_means):
    """A stats file with the model's mean but another variance (or any statistics where
    ``norm_means: false``) is not the model's: both of ``normalize.mean`` / ``normalize.std``
    are compared, whatever the config normalises."""
    from models.convert import convert_espnet
    from models.espnet import ConversionError

    ref = make_espnet_folder(tmp_path / "zoo", TINY8, {})
    _edit_config(ref, normalize_conf__norm_means=norm_means)
    state = torch.load(ref["model"])
    mean, var = state["normalize.mean"].double().numpy(), state["normalize.std"].double().numpy() ** 2
    np.savez(tmp_path / "other.npz", count=np.array(10.0), sum=mean * 10, sum_square=(4 * var + mean**2) * 10)
    with pytest.raises(ConversionError, match="other.npz: its standard deviation differs from normalize.std"):
        convert_espnet(ref["config"], ref["model"], tmp_path / "o", stats=str(tmp_path / "other.npz"))
    np.savez(tmp_path / "own.npz", count=np.array(10.0), sum=mean * 10, sum_square=(var + mean**2) * 10)
    convert_espnet(ref["config"], ref["model"], tmp_path / "o", stats=str(tmp_path / "own.npz"))


def test_padded_batch_differs_from_espnet_as_documented():
    """Equality with espnet2 202511 holds per utterance (batch 1). In a padded batch ESPnet's mask
    slicing ``x_mask[:, :, :-2:2][:, :, :-2:2]`` keeps one frame more for a padded utterance (100
    frames padded to 200: 25 encoder frames there, 24 here and in its own batch of 1), and its
    convolution module does not zero padded frames, so its padded utterance's output changes with
    the padding; ours does not (docs/espnet.md, "Padded batches")."""
    from models.ctc import ConformerCTC
    from models.espnet import espnet_peer

    torch.manual_seed(0)
    model = ConformerCTC(
        11,
        d_model=32,
        num_layers=2,
        ffn_dim=48,
        kernel_size=5,
        reuse="1(H2)x2",
        subsampling_channels=32,
        layer_norm_eps=1e-12,
        final_norm=True,
    ).eval()
    peer = espnet_peer(model)
    x = torch.randn(2, 200, 80)
    x[0, 100:] = 0
    lengths = torch.tensor([100, 200])
    with torch.no_grad():
        theirs, theirs_n = peer(x, lengths)
        alone, alone_n = peer(x[:1, :100], lengths[:1])
        enc = model.encode(x, lengths)
        ours_alone = model.encode(x[:1, :100], lengths[:1])
    assert theirs_n.tolist() == [25, 49] and alone_n.tolist() == [24]
    assert enc.lengths.tolist() == [24, 49] and ours_alone.lengths.tolist() == [24]
    torch.testing.assert_close(ours_alone.output, alone, atol=1e-5, rtol=1e-5)  # batch 1: equal
    torch.testing.assert_close(enc.output[:1, :24], ours_alone.output, atol=1e-5, rtol=1e-5)  # ours: padding-free
    assert (theirs[0, :24] - alone[0]).abs().max() > 1e-3  # theirs: the padding leaks in
