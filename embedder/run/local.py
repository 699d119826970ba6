"""The local driver: the run loop in this process, each window committed to a work folder beside OUT.

A window counts once its part file is committed (io/workfolder.py), so a killed job resumes where it
stopped; OUT appears only when every window is in.
"""

from __future__ import annotations

import json
import logging

import embedder.hooks as hooks
from embedder.config import JobConfig
from embedder.infer.devices import candidates
from embedder.infer.vectors import ranges_from_metadata
from embedder.infer.window import BatchingOptions, WindowEmbedder
from embedder.io.changes import change_set, check_id_column, write_change_set
from embedder.io.parquet import InputSet, iter_record_batches
from embedder.io.workfolder import WorkFolder
from embedder.metrics import Metrics
from embedder.run.loop import batching_options, embedded_windows, file_metadata, file_schema, finish, reusable, set_up
from embedder.run.report import Progress
from embedder.run.signals import stop_on_signals
from embedder.schema import METADATA_KEY, TEXT_KEY_COLUMN

logger = logging.getLogger(__name__)


def run(config: JobConfig) -> dict:
    """Embed every row of config.inputs (or of its shard) into config.output (a file, or a folder of parts where
    it ends in '/'; local or in a bucket); return the metrics."""
    metrics = Metrics()
    candidates(config.device, config.export.precision)  # a device the precision cannot run on: now, not after an export
    setup = set_up(config, metrics)
    if config.id_col is not None:
        check_id_column(setup.inputs.keep_schema, config.id_col, "the output (carried columns)")
        check_id_column(setup.previous.schema, config.id_col, f"--reuse {config.reuse}")
    with metrics.stage("model"):
        embedder = WindowEmbedder(setup.artifact, config.device, config.threads, config.max_seq_len, config.prompt,
                                  batching_options(config), setup.tokenizer, setup.vector_format,
                                  config.output_options.token_counts, setup.chunking,
                                  config.output_options.text_key)
    encoder, inputs = embedder.encoder, setup.inputs
    metrics.provider, metrics.device = encoder.provider, encoder.device
    metrics.batching = {"window_rows": config.window_rows, "window_mb": config.window_mb,
                        "max_tokens": embedder.batching.max_tokens, "max_batch_size": embedder.batching.max_batch_size,
                        "dedup": embedder.batching.dedup}
    logger.info("model %s (dim %d, max_seq_length %d) on %s", setup.spec.name, encoder.dim,
                embedder.tokenizer.max_seq_length, encoder.device)

    metadata = file_metadata(setup, encoder.graph)  # the graph that runs here: CPU and CUDA have their own
    if setup.previous is not None:
        embedder.reuse = reusable(setup.previous, metadata, config.reuse_strict)

    def schema():  # int8/uint8 without --calibration: the metadata gets the ranges once the first window is in
        return file_schema(setup, encoder.graph, embedder.vector_format)

    work = WorkFolder(config.output)
    with work.locked(take_over=config.restart), stop_on_signals() as stop:
        versions = None if setup.previous is None else {"files": setup.previous.versions,
                                                        "used": embedder.reuse is not None}
        done = work.prepare(fingerprint(config, inputs, metadata, embedder.batching, versions), config.restart,
                            config.resume,
                            one_row_per_input=setup.chunk_columns != "rows", window_rows=config.window_rows)
        if done and embedder.vector_format.needs_ranges:
            # The ranges the first window gave, which committed part 0 records: the resumed windows use the same.
            committed = json.loads(work.part_schema(0).metadata[METADATA_KEY])
            embedder.vector_format = embedder.vector_format.with_ranges(ranges_from_metadata(committed),
                                                                        committed["calibration"])
        skip = sum(work.input_rows)
        metrics.resumed_rows = skip
        progress = Progress(inputs.total_rows, config.progress, initial=skip)
        windows = done

        def after_batch() -> None:
            hooks.reached("batch", metrics.batches)
            stop.check()

        try:
            batches = iter_record_batches(inputs, min(config.window_rows, 65536), skip_rows=skip)
            for table, rows in embedded_windows(embedder, batches, config.text, config.window_rows, schema, metrics,
                                                after_batch, setup.window_bytes):
                with metrics.stage("write"):
                    work.commit(windows, table, rows)
                windows += 1
                progress.update(rows)
                hooks.reached("window", windows)
                stop.check()
        finally:
            progress.close()
        with metrics.stage("write"):
            if config.id_col is not None:  # written first: a rerun after a crash here writes it again
                write_changes(config, setup.previous, work, windows)
            metrics.output_rows = work.publish(schema(), config.overwrite, windows)
    work.remove()
    if setup.previous is not None:
        logger.info("--reuse: %d of %d %s reused from %s, %d embedded", metrics.reused_rows,
                    metrics.chunks or metrics.rows - metrics.null_rows, "chunks" if metrics.chunks else "rows",
                    config.reuse, (metrics.chunks or metrics.rows - metrics.null_rows) - metrics.reused_rows)
    return finish(config, metrics.to_dict())


def write_changes(config: JobConfig, previous, work: WorkFolder, windows: int) -> None:
    """OUT's change set against PREV (ids added, changed, deleted), beside OUT as OUT.changes.parquet."""
    names = [config.id_col, TEXT_KEY_COLUMN]
    changes = change_set(work.columns(windows, names), previous.columns(names), config.id_col)
    path = work.store.join(work.store.parent(work.out), work.store.name(work.out) + ".changes.parquet")
    write_change_set(work.store, path, changes)
    counts = {kind: int((changes.column("change").to_numpy(zero_copy_only=False) == kind).sum())
              for kind in ("added", "changed", "deleted")}
    logger.info("change set: %d added, %d changed, %d deleted ids in %s", counts["added"], counts["changed"],
                counts["deleted"], work.store.uri(path))


def fingerprint(config: JobConfig, inputs: InputSet, metadata: dict, batching: BatchingOptions,
                previous_versions: dict | None = None) -> dict:
    """What committed progress belongs to; a rerun resumes only if all of it is the same."""
    uri = inputs.store.uri
    result = {
        # Versions: size and mtime on disk, ETags in a bucket; an input rewritten after a crash is refused.
        "inputs": {uri(path): inputs.versions[path] for path in inputs.files},
        "row_groups": [[uri(u.file), u.row_group] for u in inputs.units],
        "columns": [*inputs.text_cols, *inputs.keep_cols],
        "model": metadata["model_hash"],
        "graph": metadata["graph_sha256"],
        "max_seq_length": metadata["max_seq_length"],
        "prompt": metadata["prompt"],
        "shard": list(config.shard),
        # Batching shapes the floating-point sums: keep it equal so a resumed run is bit-identical.
        "batching": [config.window_rows, config.window_mb, batching.max_tokens, batching.max_batch_size],
    }
    # Added only where they differ from the defaults, so that progress of a run from before they existed still
    # resumes. Ranges calibrated on the first window are not known yet: committed part 0 records them.
    if metadata["text_template"] is not None:
        result["text_template"] = metadata["text_template"]
    output = {key: metadata[key] for key in ("truncate_dim", "output_dtype", "ranges", "calibration")}
    if output != {"truncate_dim": None, "output_dtype": "float32", "ranges": None, "calibration": None}:
        result["output"] = output
    if config.output_options.token_counts:
        result["token_counts"] = True
    if metadata["chunking"] is not None:
        result["chunking"] = metadata["chunking"]
    if not batching.dedup:
        result["dedup"] = False
    if not config.output_options.text_key:
        result["text_key"] = False
    if config.reuse is not None:  # PREV rewritten after a crash would give the rest other vectors: refused
        result["reuse"] = previous_versions
    return result
