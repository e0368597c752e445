"""What a row times, as modules: the torchaudio peer (:class:`Peer`), the ESPnet peer
(:class:`EspnetRow`), and any row's timed function (:class:`Timed`, which the ONNX engine exports)."""

from __future__ import annotations

import torch
from torch import nn

from data.framing import input_frames
from models import ConformerCTC
from models.subsampling import Conv2dSubsampling


class Peer(nn.Module):
    """The peer row: ``torchaudio.models.Conformer`` (:attr:`conformer`), behind :attr:`frontend`
    (our :class:`~models.subsampling.Conv2dSubsampling` at our rows' sizes) when the rows time the
    front end too, else None.

    ``forward(x (B, T, d), lengths (B,))``, or fbank features ``(B, input_frames(T), 80)`` with the
    front end, -> ``(B, T, d)``: the conformer's layers on the ``(T, B, d)``-transposed input with no
    key padding mask. That is ``conformer(x, lengths)`` where every length is full, as in the
    benchmark (its mask is then all False), without the host read (``lengths.max().item()``) by
    which it builds the mask, which a CUDA graph capture does not allow. Not for padded batches.
    """

    def __init__(self, conformer: nn.Module, frontend: Conv2dSubsampling | None = None):
        super().__init__()
        self.conformer, self.frontend = conformer, frontend

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.frontend is not None:
            x, lengths = self.frontend(x, lengths)
        x = x.transpose(0, 1)
        for layer in self.conformer.conformer_layers:
            x = layer(x, None)
        return x.transpose(0, 1)


class EspnetRow(nn.Module):
    """The ``espnet`` row, called as the other peer: ``forward(features, lengths)`` -> ``(B, T', d)``
    (espnet2's front end + encoder; :class:`models.espnet.EspnetPeer` also returns the lengths).
    ``input_layer``: its front end's layout (that of the model whose weights it carries)."""

    def __init__(self, peer: nn.Module, input_layer: str = "conv2d"):
        super().__init__()
        self.peer, self.input_layer = peer, input_layer

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.peer(x, lengths)[0]

    @property
    def max_frames(self) -> int | None:
        """Longest fbank input without growing espnet's position table (an export bound: ``extend_pe``
        branches on it), None if there is no such table. The table of ``2 L - 1`` relative positions
        covers ``L`` encoder frames: one input frame fewer than ``L + 1`` encoder frames need."""
        for m in self.peer.modules():
            pe = getattr(m, "pe", None)
            if isinstance(pe, torch.Tensor) and pe.dim() == 3:
                return input_frames((pe.size(1) + 1) // 2 + 1, self.input_layer) - 1
        return None


def espnet_importable() -> str | None:
    """Why the ``espnet`` peer cannot be built here, or None."""
    try:
        import espnet2.asr.encoder.conformer_encoder  # noqa: F401

        from models.espnet import espnet_peer  # noqa: F401
    except ImportError as e:
        return f"espnet2's ConformerEncoder is not importable ({e})"
    return None


def espnet_peer_module(ours: ConformerCTC) -> EspnetRow:
    """The ``espnet`` peer row: espnet2's ``ConformerEncoder`` (with its Conv2d front end) holding the
    weights of ``ours`` (our plan-free baseline), by :func:`models.espnet.espnet_peer`."""
    from models.espnet import espnet_peer

    return EspnetRow(espnet_peer(ours), ours.frontend.input_layer)


class Timed(nn.Module):
    """What a row of ``kind`` (``fused``, ``materialised`` or ``peer``) times, as a module:
    ``forward(x, lengths)`` -> the encoder output ``(B, T, d)``, as
    :meth:`analysis.latency.bench.Bench.forward_fn` calls it."""

    def __init__(self, kind: str, module: nn.Module, include_frontend: bool):
        super().__init__()
        self.kind, self.module, self.include_frontend = kind, module, include_frontend

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "peer":
            return self.module(x, lengths)
        materialised = self.kind == "materialised"
        if self.include_frontend:
            return self.module.encode(x, lengths, return_attentions=materialised).output
        return self.module.encoder(x, None, return_attentions=materialised)[0]


def autocast_call(module: nn.Module, x: torch.Tensor, lengths: torch.Tensor, device: str, dtype: torch.dtype):
    """A zero-argument callable: ``module(x, lengths)`` under ``torch.autocast`` to ``dtype``."""
    device_type = torch.device(device).type

    def call():
        with torch.autocast(device_type, dtype=dtype):
            return module(x, lengths)

    return call


def uncached(module: nn.Module) -> None:
    """Drops our model's position table and its cached projections, so that its next call computes
    them as a traced graph does (for the FLOP count of an ONNX row)."""
    from models.attention import RelPositionalEncoding, clear_position_caches

    for m in module.modules():
        if isinstance(m, RelPositionalEncoding):
            m.table = None
    clear_position_caches(module)
