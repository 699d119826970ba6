"""Rows of text -> sentence vectors: tokenize, length-sorted token-budget batches, run, restore order.

Shared by the single-process job and the Ray workers, so both give the same vectors.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Protocol

import numpy as np
import pyarrow as pa

from embedder.config import ChunkOptions, TextSource
from embedder.errors import UnsupportedModelError, UsageError
from embedder.infer.batching import pad_batch, plan_batches
from embedder.infer.chunking import Chunker, Chunks, first_of_groups
from embedder.infer.keys import text_keys
from embedder.infer.session import Encoder, create_encoder
from embedder.infer.texts import window_texts
from embedder.infer.tokenize import TextTokenizer, TokenizedWindow, resolve_prompt
from embedder.infer.vectors import FIRST_WINDOW, VectorFormat
from embedder.manifest import Artifact
from embedder.metrics import Metrics
from embedder.schema import (
    CHUNK_COLUMN,
    CHUNK_END_COLUMN,
    CHUNK_START_COLUMN,
    CHUNKS_COLUMN,
    EMBEDDING_COLUMN,
    TEXT_KEY_COLUMN,
    TOKENS_COLUMN,
    TRUNCATED_COLUMN,
    embedding_array,
    key_array,
    token_count_arrays,
)


@dataclass(frozen=True)
class BatchingOptions:
    """How rows are grouped for inference; equal options give bit-identical vectors on CPU."""

    max_tokens: int | None = None  # None: the device kind's default_max_tokens (infer/devices.py)
    max_batch_size: int = 256
    dedup: bool = True  # rows (or chunks) with the same token ids in a window are embedded once


@dataclass(frozen=True)
class PreparedWindow:
    """A window's carried columns, which rows have text, and their token ids."""

    carried: pa.Table
    valid: np.ndarray
    tokens: TokenizedWindow  # one entry per text, or with --chunk per chunk
    chunks: Chunks | None = None
    keys: np.ndarray | None = None  # (n, 16) uint8 per text (or chunk): infer/keys.py


class Reuse(Protocol):
    """Vectors a previous output already holds (io/previous.py)."""

    def find(self, keys: np.ndarray) -> np.ndarray: ...  # the row holding each key, or -1

    def vectors(self, rows: np.ndarray) -> np.ndarray: ...  # those rows' stored vectors


class WindowEmbedder:
    """Embeds a table's text column(s) in place of the columns, rows in the table's order.

    Every front door (jobs.embed, the Ray actors, embedder.api) makes its output here: texts from the column or
    template, token counts, and vectors truncated, renormalized and quantized by vector_format. An int8/uint8
    format without ranges takes them from the first window this embedder runs (vector_format then holds them).
    """

    def __init__(self, artifact: Artifact, device: str = "auto", threads: int | None = None,
                 max_seq_len: int | None = None, prompt: str | None = None,
                 batching: BatchingOptions = BatchingOptions(), tokenizer: TextTokenizer | None = None,
                 vector_format: VectorFormat | None = None, token_counts: bool = False,
                 chunking: ChunkOptions | None = None, text_key: bool = False, reuse: Reuse | None = None):
        # tokenizer: one already made by make_tokenizer for these max_seq_len and prompt (the run loop's).
        self.tokenizer = tokenizer or make_tokenizer(artifact, max_seq_len, prompt)
        self.chunking = chunking
        self.chunker = make_chunker(artifact, self.tokenizer, chunking) if chunking is not None else None
        self.encoder: Encoder = create_encoder(artifact.graphs, device, threads, artifact.precision)
        self.vector_format = vector_format or VectorFormat(self.encoder.dim)
        self.token_counts = token_counts
        self.text_key = text_key  # add the text_key column
        self.reuse = reuse
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
        carried = window.drop_columns(list(text.columns))
        with metrics.stage("tokenize"):
            valid, texts = window_texts(window, text)
            prompt = self.tokenizer.prompt
            want_keys = self.text_key or self.reuse is not None
            if self.chunker is None:
                keys = text_keys(prompt + t for t in texts) if want_keys else None
                return PreparedWindow(carried, valid, self.tokenizer.encode(texts), keys=keys)
            chunks = self.chunker.chunk(texts)
            keys = None
            if want_keys and self.chunking.pooling is None:  # a chunk's key is that of the text it is alone
                owners = np.repeat(np.arange(len(texts)), chunks.counts)
                keys = text_keys(prompt + texts[i][s:e] for i, s, e in zip(owners, chunks.starts, chunks.ends))
            elif want_keys:
                keys = text_keys(prompt + t for t in texts)
        return PreparedWindow(carried, valid, chunks.tokens, chunks, keys)

    def run(self, prepared: PreparedWindow, metrics: Metrics, stop=None) -> pa.Table:
        """Infer a tokenized window; vectors, stored as vector_format says, go back to the rows' order (with
        --chunk, one row per chunk in chunk order, or one pooled row per text). With reuse, rows (or chunks, or
        pooled texts) whose key the previous output holds take its vector instead."""
        carried, valid, tokens, chunks, keys = (prepared.carried, prepared.valid, prepared.tokens, prepared.chunks,
                                                prepared.keys)
        metrics.windows += 1
        metrics.rows += carried.num_rows
        metrics.null_rows += int((~valid).sum())
        metrics.truncated_rows += tokens.truncated
        if chunks is None:
            stored = self._reused_or_embedded(keys, metrics, lambda rows: self.stored_vectors(
                tokens if rows is None else tokens.take(rows), metrics, stop))
            return self._rows_table(carried, valid, tokens.lengths, tokens.cut, stored, keys)
        metrics.chunks += len(chunks.starts)
        metrics.chunked_rows += chunks.chunked_texts
        metrics.cut_in_word += chunks.cut_in_word
        if self.chunking.pooling is None:
            stored = self._reused_or_embedded(keys, metrics, lambda rows: self.stored(self.vectors(
                tokens if rows is None else tokens.take(rows), metrics, stop)))
            return self._chunks_table(carried, valid, chunks, stored, keys)

        def pooled(texts: np.ndarray | None) -> np.ndarray:  # the pooled vectors of these texts (None: all)
            counts = chunks.counts if texts is None else chunks.counts[texts]
            picked = tokens
            if texts is not None:
                mine = np.zeros(len(chunks.counts), dtype=bool)
                mine[texts] = True
                picked = tokens.take(np.flatnonzero(np.repeat(mine, chunks.counts)))
            return self.stored(pool_chunks(self.vectors(picked, metrics, stop), first_of_groups(counts),
                                           self.chunking.pooling))

        stored = self._reused_or_embedded(keys, metrics, pooled)
        counts = np.zeros(len(valid), dtype=np.int32)
        counts[valid] = chunks.counts
        carried = carried.append_column(CHUNKS_COLUMN, pa.array(counts, mask=~valid))
        lengths = np.add.reduceat(tokens.lengths, chunks.firsts) if len(chunks.counts) else tokens.lengths
        return self._rows_table(carried, valid, lengths, np.zeros(len(lengths), dtype=bool), stored, keys)

    def _reused_or_embedded(self, keys: np.ndarray | None, metrics: Metrics, embed) -> np.ndarray:
        """Stored vectors, one per key: the previous output's where it holds the key, embed(rows) for the others
        (embed(None): all of them)."""
        if self.reuse is None or keys is None or not len(keys):
            return embed(None)
        found = self.reuse.find(keys)
        hit = found >= 0
        if not hit.any():
            return embed(None)
        stored = np.empty((len(keys), self.vector_format.width), dtype=self.vector_format.numpy_dtype)
        stored[hit] = self.reuse.vectors(found[hit])
        missing = np.flatnonzero(~hit)
        if len(missing):
            stored[missing] = embed(missing)
        metrics.reused_rows += int(hit.sum())
        return stored

    def _rows_table(self, carried: pa.Table, valid: np.ndarray, lengths: np.ndarray, truncated: np.ndarray,
                    stored: np.ndarray, keys: np.ndarray | None = None) -> pa.Table:
        """The carried columns, text keys and token counts if asked, the stored vectors; valid rows have them."""
        if self.text_key:
            carried = carried.append_column(TEXT_KEY_COLUMN, key_array(keys, valid))
        if self.token_counts:
            counts, cut = token_count_arrays(lengths, truncated, valid)
            carried = carried.append_column(TOKENS_COLUMN, counts).append_column(TRUNCATED_COLUMN, cut)
        return carried.append_column(EMBEDDING_COLUMN, embedding_array(stored, valid))

    def _chunks_table(self, carried: pa.Table, valid: np.ndarray, chunks: Chunks, stored: np.ndarray,
                      keys: np.ndarray | None = None) -> pa.Table:
        """One row per chunk (a null text: one row of nulls): the text's carried columns repeated, then chunk,
        chunk_start, chunk_end, token counts if asked, the stored vectors."""
        per_row = np.ones(len(valid), dtype=np.int64)
        per_row[valid] = chunks.counts
        rows = np.repeat(np.arange(len(valid)), per_row)
        has_text = valid[rows]
        number = (np.arange(len(rows)) - np.repeat(first_of_groups(per_row), per_row)).astype(np.int32)

        def spread(values: np.ndarray) -> pa.Array:
            out = np.zeros(len(rows), dtype=values.dtype)
            out[has_text] = values
            return pa.array(out, mask=~has_text)

        table = carried.take(rows)
        table = (table.append_column(CHUNK_COLUMN, pa.array(number, mask=~has_text))
                 .append_column(CHUNK_START_COLUMN, spread(chunks.starts))
                 .append_column(CHUNK_END_COLUMN, spread(chunks.ends)))
        return self._rows_table(table, has_text, chunks.tokens.lengths, chunks.tokens.cut, stored, keys)

    def text_vectors(self, texts: list[str], metrics: Metrics) -> np.ndarray:
        """One stored vector per text, batched as a window's non-null rows are (with --chunk-pooling, pooled from
        its chunks'). Chunks without pooling have no one vector per text: embed() gives a row per chunk."""
        if self.chunker is None:
            return self.stored_vectors(self.tokenizer.encode(texts), metrics)
        if self.chunking.pooling is None:
            raise UsageError("with chunking each text has a vector per chunk: set chunk_pooling (mean, max or "
                             "first) for one vector per text, or call embed() on a table for a row per chunk")
        chunks = self.chunker.chunk(texts)
        return self.stored(pool_chunks(self.vectors(chunks.tokens, metrics), chunks.firsts, self.chunking.pooling))

    def stored_vectors(self, tokens: TokenizedWindow, metrics: Metrics, stop=None) -> np.ndarray:
        """vectors(), then stored()."""
        return self.stored(self.vectors(tokens, metrics, stop))

    def stored(self, vectors: np.ndarray) -> np.ndarray:
        """Float vectors truncated, renormalized and in the output dtype; the first call of an int8/uint8 format
        without ranges calibrates them on these rows."""
        if self.vector_format.needs_ranges:
            self.vector_format = self.vector_format.calibrated(vectors, FIRST_WINDOW)
        return self.vector_format.store(vectors)

    def vectors(self, tokens: TokenizedWindow, metrics: Metrics, stop=None) -> np.ndarray:
        """One vector per tokenized row, in the rows' order, from length-sorted token-budget batches.

        The one batch loop of the jobs and of the Python API: equal batching gives bit-identical vectors on CPU.
        stop, if given, is called after every batch and may raise to abandon the rows. With dedup, rows of equal
        token ids are embedded once and their vector copied.
        """
        if self.batching.dedup and len(tokens.lengths) > 1:
            rows, inverse = tokens.distinct()
            if len(rows) < len(inverse):
                metrics.deduplicated += len(inverse) - len(rows)
                return self._infer(tokens.take(rows), metrics, stop)[inverse]
        return self._infer(tokens, metrics, stop)

    def _infer(self, tokens: TokenizedWindow, metrics: Metrics, stop=None) -> np.ndarray:
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


def pool_chunks(vectors: np.ndarray, firsts: np.ndarray, pooling: str) -> np.ndarray:
    """One vector per text from its chunks' (consecutive, starting at firsts): the L2-normalized mean or
    element-wise max, or the first chunk's vector as it is."""
    if not len(firsts):
        return vectors[:0]
    if pooling == "first":
        return vectors[firsts]
    reduce = np.add if pooling == "mean" else np.maximum
    pooled = reduce.reduceat(vectors, firsts, axis=0)
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    return (pooled / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)


def make_chunker(artifact: Artifact, tokenizer: TextTokenizer, chunking: ChunkOptions) -> Chunker:
    """The chunker for --chunk-tokens (default: the tokens the model takes) and --chunk-overlap."""
    tokens = chunking.tokens or tokenizer.max_seq_length
    if tokens > tokenizer.max_seq_length:
        raise UsageError(f"--chunk-tokens {tokens} exceeds the {tokenizer.max_seq_length} tokens the model takes "
                         "(--max-seq-len or its max_seq_length)")
    return Chunker(artifact.tokenizer_path, tokens, chunking.overlap, tokenizer.prompt)


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
