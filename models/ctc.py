"""Conformer-CTC: front end -> Conformer encoder (with a reuse plan) -> CTC projection."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from data.tokenizer import BLANK
from models.config import ModelConfig, model_config_of, takes_model_options
from models.conformer import ConformerEncoder
from models.reuse import format_reuse_config, parse_reuse_config
from models.subsampling import Conv2dSubsampling


def ctc_loss(
    log_probs: torch.Tensor, lengths: torch.Tensor, targets: torch.Tensor, target_lengths: torch.Tensor
) -> torch.Tensor:
    """The CTC loss of ``log_probs (B, T, V)`` (``lengths (B,)`` valid frames) against padded
    ``targets (B, S)`` (``target_lengths (B,)``), summed over the batch: computed in fp32 whatever
    the model's precision, blank :data:`~data.tokenizer.BLANK`, an impossible alignment (a target
    longer than its frames) counted 0 rather than infinity. What training, the zero-shot
    evaluation of reuse plans and the benchmark's training step all minimise or report."""
    return F.ctc_loss(
        log_probs.float().transpose(0, 1),
        targets,
        lengths,
        target_lengths,
        blank=BLANK,
        reduction="sum",
        zero_infinity=True,
    )


def host_reads_allowed() -> bool:
    """Whether code may read a tensor's value back to the host (``.item()``, ``bool(t.any())``):
    not while ``torch.compile`` traces (a graph break) nor while a CUDA stream is being captured
    into a graph (an error). Checks of input values are skipped there; shape checks, which read no
    tensor, still run."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def normalise_head_mask(head_mask, heads: list[int], device=None) -> list[torch.Tensor | None] | None:
    """Normalise a head mask to one ``(H_l,)`` 0/1 tensor (or None: keep every head) per layer of an
    encoder with ``heads[l]`` heads in layer ``l``.

    Accepts a ``(num_layers, max_heads)`` 0/1 tensor (1 keeps a head) or a mapping
    ``{layer: [heads to mask]}``; anything naming a layer or head the encoder lacks raises.
    """
    if head_mask is None:
        return None
    num_layers = len(heads)
    if isinstance(head_mask, Mapping):
        out: list[torch.Tensor | None] = [None] * num_layers
        for layer, masked in head_mask.items():
            if not 0 <= int(layer) < num_layers:
                raise ValueError(f"head mask names layer {layer}; the encoder has layers 0..{num_layers - 1}")
            m = torch.ones(heads[int(layer)], device=device)
            for h in masked:
                if not 0 <= int(h) < heads[int(layer)]:
                    raise ValueError(
                        f"head mask names head {h} of layer {layer}, which has heads 0..{heads[int(layer)] - 1}"
                    )
                m[int(h)] = 0
            out[int(layer)] = m
        return out
    mask = torch.as_tensor(head_mask, device=device)
    if mask.shape != (num_layers, max(heads)):
        raise ValueError(
            f"head mask must be (num_layers, max_heads) = ({num_layers}, {max(heads)}); got {tuple(mask.shape)}"
        )
    for layer, h in enumerate(heads):
        if (mask[layer, h:] != 1).any():
            raise ValueError(f"head mask masks a head >= {h} in layer {layer}, which has only {h} heads")
    return [mask[layer, :h].float() for layer, h in enumerate(heads)]


@dataclasses.dataclass
class EncoderOutput:
    """What :meth:`ConformerCTC.encode` returns.

    output: ``(B, T', d)`` encoder output; lengths: ``(B,)`` valid frames;
    attentions: one ``(B, H, T', T')`` map per layer, the map that layer *applied* (a reuse layer
    gives its group's shared map), or None; hidden_states: ``num_layers + 1`` tensors
    ``(B, T', d)``, index 0 the input of the first block, or None.
    """

    output: torch.Tensor
    lengths: torch.Tensor
    attentions: list[torch.Tensor] | None = None
    hidden_states: list[torch.Tensor] | None = None


class ConformerCTC(nn.Module):
    """Conformer-CTC acoustic model with layer-wise attention map reuse (Shim, Choi, Sung, ICLR 2022).

    Args:
        vocab_size: CTC outputs, blank (index 0) included (129 for 128 BPE units).
        config: the model options (:class:`models.config.ModelConfig`; default: its defaults, the
            paper's model), to which the keyword ``options`` (the same fields: ``d_model=...``,
            ``reuse=...``) are applied. ``ConformerCTC(V, cfg)`` and ``ConformerCTC(V, **options)``
            build the same model.

    ``model_config`` holds the options as built (the plan in its normal form); ``config`` the same
    as the constructor's keyword arguments, ``vocab_size`` included.
    """

    @takes_model_options
    def __init__(self, vocab_size: int, config: ModelConfig | None = None, **options):
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must count the blank and at least one token, got {vocab_size}")
        cfg = model_config_of(options, config)
        self.plans = parse_reuse_config(cfg.reuse, cfg.num_layers, cfg.d_model)
        self.reuse = format_reuse_config(self.plans)
        self.model_config = cfg.replace(reuse=self.reuse)
        self.vocab_size, self.input_dim, self.d_model, self.num_layers = (
            vocab_size,
            cfg.input_dim,
            cfg.d_model,
            cfg.num_layers,
        )
        self.frontend = Conv2dSubsampling(cfg.input_dim, cfg.d_model, cfg.subsampling_channels, cfg.input_layer)
        self.encoder = ConformerEncoder(
            self.plans,
            cfg.d_model,
            cfg.ffn_dim,
            cfg.kernel_size,
            cfg.dropout,
            cfg.attention_dropout,
            cfg.was_gamma,
            cfg.bn_momentum,
            cfg.layer_norm_eps,
            cfg.final_norm,
        )
        self.head = nn.Linear(cfg.d_model, vocab_size)

    @property
    def config(self) -> dict:
        """The constructor's keyword arguments: ``ConformerCTC(**model.config)`` is a model of the
        same size and plan."""
        return {"vocab_size": self.vocab_size, **self.model_config.options()}

    @property
    def num_heads(self) -> list[int]:
        return [p.num_heads for p in self.plans]

    def _check_inputs(self, features: torch.Tensor, lengths: torch.Tensor) -> None:
        """Shapes always; the values of ``lengths`` only where :func:`host_reads_allowed`."""
        if features.dim() != 3 or features.shape[-1] != self.input_dim:
            raise ValueError(f"features must be (B, T, {self.input_dim}); got {tuple(features.shape)}")
        if lengths.dim() != 1 or lengths.shape[0] != features.shape[0]:
            raise ValueError(f"lengths must be ({features.shape[0]},) to match the batch; got {tuple(lengths.shape)}")
        if not host_reads_allowed():
            return
        if (lengths > features.shape[1]).any() or (lengths < 1).any():
            raise ValueError(f"lengths {lengths.tolist()} must lie in 1..{features.shape[1]} (the padded length)")
        short = int(lengths.min())
        if short < self.frontend.min_frames:
            raise ValueError(
                f"an utterance of {short} frames is too short for the {self.frontend.input_layer} "
                f"subsampling (needs >= {self.frontend.min_frames} frames)"
            )

    def head_mask_tensor(self, head_mask, device=None) -> list[torch.Tensor | None] | None:
        """:func:`normalise_head_mask` for this model's heads per layer."""
        return normalise_head_mask(head_mask, self.num_heads, device)

    def map_sources(self, assignment) -> list[int] | None:
        """Normalise a zero-shot reuse assignment to one source layer per layer (or None).

        ``assignment``: a mapping ``{layer: source}`` (other layers keep their own maps) or a
        sequence of ``num_layers`` sources. Layer ``l`` then applies the map that layer ``s`` applied,
        to its own values: a model trained without reuse evaluated *as if* it reused maps. ``s``
        must be ``l`` itself or an earlier layer with as many heads; ``l`` must compute its own map
        in this model's plan (a reuse layer already applies its group's)."""
        if assignment is None:
            return None
        L = self.num_layers
        if isinstance(assignment, Mapping):
            sources = list(range(L))
            for layer, source in assignment.items():
                if not 0 <= int(layer) < L:
                    raise ValueError(f"map assignment names layer {layer}; the encoder has layers 0..{L - 1}")
                sources[int(layer)] = int(source)
        else:
            sources = [int(s) for s in assignment]
            if len(sources) != L:
                raise ValueError(f"map assignment gives {len(sources)} sources; the encoder has {L} layers")
        heads = self.num_heads
        for layer, source in enumerate(sources):
            if source == layer:
                continue
            if not 0 <= source < L:
                raise ValueError(f"map assignment: layer {layer} takes the map of layer {source}, outside 0..{L - 1}")
            if source > layer:
                raise ValueError(f"map assignment: layer {layer} cannot take the map of the later layer {source}")
            if heads[source] != heads[layer]:
                raise ValueError(
                    f"map assignment: layer {layer} has {heads[layer]} heads, layer {source} has {heads[source]}"
                )
            if self.plans[layer].reuses:
                raise ValueError(
                    f"map assignment: layer {layer} already reuses the map of layer "
                    f"{self.plans[layer].source} in this model's plan {self.reuse!r}"
                )
        return sources

    def encode(
        self,
        features: torch.Tensor,
        lengths: torch.Tensor,
        return_attentions: bool = False,
        return_hidden_states: bool = False,
        head_mask=None,
        map_sources=None,
    ) -> EncoderOutput:
        """Run the front end and the encoder; see :class:`EncoderOutput`. ``head_mask``: see
        :meth:`head_mask_tensor`; ``map_sources``: zero-shot reuse, see :meth:`map_sources`
        (the identity assignment, or None, is the model as trained)."""
        self._check_inputs(features, lengths)
        sources = self.map_sources(map_sources)
        x, out_lengths = self.frontend(features, lengths)
        padding_mask = torch.arange(x.shape[1], device=x.device)[None, :] >= out_lengths[:, None]
        out, attentions, hidden = self.encoder(
            x,
            padding_mask,
            return_attentions,
            return_hidden_states,
            self.head_mask_tensor(head_mask, x.device),
            sources,
        )
        return EncoderOutput(out, out_lengths, attentions, hidden)

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor, head_mask=None, map_sources=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``features (B, T, input_dim)``, ``lengths (B,)`` -> ``(log_probs (B, T', V) float32, out_lengths (B,))``."""
        enc = self.encode(features, lengths, head_mask=head_mask, map_sources=map_sources)
        return torch.log_softmax(self.head(enc.output).float(), dim=-1), enc.lengths
