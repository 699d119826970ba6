"""What the inference micro-benchmarks share: docstring rows tokenized for the default model, and
batches planned the way the job plans them."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedder import ExportOptions, get_or_export, load_spec  # noqa: E402
from embedder.batching import pad_batch, plan_batches  # noqa: E402
from embedder.config import default_cache_dir  # noqa: E402
from embedder.tokenize import TextTokenizer  # noqa: E402


def default_model_rows(rows: int):
    """(cache entry of the default model, its tokens for `rows` docstring rows made by make_corpus.py)."""
    with tempfile.TemporaryDirectory(prefix="embedder-bench-") as tmp:
        corpus = Path(tmp) / "corpus.parquet"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(corpus),
                        "--rows", str(rows)], check=True, capture_output=True)
        texts = [t for t in pq.read_table(corpus, columns=["text"]).column("text").to_pylist() if t is not None]
    artifact = get_or_export(load_spec(None), ExportOptions(), default_cache_dir())
    return artifact, TextTokenizer(artifact.tokenizer_path, artifact.manifest["max_seq_length"]).encode(texts)


def padded_batches(artifact, tokens, max_tokens: int, max_batch_size: int = 256) -> list:
    """The padded batches the job would feed the graph at this token budget."""
    pad_id = artifact.manifest["pad_token_id"]
    return [pad_batch(tokens.ids, tokens.offsets, rows, pad_id)
            for rows in plan_batches(tokens.lengths, max_tokens, max_batch_size)]
