"""Convert pretrained models into checkpoints of this repository.

    python -m models.convert espnet --config exp/asr_train/config.yaml --model exp/asr_train/valid.acc.ave.pth \\
        [--stats feats_stats.npz] [--bpe bpe.model] --out OUT_DIR

writes ``OUT_DIR/model.ckpt``, which ``evaluate.py --ckpt``, ``python -m analysis report --ckpt``,
``python -m analysis suggest-reuse --ckpt`` and ``models.retrofit`` read as they read ours: the
encoder and CTC head (:mod:`models.espnet`), the tokenizer with ESPnet's ``token_list`` order,
ESPnet's front end (:class:`data.espnet_frontend.EspnetFrontend`) and its ``GlobalMVN`` statistics
are in it. Beside it: ``bpe.model``, ``tokens.txt``, ``cmvn.json`` and ``features.json`` (the
model's inputs, which ``python -m data.prepare --inputs OUT_DIR`` copies into a prepared folder for
fine-tuning), ``model.yaml`` (the model's options for ``train.py fit --config``, with
``init_from``) and ``conversion.json`` (the options taken, what was left aside and why).

Paths in the config (``bpemodel``, ``normalize_conf.stats_file``, a ``token_list`` file) are
resolved as given, then relative to the config's and the model file's folders and their parents
(a model folder unpacked from ESPnet's zoo keeps the recipe's relative paths).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from common.cli import add_out, user_errors
from common.io import atomic_write_text, check_writable
from data.espnet_frontend import EspnetFrontend, global_mvn
from data.features import GlobalCMVN
from data.framing import receptive_field
from data.tokenizer import Tokenizer
from models.checkpoint import save_model_checkpoint
from models.config import ModelConfig
from models.ctc import ConformerCTC
from models.espnet import ConversionError, espnet_to_ours, frontend_options, model_options


def resolve(path: str | Path, *anchors: Path, what: str) -> Path:
    """``path`` as given, else under each anchor folder and its parents (up to 3 levels), else
    under them by its file name alone."""
    p = Path(path)
    tried = [p]
    for anchor in anchors:
        for folder in [anchor, *list(anchor.parents)[:3]]:
            tried.append(folder / p)
    tried += [anchor / p.name for anchor in anchors]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"{what} {path}: not found as given nor beside {', '.join(map(str, anchors))} (give it explicitly)"
    )


def _check_shapes(ours: dict, target: dict, options: ModelConfig) -> None:
    """One message for the first key that does not fit the model the config describes."""
    from models.espnet import ours_to_espnet

    def name(key: str) -> str:  # ESPnet's name of one of our keys
        return next(iter(ours_to_espnet({key: None}, options.num_layers, options.input_layer)))

    size = f"{options.num_layers} blocks, input_layer {options.input_layer}"
    missing = [k for k in target if k not in ours]
    if missing:
        raise ConversionError(
            f"the state dict lacks {name(missing[0])!r}, which the config's encoder ({size}) has "
            f"({len(missing)} keys missing)"
        )
    extra = [k for k in ours if k not in target]
    if extra:
        raise ConversionError(
            f"the state dict holds {name(extra[0])!r}, which the config's encoder ({size}) does not have"
        )
    for k, v in target.items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise ConversionError(
                f"{name(k)}: shape {tuple(ours[k].shape)} in the state dict, {tuple(v.shape)} from the "
                f"config (output_size, attention_heads, linear_units, cnn_module_kernel, n_mels and "
                f"token_list must match the weights)"
            )


def _read_config(config_path: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{config_path}: not a readable ESPnet config ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not an ESPnet config (a mapping of options)")
    return config


def _tokens(config: dict, anchors: tuple[Path, ...], bpe: str | Path | None) -> tuple[list[str], Path]:
    """ESPnet's output order (``token_list``, inline or a file) and the SentencePiece model, checked
    to load together."""
    if config.get("token_type", "bpe") != "bpe":
        raise ConversionError(f"token_type: {config.get('token_type')!r} is not supported (only 'bpe')")
    token_list = config.get("token_list")
    if isinstance(token_list, str):
        token_list = [
            t.strip() for t in resolve(token_list, *anchors, what="token_list").read_text().splitlines() if t.strip()
        ]
    if not isinstance(token_list, list) or not token_list:
        raise ConversionError("token_list: missing from the config")
    if bpe is None:
        if not config.get("bpemodel"):
            raise ConversionError("bpemodel: missing from the config; give --bpe")
        bpe = resolve(config["bpemodel"], *anchors, what="bpemodel")
    Tokenizer(bpe, token_list=token_list)  # refuses a list that does not fit the model, before any long work
    return token_list, Path(bpe)


def _read_state(model_path: Path) -> dict:
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{model_path}: not a readable PyTorch state dict ({type(e).__name__}: {e})") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{model_path}: not a state dict of tensors")
    if "ctc.ctc_lo.weight" not in state:
        raise ConversionError(
            f"{model_path}: no CTC head (ctc.ctc_lo); a model trained with ctc_weight 0 cannot be decoded by CTC"
        )
    return state


def _normalisation(
    config: dict,
    state: dict,
    stats: str | None,
    anchors: tuple[Path, ...],
    model_path: Path,
    input_dim: int,
    notes: list[str],
) -> tuple[GlobalCMVN, str | None]:
    """The model's feature normalisation (``GlobalMVN`` from the stats file, checked against the
    buffers in the state dict, or the buffers alone; or none) and where it came from."""
    normalize = config.get("normalize")
    norm_conf = dict(config.get("normalize_conf") or {})
    if normalize is None:
        notes.append("normalize: null: features are not normalised")
        return GlobalCMVN(dim=input_dim), None
    if normalize != "global_mvn":
        raise ConversionError(f"normalize: {normalize!r} is not supported (global_mvn or null)")
    saved = (state.get("normalize.mean"), state.get("normalize.std"))
    stats_path = stats or norm_conf.get("stats_file")
    if stats_path is not None:
        try:
            stats_path = resolve(stats_path, *anchors, what="stats file")
        except FileNotFoundError:
            if saved[0] is None or stats:
                raise
            stats_path = None
    if stats_path is not None:
        # GlobalMVN keeps the file's mean and std as buffers whatever it normalises: both must match
        raw = global_mvn(stats_path, True, True, norm_conf.get("eps", 1e-20))
        for buffer, value, what, name in (
            (saved[0], raw.mean, "mean", "normalize.mean"),
            (saved[1], raw.std, "standard deviation", "normalize.std"),
        ):
            if buffer is not None and not torch.allclose(buffer.float(), value, rtol=1e-4, atol=1e-5):
                raise ConversionError(
                    f"{stats_path}: its {what} differs from {name} in {model_path} (another model's statistics?)"
                )
        return global_mvn(
            stats_path, norm_conf.get("norm_means", True), norm_conf.get("norm_vars", True), norm_conf.get("eps", 1e-20)
        ), str(stats_path)
    if saved[0] is not None and saved[1] is not None:
        mean = saved[0].float() if norm_conf.get("norm_means", True) else torch.zeros_like(saved[0]).float()
        std = saved[1].float() if norm_conf.get("norm_vars", True) else torch.ones_like(saved[1]).float()
        return GlobalCMVN(mean, std, dim=mean.numel()), f"{model_path} (normalize.mean / std)"
    raise ConversionError("normalize: global_mvn needs its statistics: give --stats feats_stats.npz")


def _write(out: Path, model: ConformerCTC, bpe: Path, token_list: list[str], cmvn: GlobalCMVN, front: dict) -> None:
    """``model.ckpt`` and what goes beside it (see the module docstring), except ``conversion.json``."""
    import yaml

    options = model.model_config
    check_writable(out)
    shutil.copyfile(bpe, out / "bpe.model")
    atomic_write_text(out / "tokens.txt", "".join(t + "\n" for t in token_list))
    cmvn.save(out / "cmvn.json")
    features = {"type": "espnet", "config": front, "min_frames": receptive_field(options.input_layer)}
    atomic_write_text(out / "features.json", json.dumps(features, indent=2))
    hp = {
        "data_dir": str(out.resolve()),
        "cmvn": {"mean": cmvn.mean.clone(), "std": cmvn.std.clone()},
        "features": features,
    }
    save_model_checkpoint(out / "model.ckpt", model.eval(), Tokenizer(out / "bpe.model", token_list=token_list), hp)
    # train.py fit --config recipes/.../retrofit.yaml --config OUT/model.yaml --model.reuse PLAN
    #   --data.data_dir <a folder of data.prepare --inputs OUT>
    #   (the options that fix the model's function; the recipe's own dropout and BatchNorm momentum)
    fit = {
        "model": {
            **options.options("plan"),
            **options.options("function"),
            "init_from": str((out / "model.ckpt").resolve()),
        }
    }
    atomic_write_text(out / "model.yaml", yaml.safe_dump(fit, sort_keys=False))


def convert_espnet(
    config_path: str | Path, model_path: str | Path, out: str | Path, stats: str | None = None, bpe: str | None = None
) -> dict:
    """Converts an ESPnet ASR model (see the module docstring); returns the conversion record."""
    config_path, model_path, out = Path(config_path), Path(model_path), Path(out)
    config = _read_config(config_path)
    anchors = (config_path.parent, model_path.parent)
    options, notes = model_options(config)
    front = frontend_options(config)
    if options.input_dim != front["n_mels"]:
        raise ConversionError(f"frontend_conf: n_mels {front['n_mels']} does not match the encoder input")
    token_list, bpe = _tokens(config, anchors, bpe)
    state = _read_state(model_path)
    ours, ignored = espnet_to_ours(state, options.num_layers, options.input_layer)
    decoder = [k for k in ignored if k.startswith("decoder.")]
    if decoder:
        notes.append(
            f"the attention decoder ({len(decoder)} tensors, decoder: {config.get('decoder')}) is ignored: "
            f"the converted model decodes with its CTC head only"
        )
    model = ConformerCTC(len(token_list), options)
    try:
        _check_shapes(ours, model.state_dict(), options)
    except ConversionError as e:
        raise ConversionError(f"{model_path} does not match {config_path}: {e}") from None
    model.load_state_dict(ours, strict=True)
    frontend = EspnetFrontend(**front)
    if "frontend.logmel.melmat" in state:
        saved = state["frontend.logmel.melmat"].float()
        if saved.shape != frontend.melmat.shape or not torch.allclose(saved, frontend.melmat, atol=1e-6, rtol=1e-4):
            raise ConversionError(
                f"{model_path}: frontend.logmel.melmat differs from the Mel filters of the config's "
                f"frontend_conf ({front})"
            )
    cmvn, source = _normalisation(config, state, stats, anchors, model_path, options.input_dim, notes)
    if cmvn.mean.numel() != options.input_dim:
        raise ConversionError(
            f"normalisation statistics of {cmvn.mean.numel()} features; the model takes {options.input_dim}"
        )
    _write(out, model, bpe, token_list, cmvn, front)
    record = {
        "source": {"config": str(config_path), "model": str(model_path), "bpe": str(bpe), "stats": source},
        "model": options.options(),
        "vocab_size": len(token_list),
        "frontend": front,
        "notes": notes,
        "ignored_keys": len(ignored),
        "checkpoint": str(out / "model.ckpt"),
    }
    atomic_write_text(out / "conversion.json", json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m models.convert", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="source", required=True)
    e = sub.add_parser("espnet", help="an ESPnet (espnet2) Conformer-CTC or hybrid CTC/attention ASR model")
    e.add_argument("--config", required=True, help="the model's config.yaml")
    e.add_argument("--model", required=True, help="its state dict (.pth, e.g. valid.acc.ave.pth)")
    e.add_argument("--stats", help="feats_stats.npz (default: the config's normalize_conf.stats_file)")
    e.add_argument("--bpe", help="the SentencePiece model (default: the config's bpemodel)")
    add_out(e, help="output folder (model.ckpt and what goes beside it)")
    a = p.parse_args(argv)
    with user_errors():
        record = convert_espnet(a.config, a.model, a.out, a.stats, a.bpe)
    m = record["model"]
    print(
        f"converted {a.model}: {m['num_layers']} blocks, d_model {m['d_model']}, {m['reuse']}, ffn {m['ffn_dim']}, "
        f"kernel {m['kernel_size']}, {m['input_layer']}, {record['vocab_size']} outputs"
    )
    for note in record["notes"]:
        print(f"note: {note}")
    print(
        f"wrote {record['checkpoint']} (and bpe.model, tokens.txt, cmvn.json, features.json, model.yaml, "
        f"conversion.json beside it)"
    )


if __name__ == "__main__":
    main()
