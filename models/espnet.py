"""ESPnet <-> ours: the Conformer-CTC of an ESPnet ``config.yaml`` as :class:`models.ConformerCTC`
options, the state-dict mapping both ways, and espnet2's ``ConformerEncoder`` holding our weights
(the same-architecture peer of the latency benchmark).

espnet2's ``ConformerEncoder`` with ``rel_pos_type: latest``, ``macaron_style``, the convolution
module, pre-norm and Swish is our encoder, block for block (same parameter names inside the
attention), except for three options that :class:`models.ConformerCTC` carries for it:
``layer_norm_eps`` (ESPnet's LayerNorm uses 1e-12), ``final_norm`` (its ``after_norm`` after the
last block) and ``input_layer`` (conv2d / conv2d6 / conv2d8). Its CTC head is ``ctc.ctc_lo`` over
the config's ``token_list``. What would change the function (legacy rel-pos, interCTC, another
encoder, concat_after, ...) is refused by :func:`model_options`, naming the option.

Checked against espnet 202511's own modules in ``tests/test_espnet.py``.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from data.framing import INPUT_LAYERS
from models.config import ModelConfig
from models.ctc import ConformerCTC

ESPNET_LAYER_NORM_EPS = 1e-12

# ours <- ESPnet, inside ``encoder.layers.{i}.`` <- ``encoder.encoders.{i}.``
_LAYER_KEYS = (
    ("ffn1.net.0.", "norm_ff_macaron."),
    ("ffn1.net.1.", "feed_forward_macaron.w_1."),
    ("ffn1.net.4.", "feed_forward_macaron.w_2."),
    ("norm_mha.", "norm_mha."),
    ("self_attn.", "self_attn."),
    ("conv.norm.", "norm_conv."),
    ("conv.pointwise1.", "conv_module.pointwise_conv1."),
    ("conv.depthwise.", "conv_module.depthwise_conv."),
    ("conv.batch_norm.", "conv_module.norm."),
    ("conv.pointwise2.", "conv_module.pointwise_conv2."),
    ("ffn2.net.0.", "norm_ff."),
    ("ffn2.net.1.", "feed_forward.w_1."),
    ("ffn2.net.4.", "feed_forward.w_2."),
    ("norm_final.", "norm_final."),
)
_MODEL_KEYS = (
    ("frontend.conv.", "encoder.embed.conv."),
    ("encoder.after_norm.", "encoder.after_norm."),
    ("head.", "ctc.ctc_lo."),
)
# the front end's output projection as espnet 202511 writes it: the first of a Sequential with the
# positional encoding, except in Conv2dSubsampling8, where it stands alone (what espnet_peer loads)
_OUT_KEY = {"conv2d": "encoder.embed.out.0.", "conv2d6": "encoder.embed.out.0.", "conv2d8": "encoder.embed.out."}
# every layout ESPnet has written, for every input layer: ``out.0.*`` (conv2d8 too, until its
# positional encoding was taken out of the Sequential) and ``out.*`` (the Linear alone)
_OUT_PARAM = re.compile(r"encoder\.embed\.out\.(?:0\.)?(weight|bias)")

# encoder_conf: what each option must be for our encoder (None: any value; it only acts in training
# or is a size we take over)
_REQUIRED = {
    "normalize_before": True,
    "concat_after": False,
    "positionwise_layer_type": "linear",
    "macaron_style": True,
    "rel_pos_type": "latest",
    "pos_enc_layer_type": "rel_pos",
    "selfattention_layer_type": "rel_selfattn",
    "activation_type": "swish",
    "use_cnn_module": True,
    "zero_triu": False,
    "interctc_layer_idx": [],
    "interctc_use_conditioning": False,
    "ctc_trim": False,
    "qk_norm": False,
}
# ESPnet's defaults where they differ from what we require (an option left out of the config takes these)
_ESPNET_DEFAULTS = {"macaron_style": False, "rel_pos_type": "legacy"}
_FREE = {
    "output_size",
    "attention_heads",
    "linear_units",
    "num_blocks",
    "dropout_rate",
    "positional_dropout_rate",
    "attention_dropout_rate",
    "input_layer",
    "cnn_module_kernel",
    "stochastic_depth_rate",
    "layer_drop_rate",
    "max_pos_emb_len",
    "padding_idx",
    "positionwise_conv_kernel_size",
    "use_flash_attn",
}


class ConversionError(ValueError):
    """An ESPnet model this converter cannot hold exactly; the message names the option or key."""


def _key_pairs(num_layers: int, input_layer: str) -> list[tuple[str, str]]:
    pairs = [*_MODEL_KEYS, ("frontend.out.", _OUT_KEY[input_layer])]
    for i in range(num_layers):
        pairs += [(f"encoder.layers.{i}.{o}", f"encoder.encoders.{i}.{e}") for o, e in _LAYER_KEYS]
    return pairs


def _rename(key: str, pairs: list[tuple[str, str]]) -> str | None:
    for src, dst in pairs:
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


def ours_to_espnet(state: dict, num_layers: int, input_layer: str = "conv2d") -> dict:
    """Our ``ConformerCTC`` state dict -> ESPnet's keys (``encoder.*``, ``ctc.ctc_lo.*``)."""
    pairs = _key_pairs(num_layers, input_layer)
    out = {}
    for k, v in state.items():
        new = _rename(k, pairs)
        if new is None:
            raise ConversionError(f"our key {k!r} has no ESPnet counterpart (a reuse plan's layer?)")
        out[new] = v
    return out


def espnet_to_ours(state: dict, num_layers: int, input_layer: str = "conv2d") -> tuple[dict, list[str]]:
    """ESPnet's ASR-model state dict -> ours; returns ``(state, ignored keys)``. The front end's
    output layer is taken in every layout ESPnet has written (``encoder.embed.out.0.*`` or
    ``encoder.embed.out.*``, whatever the input layer). Ignored: the
    attention decoder and its losses (a hybrid CTC/attention model), the front end's Mel matrix
    and the normalisation's statistics (checked and used by :func:`convert`). Any other key not
    part of the encoder or CTC head raises :class:`ConversionError`."""
    pairs = [(e, o) for o, e in _key_pairs(num_layers, input_layer)]
    layouts = {k for k in state if _OUT_PARAM.fullmatch(k)}
    if len(layouts) > len({_OUT_PARAM.fullmatch(k).group(1) for k in layouts}):
        raise ConversionError(f"the state dict holds the front end's output layer twice ({', '.join(sorted(layouts))})")
    out, ignored = {}, []
    for k, v in state.items():
        m = _OUT_PARAM.fullmatch(k)
        new = f"frontend.out.{m.group(1)}" if m else _rename(k, pairs)
        if new is not None:
            out[new] = v
        elif k.startswith(("decoder.", "criterion_att.", "frontend.", "normalize.", "lang_token")):
            ignored.append(k)
        else:
            raise ConversionError(
                f"state dict key {k!r} is not part of the Conformer encoder, CTC head, front end "
                f"or decoder this converter knows (a preencoder, postencoder or other module?)"
            )
    return out, ignored


def model_options(config: dict) -> tuple[ModelConfig, list[str]]:
    """The model options of an ESPnet ASR ``config.yaml`` (:class:`ConformerCTC`'s, without the
    vocabulary size), and notes on what is left aside; raises :class:`ConversionError` for what
    would change the function."""
    notes = []
    encoder = config.get("encoder")
    if encoder != "conformer":
        raise ConversionError(f"encoder: {encoder!r} is not supported (only 'conformer')")
    for module in ("preencoder", "postencoder"):
        if config.get(module):
            raise ConversionError(
                f"{module}: {config[module]!r} is not supported (it changes the encoder's input or output)"
            )
    conf = dict(config.get("encoder_conf") or {})
    unknown = sorted(set(conf) - set(_REQUIRED) - _FREE)
    if unknown:
        raise ConversionError(f"encoder_conf: option {unknown[0]!r} is not known to this converter")
    for option, required in _REQUIRED.items():
        value = conf.get(option, _ESPNET_DEFAULTS.get(option, required))
        if value != required and not (option == "interctc_layer_idx" and not value):
            raise ConversionError(
                f"encoder_conf: {option}: {value!r} is not supported (needs {required!r})"
                + (" (ESPnet's default when left out)" if option not in conf else "")
            )
    input_layer = conf.get("input_layer", "conv2d")
    if input_layer not in INPUT_LAYERS:
        raise ConversionError(
            f"encoder_conf: input_layer: {input_layer!r} is not supported (expected one of {', '.join(INPUT_LAYERS)})"
        )
    for option in ("stochastic_depth_rate", "layer_drop_rate"):
        if conf.get(option):
            notes.append(
                f"encoder_conf: {option} {conf[option]} acts in training only; fine-tuning here does not apply it"
            )
    d_model = int(conf.get("output_size", 256))
    heads, blocks = int(conf.get("attention_heads", 4)), int(conf.get("num_blocks", 6))
    frontend = config.get("frontend")
    if frontend is None:
        raise ConversionError("frontend: null (features computed outside the model) is not supported")
    if frontend != "default":
        raise ConversionError(f"frontend: {frontend!r} is not supported (only 'default')")
    n_mels = int((config.get("frontend_conf") or {}).get("n_mels", 80))
    options = ModelConfig(
        input_dim=n_mels,
        d_model=d_model,
        num_layers=blocks,
        ffn_dim=int(conf.get("linear_units", 2048)),
        kernel_size=int(conf.get("cnn_module_kernel", 31)),
        reuse=f"1(H{heads})x{blocks}",
        dropout=float(conf.get("dropout_rate", 0.1)),
        attention_dropout=float(conf.get("attention_dropout_rate", 0.0)),
        subsampling_channels=d_model,
        layer_norm_eps=ESPNET_LAYER_NORM_EPS,
        final_norm=True,
        input_layer=input_layer,
    )
    return options, notes


def frontend_options(config: dict) -> dict:
    """:class:`data.espnet_frontend.EspnetFrontend` keyword arguments of the config's
    ``frontend_conf`` (ESPnet's ``DefaultFrontend`` defaults for what is left out); refuses the
    multi-channel enhancement front end."""
    conf = dict(config.get("frontend_conf") or {})
    fs = conf.pop("fs", config.get("fs", 16000))
    if isinstance(fs, str):  # ESPnet accepts "16k"
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kK]?)\s*", fs)
        if not m:
            raise ConversionError(f"frontend_conf: fs {fs!r} is not a sampling rate")
        fs = float(m.group(1)) * (1000 if m.group(2) else 1)
    inner = conf.pop("frontend_conf", None)
    if inner and (inner.get("use_wpe") or inner.get("use_beamformer")):
        raise ConversionError("frontend_conf: the multi-channel WPE / beamformer front end is not supported")
    if conf.pop("apply_stft", True) is not True:
        raise ConversionError("frontend_conf: apply_stft: false (features given as a spectrum) is not supported")
    known = {
        "n_fft",
        "win_length",
        "hop_length",
        "window",
        "center",
        "normalized",
        "onesided",
        "n_mels",
        "fmin",
        "fmax",
        "htk",
    }
    unknown = sorted(set(conf) - known)
    if unknown:
        raise ConversionError(f"frontend_conf: option {unknown[0]!r} is not known to this converter")
    if int(fs) != 16000:
        raise ConversionError(f"frontend_conf: fs {fs} is not supported (our audio is read at 16 kHz)")
    defaults = dict(
        n_fft=512,
        win_length=None,
        hop_length=128,
        window="hann",
        center=True,
        normalized=False,
        onesided=True,
        n_mels=80,
        fmin=None,
        fmax=None,
        htk=False,
    )
    return {"fs": int(fs), **defaults, **conf}


class EspnetPeer(nn.Module):
    """espnet2's ``ConformerEncoder`` with a baseline model's weights, called as ours:
    ``(features (B, T, input_dim), lengths (B,)) -> (output (B, T', d), lengths (B,))``."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out, out_lengths, _ = self.encoder(features, lengths)
        return out, out_lengths


def encoder_kwargs(model: ConformerCTC) -> dict:
    """espnet2 ``ConformerEncoder`` arguments of the same architecture as ``model`` (a baseline)."""
    if any(p.reuses for p in model.plans) or len(set(model.num_heads)) != 1:
        raise ConversionError(
            f"plan {model.reuse!r}: ESPnet's encoder has one head count and no map reuse; "
            f"only a baseline 1(Hh)xL has an ESPnet peer"
        )
    c = model.model_config
    return dict(
        input_size=c.input_dim,
        output_size=c.d_model,
        attention_heads=model.num_heads[0],
        linear_units=c.ffn_dim,
        num_blocks=c.num_layers,
        dropout_rate=c.dropout,
        positional_dropout_rate=c.dropout,
        attention_dropout_rate=c.attention_dropout,
        input_layer=c.input_layer,
        normalize_before=True,
        macaron_style=True,
        rel_pos_type="latest",
        pos_enc_layer_type="rel_pos",
        selfattention_layer_type="rel_selfattn",
        activation_type="swish",
        use_cnn_module=True,
        cnn_module_kernel=c.kernel_size,
    )


def espnet_peer(model: ConformerCTC) -> EspnetPeer:
    """espnet2's ``ConformerEncoder`` (espnet must be importable) built with ``model``'s
    architecture and holding its encoder weights, in eval mode: the same function as
    ``model.encode(...).output`` (its LayerNorm eps set to ours, its ``after_norm`` dropped where
    ``model`` has none), so that a latency row times the same model in ESPnet's code."""
    from espnet2.asr.encoder.conformer_encoder import ConformerEncoder as EspnetEncoder

    c = model.model_config
    if c.subsampling_channels != c.d_model:
        raise ConversionError(
            f"subsampling_channels {c.subsampling_channels} != d_model {c.d_model}: ESPnet's "
            f"Conv2d front end has d_model channels"
        )
    encoder = EspnetEncoder(**encoder_kwargs(model))
    if not c.final_norm:
        encoder.after_norm = nn.Identity()
    for m in encoder.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = c.layer_norm_eps
    state = {
        k[len("encoder.") :]: v
        for k, v in ours_to_espnet(model.state_dict(), model.num_layers, c.input_layer).items()
        if k.startswith("encoder.")
    }
    encoder.load_state_dict(state, strict=True)
    p = next(model.parameters())
    return EspnetPeer(encoder).to(device=p.device, dtype=p.dtype).eval()
