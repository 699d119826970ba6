"""The public Python surface: Embedder (texts and tables in memory) and embed_parquet (the job as a function).

Both run the job's own pieces (get_or_export, WindowEmbedder, JobConfig and run), so a vector from here equals
the one `python -m jobs.embed` writes for the same text and options (bit-identical on the CPU).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa

from embedder.build.cache import get_or_export
from embedder.config import ExportOptions, JobConfig, check_embedding_options, default_cache_dir
from embedder.errors import InputError, UsageError
from embedder.infer.devices import candidates
from embedder.infer.window import BatchingOptions, WindowEmbedder, text_settings
from embedder.io.parquet import is_text_type
from embedder.metrics import Metrics
from embedder.model.spec import Pooling, load_spec
from embedder.run.local import run
from embedder.schema import EMBEDDING_COLUMN, embedding_array

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike


class Embedder:
    """A sentence-embedding model, loaded once, that embeds texts and tables in this process.

    Rows are cut into windows of window_rows rows and each window into length-sorted token-budget batches,
    as the job does, so the vectors equal the job's for the same options (bit-identical on the CPU).

    Args:
        model: local model folder or Hugging Face id in the local HF cache; None: all-MiniLM-L6-v2.
        device: "auto" (CUDA if it really loads, else CPU), "cpu", "cuda" or "cuda:N".
        precision: "fp32", "int8" (CPU only) or "fp16" (CUDA only).
        pooling: override the model's pooling: "mean", "cls+mean", "pooler", ... or a tuple of Pooling.
        max_seq_len: truncate at this many tokens (default and maximum: the model's).
        prompt: prefix for every text, or the name of one of the model's prompts; None: its default prompt.
        max_tokens: padded tokens per batch (None: sized for the device that runs).
        max_batch_size: most rows per batch.
        window_rows: rows sorted by length and embedded together.
        threads: onnxruntime intra-op threads (None: one per core).
        cache_dir: graph cache (None: $EMBEDDER_CACHE, else ~/.cache/embedder).

    Raises:
        EmbedderError: a subclass per cause (UsageError, ModelNotFoundError, ExportError, DeviceError, ...),
            with the exit code the command line would give as exit_code.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: str = "auto", precision: str = "fp32",
                 pooling: str | tuple[Pooling, ...] | None = None, max_seq_len: int | None = None,
                 prompt: str | None = None, max_tokens: int | None = None, max_batch_size: int = 256,
                 window_rows: int = 20000, threads: int | None = None, cache_dir: PathLike | None = None):
        export = ExportOptions(pooling=pooling, precision=precision)
        check_embedding_options(max_seq_len, max_tokens, max_batch_size, window_rows, threads)
        # Refuse a device the precision cannot run on now, not after an export.
        candidates(device, precision)
        spec = load_spec(None if model is None else str(model), export.pooling)
        text_settings(max_seq_len, prompt, spec.max_seq_length, spec.prompts, spec.default_prompt_name,
                      spec.include_prompt)  # a bad max_seq_len or prompt costs no export
        artifact = get_or_export(spec, export, _path(cache_dir) or default_cache_dir())
        self._window_embedder = WindowEmbedder(artifact, device, threads, max_seq_len, prompt,
                                                BatchingOptions(max_tokens, max_batch_size))
        self.model = spec.name
        self.window_rows = window_rows
        logger.info("model %s (dim %d, max_seq_length %d) on %s", self.model, self.dim, self.max_seq_length,
                    self.device)

    @property
    def dim(self) -> int:
        """Length of each vector."""
        return self._window_embedder.encoder.dim

    @property
    def device(self) -> str:
        """The device that runs: "cpu" or "cuda:N"."""
        return self._window_embedder.encoder.device

    @property
    def provider(self) -> str:
        """The onnxruntime execution provider that runs (CPUExecutionProvider, CUDAExecutionProvider)."""
        return self._window_embedder.encoder.provider

    @property
    def max_seq_length(self) -> int:
        """Tokens kept per text (prompt and special tokens included); longer texts are truncated."""
        return self._window_embedder.tokenizer.max_seq_length

    def __repr__(self) -> str:
        return f"Embedder({self.model!r}, dim={self.dim}, device={self.device!r})"

    def encode(self, texts: Iterable[str]) -> np.ndarray:
        """Normalized sentence vectors of texts, in their order.

        Args:
            texts: a list, tuple, numpy array or any iterable of str, or a pyarrow string array without nulls.

        Returns:
            float32 array of shape (number of texts, dim).

        Raises:
            TypeError: texts is a single string, or an element is not a str (the message names its index).
        """
        texts = _text_list(texts)
        vectors = np.empty((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), self.window_rows):
            window = texts[start : start + self.window_rows]
            vectors[start : start + len(window)] = self._embed_window(window)
        return vectors

    def embed(self, table, text_col: str = "text"):
        """The table with an `embedding` column appended: rows, their order and every other column kept.

        Args:
            table: a pyarrow.Table or a polars.DataFrame.
            text_col: the column holding the text: string, large_string, string_view, binary holding UTF-8,
                or dictionary-encoded (polars: String or Categorical); nulls allowed.

        Returns:
            The same type as table. `embedding` is fixed_size_list<float32>[dim] (polars: Array(Float32, dim));
            a null text gives a null embedding.

        Raises:
            InputError: text_col is missing or does not hold text.
            UsageError: table already has an `embedding` column.
            TypeError: table is neither a pyarrow.Table nor a polars.DataFrame.
        """
        is_polars = _is_polars_frame(table)
        if not is_polars and not isinstance(table, pa.Table):
            raise TypeError(f"table is {type(table).__name__}; pass a pyarrow.Table or a polars.DataFrame")
        names = list(table.columns) if is_polars else table.column_names
        if text_col not in names:
            raise InputError(f"column '{text_col}' not found; columns are: {', '.join(names)}")
        if EMBEDDING_COLUMN in names:
            raise UsageError(f"table already has a column '{EMBEDDING_COLUMN}'; drop or rename it first")
        # Only the text column crosses to Arrow; a polars frame keeps its own columns as they are.
        text = table.get_column(text_col).to_arrow() if is_polars else table.column(text_col)
        embedding = self._embed_column(text, text_col)
        if is_polars:
            import polars as pl

            return table.with_columns(pl.from_arrow(embedding).alias(EMBEDDING_COLUMN))
        return table.append_column(pa.field(EMBEDDING_COLUMN, embedding.type), embedding)

    def _embed_column(self, text: pa.Array | pa.ChunkedArray, name: str) -> pa.FixedSizeListArray:
        """Vectors of a text column's rows in windows of window_rows rows, nulls included, as the job cuts them."""
        if not is_text_type(text.type):
            raise InputError(f"column '{name}' is {text.type}, not a string or binary (UTF-8) column")
        try:
            text = text.cast(pa.large_string())  # decodes dictionaries and views; checks binary is UTF-8
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise InputError(f"column '{name}' cannot be read as UTF-8 text: {e}") from e
        valid = text.is_valid().to_numpy(zero_copy_only=False)
        vectors = np.empty((int(valid.sum()), self.dim), dtype=np.float32)
        done = 0
        for start in range(0, len(text), self.window_rows):
            window = text.slice(start, self.window_rows).drop_null().to_pylist()
            vectors[done : done + len(window)] = self._embed_window(window)
            done += len(window)
        return embedding_array(vectors, valid)

    def _embed_window(self, texts: list[str]) -> np.ndarray:
        """One window's texts: tokenized together, then batched as the job batches a window's non-null rows."""
        tokens = self._window_embedder.tokenizer.encode(texts)
        return self._window_embedder.vectors(tokens, Metrics())  # the job's counters; a call here reports none


def embed_parquet(inputs: PathLike, output: PathLike, *, model: str | os.PathLike | None = None,
                  text_col: str = "text", keep_cols: str | Iterable[str] | None = None, device: str = "auto",
                  precision: str = "fp32", pooling: str | tuple[Pooling, ...] | None = None,
                  max_seq_len: int | None = None, max_tokens: int | None = None, max_batch_size: int = 256,
                  window_rows: int = 20000, prompt: str | None = None, cache_dir: PathLike | None = None,
                  threads: int | None = None, metrics_out: PathLike | None = None, overwrite: bool = False,
                  progress: str = "off", shard: tuple[int, int] | str = (0, 1), resume: bool = False,
                  restart: bool = False) -> dict:
    """Run the batch job of `python -m jobs.embed` in this process and return its metrics.

    Each keyword is the command line's flag of that name (README, Commands), with the same defaults except
    progress; keep_cols, pooling and shard also take the flags' strings ("id,title", "cls+mean", "0/4").
    The caller keeps what --prometheus-out and --log-level do: the metrics are returned, and the job logs
    through the logging module. SIGINT and SIGTERM stop the job after the batch in flight (raising
    Interrupted, committed windows kept) while it runs in the main thread, as they stop the command.

    Returns:
        The metrics dict that the command prints (README, Metrics).

    Raises:
        EmbedderError: a subclass per failure, never SystemExit; its exit_code is the command's exit code
            (for example InputError, exit_code 2, for a missing input).
    """
    config = JobConfig(
        inputs=str(inputs),
        output=os.fspath(output),
        model=None if model is None else str(model),
        text_col=text_col,
        keep_cols=keep_cols,
        device=device,
        export=ExportOptions(pooling=pooling, precision=precision),
        max_seq_len=max_seq_len,
        max_tokens=max_tokens,
        max_batch_size=max_batch_size,
        window_rows=window_rows,
        prompt=prompt,
        cache_dir=_path(cache_dir),
        threads=threads,
        metrics_out=_path(metrics_out),
        overwrite=overwrite,
        progress=progress,
        shard=shard,
        resume=resume,
        restart=restart,
    )
    return run(config)


def _path(value: PathLike | None) -> Path | None:
    return None if value is None else Path(value).expanduser()


def _text_list(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, (str, bytes)):
        # A str is an iterable of characters: embedding each one is never what was meant.
        raise TypeError(f"texts is a single {type(texts).__name__}; pass a list of str")
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()  # iterating would give pyarrow scalars, not str
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{index}] is {type(text).__name__}, not str")
    return texts


def _is_polars_frame(table) -> bool:
    # polars is imported only by whoever made the frame: if it is not loaded, table cannot be one.
    polars = sys.modules.get("polars")
    return polars is not None and isinstance(table, polars.DataFrame)
