"""Suggest a reuse plan from a trained baseline, before any training: which layers can share a map,
and what would it cost?

    python -m analysis suggest-reuse --ckpt BASE.ckpt --manifest mini-dev --out DIR [--groups K ...]
        [--limit N] [--per-k 8] [--device cuda]

1. One pass over the manifest's utterances collects every layer's attention maps (valid frames)
   and accumulates an ``L x L`` layer similarity: the mean row-wise Jensen-Shannon divergence
   between two layers' maps (same head index where the head counts match, head-averaged maps
   otherwise), natural log, so within ``[0, ln 2]``; reported also as the similarity
   ``1 - JS / ln 2`` in ``[0, 1]``. Beside it each layer's CAD (mean over heads and utterances) and,
   when the manifest has alignments, its PAR coverage against the lower-half reference.
2. Candidate plans: contiguous partitions of the layers into ``K`` groups (the first layer of a
   group computes, the others reuse its map) for every ``K`` asked for (default ``2 .. L-1``; ``1``
   for a 2-layer baseline); of
   the ``C(L-1, K-1)`` partitions the ``--per-k`` best by within-group similarity (mean, over the
   reusing layers, of their similarity to their group's first layer) are kept.
3. Each candidate is evaluated *zero-shot*: the baseline applies the group's first map in every
   layer of the group (:meth:`models.ConformerCTC.map_sources`), with its own values, and greedy
   WER and CTC loss are measured; beside them the encoder GFLOP a trained reuse model of that plan
   (doubled values) saves at 768 frames: the baseline's count minus that model's own, both counted
   by ``torch.utils.flop_counter`` on CPU copies, so the figure does not depend on ``--device``.

Candidates are ranked best first by zero-shot WER, then by GFLOP saved. Writes ``DIR/suggest.json``,
``DIR/similarity.png`` (the best plan's groups outlined) and ``DIR/candidates.png`` (zero-shot WER
against saving, the Pareto front marked), and prints the table.
"""

from __future__ import annotations

import itertools
import json
import math
import time

import torch

from analysis.cad import cad as cad_of

LN2 = math.log(2.0)


def js_divergence(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Row-wise Jensen-Shannon divergence (natural log) of row-stochastic ``p, q (..., T, S)``
    -> ``(..., T)``, in ``[0, ln 2]``; ``0 log 0 = 0``."""
    p, q = p.double(), q.double()
    m = 0.5 * (p + q)

    def kl(a):
        return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()), torch.zeros_like(a)).sum(
            -1
        )

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, LN2)


def layer_divergence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per query row, the JS divergence of two layers' maps ``(H_a, n, n)``, ``(H_b, n, n)``: head by
    head (averaged over heads) when ``H_a == H_b``, else of the head-averaged maps -> ``(n,)``."""
    if a.shape[0] == b.shape[0]:
        return js_divergence(a, b).mean(0)
    return js_divergence(a.mean(0), b.mean(0))


class LayerSimilarity:
    """Accumulates the row-weighted mean JS divergence between every pair of layers."""

    def __init__(self, num_layers: int):
        self.sum = torch.zeros(num_layers, num_layers, dtype=torch.float64)
        self.rows = 0

    def add(self, maps: list[torch.Tensor]) -> None:
        """One utterance: one ``(H_l, n, n)`` map per layer (valid frames only)."""
        for i, j in itertools.combinations(range(len(maps)), 2):
            d = layer_divergence(maps[i], maps[j]).sum()
            self.sum[i, j] += d
            self.sum[j, i] += d
        self.rows += maps[0].shape[-2]

    def divergence(self) -> torch.Tensor:
        return self.sum / max(1, self.rows)

    def similarity(self) -> torch.Tensor:
        return 1.0 - self.divergence() / LN2


def partitions(num_layers: int, k: int):
    """Every split of layers ``0..L-1`` into ``k`` contiguous groups, as lists of layer lists."""
    for cuts in itertools.combinations(range(1, num_layers), k - 1):
        edges = (0, *cuts, num_layers)
        yield [list(range(a, b)) for a, b in zip(edges, edges[1:])]


def within_group_similarity(sim: torch.Tensor, groups: list[list[int]]) -> float:
    """Mean similarity of every reusing layer to its group's first layer (1 if none reuses)."""
    values = [float(sim[g[0], l]) for g in groups for l in g[1:]]
    return sum(values) / len(values) if values else 1.0


def plan_string(groups: list[list[int]], heads: list[int]) -> str:
    """The ``models.reuse`` plan of ``groups`` with the baseline's head counts."""
    from models.reuse import format_reuse_config, parse_reuse_config

    text = "+".join(f"{len(g)}(H{heads[g[0]]})" for g in groups)
    return format_reuse_config(parse_reuse_config(text, len(heads)))


def candidate_groups(sim: torch.Tensor, heads: list[int], ks: list[int], per_k: int) -> list[list[list[int]]]:
    """The ``per_k`` contiguous partitions of highest within-group similarity for each ``k`` (groups
    mixing head counts are not plans: left out)."""
    out = []
    for k in ks:
        scored = [
            (within_group_similarity(sim, g), g)
            for g in partitions(len(heads), k)
            if all(len({heads[l] for l in grp}) == 1 for grp in g)
        ]
        scored.sort(key=lambda x: -x[0])
        out += [g for _, g in scored[:per_k]]
    return out


def sources_of(groups: list[list[int]]) -> list[int]:
    """Zero-shot assignment: every layer takes its group's first map."""
    return [g[0] for g in groups for _ in g]


@torch.inference_mode()
def zero_shot(model, loader, tokenizer, sources: list[int] | None, device: str = "cpu") -> tuple[float, float]:
    """(greedy WER in %, mean CTC loss per utterance) of ``model`` with ``map_sources=sources``."""
    from models.ctc import ctc_loss
    from models.decoding import greedy_decode, word_errors

    refs, hyps, loss, n = [], [], 0.0, 0
    for batch in loader:
        if batch is None:
            continue
        log_probs, lengths = model(
            batch["features"].to(device), batch["feature_lengths"].to(device), map_sources=sources
        )
        log_probs, lengths = log_probs.cpu(), lengths.cpu()
        loss += float(ctc_loss(log_probs, lengths, batch["targets"], batch["target_lengths"]))
        n += len(batch["ids"])
        refs += batch["texts"]
        hyps += [tokenizer.decode(h) for h in greedy_decode(log_probs, lengths)]
    if not refs:
        raise ValueError("no utterance could be decoded")
    c = word_errors(refs, hyps)
    return 100.0 * (c["substitutions"] + c["deletions"] + c["insertions"]) / max(c["words"], 1), loss / n


def encoder_gflop(model, length: int = 768) -> float:
    """GFLOP of one encoder forward of ``model`` at ``length`` frames (batch 1)."""
    from models.flops import count_flops

    x = torch.zeros(1, length, model.d_model, device=next(model.parameters()).device)
    with torch.inference_mode():
        model.encoder(x, None)  # steady state (position tables)
        return count_flops(lambda: model.encoder(x, None)) / 1e9


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points ``(saving, wer)`` that no other point beats on both (more saving, no
    more WER)."""
    front = []
    for i, (s, w) in enumerate(points):
        if not any((s2 >= s and w2 <= w) and (s2 > s or w2 < w) for j, (s2, w2) in enumerate(points) if j != i):
            front.append(i)
    return front


def suggest(
    ckpt: str,
    manifest: str,
    out: str,
    ks: list[int] | None = None,
    limit: int | None = None,
    per_k: int = 8,
    device: str = "cpu",
    data_dir: str | None = None,
    progress: bool = True,
    max_frames: int = 20000,
) -> dict:
    """Runs the whole suggestion; returns what ``suggest.json`` holds."""
    from analysis import plots
    from common.io import atomic_write_text, check_writable
    from data.dataset import ManifestDataset
    from data.manifest import resolve_manifest
    from data.sampler import ordered_loader
    from models.checkpoint import load_model, model_inputs, training_data_dir

    t0 = time.perf_counter()
    out = check_writable(out)
    model, tokenizer, hp = load_model(ckpt, device=device)
    ks = check_request(model, ckpt, ks, per_k)
    root = training_data_dir(hp, data_dir)
    path = resolve_manifest(manifest, root)
    cmvn, featurizer, framing = model_inputs(model, hp, root)  # the model's own features (ours or ESPnet's)
    ds = ManifestDataset([path], tokenizer=tokenizer, cmvn=cmvn, featurizer=featurizer, framing=framing)
    aligned = all(e.get("alignment") for e in ds.entries)
    if limit is not None:
        ds.entries = ds.entries[:limit]
    ds.with_labels = aligned
    maps = map_statistics(model, ordered_loader(ds, max_frames), aligned, device, progress)
    ds.with_labels = False
    loader = ordered_loader(ds, max_frames)
    base_wer, base_loss = zero_shot(model, loader, tokenizer, None, device)
    candidates, base_gflop = rank_candidates(
        model, loader, tokenizer, maps["similarity"], ks, per_k, base_wer, device, progress
    )
    sim = maps["similarity"]
    result = {
        "checkpoint": hp["checkpoints"],
        "manifest": str(path),
        "utterances": maps["utterances"],
        "reuse": model.reuse,
        "baseline": {"wer": round(base_wer, 3), "loss": round(base_loss, 4)},
        "similarity": sim.tolist(),
        "divergence": maps["divergence"].tolist(),
        "cad": maps["cad"].tolist(),
        "coverage": maps["coverage"],
        "encoder_gflop_768": round(base_gflop, 4),
        "candidates": candidates,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    atomic_write_text(out / "suggest.json", json.dumps(result, indent=1))
    best = candidates[0]["groups"] if candidates else [[l] for l in range(model.num_layers)]
    plots.similarity_map(sim.numpy(), best, out / "similarity.png")
    plots.reuse_candidates(candidates, base_wer, out / "candidates.png")
    return result


def check_request(model, ckpt: str, ks: list[int] | None, per_k: int) -> list[int]:
    """The numbers of groups to consider (default 2 .. L-1; one group for two layers), after checking
    that ``model`` is a baseline of two layers or more and ``ks`` / ``per_k`` are possible
    (``ValueError`` naming the option otherwise)."""
    if any(p.reuses for p in model.plans):
        raise ValueError(
            f"{ckpt}: a reuse model ({model.reuse}); suggest-reuse starts from a baseline whose every "
            f"layer computes its own maps"
        )
    L = model.num_layers
    if L < 2:
        raise ValueError(f"{ckpt}: one layer, nothing to share")
    ks = sorted(set(ks or (range(2, L) if L > 2 else [1])))  # two layers: one group is the only reuse plan
    bad = [k for k in ks if not 1 <= k <= L]
    if bad:
        raise ValueError(f"--groups {bad[0]}: a plan of {L} layers has 1 to {L} groups")
    if per_k < 1:
        raise ValueError(f"--per-k must be at least 1, got {per_k}")
    return ks


def map_statistics(model, loader, aligned: bool, device: str, progress: bool = True) -> dict:
    """One pass over ``loader`` collecting the attention maps' statistics: ``similarity`` and
    ``divergence`` (L x L, :class:`LayerSimilarity`), ``cad`` (L, the mean CAD per layer),
    ``coverage`` (L PAR coverages against the lower half's PAR, or None without alignments) and
    ``utterances``."""
    from analysis.par import par_coverage
    from analysis.runner import AttentionStats, reference_par, utterance_maps

    L = model.num_layers
    sim_acc, stats = LayerSimilarity(L), AttentionStats(model.num_heads) if aligned else None
    cad_sum, cad_n = torch.zeros(L, dtype=torch.float64), 0
    with torch.inference_mode():
        for batch, b, maps in utterance_maps(model, loader, progress, device, desc="maps", dtype=torch.float64):
            sim_acc.add(maps)
            cad_sum += torch.stack([cad_of(m).mean() for m in maps])
            cad_n += 1
            if stats is not None:
                stats.add([m.float() for m in maps], batch["labels"][b, : maps[0].shape[-1]])
    coverage = None
    if stats is not None and stats.utterances:
        layers = stats.par_layers()
        ref = reference_par(layers)
        coverage = [par_coverage(layers[l], ref) for l in range(L)]
    return {
        "similarity": sim_acc.similarity(),
        "divergence": sim_acc.divergence(),
        "cad": cad_sum / max(1, cad_n),
        "coverage": coverage,
        "utterances": cad_n,
    }


def rank_candidates(
    model,
    loader,
    tokenizer,
    sim: torch.Tensor,
    ks: list[int],
    per_k: int,
    base_wer: float,
    device: str,
    progress: bool = True,
) -> tuple[list[dict], float]:
    """``(candidates, baseline GFLOP at 768 frames)``: the reuse plans of :func:`candidate_groups`,
    each with its zero-shot WER and loss, within-group similarity and GFLOP saved, sorted by WER
    (then saving) and marked on the Pareto front of saving against WER."""
    from tqdm import tqdm

    from models import ConformerCTC
    from models.retrofit import check_plan

    heads = model.num_heads
    # GFLOP counted the same way on every --device: on CPU copies of the baseline and of each plan's
    # trained reuse model (its own paths: a computing layer read by reuse layers materialises its map)
    cpu_base = ConformerCTC(**model.config).eval()
    base_gflop = encoder_gflop(cpu_base, 768)
    candidates = []
    for groups in tqdm(candidate_groups(sim, heads, ks, per_k), desc="zero-shot", unit="plan", disable=not progress):
        wer, loss = zero_shot(model, loader, tokenizer, sources_of(groups), device)
        reuse = plan_string(groups, heads)
        candidates.append(
            {
                "reuse": reuse,
                "groups": groups,
                "num_groups": len(groups),
                "zero_shot_wer": round(wer, 3),
                "wer_increase": round(wer - base_wer, 3),
                "zero_shot_loss": round(loss, 4),
                "similarity": round(within_group_similarity(sim, groups), 5),
                "gflop_saving": round(base_gflop - encoder_gflop(check_plan(cpu_base, reuse).eval(), 768), 4),
            }
        )
        candidates[-1]["gflop_saving_fraction"] = round(candidates[-1]["gflop_saving"] / base_gflop, 4)
    candidates.sort(key=lambda c: (c["zero_shot_wer"], -c["gflop_saving"]))
    front = pareto_front([(c["gflop_saving"], c["zero_shot_wer"]) for c in candidates])
    for i, c in enumerate(candidates):
        c["pareto"] = i in front
    return candidates, base_gflop


def print_table(result: dict, top: int = 20) -> None:
    b = result["baseline"]
    print(
        f"baseline {result['reuse']}: WER {b['wer']:.2f} %, CTC loss {b['loss']:.3f} "
        f"({result['utterances']} utterances, {result['seconds']} s)"
    )
    print(
        f"{'plan':32s} {'groups':>6s} {'WER%':>7s} {'+WER':>7s} {'loss':>8s} {'sim.':>6s} {'GFLOP saved':>11s} "
        f"{'%':>5s} pareto"
    )
    for c in result["candidates"][:top]:
        print(
            f"{c['reuse']:32s} {c['num_groups']:6d} {c['zero_shot_wer']:7.2f} {c['wer_increase']:7.2f} "
            f"{c['zero_shot_loss']:8.3f} {c['similarity']:6.3f} {c['gflop_saving']:11.3f} "
            f"{100 * c['gflop_saving_fraction']:5.1f} {'*' if c['pareto'] else ''}"
        )
