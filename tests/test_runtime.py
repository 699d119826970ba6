"""Which device kind a run tries, from --device and the kinds a precision's graphs exist for."""

from __future__ import annotations

import pytest

from embedder.config import PRECISIONS, ExportOptions, JobConfig
from embedder.errors import UsageError
from embedder.runtime import resolve_kind

CASES = [
    # (precision, --device, kind tried)
    ("fp32", "auto", "auto"),
    ("fp32", "cpu", "cpu"),
    ("fp32", "cuda:1", "cuda"),
    ("int8", "auto", "cpu"),  # nothing for CUDA: auto is the CPU
    ("int8", "cpu", "cpu"),
    ("fp16", "auto", "cuda"),  # nothing for the CPU: auto must get CUDA or fail
    ("fp16", "cuda", "cuda"),
]


@pytest.mark.parametrize(("precision", "device", "kind"), CASES)
def test_device_kind_follows_the_precisions_graphs(precision, device, kind):
    assert resolve_kind(PRECISIONS[precision], device, precision) == kind


@pytest.mark.parametrize(("precision", "device", "message"), [
    ("int8", "cuda", "int8 runs on the CPU provider only"),
    ("fp16", "cpu", "fp16 runs on CUDA only"),
    ("fp32", "gpu", "is not one of"),
])
def test_a_device_the_precision_cannot_use_is_refused_when_the_job_is_configured(tmp_path, precision, device,
                                                                                  message):
    with pytest.raises(UsageError, match=message):
        JobConfig(inputs="in.parquet", output=tmp_path / "out.parquet", device=device,
                  export=ExportOptions(precision=precision))
