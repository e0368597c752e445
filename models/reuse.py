"""Layer-wise attention map reuse plans (Shim, Choi, Sung, ICLR 2022, Section 4, Table 2).

A plan string splits the encoder's layers into consecutive groups::

    1(H4)x16                  16 groups of one layer, 4 heads: the baseline
    4(H8)+4(H8)+4(H4)+4(H4)   four groups of four layers, 8 or 4 heads
    4(H4)+4(H4)+8(H4)         groups may differ in size

``N(Hk)`` is a group of ``N`` layers with ``k`` heads; ``xM`` repeats the preceding term ``M``
times; terms are joined with ``+``. The first layer of a group computes its attention maps; the
others reuse them.
"""

from __future__ import annotations

import dataclasses
import re

_TERM = re.compile(r"(\d+)\(H(\d+)\)(?:x(\d+))?")


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """What one encoder layer does with attention."""

    num_heads: int
    reuses: bool  # True: applies the map of layer ``source`` instead of computing its own
    group: int  # index of its group (0-based)
    source: int  # index of the layer that computes the map this layer applies (itself if not reusing)


def parse_reuse_config(text: str, num_layers: int, d_model: int | None = None) -> list[LayerPlan]:
    """Parse a plan string into one :class:`LayerPlan` per layer.

    Raises ``ValueError`` quoting the offending text and what was expected: stray characters,
    an empty or zero-sized group, zero heads, heads that do not divide ``d_model``, or layers that
    do not add up to ``num_layers``.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty reuse configuration {text!r}; expected e.g. '1(H4)x16' or '4(H8)+4(H8)+4(H4)+4(H4)'")
    compact = re.sub(r"\s+", "", text)
    groups: list[tuple[int, int]] = []
    for term in compact.split("+"):
        if not term:
            raise ValueError(f"empty group in reuse configuration {text!r}: '+' must join terms like '4(H4)'")
        m = _TERM.fullmatch(term)
        if m is None:
            raise ValueError(
                f"cannot parse {term!r} in reuse configuration {text!r}; "
                "expected N(Hk) or N(Hk)xM, e.g. '4(H8)' or '1(H4)x16'"
            )
        size, heads, repeat = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
        if size < 1:
            raise ValueError(f"group {term!r} in {text!r} has no layers; N in N(Hk) must be >= 1")
        if heads < 1:
            raise ValueError(f"group {term!r} in {text!r} has no heads; k in N(Hk) must be >= 1")
        if repeat < 1:
            raise ValueError(f"repeat count in {term!r} of {text!r} must be >= 1")
        if d_model is not None and d_model % heads:
            raise ValueError(f"{heads} heads in {term!r} of {text!r} do not divide d_model={d_model}")
        groups += [(size, heads)] * repeat
    total = sum(size for size, _ in groups)
    if total != num_layers:
        raise ValueError(f"reuse configuration {text!r} has {total} layers; the encoder has {num_layers}")
    plans: list[LayerPlan] = []
    for g, (size, heads) in enumerate(groups):
        first = len(plans)
        plans += [LayerPlan(num_heads=heads, reuses=i > 0, group=g, source=first) for i in range(size)]
    return plans


def format_reuse_config(plans: list[LayerPlan]) -> str:
    """The canonical plan string (``N(Hk)`` terms joined by ``+``, runs folded into ``xM``)."""
    groups: list[tuple[int, int]] = []
    for p in plans:
        if not p.reuses:
            groups.append((0, p.num_heads))
        groups[-1] = (groups[-1][0] + 1, groups[-1][1])
    terms: list[tuple[str, int]] = []
    for size, heads in groups:
        term = f"{size}(H{heads})"
        if terms and terms[-1][0] == term:
            terms[-1] = (term, terms[-1][1] + 1)
        else:
            terms.append((term, 1))
    return "+".join(t if n == 1 else f"{t}x{n}" for t, n in terms)
