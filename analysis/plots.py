"""Figures of the analyses, drawn like the papers' (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data.alignments import PHONE_CLASSES  # noqa: E402

CATEGORY_COLOURS = {"diagonal": "tab:blue", "vertical": "tab:orange", "global": "tab:green"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cad_per_head(cad: np.ndarray, path: Path, title: str = "") -> Path:
    """Seed 003 Fig. 2: CAD of every head (dots) with the per-layer median (line)."""
    L = cad.shape[0]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * L + 2), 3.4))
    for l in range(L):
        vals = cad[l][np.isfinite(cad[l])]
        ax.scatter(np.full(len(vals), l + 1), vals, s=14, color="tab:blue", alpha=0.7)
    med = [np.nanmedian(cad[l]) for l in range(L)]
    ax.plot(range(1, L + 1), med, color="tab:red", marker="s", label="median")
    ax.set(xlabel="layer", ylabel="CAD", title=title or "Cumulative attention diagonality", xticks=range(1, L + 1))
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def probe_accuracy(acc: np.ndarray, path: Path, title: str = "") -> Path:
    """Seed 003 Fig. 4: phoneme probe frame accuracy per layer (0 = input of the first block)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(len(acc)), 100 * np.asarray(acc), marker="o")
    ax.set(xlabel="layer", ylabel="frame accuracy (%)", title=title or "Phoneme probe", xticks=range(len(acc)))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def par_heatmaps(lower: np.ndarray, upper: np.ndarray, path: Path) -> Path:
    """Seed 003 Fig. 5: PAR of the lower and upper halves of the layers, with phoneme labels."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 6))
    vmax = np.nanpercentile(np.concatenate([lower.ravel(), upper.ravel()]), 99)
    for ax, m, name in zip(axes, (lower, upper), ("lower layers", "upper layers")):
        im = ax.imshow(m, cmap="viridis", vmin=0, vmax=vmax)
        ax.set_xticks(range(len(PHONE_CLASSES)), PHONE_CLASSES, rotation=90, fontsize=6)
        ax.set_yticks(range(len(PHONE_CLASSES)), PHONE_CLASSES, fontsize=6)
        ax.set(title=f"PAR, {name}", xlabel="key phoneme q", ylabel="query phoneme p")
        fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def coverage(curves: dict[str, list[float]], path: Path) -> Path:
    """Seed 003 Fig. 6: accumulated PAR coverage against the reference, per layer."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    ax.set(xlabel="layer", ylabel="accumulated coverage", ylim=(0, 1.02), title="PAR coverage")
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)


def head_categories(gvd: np.ndarray, categories: np.ndarray, path: Path) -> Path:
    """Seed 000 Figs. 3-4: head categories per layer, and G / V / D of every head."""
    L, H = categories.shape
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    counts = {c: [(categories[l] == c).sum() for l in range(L)] for c in CATEGORY_COLOURS}
    bottom = np.zeros(L)
    for c, n in counts.items():
        axes[0].bar(range(1, L + 1), n, bottom=bottom, color=CATEGORY_COLOURS[c], label=c)
        bottom += n
    axes[0].set(xlabel="layer", ylabel="heads", title="head categories", xticks=range(1, L + 1))
    axes[0].legend(fontsize=7)
    for ax, score, name in zip(axes[1:], gvd, ("globalness G", "verticality V", "diagonality D")):
        for l in range(L):
            for h in range(H):
                if categories[l, h] is not None and np.isfinite(score[l, h]):
                    ax.scatter(l + 1, score[l, h], color=CATEGORY_COLOURS[categories[l, h]], s=14)
        ax.set(xlabel="layer", title=name, xticks=range(1, L + 1))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def prm(matrix: np.ndarray, path: Path) -> Path:
    """Phoneme relation map of the last layer ((P' - P_U) / P_U)."""
    fig, ax = plt.subplots(figsize=(7, 6))
    lim = np.nanpercentile(np.abs(matrix), 98) or 1.0
    im = ax.imshow(matrix, cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_xticks(range(len(PHONE_CLASSES)), PHONE_CLASSES, rotation=90, fontsize=6)
    ax.set_yticks(range(len(PHONE_CLASSES)), PHONE_CLASSES, fontsize=6)
    ax.set(title="phoneme relation map, last layer", xlabel="key phoneme", ylabel="query phoneme")
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def ablation(result: dict, path: Path, metric_name: str = "probe accuracy") -> Path:
    """Cumulative masking within each category, next to the all-masked value."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for cat, steps in result["steps"].items():
        if steps:
            ax.plot(
                range(0, len(steps) + 1),
                [result["baseline"]] + [s["metric"] for s in steps],
                marker="o",
                color=CATEGORY_COLOURS[cat],
                label=cat,
            )
    ax.axhline(result["all_masked"], color="gray", ls="--", label="all heads masked")
    ax.set(xlabel="heads masked (best-ranked first)", ylabel=metric_name, title="cumulative head ablation")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def context_mixing(
    scores: dict[str, np.ndarray],
    words: list[str],
    layer_names: list[str],
    path: Path,
    sources: list[str] | None = None,
    title: str | None = None,
) -> Path:
    """One utterance's word-level context-mixing maps: a row per method, a column per layer; rows of
    each map receive (``words``), columns give (``sources``, default ``words``)."""
    sources = words if sources is None else sources
    methods = list(scores)
    L = len(layer_names)
    fig, axes = plt.subplots(len(methods), L, figsize=(2.6 * L + 1, 2.6 * len(methods) + 0.5), squeeze=False)
    for r, m in enumerate(methods):
        for c in range(L):
            ax = axes[r, c]
            ax.imshow(scores[m][c], cmap="Blues")
            ax.set_xticks(range(len(sources)), sources, rotation=90, fontsize=6)
            ax.set_yticks(range(len(words)), words, fontsize=6)
            if r == 0:
                ax.set_title(layer_names[c], fontsize=9)
            if c == 0:
                ax.set_ylabel(m.replace("_", " "), fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def similarity_map(sim: np.ndarray, groups: list[list[int]], path: Path) -> Path:
    """``L x L`` layer similarity of attention maps, with ``groups`` (a plan) outlined."""
    from matplotlib.patches import Rectangle

    L = sim.shape[0]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.35 * L), max(3.8, 1.0 + 0.35 * L)))
    im = ax.imshow(sim, vmin=0, vmax=1, cmap="viridis")
    for g in groups:
        ax.add_patch(Rectangle((g[0] - 0.5, g[0] - 0.5), len(g), len(g), fill=False, edgecolor="red", lw=2))
    ticks = list(range(L))
    ax.set(
        xticks=ticks,
        yticks=ticks,
        xticklabels=[t + 1 for t in ticks],
        yticklabels=[t + 1 for t in ticks],
        xlabel="layer",
        ylabel="layer",
        title="map similarity, 1 - JS / ln 2\n(outlined: best plan)",
    )
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def reuse_candidates(candidates: list[dict], baseline_wer: float, path: Path) -> Path:
    """Zero-shot WER against the GFLOP a trained plan would save, one point per candidate plan,
    the Pareto front joined."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [c["gflop_saving"] for c in candidates]
    ys = [c["zero_shot_wer"] for c in candidates]
    ax.scatter(xs, ys, c=[c["num_groups"] for c in candidates], cmap="plasma", s=25, label="candidate plans")
    front = sorted((c["gflop_saving"], c["zero_shot_wer"]) for c in candidates if c.get("pareto"))
    if front:
        ax.plot(*zip(*front), "k--", lw=1, label="Pareto front")
    for c in candidates:
        if c.get("pareto"):
            ax.annotate(
                c["reuse"],
                (c["gflop_saving"], c["zero_shot_wer"]),
                fontsize=6,
                xytext=(3, 3),
                textcoords="offset points",
            )
    ax.axhline(baseline_wer, color="grey", lw=1, ls=":", label="baseline")
    ax.set(
        xlabel="encoder GFLOP saved at 768 frames (trained plan)", ylabel="zero-shot WER (%)", title="reuse candidates"
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)
