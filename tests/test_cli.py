"""Command-line plumbing shared by the jobs: what reaches the log."""

from __future__ import annotations

import logging

import pytest

from jobs._cli import _quiet_onnxruntime_tools


def _record(pathname: str, level: int) -> logging.LogRecord:
    return logging.LogRecord("onnx_model", level, pathname, 1, "Removed 273 nodes", None, None)


@pytest.mark.parametrize(("pathname", "level", "kept"), [
    ("/venv/site-packages/onnxruntime/transformers/onnx_model.py", logging.INFO, False),
    ("/venv/site-packages/onnxruntime/quantization/quantize.py", logging.WARNING, False),
    ("/venv/site-packages/onnxruntime/quantization/quantize.py", logging.ERROR, True),
    ("/work/embedder/export.py", logging.INFO, True),
    ("/venv/site-packages/onnxruntime/capi/onnxruntime_inference_collection.py", logging.WARNING, True),
])
def test_onnxruntime_offline_tools_are_quiet_below_error(pathname, level, kept):
    assert _quiet_onnxruntime_tools(_record(pathname, level)) is kept
