"""Corpus runners: stream a manifest with alignments through a checkpoint and accumulate CAD,
PAR, head scores and phoneme relation maps per layer and head, one utterance at a time (no map is
kept beyond its batch).
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import torch

from analysis.cad import cad
from analysis.head_types import head_scores, phoneme_relation_speech
from analysis.par import par_speech
from analysis.silence import drop_silence
from data.alignments import NUM_PHONES, SILENCE, find_alignment
from data.dataset import ManifestDataset
from data.features import GlobalCMVN
from data.manifest import read_manifest, write_manifest
from data.sampler import ordered_loader


def aligned_manifest(manifest: str | Path, alignments: str | Path | None, out: Path) -> tuple[Path, dict]:
    """A manifest whose entries all carry an alignment: those of ``manifest`` that have one
    (or whose TextGrid is found under ``alignments``). Returns its path and the counts; refuses a
    manifest with no aligned utterance."""
    manifest = Path(manifest)
    entries = read_manifest(manifest)
    kept, missing = [], []
    for e in entries:
        path = e.get("alignment")
        if not path and alignments is not None:
            spk, chapter = (e["id"].split("-") + ["", ""])[:2]
            found = find_alignment(
                Path(alignments),
                manifest.stem,
                {"speaker": e.get("speaker", spk), "chapter": e.get("chapter", chapter), "id": e["id"]},
            )
            path = str(found) if found else None
        (kept if path else missing).append({**e, "alignment": path} if path else e)
    if not kept:
        raise ValueError(
            f"{manifest}: no utterance has an alignment"
            + (f" under {alignments}" if alignments else "")
            + "; pass --alignments or prepare with --alignments"
        )
    if missing:
        warnings.warn(
            f"{manifest}: {len(missing)} of {len(entries)} utterances have no alignment and are skipped "
            f"(e.g. {missing[0]['id']})",
            stacklevel=2,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, kept)
    return out, {"utterances": len(entries), "aligned": len(kept), "skipped_no_alignment": len(missing)}


def labelled_loader(
    manifest: Path,
    cmvn: GlobalCMVN | None,
    max_frames: int = 20000,
    limit: int | None = None,
    num_workers: int = 0,
    featurizer=None,
    framing=None,
):
    """Batches with model-frame labels (no SpecAugment, no shuffling); ``featurizer`` and
    ``framing`` default to our fbank and 40 ms encoder frames (see ``ManifestDataset``)."""
    ds = ManifestDataset([manifest], cmvn=cmvn, with_labels=True, featurizer=featurizer, framing=framing)
    if limit is not None:
        ds.entries = ds.entries[:limit]
    return ordered_loader(ds, max_frames, num_workers)


@dataclasses.dataclass
class AttentionStats:
    """Per-layer, per-head sums over utterances (NaN-aware for PAR)."""

    heads: list[int]
    num_classes: int = NUM_PHONES
    utterances: int = 0

    def __post_init__(self):
        L, Hm, C = len(self.heads), max(self.heads), self.num_classes
        self.cad_sum = torch.zeros(L, Hm, dtype=torch.float64)
        self.gvd_sum = torch.zeros(3, L, Hm, dtype=torch.float64)
        self.par_sum = torch.zeros(L, Hm, C, C, dtype=torch.float64)
        self.par_count = torch.zeros(L, Hm, C, C, dtype=torch.float64)
        self.prm_p = torch.zeros(Hm, C, C, dtype=torch.float64)  # last layer
        self.prm_u = torch.zeros(C, C, dtype=torch.float64)

    def add(self, attentions: list[torch.Tensor], labels: torch.Tensor) -> bool:
        """One utterance: ``attentions`` one ``(H_l, T, T)`` per layer, ``labels (T,)`` 0..36.
        Returns False (and adds nothing) for an utterance with fewer than 2 speech frames."""
        if int(((labels >= 0) & (labels != SILENCE)).sum()) < 2:
            return False
        for l, a in enumerate(attentions):
            h = a.shape[0]
            speech, y = drop_silence(a.double(), labels)  # once per layer, shared by every metric
            self.cad_sum[l, :h] += cad(speech)
            g, v, d = head_scores(speech)
            self.gvd_sum[:, l, :h] += torch.stack([g, v, d])
            p = par_speech(speech, y, self.num_classes).double()
            ok = torch.isfinite(p)
            self.par_sum[l, :h] += torch.where(ok, p, torch.zeros_like(p))
            self.par_count[l, :h] += ok
        pp, pu = phoneme_relation_speech(speech, y, self.num_classes)
        self.prm_p[: attentions[-1].shape[0]] += pp.double()
        self.prm_u += pu.double()
        self.utterances += 1
        return True

    # --- results -------------------------------------------------------------------------------
    def _need(self):
        if self.utterances == 0:
            raise ValueError("no utterance was analysed: nothing to average")

    def _valid(self) -> torch.Tensor:
        Hm = max(self.heads)
        return torch.arange(Hm)[None, :] < torch.tensor(self.heads)[:, None]

    def cad(self) -> torch.Tensor:
        """``(L, H_max)`` mean CAD (NaN for heads a layer does not have)."""
        self._need()
        return torch.where(
            self._valid(), self.cad_sum / self.utterances, torch.tensor(float("nan"), dtype=torch.float64)
        )

    def gvd(self) -> torch.Tensor:
        """``(3, L, H_max)`` mean G, V, D."""
        self._need()
        return torch.where(
            self._valid()[None], self.gvd_sum / self.utterances, torch.tensor(float("nan"), dtype=torch.float64)
        )

    def par_heads(self) -> torch.Tensor:
        """``(L, H_max, C, C)`` corpus PAR per head: mean over the utterances where it is defined."""
        self._need()
        return torch.where(
            self.par_count > 0,
            self.par_sum / self.par_count.clamp_min(1),
            torch.tensor(float("nan"), dtype=torch.float64),
        )

    def par_layers(self) -> torch.Tensor:
        """``(L, C, C)`` PAR of each layer = mean over its heads (NaN-aware)."""
        p = self.par_heads()
        return torch.nanmean(p, dim=1)

    def prm(self) -> torch.Tensor:
        """``(C, C)`` PRM of the last layer, averaged over its heads."""
        self._need()
        h = self.heads[-1]
        p = self.prm_p[:h].mean(0) / self.utterances
        u = self.prm_u / self.utterances
        return torch.where(u > 0, (p - u) / u.clamp_min(1e-30), torch.tensor(float("nan"), dtype=torch.float64))


def utterance_maps(
    model,
    loader,
    progress: bool = True,
    device: str = "cpu",
    desc: str = "attention",
    dtype: torch.dtype = torch.float32,
):
    """Stream every batch of ``loader`` through ``model.encode(return_attentions=True)`` and yield,
    per utterance, ``(batch, b, maps)``: its index ``b`` in the batch and one ``(H_l, n, n)`` map per
    layer cut to its ``n`` frames (no padding), on the CPU in ``dtype``. The one pass every
    corpus-level attention statistic (PAR, coverage, layer similarity, CAD) is accumulated over."""
    from tqdm import tqdm

    with torch.inference_mode():
        for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
            if batch is None:
                continue
            enc = model.encode(
                batch["features"].to(device), batch["feature_lengths"].to(device), return_attentions=True
            )
            for b, n in enumerate(enc.lengths.cpu().tolist()):
                yield batch, b, [a[b, :, :n, :n].cpu().to(dtype) for a in enc.attentions]


@torch.inference_mode()
def attention_stats(model, loader, progress: bool = True, device: str = "cpu") -> tuple[AttentionStats, int]:
    """Accumulate :class:`AttentionStats` over :func:`utterance_maps`; returns the statistics and
    the number of utterances skipped (fewer than two speech frames)."""
    stats = AttentionStats(model.num_heads)
    skipped = 0
    for batch, b, maps in utterance_maps(model, loader, progress, device):
        if not stats.add(maps, batch["labels"][b, : maps[0].shape[-1]]):
            skipped += 1
    return stats, skipped


def accumulated_coverage(par_layers: torch.Tensor, ref: torch.Tensor, top_k: int = 10) -> list[float]:
    """Coverage of the mean PAR of layers ``1..l`` against ``ref``, for each ``l``."""
    from analysis.par import par_coverage

    return [par_coverage(torch.nanmean(par_layers[: l + 1], 0), ref, top_k) for l in range(par_layers.shape[0])]


def reference_par(par_layers: torch.Tensor) -> torch.Tensor:
    """The coverage reference of Shim, Choi, Sung, ICLR 2022 (Section 5, Eq. 6): mean PAR over the lower half
    of the layers."""
    return torch.nanmean(par_layers[: max(1, par_layers.shape[0] // 2)], 0)


def save_par(path: str | Path, par_layers: torch.Tensor) -> None:
    Path(path).write_text(json.dumps({"par_layers": par_layers.tolist()}))


def load_par(path: str | Path) -> torch.Tensor:
    try:
        return torch.tensor(json.loads(Path(path).read_text())["par_layers"], dtype=torch.float64)
    except (OSError, KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a saved PAR file ({e})") from None
