"""Retrofit (models/retrofit.py): a baseline converted to a reuse plan computes the baseline's
zero-shot reuse, its new value half learns, and the checkpoint works everywhere."""

from __future__ import annotations

import json

import pytest
import torch
from test_train import TINY, Recorder, _fit, trained_checkpoint

import evaluate
from models import ConformerCTC
from models.retrofit import main as retrofit_main
from models.retrofit import retrofit, zero_shot_sources
from training.module import CTCModule

SMALL = dict(d_model=32, ffn_dim=64, kernel_size=5, subsampling_channels=8)


def _trained_like(plan: str, layers: int) -> ConformerCTC:
    torch.manual_seed(1)
    model = ConformerCTC(20, num_layers=layers, reuse=plan, **SMALL)
    with torch.no_grad():  # BatchNorm statistics of a trained model, not the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize(
    "base_plan, plan",
    [
        ("1(H4)x4", "2(H4)x2"),
        ("1(H4)x4", "3(H4)+1(H4)"),
        ("1(H4)x4", "4(H4)"),
        ("1(H8)x2+1(H4)x2", "2(H8)+2(H4)"),
        ("1(H2)x6", "1(H2)+3(H2)+2(H2)"),
    ],
)
def test_converted_model_is_the_baselines_zero_shot_reuse(base_plan, plan):
    layers = sum(int(t.split("(")[0]) * (int(t.split("x")[1]) if "x" in t else 1) for t in base_plan.split("+"))
    base = _trained_like(base_plan, layers)
    new = retrofit(base, plan)
    assert new.reuse == plan and sum(p.numel() for p in new.parameters()) < sum(p.numel() for p in base.parameters())
    g = torch.Generator().manual_seed(0)
    x, n = torch.randn(2, 150, 80, generator=g), torch.tensor([150, 111])
    with torch.no_grad():
        expected, _ = base(x, n, map_sources=zero_shot_sources(plan, layers))
        got, _ = new(x, n)
        plain, _ = base(x, n)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the plan does change the function


def test_the_new_value_half_learns():
    base = _trained_like("1(H4)x4", 4)
    new = retrofit(base, "2(H4)x2").train()
    x, n = torch.randn(2, 120, 80), torch.tensor([120, 90])
    log_probs, lengths = new(x, n)
    log_probs.sum().backward()
    attn = new.encoder.layers[1].self_attn  # a reuse layer
    dk = 32 // 4
    new_cols = torch.cat([torch.arange(2 * h * dk + dk, 2 * (h + 1) * dk) for h in range(4)])
    assert attn.linear_out.weight.grad[:, new_cols].abs().sum() > 0  # W_O's new (zero) columns learn first
    assert torch.count_nonzero(attn.linear_out.weight[:, new_cols]) == 0
    assert attn.linear_v.weight[new_cols].abs().sum() > 0  # random, not zero: no symmetric trap


def test_bad_plans_are_refused():
    base = _trained_like("1(H8)x2+1(H4)x2", 4)
    with pytest.raises(ValueError, match="gives layer 0 4 heads; the baseline.s layer 0 has 8"):
        retrofit(base, "2(H4)x2")
    with pytest.raises(ValueError, match="has 3 layers; the encoder has 4"):
        retrofit(base, "3(H8)")
    with pytest.raises(ValueError, match="is a reuse model"):
        retrofit(retrofit(base, "2(H8)+2(H4)"), "4(H8)")


@pytest.fixture(scope="module")
def baseline(prepared, tmp_path_factory):
    return trained_checkpoint(prepared, tmp_path_factory, "retrofit_base", max_epochs=2, reuse="1(H2)x4", num_layers=4)


def test_converted_checkpoint_evaluates_and_analyses(prepared, baseline, tmp_path, capsys):
    from analysis.report import Report
    from models.checkpoint import load_model

    out = tmp_path / "retro.ckpt"
    retrofit_main(["--ckpt", str(baseline), "--reuse", "2(H2)x2", "--out", str(out)])
    assert "1(H2)x4 -> 2(H2)x2" in capsys.readouterr().out
    model, tok, hp = load_model(out)
    assert model.reuse == "2(H2)x2" and hp["retrofit_from"] == str(baseline) and hp["cmvn"] is not None
    evaluate.main(["--ckpt", str(out), "--sets", "mini-test", "--no-beam", "--out", str(tmp_path / "e")])
    assert json.loads((tmp_path / "e" / "results.json").read_text())["reuse"] == "2(H2)x2"
    r = Report(str(out), "mini-test", str(tmp_path / "r"), reference=str(baseline), progress=False).run(["cad", "par"])
    assert len(r["par"]["coverage_per_layer"]) == 4 and r["par"]["reference"].startswith(str(baseline))
    with pytest.raises(SystemExit, match="gives layer 0 4 heads"):
        retrofit_main(["--ckpt", str(baseline), "--reuse", "2(H4)x2", "--out", str(tmp_path / "bad.ckpt")])


def test_fit_from_a_baseline_and_resume(prepared, baseline, tmp_path):
    from models.checkpoint import load_model

    kw = dict(reuse="2(H2)x2", num_layers=4, init_from=str(baseline))
    module = CTCModule(str(prepared / "bpe.model"), **{**TINY, **kw})
    base, _, _ = load_model(baseline)
    expected = retrofit(base, "2(H2)x2").state_dict()
    for k, v in module.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    full = Recorder()
    _fit(prepared, tmp_path / "full", max_epochs=2, limit=3, recorder=full, **kw)
    _fit(prepared, tmp_path / "cut", max_epochs=2, limit=3, stop_at=4, **kw)
    resumed = Recorder()
    _fit(
        prepared,
        tmp_path / "cut",
        max_epochs=2,
        limit=3,
        recorder=resumed,
        ckpt_path=str(tmp_path / "cut" / "checkpoints" / "last.ckpt"),
        **kw,
    )
    assert resumed.losses == pytest.approx(full.losses[4:], abs=1e-5)


def test_init_from_mismatches_are_refused(prepared, baseline, tmp_path):
    from data.tokenizer import Tokenizer

    with pytest.raises(ValueError, match="not this recipe's size .*d_model 32 vs 48"):
        CTCModule(
            str(prepared / "bpe.model"),
            **{**TINY, "reuse": "2(H2)x2", "num_layers": 4, "d_model": 48, "init_from": str(baseline)},
        )
    other = Tokenizer.train(["SOME OTHER TEXT", "MORE WORDS HERE"], tmp_path / "other", vocab_size=30)
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        CTCModule(other.path, **{**TINY, "reuse": "2(H2)x2", "num_layers": 4, "init_from": str(baseline)})


def _base_checkpoint(prepared, path, was_gamma=None, cmvn_shift=0.0, features=None):
    """A 4-layer baseline checkpoint (trained-like BatchNorm) for the prepared folder's tokenizer,
    with the folder's CMVN statistics (shifted by ``cmvn_shift``) and a feature record."""
    from data.features import GlobalCMVN
    from data.tokenizer import Tokenizer
    from models.checkpoint import save_model_checkpoint

    tok = Tokenizer(prepared / "bpe.model")
    torch.manual_seed(1)
    model = ConformerCTC(tok.vocab_size, num_layers=4, reuse="1(H2)x4", was_gamma=was_gamma, **SMALL)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    cmvn = GlobalCMVN.load(prepared / "cmvn.json")
    hp = {
        "reuse": model.reuse,
        "num_layers": 4,
        "was_gamma": was_gamma,
        **SMALL,
        "checkpoints": [str(path)],
        "tokenizer_path": str(prepared / "bpe.model"),
        "cmvn": {"mean": cmvn.mean + cmvn_shift, "std": cmvn.std.clone()},
        "features": features,
    }
    save_model_checkpoint(path, model.eval(), tok, hp)
    return path


def test_init_from_starts_from_the_zero_shot_reuse(prepared, tmp_path):
    """train.py --model.init_from with a plan: the module's first forward on the data module's first
    batch (the data folder's features and CMVN) is the checkpoint's zero-shot reuse on the features
    the checkpoint itself takes (its own CMVN), as models.retrofit's checkpoint computes it."""
    from data.datamodule import ASRDataModule
    from data.dataset import ManifestDataset, collate
    from models.checkpoint import load_model, model_inputs

    ckpt = _base_checkpoint(prepared, tmp_path / "base.ckpt", was_gamma=0.5)
    kw = {**TINY, **SMALL, "reuse": "2(H2)x2", "num_layers": 4, "was_gamma": 0.5, "init_from": str(ckpt)}
    module = CTCModule(str(prepared / "bpe.model"), **kw).eval()
    dm = ASRDataModule(str(prepared), ["mini-train"], ["mini-dev"], max_frames=2500, num_workers=0)
    ours_ds = dm.dataset(["mini-dev"])
    base, tok, hp = load_model(ckpt)
    cmvn, featurizer, framing = model_inputs(base, hp)
    theirs_ds = ManifestDataset(ours_ds.manifests, tokenizer=tok, cmvn=cmvn, featurizer=featurizer, framing=framing)
    ours_batch, theirs_batch = collate([ours_ds[0], ours_ds[1]]), collate([theirs_ds[0], theirs_ds[1]])
    with torch.no_grad():
        got, _ = module.model(ours_batch["features"], ours_batch["feature_lengths"])
        want, _ = base(
            theirs_batch["features"], theirs_batch["feature_lengths"], map_sources=zero_shot_sources("2(H2)x2", 4)
        )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change,message",
    [
        ({"was_gamma": 0.5}, r"was_gamma 0.5 vs None"),
        ({"cmvn_shift": 0.3}, r"CMVN statistics differ from .*cmvn.json"),
        (
            {"features": {"type": "espnet", "config": {"fs": 16000}, "min_frames": 7}},
            r"front end \(features 'espnet'\) differs from .*the data folder's \(fbank\)",
        ),
    ],
)
def test_init_from_refuses_what_changes_the_function(prepared, tmp_path, change, message):
    """A recipe that would not start from the checkpoint's function is refused by train.py, naming
    the difference: another was_gamma (the retrofit tool keeps the checkpoint's), CMVN statistics
    or front end of the data folder other than the checkpoint's."""
    ckpt = _base_checkpoint(prepared, tmp_path / "base.ckpt", **change)
    with pytest.raises(ValueError, match=f"--model.init_from {ckpt}: .*{message}"):
        CTCModule(
            str(prepared / "bpe.model"),
            **{**TINY, **SMALL, "reuse": "2(H2)x2", "num_layers": 4, "init_from": str(ckpt)},
        )
