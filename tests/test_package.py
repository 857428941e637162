"""Tests of the package surface: ``__all__``, the explicit imports type checkers see, ``py.typed``, import cost."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import panoviz_callback

_INIT = Path(panoviz_callback.__file__)


def _type_checking_imports(path: Path) -> dict[str, str]:
    """``{name: module}`` imported under ``if TYPE_CHECKING:`` in ``path``."""
    tree = ast.parse(path.read_text())
    found = {}
    for node in tree.body:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for stmt in node.body:
                if isinstance(stmt, ast.ImportFrom):
                    found.update({alias.asname or alias.name: stmt.module for alias in stmt.names})
    return found


def test_every_public_name_is_imported_explicitly_for_type_checkers():
    declared = _type_checking_imports(_INIT)
    public = [name for name in panoviz_callback.__all__ if name != "__version__"]
    assert sorted(declared) == sorted(public)
    assert sorted(dir(panoviz_callback)) == sorted(panoviz_callback.__all__)
    for name, module in declared.items():  # the run-time object is the one the type checker sees
        assert getattr(panoviz_callback, name) is getattr(importlib.import_module(module), name), name


def test_models_lightning_classes_are_visible_too():
    from panoviz_callback import models

    declared = _type_checking_imports(Path(models.__file__))
    assert set(declared) == {"PanoVisionModule", "PanoDataModule"}
    assert models.PanoVisionModule.__name__ == "PanoVisionModule"
    assert set(models.__all__) >= set(declared) | {"PanoVisionStage", "build_resampler"}


def test_py_typed_is_shipped():
    assert (_INIT.parent / "py.typed").is_file()
    assert "py.typed" in (_INIT.parents[1] / "setup.cfg").read_text()


def test_import_is_cheap():
    code = ("import sys, panoviz_callback; heavy = [m for m in ('torch', 'lightning', 'matplotlib') "
            "if m in sys.modules]; assert not heavy, heavy")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
