"""The report's context-mixing step for a transformers model (:mod:`analysis.hf`): one utterance,
words from its TextGrid words tier mapped to the encoder's frames; for Whisper also the decoder
(teacher-forced on the model's greedy transcript, or on the reference) and the cross-attention.

``report.json``'s ``mixing``: ``utterance``, ``words``, one ``L x W x W`` list per measure (as for our
Conformer), ``word_frames`` (the encoder frames of each word); for Whisper ``decoder_text``,
``decoder`` (``tokens``, one ``L x N x N`` list per measure) and ``cross`` (``tokens``, ``words``, one
``L x N x W`` list per measure). Figures: ``mixing`` (encoder), ``mixing_decoder``, ``mixing_cross``.
"""

from __future__ import annotations

from analysis import plots
from analysis.hf_mixing import hf_context_mixing
from data.alignments import read_textgrid
from data.features import load_audio


def hf_mixing_step(report, entry: dict) -> None:
    up = report.model
    wave = load_audio(entry["audio"])
    up.check_samples(wave.numel(), f"utterance {entry['id']}")
    framing = up.framing
    words = read_textgrid(entry["alignment"]).word_frames(framing.count(wave.numel()), framing.shift, framing.window)
    if len(words) < 2:
        raise ValueError(f"utterance {entry['id']} has fewer than two aligned words (context mixing compares words)")
    ids = None
    if up.family == "whisper":
        ids = up.reference_ids(entry["text"]) if report.decoder_text == "reference" else up.greedy_ids(wave)
    scores = hf_context_mixing(up, wave, [f for _, f in words], ids)
    names = [w for w, _ in words]
    enc = scores["encoder"]
    mixing = {
        "utterance": entry["id"],
        "words": names,
        **{m: v.tolist() for m, v in enc.items()},
        "word_frames": [f for _, f in words],
    }
    figures = report.results["figures"]
    layer_names = [f"layer {l + 1}" for l in range(up.num_layers)]
    figures["mixing"] = str(
        plots.context_mixing(
            {m: v.numpy() for m, v in enc.items()},
            names,
            layer_names,
            report.out / "context_mixing.png",
            title="encoder: words x words",
        )
    )
    if ids is not None:
        tokens = up.processor.tokenizer.convert_ids_to_tokens(ids)
        dec_names = [f"decoder layer {l + 1}" for l in range(len(up.decoder.layers))]
        mixing["decoder_text"] = report.decoder_text
        mixing["decoder"] = {"tokens": tokens, **{m: v.tolist() for m, v in scores["decoder"].items()}}
        mixing["cross"] = {"tokens": tokens, "words": names, **{m: v.tolist() for m, v in scores["cross"].items()}}
        figures["mixing_decoder"] = str(
            plots.context_mixing(
                {m: v.numpy() for m, v in scores["decoder"].items()},
                tokens,
                dec_names,
                report.out / "context_mixing_decoder.png",
                title=f"decoder ({report.decoder_text} text): tokens x tokens",
            )
        )
        figures["mixing_cross"] = str(
            plots.context_mixing(
                {m: v.numpy() for m, v in scores["cross"].items()},
                tokens,
                dec_names,
                report.out / "context_mixing_cross.png",
                sources=names,
                title="cross-attention: tokens x words",
            )
        )
    report.results["mixing"] = mixing
