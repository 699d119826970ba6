"""The text every reduced-precision graph is gated on, and the comparison it must pass.

int8 (embedder.build.quantize) and fp16 (embedder.build.half) graphs are compared with the fp32 graph on the
docstrings of standard-library modules: real prose and code of varied length that every Python
install has, so a build host needs no corpus to export.
"""

from __future__ import annotations

import ast
import sysconfig
from pathlib import Path

import numpy as np

from embedder.errors import ExportError

_GATE_MODULES = ("argparse", "json/__init__.py", "pathlib.py", "collections/__init__.py", "textwrap.py",
                 "email/message.py", "logging/__init__.py", "csv.py", "datetime.py", "functools.py")


def gate_texts(limit: int = 512) -> list[str]:
    """Docstrings of standard-library modules: real text of varied length, on every Python install."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for name in _GATE_MODULES:
        path = stdlib / (name if name.endswith(".py") else f"{name}.py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and doc not in texts:
                    texts.append(doc)
    if len(texts) < 32:
        raise ExportError("too few standard-library docstrings found to gate a reduced-precision graph")
    return texts[:limit]


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
