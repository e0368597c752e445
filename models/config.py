"""The model's options, typed and listed once: :class:`ModelConfig`.

Everything that names a model option is derived from this one dataclass: :class:`models.ConformerCTC`'s
keyword arguments, the hyper-parameters a checkpoint records (:mod:`models.checkpoint`), the
training module's ``--model.*`` options (:mod:`training.module`, the recipes' ``model:`` keys), the
options a retrofit or ``--model.init_from`` keeps (:data:`FUNCTION_OPTIONS`) and the options of a
converted ESPnet model (:func:`models.espnet.model_options`).

A field's ``role`` says what it changes: ``plan`` (the reuse plan), ``function`` (the function the
trained model computes: sizes, front end, normalisation) or ``training`` (regularisation and
BatchNorm momentum, which act only while training).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field


def _option(default, role: str):
    return field(default=default, metadata={"role": role})


@dataclass(frozen=True)
class ModelConfig:
    """Options of :class:`models.ConformerCTC` besides its vocabulary size. The defaults are the
    paper's Conformer-M baseline (Shim, Choi, Sung, ICLR 2022).

    reuse: reuse plan string, e.g. ``"1(H4)x16"`` (baseline) or ``"4(H8)x4"`` (see :mod:`models.reuse`).
    d_model, num_layers, ffn_dim, kernel_size: Conformer size (Conformer-M: 256, 16, 1024, 31).
    dropout, attention_dropout: hidden and attention-probability dropout.
    was_gamma: weak attention suppression (None = off; the paper's value is 0.5).
    bn_momentum: BatchNorm momentum of the convolution modules (PyTorch convention).
    subsampling_channels: channels of the Conv2d front end.
    input_dim: feature width (80 log-Mel bins).
    layer_norm_eps: epsilon of every LayerNorm (ours 1e-5; ESPnet's 1e-12).
    final_norm: a LayerNorm after the last block (ESPnet's ``after_norm``); the hidden states stay
        the blocks' outputs, the encoder output is normalised.
    input_layer: the Conv2d front end, ``conv2d`` (time / 4, 40 ms frames), ``conv2d6`` or ``conv2d8``
        (see :mod:`models.subsampling`).

    The last three exist to hold converted ESPnet models (:mod:`models.espnet`).
    """

    reuse: str = _option("1(H4)x16", "plan")
    d_model: int = _option(256, "function")
    num_layers: int = _option(16, "function")
    ffn_dim: int = _option(1024, "function")
    kernel_size: int = _option(31, "function")
    dropout: float = _option(0.1, "training")
    attention_dropout: float = _option(0.1, "training")
    was_gamma: float | None = _option(None, "function")
    bn_momentum: float = _option(0.005, "training")
    subsampling_channels: int = _option(256, "function")
    input_dim: int = _option(80, "function")
    layer_norm_eps: float = _option(1e-5, "function")
    final_norm: bool = _option(False, "function")
    input_layer: str = _option("conv2d", "function")

    @classmethod
    def from_mapping(cls, options: Mapping) -> ModelConfig:
        """The model options among ``options`` (e.g. a checkpoint's hyper-parameters, which hold
        training options beside them); the defaults for those it lacks."""
        return cls(**{k: options[k] for k in MODEL_KEYS if k in options})

    def replace(self, **changes) -> ModelConfig:
        """A copy with ``changes``; an unknown option raises ``TypeError`` naming it."""
        return dataclasses.replace(self, **changes)

    def options(self, role: str | None = None) -> dict:
        """The options as a dict, in field order; only those of ``role`` if given."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if role is None or f.metadata["role"] == role
        }


MODEL_KEYS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(ModelConfig))
# what a retrofit keeps and ``--model.init_from`` refuses to change (besides the plan)
FUNCTION_OPTIONS: tuple[str, ...] = tuple(ModelConfig().options("function"))


def _parameters() -> list[inspect.Parameter]:
    """One keyword-only parameter per option, with its resolved type and default."""
    hints = typing.get_type_hints(ModelConfig)
    return [
        inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
        for f in dataclasses.fields(ModelConfig)
    ]


def takes_model_options(func: Callable) -> Callable:
    """Gives ``func``, which takes the model options as ``**options``, the signature that lists
    them: its ``**options`` replaced by one keyword-only parameter per :class:`ModelConfig` field,
    placed first among its keyword-only parameters. ``inspect.signature``, ``help()`` and
    jsonargparse (which builds ``train.py``'s ``--model.*`` options from the training module's
    signature) see the flat options; the function still receives them as ``**options``."""
    sig = inspect.signature(func)
    params = list(sig.parameters.values())
    if not params or params[-1].kind is not inspect.Parameter.VAR_KEYWORD:
        raise TypeError(f"{func.__qualname__} must end with **options to take the model options")
    params = params[:-1]
    clash = set(MODEL_KEYS) & {p.name for p in params}
    if clash:
        raise TypeError(f"{func.__qualname__} has parameters named like model options: {sorted(clash)}")
    first_kw = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(params))
    params[first_kw:first_kw] = _parameters()
    func.__signature__ = sig.replace(parameters=params)
    return func


def model_config_of(options: Mapping, base: ModelConfig | None = None) -> ModelConfig:
    """``base`` (default: the defaults) with ``options``; an unknown option raises ``TypeError``
    naming it (as a misspelt keyword argument would)."""
    unknown = sorted(set(options) - set(MODEL_KEYS))
    if unknown:
        raise TypeError(
            f"unknown model option(s) {', '.join(map(repr, unknown))}; the options are {', '.join(MODEL_KEYS)}"
        )
    return (base or ModelConfig()).replace(**options)


__all__ = ["FUNCTION_OPTIONS", "MODEL_KEYS", "ModelConfig", "model_config_of", "takes_model_options"]
