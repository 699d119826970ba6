"""The batch job on Ray Data: validate and export on the driver, embed in an actor pool, write a Parquet folder.

The driver checks the input (embedder.io.parquet.open_inputs) and exports or fetches the graph once, then
reads the files with ray.data.read_parquet (a bucket's through pyarrow's filesystem for its store), cuts the rows into
blocks of --window-rows rows, and maps them over EmbedActor (embedder.run.ray_actor), which runs the
single-process job's WindowEmbedder and writes each block as a part file in a hidden staging folder beside
OUT, in OUT's store (a prefix in a bucket). The driver keeps the part files named by the results it receives
(a killed and retried actor's leftovers are deleted) and publishes them in input order as the folder OUT
(embedder.io.workfolder.publish_folder: renamed into place on disk; copied server-side, _SUCCESS last, in a
bucket). Ray is imported here lazily, never by the single-process job.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import uuid
import warnings
from collections import defaultdict
from dataclasses import dataclass

import pyarrow as pa

from embedder import errors
from embedder.config import JobConfig
from embedder.errors import EmbedderError, InputError, OutputError, UsageError, first_line
from embedder.infer.devices import Device, DeviceKind, candidates
from embedder.io.parquet import InputSet
from embedder.io.store import locate
from embedder.io.workfolder import part_name, publish_folder, write_part
from embedder.manifest import Artifact
from embedder.metrics import Metrics
from embedder.run.loop import (
    batching_options,
    calibrate_first_window,
    file_metadata,
    file_schema,
    finish,
    reusable,
    set_up,
)
from embedder.run.ray_actor import EmbedActor, GraphSource, WorkerOptions
from embedder.run.report import Progress
from embedder.run.signals import stop_on_signals

logger = logging.getLogger(__name__)

GRAPH_TRANSFERS = ("auto", "path", "object-store")


@dataclass(frozen=True)
class RayOptions:
    """How the work is spread over Ray: actor count and size, cluster address, how the graph travels."""

    workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    address: str | None = None  # None: the Ray this process is connected to, else a new local one
    graph_transfer: str = "auto"
    max_retries: int = 3  # restarts of a dead actor, and retries of the block it held

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise UsageError(f"--workers must be at least 1, got {self.workers}")
        if self.cpus_per_worker <= 0:
            raise UsageError(f"--cpus-per-worker must be above 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise UsageError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.graph_transfer not in GRAPH_TRANSFERS:
            raise UsageError(f"--graph-transfer {self.graph_transfer}: valid: {', '.join(GRAPH_TRANSFERS)}")
        if self.max_retries < 0:
            raise UsageError(f"--max-retries must be 0 or more, got {self.max_retries}")


def _ray_advice(asked: DeviceKind, allowed: tuple[DeviceKind, ...]) -> str:
    # On Ray the device follows --gpus-per-worker, so a precision/device mismatch is fixed there.
    if asked.name == "cpu":
        return "give the actors GPUs with --gpus-per-worker, or use fp32 on CPU actors"
    return "drop --gpus-per-worker, or use fp32 on GPU actors"


def actor_device(device: str, gpus_per_worker: float) -> str:
    """The device every actor uses: Ray hands out the GPUs, so the device follows --gpus-per-worker."""
    parsed = Device.parse(device)
    if gpus_per_worker > 0:
        if parsed.kind == "cpu":
            raise UsageError("--device cpu with --gpus-per-worker reserves GPUs that nothing uses; drop one of them")
        return "cuda" if parsed.kind == "auto" else device  # asked for GPUs: failing to get CUDA is an error
    if parsed.kind not in ("auto", "cpu"):
        raise UsageError(f"--device {device} needs GPUs on the actors: pass --gpus-per-worker (for example 1)")
    return "cpu"


def run(config: JobConfig, options: RayOptions) -> dict:
    """Embed every row of config.inputs into the Parquet folder config.output on Ray; return the metrics."""
    metrics = Metrics()
    device = actor_device(config.device, options.gpus_per_worker)
    kind = candidates(device, config.export.precision, _ray_advice)[0].name  # the graph every actor runs
    ray = None

    def import_ray() -> None:  # before the model: a missing extra should not wait for an export
        nonlocal ray
        ray = _import_ray()

    staging = _Staging(config.output, config.overwrite)  # names only: a bad OUT fails before the model
    setup = set_up(config, metrics, folder_output=True, before_model=import_ray)
    inputs = setup.inputs
    # The actors embed their blocks independently: int8/uint8 ranges are calibrated here, before any block.
    vector_format = calibrate_first_window(setup, setup.vector_format, metrics)
    schema = file_schema(setup, setup.artifact.graphs[kind], vector_format)
    reuse = None  # what the actors reuse: PREV's location, if its vectors were made as these will be
    if setup.previous is not None and reusable(setup.previous, file_metadata(setup, setup.artifact.graphs[kind],
                                                                             vector_format), config.reuse_strict):
        reuse = config.reuse

    cluster: dict = {}
    with staging, stop_on_signals(at_once=True, outcome=_NOT_WRITTEN):
        results: list[dict] = []
        if inputs.total_rows:
            # ray.init installs its own SIGTERM handler: ours go in after it, and give it back on the way out.
            with _connected(ray, options.address) as local, stop_on_signals(at_once=True, outcome=_NOT_WRITTEN):
                transfer = _check_cluster(ray, options, local)
                cluster = {"workers": options.workers, "cpus_per_worker": options.cpus_per_worker,
                           "gpus_per_worker": options.gpus_per_worker, "graph_transfer": transfer,
                           "nodes": len(_alive_nodes(ray)), "ray_version": ray.__version__}
                worker = WorkerOptions(
                    text=config.text, output_schema=schema, staging=staging.uri, device=device,
                    threads=config.threads or max(1, int(options.cpus_per_worker)), max_seq_len=config.max_seq_len,
                    prompt=config.prompt, batching=batching_options(config),
                    window_rows=config.window_rows, vector_format=vector_format,
                    token_counts=config.output_options.token_counts, chunking=setup.chunking,
                    text_key=config.output_options.text_key, reuse=reuse,
                    window_bytes=setup.window_bytes,
                )
                source = _graph_source(ray, setup.artifact, kind, transfer)
                results = _execute(ray, inputs, source, worker, options, config)
        rows = sum(r["rows"] for r in results)
        if rows != inputs.total_rows:
            raise OutputError(f"the Ray job returned {rows} rows for {inputs.total_rows} input rows; OUT not written")
        staging.finish([r["file"] for r in results], schema)

    result = _aggregate(metrics, results)
    result["ray"] = cluster
    return finish(config, result)


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise UsageError(f"Ray is not installed ({e}); install the extra: pip install 'embedder[ray]'") from e
    return ray


@contextlib.contextmanager
def _connected(ray, address: str | None):
    """Use the Ray this process is connected to, else join `address` or RAY_ADDRESS, else start a new local Ray
    for this run (never a `ray start` cluster found by chance: that takes --address auto); yield whether the
    Ray is one this run started."""
    if ray.is_initialized():
        yield False
        return
    started = not address and not os.environ.get("RAY_ADDRESS")
    ray.init(address="local" if started else address)
    try:
        yield started
    finally:
        ray.shutdown()


def _alive_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n.get("Alive")]


def _check_cluster(ray, options: RayOptions, local: bool) -> str:
    """Fail fast (or warn, on a cluster that may autoscale) where the actors cannot all be placed; pick the transfer."""
    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problems = []
    # Ray Data starts the actors first; if they hold every CPU, its read tasks never run (ray-project/ray#44687).
    if options.workers * options.cpus_per_worker + 1 > cpus:
        problems.append(f"{options.workers} workers x {options.cpus_per_worker:g} CPUs leave no CPU for reading on a "
                        f"cluster of {cpus:g} CPUs: lower --workers or --cpus-per-worker")
    if options.workers * options.gpus_per_worker > gpus:
        problems.append(f"{options.workers} workers x {options.gpus_per_worker:g} GPUs do not fit the cluster's {gpus:g} GPUs")
    address = options.address or os.environ.get("RAY_ADDRESS", "")
    if problems:
        if local:  # a Ray this run started: it will not grow
            raise UsageError("; ".join(problems))
        for problem in problems:
            logger.warning("%s (waiting for the cluster to grow)", problem)
    if options.graph_transfer != "auto":
        return options.graph_transfer
    remote_client = address.startswith("ray://")
    return "path" if len(_alive_nodes(ray)) == 1 and not remote_client else "object-store"


def _graph_source(ray, artifact: Artifact, kind: str, transfer: str) -> GraphSource:
    """What the actors load: the manifest narrowed to the one graph they run and the tokenizer, so
    only those are shipped and hashed."""
    manifest = artifact.manifest.narrowed(kind)
    if transfer == "path":
        return GraphSource(manifest, folder=str(artifact.folder.resolve()))
    files = {name: (artifact.folder / name).read_bytes() for name in manifest.files}
    logger.info("graph shipped through the object store (%.1f MB)", sum(map(len, files.values())) / 1e6)
    return GraphSource(manifest, files_ref=ray.put(files))


def _execute(ray, inputs: InputSet, graph: GraphSource, worker: WorkerOptions, options: RayOptions,
             config: JobConfig) -> list[dict]:
    """Run the Ray Data pipeline; the result rows, one per block, in input order."""
    from ray.data import ActorPoolStrategy, DataContext

    context = DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    saved_raise = getattr(context, "raise_original_map_exception", None)
    context.execution_options.preserve_order = True  # results in input order: part files are named by it
    context.enable_progress_bars = False  # the job's own progress (bar or log lines) instead
    if saved_raise is not None:
        context.raise_original_map_exception = True  # an actor's InputError reaches the driver as itself
    try:
        read_schema = pa.schema([*inputs.keep_schema, *(pa.field(c, pa.large_string()) for c in inputs.text_cols)])
        # The explicit schema reads every file's text column (string, large_string, dictionary, binary) as
        # large_string and the carried columns as open_inputs widened them; no hive partition columns are added.
        # Store paths in input order: absolute paths on disk, "bucket/key" for the store's pyarrow filesystem.
        filesystem = inputs.store.arrow_filesystem()
        dataset = ray.data.read_parquet(list(inputs.files), filesystem=filesystem, schema=read_schema,
                                        partitioning=None, file_extensions=None)
        if "target_num_rows_per_block" in inspect.signature(dataset.repartition).parameters:
            # Streaming (no shuffle): blocks of --window-rows rows spread over the actors.
            dataset = dataset.repartition(target_num_rows_per_block=config.window_rows)
        with warnings.catch_warnings():
            # Ray 2.60 deprecates extra remote args but names no parameter for max_restarts/max_task_retries
            # (its defaults retry forever, which would loop on a block that kills every actor).
            warnings.filterwarnings("ignore", message=".*ray_remote_args. is deprecated")
            dataset = dataset.map_batches(
                EmbedActor,
                batch_size=None,  # the whole block: length bucketing inside it
                batch_format="pyarrow",
                compute=ActorPoolStrategy(size=options.workers),
                fn_constructor_kwargs={"graph": graph, "options": worker},
                num_cpus=options.cpus_per_worker,
                num_gpus=options.gpus_per_worker,
                max_restarts=options.max_retries,
                max_task_retries=options.max_retries,
            )
        results: list[dict] = []
        progress = Progress(inputs.total_rows, config.progress)
        batches = iter(dataset.iter_batches(batch_size=None, batch_format="pyarrow"))
        try:
            for batch in batches:
                rows = batch.to_pylist()
                results += rows
                progress.update(sum(r["rows"] for r in rows))
        finally:
            progress.close()
            # Stopped early (a signal, a failed block): end Ray Data's execution now, while Ray is still up,
            # rather than leaving its threads to fail noisily after the driver shuts Ray down.
            close = getattr(batches, "close", None)
            if close is not None:
                close()
        return results
    except (EmbedderError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise _explain(e) from e
    finally:
        context.execution_options.preserve_order, context.enable_progress_bars = saved
        if saved_raise is not None:
            context.raise_original_map_exception = saved_raise


def _explain(error: BaseException) -> EmbedderError:
    """The project's own error behind Ray's wrappers (a worker's InputError stays exit 2), else a one-line failure."""
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, EmbedderError) and type(current).__module__.startswith("embedder."):
            return current
        if isinstance(current, (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError)):
            return InputError(f"cannot read the input: {first_line(current)}")
        stack += [current.__cause__, current.__context__, getattr(current, "cause", None)]
    # Ray versions that wrap the worker's exception keep only its traceback text: find our error's last line there.
    found = re.findall(r"^embedder\.errors\.(\w+): (.+)$", str(error), flags=re.MULTILINE)
    if found and isinstance(getattr(errors, found[-1][0], None), type):
        cls = getattr(errors, found[-1][0])
        if issubclass(cls, EmbedderError) and cls is not errors.Interrupted:
            return cls(found[-1][1])
    return EmbedderError(f"the Ray job failed: {type(error).__name__}: {first_line(error)}")




class _Staging:
    """A hidden folder beside OUT, in OUT's store, that the actors write part files into; published as OUT.

    On disk it is renamed to OUT; in a bucket (a prefix there) its parts are copied to OUT and it is deleted.
    """

    def __init__(self, out: str, overwrite: bool):
        self.store, self.out = locate(out)
        self.overwrite = overwrite
        parent = self.store.parent(self.out)
        if not parent:
            raise UsageError(f"--out {out}: name a folder inside the bucket (its staging folder goes beside it), "
                             "not the bucket itself")
        self.folder = self.store.join(parent, f".{self.store.name(self.out)}.ray-{uuid.uuid4().hex[:12]}.tmp")
        self.uri = self.store.uri(self.folder)  # what the actors locate

    def __enter__(self) -> _Staging:
        return self

    def finish(self, files: list[str], schema: pa.Schema) -> None:
        """Keep exactly `files` (in this order, as part-NNNNNN.parquet), drop everything else, publish OUT."""
        if len(set(files)) != len(files):
            raise OutputError("the Ray job reported a part file twice; OUT not written")
        store = self.store
        try:
            keep = set(files)
            for entry in store.list_files(self.folder):  # leftovers of killed attempts
                if store.name(entry.path) not in keep:
                    logger.info("removing %s, left by a failed attempt", store.name(entry.path))
                    store.delete(entry.path)
            store.clear_strays(self.folder, self.folder)  # a killed attempt's open multipart upload
            parts = [store.join(self.folder, name) for name in files]
            if not parts:  # no rows: one empty file that still carries the schema and metadata
                parts = [store.join(self.folder, part_name(0))]
                write_part(store, parts[0], schema.empty_table())
            publish_folder(store, parts, self.out, self.overwrite)
        except OSError as e:
            if isinstance(e, EmbedderError):
                raise
            raise OutputError(f"finishing {store.uri(self.out)} failed: {e}") from e

    def __exit__(self, exc_type, exc, tb) -> None:
        # On disk a published staging folder is OUT now and nothing is left; a bucket keeps the staged parts.
        try:
            self.store.delete_folder(self.folder)
            self.store.clear_strays(self.folder, self.folder)
        except EmbedderError as e:
            logger.warning("could not remove the staging folder %s: %s", self.uri, first_line(e))


# What a stopped Ray run leaves: the shared loop's resume does not reach the actors' part files.
_NOT_WRITTEN = "OUT was not written (the Ray job does not resume: rerun it to start over)"


_SUMMED = ("rows", "null_rows", "truncated_rows", "real_tokens", "padded_tokens", "batches", "windows", "output_rows",
           "chunks", "chunked_rows", "cut_in_word", "deduplicated", "reused_rows")


def _aggregate(metrics: Metrics, results: list[dict]) -> dict:
    """The single-process job's metrics from the actors' per-block rows, plus `workers` (per-actor throughput)."""
    for row in results:
        for name in _SUMMED:
            setattr(metrics, name, getattr(metrics, name) + row[name])
        for stage in ("tokenize", "infer", "write"):
            metrics.stage_seconds[stage] += row[f"{stage}_seconds"]
    metrics.provider = ",".join(sorted({r["provider"] for r in results}))
    metrics.device = ",".join(sorted({r["device"] for r in results}))
    result = metrics.to_dict()
    result["stage_seconds"]["read"] = None  # done inside Ray's read tasks, not measured per row
    result["blocks"] = len(results)

    workers: dict[str, dict] = defaultdict(lambda: {"blocks": 0, "rows": 0, "real_tokens": 0, "busy_seconds": 0.0,
                                                    "pids": set(), "peak_rss_mb": 0.0})
    for row in results:
        entry = workers[row["worker"]]
        entry["node"] = row["node"]
        entry["blocks"] += 1
        entry["rows"] += row["rows"]
        entry["real_tokens"] += row["real_tokens"]
        entry["busy_seconds"] += row["busy_seconds"]
        entry["pids"].add(row["pid"])
        entry["peak_rss_mb"] = max(entry["peak_rss_mb"], row["peak_rss_mb"])
    result["workers"] = [
        {
            "worker": worker,
            "node": entry["node"],
            "pids": sorted(entry["pids"]),  # more than one: the actor was restarted
            "blocks": entry["blocks"],
            "rows": entry["rows"],
            "real_tokens": entry["real_tokens"],
            "busy_seconds": round(entry["busy_seconds"], 4),
            "rows_per_second": round(entry["rows"] / entry["busy_seconds"], 2) if entry["busy_seconds"] else None,
            "tokens_per_second": round(entry["real_tokens"] / entry["busy_seconds"], 2) if entry["busy_seconds"] else None,
            "peak_rss_mb": round(entry["peak_rss_mb"], 1),
        }
        for worker, entry in sorted(workers.items())
    ]
    return result
