"""The shape of the package, held where it can drift: layers (import-linter's contract in
pyproject.toml), a config that imports nothing of the project, functions short enough to read,
public names that stay what they are."""

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "alignvl_scale"


def _functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def test_the_layer_contract_holds():
    """No import runs up a layer, and no package's modules import each other in a circle."""
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(lint).exists():
        pytest.skip("import-linter is not installed (the [dev] extra)")
    proc = subprocess.run([lint], cwd=PACKAGE.parent, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "0 broken" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_config_imports_nothing_of_the_project():
    tree = ast.parse((PACKAGE / "config.py").read_text())
    own = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom | ast.Import)
           and any(name.startswith("alignvl_scale") for name in
                   ([node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]))]
    assert not own, [ast.unparse(node) for node in own]


def test_no_function_is_longer_than_a_screen_and_the_trainer_reads_in_one_sitting():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in _functions(ast.parse(path.read_text())):
            if node.end_lineno - node.lineno + 1 > 60:
                long.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not long, long
    trainer = next(node for node in ast.parse((PACKAGE / "training" / "trainer.py").read_text()).body
                   if isinstance(node, ast.ClassDef) and node.name == "Trainer")
    assert trainer.end_lineno - trainer.lineno + 1 <= 220


def test_the_public_names_stay_callable_after_their_modules_are_imported():
    """`alignvl_scale.sigmoid_loss` was the function until a module imported the submodule of
    the same name, then the module (`'module' object is not callable`)."""
    import alignvl_scale

    for module in ("alignvl_scale.losses.sigmoid", "alignvl_scale.losses.infonce", "alignvl_scale.export.exporter",
                   "alignvl_scale.evaluation.metrics"):
        importlib.import_module(module)
    for name in alignvl_scale.__all__:
        assert callable(getattr(alignvl_scale, name)), name


def test_the_objectives_config_names_are_the_registered_ones():
    import typing

    from alignvl_scale.config import Objective
    from alignvl_scale.losses.registry import OBJECTIVES

    assert tuple(OBJECTIVES) == typing.get_args(Objective)
