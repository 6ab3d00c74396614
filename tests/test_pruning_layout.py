"""The shape of `hf_compress.pruning` that issue #14 asked for, kept: no private cross-imports, leaf configs, one
logging style."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hf_compress"
PRUNING_MODULES = sorted((PACKAGE / "pruning").glob("*.py"))


def _imports(path: Path) -> list[ast.ImportFrom]:
    return [node for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ImportFrom)]


def _is_pruning_module(path: Path, node: ast.ImportFrom) -> bool:
    """Whether `node` (in the module at `path`) imports from `hf_compress.pruning` or one of its modules."""
    if node.level == 0:
        return (node.module or "").startswith("hf_compress.pruning")
    package = path.parent
    for _ in range(node.level - 1):
        package = package.parent
    target = package.joinpath(*(node.module or "").split(".")) if node.module else package
    return (PACKAGE / "pruning") in (target, *target.parents)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_private_names_cross_into_or_out_of_pruning(path):
    in_pruning = (PACKAGE / "pruning") in path.parents
    for node in _imports(path):
        if node.level == 0 and not (node.module or "").startswith("hf_compress"):
            continue  # third-party: not ours to judge
        if not (in_pruning or _is_pruning_module(path, node)):
            continue
        private = [alias.name for alias in node.names if alias.name.startswith("_")]
        assert not private, f"{path.relative_to(PACKAGE)}:{node.lineno} imports private {private} from {node.module}"


def test_the_config_imports_constants_only():
    relative = [node.module for node in _imports(PACKAGE / "pruning" / "config.py") if node.level > 0]
    assert relative == ["constants"]


@pytest.mark.parametrize("path", PRUNING_MODULES, ids=lambda p: p.name)
def test_one_logging_style_and_no_print(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            assert all(alias.name != "logging" for alias in node.names), f"{path.name}: use transformers.utils.logging"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            assert node.func.id != "print", f"{path.name}:{node.lineno} prints; log with transformers.utils.logging"
