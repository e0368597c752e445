"""How much of a CTC token's evidence does attention point at? Input saliency of each emitted token,
attention rows and rollout, their Pearson correlation, and the deletion test of faithfulness.

The comparison follows Papi, Fucci, Gaido, Negri & Bentivogli, 2025, "Cross-Attention is Half
Explanation in Speech-to-Text Models", Sec. 2 (method): attention scores of each generated token are
compared, by Pearson correlation, with (a) the token's *input* saliency map (relevance of the
spectrogram) and (b) the saliency of the representation the attention reads (there: the encoder
output read by cross-attention), per head, averaged over heads, over layers and over both. A CTC
encoder has no cross-attention; its output layer reads one frame, the frame that emits the token. So
the attention compared is that frame's row of each layer's self-attention map, and the "encoder
output" comparison uses, for layer ``l``, the saliency of layer ``l``'s input hidden states (the states
that layer's attention mixes).

Saliency methods, both giving an ``(N, T, F)`` map per utterance (``N`` tokens, ``T`` feature frames,
``F`` mel bins):

- perturbation, in the spirit of SPES (Fucci, Gaido, Savoldi, Negri, Cettolo & Bentivogli, 2024,
  "SPES: Spectrogram Perturbation for Explainable Speech-to-Text Generation", Sec. 3): random
  time-frequency masks (rectangular cells of a randomly shifted grid, several cell sizes) set the
  normalised log-Mel features to 0 (the CMVN mean); the change of each token's log-probability is
  accumulated per masked element. SPES segments the spectrogram with SLIC superpixels and measures a
  KL divergence; here the cells are rectangles and the score is the drop of the token's
  log-probability, estimated as ``E[drop | element masked] - E[drop | element kept]`` (the kept term
  removes the drop every mask causes on average, so an element that never matters scores about 0);
- gradients with captum (Kokhlikyan et al., 2020): integrated gradients from the all-zero (mean)
  input (Sundararajan, Taly & Yan, 2017, "Axiomatic Attribution for Deep Networks", Sec. 3: their sum
  is the score difference, "completeness") or gradient x input.

Saliency of the hidden states entering layer ``l`` is gradient x input (the first-order effect of
zeroing a frame's state, summed over the model dimension), whatever the input method: perturbing
every layer's input would multiply the cost by the number of layers.

Pooling to encoder frames: encoder frame ``m`` sees feature frames ``s m - o .. s m - o + r - 1``
(``s`` the front end's subsampling, ``r`` its receptive field, :mod:`models.subsampling`; ``o`` its
left padding, 0 for ours); its relevance is the mean, over those frames, of the relevance summed over
mel bins.

Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers", Sec. 3):
``R_l = (0.5 A_l + 0.5 I) R_{l-1}`` with ``A_l`` the head average of layer ``l``'s map; the rollout up to
layer ``l`` is compared with the input saliency.

Deletion (faithfulness): the top ``k`` % of encoder frames, ranked by the layer-and-head average of
the attention row, by the pooled input saliency, or at random (seeded), are removed, i.e. the
normalised features of their receptive fields are set to 0; the drop of the token's log-probability
at its emitting frame is recorded (positive: the probability fell).

The model side is the small :class:`~analysis.saliency_model.SaliencyModel` interface
(:mod:`analysis.saliency_model`: :class:`~analysis.saliency_model.CTCSaliency` for our
:class:`~models.ctc.ConformerCTC`; :mod:`analysis.saliency_hf` for transformers wav2vec2 / HuBERT CTC
models and Whisper).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from analysis.saliency_model import Capture, SaliencyModel, Token

METHODS = ("perturbation", "ig", "ixg")
DELETION_K = (5, 10, 20, 40)
RANKINGS = ("attention", "saliency", "random")


@dataclasses.dataclass(frozen=True)
class PerturbationSettings:
    """SPES-like masks. ``sizes``: cell sizes ``(feature frames, mel bins)``, used in turn (mask ``i``
    has cells of ``sizes[i % len(sizes)]``; a size wider than the input is clipped); ``masks``: how
    many masks per utterance; ``p``: probability that a cell is masked; ``seed``: the masks'
    generator; ``batch``: masked copies per forward pass. Defaults: cells of 50 ms x 10 bins,
    100 ms x 20 bins and 200 ms x all bins (10 ms frames), 256 masks, p = 0.25."""

    sizes: tuple[tuple[int, int], ...] = ((5, 10), (10, 20), (20, 1000))
    masks: int = 256
    p: float = 0.25
    seed: int = 0
    batch: int = 16

    def __post_init__(self):
        if self.masks < 2:
            raise ValueError(f"--masks must be at least 2, got {self.masks}")
        if not 0 < self.p < 1:
            raise ValueError(f"--mask-p must lie strictly between 0 and 1, got {self.p}")
        if not self.sizes or any(len(s) != 2 or min(s) < 1 for s in self.sizes):
            raise ValueError(f"--mask-sizes must be TxF pairs of positive integers, got {self.sizes}")
        if self.batch < 1:
            raise ValueError(f"batch must be positive, got {self.batch}")


def parse_mask_sizes(text: str) -> tuple[tuple[int, int], ...]:
    """``"5x10,10x20"`` -> ``((5, 10), (10, 20))``; one clear error otherwise."""
    try:
        sizes = tuple(tuple(int(v) for v in part.lower().split("x")) for part in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(
            f"--mask-sizes {text!r}: expected comma-separated TxF cells of positive integers, e.g. 5x10,20x80"
        )
    return sizes


# --- saliency methods -------------------------------------------------------------------------------


def perturbation_masks(
    T: int, F: int, settings: PerturbationSettings, generator: torch.Generator, start: int = 0, count: int | None = None
) -> torch.Tensor:
    """``(count, T, F)`` bool, True = masked: masks ``start .. start + count - 1`` (default: all
    ``settings.masks``), each a grid of cells (mask ``i`` has the cells of ``settings.sizes[i % len]``)
    shifted by a random offset, each cell masked with probability ``settings.p``. Drawing them in
    order from one ``generator``, in one call or in several, gives the same masks."""
    count = settings.masks - start if count is None else count
    out = torch.zeros(count, T, F, dtype=torch.bool)
    for j in range(count):
        ct, cf = settings.sizes[(start + j) % len(settings.sizes)]
        ct, cf = min(ct, T), min(cf, F)
        ot, of = (int(torch.randint(0, c, (1,), generator=generator)) for c in (ct, cf))
        nt, nf = (T + ot + ct - 1) // ct, (F + of + cf - 1) // cf
        cells = torch.rand(nt, nf, generator=generator) < settings.p
        grid = cells.repeat_interleave(ct, 0).repeat_interleave(cf, 1)
        out[j] = grid[ot : ot + T, of : of + F]
    return out


def perturbation_saliency(
    score: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, settings: PerturbationSettings
) -> torch.Tensor:
    """SPES-like saliency ``(N, T, F)`` of each of the ``N`` scores of ``score((B, T, F)) -> (B, N)``
    for ``features (T, F)``: ``E[drop | masked] - E[drop | kept]`` per element over the masks of
    :func:`perturbation_masks` (drop = unmasked score - masked score; masked = set to 0). Seeded by
    ``settings.seed``: the same settings give the same map. Masks are drawn ``settings.batch`` at a
    time and only the per-element sums are kept (memory ``O(N T F)``)."""
    T, F = features.shape
    g = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        base = score(features[None])[0]  # (N,)
        sum_in = torch.zeros(base.shape[0], T * F, dtype=torch.float64)
        n_in = torch.zeros(T * F, dtype=torch.float64)
        total = torch.zeros(base.shape[0], dtype=torch.float64)
        for s in range(0, settings.masks, settings.batch):
            m = perturbation_masks(T, F, settings, g, s, min(settings.batch, settings.masks - s))
            drops = (base[None] - score(features[None] * (~m).to(features.device))).double().cpu()  # (B, N)
            mf = m.reshape(m.shape[0], -1).double()
            sum_in += drops.t() @ mf
            n_in += mf.sum(0)
            total += drops.sum(0)
    n_out = settings.masks - n_in
    mean_in = sum_in / n_in.clamp_min(1)
    mean_out = (total[:, None] - sum_in) / n_out.clamp_min(1)
    sal = torch.where((n_in > 0) & (n_out > 0), mean_in - mean_out, torch.zeros_like(mean_in))
    return sal.reshape(-1, T, F).float()


def gradient_saliency(
    score: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    num_tokens: int,
    method: str = "ig",
    n_steps: int = 32,
    return_delta: bool = False,
):
    """Gradient saliency ``(N, T, F)`` of each of the ``N`` scores of ``score((B, T, F)) -> (B, N)``
    with captum: ``"ig"`` integrated gradients from the zero input (``n_steps`` Gauss-Legendre
    points), ``"ixg"`` gradient x input. With ``return_delta`` (ig only) also the ``(N,)``
    convergence deltas: sum of attributions minus the score difference (completeness)."""
    from captum.attr import InputXGradient, IntegratedGradients

    if method not in ("ig", "ixg"):
        raise ValueError(f"gradient method {method!r}: expected 'ig' or 'ixg'")
    x = features[None].detach()
    maps, deltas = [], []
    for i in range(num_tokens):
        if method == "ig":
            a, d = IntegratedGradients(score).attribute(
                x,
                baselines=torch.zeros_like(x),
                target=i,
                n_steps=n_steps,
                internal_batch_size=n_steps,
                return_convergence_delta=True,
            )
            deltas.append(d.reshape(()))
        else:
            a = InputXGradient(score).attribute(x.clone().requires_grad_(True), target=i)
        maps.append(a[0].detach())
    out = torch.stack(maps) if maps else features.new_zeros(0, *features.shape)
    if return_delta:
        if method != "ig":
            raise ValueError("convergence deltas exist for integrated gradients only")
        return out, torch.stack(deltas) if deltas else features.new_zeros(0)
    return out


def state_saliency(capture: Capture) -> list[torch.Tensor]:
    """Gradient x input of each token's score w.r.t. each layer's states, summed over the model
    dimension: one ``(N, T')`` per layer (signed; the first-order effect of zeroing the frame)."""
    N = capture.scores.shape[0]
    per_token = []
    for i in range(N):
        grads = torch.autograd.grad(capture.scores[i], capture.states, retain_graph=i < N - 1, allow_unused=True)
        per_token.append(
            [
                ((g if g is not None else torch.zeros_like(s)) * s).sum(-1).detach().reshape(-1)
                for g, s in zip(grads, capture.states)
            ]
        )
    return [torch.stack([t[l] for t in per_token]) for l in range(len(capture.states))]


# --- framing, attention, metrics ----------------------------------------------------------------------


def frame_windows(
    num_frames: int, num_inputs: int, subsampling: int, receptive_field: int, offset: int = 0
) -> torch.Tensor:
    """``(T', T)`` 0/1: row ``m`` marks the feature frames encoder frame ``m`` sees,
    ``subsampling m - offset .. subsampling m - offset + receptive_field - 1`` (clipped to ``0 .. T - 1``;
    ``offset``: the front end's left padding)."""
    w = torch.zeros(num_frames, num_inputs)
    for m in range(num_frames):
        a = subsampling * m - offset
        w[m, max(0, a) : min(num_inputs, a + receptive_field)] = 1
    if (w.sum(1) == 0).any():
        raise ValueError(
            f"{num_frames} encoder frames do not fit {num_inputs} feature frames "
            f"(subsampling {subsampling}, receptive field {receptive_field}, offset {offset})"
        )
    return w


def pool_to_frames(saliency: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """``saliency (..., T, F)`` -> ``(..., T')``: summed over mel bins, averaged over each encoder
    frame's receptive field (``windows (T', T)``, :func:`frame_windows`)."""
    per_frame = saliency.sum(-1).to(windows.dtype)
    return per_frame @ (windows / windows.sum(1, keepdim=True)).t()


def rollout(maps: list[torch.Tensor], residual: float = 0.5) -> list[torch.Tensor]:
    """Attention rollout (Abnar & Zuidema, 2020): maps ``(H_l, T', T')`` -> one ``(T', T')`` per layer,
    ``R_l = ((1 - residual) mean_h A_l + residual I) R_{l-1}``, ``R_{-1} = I``."""
    out, r = [], None
    for a in maps:
        m = (1 - residual) * a.double().mean(0) + residual * torch.eye(
            a.shape[-1], dtype=torch.float64, device=a.device
        )
        r = m if r is None else m @ r
        out.append(r)
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation over the last dimension (broadcasting); NaN where either side is constant
    (its centred norm below ``1e-9`` of its largest magnitude)."""
    a, b = torch.broadcast_tensors(a.double(), b.double())
    ca, cb = a - a.mean(-1, keepdim=True), b - b.mean(-1, keepdim=True)
    na, nb = ca.norm(dim=-1), cb.norm(dim=-1)
    ok = (na > 1e-9 * a.abs().amax(-1)) & (nb > 1e-9 * b.abs().amax(-1)) & (na > 0) & (nb > 0)
    r = (ca * cb).sum(-1) / (na * nb).clamp_min(1e-300)
    return torch.where(ok, r.clamp(-1, 1), torch.full_like(r, float("nan")))


def top_frames(ranking: torch.Tensor, k: float) -> torch.Tensor:
    """Indices of the top ``k`` % of ``ranking (T',)`` (at least one frame; ties by index)."""
    if not 0 < k <= 100:
        raise ValueError(f"deletion percentage {k} must lie in (0, 100]")
    n = max(1, math.ceil(k / 100 * ranking.shape[-1]))
    return torch.argsort(ranking, descending=True, stable=True)[:n]


def delete_frames(features: torch.Tensor, frames: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """``features (T, F)`` with the receptive fields of encoder ``frames`` (``windows (T', T)``) set to 0."""
    hit = windows[frames.cpu()].sum(0) > 0
    return features * (~hit).to(features.device, features.dtype)[:, None]


def deletion_drops(
    score: Callable[[torch.Tensor], torch.Tensor],
    features: torch.Tensor,
    rankings: dict[str, torch.Tensor],
    ks,
    windows: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Deletion test: ``rankings`` ``{name: (N, T')}`` -> ``{name: (N, len(ks))}`` drop of token
    ``i``'s score when the top ``k`` % frames of ranking ``i`` are removed (:func:`delete_frames`)."""
    names = list(rankings)
    with torch.no_grad():
        base = score(features[None])[0]
        N = base.shape[0]
        out = {n: torch.zeros(N, len(ks)) for n in names}
        for i in range(N):
            variants = torch.stack(
                [delete_frames(features, top_frames(rankings[n][i], k), windows) for n in names for k in ks]
            )
            drops = (base[i] - score(variants)[:, i]).reshape(len(names), len(ks)).float().cpu()
            for j, n in enumerate(names):
                out[n][i] = drops[j]
    return out


@dataclasses.dataclass
class UtteranceResult:
    """Per-token results of one utterance (``N`` tokens, ``L`` layers, ``H`` the most heads of a layer;
    NaN where a correlation is undefined or a layer has fewer heads)."""

    tokens: list[Token]
    input_per_layer: torch.Tensor  # (N, L)
    input_per_head: torch.Tensor  # (N, L, H)
    input_mean: torch.Tensor  # (N,)
    input_rollout: torch.Tensor | None  # (N, L)
    states_per_layer: torch.Tensor  # (N, L)
    states_per_head: torch.Tensor  # (N, L, H)
    states_mean: torch.Tensor  # (N,)
    deletion: dict[str, torch.Tensor]  # name -> (N, K)
    saliency: torch.Tensor  # (N, T, F) input saliency
    frame_saliency: torch.Tensor  # (N, T')
    attention: torch.Tensor  # (N, T') layer-and-head average row


def analyse_utterance(
    model: SaliencyModel,
    features: torch.Tensor,
    method: str = "perturbation",
    perturbation: PerturbationSettings | None = None,
    n_steps: int = 32,
    ks=DELETION_K,
    generator: torch.Generator | None = None,
) -> UtteranceResult | None:
    """Every measure for one utterance ``features (T, F)`` (normalised); None if no token is emitted."""
    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {', '.join(METHODS)}")
    tokens = model.tokens(features)
    if not tokens:
        return None
    score = lambda x: model.score(x, tokens)
    if method == "perturbation":
        sal = perturbation_saliency(score, features, perturbation or PerturbationSettings())
    else:
        sal = gradient_saliency(score, features, len(tokens), method, n_steps)
    with torch.enable_grad():
        cap = model.capture(features, tokens)
        states = state_saliency(cap)
    Tp = cap.rows[0].shape[-1]
    windows = frame_windows(Tp, features.shape[0], model.subsampling, model.receptive_field, model.frame_offset)
    frame_sal = pool_to_frames(sal.cpu(), windows)  # (N, T')
    rows = [r.detach().double().cpu() for r in cap.rows]  # (H_l, N, T')
    L, Hm, N = len(rows), max(r.shape[0] for r in rows), len(tokens)
    nan = lambda *s: torch.full(s, float("nan"), dtype=torch.float64)
    in_head, st_head = nan(N, L, Hm), nan(N, L, Hm)
    in_layer, st_layer = nan(N, L), nan(N, L)
    st = [s.double().cpu() for s in states]  # (N, T') per layer
    for l, r in enumerate(rows):
        h = r.shape[0]
        in_head[:, l, :h] = pearson(r, frame_sal[None]).t()
        st_head[:, l, :h] = pearson(r, st[l][None]).t()
        in_layer[:, l] = pearson(r.mean(0), frame_sal)
        st_layer[:, l] = pearson(r.mean(0), st[l])
    attention = torch.stack([r.mean(0) for r in rows]).mean(0)  # (N, T')
    st_norm = torch.stack([s / s.abs().sum(-1, keepdim=True).clamp_min(1e-30) for s in st]).mean(0)
    roll = None
    if cap.maps is not None and all(t.frame is not None for t in tokens):
        frames = torch.tensor([t.frame for t in tokens])
        roll = torch.stack([pearson(R.cpu()[frames], frame_sal) for R in rollout([m.detach() for m in cap.maps])], 1)
    g = generator or torch.Generator().manual_seed(0)
    rankings = {
        "attention": attention,
        "saliency": frame_sal,
        "random": torch.stack([torch.randperm(Tp, generator=g) for _ in range(N)]).double(),
    }
    deletion = deletion_drops(score, features, rankings, ks, windows)
    return UtteranceResult(
        tokens,
        in_layer,
        in_head,
        pearson(attention, frame_sal),
        roll,
        st_layer,
        st_head,
        pearson(attention, st_norm),
        deletion,
        sal.cpu(),
        frame_sal,
        attention,
    )
