"""The text every reduced-precision graph is calibrated and gated on, and the comparison it must pass.

Three domains, each split into a calibration sample and a gate (report) sample with no text in both,
so the gate's figures are not those of the rows the quantization was tuned on:

- docstrings: docstrings of standard-library modules, real prose and code of long-tailed length that
  every Python install has, so a build host needs no corpus to export;
- short sentences: the first sentence of each of those docstrings (a query-like length);
- multilingual: sentences in a dozen scripts, alone and mixed with emoji, CJK and control characters.

int8 (embedder.build.quantize) calibrates on `calibration` and reports `gate`; fp16 (embedder.build.half)
tunes nothing and is gated on the docstrings (gate_texts).
"""

from __future__ import annotations

import ast
import functools
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.build.gate_multilingual import SENTENCES
from embedder.errors import ExportError

_GATE_MODULES = ("argparse", "json/__init__.py", "pathlib.py", "collections/__init__.py", "textwrap.py",
                 "email/message.py", "logging/__init__.py", "csv.py", "datetime.py", "functools.py")
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(?:\s|$)", re.DOTALL)
# Emoji, CJK punctuation and control characters a user's rows carry: appended to or spliced into sentences.
_NOISE = ("🙂", "🚀🔥", "👩‍💻", "\t", "\u200b", "…", "！", "\x07", "🇯🇵", "™", "\r\n", "（注）")


@dataclass(frozen=True)
class Domain:
    """One kind of text: the rows to calibrate on and the rows to report, disjoint."""

    name: str
    calibration: tuple[str, ...]
    gate: tuple[str, ...]


@functools.cache
def _docstrings() -> tuple[str, ...]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: dict[str, None] = {}
    for name in _GATE_MODULES:
        path = stdlib / (name if name.endswith(".py") else f"{name}.py")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    texts[doc] = None
    if len(texts) < 32:
        raise ExportError("too few standard-library docstrings found to gate a reduced-precision graph")
    return tuple(texts)


def _short_sentences(docstrings) -> list[str]:
    found: dict[str, None] = {}
    for doc in docstrings:
        match = _FIRST_SENTENCE.match(doc.strip())
        sentence = " ".join(match.group(1).split()) if match else ""
        if 3 <= len(sentence.split()) <= 20:
            found[sentence] = None
    return list(found)


def _multilingual() -> list[tuple[str, ...]]:
    """The sentences, each with its noisy variants in one group: a variant that differs only in what the
    tokenizer drops (a tab, a zero-width space, a bell) must not land on the other side of the split."""
    groups = []
    for i, sentence in enumerate(SENTENCES):
        noise = _NOISE[i % len(_NOISE)]
        other = SENTENCES[(i * 7 + 3) % len(SENTENCES)]
        words = sentence.split()
        spliced = " ".join(words[: len(words) // 2] + [noise] + words[len(words) // 2:]) + " " + other
        groups.append((sentence, f"{sentence} {noise}", spliced))
    return groups


def _split(name: str, groups: list[tuple[str, ...]], calibration: int, gate: int) -> Domain:
    """Alternate groups of rows (in a fixed order) to the two samples: same mix of lengths in each, no text in
    both, and a group's rows together."""
    seen: set[str] = set()
    sides: tuple[list[str], list[str]] = ([], [])
    for i, group in enumerate(groups):
        fresh = [t for t in dict.fromkeys(group) if t not in seen]
        seen.update(fresh)
        sides[i % 2].extend(fresh)
    return Domain(name, tuple(sides[0][:calibration]), tuple(sides[1][:gate]))


def domains(calibration: int = 96, gate: int = 192) -> tuple[Domain, ...]:
    """The three gate domains, each with at most `calibration` and `gate` texts."""
    docs = _docstrings()
    return (_split("docstrings", [(t,) for t in docs], calibration, gate),
            _split("short sentences", [(t,) for t in _short_sentences(docs)], calibration, gate),
            _split("multilingual and emoji", _multilingual(), calibration, gate))


def gate_texts(limit: int = 512) -> list[str]:
    """fp16's gate: docstrings of the standard library (fp16 tunes nothing on them, so it needs no split)."""
    return list(_docstrings()[:limit])


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b."""
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
