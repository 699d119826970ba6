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

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from embedder import __version__
from embedder.build.cache import get_or_export
from embedder.config import JobConfig, default_cache_dir
from embedder.infer.tokenize import TextTokenizer
from embedder.infer.window import WindowEmbedder, make_tokenizer, text_settings
from embedder.io.atomic import write_json_atomic
from embedder.io.parquet import InputSet, open_inputs
from embedder.io.workfolder import check_output
from embedder.manifest import Artifact
from embedder.metrics import Metrics, summary_line
from embedder.model.spec import ModelSpec, load_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Setup:
    """What every driver starts from: checked inputs, the model and its verified graph, a checked tokenizer."""

    config: JobConfig
    inputs: InputSet
    spec: ModelSpec
    artifact: Artifact
    tokenizer: TextTokenizer  # --max-seq-len and --prompt applied and checked against the model


def set_up(config: JobConfig, metrics: Metrics, folder_output: bool = False,
           before_model: Callable[[], None] = lambda: None) -> Setup:
    """Fail fast on bad options, output or input, then load the model and get its graph (exported on a miss).

    before_model runs after the cheap checks and before the model is loaded (the Ray driver imports Ray there,
    so a missing extra does not wait for an export).
    """
    check_output(config.output + ("/" if folder_output and not config.output.endswith("/") else ""),
                 config.overwrite)
    keep = list(config.keep_cols) if config.keep_cols is not None else None
    inputs = open_inputs(config.inputs, config.text_col, keep).shard(*config.shard)
    logger.info("input: %d files, %d row groups, %d rows (shard %d/%d)", len(inputs.files), len(inputs.units),
                inputs.total_rows, *config.shard)
    before_model()
    with metrics.stage("model"):
        spec = load_spec(config.model, config.export.pooling)
        text_settings(config.max_seq_len, config.prompt, spec.max_seq_length, spec.prompts, spec.default_prompt_name,
                      spec.include_prompt)  # a bad --max-seq-len or --prompt costs no export
        artifact = get_or_export(spec, config.export, config.cache_dir or default_cache_dir())
        tokenizer = make_tokenizer(artifact, config.max_seq_len, config.prompt)
    metrics.cache_hit = artifact.hit
    return Setup(config, inputs, spec, artifact, tokenizer)


def file_metadata(setup: Setup, graph: Path) -> dict:
    """What the output file records about how its vectors were made; graph is the file that ran."""
    manifest = setup.artifact.manifest
    return {
        "model": manifest.model,
        "model_hash": manifest.model_hash,
        "pooling": list(manifest.pooling),
        "dense": [dict(layer) for layer in manifest.dense],
        "normalize": manifest.normalize,
        "dim": manifest.dim,
        "max_seq_length": setup.tokenizer.max_seq_length,
        "prompt": setup.tokenizer.prompt,
        "precision": manifest.precision,
        "graph_sha256": manifest.files[graph.name],  # the graph that ran: CPU and CUDA have their own
        "embedder_version": __version__,
    }


def embedded_windows(embedder: WindowEmbedder, batches: Iterable[pa.RecordBatch], text_col: str, window_rows: int,
                     schema: pa.Schema, metrics: Metrics, after_batch: Callable[[], None] | None = None
                     ) -> Iterator[pa.Table]:
    """Each window of window_rows rows embedded, in input order, as a table in the output schema.

    after_batch, if given, is called after every batch (signals, test hooks) and may raise to stop.
    """
    tokenized = (embedder.prepare(window, text_col, metrics) for window in windows(batches, window_rows, metrics))
    for prepared in prefetch(tokenized):
        yield embedder.run(prepared, metrics, after_batch).cast(schema)


def finish(config: JobConfig, result: dict) -> dict:
    """Record where the output went, write the metrics file if asked, log the summary line."""
    result["output"] = str(config.output)
    if config.metrics_out:
        write_json_atomic(config.metrics_out, result)
    logger.info("done: %s", summary_line(result))
    return result


def windows(batches: Iterable[pa.RecordBatch], window_rows: int, metrics: Metrics) -> Iterator[pa.Table]:
    """Tables of exactly window_rows rows (the last may be shorter), read as they are needed."""
    pending: list[pa.RecordBatch] = []
    count = 0
    iterator = iter(batches)
    while True:
        with metrics.stage("read"):
            batch = next(iterator, None)
        if batch is None:
            break
        pending.append(batch)
        count += batch.num_rows
        while count >= window_rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, window_rows)
            rest = table.slice(window_rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def prefetch(items):
    """Produce the next item in a thread while the caller works on this one.

    Reading and tokenizing window k+1 overlaps inference on window k (onnxruntime and the Rust
    tokenizer both release the GIL). One item ahead bounds memory at two windows.
    """
    slot: queue.Queue = queue.Queue(maxsize=1)
    done = object()
    cancelled = threading.Event()

    def produce():
        try:
            for item in items:
                while not cancelled.is_set():
                    try:
                        slot.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if cancelled.is_set():
                    return
            slot.put((done, None))
        except BaseException as e:  # re-raised in the caller's thread, where it can be reported
            slot.put((done, e))

    worker = threading.Thread(target=produce, name="embedder-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = slot.get()
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
