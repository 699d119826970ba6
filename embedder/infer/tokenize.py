"""Fast tokenizer from the cached tokenizer.json: prompt prefix, explicit truncation, no padding.

A model's tokenizer.json may carry its own padding and truncation (all-MiniLM-L6-v2's pads every
row to 128 and cuts at 128 while the model says 256): both are set here from the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.errors import UsageError


@dataclass
class TokenizedWindow:
    """Token ids of a window's rows, flat, with per-row offsets (no per-row arrays)."""

    ids: np.ndarray  # int64, all rows' tokens back to back
    offsets: np.ndarray  # int64, row i is ids[offsets[i]:offsets[i+1]]
    cut: np.ndarray  # bool per row: the row was cut at max_seq_length

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def truncated(self) -> int:
        """Rows cut at max_seq_length."""
        return int(self.cut.sum())

    def take(self, rows: np.ndarray) -> TokenizedWindow:
        """These rows only, in this order."""
        lengths = self.lengths[rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Each kept token's position in ids: its row's start plus its place in the row.
        within = np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)
        return TokenizedWindow(self.ids[np.repeat(self.offsets[:-1][rows], lengths) + within], offsets,
                               self.cut[rows])

    def distinct(self) -> tuple[np.ndarray, np.ndarray]:
        """(the first row of each distinct token sequence, each row's index among those): rows with equal ids
        get equal vectors, so each sequence need be embedded once."""
        first: dict[bytes, int] = {}
        ids, offsets = self.ids, self.offsets
        inverse = np.fromiter((first.setdefault(ids[offsets[i]:offsets[i + 1]].tobytes(), len(first))
                               for i in range(len(offsets) - 1)), dtype=np.int64, count=len(offsets) - 1)
        _, rows = np.unique(inverse, return_index=True)  # sequences are numbered in order of first appearance
        return rows.astype(np.int64), inverse


class TextTokenizer:
    """Tokenizes text exactly as the exported model expects it."""

    def __init__(self, tokenizer_path: Path, max_seq_length: int, prompt: str = ""):
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_seq_length)
        self.max_seq_length = max_seq_length
        self.prompt = prompt

    def encode(self, texts: list[str]) -> TokenizedWindow:
        """Tokenize a window of non-null texts (prompt prepended, truncated)."""
        if self.prompt:
            texts = [self.prompt + t for t in texts]
        encodings = self._tokenizer.encode_batch_fast(texts)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(encodings))
        offsets = np.zeros(len(encodings) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        ids = np.fromiter(
            (i for e in encodings for i in e.ids), dtype=np.int64, count=int(offsets[-1])
        )
        cut = np.fromiter((bool(e.overflowing) for e in encodings), dtype=bool, count=len(encodings))
        return TokenizedWindow(ids, offsets, cut)


def resolve_prompt(prompt: str | None, prompts: dict[str, str], default_prompt_name: str | None) -> str:
    """A prompt name from the model's config, else the literal prefix; None means the model default."""
    if prompt is None:
        if default_prompt_name:
            if default_prompt_name not in prompts:
                raise UsageError(f"model's default_prompt_name '{default_prompt_name}' is not among its prompts")
            return prompts[default_prompt_name]
        return ""
    return prompts.get(prompt, prompt)
