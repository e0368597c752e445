"""The repository's layout, read from the source with :mod:`ast` (nothing is imported or run).

(a) The import graph is layered: ``common`` -> ``data`` -> ``models`` -> {``training``, ``analysis``,
    the top-level commands}. A package imports only from the layers below it and itself; ``training``
    and ``analysis`` are siblings, except that training may use the analysis *metric modules* listed
    in :data:`TRAINING_MAY_USE` (pure functions of attention maps that training logs while it runs,
    e.g. the CAD of :mod:`analysis.cad` in TensorBoard), not the rest of the analysis.
(b) No library module imports a command module (``train``, ``evaluate``, ``transcribe``, any
    ``__main__``, any ``*/cli.py``): what commands share lives in a library module (e.g.
    :mod:`models.inference`). A package's ``__init__`` may re-export its own ``cli`` (the package is
    the command, e.g. ``python -m analysis.latency``).
(c) Every source module (tests excepted) is under :data:`MAX_MODULE_LINES` lines.
(d) No function or method is over :data:`MAX_FUNCTION_LINES` lines unless its docstring says why,
    in a sentence starting with :data:`LONG_MARKER`.

Imports inside functions count as imports; ``if TYPE_CHECKING:`` blocks do not (annotations only).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: the layers, lowest first; a module may import its own layer and those below
LAYERS = {"common": 0, "data": 1, "models": 2, "training": 3, "analysis": 3, "train": 4, "evaluate": 4, "transcribe": 4}
PACKAGES = ("common", "data", "models", "training", "analysis")
COMMANDS = ("train", "evaluate", "transcribe")
#: analysis modules training may import: metrics it logs during training
TRAINING_MAY_USE = {"analysis.cad"}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80
LONG_MARKER = "Long because"


def source_modules() -> dict[str, Path]:
    """``{dotted name: path}`` of the library packages and the top-level commands."""
    found = {name: ROOT / f"{name}.py" for name in COMMANDS}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


MODULES = source_modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def is_command(name: str) -> bool:
    """train / evaluate / transcribe, any ``__main__``, any ``cli`` module but :mod:`common.cli` (the
    helpers every command uses)."""
    last = name.rsplit(".", 1)[-1]
    return name in COMMANDS or last == "__main__" or (last == "cli" and name != "common.cli")


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(name: str) -> set[str]:
    """The modules of this repository that module ``name`` imports (the longest known prefix of each
    imported name; ``from pkg import mod`` resolves to ``pkg.mod`` where that is a module)."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    skip = {id(n) for block in ast.walk(tree) if _type_checking_only(block) for n in ast.walk(block)}
    package = name if is_package(name) else name.rpartition(".")[0]
    targets = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets += [f"{base}.{a.name}" for a in node.names] + [base]
    found = set()
    for t in targets:
        parts = t.split(".")
        known = next((".".join(parts[:k]) for k in range(len(parts), 0, -1) if ".".join(parts[:k]) in MODULES), None)
        if known is not None and known != name:
            found.add(known)
    return found


def layer(name: str) -> str:
    return name.split(".")[0]


def test_the_tree_is_found():
    """The walk sees every layer and the commands (a test that finds nothing checks nothing)."""
    assert {layer(m) for m in MODULES} == set(LAYERS)
    assert {"models.inference", "common.cli", "analysis.latency.cli", "training.cli"} <= set(MODULES)
    assert "models.inference" in imports("evaluate") and "common.cli" in imports("evaluate")


def test_imports_follow_the_layers():
    bad = []
    for name in MODULES:
        for target in sorted(imports(name)):
            own, other = layer(name), layer(target)
            if LAYERS[other] < LAYERS[own] or own == other:
                continue
            if own == "training" and target in TRAINING_MAY_USE:
                continue
            bad.append(f"{name} imports {target} ({own} may not import {other})")
    assert not bad, (
        "imports against the layers common -> data -> models -> {training, analysis, commands}:\n" + "\n".join(bad)
    )


def test_no_library_module_imports_a_command():
    bad = []
    for name in MODULES:
        if is_command(name):
            continue
        for target in sorted(imports(name)):
            own_cli = is_package(name) and target == f"{name}.cli"
            if is_command(target) and not own_cli:
                bad.append(f"{name} imports the command module {target}")
    assert not bad, (
        "library modules importing command modules (move what they share into a library module):\n" + "\n".join(bad)
    )


def test_modules_are_small():
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    bad = [f"{MODULES[n].relative_to(ROOT)}: {s} lines" for n, s in sorted(sizes.items()) if s >= MAX_MODULE_LINES]
    assert not bad, f"modules of {MAX_MODULE_LINES} lines or more (split them by concept):\n" + "\n".join(bad)


def long_functions(path: Path) -> list[str]:
    """``path:line name (n lines)`` of each function over :data:`MAX_FUNCTION_LINES` lines (decorators
    excluded) whose docstring has no sentence starting with :data:`LONG_MARKER`."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES and LONG_MARKER not in (ast.get_docstring(node) or ""):
                out.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_functions_are_short_or_say_why():
    bad = [f for path in MODULES.values() for f in long_functions(path)]
    assert not bad, (
        f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_MARKER} ...' in their docstring:\n" + "\n".join(bad)
    )


def test_the_checks_can_fail(tmp_path, monkeypatch):
    """Each rule flags a module written to break it."""
    long_body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES + 1))
    f = tmp_path / "long.py"
    f.write_text(
        f"def f():\n    '''Short.'''\n{long_body}\n\ndef g():\n    '''{LONG_MARKER} it must.'''\n{long_body}\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert [s.split(" ")[1] for s in long_functions(f)] == ["f"]
    fake = {
        "data.bad": tmp_path / "bad.py",
        "models.ctc": tmp_path / "ctc.py",
        "evaluate": tmp_path / "evaluate.py",
        "data.uses_cli": tmp_path / "uses_cli.py",
        "common.cli": tmp_path / "cli.py",
    }
    (tmp_path / "bad.py").write_text("def f():\n    from models.ctc import ConformerCTC\n")
    (tmp_path / "uses_cli.py").write_text("import evaluate\nfrom common import cli\n")
    for p in ("ctc.py", "evaluate.py", "cli.py"):
        (tmp_path / p).write_text("")
    monkeypatch.setattr(sys.modules[__name__], "MODULES", fake)
    assert imports("data.bad") == {"models.ctc"}
    assert imports("data.uses_cli") == {"evaluate", "common.cli"}
    with pytest.raises(AssertionError, match="data.bad imports models.ctc"):
        test_imports_follow_the_layers()
    with pytest.raises(AssertionError, match="data.uses_cli imports the command module evaluate"):
        test_no_library_module_imports_a_command()
    (tmp_path / "evaluate.py").write_text("\n" * MAX_MODULE_LINES)
    with pytest.raises(AssertionError, match=f"evaluate.py: {MAX_MODULE_LINES} lines"):
        test_modules_are_small()


def test_readme_layout_names_every_module():
    """README.md's layout table lists exactly the modules of each package folder."""
    import re

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout") : text.index("## Documentation")]
    bad = []
    for package in (*PACKAGES, "analysis/latency"):
        row = next((line for line in table.splitlines() if line.startswith(f"| `{package}/` |")), None)
        if row is None:
            bad.append(f"no row for {package}/")
            continue
        named = set(re.findall(r"`([\w]+\.py)`", row)) - {f"{c}.py" for c in COMMANDS}  # the commands, named in prose
        present = {p.name for p in (ROOT / package).glob("*.py")} - {"__init__.py"}
        bad += [f"{package}/{n} is not in the table" for n in sorted(present - named)]
        bad += [f"{package}/{n} is in the table but not in the tree" for n in sorted(named - present)]
    assert not bad, "README.md's layout table:\n" + "\n".join(bad)
