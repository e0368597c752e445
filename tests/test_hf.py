"""Hugging Face wav2vec2 / HuBERT / Whisper through transformers' own classes (analysis/hf.py):
tiny random models written with ``save_pretrained`` and loaded back through the adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

tf = pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")

from analysis.hf import HFUpstream
from analysis.hf_loading import conv_frames
from analysis.hf_mixing import hf_context_mixing, value_zeroing_distances


def _reference_maps(up: HFUpstream, hf_wave):
    with torch.no_grad():
        inputs = up.model_input(hf_wave)
        if up.family == "whisper":
            return up.encoder(**inputs, output_attentions=True).attentions
        return up.model(**inputs, output_attentions=True).attentions


@pytest.mark.parametrize("name", ["post", "pre", "hubert", "whisper"])
def test_maps_equal_output_attentions_and_frames(hf_folders, hf_wave, name):
    up = HFUpstream(hf_folders[name])
    assert up.model.config._attn_implementation == "eager"
    assert (up.num_layers, up.frame_shift) == (2, 0.02)
    ref = _reference_maps(up, hf_wave)
    enc = up.encode(
        torch.stack([hf_wave, torch.nn.functional.pad(hf_wave[:9000], (0, 7000))])[..., None],
        torch.tensor([16000, 9000]),
        return_attentions=True,
        return_hidden_states=True,
    )
    if name == "whisper":
        T = 50  # frames centred in 1 s of audio, 20 ms apart; the window holds 1500
        assert ref[0].shape[-1] == 1500 and enc.lengths.tolist() == [50, math.ceil(9000 / 320)]
        for a, r in zip(enc.attentions, ref):
            cut = r[0, :, :T, :T]
            assert torch.allclose(a[0], cut / cut.sum(-1, keepdim=True), atol=1e-6)
        assert 0 < up.summary["mean_attention_mass_on_padding"] < 1
    else:
        T = conv_frames(16000, up.config.conv_kernel, up.config.conv_stride)
        assert T == 49 and enc.lengths.tolist() == [49, conv_frames(9000, up.config.conv_kernel, up.config.conv_stride)]
        assert up.framing.window == 400 / 16000
        for a, r in zip(enc.attentions, ref):
            assert torch.allclose(a[0], r[0], atol=1e-6)
        # the padded second utterance equals itself run alone
        alone = _reference_maps(up, hf_wave[:9000])
        n = enc.lengths[1]
        assert torch.allclose(enc.attentions[1][1, :, :n, :n], alone[1][0], atol=1e-6)
    assert len(enc.hidden_states) == 3 and enc.hidden_states[-1].shape == (2, T, up.d_model)
    # the last hidden state is what the model passes on (after the final norm of pre-LN encoders)
    with torch.no_grad():
        inputs = up.model_input(hf_wave)
        last = (up.encoder(**inputs) if name == "whisper" else up.model.base_model(**inputs)).last_hidden_state
    assert torch.allclose(enc.hidden_states[-1][0], last[0, :T], atol=1e-5)


def test_head_ablation_hook(hf_folders, hf_wave):
    up = HFUpstream(hf_folders["pre"])
    x, n = hf_wave[None, :, None], torch.tensor([16000])
    base = up.encode(x, n).output
    masked = up.encode(x, n, head_mask={1: [0, 2]}).output
    assert not torch.allclose(masked, base, atol=1e-4)
    keep = torch.ones(2, 4)
    keep[1, [0, 2]] = 0
    assert torch.allclose(up.encode(x, n, head_mask=keep).output, masked)
    # independent: layer 1's attention output with heads 0 and 2 zeroed before out_proj, by hand
    layer = up.layers[1]
    seen = {}
    h = layer.attention.out_proj.register_forward_hook(lambda m, i, o: seen.setdefault("in", i[0].clone()))
    up.encode(x, n, head_mask={1: [0, 2]})
    h.remove()
    assert (seen["in"].unflatten(-1, (4, 8))[..., [0, 2], :] == 0).all()
    assert torch.allclose(up.encode(x, n).output, base)  # hooks removed
    with pytest.raises(ValueError, match="head 4 of layer 0"):
        up.encode(x, n, head_mask={0: [4]})


def _manual_encoder_layer(up, layer, x, v_keep):
    """A wav2vec2 / Whisper encoder layer written out by hand, its values multiplied by ``v_keep (S,)``."""
    attn = up._attention(layer)
    pre = up.family == "whisper" or up.config.do_stable_layer_norm
    ln1 = layer.self_attn_layer_norm if up.family == "whisper" else layer.layer_norm
    h = ln1(x) if pre else x
    H, d = attn.num_heads, attn.head_dim
    q = attn.q_proj(h).unflatten(-1, (H, d)).transpose(0, 1)
    k = attn.k_proj(h).unflatten(-1, (H, d)).transpose(0, 1)
    v = (attn.v_proj(h) * v_keep[:, None]).unflatten(-1, (H, d)).transpose(0, 1)
    a = torch.softmax(q @ k.transpose(1, 2) * d**-0.5, -1)
    y = x + attn.out_proj((a @ v).transpose(0, 1).flatten(1))
    if up.family == "whisper":
        return y + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(y))))
    if pre:
        return y + layer.feed_forward(layer.final_layer_norm(y))
    y = layer.layer_norm(y)
    return layer.final_layer_norm(y + layer.feed_forward(y))


@pytest.mark.parametrize("name", ["post", "pre", "whisper"])
def test_encoder_value_zeroing_equals_manual(hf_folders, hf_wave, name):
    up = HFUpstream(hf_folders[name])
    up.model.double()
    w = hf_wave[:8000]
    _, hidden, calls = up.run_encoder(w.double())
    words = [[0, 1, 2], [3, 4, 5, 6], [7, 8], [10, 11, 12]]
    for l, layer in enumerate(up.layers):
        x = calls[l][0][0][0] if calls[l][0] else calls[l][1]["hidden_states"][0]
        S = x.shape[0]
        final = up.final_norm if l == up.num_layers - 1 else None
        masks = torch.ones(len(words) + 1, S, dtype=torch.float64)
        for g, f in enumerate(words):
            masks[g + 1, f] = 0  # row 0: nothing zeroed
        got = value_zeroing_distances(layer, calls[l], up._attention(layer).v_proj, masks, final)
        with torch.no_grad():
            ref_out = _manual_encoder_layer(up, layer, x, torch.ones(S, dtype=torch.float64))
            if final is not None:
                ref_out = final(ref_out)
            assert torch.allclose(ref_out, hidden[l + 1][0], atol=1e-8)  # the manual layer is the model's
            for g in range(masks.shape[0]):
                y = _manual_encoder_layer(up, layer, x, masks[g])
                if final is not None:
                    y = final(y)
                want = 1 - torch.nn.functional.cosine_similarity(y, ref_out, dim=-1)
                assert torch.allclose(got[g].double(), want.clamp_min(0), atol=1e-6), (l, g)
        assert (got[0] == 0).all()  # zeroing nothing: distance 0


def test_mixing_scores_encoder(hf_folders, hf_wave):
    up = HFUpstream(hf_folders["post"])
    words = [[0, 1, 2], [3, 4, 5, 6], [10, 11]]
    r = hf_context_mixing(up, hf_wave, words)
    assert set(r) == {"encoder"}
    enc = r["encoder"]
    assert {k: tuple(v.shape) for k, v in enc.items()} == {
        m: (2, 3, 3) for m in ("attention", "attention_norm", "value_zeroing")
    }
    assert torch.allclose(enc["value_zeroing"].sum(-1), torch.ones(2, 3), atol=1e-5)
    maps = _reference_maps(up, hf_wave)
    for l in range(2):
        a = maps[l][0].mean(0)
        for i, fi in enumerate(words):
            for j, fj in enumerate(words):
                assert torch.isclose(enc["attention"][l, i, j], a[fi][:, fj].mean(), atol=1e-6)
    with pytest.raises(ValueError, match="fewer than two aligned words"):
        hf_context_mixing(up, hf_wave, [[0, 1]])


def _manual_decoder_layer(layer, x, enc, self_keep, cross_keep, final):
    def attend(attn, q_in, kv_in, keep, causal):
        H, d = attn.num_heads, attn.head_dim
        q = attn.q_proj(q_in).unflatten(-1, (H, d)).transpose(0, 1)
        k = attn.k_proj(kv_in).unflatten(-1, (H, d)).transpose(0, 1)
        v = (attn.v_proj(kv_in) * keep[:, None]).unflatten(-1, (H, d)).transpose(0, 1)
        s = q @ k.transpose(1, 2) * d**-0.5
        if causal:
            s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), -float("inf"))
        return attn.out_proj((torch.softmax(s, -1) @ v).transpose(0, 1).flatten(1))

    y = x + attend(layer.self_attn, layer.self_attn_layer_norm(x), layer.self_attn_layer_norm(x), self_keep, True)
    y = y + attend(layer.encoder_attn, layer.encoder_attn_layer_norm(y), enc, cross_keep, False)
    y = y + layer.fc2(layer.activation_fn(layer.fc1(layer.final_layer_norm(y))))
    return final(y) if final is not None else y


def test_whisper_decoder_and_cross(hf_folders, hf_wave):
    up = HFUpstream(hf_folders["whisper"])
    ids = up.greedy_ids(hf_wave, max_new_tokens=6)
    prompt = up.prompt_ids()
    assert ids[: len(prompt)] == prompt and len(ids) <= len(prompt) + 6
    ref = up.reference_ids("the cat")
    assert ref[: len(prompt)] == prompt and ref[-1] == up.config.eos_token_id
    words = [[0, 1, 2, 3], [5, 6, 7], [9, 10, 11, 12]]
    r = hf_context_mixing(up, hf_wave, words, ids)
    N = len(ids)
    assert {k: tuple(v.shape) for k, v in r["decoder"].items()} == {m: (2, N, N) for m in r["decoder"]}
    assert {k: tuple(v.shape) for k, v in r["cross"].items()} == {m: (2, N, 3) for m in r["cross"]}
    for m, v in r["decoder"].items():  # causal: no token receives from a later one
        assert (v.triu(1) == 0).all(), m
    # value zeroing against a hand-written decoder layer in float64, values zeroed by multiplication
    up.model.double()
    enc, _, cmaps, hidden, calls = up.run_decoder(hf_wave.double(), ids)
    out = hf_context_mixing(up, hf_wave.double(), words, ids, methods=["value_zeroing", "attention"])
    gm = torch.zeros(3, enc.shape[1], dtype=torch.float64)
    for g, f in enumerate(words):
        gm[g, f] = 1
    for l, layer in enumerate(up.decoder.layers):
        final = up.decoder.layer_norm if l == len(up.decoder.layers) - 1 else None
        x = calls[l][0][0][0] if calls[l][0] else calls[l][1]["hidden_states"][0]
        ones_n, ones_s = torch.ones(N, dtype=torch.float64), torch.ones(enc.shape[1], dtype=torch.float64)
        with torch.no_grad():
            base = _manual_decoder_layer(layer, x, enc[0], ones_n, ones_s, final)
            assert torch.allclose(base, hidden[l][0], atol=1e-8)
            d_self = torch.stack(
                [
                    1
                    - torch.nn.functional.cosine_similarity(
                        _manual_decoder_layer(
                            layer, x, enc[0], 1 - torch.eye(N, dtype=torch.float64)[j], ones_s, final
                        ),
                        base,
                        dim=-1,
                    )
                    for j in range(N)
                ]
            )  # (source token, receiving token)
            d_cross = torch.stack(
                [
                    1
                    - torch.nn.functional.cosine_similarity(
                        _manual_decoder_layer(layer, x, enc[0], ones_n, 1 - gm[g], final), base, dim=-1
                    )
                    for g in range(3)
                ]
            )
        want_self = d_self.clamp_min(0).t()
        want_self = want_self / want_self.sum(1, keepdim=True)
        want_cross = d_cross.clamp_min(0).t()
        want_cross = want_cross / want_cross.sum(1, keepdim=True)
        assert torch.allclose(out["decoder"]["value_zeroing"][l].double(), want_self, atol=1e-5)
        assert torch.allclose(out["cross"]["value_zeroing"][l].double(), want_cross, atol=1e-5)
        a = cmaps[l][0].mean(0)
        assert torch.allclose(out["cross"]["attention"][l].double(), (a @ gm.t()) / gm.sum(1), atol=1e-6)
        # zeroing nothing gives distance 0
        nothing = value_zeroing_distances(
            layer, calls[l], layer.encoder_attn.v_proj, torch.ones(1, enc.shape[1], dtype=torch.float64), final
        )
        assert (nothing == 0).all()


def test_bad_folders(tmp_path, hf_folders, hf_wave):
    with pytest.raises(ValueError, match="not a Hugging Face model folder"):
        HFUpstream(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        HFUpstream(tmp_path / "absent")
    bert = tmp_path / "bert"
    tf.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(
        bert
    )
    with pytest.raises(ValueError, match="model type 'bert'.*not supported"):
        HFUpstream(bert)
    wavlm = tmp_path / "wavlm"
    tf.WavLMConfig().save_pretrained(wavlm)
    with pytest.raises(ValueError, match="wavlm.*head-averaged"):
        HFUpstream(wavlm)
    up = HFUpstream(hf_folders["whisper"])
    with pytest.raises(ValueError, match="longer than the model's 30 s window"):
        up.encode(torch.zeros(1, 31 * 16000, 1), torch.tensor([31 * 16000]))


def test_missing_transformers_says_how_to_install(monkeypatch):
    import builtins

    from analysis import hf

    real = builtins.__import__

    def no_tf(name, *a, **k):
        if name.startswith("transformers"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_tf)
    with pytest.raises(ImportError, match=r"pip install '\.\[hf\]'"):
        hf.HFUpstream("x")


@pytest.mark.parametrize("name", ["pre", "post", "hubert", "whisper"])
def test_report_end_to_end(prepared, hf_folders, tmp_path, name):
    from analysis.__main__ import main

    out = tmp_path / "r"
    saliency = ["--saliency", "--masks", "8"] if name == "post" else []  # report --saliency (tests/test_saliency_hf.py)
    main(
        [
            "report",
            "--upstream",
            "hf",
            "--upstream-ckpt",
            str(hf_folders[name]),
            "--manifest",
            str(prepared / "manifests" / "mini-train.jsonl"),
            "--out",
            str(out),
            "--probe-epochs",
            "1",
            "--limit",
            "4",
            *saliency,
        ]
    )
    r = json.loads((out / "report.json").read_text())
    figures = ["cad", "par", "coverage", "heads", "prm", "probe", "ablation", "mixing"]
    if saliency:
        figures += ["saliency_correlation", "saliency_utterance", "saliency_deletion"]
        assert r["saliency"]["tokens"] > 0 and (out / "saliency.json").is_file()
    if name == "whisper":
        figures += ["mixing_decoder", "mixing_cross"]
        assert "window" in r["hf_model"] and r["hf_model"]["mean_attention_mass_on_padding"] is not None
    assert sorted(r["figures"]) == sorted(figures)
    for fig in figures:
        assert (out / r["figures"][fig].split("/")[-1]).stat().st_size > 1000, fig
    for key in ("cad", "par", "heads", "probe", "ablation", "mixing"):
        assert key in r, key
    assert len(r["probe"]["accuracy"]) == 3 and len(r["cad"]["per_head"]) == 2
    m = r["mixing"]
    W = len(m["words"])
    assert W >= 2 and len(m["word_frames"]) == W
    for meas in ("attention", "attention_norm", "value_zeroing"):
        assert torch.tensor(m[meas]).shape == (2, W, W)
    if name == "whisper":
        N = len(m["decoder"]["tokens"])
        assert m["decoder"]["tokens"][0] == "<|startoftranscript|>" and m["cross"]["words"] == m["words"]
        for meas in ("attention", "attention_norm", "value_zeroing"):
            assert torch.tensor(m["decoder"][meas]).shape == (2, N, N)
            assert torch.tensor(m["cross"][meas]).shape == (2, N, W)
    else:
        assert "decoder" not in m


def test_report_errors_before_work(prepared, hf_folders, tmp_path):
    from analysis.__main__ import main
    from data.manifest import read_manifest, write_manifest

    entries = read_manifest(prepared / "manifests" / "mini-dev.jsonl")
    long = tmp_path / "long.jsonl"
    write_manifest(long, [{**entries[0], "duration": 31.0}, *entries[1:]])
    with pytest.raises(SystemExit, match=f"utterance {entries[0]['id']}: 31.00 s is longer than the model's 30 s"):
        main(
            [
                "report",
                "--upstream",
                "hf",
                "--upstream-ckpt",
                str(hf_folders["whisper"]),
                "--manifest",
                str(long),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert not (tmp_path / "o" / "report.json").exists()
    with pytest.raises(SystemExit, match="needs --upstream-ckpt"):
        main(["report", "--upstream", "hf", "--manifest", str(long), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not a Hugging Face model folder"):
        main(
            [
                "report",
                "--upstream",
                "hf",
                "--upstream-ckpt",
                str(tmp_path),
                "--manifest",
                str(long),
                "--out",
                str(tmp_path / "o"),
            ]
        )
    # an utterance whose TextGrid holds one word
    from praatio import textgrid

    e = entries[0]
    tg = textgrid.openTextgrid(e["alignment"], includeEmptyIntervals=False)
    words = tg.getTier("words")
    one = textgrid.Textgrid()
    one.addTier(words.new(entries=[words.entries[0]]))
    for name in tg.tierNames:
        if name != "words":
            one.addTier(tg.getTier(name))
    one.save(str(tmp_path / "one.TextGrid"), format="short_textgrid", includeBlankSpaces=True)
    single = tmp_path / "single.jsonl"
    write_manifest(single, [{**e, "alignment": str(tmp_path / "one.TextGrid")}])
    with pytest.raises(SystemExit, match="fewer than two aligned words"):
        main(
            [
                "mixing",
                "--upstream",
                "hf",
                "--upstream-ckpt",
                str(hf_folders["post"]),
                "--manifest",
                str(single),
                "--utterance",
                e["id"],
                "--out",
                str(tmp_path / "o2"),
            ]
        )
    assert not (tmp_path / "o2" / "report.json").exists()
