"""The device table: one row per kind of execution device, and everything the code needs to know about it.

Adding an execution provider is one row in DEVICE_KINDS (plus, if it runs a graph of its own, that graph
in the build). The rows are in `--device auto` order: auto takes the first kind that runs the precision
and really loads, and the CPU, last, is the fallback. --device parses once, into a Device.
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from embedder.errors import UsageError

logger = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"


def cuda_device_count() -> int | str:
    """How many CUDA devices the NVIDIA driver shows, or why it shows none (asked before onnxruntime logs errors)."""
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


def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the nvidia-* pip wheels (onnxruntime-gpu[cuda,cudnn]) when installed."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as e:  # a system CUDA install may still serve; the session check decides
            logger.debug("onnxruntime.preload_dlls: %s", e)


def cuda_options(index: int) -> dict:
    return {
        "device_id": index,
        # kSameAsRequested keeps the arena from doubling on every new batch shape.
        "arena_extend_strategy": "kSameAsRequested",
        # onnxruntime's CUDA provider runs fp32 matrix products in TF32 unless told not to; torch does not
        # (torch.backends.cuda.matmul.allow_tf32 is off by default), so fp32 keeps full precision to give
        # sentence-transformers' vectors. fp16 graphs do not use TF32 either way.
        "use_tf32": 0,
    }


@dataclass(frozen=True)
class DeviceKind:
    """One kind of execution device: how to open a session there and how the job treats it."""

    name: str  # what --device names; also the key of the graph a cache entry holds for it
    label: str  # for messages
    provider: str  # onnxruntime execution provider
    precisions: tuple[str, ...]  # graph precisions that run here
    default_max_tokens: int  # padded tokens per batch when --max-tokens is not given
    warm_up: bool  # run one batch of the largest shape before the first row
    indexed: bool = False  # takes a device index: NAME:N
    problem: Callable[[int], str | None] = field(default=lambda index: None)  # why it cannot run here, if known
    options: Callable[[int], dict] = field(default=lambda index: {})  # provider options for device index
    prepare: Callable[[], None] = field(default=lambda: None)  # before the first session (load libraries)


DEVICE_KINDS: dict[str, DeviceKind] = {
    "cuda": DeviceKind(
        "cuda", "CUDA", CUDA, precisions=("fp32", "fp16"),
        # A GPU wants large batches to fill its cores. On an H200 (README Speed) fp32 ran 357,000 tokens/s at
        # 16384 against 328,000 at 65536 (MiniLM) and 131,600 against 129,700 (BERT-base shape).
        default_max_tokens=16384,
        # The first run loads kernels and grows the memory arena: once, at the peak shape, before the timed batches.
        warm_up=True, indexed=True, problem=cuda_problem, options=cuda_options, prepare=preload_cuda_libraries,
    ),
    "cpu": DeviceKind(
        "cpu", "the CPU provider", CPU, precisions=("fp32", "int8"),
        # 512 to 1024 tokens form a plateau (within 2.2%) at 1.36-1.39x the rate of 16384 and ahead of 2048:
        # the batch's activations stay in cache and pad less (scripts/bench_batching.py, docstring rows).
        # 1024 is the larger batch on the plateau, for fewer calls and bigger products on wider models.
        default_max_tokens=1024, warm_up=False,
    ),
}

_DEVICE = re.compile(r"^([a-z]+)(?::(\d+))?$")


@dataclass(frozen=True)
class Device:
    """A parsed --device: 'auto', or a kind of DEVICE_KINDS with an index (cuda:1)."""

    kind: str
    index: int = 0

    @classmethod
    def parse(cls, text: str | Device) -> Device:
        if isinstance(text, Device):
            return text
        match = _DEVICE.match(text.strip().lower())
        kind = match.group(1) if match else None
        indexed = match is not None and match.group(2) is not None
        if kind != "auto" and (kind not in DEVICE_KINDS or (indexed and not DEVICE_KINDS[kind].indexed)):
            valid = ", ".join(["auto", *(f"{k}, {k}:N" if r.indexed else k for k, r in DEVICE_KINDS.items())])
            raise UsageError(f"device '{text}' is not one of: {valid}")
        if kind == "auto" and indexed:
            raise UsageError(f"device '{text}': auto takes no index")
        return cls(kind, int(match.group(2) or 0))

    def __str__(self) -> str:
        return self.kind if self.kind in ("auto", "cpu") and not self.index else f"{self.kind}:{self.index}"


def kinds_for(precision: str) -> tuple[DeviceKind, ...]:
    """The device kinds a precision's graphs run on, in --device auto order."""
    return tuple(kind for kind in DEVICE_KINDS.values() if precision in kind.precisions)


def _advice(kind: DeviceKind, allowed: tuple[DeviceKind, ...]) -> str:
    return f"use --device {allowed[0].name}, or another precision on {kind.label}"


def candidates(device: str | Device, precision: str,
               advice: Callable[[DeviceKind, tuple[DeviceKind, ...]], str] = _advice) -> tuple[DeviceKind, ...]:
    """The kinds to try for --device, in order; failing to get the last one is an error, never a silent fallback.

    An explicit kind the precision cannot run on is a UsageError, finished by advice(kind, allowed kinds).
    """
    device = Device.parse(device)
    allowed = kinds_for(precision)
    if device.kind == "auto":
        return allowed
    kind = DEVICE_KINDS[device.kind]
    if kind not in allowed:
        where = " and ".join(k.label for k in allowed)
        raise UsageError(f"--precision {precision} runs on {where} only; {advice(kind, allowed)}")
    return (kind,)
