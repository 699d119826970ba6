"""The Ray actor: one onnxruntime session per actor, each block embedded by the shared WindowEmbedder.

A block is embedded in windows of window_rows rows (length-sorted batches inside each window) and
written by the actor itself as one Parquet part file, named uniquely, into the staging folder in OUT's
store, where it appears only when complete (Store.writer: a rename on disk; one PUT or a completed
multipart upload in a bucket). The actor returns one row of counters naming that file: the driver keeps
exactly the files named by the results it receives, so a retried block never counts twice. Ray is imported only
inside the actor (this module is loaded by Ray workers, never by the single-process job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import embedder.hooks as hooks
from embedder.config import ChunkOptions, TextSource
from embedder.errors import EmbedderError, ExportError, OutputError
from embedder.infer.vectors import VectorFormat
from embedder.infer.window import BatchingOptions, WindowEmbedder
from embedder.io.parquet import check_utf8
from embedder.io.previous import PreviousOutput
from embedder.io.store import locate
from embedder.manifest import MANIFEST_FILE, Artifact, Manifest
from embedder.metrics import Metrics, peak_rss_mb
from embedder.model.spec import hash_files
from embedder.run.loop import embedded_windows

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphSource:
    """Where an actor finds the graph: a folder every node sees, or the files' bytes in the object store."""

    manifest: Manifest  # narrowed to the one graph the actors run and the tokenizer
    folder: str | None = None  # "path" transfer: the driver's cache folder
    files_ref: object = None  # "object-store" transfer: an ObjectRef of {file name: bytes}


@dataclass(frozen=True)
class WorkerOptions:
    """What each actor needs besides the graph; built once by the driver."""

    text: TextSource
    output_schema: pa.Schema
    staging: str  # folder (a local path or a URI) the part files are written to; published as OUT by the driver
    device: str
    threads: int
    max_seq_len: int | None
    prompt: str | None
    batching: BatchingOptions
    window_rows: int
    vector_format: VectorFormat  # with its int8/uint8 ranges: the driver calibrates them
    token_counts: bool = False
    chunking: ChunkOptions | None = None
    window_bytes: int | None = None
    text_key: bool = False
    reuse: str | None = None  # PREV, already found reusable by the driver; each actor indexes its keys


def _verified(folder: Path, manifest: Manifest) -> bool:
    """True if every shipped file in folder hashes as the manifest records."""
    try:
        return all(hash_files([folder / name]) == digest for name, digest in manifest.files.items())
    except OSError:
        return False


def materialize_graph(source: GraphSource) -> Artifact:
    """The graph as a verified local folder: the shared path itself, or the shipped bytes written once per node."""
    manifest = source.manifest
    if source.folder is not None:
        folder = Path(source.folder)
        if not _verified(folder, manifest):
            raise ExportError(
                f"graph folder {folder} is missing or does not match its manifest on node {socket.gethostname()}; "
                "put the cache on storage every node mounts, or use --graph-transfer object-store"
            )
        return Artifact(folder, manifest, hit=True)

    import ray  # only ever reached inside a Ray worker

    digest = hashlib.sha256(json.dumps(manifest.files, sort_keys=True).encode()).hexdigest()
    root = Path(tempfile.gettempdir()) / "embedder-ray-graphs"
    folder = root / digest[:32]
    if folder.is_dir() and _verified(folder, manifest):
        return Artifact(folder, manifest, hit=True)  # another actor on this node wrote it
    files = ray.get(source.files_ref)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
    try:
        for name, data in files.items():
            (staging / name).write_bytes(data)
        (staging / MANIFEST_FILE).write_text(json.dumps(dict(manifest.record), indent=2) + "\n")
        if not _verified(staging, manifest):
            raise ExportError("the graph received from the driver does not match its manifest hashes")
        shutil.rmtree(folder, ignore_errors=True)  # a damaged earlier copy
        try:
            os.replace(staging, folder)
        except OSError:
            if not _verified(folder, manifest):  # lost a race to another actor: keep its copy if it is good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Artifact(folder, manifest, hit=True)


class EmbedActor:
    """Ray Data map_batches callable: session created once in __init__, one part file per block."""

    def __init__(self, graph: GraphSource, options: WorkerOptions):
        import ray

        self.options = options
        self.store, self.staging = locate(options.staging)
        artifact = materialize_graph(graph)
        self.embedder = WindowEmbedder(artifact, options.device, options.threads, options.max_seq_len,
                                       options.prompt, options.batching, vector_format=options.vector_format,
                                       token_counts=options.token_counts, chunking=options.chunking,
                                       text_key=options.text_key,
                                       reuse=PreviousOutput(options.reuse) if options.reuse else None)
        context = ray.get_runtime_context()
        self.worker = context.get_actor_id() or f"pid-{os.getpid()}"
        self.node = context.get_node_id()
        logger.info("actor %s: %s on %s", self.worker, self.embedder.encoder.graph, self.embedder.encoder.device)

    def __call__(self, block: pa.Table) -> pa.Table:
        started = time.perf_counter()
        metrics = Metrics()
        text = self.options.text
        for text_col in text.columns:
            _check_utf8(block, text_col, text.columns)
        name = f"part-{uuid.uuid4().hex}.parquet"
        path = self.store.join(self.staging, name)
        try:
            with self.store.writer(path) as sink:  # removed (a temporary file, an aborted upload) on an error
                with pq.ParquetWriter(sink, self.options.output_schema) as writer:
                    # The run loop's own windows, prefetch and batching, on this block's rows.
                    for table, _ in embedded_windows(self.embedder, block.to_batches(), text,
                                                     self.options.window_rows, self.options.output_schema, metrics,
                                                     window_bytes=self.options.window_bytes):
                        hooks.reached("embedded")
                        with metrics.stage("write"):
                            writer.write_table(table)
                        metrics.output_rows += table.num_rows
                finishing = time.perf_counter()  # the footer is written; the file appears as the block exits
            metrics.stage_seconds["write"] += time.perf_counter() - finishing
        except OSError as e:
            if isinstance(e, EmbedderError):
                raise
            raise OutputError(f"writing part file {self.store.uri(path)} failed: {e}") from e
        hooks.reached("written")
        encoder = self.embedder.encoder
        return pa.table({
            "file": [name],
            "rows": [metrics.rows],
            "null_rows": [metrics.null_rows],
            "truncated_rows": [metrics.truncated_rows],
            "real_tokens": [metrics.real_tokens],
            "padded_tokens": [metrics.padded_tokens],
            "batches": [metrics.batches],
            "windows": [metrics.windows],
            "output_rows": [metrics.output_rows],
            "chunks": [metrics.chunks],
            "chunked_rows": [metrics.chunked_rows],
            "cut_in_word": [metrics.cut_in_word],
            "deduplicated": [metrics.deduplicated],
            "reused_rows": [metrics.reused_rows],
            "tokenize_seconds": [metrics.stage_seconds["tokenize"]],
            "infer_seconds": [metrics.stage_seconds["infer"]],
            "write_seconds": [metrics.stage_seconds["write"]],
            "busy_seconds": [time.perf_counter() - started],
            "worker": [self.worker],
            "node": [self.node],
            "pid": [os.getpid()],
            "provider": [encoder.provider],
            "device": [encoder.device],
            "peak_rss_mb": [peak_rss_mb()],
        })


def _check_utf8(block: pa.Table, text_col: str, text_cols: tuple[str, ...] = ()) -> None:
    """Parquet readers do not validate string pages: refuse bad UTF-8 as the single-process job does, naming
    the row by its first carried column (an id, usually) since a block's row numbers mean nothing to the user."""
    carried = [n for n in block.column_names if n != text_col and n not in text_cols][:1]

    def row_label(index: int) -> str:
        return f"{carried[0]}={block.column(carried[0])[index].as_py()!r}" if carried else f"{index} of a block"

    check_utf8(block.column(text_col), text_col, row_label)
