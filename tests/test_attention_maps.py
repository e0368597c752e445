"""Attention maps in TensorBoard while training (training/attention_maps.py): a 2-step fit through
train.py's CLI writes one image pair and one CAD scalar per computing layer at each validation,
equal to analysis.cad's on the same map; with the option off nothing is computed."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, TENSORS, EventAccumulator

import train
from analysis.cad import cad
from data.datamodule import ASRDataModule
from data.manifest import read_manifest
from models import ConformerCTC
from models.checkpoint import load_model
from training.attention_maps import AttentionMaps, computing_layers, first_utterance, layer_cad_medians, map_image

ROOT = Path(__file__).resolve().parents[1]
PLAN = "2(H2)+1(H4)"  # layers 1 and 3 (1-based) compute maps; layer 2 applies layer 1's
TINY = {"reuse": PLAN, "d_model": 32, "num_layers": 3, "ffn_dim": 64, "kernel_size": 5, "subsampling_channels": 8}


class EncodeSpy:
    """Counts every ``ConformerCTC.encode`` call, and those asking for attention maps."""

    def __init__(self, monkeypatch):
        self.calls, self.with_maps = 0, 0
        real = ConformerCTC.encode

        def encode(model, *args, **kwargs):
            self.calls += 1
            self.with_maps += bool(kwargs.get("return_attentions"))
            return real(model, *args, **kwargs)

        monkeypatch.setattr(ConformerCTC, "encode", encode)


def _cli_fit(prepared, root: Path, *extra: str) -> None:
    """train.py's CLI in this process: the mini recipe, a 3-layer model, 2 steps validated after each."""
    model = [a for k, v in TINY.items() for a in (f"--model.{k}", str(v))]
    train.main(
        [
            "fit",
            "--config",
            str(ROOT / "recipes/mini/base.yaml"),
            "--data.data_dir",
            str(prepared),
            "--data.num_workers",
            "0",
            "--trainer.default_root_dir",
            str(root),
            "--trainer.max_steps",
            "2",
            "--trainer.limit_train_batches",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.val_check_interval",
            "1",
            "--trainer.precision",
            "32-true",
            "--trainer.enable_progress_bar",
            "false",
            *model,
            *extra,
        ]
    )


def _events(root: Path) -> EventAccumulator:
    (folder,) = (root / "tensorboard").glob("version_*")
    return EventAccumulator(str(folder), size_guidance={IMAGES: 0, SCALARS: 0, TENSORS: 0}).Reload()


@pytest.fixture(scope="module")
def fitted(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("attention_on")
    with pytest.MonkeyPatch.context() as mp:
        spy = EncodeSpy(mp)
        _cli_fit(prepared, root)
    return root, spy


def test_event_file_holds_maps_and_cad_of_each_computing_layer(fitted):
    root, spy = fitted
    acc = _events(root)
    tags = acc.Tags()
    images = sorted(t for t in tags["images"] if t.startswith("attention/"))
    assert images == [
        "attention/layer01/heads",
        "attention/layer01/mean",
        "attention/layer03/heads",
        "attention/layer03/mean",
    ]  # layer 2 reuses layer 1's map: none of its own
    assert sorted(t for t in tags["scalars"] if t.startswith("cad/")) == ["cad/layer01", "cad/layer03"]
    for tag in images:
        assert [e.step for e in acc.Images(tag)] == [1, 2]  # one per validation
    for tag in ("cad/layer01", "cad/layer03"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2]
        assert all(0.0 < e.value <= 1.0 for e in acc.Scalars(tag))
    size = {t: Image.open(io.BytesIO(acc.Images(t)[-1].encoded_image_string)).size for t in images}
    assert all(w > 100 and h > 100 for w, h in size.values())
    # the per-head grid has a panel per head: layer 3 (4 heads) is wider than layer 1 (2 heads)
    assert size["attention/layer03/heads"][0] > size["attention/layer01/heads"][0] > size["attention/layer01/mean"][0]
    assert spy.with_maps == 2  # one forward of one utterance per validation


def test_logged_cad_equals_analysis_cad_of_the_same_map(fitted, prepared):
    """The step-2 scalars against maps recomputed from last.ckpt (the weights of that validation)
    on the dev utterance with the smallest id, by the model and analysis.cad directly."""
    root, _ = fitted
    acc = _events(root)
    first = min(e["id"] for e in read_manifest(prepared / "manifests" / "mini-dev.jsonl"))
    text = acc.Tensors("attention/utterance/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert text.startswith(f"{first} (")
    ckpt = root / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"] == 2
    model = load_model(ckpt)[0].eval()
    ds = ASRDataModule(str(prepared), valid_sets=["mini-dev"], num_workers=0).dataset(["mini-dev"])
    item = ds[next(i for i, e in enumerate(ds.entries) if e["id"] == first)]
    with torch.no_grad():
        enc = model.encode(item["features"][None], torch.tensor([len(item["features"])]), return_attentions=True)
    assert int(enc.lengths[0]) == enc.attentions[0].shape[-1]  # alone: no padding
    for layer in (0, 2):
        expected = np.median([float(cad(enc.attentions[layer][0, h].double())) for h in range(model.num_heads[layer])])
        logged = next(e.value for e in acc.Scalars(f"cad/layer{layer + 1:02d}") if e.step == 2)
        assert logged == pytest.approx(expected, abs=1e-5)


def test_off_computes_nothing(prepared, tmp_path, monkeypatch, fitted):
    _, on = fitted
    spy = EncodeSpy(monkeypatch)
    _cli_fit(prepared, tmp_path, "--attention_maps", "false")
    tags = _events(tmp_path).Tags()
    assert not [t for t in tags["images"] + tags["scalars"] + tags["tensors"] if t.startswith(("attention", "cad/"))]
    assert "val_wer" in tags["scalars"]  # the run itself logged
    assert spy.with_maps == 0 and spy.calls == on.calls - on.with_maps  # no extra forward at all


def test_without_tensorboard_logger_one_warning_and_no_forward(prepared, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    spy = EncodeSpy(monkeypatch)
    dm = ASRDataModule(str(prepared), ["mini-train"], ["mini-dev"], max_frames=2500, num_workers=0)
    module = train.CTCModule(str(prepared / "bpe.model"), **TINY)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=CSVLogger(str(tmp_path)),
        callbacks=[AttentionMaps()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, dm)
    ours = [w for w in caught if "attention_maps: no TensorBoard logger" in str(w.message)]
    assert len(ours) == 1 and "CSVLogger" in str(ours[0].message)
    assert spy.with_maps == 0


def test_only_rank_zero_computes(prepared):
    """A non-zero rank neither looks for a logger nor computes (the bare model would otherwise run)."""
    cb = AttentionMaps()
    model = SimpleNamespace(model=None)  # any forward would fail on it
    rank1 = SimpleNamespace(
        is_global_zero=False, loggers=[object()], sanity_checking=False, state=SimpleNamespace(fn="fit")
    )
    cb.setup(rank1, model, "fit")
    cb.on_validation_epoch_end(rank1, model)
    assert cb.logger is None and cb.item is None


def test_layer_cad_medians_analytic():
    """Identity maps have CAD 1, uniform maps 1 - (T+1)/(3T); the median of an even head count is
    the mean of the middle two, as the report's ``layer_median``."""
    T = 6
    eye, uniform = torch.eye(T), torch.full((T, T), 1.0 / T)
    u = 1 - (T + 1) / (3 * T)
    maps = [torch.stack([eye, uniform]), torch.stack([eye]), torch.stack([uniform, uniform, eye])]
    assert layer_cad_medians(maps, [0, 1, 2]) == pytest.approx({0: (1 + u) / 2, 1: 1.0, 2: u})
    assert list(layer_cad_medians(maps, [2])) == [2]


def test_computing_layers_follow_the_plan():
    for plan, layers in (("1(H2)x3", [0, 1, 2]), ("2(H2)+1(H4)", [0, 2]), ("3(H2)", [0])):
        assert computing_layers(ConformerCTC(10, d_model=16, num_layers=3, reuse=plan)) == layers


def test_first_utterance_by_id_skips_unreadable():
    class Dataset:  # "a-1" cannot be read
        def __init__(self, ids):
            self.entries = [{"id": i} for i in ids]

        def __getitem__(self, i):
            return None if self.entries[i]["id"] == "a-1" else {"id": self.entries[i]["id"]}

    assert first_utterance(Dataset(["b-1", "a-2", "a-1"]))["id"] == "a-2"
    with pytest.raises(ValueError, match="no validation utterance could be read"):
        first_utterance(Dataset(["a-1"]))
    with pytest.raises(ValueError, match="lists no utterance"):
        first_utterance(Dataset([]))


def test_map_image_panels():
    one = map_image(np.eye(5)[None], ["a"])
    four = map_image(np.stack([np.eye(5)] * 4), list("abcd"))
    six = map_image(np.stack([np.eye(5)] * 6), list("abcdef"))
    assert one.dtype == np.uint8 and one.shape[2] == 3
    assert four.shape[1] == six.shape[1] > one.shape[1]  # at most 4 panels a row
    assert six.shape[0] > four.shape[0] == one.shape[0]  # a second row
