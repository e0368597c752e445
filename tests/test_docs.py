"""The documentation's links and its command table against the code.

Every relative link (and image) in README.md, CHANGELOG.md, docs/*.md and recipes/*/RESULTS.md must
name an existing file, and a ``#fragment`` a heading of the target (GitHub's anchor rule: lower case,
punctuation dropped, spaces as hyphens, ``-1``, ``-2`` ... for repeated headings). The README's
command table must list every entry point found in the code: each top-level script and module with a
``__main__`` guard, each package with a ``__main__.py``, and every subcommand of ``python -m analysis``.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SKIPPED_DIRS = {"tests", "exp", "build", "docs", "recipes"}
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.DOTALL | re.MULTILINE)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def doc_files() -> list[Path]:
    files = [
        ROOT / "README.md",
        ROOT / "CHANGELOG.md",
        *sorted((ROOT / "docs").glob("*.md")),
        *sorted((ROOT / "recipes").glob("*/RESULTS.md")),
    ]
    return [f for f in files if f.exists()]


def prose(text: str) -> str:
    """``text`` without fenced code blocks and inline code (links there are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stays
    text = text.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> list[str]:
    return [
        t for t in LINK.findall(prose(path.read_text(encoding="utf-8"))) if not re.match(r"[a-z][a-z0-9+.-]*:", t)
    ]  # http:, https:, mailto: ...


def test_slug_follows_github():
    assert slug("Which layers could share a map? (`suggest-reuse`)") == "which-layers-could-share-a-map-suggest-reuse"
    assert slug("WER (%), with a word n-gram LM (openslr 11)") == "wer--with-a-word-n-gram-lm-openslr-11"
    assert slug("train.py") == "trainpy"
    assert slug("The demo's helper") == "the-demos-helper"


def test_link_check_finds_a_broken_link(tmp_path):
    """The check itself can fail: a missing file and a missing heading are both caught."""
    (tmp_path / "a.md").write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](b.md) `[code](c.md)`\n")
    assert broken(tmp_path / "a.md") == ["#nope: no such heading", "b.md: no such file"]


def broken(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file, _, fragment = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{target}: no such file")
        elif fragment and dest.suffix == ".md" and fragment not in anchors(dest):
            problems.append(f"{target}: no such heading")
    return problems


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    assert broken(path) == [], f"{path.relative_to(ROOT)}: broken links"


def test_docs_pages_start_with_contents_and_are_linked_from_readme():
    readme_links = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert page.resolve() in readme_links, f"README.md does not link {page.name}"
        body = page.read_text(encoding="utf-8").split("\n## ", 1)[0]
        contents = re.search(r"^- \[.+\]\(#", body, re.MULTILINE)
        assert contents, f"{page.name} has no contents list before its sections"


def entry_points() -> set[str]:
    """``train.py``-style scripts and ``pkg.module`` names with a ``__main__`` guard or ``__main__.py``."""
    found = set()
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIPPED_DIRS or any(p.startswith(".") for p in rel.parts):
            continue
        text = path.read_text(encoding="utf-8")
        if path.name == "__main__.py":
            found.add(".".join(rel.parts[:-1]))
        elif re.search(r"^if __name__ == [\"']__main__[\"']", text, re.MULTILINE):
            found.add(path.name if len(rel.parts) == 1 else ".".join(rel.with_suffix("").parts))
    return found


def analysis_subcommands() -> set[str]:
    """The subcommands ``python -m analysis`` accepts: its parser's choices and the names it dispatches
    before parsing."""
    from analysis.__main__ import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    choices = re.search(r"\{([\w,-]+)\}", out.getvalue())
    assert choices, "python -m analysis --help lists no subcommands"
    source = (ROOT / "analysis" / "__main__.py").read_text(encoding="utf-8")
    return set(choices.group(1).split(",")) | set(re.findall(r"argv\[0\]\s*==\s*[\"']([\w-]+)[\"']", source))


def command_table() -> list[str]:
    """The first cell of every row of the README's "Every command" table, without backticks."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Every command\n(.*?)(?=^## )", text, re.DOTALL | re.MULTILINE)
    assert section, 'README.md has no "## Every command" section'
    rows = [line for line in section.group(1).splitlines() if line.startswith("| `")]
    return [re.split(r"(?<!\\)\|", row)[1].strip().strip("`").replace("\\|", "|") for row in rows]


def test_readme_lists_every_command():
    listed_modules, listed_scripts, listed_sub = set(), set(), set()
    for cmd in command_table():
        words = cmd.split()
        assert words[0] == "python", f"command table: {cmd!r} does not start with python"
        if words[1] == "-m":
            listed_modules.add(words[2])
            if words[2] == "analysis":
                listed_sub.add(words[3])
        else:
            listed_scripts.add(words[1])
    missing = {e for e in entry_points() if e not in listed_modules | listed_scripts}
    assert not missing, f"README.md's command table lacks {sorted(missing)}"
    missing_sub = analysis_subcommands() - listed_sub
    assert not missing_sub, f"README.md's command table lacks python -m analysis {sorted(missing_sub)}"
    stale = (listed_modules | listed_scripts) - entry_points()
    assert not stale, f"README.md's command table names {sorted(stale)}, which the code does not run"
