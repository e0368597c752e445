"""Cumulative head ablation within each head category (Gopinath & Rodriguez, "Probing self-attention in
self-supervised speech models for cross-linguistic differences", following Yang, Liu, Lee, Interspeech 2020).

Heads of each category are masked one more at a time, best-ranked first; after each step the
downstream metric is measured (frame accuracy of the last layer's phoneme probe, or any callable),
next to the value with every head of the model masked.
"""

from __future__ import annotations

from collections.abc import Callable

from analysis.head_types import CATEGORIES


def head_of(flat: int, heads_per_layer: list[int]) -> tuple[int, int]:
    """(layer, head) of a flat head index over layers of different head counts."""
    for layer, h in enumerate(heads_per_layer):
        if flat < h:
            return layer, flat
        flat -= h
    raise IndexError("flat head index beyond the model's heads")


def cumulative_ablation(
    ranking: dict[str, list[int]],
    heads_per_layer: list[int],
    metric: Callable[[dict[int, list[int]] | None], float],
    progress: bool = False,
) -> dict:
    """``ranking`` (from :func:`analysis.head_types.category_ranking`) -> for each category the
    metric after masking its first 1, 2, ... heads, plus ``baseline`` (nothing masked) and
    ``all_masked`` (every head of the model masked). ``metric(head_mask_dict)`` evaluates the model."""
    from tqdm import tqdm

    out = {
        "baseline": metric(None),
        "all_masked": metric({l: list(range(h)) for l, h in enumerate(heads_per_layer)}),
        "steps": {},
    }
    total = sum(len(ranking.get(c, [])) for c in CATEGORIES)
    with tqdm(total=total, desc="ablation", unit="step", disable=not progress) as bar:
        for cat in CATEGORIES:
            mask: dict[int, list[int]] = {}
            steps = []
            for flat in ranking.get(cat, []):
                layer, head = head_of(flat, heads_per_layer)
                mask.setdefault(layer, []).append(head)
                steps.append({"layer": layer, "head": head, "metric": metric({k: list(v) for k, v in mask.items()})})
                bar.update(1)
            out["steps"][cat] = steps
    return out
