"""TERA / Mockingjay through s3prl's own classes, behind our capture interface (the analyses of Gopinath &
Rodriguez, "Probing self-attention in self-supervised speech models for cross-linguistic differences")."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("s3prl.upstream.mockingjay.model", reason="s3prl is not installed: pip install '.[s3prl]'")

from analysis.head_types import classify_heads, head_scores  # noqa: E402
from analysis.upstreams import S3PRL_HELP, TeraUpstream, build_random_tera  # noqa: E402


@pytest.fixture(scope="module")
def tera_ckpt(tmp_path_factory):
    states, _ = build_random_tera(num_layers=3, num_heads=12, hidden_size=768)  # the TERA size those analyses use
    path = tmp_path_factory.mktemp("tera") / "states-1000000.ckpt"
    torch.save(states, path)
    return path


@pytest.fixture(scope="module")
def wave():
    g = torch.Generator().manual_seed(0)
    t = torch.arange(16000) / 16000
    return 0.1 * torch.sin(2 * torch.pi * 220 * t) + 0.02 * torch.randn(16000, generator=g)


def test_load_maps_hidden_states_and_scores(tera_ckpt, wave):
    tera = TeraUpstream.from_checkpoint(tera_ckpt)
    assert (tera.num_layers, tera.num_heads, tera.d_model) == (3, [12] * 3, 768)
    feats = tera.features(wave)
    assert feats.shape == (101, tera.input_dim)
    with torch.no_grad():
        enc = tera.encode(feats[None], torch.tensor([101]), return_attentions=True, return_hidden_states=True)
    assert len(enc.attentions) == 3 and len(enc.hidden_states) == 4
    for a in enc.attentions:
        assert a.shape == (1, 12, 101, 101)
        assert torch.allclose(a.sum(-1), torch.ones(()), atol=1e-5) and (a >= 0).all()
    G, V, D = head_scores(torch.stack([a[0] for a in enc.attentions]))
    assert G.shape == (3, 12) and torch.isfinite(torch.stack([G, V, D])).all()
    assert set(classify_heads(G, V, D).ravel()) <= {"diagonal", "vertical", "global"}


def test_maps_equal_s3prl_own_pipeline(tera_ckpt, wave):
    """Features, positions, weights and maps against s3prl's builder and output_attentions=True."""
    from s3prl.upstream.mockingjay.builder import PretrainedTransformer
    from s3prl.upstream.mockingjay.model import TransformerModel

    options = {
        "ckpt_file": str(tera_ckpt),
        "load_pretrain": "True",
        "no_grad": "True",
        "dropout": "default",
        "spec_aug": "False",
        "spec_aug_prev": "True",
        "output_hidden_states": "True",
        "select_layer": -1,
        "permute_input": "False",
    }
    ref = PretrainedTransformer(options, inp_dim=-1)
    ref.eval()
    with torch.no_grad():
        _, ref_hidden = ref([wave])  # (layers + 1, B, T, D)
        feats = ref.extracter(ref._normalize_wav_decibel(wave).view(1, 1, -1), wavs_len=[wave.numel()])[0]
        spec, pos, mask = ref.process_input_data(feats)
        with_maps = TransformerModel(ref.model_config, ref.inp_dim, output_attentions=True).eval()
        with_maps.load_state_dict(ref.model.state_dict())
        ref_maps, _ = with_maps(spec, pos, mask, output_all_encoded_layers=True)

        tera = TeraUpstream.from_checkpoint(tera_ckpt)
        ours = tera.features(wave)
        assert torch.allclose(ours, feats[0], atol=1e-5)
        enc = tera.encode(ours[None], torch.tensor([ours.shape[0]]), return_attentions=True, return_hidden_states=True)
    for a, b in zip(enc.attentions, ref_maps):
        assert torch.allclose(a, b, atol=1e-6)
    for h, r in zip(enc.hidden_states, ref_hidden):
        assert torch.allclose(h, r, atol=1e-5)


def test_head_mask_and_padding(tera_ckpt, wave):
    tera = TeraUpstream.from_checkpoint(tera_ckpt)
    f = tera.features(wave)
    with torch.no_grad():
        base = tera.encode(f[None], torch.tensor([101])).output
        masked = tera.encode(f[None], torch.tensor([101]), head_mask={1: [0, 5]}, return_attentions=True)
        assert not torch.allclose(masked.output, base, atol=1e-4)
        assert (masked.attentions[1][0, [0, 5]] == 0).all()  # s3prl masks the probabilities
        as_tensor = torch.ones(3, 12)
        as_tensor[1, [0, 5]] = 0
        assert torch.allclose(tera.encode(f[None], torch.tensor([101]), head_mask=as_tensor).output, masked.output)
        # padding: an utterance alone equals itself in a padded batch
        batch = torch.zeros(2, 101, f.shape[1])
        batch[0], batch[1, :60] = f, f[:60]
        both = tera.encode(batch, torch.tensor([101, 60]), return_attentions=True)
        alone = tera.encode(f[None, :60], torch.tensor([60]))
    assert torch.allclose(both.output[1, :60], alone.output[0], atol=1e-4)
    assert torch.allclose(both.attentions[0][1, :, :60, 60:].sum(-1), torch.zeros(()), atol=1e-6)
    with pytest.raises(ValueError, match="head 12 of layer 0"):
        tera.encode(f[None], torch.tensor([101]), head_mask={0: [12]})
    with pytest.raises(ValueError, match=r"\(3, 12\); got \(3, 4\)"):
        tera.encode(f[None], torch.tensor([101]), head_mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match=r"features must be \(B, T, 80\)"):
        tera.encode(torch.zeros(1, 10, 40), torch.tensor([10]))


def test_bad_checkpoints(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="not a TERA / Mockingjay checkpoint"):
        TeraUpstream.from_checkpoint(tmp_path / "x.ckpt")
    with pytest.raises(FileNotFoundError, match="no such TERA"):
        TeraUpstream.from_checkpoint(tmp_path / "absent.ckpt")
    states, _ = build_random_tera(num_layers=2, num_heads=4, hidden_size=64)
    states["Upstream_Config"]["transformer"]["num_hidden_layers"] = 3
    torch.save(states, tmp_path / "y.ckpt")
    with pytest.raises(ValueError, match="do not fit"):
        TeraUpstream.from_checkpoint(tmp_path / "y.ckpt")


def test_missing_s3prl_says_how_to_install(monkeypatch):
    import importlib

    from analysis import upstreams

    real = importlib.import_module

    def no_s3prl(name, *a, **k):
        if name.startswith("s3prl"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", no_s3prl)
    with pytest.raises(ImportError, match=r"pip install '\.\[s3prl\]'"):
        upstreams.TeraUpstream({"transformer": {}})
    assert "s3prl==0.4.18" in S3PRL_HELP


def test_report_on_upstream(prepared, tmp_path):
    from analysis.__main__ import main

    states, _ = build_random_tera(num_layers=2, num_heads=4, hidden_size=64)
    torch.save(states, tmp_path / "small_tera.ckpt")
    main(
        [
            "report",
            "--upstream",
            "tera",
            "--upstream-ckpt",
            str(tmp_path / "small_tera.ckpt"),
            "--manifest",
            str(prepared / "manifests" / "mini-train.jsonl"),
            "--out",
            str(tmp_path / "r"),
            "--probe-epochs",
            "2",
        ]
    )
    r = json.loads((tmp_path / "r" / "report.json").read_text())
    for fig in ("heads", "prm", "probe", "ablation", "cad", "par"):
        assert (tmp_path / "r" / r["figures"][fig].split("/")[-1]).stat().st_size > 1000, fig
    assert "mixing" not in r["figures"]
    assert len(r["probe"]["accuracy"]) == 3 and len(r["heads"]["category"]) == 2
    assert (
        len(r["ablation"]["steps"]["diagonal"] + r["ablation"]["steps"]["vertical"] + r["ablation"]["steps"]["global"])
        == 8
    )
    with pytest.raises(SystemExit, match="needs --upstream-ckpt"):
        main(["heads", "--upstream", "tera", "--manifest", "x.jsonl", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not available for upstream"):
        main(
            [
                "mixing",
                "--upstream",
                "tera",
                "--upstream-ckpt",
                str(tmp_path / "small_tera.ckpt"),
                "--manifest",
                str(prepared / "manifests" / "mini-dev.jsonl"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
