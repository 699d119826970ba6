"""The one run loop behind every front door: set up, embed windows, report.

    set_up            refuse what cannot run, check OUT, open the inputs, load the model, get the graph
    embedded_windows  record batches -> windows of window_rows rows -> token ids (the next window is read and
                      tokenized in a thread) -> vectors in row order -> tables in the output schema
    finish            the metrics JSON and the closing log line

A driver supplies only where the windows run and how their parts are collected: run/local.py commits
each window to a work folder and merges them into OUT (resumable); run/ray_driver.py hands blocks to
actors (run/ray_actor.py) that run embedded_windows on them and write part files it renames into OUT.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from embedder import __version__
from embedder.build.cache import get_or_export
from embedder.config import ChunkOptions, JobConfig, OutputOptions, TextSource, default_cache_dir
from embedder.errors import UsageError
from embedder.infer.tokenize import TextTokenizer
from embedder.infer.vectors import FIRST_WINDOW, VectorFormat
from embedder.infer.window import BatchingOptions, WindowEmbedder, make_tokenizer, text_settings
from embedder.io.atomic import write_json_atomic
from embedder.io.calibration import read_calibration
from embedder.io.parquet import InputSet, iter_record_batches, open_inputs
from embedder.io.previous import PreviousOutput
from embedder.io.workfolder import check_output
from embedder.manifest import Artifact
from embedder.metrics import Metrics, summary_line
from embedder.model.spec import ModelSpec, load_spec
from embedder.schema import output_schema

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What every driver starts from: checked inputs, the model and its verified graph, a checked tokenizer."""

    config: JobConfig
    inputs: InputSet
    spec: ModelSpec
    artifact: Artifact
    tokenizer: TextTokenizer  # --max-seq-len and --prompt applied and checked against the model
    vector_format: VectorFormat  # --truncate-dim and --output-dtype checked against the model; --calibration's ranges
    chunking: ChunkOptions | None  # --chunk with its token count resolved (the model's max_seq_length by default)
    previous: PreviousOutput | None = None  # --reuse PREV, opened (whether its vectors can be used: reusable())

    @property
    def chunk_columns(self) -> str | None:
        """Which chunk columns the output has: "rows" (one row per chunk), "pooled" (--chunk-pooling) or None."""
        if self.chunking is None:
            return None
        return self.chunking.layout

    @property
    def window_bytes(self) -> int:
        return int(self.config.window_mb * 1024 * 1024)


def set_up(config: JobConfig, metrics: Metrics, folder_output: bool = False,
           before_model: Callable[[], None] = lambda: None) -> Setup:
    """Fail fast on bad options, output or input, then load the model and get its graph (exported on a miss).

    before_model runs after the cheap checks and before the model is loaded (the Ray driver imports Ray there,
    so a missing extra does not wait for an export).
    """
    check_output(config.output + ("/" if folder_output and not config.output.endswith("/") else ""),
                 config.overwrite)
    keep = list(config.keep_cols) if config.keep_cols is not None else None
    inputs = open_inputs(config.inputs, config.text.columns, keep).shard(*config.shard)
    added = output_schema(pa.schema([]), 1, {}, token_counts=config.output_options.token_counts,
                          chunks=None if config.chunking is None else config.chunking.layout,
                          text_key=config.output_options.text_key).names
    clash = [name for name in added if name in inputs.keep_cols]
    if clash:
        raise UsageError(f"input already has column{'s' if len(clash) > 1 else ''} {', '.join(clash)}, which the "
                         "output adds; leave it out with --keep-cols")
    logger.info("input: %d files, %d row groups, %d rows (shard %d/%d)", len(inputs.files), len(inputs.units),
                inputs.total_rows, *config.shard)
    previous = PreviousOutput(config.reuse) if config.reuse is not None else None  # missing or unreadable: exit 2
    before_model()
    with metrics.stage("model"):
        spec = load_spec(config.model, config.export.pooling)
        text_settings(config.max_seq_len, config.prompt, spec.max_seq_length, spec.prompts, spec.default_prompt_name,
                      spec.include_prompt)  # a bad --max-seq-len or --prompt costs no export
        vector_format = checked_vector_format(spec, config.output_options)  # nor does a bad --truncate-dim
        artifact = get_or_export(spec, config.export, config.cache_dir or default_cache_dir())
        tokenizer = make_tokenizer(artifact, config.max_seq_len, config.prompt)
    chunking = config.chunking
    if chunking is not None:
        chunking = replace(chunking, tokens=chunking.tokens or tokenizer.max_seq_length)
    metrics.cache_hit = artifact.hit
    return Setup(config, inputs, spec, artifact, tokenizer, vector_format, chunking, previous)


def checked_vector_format(spec: ModelSpec, options: OutputOptions) -> VectorFormat:
    """--truncate-dim and --output-dtype checked against the model, with --calibration's ranges if given."""
    vector_format = VectorFormat.for_model(spec, options)
    if options.calibration is not None:
        vector_format = vector_format.calibrated(*read_calibration(options.calibration))
    return vector_format


def file_schema(setup: Setup, graph: Path, vector_format: VectorFormat) -> pa.Schema:
    """The output files' schema: carried columns, token counts if asked, embedding; file_metadata's facts."""
    return output_schema(setup.inputs.keep_schema, vector_format.dim, file_metadata(setup, graph, vector_format),
                         vector_format.dtype, setup.config.output_options.token_counts, setup.chunk_columns,
                         setup.config.output_options.text_key)


def file_metadata(setup: Setup, graph: Path, vector_format: VectorFormat | None = None) -> dict:
    """What the output file records about how its vectors were made; graph is the file that ran."""
    manifest = setup.artifact.manifest
    text = setup.config.text
    return {
        "model": manifest.model,
        "model_hash": manifest.model_hash,
        "pooling": list(manifest.pooling),
        "dense": [dict(layer) for layer in manifest.dense],
        "normalize": manifest.normalize,
        "max_seq_length": setup.tokenizer.max_seq_length,
        "prompt": setup.tokenizer.prompt,
        "precision": manifest.precision,
        "graph_sha256": manifest.files[graph.name],  # the graph that ran: CPU and CUDA have their own
        "embedder_version": __version__,
        "text_column": text.column,
        "text_template": text.template,
        "chunking": None if setup.chunking is None else setup.chunking.metadata(),
        # dim (the stored vectors' dimensions), model_dim, truncate_dim, output_dtype, ranges, calibration
        **(vector_format or setup.vector_format).metadata(),
    }


# What a previous output's vectors depend on besides the text: all of it must be the same to reuse them.
REUSE_KEYS = ("model_hash", "graph_sha256", "pooling", "dense", "normalize", "max_seq_length", "prompt", "precision",
              "chunking", "dim", "model_dim", "truncate_dim", "output_dtype", "ranges")


def reusable(previous: PreviousOutput, metadata: dict, strict: bool) -> PreviousOutput | None:
    """previous if its vectors were made as this run makes them and it has text keys; otherwise one warning and
    None (every row is embedded), or with strict a UsageError (exit 2)."""
    theirs = previous.metadata or {}
    if not previous.has_keys or previous.metadata is None:
        why = "it has no text_key column (written by --no-text-key, an older version, or not by this job)"
    else:
        differs = [key for key in REUSE_KEYS if theirs.get(key) != metadata.get(key)]
        if not differs:
            return previous
        why = "it was made with other " + ", ".join(
            f"{key} ({_short(theirs.get(key))} there, {_short(metadata.get(key))} here)" for key in differs)
    message = f"--reuse {previous.spec}: cannot reuse its vectors: {why}"
    if strict:
        raise UsageError(message)
    logger.warning("%s; embedding every row", message)
    return None


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 40 else text[:37] + "..."


def calibrate_first_window(setup: Setup, vector_format: VectorFormat, metrics: Metrics) -> VectorFormat:
    """int8/uint8 ranges from the first window's vectors, embedded here on the CPU with the job's batching: what
    the local driver calibrates on as it embeds that window (the Ray driver, whose actors embed the blocks
    independently, must know the ranges before it hands any out). The format as it is when it has ranges, or
    when there is no row."""
    config = setup.config
    if not vector_format.needs_ranges or not setup.inputs.total_rows:
        return vector_format
    if "cpu" not in setup.artifact.graphs:
        raise UsageError(f"--output-dtype {vector_format.dtype} calibrates on the first window on the CPU, which "
                         f"cannot run the {setup.artifact.precision} graph; pass --calibration FILE")
    with metrics.stage("model"):
        embedder = WindowEmbedder(setup.artifact, "cpu", config.threads, config.max_seq_len, config.prompt,
                                  batching_options(config), setup.tokenizer, vector_format,
                                  chunking=setup.chunking)
    scratch = Metrics()  # this window is embedded again by the actors: its counters are theirs
    batches = iter_record_batches(setup.inputs, min(config.window_rows, 65536))
    window = next(windows(batches, config.window_rows, scratch, config.text.columns, setup.window_bytes))
    with metrics.stage("infer"):
        embedder.run(embedder.prepare(window, config.text, scratch), scratch)
    logger.info("--output-dtype %s: ranges calibrated on %s", vector_format.dtype, FIRST_WINDOW)
    return embedder.vector_format


def batching_options(config: JobConfig) -> BatchingOptions:
    return BatchingOptions(config.max_tokens, config.max_batch_size, config.dedup)


def embedded_windows(embedder: WindowEmbedder, batches: Iterable[pa.RecordBatch], text: TextSource | str,
                     window_rows: int, schema: pa.Schema | Callable[[], pa.Schema], metrics: Metrics,
                     after_batch: Callable[[], None] | None = None,
                     window_bytes: int | None = None) -> Iterator[tuple[pa.Table, int]]:
    """Each window (window_rows rows, fewer where its text passes window_bytes) embedded, in input order, as
    (a table in the output schema, the input rows it holds): with --chunk the table has a row per chunk.

    schema may be a callable, asked after each window is embedded: the metadata of an int8/uint8 run holds the
    ranges the first window calibrates. after_batch, if given, is called after every batch (signals, test hooks)
    and may raise to stop.
    """
    text = TextSource(text) if isinstance(text, str) else text
    tokenized = (embedder.prepare(window, text, metrics)
                 for window in windows(batches, window_rows, metrics, text.columns, window_bytes))
    for prepared in prefetch(tokenized):
        table = embedder.run(prepared, metrics, after_batch)
        yield table.cast(schema() if callable(schema) else schema), prepared.carried.num_rows


def finish(config: JobConfig, result: dict) -> dict:
    """Record where the output went, write the metrics file if asked, log the summary line."""
    result["output"] = str(config.output)
    if config.metrics_out:
        write_json_atomic(config.metrics_out, result)
    logger.info("done: %s", summary_line(result))
    return result


def windows(batches: Iterable[pa.RecordBatch], window_rows: int, metrics: Metrics, text_columns: Iterable[str] = (),
            window_bytes: int | None = None) -> Iterator[pa.Table]:
    """Tables of window_rows rows, read as they are needed; a window ends earlier where the next row would take
    its text columns past window_bytes (a row alone may be larger). The cuts depend only on the rows, so a
    resumed run cuts where the first run did."""
    text_columns = tuple(text_columns)
    pending: list[pa.RecordBatch] = []
    sizes = np.zeros(0, dtype=np.int64)  # text bytes of each pending row
    iterator = iter(batches)
    while True:
        with metrics.stage("read"):
            batch = next(iterator, None)
        if batch is not None:
            pending.append(batch)
            sizes = np.concatenate([sizes, _text_bytes(batch, text_columns)]) if window_bytes else sizes
        count = sum(b.num_rows for b in pending)
        while count:
            cut = _window_cut(sizes, count, window_rows, window_bytes, last=batch is None)
            if cut is None:
                break
            table = pa.Table.from_batches(pending)
            yield table.slice(0, cut)
            rest = table.slice(cut)
            pending, count, sizes = rest.to_batches(), rest.num_rows, sizes[cut:]
        if batch is None:
            return


def _text_bytes(batch: pa.RecordBatch, columns: tuple[str, ...]) -> np.ndarray:
    """UTF-8 bytes of each row's text columns (a null counts 0)."""
    sizes = np.zeros(batch.num_rows, dtype=np.int64)
    for name in columns:
        if name in batch.schema.names:
            sizes += pc.fill_null(pc.binary_length(batch.column(name)), 0).to_numpy().astype(np.int64)
    return sizes


def _window_cut(sizes: np.ndarray, count: int, window_rows: int, window_bytes: int | None, last: bool) -> int | None:
    """Rows in the next window of the count pending ones, or None to read more first."""
    if window_bytes:
        over = np.flatnonzero(np.cumsum(sizes[:window_rows]) > window_bytes)
        if len(over):
            return max(int(over[0]), 1)
    if count >= window_rows:
        return window_rows
    return count if last else None


def prefetch(items):
    """Produce the next item in a thread while the caller works on this one.

    Reading and tokenizing window k+1 overlaps inference on window k (onnxruntime and the Rust
    tokenizer both release the GIL). The producer starts on an item only once the caller has taken the one
    before, so at most two windows are held: the one being embedded and the next.
    """
    slot: queue.Queue = queue.Queue(maxsize=1)
    taken = threading.Event()
    done = object()
    cancelled = threading.Event()

    def produce():
        try:
            iterator = iter(items)
            while True:
                item = next(iterator, done)  # made only after the caller took the previous one
                slot.put((item, None))
                if item is done:
                    return
                while not taken.wait(timeout=0.1):
                    if cancelled.is_set():
                        return
                taken.clear()
        except BaseException as e:  # re-raised in the caller's thread, where it can be reported
            slot.put((done, e))

    worker = threading.Thread(target=produce, name="embedder-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slot.get()
            taken.set()
            if error is not None:
                raise error
            if item is done:
                return
            yield item
    finally:
        cancelled.set()
        while worker.is_alive():  # unblock a producer waiting on a full slot
            try:
                slot.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.1)
