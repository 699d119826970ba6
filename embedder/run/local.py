"""The batch job: Parquet rows -> windows -> token ids -> length-sorted batches -> vectors -> Parquet.

Each window is committed to the work folder as soon as it is embedded (see io/workfolder.py), so a
killed job resumes where it stopped; OUT appears only when every window is in.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
from pathlib import Path

import pyarrow as pa

import embedder.hooks as hooks
from embedder import __version__
from embedder.build.cache import get_or_export
from embedder.config import JobConfig, default_cache_dir
from embedder.errors import Interrupted
from embedder.infer.devices import candidates
from embedder.infer.tokenize import TextTokenizer
from embedder.infer.window import BatchingOptions, WindowEmbedder
from embedder.io.atomic import write_json_atomic
from embedder.io.parquet import InputSet, check_output, iter_record_batches, open_inputs
from embedder.io.workfolder import WorkFolder
from embedder.manifest import Artifact
from embedder.metrics import Metrics, summary_line
from embedder.model.spec import load_spec
from embedder.run.report import Progress
from embedder.schema import output_schema

logger = logging.getLogger(__name__)


def run(config: JobConfig) -> dict:
    """Embed every row of config.inputs (or of its shard) into config.output; return the metrics."""
    metrics = Metrics()
    # Refuse a device the precision cannot run on now, not after an export.
    candidates(config.device, config.export.precision)
    check_output(config.output, config.overwrite)
    inputs = open_inputs(config.inputs, config.text_col, list(config.keep_cols) if config.keep_cols is not None else None)
    inputs = inputs.shard(*config.shard)
    logger.info("input: %d files, %d row groups, %d rows (shard %d/%d)", len(inputs.files), len(inputs.units),
                inputs.total_rows, *config.shard)

    with metrics.stage("model"):
        spec = load_spec(config.model, config.export.pooling)
        artifact = get_or_export(spec, config.export, config.cache_dir or default_cache_dir())
        embedder = WindowEmbedder(artifact, config.device, config.threads, config.max_seq_len, config.prompt,
                                  BatchingOptions(config.max_tokens, config.max_batch_size))
    encoder = embedder.encoder
    metrics.cache_hit, metrics.provider, metrics.device = artifact.hit, encoder.provider, encoder.device
    metrics.batching = {"window_rows": config.window_rows, "max_tokens": embedder.batching.max_tokens,
                        "max_batch_size": embedder.batching.max_batch_size}
    logger.info("model %s (dim %d, max_seq_length %d) on %s", spec.name, artifact.manifest.dim,
                embedder.tokenizer.max_seq_length, encoder.device)

    file_metadata = build_file_metadata(artifact, embedder.tokenizer, encoder.graph)
    schema = output_schema(inputs.keep_schema, artifact.manifest.dim, file_metadata)
    work = WorkFolder(config.output)
    with work.locked(), _stop_on_signals() as stop:
        done = work.prepare(_fingerprint(config, inputs, file_metadata, embedder.batching), config.restart, config.resume)
        skip = min(done * config.window_rows, inputs.total_rows)
        metrics.resumed_rows = skip
        progress = Progress(inputs.total_rows, config.progress, initial=skip)
        windows = done

        def after_batch() -> None:
            hooks.reached("batch", metrics.batches)
            stop.check()

        try:
            batches = iter_record_batches(inputs, min(config.window_rows, 65536), skip_rows=skip)
            prepared = (embedder.prepare(w, inputs.text_col, metrics) for w in _windows(batches, config.window_rows, metrics))
            for window in _prefetch(prepared):
                table = embedder.run(window, metrics, after_batch)
                with metrics.stage("write"):
                    work.commit(windows, table.cast(schema))
                windows += 1
                progress.update(table.num_rows)
                hooks.reached("window", windows)
                stop.check()
        finally:
            progress.close()
        with metrics.stage("write"):
            metrics.output_rows = work.merge_into(config.output, schema, config.overwrite, windows)
    work.remove()
    result = metrics.to_dict()
    result["output"] = str(config.output)
    if config.metrics_out:
        write_json_atomic(config.metrics_out, result)
    logger.info("done: %s", summary_line(result))
    return result


def _prefetch(items):
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


def _fingerprint(config: JobConfig, inputs: InputSet, file_metadata: dict, batching: BatchingOptions) -> dict:
    """What committed progress belongs to; a rerun resumes only if all of it is the same."""
    files = {}
    for path in inputs.files:
        stat = path.stat()
        files[str(path.resolve())] = [stat.st_size, stat.st_mtime_ns]
    return {
        "inputs": files,
        "row_groups": [[str(u.file.resolve()), u.row_group] for u in inputs.units],
        "columns": [config.text_col, *inputs.keep_cols],
        "model": file_metadata["model_hash"],
        "graph": file_metadata["graph_sha256"],
        "max_seq_length": file_metadata["max_seq_length"],
        "prompt": file_metadata["prompt"],
        "shard": list(config.shard),
        # Batching shapes the floating-point sums: keep it equal so a resumed run is bit-identical.
        "batching": [config.window_rows, batching.max_tokens, batching.max_batch_size],
    }


class _StopFlag:
    """Set by SIGTERM/SIGINT; the job checks it between batches and stops with what it committed."""

    def __init__(self):
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


@contextlib.contextmanager
def _stop_on_signals():
    stop = _StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return

    def handle(signum, _frame):
        if stop.signum is not None:  # a second signal: stop now
            raise Interrupted(signum)
        stop.signum = signum
        logger.warning("%s received: finishing the batch in flight, then stopping", signal.Signals(signum).name)

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def build_file_metadata(artifact: Artifact, tokenizer: TextTokenizer, graph: Path) -> dict:
    """What the output file records about how its vectors were made."""
    manifest = artifact.manifest
    return {
        "model": manifest.model,
        "model_hash": manifest.model_hash,
        "pooling": list(manifest.pooling),
        "dense": [dict(layer) for layer in manifest.dense],
        "normalize": manifest.normalize,
        "dim": manifest.dim,
        "max_seq_length": tokenizer.max_seq_length,
        "prompt": tokenizer.prompt,
        "precision": manifest.precision,
        "graph_sha256": manifest.files[graph.name],  # the graph that ran: CPU and CUDA have their own
        "embedder_version": __version__,
    }


def _windows(batches, window_rows: int, metrics: Metrics):
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
