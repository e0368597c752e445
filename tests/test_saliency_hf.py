"""Attention against saliency for transformers models (analysis/saliency_hf.py) on the tiny random
models of tests/hf_models.py: Whisper's cross-attention rows are the model's ``output_attentions``,
the CTC rows / states are the model's, integrated gradients are complete, the waveform-segment gains
equal the waveform's own attributions, and the command runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

tf = pytest.importorskip("transformers", reason="transformers is not installed: pip install '.[hf]'")

from hf_models import whisper_folder

from analysis.hf import HFUpstream
from analysis.hf_loading import conv_frames, whisper_frames
from analysis.saliency import frame_windows, gradient_saliency
from analysis.saliency_hf import HFCTCSaliency, WhisperSaliency, hf_saliency


@pytest.fixture(scope="module")
def short_whisper(tmp_path_factory):
    """The tiny Whisper with room for 8 transcript tokens (keeps the command's test short)."""
    return whisper_folder(tmp_path_factory.mktemp("whisper12"), max_target_positions=12)


def test_whisper_rows_are_the_models_cross_attentions(short_whisper, hf_wave):
    up = HFUpstream(short_whisper)
    sm = hf_saliency(up)
    assert isinstance(sm, WhisperSaliency)
    assert (sm.subsampling, sm.receptive_field, sm.frame_offset) == (2, 5, 2)  # frame m sees mel 2m-2 .. 2m+2
    w = hf_wave[:12000]
    x = sm.prepare(w)
    T, Tp = whisper_frames(12000, 160), whisper_frames(12000, 320)
    assert x.shape == (T, 80) == (75, 80)
    tokens = sm.tokens(x)
    ids = up.greedy_ids(w)
    prompt = up.prompt_ids()
    assert [t.id for t in tokens] == [i for i in ids[len(prompt) :] if i != up.config.eos_token_id] and tokens
    assert all(t.frame is None for t in tokens)
    with torch.enable_grad():
        cap = sm.capture(x, tokens)
    # independently: the model's own teacher-forced pass on the extractor's features
    with torch.no_grad():
        enc, _, cross, _, _ = up.run_decoder(w, ids)
        logits = up.model(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids]), use_cache=False).logits[0]
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    assert len(cap.rows) == 2 and cap.maps is None
    for row, c in zip(cap.rows, cross):
        cut = c[0][:, pos, :Tp]
        assert row.shape == (2, len(tokens), Tp)
        assert torch.allclose(row, cut / cut.sum(-1, keepdim=True), atol=1e-6)
    want = torch.log_softmax(logits, -1)[pos, torch.tensor([t.id for t in tokens])]
    assert torch.allclose(cap.scores, want, atol=1e-4)
    with torch.no_grad():
        assert torch.allclose(sm.score(x[None], tokens)[0], want, atol=1e-4)
    # encoder_output: the encoder output cross-attention reads, the frames covering the audio
    assert all(s is cap.states[0] for s in cap.states) and torch.allclose(cap.states[0][0], enc[0, :Tp], atol=1e-5)
    # the features are the extractor's log-Mel of those frames, 0 at the window's padding (silence)
    mel = up.model_input(w)["input_features"][0].t()
    assert torch.allclose(x + mel.min(), mel[:T], atol=1e-6) and torch.allclose(mel[-1], mel.min().expand(80))
    with pytest.raises(ValueError, match="call prepare"):
        sm.score(torch.zeros(1, T + 1, 80), tokens)


def test_whisper_integrated_gradients_complete_from_silence(short_whisper, hf_wave):
    up = HFUpstream(short_whisper)
    sm = hf_saliency(up)
    w = hf_wave[:8000]
    x = sm.prepare(w)
    every = sm.tokens(x)
    score = lambda z: sm.score(z, every)
    tokens = every[:3]  # attributions of the first three (runtime)
    attr, delta = gradient_saliency(score, x, len(tokens), "ig", n_steps=32, return_delta=True)
    # the all-zero input is the audio frames at the silence level, built here from the extractor's output
    mel = up.model_input(w)["input_features"]
    silent = mel.clone()
    silent[0, :, : x.shape[0]] = mel.min()
    ids = torch.tensor([up.greedy_ids(w)])
    pos = torch.arange(len(up.prompt_ids()) - 1, len(up.prompt_ids()) - 1 + len(tokens))
    tid = torch.tensor([t.id for t in tokens])
    with torch.no_grad():
        lp = lambda m: torch.log_softmax(
            up.model(input_features=m, decoder_input_ids=ids, use_cache=False).logits[0], -1
        )
        diff = lp(mel)[pos, tid] - lp(silent)[pos, tid]
    assert torch.allclose(attr.sum((1, 2)), diff, rtol=0.02, atol=1e-7)
    assert delta.abs().max() <= 0.02 * diff.abs().max() + 1e-7


def test_ctc_rows_states_and_segment_framing(hf_folders, hf_wave):
    up = HFUpstream(hf_folders["pre"])
    sm = hf_saliency(up)
    assert isinstance(sm, HFCTCSaliency)
    assert (sm.segment, sm.subsampling, sm.receptive_field, sm.frame_offset) == (80, 4, 5, 0)
    x = sm.prepare(hf_wave)
    assert x.shape == (200, 1) and (x == 1).all()
    Tp = conv_frames(16000, up.config.conv_kernel, up.config.conv_stride)
    # encoder frame m sees samples 320 m .. 320 m + 399: the segments of its window, exactly
    w = frame_windows(Tp, 200, sm.subsampling, sm.receptive_field)
    samples = torch.zeros(Tp, 16000)
    for m in range(Tp):
        samples[m, 320 * m : 320 * m + 400] = 1
    assert torch.equal(w, samples.reshape(Tp, 200, 80).amax(-1))
    tokens = sm.tokens(x)
    with torch.no_grad():
        inputs = up.model_input(hf_wave)
        out = up.model(**inputs, output_attentions=True)
        path = out.logits[0].argmax(-1).tolist()
    want = [(t, v) for t, v in enumerate(path) if v != 0 and (t == 0 or path[t - 1] != v)]
    assert [(t.frame, t.id) for t in tokens] == want and tokens
    with torch.enable_grad():
        cap = sm.capture(x, tokens)
    frames = torch.tensor([t.frame for t in tokens])
    for row, m, a in zip(cap.rows, cap.maps, out.attentions):
        assert torch.allclose(m, a[0], atol=1e-6) and torch.allclose(row, a[0][:, frames], atol=1e-6)
    hidden = up.encode(hf_wave[None, :, None], torch.tensor([16000]), return_hidden_states=True).hidden_states
    assert len(cap.states) == 2
    for s, h in zip(cap.states, hidden):
        assert torch.allclose(s[0], h[0], atol=1e-5)
    want = torch.log_softmax(out.logits[0], -1)[frames, torch.tensor([t.id for t in tokens])]
    assert torch.allclose(cap.scores, want, atol=1e-5)


def test_ctc_gains_give_the_waveforms_attributions(hf_folders, hf_wave):
    up = HFUpstream(hf_folders["post"])
    sm = hf_saliency(up)
    w = hf_wave[:8000]
    x = sm.prepare(w)
    tokens = sm.tokens(x)[:4]
    score = lambda z: sm.score(z, tokens)
    # gradient x input = 4 x the waveform's gradient x input summed over each 80-sample segment (gain z ** 4)
    ixg = gradient_saliency(score, x, len(tokens), "ixg") / 4
    v = up.model_input(w)["input_values"].detach().requires_grad_(True)
    lp = torch.log_softmax(up.model(input_values=v).logits[0], -1)
    frames, tid = torch.tensor([t.frame for t in tokens]), torch.tensor([t.id for t in tokens])
    for i in range(len(tokens)):
        (g,) = torch.autograd.grad(lp[frames[i], tid[i]], v, retain_graph=True)
        want = (g * v)[0].detach().reshape(100, 80).sum(-1)
        assert torch.allclose(ixg[i, :, 0], want, atol=1e-6 + 1e-4 * want.abs().max())
    # integrated gradients: complete, from the silenced input (the normalised waveform all 0)
    attr = gradient_saliency(score, x, len(tokens), "ig", n_steps=32)
    with torch.no_grad():
        silent = torch.log_softmax(up.model(input_values=torch.zeros_like(v)).logits[0], -1)[frames, tid]
    assert torch.allclose(attr.sum((1, 2)), lp.detach()[frames, tid] - silent, rtol=0.02, atol=0.02)


def _manifest(prepared, tmp_path, n=2):
    from data.manifest import read_manifest, write_manifest

    entries = read_manifest(prepared / "manifests" / "mini-train.jsonl")[:n]
    write_manifest(tmp_path / "m.jsonl", entries)
    return tmp_path / "m.jsonl"


@pytest.mark.parametrize("name", ["whisper", "post"])
def test_saliency_command_end_to_end(prepared, hf_folders, short_whisper, tmp_path, capsys, name):
    from analysis.__main__ import main

    folder = short_whisper if name == "whisper" else hf_folders[name]
    out = tmp_path / "o"
    main(
        [
            "saliency",
            "--upstream",
            "hf",
            "--upstream-ckpt",
            str(folder),
            "--manifest",
            str(_manifest(prepared, tmp_path)),
            "--out",
            str(out),
            "--masks",
            "8",
            "--seed",
            "2",
        ]
    )
    r = json.loads((out / "saliency.json").read_text())
    assert {"settings", "tokens", "utterances", "layers", "correlation", "deletion", "figures"} <= set(r)
    assert r["tokens"] > 0 and r["utterances"]["scored"] == 2 and r["utterances"]["skipped"] == []
    assert [d["computes"] for d in r["layers"]] == [True, True]
    for side in ("input", "encoder_output"):
        c = r["correlation"][side]
        assert len(c["per_layer"]) == 2 and np.array(c["per_head"], dtype=float).shape == (
            2,
            2 if name == "whisper" else 4,
        )
        assert c["mean_over_layers"] is None or -1 <= c["mean_over_layers"] <= 1
    rollout = r["correlation"]["input"]["rollout"]
    assert rollout is None if name == "whisper" else len(rollout) == 2  # cross-attention does not chain
    assert r["deletion"]["k"] == [5, 10, 20, 40] and all(
        len(r["deletion"][n]) == 4 for n in ("attention", "saliency", "random")
    )
    s = r["settings"]
    assert s["perturbation"]["seed"] == 2 and s["model"].startswith(
        "WhisperForConditionalGeneration" if name == "whisper" else "Wav2Vec2ForCTC"
    )
    if name == "whisper":
        assert (s["subsampling"], s["receptive_field"], s["frame_offset"]) == (2, 5, 2) and "cross-attention" in s[
            "attention"
        ]
    else:
        assert (s["subsampling"], s["receptive_field"], s["segment_samples"]) == (4, 5, 80)
    for fig in ("correlation", "utterance", "deletion"):
        assert (out / r["figures"][fig].split("/")[-1]).stat().st_size > 1000, fig
    assert "r(input)" in capsys.readouterr().out


def test_model_without_tokens_refused_before_work(prepared, hf_folders, tmp_path):
    from analysis.__main__ import main

    base = tmp_path / "base"
    tf.Wav2Vec2ForCTC.from_pretrained(hf_folders["post"]).wav2vec2.save_pretrained(base)
    tf.Wav2Vec2FeatureExtractor.from_pretrained(hf_folders["post"]).save_pretrained(base)
    with pytest.raises(SystemExit, match="Wav2Vec2Model has no CTC head"):
        main(
            [
                "report",
                "--upstream",
                "hf",
                "--upstream-ckpt",
                str(base),
                "--manifest",
                str(_manifest(prepared, tmp_path)),
                "--out",
                str(tmp_path / "o"),
                "--saliency",
            ]
        )
    assert not (tmp_path / "o" / "report.json").exists()
