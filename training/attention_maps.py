"""Attention maps in TensorBoard while training, as ESPnet's trainer plots them (its ``num_att_plot``).

At each validation of a fit, the self-attention maps of one fixed dev utterance are drawn for every
layer that computes its own maps (under layer-wise attention map reuse a layer applies its group's
map and has none of its own: Shim, Choi, Sung, *Understanding the Role of Self Attention for
Efficient Speech Recognition*, ICLR 2022), and the median over each layer's heads of the cumulative
attention diagonality (CAD, ibid. Eq. 3, :func:`analysis.cad.cad`) is written as a scalar. TensorBoard tags, layers
numbered from 1 and heads from 0 as in the analysis report's ``cad.csv``::

    attention/layerNN/mean    image: the head-averaged (T', T') map (rows query frames, columns key frames)
    attention/layerNN/heads   image: one panel per head
    cad/layerNN               scalar: median over the layer's heads of each head map's CAD
    attention/utterance       text: the utterance's id, frames and transcript

The utterance is the validation utterance with the smallest id over all ``data.valid_sets`` (the
next one if it cannot be read), decoded alone, so its maps hold its own frames and no padding; its
features are what validation computes (CMVN, no SpecAugment), the model is in eval mode, under the
validation precision, with gradients off. Its CAD covers every frame, silence included (``python -m
analysis`` drops silence frames by the alignment first, so its values differ).

Switched by the recipe's top-level ``attention_maps`` (``train.py``, default true); when false the
callback is not created and nothing is computed. Only rank 0 computes and logs under DDP (it calls
the bare model, not the DDP wrapper: no collective, no gradient). Without a TensorBoard logger
among the trainer's loggers it warns once and computes nothing.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from analysis.cad import cad


def computing_layers(model) -> list[int]:
    """Indices (0-based) of the layers of ``model`` (a :class:`models.ConformerCTC`) that compute
    their own attention maps under its reuse plan."""
    return [layer for layer, plan in enumerate(model.plans) if not plan.reuses]


def layer_cad_medians(attentions: list[torch.Tensor], layers: list[int]) -> dict[int, float]:
    """``attentions``: one ``(H_l, T, T)`` map per layer (one utterance, no padding) -> for each
    layer of ``layers``, the median over its heads of :func:`analysis.cad.cad` (as the report's
    ``layer_median``; the mean of the middle two for an even head count)."""
    return {layer: float(np.median(cad(attentions[layer].double()).cpu().numpy())) for layer in layers}


def map_image(maps: np.ndarray, titles: list[str]) -> np.ndarray:
    """``maps (N, T, T)`` drawn as N panels (4 a row, with colour bars) -> ``(height, width, 3)``
    uint8 RGB. Rendered by matplotlib's Agg canvas without pyplot (no backend, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(maps)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), dpi=100)
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, m, title in zip(axes.flat, maps, titles):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("key frame", fontsize=8)
        ax.set_ylabel("query frame", fontsize=8)
        ax.tick_params(labelsize=7)
        fig.colorbar(im, ax=ax).ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def first_utterance(dataset) -> dict:
    """The item (``id``, ``text``, ``features (T, F)``) of the utterance with the smallest id in a
    :class:`data.dataset.ManifestDataset` that can be read (an unreadable one gives None there)."""
    entries = getattr(dataset, "entries", None)
    if not entries:
        raise ValueError(f"attention_maps: the validation dataset ({type(dataset).__name__}) lists no utterance")
    for i in sorted(range(len(entries)), key=lambda i: entries[i]["id"]):
        item = dataset[i]
        if item is not None:
            return item
    raise ValueError("attention_maps: no validation utterance could be read")


class AttentionMaps(Callback):
    """At each validation of a fit (not the sanity check), logs the attention maps and per-layer
    CAD medians of one fixed dev utterance to the TensorBoard logger (see the module's docstring)."""

    def __init__(self):
        self.logger: TensorBoardLogger | None = None
        self.item: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        self.logger = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        if self.logger is None:
            names = ", ".join(type(lg).__name__ for lg in trainer.loggers) or "none"
            warnings.warn(
                f"attention_maps: no TensorBoard logger among the trainer's loggers ({names}): no "
                f"attention maps are computed or logged (set attention_maps: false to silence this)",
                stacklevel=2,
            )

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if self.logger is None or trainer.sanity_checking or trainer.state.fn != "fit" or not trainer.is_global_zero:
            return
        if self.item is None:
            loaders = trainer.val_dataloaders
            loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
            self.item = first_utterance(loader.dataset)
        model = pl_module.model
        maps = self.attentions(model, self.item["features"], pl_module.device, trainer.precision_plugin)
        layers = computing_layers(model)
        medians = layer_cad_medians(maps, layers)
        writer, step = self.logger.experiment, trainer.global_step
        frames = maps[0].shape[-1]
        writer.add_text(
            "attention/utterance", f"{self.item['id']} ({frames} encoder frames): {self.item['text']}", step
        )
        for layer in layers:
            a = maps[layer].numpy()
            name = f"layer{layer + 1:02d}"
            mean = map_image(a.mean(0, keepdims=True), [f"layer {layer + 1}, mean of {len(a)} heads"])
            heads = map_image(a, [f"layer {layer + 1}, head {h}" for h in range(len(a))])
            writer.add_image(f"attention/{name}/mean", mean, step, dataformats="HWC")
            writer.add_image(f"attention/{name}/heads", heads, step, dataformats="HWC")
            writer.add_scalar(f"cad/{name}", medians[layer], step)
        writer.flush()

    @staticmethod
    def attentions(model, features: torch.Tensor, device, precision_plugin=None) -> list[torch.Tensor]:
        """``features (T, F)`` of one utterance -> one ``(H_l, T', T')`` float32 CPU map per layer
        (the map it applied), the model in eval mode and without gradients (its mode restored)."""
        from contextlib import nullcontext

        feats = features.unsqueeze(0).to(device)
        lengths = torch.tensor([feats.shape[1]], device=device)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), precision_plugin.val_step_context() if precision_plugin else nullcontext():
                enc = model.encode(feats, lengths, return_attentions=True)
        finally:
            model.train(was_training)
        n = int(enc.lengths[0])
        return [a[0, :, :n, :n].float().cpu() for a in enc.attentions]
