"""Device placement without a GPU: evaluation, the analysis runner and a training step with the
model on another device than the data (``fake_device.OtherDevice``). Data-side tensors (features,
CMVN, labels) must stay on the CPU and batches must be moved explicitly; mixing raises as on CUDA.
Results must equal the CPU run's exactly."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from fake_device import OnDevice, OtherDevice
from test_train import TINY, _fit

import evaluate
import train
from analysis.report import Report
from data.datamodule import ASRDataModule


@pytest.fixture(scope="module")
def ckpt(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("devices")
    _fit(prepared, root, max_epochs=2, limit=3)
    return root / "checkpoints" / "last.ckpt"


def test_fake_device_behaves_like_another_device():
    with OtherDevice() as dev:
        m = torch.nn.Linear(4, 2).to(dev.device)
        assert isinstance(m.weight, OnDevice) and m.weight.device == dev.device
        with pytest.raises(RuntimeError, match="same device"):
            m(torch.randn(3, 4))  # a CPU batch fed to a model elsewhere
        y = m(torch.randn(3, 4).to(dev.device))
        y.sum().backward()
        assert isinstance(m.weight.grad, OnDevice)
        assert dev.moves_to_device == 3 and dev.host_reads == []  # weight, bias, batch
        assert float(y.detach().sum()) == pytest.approx(float(y.detach().cpu().sum()))
        assert len(dev.host_reads) == 2  # float() of a device value, one copy to the host


def test_evaluate_on_another_device_equals_cpu(prepared, ckpt, tmp_path):
    common = ["--ckpt", str(ckpt), "--sets", "mini-test", "--beam-size", "4"]
    evaluate.main(common + ["--device", "cpu", "--out", str(tmp_path / "cpu")])
    with OtherDevice() as dev:
        evaluate.main(common + ["--device", str(dev.device), "--out", str(tmp_path / "dev")])
    assert dev.moves_to_device > 0
    cpu = json.loads((tmp_path / "cpu" / "results.json").read_text())["sets"]["mini-test"]
    other = json.loads((tmp_path / "dev" / "results.json").read_text())["sets"]["mini-test"]
    for dec in ("greedy", "beam"):
        assert {k: v for k, v in other[dec].items() if k != "rtf"} == {k: v for k, v in cpu[dec].items() if k != "rtf"}
    assert (tmp_path / "cpu" / "mini-test.hyp.tsv").read_text() == (tmp_path / "dev" / "mini-test.hyp.tsv").read_text()


def test_analysis_on_another_device_equals_cpu(prepared, ckpt, tmp_path):
    steps = ["cad", "par", "probe", "mixing"]
    cpu = Report(str(ckpt), "mini-test", str(tmp_path / "cpu"), probe_epochs=2, progress=False).run(steps)
    with OtherDevice() as dev:
        other = Report(
            str(ckpt), "mini-test", str(tmp_path / "dev"), probe_epochs=2, progress=False, device=str(dev.device)
        ).run(steps)
    assert dev.moves_to_device > 0
    assert other["cad"] == cpu["cad"]
    assert other["par"]["coverage_per_layer"] == cpu["par"]["coverage_per_layer"]
    for m in ("attention", "attention_norm", "value_zeroing"):
        assert torch.allclose(torch.tensor(other["mixing"][m]), torch.tensor(cpu["mixing"][m]), atol=1e-6), m
    assert other["probe"]["test_frames"] == cpu["probe"]["test_frames"]


def test_training_step_on_another_device(prepared):
    """The batch Lightning moves (``transfer_batch_to_device``) meets a model elsewhere: the loss,
    its gradients and the skip decision work there; the loader's output stays on the CPU."""
    dm = ASRDataModule(str(prepared), ["mini-train"], ["mini-dev"], max_frames=2500, num_workers=0, time_masks=2)
    L.seed_everything(0)
    module = train.CTCModule(str(prepared / "bpe.model"), **TINY)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False
    )
    module.trainer = trainer
    module.log = lambda *a, **k: None
    loader = dm.train_dataloader()
    with OtherDevice() as dev:
        batch = next(iter(loader))
        assert batch["features"].device.type == "cpu" and not isinstance(batch["features"], OnDevice)
        module.to(dev.device)
        trainer.strategy.optimizers = [torch.optim.SGD(module.parameters(), lr=0.1)]
        moved = module.transfer_batch_to_device(batch, dev.device, 0)
        torch.manual_seed(1)  # dropout
        loss = module.training_step(moved, 0)
        assert isinstance(loss, OnDevice) and torch.isfinite(loss.cpu())
        device_loss = float(loss.detach().cpu())
        loss.backward()
        module.on_before_optimizer_step(None)
        assert all(isinstance(p.grad, OnDevice) for p in module.parameters())
    # the same step on the CPU gives the same loss
    L.seed_everything(0)
    ref = train.CTCModule(str(prepared / "bpe.model"), **TINY)
    ref.trainer, ref.log = trainer, (lambda *a, **k: None)
    trainer.strategy.optimizers = [torch.optim.SGD(ref.parameters(), lr=0.1)]
    torch.manual_seed(1)
    assert float(ref.training_step(batch, 0)) == pytest.approx(device_loss, abs=1e-5)
