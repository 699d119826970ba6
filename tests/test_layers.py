"""The import contract in pyproject.toml holds, and it fails when an import climbs a layer."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from models import REPO_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """lint-imports on the packages under root (root first on the path, so a copy is linted, not the install)."""
    env = {**os.environ, "PYTHONPATH": str(root), "COLUMNS": "300"}  # no wrapped contract names
    return subprocess.run([str(LINT_IMPORTS), "--no-cache", "--config", str(root / "pyproject.toml")], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def tree_copy(tmp_path) -> Path:
    """The packages and pyproject.toml, copied: a test may break an import there."""
    for name in ("embedder", "jobs"):
        shutil.copytree(REPO_ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_layers_hold():
    proc = lint_imports(REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "contract"), [
    # the tokenizer (infer) reaching up into the run loop
    ("embedder/infer/tokenize.py", "import embedder.run.local", "Layers"),
    # the run loop reaching up into the public API that composes it
    ("embedder/run/local.py", "import embedder.api", "Layers"),
    # io and infer are siblings: neither may use the other
    ("embedder/io/parquet.py", "from embedder.infer.batching import plan_batches", "Layers"),
    # the inference path importing torch
    ("embedder/infer/session.py", "import torch", "Inference never reaches torch"),
])
def test_a_forbidden_import_breaks_the_contract(tree_copy, module, line, contract):
    path = tree_copy / module
    path.write_text(path.read_text() + f"\n{line}  # added by the test\n")
    proc = lint_imports(tree_copy)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    broken = [row for row in proc.stdout.splitlines() if row.endswith("BROKEN")]
    assert any(contract in row for row in broken), proc.stdout
    assert module.removesuffix(".py").replace("/", ".") in proc.stdout  # the report names the offender
