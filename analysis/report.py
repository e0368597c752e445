"""The analysis report of one checkpoint over one aligned manifest: every figure (PNG) and every
number (JSON / CSV). ``python -m analysis report`` runs all steps; the other sub-commands run one.
"""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import numpy as np
import torch

from analysis import plots
from analysis.ablation import cumulative_ablation
from analysis.context_mixing import context_mixing
from analysis.head_types import category_ranking, classify_heads
from analysis.par import par_coverage
from analysis.probe import collect, probe_accuracy, train_probes
from analysis.report_model import open_model, open_reference
from analysis.runner import (
    accumulated_coverage,
    aligned_manifest,
    attention_stats,
    labelled_loader,
    reference_par,
    save_par,
)
from common.io import atomic_write_text, check_writable
from data.alignments import PHONE_CLASSES, read_textgrid
from data.dataset import entry_frames
from data.features import SAMPLE_RATE, fbank, load_audio
from data.framing import LabelFraming
from data.manifest import read_manifest, resolve_manifest, write_manifest

STEPS = ("cad", "par", "heads", "probe", "ablation", "mixing")
UPSTREAM_STEPS = ("cad", "par", "heads", "probe", "ablation")  # context mixing needs our encoder's internals
OPTIONAL_STEPS = ("suggest", "saliency")  # run by ``report`` when asked (``--suggest``, ``--saliency``), or alone


def _write_csv(path: Path, header: list[str], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _nan_to_none(x):
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    return x


class Report:
    """Holds the model, data and results of one report run; each ``step_*`` adds to ``results``."""

    def __init__(
        self,
        ckpt: str | None,
        manifest: str,
        out: str,
        alignments: str | None = None,
        reference: str | None = None,
        probe_train: str | None = None,
        limit: int | None = None,
        utterance: str | None = None,
        max_frames: int = 20000,
        probe_epochs: int = 15,
        progress: bool = True,
        upstream: str | None = None,
        upstream_ckpt: str | None = None,
        data_dir: str | None = None,
        device: str = "cpu",
        need_alignments: bool = True,
        saliency_options: dict | None = None,
        decoder_text: str = "greedy",
    ):
        self.out = check_writable(out)
        self.saliency_options = saliency_options or {}
        self.device = device
        self.ckpt = ckpt
        self.upstream = upstream
        if decoder_text not in ("greedy", "reference"):
            raise ValueError(f"--decoder-text must be greedy or reference; got {decoder_text!r}")
        self.decoder_text = decoder_text
        opened = open_model(ckpt, upstream, upstream_ckpt, data_dir, device, max_frames)
        self.model, self.hp, self.data_dir, self.cmvn = opened.model, opened.hp, opened.data_dir, opened.cmvn
        self.featurizer, self.framing, self.tokenizer = opened.featurizer, opened.framing, opened.tokenizer
        if need_alignments:
            self.manifest, counts = aligned_manifest(
                self._manifest_path(manifest), alignments, self.out / "aligned.jsonl"
            )
        else:  # saliency alone reads no alignment
            self.manifest, counts = self._manifest_path(manifest), None
        self.probe_train = self._manifest_path(probe_train) if probe_train else None
        self.alignments, self.reference, self.limit, self.utterance = alignments, reference, limit, utterance
        self.max_frames, self.probe_epochs, self.progress = opened.max_frames, probe_epochs, progress
        if upstream == "hf":  # Whisper: every utterance must fit its window, checked before any work
            for e in read_manifest(self.manifest):
                self.model.check_samples(round(e["duration"] * SAMPLE_RATE), f"{self.manifest}: utterance {e['id']}")
        self.results: dict = {
            "checkpoint": self.hp["checkpoints"],
            "reuse": self.hp["reuse"],
            "manifest": str(manifest),
            "alignment_counts": counts,
            "figures": {},
        }
        if upstream == "hf":
            self.results["hf_model"] = self.model.summary  # kept up to date by encode (Whisper's padding)
        self._stats = None
        self._probes = None
        self._mixing_entry = None
        self._saliency_adapter = None
        # --reference is read now, not after the attention pass: a bad file fails before any work
        self._reference_par, self._reference_model = open_reference(reference, device)

    def _check_mixing_utterance(self) -> dict:
        """The utterance of the context-mixing figure, checked before any work: it must be in the
        manifest and hold at least two aligned words."""
        entries = read_manifest(self.manifest)
        if self.utterance:
            entries = [e for e in entries if e["id"] == self.utterance]
            if not entries:
                raise ValueError(f"--utterance {self.utterance} is not among the aligned utterances of {self.manifest}")
        framing = self.framing or LabelFraming()
        for e in entries:  # the first with two words or more (the named one must have them)
            T = framing.count(entry_frames(e, self.featurizer))  # the model's own frames (4x, 6x, 8x)
            if len(read_textgrid(e["alignment"]).word_frames(T, framing.shift, framing.window)) >= 2:
                return e
            if self.utterance:
                raise ValueError(
                    f"--utterance {self.utterance} has fewer than two aligned words (context mixing compares words)"
                )
        raise ValueError(f"{self.manifest}: no utterance with two aligned words for context mixing")

    def _manifest_path(self, name: str) -> Path:
        hint = "" if name.endswith(".jsonl") else " (give a .jsonl path or a prepared subset name)"
        return resolve_manifest(name, self.data_dir, hint)

    def loader(self, manifest: Path | None = None, limit: int | None = None):
        return labelled_loader(
            manifest or self.manifest,
            self.cmvn,
            self.max_frames,
            self.limit if manifest is None else limit,
            featurizer=self.featurizer,
            framing=self.framing,
        )

    @property
    def stats(self):
        if self._stats is None:
            t0 = time.perf_counter()
            self._stats, skipped = attention_stats(self.model, self.loader(), self.progress, self.device)
            self.results["attention_pass"] = {
                "utterances": self._stats.utterances,
                "skipped_too_short": skipped,
                "seconds": round(time.perf_counter() - t0, 2),
            }
            if self._stats.utterances == 0:
                raise ValueError(f"{self.manifest}: no utterance with at least two speech frames to analyse")
        return self._stats

    # --- steps -----------------------------------------------------------------------------------
    def step_cad(self):
        cad = self.stats.cad().numpy()
        self.results["cad"] = {"per_head": cad.tolist(), "layer_median": [float(np.nanmedian(r)) for r in cad]}
        _write_csv(
            self.out / "cad.csv",
            ["layer", "head", "cad"],
            [(l + 1, h, cad[l, h]) for l in range(cad.shape[0]) for h in range(self.model.num_heads[l])],
        )
        self.results["figures"]["cad"] = str(plots.cad_per_head(cad, self.out / "cad.png", f"CAD, {self.hp['reuse']}"))

    def _reference(self, own_layers: torch.Tensor) -> tuple[torch.Tensor, str]:
        if self.reference is None:
            return reference_par(own_layers), "self (lower half)"
        ref = Path(self.reference)
        if self._reference_par is not None:
            return reference_par(self._reference_par), f"{ref} (lower half)"
        model = self._reference_model
        stats, _ = attention_stats(model, self.loader(), self.progress, self.device)
        return reference_par(stats.par_layers()), f"{ref} (lower half)"

    def step_par(self):
        layers = self.stats.par_layers()
        L = layers.shape[0]
        lower, upper = torch.nanmean(layers[: L // 2 or 1], 0), torch.nanmean(layers[L // 2 :], 0)
        ref, ref_name = self._reference(layers)
        save_par(self.out / "par.json", layers)
        self.results["par"] = {
            "classes": PHONE_CLASSES,
            "lower": lower.tolist(),
            "upper": upper.tolist(),
            "reference": ref_name,
            "coverage_per_layer": [par_coverage(layers[l], ref) for l in range(L)],
            "coverage_accumulated": accumulated_coverage(layers, ref),
        }
        _write_csv(
            self.out / "coverage.csv",
            ["layer", "coverage", "accumulated_coverage"],
            [
                (l + 1, c, a)
                for l, (c, a) in enumerate(
                    zip(self.results["par"]["coverage_per_layer"], self.results["par"]["coverage_accumulated"])
                )
            ],
        )
        self.results["figures"]["par"] = str(plots.par_heatmaps(lower.numpy(), upper.numpy(), self.out / "par.png"))
        self.results["figures"]["coverage"] = str(
            plots.coverage(
                {f"{self.hp['reuse']}": self.results["par"]["coverage_accumulated"]}, self.out / "coverage.png"
            )
        )

    def _gvd(self):
        gvd = self.stats.gvd().numpy()
        valid = np.isfinite(gvd[0])
        return gvd, valid

    def step_heads(self):
        gvd, valid = self._gvd()
        cats = np.full(valid.shape, None, dtype=object)
        cats[valid] = classify_heads(gvd[0][valid], gvd[1][valid], gvd[2][valid])
        prm = self.stats.prm()
        self.results["heads"] = {
            "G": gvd[0].tolist(),
            "V": gvd[1].tolist(),
            "D": gvd[2].tolist(),
            "category": cats.tolist(),
            "prm_last_layer": prm.tolist(),
        }
        _write_csv(
            self.out / "heads.csv",
            ["layer", "head", "G", "V", "D", "category"],
            [
                (l + 1, h, *gvd[:, l, h], cats[l, h])
                for l in range(valid.shape[0])
                for h in range(valid.shape[1])
                if valid[l, h]
            ],
        )
        self.results["figures"]["heads"] = str(plots.head_categories(gvd, cats, self.out / "heads.png"))
        self.results["figures"]["prm"] = str(plots.prm(prm.numpy(), self.out / "prm.png"))

    def _probe_sets(self):
        if self.probe_train is not None:
            train_m, _ = aligned_manifest(self.probe_train, self.alignments, self.out / "probe_train.jsonl")
            return train_m, self.manifest
        entries = read_manifest(self.manifest)[: self.limit]
        if len(entries) < 2:
            raise ValueError(f"{self.manifest}: need at least 2 aligned utterances to split for the probes")
        write_manifest(self.out / "probe_train.jsonl", entries[0::2])
        write_manifest(self.out / "probe_test.jsonl", entries[1::2])
        return self.out / "probe_train.jsonl", self.out / "probe_test.jsonl"

    def step_probe(self):
        train_m, test_m = self._probe_sets()
        self._test_loader = self.loader(test_m)
        train_cache = collect(self.model, self.loader(train_m), device=self.device, progress=self.progress)
        test_cache = collect(self.model, self._test_loader, device=self.device, progress=self.progress)
        self._probes = train_probes(train_cache, epochs=self.probe_epochs, progress=self.progress)
        acc = probe_accuracy(self._probes, test_cache)
        self.results["probe"] = {
            "accuracy": acc.tolist(),
            "train_frames": int(train_cache.labels.numel()),
            "test_frames": int(test_cache.labels.numel()),
            "train": str(train_m),
            "test": str(test_m),
        }
        _write_csv(self.out / "probe.csv", ["layer", "accuracy"], list(enumerate(acc.tolist())))
        self.results["figures"]["probe"] = str(
            plots.probe_accuracy(acc.numpy(), self.out / "probe.png", f"phoneme probe, {self.hp['reuse']}")
        )

    def step_ablation(self):
        if self._probes is None:
            self.step_probe()
        gvd, valid = self._gvd()
        heads = self.model.num_heads
        # the real heads of every layer in layer order: the flat indexing of cumulative_ablation
        ranking = category_ranking(*(gvd[k][valid] for k in range(3)))
        last = len(heads)

        def metric(mask):
            cache = collect(self.model, self._test_loader, head_mask=mask, device=self.device)
            return float(probe_accuracy(self._probes, cache)[last])

        result = cumulative_ablation(ranking, heads, metric, progress=self.progress)
        self.results["ablation"] = {"metric": "last-layer probe frame accuracy", **result}
        self.results["figures"]["ablation"] = str(plots.ablation(result, self.out / "ablation.png"))

    def step_mixing(self):
        if self.upstream == "hf":
            from analysis.hf_report import hf_mixing_step

            return hf_mixing_step(self, self._mixing_entry or self._check_mixing_utterance())
        if self.upstream is not None:
            raise ValueError("context mixing needs the Conformer's layers; it is not available for upstream models")
        e = self._mixing_entry or self._check_mixing_utterance()
        framing = self.framing or LabelFraming()
        feats = self.cmvn((self.featurizer or fbank)(load_audio(e["audio"])))
        T = framing.count(feats.shape[0])
        words = read_textgrid(e["alignment"]).word_frames(T, framing.shift, framing.window)
        if len(words) < 2:
            raise ValueError(f"utterance {e['id']} has fewer than two aligned words")
        scores = context_mixing(self.model, feats.to(self.device), [f for _, f in words])
        scores = {m: v.cpu() for m, v in scores.items()}
        names = [w for w, _ in words]
        self.results["mixing"] = {"utterance": e["id"], "words": names, **{m: v.tolist() for m, v in scores.items()}}
        self.results["figures"]["mixing"] = str(
            plots.context_mixing(
                {m: v.numpy() for m, v in scores.items()},
                names,
                [f"layer {l + 1}" for l in range(self.model.num_layers)],
                self.out / "context_mixing.png",
            )
        )

    def step_suggest(self):
        """Reuse-plan suggestion for this baseline (``analysis/suggest.py``) on the report's manifest:
        the similarity heat map, the zero-shot table and its figure, under ``OUT/suggest/``."""
        from analysis.suggest import suggest

        if self.upstream is not None:
            raise ValueError("suggest-reuse needs a Conformer baseline of ours")
        r = suggest(
            self.ckpt,
            str(self.manifest),
            str(self.out / "suggest"),
            limit=self.limit,
            device=self.device,
            progress=self.progress,
            max_frames=self.max_frames,
        )
        self.results["suggest"] = {k: r[k] for k in ("baseline", "similarity", "candidates")}
        self.results["figures"]["similarity"] = str(self.out / "suggest" / "similarity.png")
        self.results["figures"]["candidates"] = str(self.out / "suggest" / "candidates.png")

    def _saliency_model(self):
        """The saliency interface of the report's model (checked before any work by :meth:`run`)."""
        if self._saliency_adapter is None:
            from analysis.saliency_report import saliency_model

            self._saliency_adapter = saliency_model(self.model, self.upstream)
        return self._saliency_adapter

    def step_saliency(self):
        """Attention against input saliency for each output token (``analysis/saliency.py``; transformers
        models: ``analysis/saliency_hf.py``) over the report's manifest (``--limit`` utterances):
        ``OUT/saliency.json`` and three figures."""
        from analysis.saliency_report import run_manifest

        r = run_manifest(
            self._saliency_model(),
            self.manifest,
            self.out,
            cmvn=self.cmvn,
            featurizer=self.featurizer,
            framing=self.framing,
            limit=self.limit,
            device=self.device,
            progress=self.progress,
            settings={"checkpoint": self.hp["checkpoints"], "reuse": self.hp["reuse"]},
            **self.saliency_options,
        )
        self.results["saliency"] = {k: r[k] for k in ("tokens", "utterances", "layers", "correlation", "deletion")}
        self.results["figures"].update({f"saliency_{k}": v for k, v in r["figures"].items()})
        self._saliency = r

    def run(self, steps=None) -> dict:
        """Runs the steps; ``report.json`` is rewritten after each, so a failing step keeps what the
        earlier ones computed (and names itself under ``failed_step``)."""
        steps = steps or (UPSTREAM_STEPS if self.upstream not in (None, "hf") else STEPS)
        if "mixing" in steps and self.upstream in (None, "hf"):
            self._mixing_entry = self._check_mixing_utterance()  # a bad --utterance fails before any work
        if "saliency" in steps:
            self._saliency_model()  # a model without tokens to explain fails before any work
        for s in steps:
            try:
                getattr(self, f"step_{s}")()
            except BaseException as e:
                self.results["failed_step"] = {"step": s, "error": f"{type(e).__name__}: {e}"}
                raise
            finally:
                atomic_write_text(self.out / "report.json", json.dumps(_nan_to_none(self.results), indent=1))
        return self.results
