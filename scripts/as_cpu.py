"""Run a command as if on another kind of x86-64 CPU: onnxruntime takes that kind's kernels (its int8
products included, with their numerics) and embedder.build.isa reports that kind.

    python scripts/as_cpu.py avx2 -- python scripts/bench.py --rows 3000 --peer-backends ""
    python scripts/as_cpu.py avx512-vnni -- python scripts/bench_int8.py --rows 1000 --variants smooth

Kinds: `avx2` (AVX2 + FMA, no AVX-512, VNNI or AMX: Zen 3, Haswell to Ice Lake client) and `avx512-vnni`
(AVX-512 VNNI without AMX: Zen 4/5, Cascade Lake and Ice Lake Xeons), each from a CPU that has more.

Where the CPU and kernel fault on cpuid (flag cpuid_fault: Intel since Ivy Bridge, KVM guests of those),
scripts/cpu_mask.c is built with gcc and preloaded. It runs at native speed, so timings count, with a
caveat: they are this CPU's cores running the other kind's instructions, not that CPU. Elsewhere, for avx2
only, qemu-user emulates a Haswell (apt install qemu-user): the same numerics, about 700x slower, so timings
mean nothing there.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

KINDS = ("avx2", "avx512-vnni")
SOURCE = Path(__file__).with_name("cpu_mask.c")


def cpuid_faulting() -> bool:
    try:
        return "cpuid_fault" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def mask_library() -> Path:
    """cpu_mask.c built once per version of its source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    built = Path(tempfile.gettempdir()) / f"embedder-cpu-mask-{digest}.so"
    if not built.exists():
        partial = built.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(partial), str(SOURCE)], check=True)
        partial.replace(built)
    return built


def command(kind: str, argv: list[str]) -> tuple[list[str], dict[str, str], bool]:
    """(argv, environment, native speed) that run argv as on a `kind` CPU."""
    if kind not in KINDS:
        raise SystemExit(f"as_cpu: unknown kind {kind!r} (one of {', '.join(KINDS)})")
    env = dict(os.environ)
    if cpuid_faulting() and shutil.which("gcc"):
        env["CPU_MASK"] = kind
        env["LD_PRELOAD"] = " ".join(filter(None, [str(mask_library()), env.get("LD_PRELOAD")]))
        return argv, env, True
    qemu = shutil.which("qemu-x86_64")
    if kind == "avx2" and qemu:
        return [qemu, "-cpu", "Haswell", *argv], env, False
    raise SystemExit(f"as_cpu: this machine can run nothing as {kind}: its CPU has no cpuid faulting (or gcc is "
                     "missing)" + (", and qemu-user (apt install qemu-user) emulates avx2 only" if kind == "avx2" else ""))


def main() -> int:
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        sys.exit(__doc__)
    argv, env, native = command(sys.argv[1], sys.argv[3:])
    if not native:
        print("as_cpu: no cpuid faulting here; emulating with qemu-user: numerics exact, timings meaningless",
              file=sys.stderr)
    return subprocess.run(argv, env=env, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
