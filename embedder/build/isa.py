"""The CPU's vector extensions that decide int8 speed, and the log lines of an int8 graph on another CPU.

onnxruntime's int8 matrix products take a different kernel per ISA: AVX-512 VNNI (and AVX-VNNI)
multiply-add u8 x s8 into int32 in one instruction (on AMX CPUs, Sapphire Rapids on, the tile unit does);
plain AVX2 (and AVX-512 without VNNI) chains vpmaddubsw, whose int16 pair sums can saturate. The int8 export
records the ISA it was gated and timed on; a job elsewhere logs that the figures are not from its CPU kind
(or that AMX, which the exporting CPU had or lacked, made its ratio higher or lower). Imported on the
inference path: reads /proc/cpuinfo, nothing heavy.
"""

from __future__ import annotations

import logging
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
# Below this int8/fp32 ratio on the exporting CPU, the job says fp32 is as fast there.
FASTER_RATIO = 1.1


def cpu_flags() -> tuple[str, ...]:
    """The flags of _FLAGS this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return tuple(f for f in _FLAGS if f in flags)


def isa_kind(flags: tuple[str, ...] | None = None) -> str:
    """The int8 kernel family onnxruntime takes here: 'avx512-vnni', 'avx-vnni', 'avx512', 'avx2' or 'other'."""
    flags = cpu_flags() if flags is None else flags
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512f" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def describe() -> dict:
    """What the manifest and the benchmarks record about the CPU."""
    name = platform.processor() or "unknown"
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"kind": isa_kind(), "flags": list(cpu_flags()), "cpu": name, "machine": platform.machine()}


def note_int8_host(quantization: dict | None) -> None:
    """Log what the int8 graph's export measured, where this CPU is not the kind it was tuned on or fp32 was as fast."""
    speed = (quantization or {}).get("speed")
    if not speed:
        return
    flags = cpu_flags()
    here, there, ratio = isa_kind(flags), speed.get("isa", {}).get("kind"), speed.get("ratio")
    # AMX shares the VNNI recipe (same kind) but not its speed: onnxruntime sends u8 x s8 products to the tiles.
    amx_there, amx_here = "amx_int8" in speed.get("isa", {}).get("flags", ()), "amx_int8" in flags
    if there == here and amx_there != amx_here:
        logger.info("int8 graph timed at %.2fx fp32 on a %s CPU %s AMX, running on one %s: the same recipe and "
                    "gate, but expect a %s ratio here", ratio or 0, there, "with" if amx_there else "without",
                    "without" if amx_there else "with", "lower" if amx_there else "higher")
    if there != here:
        logger.warning("int8 graph tuned and timed on a %s CPU, running on a %s one: it runs here (the same "
                       "operators), but its gate and its %.2fx over fp32 were measured with that CPU's int8 kernels, "
                       "not this one's; export into a fresh --cache-dir here to measure them", there, here, ratio or 0)
    elif ratio is not None and ratio < FASTER_RATIO:
        logger.warning("int8 ran at %.2fx fp32 when it was exported on this CPU kind (%s): fp32 is as fast here, "
                       "use --precision fp32", ratio, here)
