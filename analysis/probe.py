"""Per-layer linear phoneme probes on frozen hidden states (Shim, Choi, Sung, ICLR 2022, Section 3.3, Appendix A.5).

One linear classifier per encoder layer (layer 0 = the input of the first block) predicts the
37 labels (36 phoneme classes + silence) of each 40 ms frame. Hidden states of every layer are
cached once, so all probes train together in one pass over the audio; they are trained as a single
batched linear map ``(L+1, d, 37)``. Defaults follow the paper: SGD lr 0.1, momentum 0.9, weight
decay 1e-3, 15 epochs, lr x 0.1 every 3 epochs.
"""

from __future__ import annotations

import dataclasses

import torch

from data.alignments import NUM_LABELS


@dataclasses.dataclass
class FrameCache:
    """Hidden states ``(N, L+1, d)`` of N labelled frames and their labels ``(N,)``."""

    hidden: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.hidden.shape[0] != self.labels.shape[0]:
            raise ValueError(f"{self.hidden.shape[0]} frames of hidden states but {self.labels.shape[0]} labels")
        if self.labels.numel() == 0:
            raise ValueError("no labelled frame to probe")
        if self.labels.min() < 0 or self.labels.max() >= NUM_LABELS:
            raise ValueError(
                f"labels must lie in 0..{NUM_LABELS - 1}; got {int(self.labels.min())}..{int(self.labels.max())}"
            )


@torch.inference_mode()
def collect(model, loader, head_mask=None, dtype=torch.float32, device="cpu", progress: bool = False) -> FrameCache:
    """Run ``model.encode(..., return_hidden_states=True)`` over a loader that yields labelled
    batches (``data.datamodule`` with ``with_labels=True``) and keep every valid frame."""
    from tqdm import tqdm

    hs, ys = [], []
    for batch in tqdm(loader, desc="hidden states", unit="batch", disable=not progress):
        if batch is None:
            continue
        enc = model.encode(
            batch["features"].to(device),
            batch["feature_lengths"].to(device),
            return_hidden_states=True,
            head_mask=head_mask,
        )
        stacked = torch.stack(enc.hidden_states, dim=2)  # (B, T', L+1, d)
        labels = batch["labels"].to(device)[:, : stacked.shape[1]]
        valid = labels >= 0
        hs.append(stacked[:, : labels.shape[1]][valid].to(dtype).cpu())
        ys.append(labels[valid].cpu())
    if not hs:
        raise ValueError("no labelled batch: does the manifest have alignments?")
    return FrameCache(torch.cat(hs), torch.cat(ys))


class LayerProbes(torch.nn.Module):
    """``L+1`` independent linear classifiers, applied together: ``(N, L+1, d) -> (N, L+1, C)``."""

    def __init__(self, num_layers: int, d_model: int, num_classes: int = NUM_LABELS):
        super().__init__()
        lin = [torch.nn.Linear(d_model, num_classes) for _ in range(num_layers)]
        self.weight = torch.nn.Parameter(torch.stack([l.weight.t() for l in lin]).detach().clone())  # (L, d, C)
        self.bias = torch.nn.Parameter(torch.stack([l.bias for l in lin]).detach().clone())  # (L, C)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nld,ldc->nlc", h, self.weight) + self.bias


def train_probes(
    train: FrameCache,
    epochs: int = 15,
    lr: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    step_epochs: int = 3,
    gamma: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
    standardize: bool = True,
    progress: bool = False,
) -> LayerProbes:
    """Train one probe per layer on cached frames (all layers at once).

    ``standardize`` divides each layer's features by their overall RMS (stored in the probe), so
    one learning rate suits layers of different scale.
    """
    from tqdm import tqdm

    g = torch.Generator().manual_seed(seed)
    N, L, d = train.hidden.shape
    probes = LayerProbes(L, d)
    scale = train.hidden.float().pow(2).mean((0, 2)).sqrt().clamp_min(1e-6) if standardize else torch.ones(L)
    probes.register_buffer("scale", scale)
    opt = torch.optim.SGD(probes.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_epochs, gamma=gamma)
    for _ in tqdm(range(epochs), desc="probes", unit="epoch", disable=not progress):
        for idx in torch.randperm(N, generator=g).split(batch_size):
            h = train.hidden[idx].float() / scale[None, :, None]
            logits = probes(h)  # (n, L, C)
            loss = (
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), train.labels[idx].repeat_interleave(L), reduction="mean"
                )
                * L
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return probes.eval()


@torch.no_grad()
def probe_accuracy(probes: LayerProbes, test: FrameCache, batch_size: int = 8192) -> torch.Tensor:
    """Frame accuracy (fraction) of each layer's probe: ``(L+1,)``."""
    correct = torch.zeros(test.hidden.shape[1])
    for s in range(0, test.hidden.shape[0], batch_size):
        h = test.hidden[s : s + batch_size].float() / probes.scale[None, :, None]
        correct += (probes(h).argmax(-1) == test.labels[s : s + batch_size, None]).sum(0)
    return correct / test.hidden.shape[0]
