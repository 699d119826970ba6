"""onnxruntime sessions on the device kinds of the device table, checked after creation."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.errors import DeviceError, first_line
from embedder.infer.devices import CPU, DEVICE_KINDS, Device, DeviceKind, candidates

logger = logging.getLogger(__name__)


@dataclass
class Encoder:
    """A session that maps padded token arrays to sentence vectors."""

    session: object
    input_names: tuple[str, ...]
    kind: DeviceKind  # the row of the device table it runs on
    device: str  # "cpu", "cuda:0"
    dim: int
    graph: Path  # the file the session runs (an entry has one per device kind)

    @property
    def provider(self) -> str:
        return self.kind.provider

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # Plain session.run, also on CUDA: what crosses to the device per batch is two int64 id arrays
        # and what comes back is batch x dim floats, small next to the encoder's work. IO binding waits
        # until scripts/bench_gpu.py shows those copies matter.
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(["sentence_embedding"], feeds)[0]

    def warm_up(self, rows: int, length: int) -> None:
        """Run one batch of the largest shape the job will feed, before the first real one (DeviceKind.warm_up).

        On CUDA the first run loads kernels and the memory arena grows to the shapes it sees; doing it
        once at the peak shape keeps both out of the timed batches and the arena from growing later.
        """
        ids = np.ones((rows, length), dtype=np.int64)  # any valid token id; only the shape matters
        self(ids, np.ones_like(ids))


def _session(ort, graph: Path, providers: list, threads: int | None):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The memory pattern replays one input shape's allocations for that same shape; length-sorted
    # batches change shape nearly every batch. Off, the CPU ran at 1.03x (scripts/bench_session.py, 2048 tokens)
    # and peaked lower.
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(graph), sess_options=options, providers=providers)


def open_session(graph: Path, kind: DeviceKind, index: int = 0, threads: int | None = None):
    """A session for graph on device `index` of this kind, or the reason there is none.

    Returns (session, None) when the session really runs on kind's provider, else (None, why): onnxruntime
    falls back to the CPU without a word, so the provider it took is checked here.
    """
    import onnxruntime as ort

    reason = kind.problem(index)
    if reason is not None:
        return None, reason
    kind.prepare()
    providers = [(kind.provider, kind.options(index))] + ([CPU] if kind.provider != CPU else [])
    try:
        session = _session(ort, graph, providers, threads)
    except Exception as e:  # onnxruntime raises its own RuntimeError subclasses (e.g. a CUDA failure)
        return None, f"onnxruntime could not create a session on {kind.label}: {first_line(e)}"
    if session.get_providers()[0] != kind.provider:
        return None, (f"onnxruntime's {kind.provider} did not load (for CUDA: an NVIDIA driver, CUDA 13 and cuDNN 9 "
                      "libraries on the library path; onnxruntime logged the details above)")
    return session, None


def create_encoder(graphs: dict[str, Path] | str | os.PathLike, device: str | Device = "auto",
                   threads: int | None = None, precision: str = "fp32") -> Encoder:
    """A session on the device kind --device asks for, running the graph of that kind.

    graphs maps device kinds ("cpu", "cuda") to graph files (a cache entry's Artifact.graphs); one path
    serves every kind. `auto` tries the kinds in the device table's order and falls back to the next only
    while one is left; asking for a kind and not getting it raises DeviceError, never a silent CPU run.
    """
    asked = device.strip() if isinstance(device, str) else str(device)  # as the user wrote it, for messages
    device = Device.parse(device)
    if isinstance(graphs, (str, os.PathLike)):
        graphs = dict.fromkeys(DEVICE_KINDS, Path(graphs))
    tried = [kind for kind in candidates(device, precision) if kind.name in graphs]
    if not tried:
        raise DeviceError(f"no graph for {device}: the entry has graphs for {', '.join(graphs)}")
    for kind in tried:
        session, reason = open_session(graphs[kind.name], kind, device.index, threads)
        if session is not None:
            name = kind.name if not kind.indexed else f"{kind.name}:{device.index}"
            logger.info("running on %s", name)
            names = tuple(i.name for i in session.get_inputs())
            dim = int(session.get_outputs()[0].shape[1])
            return Encoder(session, names, kind, name, dim, graphs[kind.name])
        if kind is not tried[-1]:
            logger.info("device auto: %s unavailable, trying the next kind (%s)", kind.label, reason)
    why = f"--device {asked}" if device.kind != "auto" else f"--precision {precision} needs {tried[-1].label}"
    raise DeviceError(f"{why}: {reason}")
