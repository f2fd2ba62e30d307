"""Imports point down the layers: commands -> bench, explain -> export, engine -> losses, metrics
-> models, data -> ops, cache. A module may import its own package and any lower layer, never a
sibling package of its own layer or a higher one (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "aim_ext"
# Top to bottom; the key is the first name under aim_ext (a subpackage or a module).
LAYERS = [
    {"cli", "__main__"},
    {"bench", "explain"},
    {"export", "engine"},
    {"losses", "metrics"},
    {"models", "data"},
    {"ops", "cache"},
    {"_C"},  # the compiled kernels
]
# `import aim_ext` (the public facade: create_model, losses, ops) sits just above what it imports.
ROOT_LAYER = 3


def layer_of(part: str) -> int:
    for depth, names in enumerate(LAYERS):
        if part in names:
            return depth
    raise AssertionError(f"aim_ext.{part} is in no layer: add it to LAYERS (and to docs/architecture.md)")


def imported_parts(path: Path, root: Path) -> list[tuple[int, str | None]]:
    """(line, first name under aim_ext) of every aim_ext import in the file, function-level ones
    included; None for `import aim_ext` / `from aim_ext import X` of the facade's own names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "aim_ext":
                # `from aim_ext import losses` names a part; `from aim_ext import create_model` the facade.
                found += [
                    (node.lineno, alias.name if any(alias.name in names for names in LAYERS) else None)
                    for alias in node.names
                ]
                continue
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}:{node.lineno}: relative import; write the absolute aim_ext path")
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "aim_ext":
                found.append((node.lineno, parts[1] if len(parts) > 1 else None))
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "__init__.py":
            continue  # the facade re-exports from below
        part = path.relative_to(root).parts[0].removesuffix(".py")
        depth = layer_of(part)
        for line, target in imported_parts(path, root):
            target_depth = ROOT_LAYER if target is None else layer_of(target)
            if target == part:
                continue
            if target_depth <= depth:
                where = "the aim_ext facade" if target is None else f"aim_ext.{target}"
                problems.append(f"{path.relative_to(root.parent)}:{line}: aim_ext.{part} imports {where}")
    return problems


def test_every_import_points_down():
    assert violations() == []


def test_every_part_of_the_package_has_a_layer():
    for path in PACKAGE.iterdir():
        if path.name.startswith(".") or path.name == "__pycache__" or path.suffix in (".json", ".so"):
            continue
        if path.is_dir() or path.suffix == ".py":
            if path.name != "__init__.py":
                layer_of(path.name.removesuffix(".py"))


@pytest.mark.parametrize(
    ("where", "source", "expected"),
    [
        ("models/bad.py", "from aim_ext.engine.checkpoint import load_checkpoint\n", "aim_ext.engine"),
        ("engine/bad.py", "def f():\n    from aim_ext.explain import metrics\n", "aim_ext.explain"),
        ("explain/bad.py", "import aim_ext.bench.report\n", "aim_ext.bench"),
        ("models/bad.py", "from aim_ext.data import build_dataset\n", "aim_ext.data"),
        ("ops/bad.py", "import aim_ext\n", "the aim_ext facade"),
    ],
)
def test_an_upward_or_sideways_import_is_caught(tmp_path, where, source, expected):
    root = tmp_path / "aim_ext"
    (root / Path(where).parent).mkdir(parents=True)
    (root / where).write_text(source)
    for name in ("engine", "explain", "bench", "data", "models", "ops"):
        (root / name).mkdir(exist_ok=True)
    found = violations(root)
    assert len(found) == 1 and found[0].endswith(expected), found
