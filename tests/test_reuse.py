"""Reuse plan strings: the paper's Table 2 and every kind of bad string."""

from __future__ import annotations

import pytest

from models import format_reuse_config, parse_reuse_config


@pytest.mark.parametrize(
    "text,heads,reuses",
    [
        ("1(H4)x16", [4] * 16, [False] * 16),
        ("4(H4)x4", [4] * 16, [False, True, True, True] * 4),
        ("4(H4)+4(H4)+4(H4)+4(H4)", [4] * 16, [False, True, True, True] * 4),
        ("4(H8)+4(H8)+4(H8)+4(H8)", [8] * 16, [False, True, True, True] * 4),
        ("4(H8)+4(H8)+4(H4)+4(H4)", [8] * 8 + [4] * 8, [False, True, True, True] * 4),
        ("4(H4)+4(H4)+8(H4)", [4] * 16, [False, True, True, True] * 2 + [False] + [True] * 7),
        ("2(H4)x8", [4] * 16, [False, True] * 8),
        ("8(H4)x2", [4] * 16, ([False] + [True] * 7) * 2),
        ("16(H4)", [4] * 16, [False] + [True] * 15),
        (" 4(H4) x4 ", [4] * 16, [False, True, True, True] * 4),
    ],
)
def test_paper_strings(text, heads, reuses):
    plans = parse_reuse_config(text, 16, d_model=256)
    assert [p.num_heads for p in plans] == heads
    assert [p.reuses for p in plans] == reuses
    for i, p in enumerate(plans):
        assert plans[p.source].group == p.group and not plans[p.source].reuses
        assert p.source <= i and (p.source == i) == (not p.reuses)
    assert [p.group for p in plans] == sorted(p.group for p in plans)


def test_groups_and_canonical_form():
    plans = parse_reuse_config("4(H4)+4(H4)+8(H4)", 16)
    assert [p.group for p in plans] == [0] * 4 + [1] * 4 + [2] * 8
    assert [p.source for p in plans] == [0] * 4 + [4] * 4 + [8] * 8
    assert format_reuse_config(plans) == "4(H4)x2+8(H4)"
    assert format_reuse_config(parse_reuse_config("4(H4)+4(H4)+4(H4)+4(H4)", 16)) == "4(H4)x4"
    for text in ("1(H4)x16", "4(H8)x2+4(H4)x2", "4(H4)x2+8(H4)"):
        assert format_reuse_config(parse_reuse_config(text, 16)) == text


@pytest.mark.parametrize(
    "text,message",
    [
        ("4(H4)x3", r"'4\(H4\)x3' has 12 layers; the encoder has 16"),
        ("4(H4)+4(H4)", r"has 8 layers; the encoder has 16"),
        ("4(H4)++4(H4)x3", r"empty group in reuse configuration"),
        ("+4(H4)x4", r"empty group"),
        ("4(H4)x4+", r"empty group"),
        ("", r"empty reuse configuration"),
        ("   ", r"empty reuse configuration"),
        ("4(H3)x4", r"3 heads in '4\(H3\)x4' of '4\(H3\)x4' do not divide d_model=256"),
        ("4(H4)x2+4(H3)x2", r"3 heads in '4\(H3\)x2' of '4\(H4\)x2\+4\(H3\)x2' do not divide"),
        ("4(H0)x4", r"has no heads"),
        ("0(H4)x16", r"has no layers"),
        ("4(H4)x0", r"repeat count"),
        ("4(H4)x4;", r"cannot parse '4\(H4\)x4;'"),
        ("4[H4]x4", r"cannot parse '4\[H4\]x4'.*expected N\(Hk\)"),
        ("4(h4)x4", r"cannot parse"),
        ("4H4x4", r"cannot parse"),
        ("four(H4)x4", r"cannot parse 'four\(H4\)x4'"),
    ],
)
def test_bad_strings(text, message):
    with pytest.raises(ValueError, match=message):
        parse_reuse_config(text, 16, d_model=256)


def test_non_string():
    with pytest.raises(ValueError, match="empty reuse configuration"):
        parse_reuse_config(None, 16)
