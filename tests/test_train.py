"""Training and evaluation on a generated mini corpus: loss goes down, exact resumption, WER equals
jiwer's, beam vs greedy, and each bad input's message."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import jiwer
import lightning as L
import pytest
import torch

import evaluate
from data.datamodule import ASRDataModule
from models.checkpoint import checkpoint_paths, load_model
from training.callbacks import default_callbacks
from training.cli import AtomicCheckpointIO
from training.module import CTCModule, lr_lambda

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    reuse="1(H2)+1(H2)",
    d_model=32,
    num_layers=2,
    ffn_dim=64,
    kernel_size=5,
    subsampling_channels=8,
    bn_momentum=0.1,
    dropout=0.1,
    lr=3e-3,
    warmup_steps=5,
    hold_steps=100,
    decay_steps=100,
)


class Recorder(L.Callback):
    def __init__(self):
        self.losses, self.batches = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.batches.append((trainer.current_epoch, tuple(batch["ids"])))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if outputs and not module._skip_this_step:  # a skipped step returns a zero loss
            self.losses.append(float(outputs["loss"]))


class StopAt(L.Callback):
    """Stops training (as a killed job would, but cleanly) once ``step`` optimiser steps are done."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def _fit(
    prepared,
    root,
    max_epochs=None,
    max_steps=-1,
    ckpt_path=None,
    limit=4,
    stop_at=None,
    val_every=None,
    recorder=None,
    train_sets=("mini-train",),
    **model_kw,
):
    L.seed_everything(0, workers=True)
    dm = ASRDataModule(str(prepared), list(train_sets), ["mini-dev"], max_frames=2500, num_workers=0, time_masks=2)
    module = CTCModule(str(prepared / "bpe.model"), **{**TINY, **model_kw})
    rec = recorder or Recorder()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        max_steps=max_steps,
        limit_train_batches=limit,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        num_sanity_val_steps=0,
        callbacks=[rec, *default_callbacks(2), *([StopAt(stop_at)] if stop_at else [])],
        default_root_dir=str(root),
        val_check_interval=val_every,
        use_distributed_sampler=False,
        enable_model_summary=False,
    )
    for cb in trainer.checkpoint_callbacks:
        cb.dirpath = str(root / "checkpoints")
    trainer.strategy.checkpoint_io = AtomicCheckpointIO()
    trainer.fit(module, dm, ckpt_path=ckpt_path)
    return rec.losses, module, trainer


def trained_checkpoint(
    prepared, tmp_path_factory, name: str, max_epochs: int = 1, limit: int | None = 3, **model_kw
) -> Path:
    """``last.ckpt`` of a tiny model trained on the mini corpus (``limit`` batches an epoch), for
    module fixtures; ``train_sets`` (default mini-train) and model options may be given."""
    root = tmp_path_factory.mktemp(name)
    _fit(prepared, root, max_epochs=max_epochs, limit=limit, **model_kw)
    return root / "checkpoints" / "last.ckpt"


def test_training_reduces_loss(prepared, tmp_path):
    losses, _, trainer = _fit(prepared, tmp_path, max_epochs=5, limit=None)
    per_epoch = len(losses) // 5
    assert per_epoch >= 5 and len(losses) == 5 * per_epoch
    first, last = sum(losses[:per_epoch]), sum(losses[-per_epoch:])  # the same utterances, other order
    assert last < 0.85 * first, losses  # measured: about 0.80 after 5 epochs of this tiny model


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """3 epochs of 4 batches, validated (and checkpointed) every 2 batches."""
    rec = Recorder()
    _, module, _ = _fit(prepared, tmp_path_factory.mktemp("full"), max_epochs=3, limit=4, val_every=2, recorder=rec)
    return rec, {k: v.clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("stop_at, resumed_at", [(6, 4), (3, 2)], ids=["epoch-boundary", "inside-epoch"])
def test_resume_reproduces_uninterrupted_run(prepared, tmp_path, uninterrupted, stop_at, resumed_at):
    """Stopped at step 6 (last.ckpt: end of epoch 0, step 4) or step 3 (last.ckpt: step 2 of epoch 0),
    resumed with the last checkpoint: the same batches, per-step losses and final weights."""
    full, full_weights = uninterrupted
    _fit(prepared, tmp_path, max_epochs=3, limit=4, val_every=2, stop_at=stop_at)
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=False)
    saved_step = saved["global_step"]
    assert saved_step in (resumed_at, stop_at)  # last.ckpt: the latest validation or the stop
    rec = Recorder()
    _, module, _ = _fit(prepared, tmp_path, max_epochs=3, limit=4, val_every=2, ckpt_path=str(ckpt), recorder=rec)
    assert rec.batches == full.batches[saved_step:]
    assert rec.losses == pytest.approx(full.losses[saved_step:], abs=1e-5)
    for k, v in module.state_dict().items():
        assert torch.allclose(v.float(), full_weights[k].float(), atol=1e-5), k


def test_sampler_resumes_at_position_and_epoch():
    from data.sampler import FrameBucketSampler

    lengths = [100 + 7 * i for i in range(40)]
    s = FrameBucketSampler(lengths, 500, num_buckets=4, seed=3)
    s.set_epoch(1)
    epoch1 = list(s)
    s.set_epoch(2)
    epoch2 = list(s)
    r = FrameBucketSampler(lengths, 500, num_buckets=4, seed=3)
    r.load_state_dict({"epoch": 1, "position": 3})
    r.set_epoch(0)  # what a trainer announces is overruled by the restored state
    assert len(r) == len(epoch1) and list(r) == epoch1[3:] and r.epoch == 1
    r.load_state_dict({"epoch": 1, "position": len(epoch1)})  # a complete epoch: the next one
    assert list(r) == epoch2
    r.set_epoch(5)
    assert r.epoch == 5


def test_validation_sharding_scores_every_utterance_once():
    from data.sampler import FrameBucketSampler

    lengths = [100 + 13 * i for i in range(23)]
    whole = [i for b in FrameBucketSampler(lengths, 400, shuffle=False) for i in b]
    for world in (2, 3, 8):
        shards = [list(FrameBucketSampler(lengths, 400, shuffle=False, rank=r, world_size=world)) for r in range(world)]
        assert sorted(i for sh in shards for b in sh for i in b) == sorted(whole)
        assert len({len(sh) for sh in shards}) == 1  # as many steps on every rank (short ones padded with [])
        train_shards = [len(FrameBucketSampler(lengths, 400, rank=r, world_size=world)) for r in range(world)]
        assert len(set(train_shards)) == 1  # training: equal batch counts on every rank


def test_lr_schedule_shape():
    f = lambda s: lr_lambda(s, warmup=10, hold=5, decay=10, final_scale=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == f(14) == 1.0
    assert f(20) == pytest.approx(0.55) and f(25) == pytest.approx(0.1) and f(1000) == pytest.approx(0.1)


def test_non_finite_loss_skips_step_without_touching_weights(prepared, tmp_path, monkeypatch):
    real = CTCModule.ctc_loss

    def poisoned(self, batch):
        loss, lp, ol = real(self, batch)
        return (loss * float("nan") if self.training else loss), lp, ol

    monkeypatch.setattr(CTCModule, "ctc_loss", poisoned)
    L.seed_everything(0)
    before = CTCModule(str(prepared / "bpe.model"), **TINY).state_dict()
    _, module, _ = _fit(prepared, tmp_path, max_steps=3, max_epochs=1, limit=3)
    assert module.skipped_steps == 3
    after = module.state_dict()
    for k, v in before.items():
        if torch.is_floating_point(v) and "running" not in k:
            assert torch.equal(v, after[k]), k


def test_non_finite_gradient_is_dropped(prepared):
    module = CTCModule(str(prepared / "bpe.model"), **TINY)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    next(module.parameters()).grad[0] = float("inf")
    module.log = lambda *a, **k: None
    module.on_before_optimizer_step(None)
    assert all(p.grad is None for p in module.parameters()) and module.skipped_steps == 1


def test_weight_noise_is_removed_exactly(prepared):
    """Noise added and removed restores the weights bit for bit (DDP replicas must not drift)."""
    module = CTCModule(str(prepared / "bpe.model"), **{**TINY, "weight_noise": 0.02})
    before = {k: v.clone() for k, v in module.state_dict().items()}
    for _ in range(5):
        module._add_weight_noise()
        assert not torch.equal(module.model.head.weight, before["model.head.weight"])
        module.on_after_backward()
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_gradient_check_reads_the_host_once(prepared):
    """The non-finite gradient check costs one host read per optimiser step, not one per tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class HostReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (
                torch.ops.aten._local_scalar_dense.default,
                torch.ops.aten.is_nonzero.default,
                torch.ops.aten.item.default,
                torch.ops.aten.equal.default,
            ):
                self.count += 1
            return func(*args, **(kwargs or {}))

    module = CTCModule(str(prepared / "bpe.model"), **TINY)
    module.log = lambda *a, **k: None
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    with HostReads() as probe:
        module.on_before_optimizer_step(None)
    assert probe.count == 1 and len(list(module.parameters())) > 20
    assert all(p.grad is not None for p in module.parameters()) and module.skipped_steps == 0


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    _fit(prepared, root, max_epochs=3, limit=3)
    return root / "checkpoints"


def test_evaluate_end_to_end_and_averaging(prepared, trained, tmp_path):
    evaluate.main(
        [
            "--ckpt",
            str(trained / "last.ckpt"),
            "--sets",
            "mini-test",
            "--out",
            str(tmp_path / "e"),
            "--beam-size",
            "4",
            "--lexicon",
            "train",
        ]
    )
    import json

    report = json.loads((tmp_path / "e" / "results.json").read_text())
    lexicon = (tmp_path / "e" / "lexicon.txt").read_text().splitlines()
    assert report["sets"]["mini-test"]["decoder"]["lexicon"].endswith("lexicon.txt")
    assert all(len(l.split()) >= 2 for l in lexicon)
    for dec in ("greedy", "beam"):
        r = report["sets"]["mini-test"][dec]
        assert {"wer", "cer", "substitutions", "deletions", "insertions", "words", "rtf"} <= set(r)
        assert r["words"] == sum(
            len(l.split("\t")[1].split()) for l in (tmp_path / "e" / "mini-test.hyp.tsv").read_text().splitlines()[1:]
        )
    model, _, hp = load_model(trained, average=2)
    assert len(hp["checkpoints"]) == 2
    a, b = (load_model(p)[0].state_dict() for p in hp["checkpoints"])
    k = "head.weight"
    assert torch.allclose(model.state_dict()[k], (a[k] + b[k]) / 2, atol=1e-6)


def test_score_equals_jiwer():
    refs = ["THE CAT SAT ON THE MAT", "A DOG RAN", "HELLO WORLD"]
    hyps = ["THE CAT SAT ON MAT", "A DOG DOG RAN", "HELLO WORD"]
    s = evaluate.score(refs, hyps)
    assert s["wer"] == pytest.approx(100 * jiwer.wer(refs, hyps), abs=1e-3)
    assert s["cer"] == pytest.approx(100 * jiwer.cer(refs, hyps), abs=1e-3)
    assert (s["substitutions"], s["deletions"], s["insertions"], s["words"]) == (1, 1, 1, 11)
    assert s["wer"] == pytest.approx(100 * 3 / 11, abs=1e-3)


def test_beam_and_greedy_agree_on_peaked_output(prepared):
    from data.tokenizer import Tokenizer

    tok = Tokenizer(prepared / "bpe.model")
    target = tok.encode("THE OLD MAN SAW A DOG")
    frames = []
    for t in target:
        frames += [t, t, 0]
    log_probs = torch.full((1, len(frames), tok.vocab_size), -20.0)
    log_probs[0, torch.arange(len(frames)), torch.tensor(frames)] = 0.0
    log_probs = torch.log_softmax(log_probs, -1)
    lengths = torch.tensor([len(frames)])
    g = evaluate.greedy_decode(log_probs, lengths)
    b = evaluate.BeamSearch(tok, beam_size=8)(log_probs, lengths)
    assert g == b == [target]
    assert tok.decode(b[0]) == "THE OLD MAN SAW A DOG"


def test_lexicon_beam_search_picks_a_lexicon_word(prepared, tmp_path):
    from data import sentences
    from data.lexicon import write_lexicon
    from data.tokenizer import Tokenizer
    from models.decoding import BeamSearch, greedy_decode

    tok = Tokenizer(prepared / "bpe.model")
    spell = {w.upper(): tok.encode(w.upper()) for w in sentences.VOCABULARY}
    # two words spelled with the same number of pieces, differing in every piece
    w1, w2 = next(
        (a, b)
        for a in spell
        for b in spell
        if a != b and len(spell[a]) == len(spell[b]) and all(x != y for x, y in zip(spell[a], spell[b]))
    )
    frames = []
    for p1, p2 in zip(spell[w1], spell[w2]):
        frames += [(p2, p1), (p2, p1), (0, 0)]  # the out-of-lexicon word wins every frame, narrowly
    log_probs = torch.full((1, len(frames), tok.vocab_size), -30.0)
    for t, (best, second) in enumerate(frames):
        if best == second == 0:
            log_probs[0, t, 0] = 0.0
        else:
            log_probs[0, t, best], log_probs[0, t, second] = math.log(0.6), math.log(0.4)
    lengths = torch.tensor([len(frames)])
    assert tok.decode(greedy_decode(log_probs, lengths)[0]) == w2
    assert tok.decode(BeamSearch(tok, beam_size=8)(log_probs, lengths)[0]) == w2  # lexicon-free agrees
    assert write_lexicon([w1, w1, ""], tok, tmp_path / "lex.txt") == 1
    assert tok.decode(BeamSearch(tok, beam_size=8, lexicon=tmp_path / "lex.txt")(log_probs, lengths)[0]) == w1


def test_tokenizer_mismatch_refused(prepared, trained, tmp_path):
    from data.tokenizer import Tokenizer

    other = Tokenizer.train(["SOME OTHER TEXT ENTIRELY", "WITH OTHER WORDS"], tmp_path / "other", vocab_size=30)
    with pytest.raises(ValueError, match="is not the one .* was trained with"):
        load_model(trained / "last.ckpt", tokenizer_path=other.path)
    with pytest.raises(SystemExit, match="is not the one"):
        evaluate.main(["--ckpt", str(trained / "last.ckpt"), "--sets", "mini-test", "--tokenizer", other.path])
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="not a checkpoint of train.py"):
        load_model(tmp_path / "foreign.ckpt")
    with pytest.raises(ValueError, match="fewer than --average 9"):
        checkpoint_paths(trained, 9)


def test_resume_with_another_tokenizer_refused(prepared, trained, tmp_path):
    from data.tokenizer import Tokenizer

    other = Tokenizer.train(["SOME OTHER TEXT ENTIRELY", "WITH OTHER WORDS"], tmp_path / "other", vocab_size=30)
    module = CTCModule(other.path, **TINY)
    ckpt = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=False)
    with pytest.raises(ValueError, match="trained with another tokenizer"):
        module.on_load_checkpoint(ckpt)
    CTCModule(str(prepared / "bpe.model"), **TINY).on_load_checkpoint(ckpt)  # the right one loads


def _cli(args, tmp_path):
    return subprocess.run(
        [sys.executable, "train.py", "fit", *args, "--trainer.default_root_dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_recipe_errors_before_training(prepared, tmp_path):
    base = ["--config", "recipes/mini/base.yaml", "--data.data_dir", str(prepared), "--trainer.max_steps", "1"]
    r = _cli(base + ["--model.no_such_key", "1"], tmp_path)
    assert r.returncode != 0 and "no_such_key" in r.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  reuse: 1(H4)x4\n  lerning_rate: 0.1\n")
    r = _cli(base + ["--config", str(bad)], tmp_path)
    assert r.returncode != 0 and "lerning_rate" in r.stderr
    r = _cli(base + ["--model.reuse", "2(H4)x3"], tmp_path)
    assert r.returncode != 0 and "'2(H4)x3' has 6 layers; the encoder has 4" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "checkpoints").exists()


def _cli_run(subcommand, args, cwd):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            subcommand,
            "--config",
            str(ROOT / "recipes/mini/base.yaml"),
            "--trainer.max_time",
            "null",
            "--trainer.enable_progress_bar",
            "false",
            "--data.num_workers",
            "0",
            *args,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _earlier_layout(ckpt: dict, embedded: bool = True) -> dict:
    """``ckpt`` (the current layout, with its ``data`` record) in the layout written before it: the
    tokenizer, ``cmvn`` and ``features`` at the top level, the data folder named by
    ``hyper_parameters.tokenizer_path``, Lightning's ``_instantiator`` among the hyper-parameters;
    ``embedded`` False: as written before tokenizers were embedded (``vocab_size`` and
    ``tokenizer_sha256`` among the hyper-parameters, neither tokenizer nor statistics)."""
    old = {k: v for k, v in ckpt.items() if k != "data"}
    data = ckpt["data"]
    old["hyper_parameters"] = {
        "tokenizer_path": str(Path(data["dir"]) / "bpe.model"),
        **ckpt["hyper_parameters"],
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    if embedded:
        old.update(tokenizer=data["tokenizer"], cmvn=data["cmvn"])
    else:
        old["hyper_parameters"].update(
            vocab_size=data["tokenizer"]["vocab_size"], tokenizer_sha256=data["tokenizer"]["sha256"]
        )
    return old


def test_checkpoints_of_the_earlier_layouts_load(prepared, tmp_path):
    """A checkpoint in the layout train.py and ``save_model_checkpoint`` wrote before the data
    record (built here key by key), and one written before tokenizers were embedded, load with
    their weights, tokenizer, statistics, data folder and hyper-parameters; a training module
    resumes from the first; re-saved, it is the current layout and loads the same."""
    from data.features import GlobalCMVN
    from data.tokenizer import Tokenizer
    from models import ConformerCTC
    from models.checkpoint import model_cmvn, save_model_checkpoint, training_data_dir

    tok = Tokenizer(prepared / "bpe.model")
    torch.manual_seed(0)
    model = ConformerCTC(
        tok.vocab_size,
        reuse="1(H2)+1(H2)",
        d_model=32,
        num_layers=2,
        ffn_dim=64,
        kernel_size=5,
        subsampling_channels=8,
        bn_momentum=0.1,
    )
    cmvn = GlobalCMVN.load(prepared / "cmvn.json")
    hp = {
        "tokenizer_path": str((prepared / "bpe.model").resolve()),
        "reuse": "1(H2)+1(H2)",
        "d_model": 32,
        "num_layers": 2,
        "ffn_dim": 64,
        "kernel_size": 5,
        "dropout": 0.1,
        "attention_dropout": 0.1,
        "was_gamma": None,
        "bn_momentum": 0.1,
        "subsampling_channels": 8,
        "input_dim": 80,
        "lr": 3e-3,
        "weight_decay": 1e-5,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "warmup_steps": 5,
        "hold_steps": 100,
        "decay_steps": 100,
        "final_lr_scale": 0.01,
        "weight_noise": 0.0,
        "weight_noise_start": 0,
        "init_from": None,
        "layer_norm_eps": 1e-5,
        "final_norm": False,
        "input_layer": "conv2d",
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    weights = {f"model.{k}": v for k, v in model.state_dict().items()}
    top_level = {
        "epoch": 0,
        "global_step": 3,
        "pytorch-lightning_version": "2.6.0",
        "state_dict": weights,
        "hyper_parameters": hp,
        "skipped_steps": 0,
        "precision": {"precision": "32-true"},
        "tokenizer": {
            "sha256": tok.digest,
            "vocab_size": tok.vocab_size,
            "model": (prepared / "bpe.model").read_bytes(),
            "name": "bpe.model",
        },
        "cmvn": {"mean": cmvn.mean.clone(), "std": cmvn.std.clone()},
    }
    before_embedding = {
        "epoch": 0,
        "global_step": 3,
        "state_dict": weights,
        "hyper_parameters": {**hp, "vocab_size": tok.vocab_size, "tokenizer_sha256": tok.digest},
    }
    for name, ckpt in (("top-level", top_level), ("before-embedding", before_embedding)):
        torch.save(ckpt, tmp_path / f"{name}.ckpt")
        loaded, loaded_tok, info = load_model(tmp_path / f"{name}.ckpt")
        assert loaded.reuse == model.reuse == "1(H2)x2" and loaded.model_config == model.model_config
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
        assert loaded_tok.digest == tok.digest == info["tokenizer_sha256"] and info["vocab_size"] == tok.vocab_size
        assert training_data_dir(info) == prepared.resolve() and info["lr"] == 3e-3 and info["init_from"] is None
        assert "_instantiator" not in info
        assert torch.equal(model_cmvn(info, prepared).mean, cmvn.mean)  # embedded, or the folder's (older)
    assert info["cmvn"] is None  # before embedding: the folder's cmvn.json
    CTCModule(str(prepared / "bpe.model"), **TINY).on_load_checkpoint(top_level)  # a resumed run accepts it
    _, _, info = load_model(tmp_path / "top-level.ckpt")
    save_model_checkpoint(tmp_path / "resaved.ckpt", model, tok, info)
    resaved = torch.load(tmp_path / "resaved.ckpt", weights_only=True)
    assert resaved["data"]["dir"] == str(prepared.resolve()) and "tokenizer_path" not in resaved["hyper_parameters"]
    again, _, info_again = load_model(tmp_path / "resaved.ckpt")
    assert again.model_config == model.model_config and torch.equal(info_again["cmvn"]["std"], cmvn.std)
    same = lambda d: {k: v for k, v in d.items() if k not in ("checkpoints", "cmvn", "reuse")}  # noqa: E731
    assert same(info_again) == same(info) and info_again["reuse"] == model.reuse  # the plan in its normal form


def test_checkpoint_files_work_after_the_data_folder_moved(prepared, tmp_path, monkeypatch):
    """``--ckpt_path FILE`` for fit / validate (also a checkpoint written before tokenizers were
    embedded), and evaluation and analysis from another folder, once the data folder is gone."""
    import shutil

    from analysis.report import Report

    data_a, data_b, work = tmp_path / "data_a", tmp_path / "moved" / "data_b", tmp_path / "elsewhere"
    shutil.copytree(prepared, data_a)
    _fit(data_a, tmp_path / "run", max_epochs=1, limit=3)
    ckpts = tmp_path / "run" / "checkpoints"
    epoch0 = ckpts / "epoch000.ckpt"
    current = torch.load(epoch0, map_location="cpu", weights_only=False)
    torch.save(_earlier_layout(current), ckpts / "top-level.ckpt")  # as train.py wrote them before
    torch.save(_earlier_layout(current, embedded=False), ckpts / "old-style.ckpt")
    shutil.move(str(data_a), str(data_b))  # the data folder the checkpoints name is gone
    work.mkdir()
    data = ["--data.data_dir", str(data_b), "--trainer.limit_val_batches", "1"]
    for ckpt in (epoch0, ckpts / "top-level.ckpt", ckpts / "old-style.ckpt"):
        r = _cli_run("validate", [*data, "--ckpt_path", str(ckpt)], work)
        assert r.returncode == 0 and "val_wer" in r.stdout, r.stderr[-2000:]
    r = _cli_run(
        "fit",
        [
            *data,
            "--ckpt_path",
            str(epoch0),
            "--trainer.max_epochs",
            "2",
            "--trainer.limit_train_batches",
            "3",
            "--trainer.default_root_dir",
            str(tmp_path / "resumed"),
        ],
        work,
    )
    assert r.returncode == 0 and "Restored all states" in r.stderr + r.stdout, r.stderr[-2000:]
    assert torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6

    monkeypatch.chdir(work)
    test_set = str(data_b / "manifests" / "mini-test.jsonl")
    evaluate.main(["--ckpt", str(epoch0), "--sets", test_set, "--out", "e", "--no-beam"])
    assert json.loads((work / "e" / "results.json").read_text())["sets"]["mini-test"]["greedy"]["utterances"] > 0
    with pytest.raises(SystemExit, match="has the data folder moved"):
        evaluate.main(["--ckpt", str(epoch0), "--sets", "mini-test", "--out", "e2", "--no-beam"])
    results = Report(str(epoch0), test_set, "report", progress=False).run(["cad"])
    assert len(results["cad"]["layer_median"]) == TINY["num_layers"]
    model, tok, hp = load_model(epoch0)
    assert tok.digest == hp["tokenizer_sha256"] and hp["cmvn"] is not None


def test_last_checkpoint_is_the_last_even_when_dev_wer_does_not_improve(prepared, tmp_path):
    """Lightning 2.6 refreshes ``last.ckpt`` only when a top-k checkpoint is saved at the same step:
    with ``save_top_k=1`` on ``val_wer`` it stayed at the best step (a resume with ``--ckpt_path
    last`` then restarted from there, and ``make demo`` evaluated stale weights). With lr 0 the dev
    WER never improves after the first validation; ``last.ckpt`` must still hold the final step."""
    _fit(prepared, tmp_path, max_epochs=3, limit=2, lr=0.0)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 6
    assert len(list((tmp_path / "checkpoints").glob("best-*.ckpt"))) == 1


def test_module_options_are_the_model_configuration_flat():
    """The training module's signature (what jsonargparse turns into ``--model.*``) lists every
    :class:`ModelConfig` field flat beside the training options, and a parse of flat flags builds
    the model those options describe."""
    import dataclasses
    import inspect

    from jsonargparse import ArgumentParser

    from models.config import MODEL_KEYS, ModelConfig

    params = inspect.signature(CTCModule).parameters
    assert all(params[f.name].default == f.default for f in dataclasses.fields(ModelConfig))
    assert {"tokenizer_path", "lr", "warmup_steps", "init_from"} <= set(params) and "model_options" not in params
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(CTCModule, "model")
    cfg = parser.parse_args(
        [
            "--model.tokenizer_path",
            "bpe.model",
            "--model.d_model",
            "96",
            "--model.was_gamma",
            "0.5",
            "--model.reuse",
            "2(H4)x2",
            "--model.num_layers",
            "4",
            "--model.lr",
            "0.1",
        ]
    )
    assert cfg.model.d_model == 96 and cfg.model.was_gamma == 0.5 and cfg.model.lr == 0.1
    assert [k for k in vars(cfg.model) if k in MODEL_KEYS] == list(MODEL_KEYS)
    with pytest.raises(Exception, match="d_model"):
        parser.parse_args(["--model.tokenizer_path", "x", "--model.d_model", "wide"])


def test_module_hyper_parameters_are_the_model_options_and_the_training_options(prepared):
    """The module builds the model of its options and records them (normal-form plan) beside the
    training options; its checkpoint entries name the data folder and embed the tokenizer."""
    from models.checkpoint import CheckpointRecord

    module = CTCModule(str(prepared / "bpe.model"), **{**TINY, "was_gamma": 0.5})
    assert module.model.model_config.was_gamma == 0.5 and module.model.d_model == TINY["d_model"]
    assert dict(module.hparams) == {
        **module.model.model_config.options(),
        **{k: v for k, v in TINY.items() if k in ("lr", "warmup_steps", "hold_steps", "decay_steps")},
        "weight_decay": 1e-5,
        "betas": (0.9, 0.99),
        "eps": 1e-8,
        "final_lr_scale": 0.01,
        "weight_noise": 0.0,
        "weight_noise_start": 0,
        "init_from": None,
    }
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    record = CheckpointRecord.read(checkpoint)
    assert record.data.dir == str(prepared.resolve()) and record.tokenizer().digest == module.tokenizer.digest
    assert record.model == module.model.model_config and record.hparams["lr"] == TINY["lr"]
