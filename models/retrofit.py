"""Retrofit: turn a trained baseline into a reuse model that computes exactly the baseline's
zero-shot reuse, ready for a short fine-tuning.

    python -m models.retrofit --ckpt BASE.ckpt --reuse "2(H4)x2" --out NEW.ckpt [--seed 0]
    python train.py fit --config ... --model.reuse "2(H4)x2" --model.init_from BASE.ckpt   # the same, then train

Every weight whose role is unchanged is copied (front end, FFNs, convolution modules, norms, CTC
head, the computing layers' attention). A reuse layer ``l`` of the plan keeps the baseline layer's
values and output projection inside its doubled value path: for head ``h`` the first half of its
``2 d / H`` value dimensions are the baseline head's values and their columns of ``W_O``; the second
half is new. Its ``W_V`` rows are drawn at random (as ``nn.Linear`` initialises them) and its ``W_O``
columns are zero, so the converted model's output is the baseline's zero-shot reuse under the plan
(:meth:`models.ConformerCTC.map_sources`) while the new half still learns: ``W_O``'s new columns get
the gradient ``context_new^T dL/dy``, non-zero because the new values are (zero in both would never
move). Query, key and positional weights of reuse layers are dropped.

The plan must give every layer the baseline's head count (a group's heads are those of its first
layer); a plan that does not is refused, naming the layer. Both paths start from the baseline's
function: this tool keeps its options (:data:`models.config.FUNCTION_OPTIONS`, ``was_gamma`` included), CMVN
statistics and front end, and says so; ``train.py --model.init_from`` refuses a recipe or a data
folder (``cmvn.json``, ``features.json``) that differs from them, naming the difference.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from common.cli import add_ckpt, add_out, user_errors
from models.ctc import ConformerCTC


def check_plan(base: ConformerCTC, reuse: str) -> ConformerCTC:
    """An (untrained) model of ``base``'s size with plan ``reuse``, after checking that the plan
    fits the baseline."""
    if any(p.reuses for p in base.plans):
        raise ValueError(
            f"the checkpoint is a reuse model ({base.reuse}); retrofit starts from a baseline whose every "
            f"layer computes its own maps"
        )
    new = ConformerCTC(base.vocab_size, base.model_config.replace(reuse=reuse))
    for layer, (p, h) in enumerate(zip(new.plans, base.num_heads)):
        if p.num_heads != h:
            raise ValueError(
                f"plan {reuse!r} gives layer {layer} {p.num_heads} heads; the baseline's layer {layer} "
                f"has {h} (a group's heads must be its first layer's)"
            )
    return new


@torch.no_grad()
def retrofit(base: ConformerCTC, reuse: str, seed: int = 0) -> ConformerCTC:
    """The reuse model of plan ``reuse`` made from ``base`` (see the module docstring), in eval mode."""
    new = check_plan(base, reuse)
    state, target, handled = base.state_dict(), new.state_dict(), set()
    g = torch.Generator().manual_seed(seed)
    for layer, plan in enumerate(new.plans):
        if not plan.reuses:
            continue
        prefix = f"encoder.layers.{layer}.self_attn."
        H, d = plan.num_heads, new.d_model
        dk = d // H
        wv, bv = state[prefix + "linear_v.weight"], state[prefix + "linear_v.bias"]  # (d, d), (d,)
        wo = state[prefix + "linear_out.weight"]  # (d, d)
        bound = 1.0 / math.sqrt(d)  # nn.Linear's initialisation for the new value rows
        new_wv = torch.empty(2 * d, d).uniform_(-bound, bound, generator=g).to(wv.dtype)
        new_bv, new_wo = torch.zeros_like(bv).repeat(2), torch.zeros_like(wo).repeat(1, 2)
        for h in range(H):  # head h: its 2 dk value dims = [the baseline head's dk | dk new]
            old, half = slice(h * dk, (h + 1) * dk), slice(2 * h * dk, 2 * h * dk + dk)
            new_wv[half], new_bv[half], new_wo[:, half] = wv[old], bv[old], wo[:, old]
        target[prefix + "linear_v.weight"], target[prefix + "linear_v.bias"] = new_wv, new_bv
        target[prefix + "linear_out.weight"] = new_wo
        handled |= {prefix + "linear_v.weight", prefix + "linear_v.bias", prefix + "linear_out.weight"}
    for key, value in state.items():  # everything else whose role is unchanged; reuse layers' q, k, pos dropped
        if key in target and key not in handled:
            target[key] = value.clone()
    new.load_state_dict(target)
    return new.to(next(base.parameters()).device).eval()


def zero_shot_sources(reuse: str, num_layers: int) -> list[int]:
    """The zero-shot assignment the retrofitted model of ``reuse`` reproduces."""
    from models.reuse import parse_reuse_config

    return [p.source for p in parse_reuse_config(reuse, num_layers)]


def main(argv: list[str] | None = None) -> None:
    from models.checkpoint import load_model, save_model_checkpoint

    p = argparse.ArgumentParser(prog="python -m models.retrofit", description=__doc__.split("\n\n")[0])
    add_ckpt(p, help="baseline checkpoint of train.py (every layer computes its maps)")
    p.add_argument("--reuse", required=True, help="reuse plan, e.g. '2(H4)x2' (head counts as the baseline's)")
    add_out(p, help="the converted checkpoint (loads in evaluate.py, analysis, train.py)")
    p.add_argument("--seed", type=int, default=0, help="seed of the new value rows")
    a = p.parse_args(argv)
    with user_errors():
        base, tokenizer, hp = load_model(a.ckpt)
        new = retrofit(base, a.reuse, a.seed)
        save_model_checkpoint(a.out, new, tokenizer, {**hp, "retrofit_from": hp["checkpoints"][-1]})
    print(
        f"{hp['reuse']} -> {new.reuse}: {sum(p.numel() for p in base.parameters()):,} -> "
        f"{sum(p.numel() for p in new.parameters()):,} parameters; wrote {Path(a.out)} (the baseline's "
        f"was_gamma {new.model_config.was_gamma}, CMVN statistics and front end kept)"
    )


if __name__ == "__main__":
    main()
