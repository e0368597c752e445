"""Attention against saliency (:mod:`analysis.saliency`) for transformers models loaded by
:class:`analysis.hf.HFUpstream`: the :class:`~analysis.saliency_model.SaliencyModel` of a wav2vec2 /
HuBERT CTC model (:class:`HFCTCSaliency`) and of Whisper (:class:`WhisperSaliency`).

Both are stateful per utterance: :meth:`prepare` takes the 16 kHz waveform, runs the model's own
feature extractor once (no gradient through it) and returns the ``(T, F)`` features the saliency
methods perturb; ``tokens`` / ``score`` / ``capture`` then work on that utterance. Masking (SPES-like
perturbation, deletion) sets features to 0 and integrated gradients start from all-zero features;
both adapters place 0 at *silence*.

wav2vec2 / HuBERT CTC (the input is the waveform, not log-Mel):

- features: ``z (T, 1)``, all 1 as given, setting the gain ``z ** 4`` of each *segment* of the model's
  input (the feature extractor's output, the waveform normalised to zero mean and unit variance when
  the extractor normalises). A segment is ``g = gcd(stride, receptive field)`` samples of the conv feature encoder
  (:func:`analysis.hf_loading.conv_receptive_field`; 80 samples = 5 ms for 320 / 400), so that encoder frame
  ``m`` sees exactly the segments ``(stride / g) m .. (stride / g) m + receptive field / g - 1`` and relevance
  pools to encoder frames as for our front end (mean over those segments). Perturbation masks are time
  segments of the waveform ("time x nothing": the mask cells' frequency size is clipped to the single
  column; with the default cell sizes, 25, 50 and 100 ms); a masked or deleted segment is silenced
  (gain 0, i.e. the normalised waveform's mean). Gradient methods give the waveform's attributions
  summed over each segment (chain rule: ``d score / d gain = sum_s x_s d score / d x_s``): integrated
  gradients from ``z = 0`` follow the waveform's straight path from silence, the same path and integral
  (Sundararajan et al., 2017, Sec. 3: path attributions do not depend on its parametrisation), but
  ``gain = z ** 4`` puts the quadrature points near silence, where the output changes: the conv feature
  encoder (no conv bias, a group norm or layer norm after the first convolution) is invariant to the
  input's scale, so along the path the score moves only for gains below about 0.01 (on the tiny test
  models, plain ``z`` misses integrated gradients' completeness by 25-40 %, ``z ** 4`` meets it within 1 %
  at 32 steps for the group-norm encoder of ``wav2vec2-base``). Encoders with a layer norm after
  every convolution (``do_stable_layer_norm``, the ``-large`` models) change over many decades of scale
  near silence and integrated gradients do not converge there: use the perturbation method or
  gradient x input (which is 4 x the waveform's, a constant factor).
- tokens: the greedy CTC path (blank = the config's ``pad_token_id``), scored at their emitting
  frame; attention rows, rollout and ``encoder_output`` (each layer's input states) as for our CTC models.

Whisper (Papi, Fucci, Gaido, Negri & Bentivogli, 2025, "Cross-Attention is Half Explanation in
Speech-to-Text Models", the setting of that paper):

- features: Whisper's log-Mel features of the frames whose centre lies in the audio
  (:func:`analysis.hf_loading.whisper_frames` of the extractor's hop), minus the window's *silence level*
  (the lowest value of the features: the padding that fills Whisper's 30 s window sits on the
  extractor's floor); the rest of the window is held as the extractor made it. Relevance pools to
  encoder frames by Whisper's two convolutions (kernel 3, padding 1, strides 1 and 2: frame ``m`` sees
  log-Mel frames ``2m - 2 .. 2m + 2``).
- tokens: the greedy transcript (:meth:`~analysis.hf.HFUpstream.greedy_ids`) after the decoder prompt,
  end-of-text excluded; each token teacher-forced and scored by its log-probability (full softmax) at
  the decoder position that predicts it.
- attention: the token's *cross-attention* row of each decoder layer (per head), cut to the encoder
  frames covering the audio and renormalised over them (as :class:`~analysis.hf.HFUpstream` does for
  the encoder maps); no rollout (cross-attention maps do not chain). ``encoder_output``: gradient x
  input w.r.t. the encoder output that cross-attention reads (the same states for every decoder layer),
  the paper's second comparison; deletion silences the removed frames' log-Mel receptive fields.
"""

from __future__ import annotations

import math

import torch

from analysis.hf import HFUpstream
from analysis.hf_loading import conv_receptive_field, whisper_frames
from analysis.saliency_model import Capture, Token, ctc_emissions, token_index


def hf_saliency(up: HFUpstream):
    """The saliency interface of a loaded transformers model; a model without output tokens (a base
    wav2vec2 / HuBERT without CTC head) is refused here, before any work."""
    if up.family == "whisper":
        return WhisperSaliency(up)
    if not hasattr(up.model, "lm_head"):
        raise ValueError(
            f"--upstream-ckpt {up.source}: {up.summary['class']} has no CTC head, so no token to explain; "
            f"saliency needs Wav2Vec2ForCTC, HubertForCTC or Whisper"
        )
    return HFCTCSaliency(up)


class _Prepared:
    """Common per-utterance state: the features :meth:`prepare` returned."""

    _shape = None

    def _check(self, features: torch.Tensor) -> None:
        if self._shape is None or tuple(features.shape[-2:]) != self._shape:
            raise ValueError(
                f"features {tuple(features.shape)} are not those of the prepared utterance "
                f"{self._shape}: call prepare(wave) first"
            )


class HFCTCSaliency(_Prepared):
    """:class:`~analysis.saliency_model.SaliencyModel` of a wav2vec2 / HuBERT CTC model: features
    ``z (T, 1)`` set the gains ``z ** power`` of the model input's segments (module docstring)."""

    power = 4

    def __init__(self, up: HFUpstream):
        kernels, strides = tuple(up.config.conv_kernel), tuple(up.config.conv_stride)
        stride, field = math.prod(strides), conv_receptive_field(kernels, strides)
        self.up, self.segment = up, math.gcd(stride, field)
        self.subsampling, self.receptive_field, self.frame_offset = stride // self.segment, field // self.segment, 0
        self.computes = [True] * up.num_layers
        self.blank = int(up.config.pad_token_id or 0)
        self.settings = {
            "model": f"{up.summary['class']} ({up.source})",
            "input": f"z, setting the gain z ** {self.power} of each {self.segment}-sample segment "
            f"({1000 * self.segment / 16000:g} ms) of the model's normalised waveform (0: silenced)",
            "token_score": f"log-probability at the emitting frame (greedy CTC path, blank {self.blank})",
            "deletion": "the removed frames' receptive fields silenced (normalised waveform set to 0)",
            "segment_samples": self.segment,
        }

    def prepare(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave (samples,)`` 16 kHz -> ``z (T, 1)`` all 1, ``T = ceil(samples / segment)``."""
        self._x = self.up.model_input(wave)["input_values"][0].detach()  # (samples,)
        T = math.ceil(self._x.numel() / self.segment)
        self._shape = (T, 1)
        return torch.ones(T, 1, dtype=self._x.dtype, device=self._x.device)

    def _input(self, z: torch.Tensor) -> torch.Tensor:  # (B, T, 1) -> (B, samples)
        self._check(z)
        return self._x * (z[..., 0] ** self.power).repeat_interleave(self.segment, -1)[:, : self._x.numel()]

    def _log_probs(self, gains: torch.Tensor, **kw):
        out = self.up.model(input_values=self._input(gains), **kw)
        return torch.log_softmax(out.logits.float(), -1), out

    def tokens(self, features: torch.Tensor) -> list[Token]:
        with torch.no_grad():
            return ctc_emissions(self._log_probs(features[None])[0][0], self.blank)

    def score(self, features: torch.Tensor, tokens: list[Token]) -> torch.Tensor:
        frames, ids = token_index(tokens, features.device)
        return self._log_probs(features)[0][:, frames, ids]

    def capture(self, features: torch.Tensor, tokens: list[Token]) -> Capture:
        frames, ids = token_index(tokens, features.device)
        gains = features.detach()[None].requires_grad_(True)  # the states depend on it, whatever the weights
        with self.up.capture(self.up.layers) as (calls, _):
            log_probs, out = self._log_probs(gains, output_attentions=True)
        maps = [a[0].float() for a in out.attentions]
        states = [c[0][0] if c[0] else c[1]["hidden_states"] for c in calls]  # what each layer received
        return Capture(log_probs[0, frames, ids], [m[:, frames] for m in maps], maps, states)


class WhisperSaliency(_Prepared):
    """:class:`~analysis.saliency_model.SaliencyModel` of Whisper: features are the log-Mel frames
    covering the audio minus the silence level ``(T, n_mels)``; attention is cross-attention."""

    def __init__(self, up: HFUpstream):
        c1, c2 = up.encoder.conv1, up.encoder.conv2
        self.up = up
        self.subsampling = c1.stride[0] * c2.stride[0]
        self.receptive_field = conv_receptive_field(
            (c1.kernel_size[0], c2.kernel_size[0]), (c1.stride[0], c2.stride[0])
        )
        self.frame_offset = c1.padding[0] + c2.padding[0] * c1.stride[0]
        self.hop = int(up.feature_extractor.hop_length)
        self.computes = [True] * len(up.decoder.layers)
        self.settings = {
            "model": f"{up.summary['class']} ({up.source})",
            "input": "Whisper's log-Mel frames covering the audio, minus the window's silence level (0: silence)",
            "token_score": "log-probability of each greedy-transcript token, teacher-forced (prompt and "
            "end-of-text not scored)",
            "attention": "decoder cross-attention row of each token (layers are decoder layers), cut to the "
            "encoder frames covering the audio and renormalised",
            "encoder_output_method": "gradient x input of the encoder output that cross-attention reads",
            "deletion": "log-Mel of the removed frames' receptive fields set to the silence level",
        }

    def prepare(self, wave: torch.Tensor) -> torch.Tensor:
        """``wave (samples,)`` 16 kHz -> ``(T, n_mels)`` features; decodes the greedy transcript."""
        up = self.up
        mel = up.model_input(wave)["input_features"][0].t().detach()  # (window frames, n_mels)
        T = whisper_frames(wave.numel(), self.hop)
        self._silence = mel.min()
        self._tail = mel[T:]
        self._frames = up.num_frames(wave.numel())  # encoder frames covering the audio
        ids = up.greedy_ids(wave)
        start = len(up.prompt_ids())
        end = len(ids) - (ids[-1] == up.config.eos_token_id)
        self._ids = torch.tensor(ids, device=mel.device)
        self._tokens = [Token(v, None) for v in ids[start:end]]
        self._positions = torch.arange(start - 1, end - 1, device=mel.device)  # the position predicting each
        self._shape = (T, mel.shape[1])
        return mel[:T] - self._silence

    def tokens(self, features: torch.Tensor) -> list[Token]:
        self._check(features)
        return list(self._tokens)

    def _encode(self, features: torch.Tensor) -> torch.Tensor:  # (B, T, F) -> encoder output (B, S, d)
        self._check(features)
        x = torch.cat([features + self._silence, self._tail.expand(features.shape[0], -1, -1)], 1)
        return self.up.encoder(input_features=x.transpose(1, 2)).last_hidden_state

    def _decode(self, enc: torch.Tensor, tokens: list[Token], **kw):
        if [t.id for t in tokens] != [t.id for t in self._tokens]:
            raise ValueError("tokens are not those of the prepared utterance's greedy transcript")
        ids = self._ids[None].expand(enc.shape[0], -1)
        out = self.up.model(encoder_outputs=(enc,), decoder_input_ids=ids, use_cache=False, **kw)
        ids_scored = self._ids[self._positions + 1]
        return torch.log_softmax(out.logits.float(), -1)[:, self._positions, ids_scored], out

    def score(self, features: torch.Tensor, tokens: list[Token]) -> torch.Tensor:
        return self._decode(self._encode(features), tokens)[0]

    def capture(self, features: torch.Tensor, tokens: list[Token]) -> Capture:
        enc = self._encode(features.detach()[None].requires_grad_(True))
        # the frames covering the audio as their own tensor on the path: their gradient is the saliency
        audio, rest = enc[:, : self._frames], enc[:, self._frames :]
        scores, out = self._decode(torch.cat([audio, rest], 1), tokens, output_attentions=True)
        rows = []
        for c in out.cross_attentions:  # (1, H, positions, window frames)
            r = c[0][:, self._positions, : self._frames].float()
            rows.append(r / r.sum(-1, keepdim=True))
        return Capture(scores[0], rows, None, [audio] * len(rows))
