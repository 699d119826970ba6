"""scripts/as_cpu.py: a command run as another CPU kind gets that kind's onnxruntime kernels and ISA report."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import as_cpu

pytestmark = pytest.mark.skipif(not (as_cpu.cpuid_faulting() and shutil.which("gcc")),
                                reason="this CPU has no cpuid faulting (or gcc is missing)")

# u8 255 x s8 127 over K = 64: AVX2's vpmaddubsw saturates each pair sum at 32767 (32 pairs), VNNI does not.
PROBE = """
import numpy as np, onnxruntime as ort
from onnx import TensorProto, helper
from embedder.build.isa import cpu_flags, isa_kind
k = 64
graph = helper.make_graph(
    [helper.make_node("MatMulInteger", ["a", "w"], ["y"])], "probe",
    [helper.make_tensor_value_info("a", TensorProto.UINT8, [1, k])],
    [helper.make_tensor_value_info("y", TensorProto.INT32, [1, 1])],
    [helper.make_tensor("w", TensorProto.INT8, [k, 1], np.full(k, 127, np.int8).tobytes(), raw=True)])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=10)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
product = session.run(None, {"a": np.full((1, k), 255, np.uint8)})[0].item()
print(isa_kind(), ",".join(cpu_flags()), product)
"""


def run_as(kind: str, code: str) -> subprocess.CompletedProcess:
    argv, env, native = as_cpu.command(kind, [sys.executable, "-c", code])
    assert native
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, check=False)


def test_avx2_gets_the_saturating_kernels_and_reports_avx2():
    kind, flags, product = run_as("avx2", PROBE).stdout.split()
    assert (kind, flags) == ("avx2", "avx2")
    assert int(product) == 32 * 32767  # exact would be 255 * 127 * 64 = 2,072,640


def test_avx512_vnni_keeps_vnni_and_drops_amx():
    if "avx512_vnni" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("this CPU has no AVX-512 VNNI to keep")
    kind, flags, product = run_as("avx512-vnni", PROBE).stdout.split()
    assert kind == "avx512-vnni" and "amx_int8" not in flags and "avx512_vnni" in flags
    assert int(product) == 255 * 127 * 64


def test_a_real_fault_still_crashes():
    done = run_as("avx2", "import ctypes; ctypes.string_at(0)")
    assert done.returncode == -11  # SIGSEGV, not a hang in the handler


def test_unknown_kind_is_refused():
    with pytest.raises(SystemExit, match="unknown kind"):
        as_cpu.command("avx9", ["true"])
