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
from embedder.config import (
    ExportOptions,
    JobConfig,
    OutputOptions,
    TextSource,
    check_embedding_options,
    chunk_options,
    default_cache_dir,
)
from embedder.errors import InputError, UsageError
from embedder.infer.devices import candidates
from embedder.infer.window import BatchingOptions, WindowEmbedder, text_settings
from embedder.io.parquet import is_text_type
from embedder.metrics import Metrics
from embedder.model.spec import Pooling, load_spec
from embedder.run.local import run
from embedder.run.loop import checked_vector_format
from embedder.schema import output_schema

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike
_ROW = "__embedder_row"  # embed() with chunks: the input row of each chunk, dropped before returning


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
        truncate_dim: keep the first D dimensions, L2-normalized again (None: the model's config's truncate_dim).
        output_dtype: "float32", "float16", "int8", "uint8", "binary" or "ubinary", as jobs.embed stores them.
        calibration: int8/uint8 ranges from these float vectors: an array (n, dim), or a Parquet file (path or
            URI) with an `embedding` column. None: from the first window this Embedder embeds (then `ranges`).
        with_token_counts: embed() adds `tokens` and `truncated` columns before `embedding`.
        chunk: split texts longer than the model takes into chunks at word starts instead of truncating them:
            embed() gives a row per chunk (with chunk, chunk_start and chunk_end), encode() needs chunk_pooling.
        chunk_tokens: most tokens per chunk, special tokens and prompt included (None: max_seq_len or the model's).
        chunk_overlap: most tokens a chunk repeats from the one before, snapped to a word start.
        chunk_pooling: "mean", "max" or "first": one vector per text from its chunks' (implies chunk).
        dedup: embed identical texts (or chunks) of a window once and copy the vector.

    Raises:
        EmbedderError: a subclass per cause (UsageError, ModelNotFoundError, ExportError, DeviceError, ...),
            with the exit code the command line would give as exit_code.
    """

    def __init__(self, model: str | os.PathLike | None = None, *, device: str = "auto", precision: str = "fp32",
                 pooling: str | tuple[Pooling, ...] | None = None, max_seq_len: int | None = None,
                 prompt: str | None = None, max_tokens: int | None = None, max_batch_size: int = 256,
                 window_rows: int = 20000, threads: int | None = None, cache_dir: PathLike | None = None,
                 truncate_dim: int | None = None, output_dtype: str = "float32",
                 calibration: np.ndarray | PathLike | None = None, with_token_counts: bool = False,
                 chunk: bool = False, chunk_tokens: int | None = None, chunk_overlap: int = 0,
                 chunk_pooling: str | None = None, dedup: bool = True):
        export = ExportOptions(pooling=pooling, precision=precision)
        chunking = chunk_options(chunk, chunk_tokens, chunk_overlap, chunk_pooling)
        from_file = calibration if isinstance(calibration, (str, os.PathLike)) else None
        options = OutputOptions(truncate_dim, output_dtype, None if from_file is None else os.fspath(from_file),
                                with_token_counts, text_key=False)
        if calibration is not None and from_file is None and not options.calibrated:
            raise UsageError(f"calibration sets the ranges of output_dtype int8 or uint8, not {output_dtype}")
        check_embedding_options(max_seq_len, max_tokens, max_batch_size, window_rows, threads)
        # Refuse a device the precision cannot run on now, not after an export.
        candidates(device, precision)
        spec = load_spec(None if model is None else str(model), export.pooling)
        text_settings(max_seq_len, prompt, spec.max_seq_length, spec.prompts, spec.default_prompt_name,
                      spec.include_prompt)  # a bad max_seq_len or prompt costs no export
        vector_format = checked_vector_format(spec, options)  # nor does a bad truncate_dim or calibration file
        if calibration is not None and from_file is None:
            vector_format = vector_format.calibrated(calibration, "the calibration vectors")
        artifact = get_or_export(spec, export, _path(cache_dir) or default_cache_dir())
        self._window_embedder = WindowEmbedder(artifact, device, threads, max_seq_len, prompt,
                                                BatchingOptions(max_tokens, max_batch_size, dedup),
                                                vector_format=vector_format, token_counts=with_token_counts,
                                                chunking=chunking)
        self.model = spec.name
        self.window_rows = window_rows
        logger.info("model %s (dim %d, max_seq_length %d) on %s", self.model, self.dim, self.max_seq_length,
                    self.device)

    @property
    def dim(self) -> int:
        """Dimensions of each vector: the model's, or truncate_dim (binary output packs 8 of them per byte)."""
        return self._window_embedder.vector_format.dim

    @property
    def output_dtype(self) -> str:
        """How vectors are returned: float32, float16, int8, uint8, binary or ubinary."""
        return self._window_embedder.vector_format.dtype

    @property
    def ranges(self) -> np.ndarray | None:
        """int8/uint8: the per-dimension (min, max) the vectors are quantized with, float32 of shape (2, dim); None
        until calibrated (from `calibration`, else the first window embedded), and for the other dtypes."""
        return self._window_embedder.vector_format.ranges

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
        """Normalized sentence vectors of texts, in their order, as output_dtype stores them.

        Args:
            texts: a list, tuple, numpy array or any iterable of str, or a pyarrow string array without nulls.

        Returns:
            An array of shape (number of texts, dim): float32 by default, float16, int8 or uint8; binary and
            ubinary give int8 and uint8 of shape (number of texts, dim / 8 rounded up).

        Raises:
            TypeError: texts is a single string, or an element is not a str (the message names its index).
        """
        texts = _text_list(texts)
        if self._window_embedder.chunker is not None and self._window_embedder.chunking.pooling is None:
            self._window_embedder.text_vectors([], Metrics())  # refuses: a text has a vector per chunk
        vector_format = self._window_embedder.vector_format
        vectors = np.empty((len(texts), vector_format.width), dtype=vector_format.numpy_dtype)
        for start in range(0, len(texts), self.window_rows):
            window = texts[start : start + self.window_rows]
            vectors[start : start + len(window)] = self._embed_window(window)
        return vectors

    def embed(self, table, text_col: str | None = None, *, text_template: str | None = None):
        """The table with an `embedding` column appended (after `tokens` and `truncated` with_token_counts): rows,
        their order and every other column kept. With chunk (and no chunk_pooling) each row is repeated once per
        chunk of its text, followed by `chunk`, `chunk_start` and `chunk_end`; with chunk_pooling a `chunks`
        column comes first.

        Args:
            table: a pyarrow.Table or a polars.DataFrame.
            text_col: the column holding the text (default "text"): string, large_string, string_view, binary
                holding UTF-8, or dictionary-encoded (polars: String or Categorical); nulls allowed.
            text_template: instead of text_col, each row's text made of several such columns with str.format:
                "{title}\\n\\n{body}"; a null field is empty text, a row whose fields are all null has none.

        Returns:
            The same type as table. `embedding` is fixed_size_list<float32>[dim] by default (polars:
            Array(Float32, dim)), or of output_dtype's type; a null text gives a null embedding.

        Raises:
            InputError: a text column is missing or does not hold text.
            UsageError: table already has a column the output adds (`embedding`, `tokens`, `truncated`), or
                both text_col and text_template are given.
            TypeError: table is neither a pyarrow.Table nor a polars.DataFrame.
        """
        is_polars = _is_polars_frame(table)
        if not is_polars and not isinstance(table, pa.Table):
            raise TypeError(f"table is {type(table).__name__}; pass a pyarrow.Table or a polars.DataFrame")
        text = TextSource.of(text_col, text_template)
        names = list(table.columns) if is_polars else table.column_names
        missing = [c for c in text.columns if c not in names]
        if missing:
            quoted = ", ".join(f"'{c}'" for c in missing)
            raise InputError(f"column{'s' if len(missing) > 1 else ''} {quoted} not found; columns are: "
                             f"{', '.join(names)}")
        chunking = self._window_embedder.chunking
        per_chunk = chunking is not None and chunking.pooling is None
        added = output_schema(pa.schema([]), self.dim, {}, self.output_dtype, self._window_embedder.token_counts,
                              None if chunking is None else chunking.layout)
        for name in added.names:
            if name in names:
                raise UsageError(f"table already has a column '{name}'; drop or rename it first")
        # Only the text columns cross to Arrow; a polars frame keeps its own columns as they are.
        columns = {name: _text_column(table.get_column(name).to_arrow() if is_polars else table.column(name), name)
                   for name in text.columns}
        if per_chunk:  # which row each chunk comes from, to repeat the caller's rows
            columns[_ROW] = pa.array(np.arange(len(table), dtype=np.int64))
            added = pa.schema([pa.field(_ROW, pa.int64()), *added])
        new = self._embed_rows(pa.table(columns), text, added)
        if per_chunk:
            rows = new.column(_ROW).to_numpy()
            table = table[rows] if is_polars else table.take(rows)
            new = new.drop_columns([_ROW])
        if is_polars:
            import polars as pl

            return table.with_columns(pl.from_arrow(new.column(name)).alias(name) for name in new.column_names)
        for field in new.schema:
            table = table.append_column(field, new.column(field.name))
        return table

    def _embed_rows(self, texts: pa.Table, text: TextSource, added: pa.Schema) -> pa.Table:
        """The added columns for every row, windows of window_rows rows (nulls included) cut as the job cuts them."""
        parts = [self._window_embedder.embed(texts.slice(start, self.window_rows), text, Metrics())
                 for start in range(0, texts.num_rows, self.window_rows)]
        return pa.concat_tables(parts) if parts else added.empty_table()

    def _embed_window(self, texts: list[str]) -> np.ndarray:
        """One window's texts: tokenized together, then batched as the job batches a window's non-null rows."""
        return self._window_embedder.text_vectors(texts, Metrics())  # the job's counters; a call here reports none


def embed_parquet(inputs: PathLike, output: PathLike, *, model: str | os.PathLike | None = None,
                  text_col: str | None = None, keep_cols: str | Iterable[str] | None = None, device: str = "auto",
                  precision: str = "fp32", pooling: str | tuple[Pooling, ...] | None = None,
                  max_seq_len: int | None = None, max_tokens: int | None = None, max_batch_size: int = 256,
                  window_rows: int = 20000, prompt: str | None = None, cache_dir: PathLike | None = None,
                  threads: int | None = None, metrics_out: PathLike | None = None, overwrite: bool = False,
                  progress: str = "off", shard: tuple[int, int] | str = (0, 1), resume: bool = False,
                  restart: bool = False, text_template: str | None = None, truncate_dim: int | None = None,
                  output_dtype: str = "float32", calibration: PathLike | None = None,
                  with_token_counts: bool = False, chunk: bool = False, chunk_tokens: int | None = None,
                  chunk_overlap: int = 0, chunk_pooling: str | None = None, dedup: bool = True,
                  window_mb: float = 16.0, text_key: bool = True, reuse: PathLike | None = None,
                  reuse_strict: bool = False, id_col: str | None = None) -> dict:
    """Run the batch job of `python -m jobs.embed` in this process and return its metrics.

    Each keyword is the command line's flag of that name (README, Commands), with the same defaults except
    progress; keep_cols, pooling and shard also take the flags' strings ("id,title", "cls+mean", "0/4"), and
    text_col defaults to "text" unless text_template is given. The caller keeps what --prometheus-out and
    --log-level do: the metrics are returned, and the job logs through the logging module. SIGINT and SIGTERM
    stop the job after the batch in flight (raising Interrupted, committed windows kept) while it runs in the
    main thread, as they stop the command.

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
        text_template=text_template,
        output_options=OutputOptions(truncate_dim, output_dtype, None if calibration is None else os.fspath(calibration),
                                     with_token_counts, text_key),
        reuse=None if reuse is None else os.fspath(reuse),
        reuse_strict=reuse_strict,
        id_col=id_col,
        chunking=chunk_options(chunk, chunk_tokens, chunk_overlap, chunk_pooling),
        dedup=dedup,
        window_mb=window_mb,
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


def _text_column(column: pa.Array | pa.ChunkedArray, name: str) -> pa.ChunkedArray | pa.Array:
    """A text column as large_string, as the job's readers give it."""
    if not is_text_type(column.type):
        raise InputError(f"column '{name}' is {column.type}, not a string or binary (UTF-8) column")
    try:
        return column.cast(pa.large_string())  # decodes dictionaries and views; checks binary is UTF-8
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise InputError(f"column '{name}' cannot be read as UTF-8 text: {e}") from e


def _is_polars_frame(table) -> bool:
    # polars is imported only by whoever made the frame: if it is not loaded, table cannot be one.
    polars = sys.modules.get("polars")
    return polars is not None and isinstance(table, polars.DataFrame)
