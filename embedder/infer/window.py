"""Rows of text -> sentence vectors: tokenize, length-sorted token-budget batches, run, restore order.

Shared by the single-process job and the Ray workers, so both give the same vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from embedder.config import TextSource
from embedder.errors import UnsupportedModelError, UsageError
from embedder.infer.batching import pad_batch, plan_batches
from embedder.infer.session import Encoder, create_encoder
from embedder.infer.texts import window_texts
from embedder.infer.tokenize import TextTokenizer, TokenizedWindow, resolve_prompt
from embedder.infer.vectors import FIRST_WINDOW, VectorFormat
from embedder.manifest import Artifact
from embedder.metrics import Metrics
from embedder.schema import EMBEDDING_COLUMN, TOKENS_COLUMN, TRUNCATED_COLUMN, embedding_array, token_count_arrays


@dataclass(frozen=True)
class BatchingOptions:
    """How rows are grouped for inference; equal options give bit-identical vectors on CPU."""

    max_tokens: int | None = None  # None: the device kind's default_max_tokens (infer/devices.py)
    max_batch_size: int = 256


@dataclass(frozen=True)
class PreparedWindow:
    """A window's carried columns, which rows have text, and their token ids."""

    carried: pa.Table
    valid: np.ndarray
    tokens: TokenizedWindow


class WindowEmbedder:
    """Embeds a table's text column(s) in place of the columns, rows in the table's order.

    Every front door (jobs.embed, the Ray actors, embedder.api) makes its output here: texts from the column or
    template, token counts, and vectors truncated, renormalized and quantized by vector_format. An int8/uint8
    format without ranges takes them from the first window this embedder runs (vector_format then holds them).
    """

    def __init__(self, artifact: Artifact, device: str = "auto", threads: int | None = None,
                 max_seq_len: int | None = None, prompt: str | None = None,
                 batching: BatchingOptions = BatchingOptions(), tokenizer: TextTokenizer | None = None,
                 vector_format: VectorFormat | None = None, token_counts: bool = False):
        # tokenizer: one already made by make_tokenizer for these max_seq_len and prompt (the run loop's).
        self.tokenizer = tokenizer or make_tokenizer(artifact, max_seq_len, prompt)
        self.encoder: Encoder = create_encoder(artifact.graphs, device, threads, artifact.precision)
        self.vector_format = vector_format or VectorFormat(self.encoder.dim)
        self.token_counts = token_counts
        self.pad_id = artifact.manifest.pad_token_id
        if batching.max_tokens is None:
            batching = replace(batching, max_tokens=self.encoder.kind.default_max_tokens)
        self.batching = batching
        if self.encoder.kind.warm_up:
            length = self.tokenizer.max_seq_length
            self.encoder.warm_up(max(1, min(batching.max_batch_size, batching.max_tokens // length)), length)

    def embed(self, window: pa.Table, text: TextSource | str, metrics: Metrics, stop=None) -> pa.Table:
        """The window's other columns plus `embedding` (after `tokens` and `truncated` if asked); a null text gives
        a null vector.

        stop, if given, is called after every batch and may raise to abandon the window.
        """
        return self.run(self.prepare(window, text, metrics), metrics, stop)

    def prepare(self, window: pa.Table, text: TextSource | str, metrics: Metrics) -> PreparedWindow:
        """Tokenize a window (safe to run in another thread while the previous window infers)."""
        text = TextSource(text) if isinstance(text, str) else text
        with metrics.stage("tokenize"):
            valid, texts = window_texts(window, text)
            tokens = self.tokenizer.encode(texts)
        return PreparedWindow(window.drop_columns(list(text.columns)), valid, tokens)

    def run(self, prepared: PreparedWindow, metrics: Metrics, stop=None) -> pa.Table:
        """Infer a tokenized window; vectors, stored as vector_format says, go back to the rows' order."""
        carried, valid, tokens = prepared.carried, prepared.valid, prepared.tokens
        vectors = self.stored_vectors(tokens, metrics, stop)
        metrics.windows += 1
        metrics.rows += carried.num_rows
        metrics.null_rows += int((~valid).sum())
        metrics.truncated_rows += tokens.truncated
        if self.token_counts:
            counts, cut = token_count_arrays(tokens.lengths, tokens.cut, valid)
            carried = carried.append_column(TOKENS_COLUMN, counts).append_column(TRUNCATED_COLUMN, cut)
        return carried.append_column(EMBEDDING_COLUMN, embedding_array(vectors, valid))

    def stored_vectors(self, tokens: TokenizedWindow, metrics: Metrics, stop=None) -> np.ndarray:
        """vectors(), then truncated, renormalized and in the output dtype; the first call of an int8/uint8 format
        without ranges calibrates them on these rows."""
        vectors = self.vectors(tokens, metrics, stop)
        if self.vector_format.needs_ranges:
            self.vector_format = self.vector_format.calibrated(vectors, FIRST_WINDOW)
        return self.vector_format.store(vectors)

    def vectors(self, tokens: TokenizedWindow, metrics: Metrics, stop=None) -> np.ndarray:
        """One vector per tokenized row, in the rows' order, from length-sorted token-budget batches.

        The one batch loop of the jobs and of the Python API: equal batching gives bit-identical vectors on CPU.
        stop, if given, is called after every batch and may raise to abandon the rows.
        """
        vectors = np.empty((len(tokens.lengths), self.encoder.dim), dtype=np.float32)
        with metrics.stage("infer"):
            for rows in plan_batches(tokens.lengths, self.batching.max_tokens, self.batching.max_batch_size):
                batch = pad_batch(tokens.ids, tokens.offsets, rows, self.pad_id)
                vectors[batch.rows] = self.encoder(batch.input_ids, batch.attention_mask)
                metrics.batches += 1
                metrics.real_tokens += batch.real_tokens
                metrics.padded_tokens += batch.padded_tokens
                if stop is not None:
                    stop()
        return vectors


def make_tokenizer(artifact: Artifact, max_seq_len: int | None, prompt: str | None) -> TextTokenizer:
    """The tokenizer the graph expects, with the model's limit and prompt applied."""
    manifest = artifact.manifest
    length, text_prompt = text_settings(max_seq_len, prompt, manifest.max_seq_length, manifest.prompts,
                                        manifest.default_prompt_name, manifest.include_prompt)
    return TextTokenizer(artifact.tokenizer_path, length, text_prompt)


def text_settings(max_seq_len: int | None, prompt: str | None, limit: int, prompts: Mapping[str, str],
                  default_prompt_name: str | None, include_prompt: bool) -> tuple[int, str]:
    """(tokens kept per text, the prompt text) for --max-seq-len and --prompt, checked against the model.

    Callers check with the ModelSpec before exporting (a refusal costs no export) and the tokenizer is
    built from the manifest: both record the same pipeline.
    """
    if max_seq_len is not None and max_seq_len > limit:
        raise UsageError(f"--max-seq-len {max_seq_len} exceeds the model's max_seq_length {limit}")
    text_prompt = resolve_prompt(prompt, dict(prompts), default_prompt_name)
    if text_prompt and not include_prompt:
        raise UnsupportedModelError(
            "this model excludes prompt tokens from pooling (include_prompt false), which the exported graph "
            "does not reproduce; run without a prompt"
        )
    return max_seq_len or limit, text_prompt
