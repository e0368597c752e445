"""Self-supervised upstreams (TERA / Mockingjay, from s3prl) behind the capture interface of
:class:`models.ConformerCTC`: ``encode(features, lengths, return_attentions, return_hidden_states,
head_mask)`` -> :class:`models.EncoderOutput`, so that every analysis of :mod:`analysis` runs on them.

s3prl is an optional extra (``pip install '.[s3prl]'``, tested with s3prl 0.4.18 on torch /
torchaudio 2.11). Only the modules needed are imported — ``s3prl.upstream.mockingjay.model`` (the
transformer), ``.builder`` (its position table), ``s3prl.upstream.baseline.preprocessor`` /
``extracter`` (the features the checkpoint's config names) — never s3prl's hub (``s3prl.hub``),
whose imports call ``torchaudio.set_audio_backend`` and use ``torchaudio.sox_effects``, both gone
from torchaudio >= 2.9. No compatibility shim is needed.

The checkpoint is the ``.ckpt`` that s3prl's hub downloads for ``tera`` / ``mockingjay``: a dict
with the upstream config (``Upstream_Config``, or ``Config`` in legacy files, holding
``transformer`` and ``audio``) and the weights (``Transformer``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from models.ctc import EncoderOutput, normalise_head_mask

S3PRL_HELP = (
    "s3prl is not installed; install the optional extra with `pip install '.[s3prl]'` (or `pip install s3prl==0.4.18`)"
)
FRAME_SHIFT = 0.01  # TERA / Mockingjay run on 10 ms frames (no subsampling)
FRAME_WINDOW = 0.025


def _import(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{S3PRL_HELP} ({e})") from None


def upstream_config(states: dict, path: str | Path = "checkpoint") -> dict:
    """The upstream config (``transformer`` and ``audio``) of a TERA / Mockingjay checkpoint."""
    for key in ("Upstream_Config", "Config"):
        cfg = states.get(key)
        if isinstance(cfg, Mapping) and "transformer" in cfg:
            return dict(cfg)
    raise ValueError(f"{path}: not a TERA / Mockingjay checkpoint (no Upstream_Config or Config with 'transformer')")


class TeraUpstream(nn.Module):
    """A TERA / Mockingjay transformer built with s3prl's classes, with our capture interface.

    Attributes ``num_layers``, ``num_heads`` (one per layer), ``d_model``, ``frame_shift``.
    """

    def __init__(self, config: dict, weights: Mapping[str, torch.Tensor] | None = None):
        super().__init__()
        mj = _import("s3prl.upstream.mockingjay.model")
        self._position_encoding = _import("s3prl.upstream.mockingjay.builder").position_encoding
        self.config = config
        audio = dict(config.get("audio") or {})
        if "kaldi" in audio:
            get_extracter = _import("s3prl.upstream.baseline.extracter").get_extracter
            self.extracter, input_dim, _ = get_extracter(audio)
            self.target_level = None
        elif audio:
            get_preprocessor = _import("s3prl.upstream.baseline.preprocessor").get_preprocessor
            self.extracter, input_dim, _ = get_preprocessor(audio, process_input_only=True)
            self.target_level = audio.get("target_level", -25)
        else:
            self.extracter, input_dim, self.target_level = None, int(config["transformer"]["input_dim"]), None
        self.model_config = mj.TransformerConfig(config["transformer"])
        self.model = mj.TransformerModel(self.model_config, input_dim, output_attentions=True)
        if weights is not None:
            weights = {k.replace("gamma", "weight").replace("beta", "bias"): v for k, v in weights.items()}
            try:
                self.model.load_state_dict(weights)
            except RuntimeError as e:
                raise ValueError(f"TERA weights do not fit the transformer its config describes ({e})") from None
        self.input_dim = input_dim
        self.d_model = self.model_config.hidden_size
        self.num_layers = self.model_config.num_hidden_layers
        self.num_heads = [self.model_config.num_attention_heads] * self.num_layers
        self.frame_shift, self.frame_window = FRAME_SHIFT, FRAME_WINDOW
        self.eval()

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> TeraUpstream:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such TERA / Mockingjay checkpoint")
        try:
            states = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # a text file, a truncated download
            raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
        if not isinstance(states, Mapping) or "Transformer" not in states:
            raise ValueError(f"{path}: not a TERA / Mockingjay checkpoint (no 'Transformer' weights)")
        return cls(upstream_config(states, path), states["Transformer"])

    # --- features -------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """``(samples,)`` 16 kHz waveform -> ``(T, input_dim)`` features, as s3prl's builder makes them."""
        if self.extracter is None:
            raise ValueError("this checkpoint's config has no 'audio' section: pass features directly")
        if self.target_level is None:  # kaldi-style extracter
            return self.extracter(wave)
        rms = wave.pow(2).mean().sqrt()
        wave = wave * (10 ** (self.target_level / 20)) / (rms + 1e-10)
        return self.extracter(wave.view(1, 1, -1), wavs_len=[wave.numel()])[0][0]

    def label_frames(self, num_frames: int) -> int:
        return num_frames

    # --- capture interface ------------------------------------------------------------------------
    def head_mask_tensor(self, head_mask) -> torch.Tensor | None:
        """``(num_layers, heads)`` 0/1 keep-mask from a tensor of that shape or ``{layer: [heads to mask]}``
        (:func:`models.ctc.normalise_head_mask`: the same forms and errors as our encoder's)."""
        masks = normalise_head_mask(head_mask, self.num_heads)
        if masks is None:
            return None
        return torch.stack([torch.ones(h) if m is None else m for m, h in zip(masks, self.num_heads)])

    def encode(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor,
        return_attentions: bool = False,
        return_hidden_states: bool = False,
        head_mask=None,
    ) -> EncoderOutput:
        """``features (B, T, input_dim)`` -> :class:`EncoderOutput` (maps ``(B, H, T, T)`` per layer,
        ``num_layers + 1`` hidden states). ``head_mask`` zeroes a head's attention probabilities,
        hence its output, before the output projection (s3prl's own head masking)."""
        if features.dim() != 3 or features.shape[-1] != self.input_dim:
            raise ValueError(f"features must be (B, T, {self.input_dim}); got {tuple(features.shape)}")
        if lengths.shape != (features.shape[0],):
            raise ValueError(f"lengths must be ({features.shape[0]},); got {tuple(lengths.shape)}")
        B, T, _ = features.shape
        mask = (torch.arange(T, device=features.device)[None, :] < lengths[:, None]).float()
        pos = self._position_encoding(T, self.d_model).to(features.device).expand(B, T, self.d_model)
        hm = self.head_mask_tensor(head_mask)
        attentions, hidden = self.model(
            features.float(),
            pos,
            mask,
            output_all_encoded_layers=True,
            head_mask=None if hm is None else hm.to(features.device),
        )
        return EncoderOutput(
            hidden[-1], lengths, attentions if return_attentions else None, hidden if return_hidden_states else None
        )

    def forward(self, features, lengths, head_mask=None):
        return self.encode(features, lengths, head_mask=head_mask).output


def build_random_tera(
    num_layers: int = 3, num_heads: int = 12, hidden_size: int = 768, seed: int = 0, audio: dict | None = None
) -> tuple[dict, TeraUpstream]:
    """A randomly initialised TERA (by default TERA-base's size: 3 layers, 12 heads, 768 dimensions) and its
    checkpoint dict, in the format s3prl's hub downloads; for tests and for trying the tools without a download."""
    torch.manual_seed(seed)
    config = {
        "transformer": {
            "hidden_size": hidden_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "intermediate_size": 4 * hidden_size if hidden_size < 768 else 3072,
            "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1,
            "initializer_range": 0.02,
            "layer_norm_eps": 1e-12,
            "share_layer": False,
            "pre_layer_norm": False,
        },
        "audio": audio
        or {
            "target_level": -25,
            "win_ms": 25,
            "hop_ms": 10,
            "n_freq": 201,
            "n_mels": 80,
            "n_mfcc": 13,
            "input": {"feat_type": "mel", "channel": 0, "log": True, "delta": 0, "cmvn": True},
            "target": {"feat_type": "linear", "channel": 1, "log": True, "delta": 0, "cmvn": True},
        },
        "task": {"sequence_length": 0},
    }
    upstream = TeraUpstream(config)
    states = {"Upstream_Config": config, "Transformer": upstream.model.state_dict(), "Config": {}}
    return states, upstream
