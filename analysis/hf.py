"""Hugging Face speech transformers behind the capture interface of :class:`models.ConformerCTC`:
wav2vec2 / HuBERT (with a CTC head or without; post-LN "base" and pre-LN "stable layer norm"
encoders) and Whisper (its encoder for every analysis, its decoder and cross-attention for word-level
context mixing, in :mod:`analysis.hf_mixing`), loaded with transformers' own classes and the folder's own
feature extractor /
processor, with eager attention so that the maps are the model's ``output_attentions``.

``encode(features, lengths, return_attentions, return_hidden_states, head_mask)`` ->
:class:`models.EncoderOutput`, as for our Conformer and :mod:`analysis.upstreams`. The "features"
are the 16 kHz waveform as ``(samples, 1)``: the model's feature extractor runs inside ``encode``,
one utterance at a time, so that no padding enters a map. Hidden states are those each encoder layer
passes on (index 0: the first layer's input); the last one after the encoder's final LayerNorm where
the model has one (pre-LN encoders), whatever transformers' ``hidden_states`` tuple holds.

- Frame rate: wav2vec2-style encoders take the conv feature encoder's total stride and receptive
  field (320 and 400 samples: 20 ms frames, 25 ms windows); Whisper's encoder frames are 20 ms apart,
  frame k centred at k * 20 ms (centred STFT, then a stride-2 conv).
- Whisper pads every input to its window (the feature extractor's ``n_samples``: 30 s for the released
  models). Only the encoder frames whose centre lies in the audio are analysed: each map is cut to
  them and its rows renormalised; the attention mass the audio frames gave to the padding is
  recorded (:attr:`HFUpstream.padding_mass`). A longer input is refused.
- Head ablation: transformers 5 has no ``head_mask`` argument for these models, so a hook on each
  attention's output projection zeroes the chosen heads' outputs before it (Michel et al., 2019,
  "Are Sixteen Heads Really Better than One?").

WavLM is refused: transformers computes its attention with torch's fused
``multi_head_attention_forward`` and returns head-averaged weights, so neither per-head maps, nor the
head hook, nor Value Zeroing's value hook can be had without patching transformers.

transformers is an optional extra (``pip install '.[hf]'``; tested with transformers 5.23.0).
"""

from __future__ import annotations

import contextlib
import math
from functools import partial
from pathlib import Path

import torch
from torch import nn

from analysis.hf_loading import WaveFeaturizer, conv_frames, conv_receptive_field, load, whisper_frames
from analysis.upstreams import TeraUpstream
from data.features import SAMPLE_RATE
from data.framing import LabelFraming
from models.ctc import EncoderOutput


class HFUpstream(nn.Module):
    """A transformers speech model with our capture interface (encoder layers only).

    Attributes ``family`` ("ctc" or "whisper"), ``model_type``, ``num_layers``, ``num_heads`` (one per
    layer), ``d_model``, ``frame_shift``, ``framing`` (:class:`LabelFraming`), ``featurizer``,
    ``max_samples`` (Whisper's window; None otherwise), ``processor``, ``model`` (the transformers
    model), ``padding_mass`` (Whisper: [sum, count] of the attention mass audio frames gave to padding).
    """

    def __init__(self, source: str | Path, device: str = "cpu"):
        super().__init__()
        loaded = load(source, device)
        self.family, self.model_type, self.source = loaded.family, loaded.config.model_type, loaded.source
        self.processor, self.feature_extractor = loaded.processor, loaded.feature_extractor
        self.model, self.config = loaded.model, loaded.config
        base_model = self.model.base_model
        self.encoder = base_model.encoder
        self.decoder = base_model.decoder if self.family == "whisper" else None
        self.layers = list(self.encoder.layers)
        pre_ln = self.family == "whisper" or bool(self.config.do_stable_layer_norm)
        self.final_norm = self.encoder.layer_norm if pre_ln else None
        self.max_samples, self.frame_shift, self.framing = self._frames()
        self.attentions_modules = [self._attention(layer) for layer in self.layers]
        self.num_layers = len(self.layers)
        self.num_heads = [int(a.num_heads) for a in self.attentions_modules]
        self.d_model = int(self.config.d_model if self.family == "whisper" else self.config.hidden_size)
        self.featurizer = WaveFeaturizer()
        self.padding_mass = [0.0, 0]
        self.summary = {
            "source": str(self.source),
            "model_type": self.model_type,
            "class": loaded.arch,
            "layers": self.num_layers,
            "heads": self.num_heads[0],
            "frame_shift_s": self.frame_shift,
            "pre_layer_norm": pre_ln,
        }
        if self.family == "whisper":
            self.summary["window"] = (
                f"every input is padded to the model's {self.max_samples / SAMPLE_RATE:g} s window; "
                "only the encoder frames covering the audio are analysed, each map cut to them "
                "and its rows renormalised (context mixing: raw maps over the whole window)"
            )

    def _frames(self) -> tuple[int | None, float, LabelFraming]:
        """``(max_samples, frame_shift, framing)``: Whisper's window, frames ``stride`` samples apart
        centred at ``k * stride``; wav2vec2-style encoders: the conv feature encoder's total stride and
        receptive field."""
        if self.family == "whisper":
            fe = self.feature_extractor
            stride = int(fe.hop_length) * self.encoder.conv1.stride[0] * self.encoder.conv2.stride[0]
            shift = stride / SAMPLE_RATE
            # frame k centred at k * shift: the centre rule's window is 0
            framing = LabelFraming(
                shift, 0.0, count=partial(whisper_frames, stride=stride), min_frames=1, frame_ms=1000 / SAMPLE_RATE
            )
            return int(fe.n_samples), shift, framing
        kernels, strides = tuple(self.config.conv_kernel), tuple(self.config.conv_stride)
        r = conv_receptive_field(kernels, strides)
        shift = math.prod(strides) / SAMPLE_RATE
        framing = LabelFraming(
            shift,
            r / SAMPLE_RATE,
            count=partial(conv_frames, kernels=kernels, strides=strides),
            min_frames=r,
            frame_ms=1000 / SAMPLE_RATE,
        )
        return None, shift, framing

    @classmethod
    def from_pretrained(cls, source: str | Path, device: str = "cpu") -> HFUpstream:
        return cls(source, device)

    @staticmethod
    def _attention(layer: nn.Module) -> nn.Module:
        return layer.self_attn if hasattr(layer, "self_attn") else layer.attention

    # --- inputs ---------------------------------------------------------------------------------
    def check_samples(self, samples: int, what: str) -> None:
        """Refuse an input longer than Whisper's window (before any work)."""
        if self.max_samples is not None and samples > self.max_samples:
            raise ValueError(
                f"{what}: {samples / SAMPLE_RATE:.2f} s is longer than the model's "
                f"{self.max_samples / SAMPLE_RATE:g} s window (Whisper analyses one window; "
                f"cut the audio or leave this utterance out)"
            )

    def model_input(self, wave: torch.Tensor) -> dict:
        """The feature extractor's input for one waveform ``(samples,)``, on the model's device."""
        self.check_samples(wave.numel(), "input")
        x = self.feature_extractor(wave.float().cpu().numpy(), sampling_rate=SAMPLE_RATE, return_tensors="pt")
        key = "input_features" if self.family == "whisper" else "input_values"
        return {key: x[key].to(self.model.device, self.model.dtype)}

    def num_frames(self, samples: int) -> int:
        """Encoder frames analysed for ``samples`` of audio (Whisper: those covering the audio)."""
        return self.framing.count(samples)

    # --- capture --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, layers: list[nn.Module]):
        """Records, for each of ``layers``, its call ``(args, kwargs)`` and its output."""
        calls, outputs, handles = [None] * len(layers), [None] * len(layers), []
        for i, layer in enumerate(layers):

            def pre(mod, args, kwargs, i=i):
                calls[i] = (args, dict(kwargs))

            def post(mod, args, out, i=i):
                outputs[i] = out[0] if isinstance(out, tuple) else out

            handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
        try:
            yield calls, outputs
        finally:
            for h in handles:
                h.remove()

    @contextlib.contextmanager
    def masked_heads(self, head_mask):
        """Zeroes the chosen heads' outputs before each attention's output projection."""
        keep = self.head_mask_tensor(head_mask)
        handles = []
        if keep is not None:
            for l, attn in enumerate(self.attentions_modules):
                if bool(keep[l].all()):
                    continue
                k = keep[l].to(self.model.device)

                def pre(mod, args, k=k):
                    x = args[0]
                    x = (x.unflatten(-1, (k.numel(), -1)) * k[:, None].to(x.dtype)).flatten(-2)
                    return (x, *args[1:])

                handles.append(attn.out_proj.register_forward_pre_hook(pre))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    # ``(num_layers, heads)`` 0/1 keep-mask from a tensor of that shape or ``{layer: [heads to mask]}``
    head_mask_tensor = TeraUpstream.head_mask_tensor

    def run_encoder(self, wave: torch.Tensor, head_mask=None) -> tuple[list[torch.Tensor], list[torch.Tensor], list]:
        """One waveform through the encoder: ``(maps, hidden, calls)`` with maps ``(1, H, T, T)`` per
        layer over every frame (Whisper: its whole window), ``num_layers + 1`` hidden states ``(1, T, d)``
        (the last after the final norm, if any) and each layer's recorded call."""
        inputs = self.model_input(wave)
        with self.capture(self.layers) as (calls, outputs), self.masked_heads(head_mask):
            if self.family == "whisper":
                out = self.encoder(**inputs, output_attentions=True)
            else:
                out = self.model.base_model(**inputs, output_attentions=True)
        first = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        last = outputs[-1] if self.final_norm is None else self.final_norm(outputs[-1])
        return list(out.attentions), [first, *outputs[:-1], last], calls

    # --- capture interface ------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor,
        return_attentions: bool = False,
        return_hidden_states: bool = False,
        head_mask=None,
    ) -> EncoderOutput:
        """``features (B, samples, 1)`` padded waveforms, ``lengths (B,)`` samples -> :class:`EncoderOutput`
        with ``(B, H, T', T')`` maps per layer and ``num_layers + 1`` hidden states ``(B, T', d)``,
        ``T'`` the most encoder frames analysed in the batch; each utterance runs alone."""
        if features.dim() != 3 or features.shape[-1] != 1:
            raise ValueError(f"features must be (B, samples, 1) waveforms; got {tuple(features.shape)}")
        if lengths.shape != (features.shape[0],):
            raise ValueError(f"lengths must be ({features.shape[0]},); got {tuple(lengths.shape)}")
        maps, hidden, counts = [], [], []
        for b, n in enumerate(lengths.tolist()):
            a, h, _ = self.run_encoder(features[b, :n, 0], head_mask)
            T = self.num_frames(n)
            if self.family == "whisper":  # the frames covering the audio; rows renormalised over them
                kept = [m[:, :, :T, :T] for m in a]
                mass = torch.stack([k.sum(-1) for k in kept])
                self.padding_mass[0] += float((1 - mass).mean())
                self.padding_mass[1] += 1
                self.summary["mean_attention_mass_on_padding"] = self.padding_mass[0] / self.padding_mass[1]
                a = [k / k.sum(-1, keepdim=True) for k in kept]
                h = [x[:, :T] for x in h]
            elif a[0].shape[-1] != T:
                raise RuntimeError(f"the model gave {a[0].shape[-1]} frames for {n} samples; expected {T}")
            maps.append(a)
            hidden.append(h)
            counts.append(T)
        Tm = max(counts)

        def pad(x, dims):
            p = []
            for d in reversed(range(x.dim())):
                p += [0, Tm - x.shape[d]] if d in dims else [0, 0]
            return nn.functional.pad(x, p)

        attentions = [torch.cat([pad(m[l], (2, 3)) for m in maps]) for l in range(self.num_layers)]
        states = [torch.cat([pad(h[l], (1,)) for h in hidden]) for l in range(self.num_layers + 1)]
        return EncoderOutput(
            states[-1],
            torch.tensor(counts, device=features.device),
            attentions if return_attentions else None,
            states if return_hidden_states else None,
        )

    def forward(self, features, lengths, head_mask=None):
        return self.encode(features, lengths, head_mask=head_mask).output

    # --- Whisper decoder ----------------------------------------------------------------------------
    def prompt_ids(self, language: str | None = "en", task: str = "transcribe") -> list[int]:
        """The decoder prompt (start of transcript, language, task, no timestamps) from the tokenizer."""
        tok = self.processor.tokenizer
        tok.set_prefix_tokens(
            language=language if self.model.generation_config.is_multilingual is not False else None,
            task=task,
            predict_timestamps=False,
        )
        return list(tok.prefix_tokens)

    @torch.inference_mode()
    def greedy_ids(
        self, wave: torch.Tensor, max_new_tokens: int | None = None, language: str | None = "en"
    ) -> list[int]:
        """Greedy transcript (argmax each step, the generation config's suppressed tokens left out),
        the prompt included, the end-of-text token kept when produced."""
        inputs = self.model_input(wave)
        enc = self.encoder(**inputs).last_hidden_state
        ids = self.prompt_ids(language)
        gc = self.model.generation_config
        suppress = list(getattr(gc, "suppress_tokens", None) or [])
        begin = list(getattr(gc, "begin_suppress_tokens", None) or [])
        eos = self.config.eos_token_id
        limit = self.config.max_target_positions - len(ids)  # default: as many as the decoder holds
        limit = limit if max_new_tokens is None else min(max_new_tokens, limit)
        for step in range(limit):
            logits = self.model(
                encoder_outputs=(enc,), decoder_input_ids=torch.tensor([ids], device=enc.device), use_cache=False
            ).logits[0, -1]
            banned = suppress + (begin if step == 0 else [])
            if banned:
                logits[banned] = -float("inf")
            ids.append(int(logits.argmax()))
            if ids[-1] == eos:
                break
        return ids

    def reference_ids(self, text: str, language: str | None = "en") -> list[int]:
        """The prompt, the reference text's tokens and end-of-text."""
        tok = self.processor.tokenizer
        return (
            self.prompt_ids(language)
            + tok.encode(" " + text.strip(), add_special_tokens=False)
            + [self.config.eos_token_id]
        )

    def run_decoder(self, wave: torch.Tensor, ids: list[int]):
        """Teacher-forced decoder pass: ``(encoder_out (1, S, d), self maps, cross maps, hidden, calls)``
        with ``(1, H, N, N)`` / ``(1, H, N, S)`` maps per layer, ``S`` the whole window."""
        inputs = self.model_input(wave)
        enc = self.encoder(**inputs).last_hidden_state
        with self.capture(list(self.decoder.layers)) as (calls, outputs):
            out = self.model(
                encoder_outputs=(enc,),
                decoder_input_ids=torch.tensor([ids], device=enc.device),
                output_attentions=True,
                use_cache=False,
            )
        last = self.decoder.layer_norm(outputs[-1])
        return enc, list(out.decoder_attentions), list(out.cross_attentions), [*outputs[:-1], last], calls
