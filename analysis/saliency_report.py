"""Attention against saliency over a manifest (``python -m analysis saliency``): per-token measures of
:mod:`analysis.saliency` averaged over every scored token, ``OUT/saliency.json``, three figures
(correlation per layer and head, one utterance's spectrogram with saliency and attention, deletion
curves) and a printed table. An utterance that fails is reported and skipped.

``saliency.json``::

    settings        method, masks, model framing, ...
    tokens          how many tokens were scored
    utterances      {"scored", "no_tokens", "skipped": [{"id", "error"}]}
    layers          [{"layer": 1, "computes": true}, ...]   (false: the layer reuses another's map)
    correlation     {"input": {"per_layer", "per_head", "mean_over_layers", "rollout"},
                     "encoder_output": {"per_layer", "per_head", "mean_over_layers"}}
    deletion        {"k": [5, 10, 20, 40], "attention", "saliency", "random"}  (mean log-prob drop)
    figures         {"correlation", "utterance", "deletion"}

``per_layer``: one Pearson correlation per layer of the head-averaged attention row, averaged over
tokens; ``per_head``: layers x heads (null where a layer has fewer heads); ``mean_over_layers``: the
correlation of the layer-and-head average; ``rollout``: of the rollout up to each layer (input only;
null for Whisper's cross-attention); ``encoder_output`` compares layer ``l``'s row with the saliency of
the states that layer's attention reads (CTC: layer ``l``'s input; Whisper: the encoder output) (its
``mean_over_layers`` with the mean of the per-layer state saliencies, each L1-normalised).
Averages skip tokens where a correlation is undefined (a constant map).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch

from analysis.saliency import (
    DELETION_K,
    RANKINGS,
    PerturbationSettings,
    UtteranceResult,
    analyse_utterance,
)
from analysis.saliency_model import SaliencyModel


class _Mean:
    """NaN-aware running mean of same-shaped per-token values."""

    def __init__(self):
        self.sum = self.count = None

    def add(self, values: torch.Tensor) -> None:  # (N, ...)
        v = values.double()
        ok = torch.isfinite(v)
        s, c = torch.where(ok, v, torch.zeros_like(v)).sum(0), ok.sum(0).double()
        self.sum, self.count = (s, c) if self.sum is None else (self.sum + s, self.count + c)

    def value(self):
        if self.sum is None:
            return None
        m = torch.where(self.count > 0, self.sum / self.count.clamp_min(1), torch.full_like(self.sum, float("nan")))
        return _json(m.tolist())


def _json(x):
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, list):
        return [_json(v) for v in x]
    return x


class _Totals:
    """What :func:`run` gathers over the utterances: running means of the correlations and deletion
    drops, the counts, the skipped utterances and the first scored one (for its figure)."""

    NAMES = ("per_layer", "per_head", "mean_over_layers")

    def __init__(self):
        self.acc = {
            "input": {n: _Mean() for n in (*self.NAMES, "rollout")},
            "encoder_output": {n: _Mean() for n in self.NAMES},
        }
        self.deletion = {n: _Mean() for n in RANKINGS}
        self.tokens, self.scored, self.empty, self.skipped, self.example = 0, 0, 0, [], None

    def add(self, uid: str, feats: torch.Tensor, r: UtteranceResult | None) -> None:
        """One analysed utterance (``r`` None: it emitted no token)."""
        if r is None:
            self.empty += 1
            return
        self.scored += 1
        self.tokens += len(r.tokens)
        for side, (pl, ph, mo) in {
            "input": (r.input_per_layer, r.input_per_head, r.input_mean),
            "encoder_output": (r.states_per_layer, r.states_per_head, r.states_mean),
        }.items():
            self.acc[side]["per_layer"].add(pl)
            self.acc[side]["per_head"].add(ph)
            self.acc[side]["mean_over_layers"].add(mo[:, None])
        if r.input_rollout is not None:
            self.acc["input"]["rollout"].add(r.input_rollout)
        for n in RANKINGS:
            self.deletion[n].add(r.deletion[n])
        if self.example is None:
            self.example = (uid, feats.cpu(), r)

    def check(self) -> None:
        if self.tokens == 0:
            skipped = self.skipped
            raise ValueError(
                f"no token was scored: {self.scored + self.empty} utterances analysed, {self.empty} emitted no "
                f"token, {len(skipped)} skipped"
                + (f" (e.g. {skipped[0]['id']}: {skipped[0]['error']})" if skipped else "")
            )

    def correlation(self) -> dict:
        corr = {side: {n: m.value() for n, m in d.items()} for side, d in self.acc.items()}
        for c in corr.values():
            c["mean_over_layers"] = c["mean_over_layers"][0]
        return corr


def _collect(model, utterances, method, perturbation, n_steps, ks, progress, total) -> _Totals:
    """Analyses each utterance in turn; one that cannot be loaded or analysed is recorded and skipped."""
    from tqdm import tqdm

    totals = _Totals()
    generator = torch.Generator().manual_seed(perturbation.seed)
    for uid, feats in tqdm(utterances, desc="saliency", unit="utt", total=total, disable=not progress):
        if feats is None or isinstance(feats, str):
            totals.skipped.append({"id": uid, "error": feats or "could not be loaded"})
            continue
        try:
            r = analyse_utterance(model, feats, method, perturbation, n_steps, ks, generator)
        except (RuntimeError, ValueError) as e:
            warnings.warn(f"saliency: skipping utterance {uid}: {type(e).__name__}: {e}", stacklevel=3)
            totals.skipped.append({"id": uid, "error": f"{type(e).__name__}: {e}"})
            continue
        totals.add(uid, feats, r)
    return totals


def _settings(model: SaliencyModel, method: str, perturbation: PerturbationSettings, n_steps: int) -> dict:
    """``saliency.json``'s ``settings``: the method's and the model framing's."""
    return {
        "method": method,
        "ig_steps": n_steps if method == "ig" else None,
        "perturbation": {
            "masks": perturbation.masks,
            "sizes": [list(s) for s in perturbation.sizes],
            "p": perturbation.p,
            "seed": perturbation.seed,
        }
        if method == "perturbation"
        else None,
        "seed": perturbation.seed,
        "token_score": "log-probability at the emitting frame (greedy CTC path)",
        "encoder_output_method": "gradient x input of each layer's input states",
        "deletion": "normalised features of the removed frames' receptive fields set to 0",
        "subsampling": model.subsampling,
        "receptive_field": model.receptive_field,
        "frame_offset": model.frame_offset,
    }


def run(
    model: SaliencyModel,
    utterances,
    out: str | Path,
    method: str = "perturbation",
    perturbation: PerturbationSettings | None = None,
    n_steps: int = 32,
    ks=DELETION_K,
    spectrogram: bool = True,
    progress: bool = True,
    total: int | None = None,
    settings: dict | None = None,
) -> dict:
    """Analyse ``utterances`` (an iterable of ``(id, features (T, F))``, features normalised; an item
    ``(id, None)`` or ``(id, "reason")`` is an utterance that could not be loaded) and write
    ``out/saliency.json`` and the
    figures; returns the JSON object. The deletion's random frames come from ``perturbation.seed``."""
    from analysis.saliency import METHODS
    from common.io import atomic_write_text

    if method not in METHODS:
        raise ValueError(f"unknown saliency method {method!r}; expected one of {', '.join(METHODS)}")
    perturbation = perturbation or PerturbationSettings()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    totals = _collect(model, utterances, method, perturbation, n_steps, ks, progress, total)
    totals.check()
    result = {
        "settings": {**_settings(model, method, perturbation, n_steps), **(settings or {})},
        "tokens": totals.tokens,
        "utterances": {"scored": totals.scored, "no_tokens": totals.empty, "skipped": totals.skipped},
        "layers": [{"layer": l + 1, "computes": bool(c)} for l, c in enumerate(model.computes)],
        "correlation": totals.correlation(),
        "deletion": {"k": list(ks), **{n: totals.deletion[n].value() for n in RANKINGS}},
    }
    result["figures"] = {
        "correlation": str(plot_correlation(result, out / "saliency_correlation.png")),
        "utterance": str(plot_utterance(*totals.example, model, out / "saliency_utterance.png", spectrogram)),
        "deletion": str(plot_deletion(result, out / "saliency_deletion.png")),
    }
    atomic_write_text(out / "saliency.json", json.dumps(result, indent=1))
    return result


def saliency_model(model, upstream: str | None) -> SaliencyModel:
    """The saliency interface of a report's model: a CTC model of ours (or a converted ESPnet one), or
    a transformers model (``upstream`` "hf"); the s3prl upstreams emit no tokens and are refused."""
    if upstream == "hf":
        from analysis.saliency_hf import hf_saliency

        return hf_saliency(model)
    if upstream is not None:
        raise ValueError(
            "saliency needs a CTC model of ours (or a converted ESPnet one) or --upstream hf, "
            f"not --upstream {upstream}"
        )
    from analysis.saliency_model import CTCSaliency

    return CTCSaliency(model)


def run_manifest(
    model: SaliencyModel,
    manifest: Path,
    out: str | Path,
    *,
    cmvn,
    featurizer,
    framing,
    limit: int | None,
    device: str,
    progress: bool,
    settings: dict,
    **options,
) -> dict:
    """:func:`run` over the first ``limit`` utterances of ``manifest`` read with the model's own
    ``cmvn``, ``featurizer`` and ``framing`` (a model with ``prepare``, e.g. a transformers one, turns
    the waveform into the features it perturbs); too-short or unreadable utterances are reported."""
    from data.dataset import ManifestDataset

    prepare = getattr(model, "prepare", None)
    ds = ManifestDataset([manifest], cmvn=cmvn, featurizer=featurizer, framing=framing)
    too_short = dict(ds.skipped)
    ds.entries = ds.entries[:limit]

    def utterances():
        yield from too_short.items()
        for i, e in enumerate(ds.entries):
            item = ds[i]
            if item is None:
                yield e["id"], ds.skipped.get(e["id"], "could not be loaded")
            elif prepare is None:
                yield e["id"], item["features"].to(device)
            else:
                try:
                    yield e["id"], prepare(item["features"][:, 0])
                except (RuntimeError, ValueError) as err:
                    yield e["id"], f"{type(err).__name__}: {err}"

    settings = {**settings, "manifest": str(manifest), **getattr(model, "settings", {})}
    total = len(ds.entries) + len(too_short)
    return run(model, utterances(), out, progress=progress, total=total, settings=settings, **options)


# --- figures and table --------------------------------------------------------------------------------


def _layer_labels(result: dict) -> list[str]:
    return [f"{d['layer']}" + ("" if d["computes"] else " (reused)") for d in result["layers"]]


def plot_correlation(result: dict, path: Path) -> Path:
    """Per head (heat maps, layers x heads) and per layer (lines, rollout dashed) for both comparisons."""
    from analysis.plots import _save, plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 0.35 * len(result["layers"]) + 3))
    labels = _layer_labels(result)
    for ax, side in zip(axes[:2], ("input", "encoder_output")):
        m = np.array(result["correlation"][side]["per_head"], dtype=float)
        im = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu_r", aspect="auto")
        ax.set(
            title=f"per head vs {side} saliency",
            xlabel="head",
            ylabel="layer",
            yticks=range(len(labels)),
            yticklabels=labels,
            xticks=range(m.shape[1]),
        )
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
        fig.colorbar(im, ax=ax, shrink=0.8)
    ax = axes[2]
    x = np.arange(1, len(labels) + 1)
    for side, style in (("input", "o-"), ("encoder_output", "s-")):
        ax.plot(x, np.array(result["correlation"][side]["per_layer"], dtype=float), style, label=f"{side} (head avg.)")
    if result["correlation"]["input"].get("rollout") is not None:
        ax.plot(x, np.array(result["correlation"]["input"]["rollout"], dtype=float), "^--", label="input (rollout)")
    for d in result["layers"]:
        if not d["computes"]:
            ax.axvspan(d["layer"] - 0.5, d["layer"] + 0.5, color="0.9")
    ax.set(
        xlabel="layer (grey: reused map)", ylabel="Pearson r", title=f"per layer ({result['tokens']} tokens)", xticks=x
    )
    ax.axhline(0, color="k", lw=0.5)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_utterance(
    uid: str, feats: torch.Tensor, r: UtteranceResult, model: SaliencyModel, path: Path, spectrogram: bool = True
) -> Path:
    """One utterance: the features with the input saliency of its middle token overlaid (features of
    one column, e.g. waveform segment gains: the saliency per input frame), and that token's pooled
    saliency, attention row (layer-and-head average) over time."""
    from analysis.plots import _save, plt

    i = len(r.tokens) // 2
    fig, (a0, a1) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    T = feats.shape[0]
    s = r.saliency[i].t().numpy()
    token = f"token {r.tokens[i].id}" + (
        "" if r.tokens[i].frame is None else f" (emitted at encoder frame {r.tokens[i].frame})"
    )
    if feats.shape[1] == 1:
        a0.step(np.arange(T), s[0], where="post", label="input saliency")
        a0.set(ylabel="saliency", title=f"{uid}: {token}")
    else:
        a0.imshow(feats.t().numpy(), origin="lower", aspect="auto", cmap="gray")
        lim = np.abs(s).max() or 1.0
        a0.imshow(s, origin="lower", aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim, alpha=0.6)
        a0.set(ylabel="mel bin", title=f"{uid}: {token}")
    centres = (
        np.arange(r.frame_saliency.shape[1]) * model.subsampling + (model.receptive_field - 1) / 2 - model.frame_offset
    )
    norm = lambda v: v / (np.abs(v).max() or 1.0)
    a1.plot(centres, norm(r.frame_saliency[i].numpy()), label="saliency (pooled)")
    a1.plot(centres, norm(r.attention[i].numpy()), label="attention (mean over layers, heads)")
    if r.tokens[i].frame is not None:
        a1.axvline(centres[r.tokens[i].frame], color="k", ls=":", label="emitting frame")
    a1.set(xlabel="input frame", ylabel="scaled to max 1", xlim=(0, T))
    a1.legend(fontsize=8)
    return _save(fig, path)


def plot_deletion(result: dict, path: Path) -> Path:
    from analysis.plots import _save, plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for n in RANKINGS:
        ax.plot(result["deletion"]["k"], np.array(result["deletion"][n], dtype=float), "o-", label=f"by {n}")
    ax.set(xlabel="frames removed (%)", ylabel="drop of the token's log-prob", title="deletion test")
    ax.legend()
    return _save(fig, path)


def format_table(result: dict) -> str:
    """The printed summary: correlations per layer, then the deletion drops."""
    f = lambda v: "   n/a" if v is None else f"{v:6.3f}"
    c = result["correlation"]
    roll = c["input"].get("rollout") or [None] * len(result["layers"])
    lines = [
        f"{result['tokens']} tokens, method {result['settings']['method']}",
        "layer          r(input)  r(rollout)  r(enc.out)",
    ]
    for d, a, b, e in zip(result["layers"], c["input"]["per_layer"], roll, c["encoder_output"]["per_layer"]):
        lines.append(f"{d['layer']:3d} {'computes' if d['computes'] else 'reused  '}   {f(a)}    {f(b)}      {f(e)}")
    lines.append(
        f"mean over layers and heads: input {f(c['input']['mean_over_layers'])}, "
        f"encoder output {f(c['encoder_output']['mean_over_layers'])}"
    )
    lines.append("deletion k%   " + "  ".join(f"{k:6d}" for k in result["deletion"]["k"]))
    for n in RANKINGS:
        lines.append(f"  by {n:9s} " + "  ".join(f(v) for v in result["deletion"][n]))
    return "\n".join(lines)
