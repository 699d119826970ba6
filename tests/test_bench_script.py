"""scripts/bench.py from the project's own install: fp32 and int8 in one run, with the CPU's ISA (issue 16)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_reports_int8_against_fp32_with_the_isa(model_zoo, tmp_path):
    from embedder.build.isa import isa_kind

    out = tmp_path / "bench"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--rows", "40", "--repeats", "2",
                          "--threads", "1", "--peer-backends", "", "--model", model_zoo.model_arg("bert"),
                          "--out-dir", str(out)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["machine"]["isa_kind"] == isa_kind()
    fp32, int8 = summary["results"]
    assert (fp32["engine"], int8["engine"]) == ("embedder", "embedder --precision int8")
    assert fp32["rows"] == int8["rows"] == summary["rows"] == 40
    assert fp32["tokens"] == int8["tokens"] > 0  # same rows, same tokens
    assert int8["ratio_to_fp32"] > 0 and len(int8["paired_ratios_to_fp32"]) == 2
    assert f"x fp32 tokens/s on {isa_kind()}" in run.stdout
    # The chart is optional: drawn where matplotlib is installed, else a note, never a failure.
    assert (out / "chart.png").is_file() or "chart skipped" in run.stderr
