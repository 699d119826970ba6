"""onnxruntime session on the requested device, checked after creation."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from embedder.errors import DeviceError, UsageError

logger = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
_DEVICE = re.compile(r"^(auto|cpu|cuda)(?::(\d+))?$")


def parse_device(device: str) -> tuple[str, int]:
    """'auto', 'cpu', 'cuda' or 'cuda:N' -> (kind, index)."""
    match = _DEVICE.match(device.strip().lower())
    if not match or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UsageError(f"device '{device}' is not one of: auto, cpu, cuda, cuda:N")
    return match.group(1), int(match.group(2) or 0)


@dataclass
class Encoder:
    """A session that maps padded token arrays to sentence vectors."""

    session: object
    input_names: tuple[str, ...]
    provider: str
    device: str
    dim: int
    graph: Path  # the file the session runs (an entry has one per device kind)

    def __call__(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # Plain session.run, also on CUDA: what crosses to the device per batch is two int64 id arrays
        # and what comes back is batch x dim floats, small next to the encoder's work. IO binding waits
        # until scripts/bench_gpu.py shows those copies matter.
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self.input_names:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run(["sentence_embedding"], feeds)[0]

    def warm_up(self, rows: int, length: int) -> None:
        """Run one batch of the largest shape the job will feed, before the first real one.

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


def _cuda_provider(index: int) -> tuple[str, dict]:
    options = {
        "device_id": index,
        # kSameAsRequested keeps the arena from doubling on every new batch shape.
        "arena_extend_strategy": "kSameAsRequested",
        # onnxruntime's CUDA provider runs fp32 matrix products in TF32 unless told not to; torch does not
        # (torch.backends.cuda.matmul.allow_tf32 is off by default), so fp32 keeps full precision to give
        # sentence-transformers' vectors. fp16 graphs do not use TF32 either way.
        "use_tf32": 0,
    }
    return (CUDA, options)


def cuda_device_count() -> int | str:
    """How many CUDA devices the NVIDIA driver shows, or why it shows none (asked before onnxruntime logs errors)."""
    import ctypes

    try:
        driver = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return "no NVIDIA driver on this machine (libcuda.so.1 not found)"
    count = ctypes.c_int(0)
    status = driver.cuInit(0)
    if status == 0:
        status = driver.cuDeviceGetCount(ctypes.byref(count))
    if status != 0:
        return f"the NVIDIA driver could not start CUDA (CUresult {status})"
    if count.value == 0:
        return "the NVIDIA driver shows no CUDA device (check CUDA_VISIBLE_DEVICES)"
    return count.value


def cuda_problem(index: int = 0) -> str | None:
    """Why onnxruntime's CUDA provider cannot run on device `index` here, or None if it may (the session decides)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if CUDA not in available:
        return f"this onnxruntime build has no CUDA provider (it has: {', '.join(available)}); install onnxruntime-gpu"
    count = cuda_device_count()
    if isinstance(count, str):
        return count
    if index >= count:
        shown = ", ".join(f"cuda:{i}" for i in range(count))
        return f"this machine has {count} CUDA device{'s' if count > 1 else ''} ({shown})"
    return None


def preload_cuda_libraries(ort) -> None:
    """Load CUDA and cuDNN from the nvidia-* pip wheels (onnxruntime-gpu[cuda,cudnn]) when installed."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # a system CUDA install may still serve; the session check decides
            logger.debug("onnxruntime.preload_dlls: %s", e)


_ADVICE = {"cpu": "use --device cpu, or another precision on CUDA", "cuda": "use --device cuda, or fp32 on the CPU"}


def resolve_kind(kinds, device: str, precision: str, advice: dict[str, str] = _ADVICE) -> str:
    """What to try for --device (cpu, cuda or auto) when graphs exist only for these device kinds.

    advice["cpu"] and advice["cuda"] finish the error for a precision that runs only there.
    """
    kind, _ = parse_device(device)
    if "cuda" not in kinds:
        if kind == "cuda":
            raise UsageError(f"--precision {precision} runs on the CPU provider only; {advice['cpu']}")
        return "cpu"  # auto: this graph has nothing for CUDA
    if "cpu" not in kinds:
        if kind == "cpu":
            raise UsageError(f"--precision {precision} runs on CUDA only; {advice['cuda']}")
        return "cuda"  # auto: failing to get CUDA is now an error, not a silent CPU run
    return kind


def create_encoder(graphs: dict[str, Path] | str | os.PathLike, device: str = "auto", threads: int | None = None,
                   precision: str = "fp32") -> Encoder:
    """A session on CUDA or CPU for the graph of that kind; asking for CUDA and not getting it raises DeviceError.

    graphs maps "cpu" and/or "cuda" to a graph file (a cache entry's Artifact.graphs); one path serves both.
    """
    import onnxruntime as ort

    if isinstance(graphs, (str, os.PathLike)):
        graphs = {"cpu": Path(graphs), "cuda": Path(graphs)}
    asked, index = parse_device(device)
    kind = resolve_kind(graphs, device, precision)
    if kind in ("cuda", "auto"):
        reason = cuda_problem(index)
        if reason is None:
            preload_cuda_libraries(ort)
            try:
                session = _session(ort, graphs["cuda"], [_cuda_provider(index), CPU], threads)
            except Exception as e:  # onnxruntime raises its own RuntimeError subclasses (e.g. a CUDA failure)
                session, reason = None, f"onnxruntime could not create a CUDA session: {_first_line(e)}"
            if session is not None and session.get_providers()[0] == CUDA:
                logger.info("running on CUDA device %d", index)
                return _encoder(session, CUDA, f"cuda:{index}", graphs["cuda"])
            reason = reason or (
                "onnxruntime's CUDA provider did not load (it needs an NVIDIA driver, CUDA 13 and cuDNN 9 "
                "libraries on the library path; onnxruntime logged the details above)"
            )
        if kind == "cuda":
            why = f"--device {device}" if asked == "cuda" else f"--precision {precision} needs CUDA"
            raise DeviceError(f"{why}: {reason}")
        logger.info("device auto: CUDA unavailable, running on CPU (%s)", reason)
    session = _session(ort, graphs["cpu"], [CPU], threads)
    return _encoder(session, CPU, "cpu", graphs["cpu"])


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _encoder(session, provider: str, device: str, graph: Path) -> Encoder:
    names = tuple(i.name for i in session.get_inputs())
    dim = session.get_outputs()[0].shape[1]
    return Encoder(session, names, provider, device, int(dim), graph)
