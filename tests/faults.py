"""Arm a kill -9 at a named point (embedder.hooks) in the processes a test starts."""

from __future__ import annotations

import json
import os
from pathlib import Path

FAULT_SITE = Path(__file__).resolve().parent / "fault_site"


def fault_env(spec_file: Path, **spec) -> dict[str, str]:
    """Environment for a subprocess (or Ray's workers) whose hook reads spec_file; writes spec there if given."""
    if spec:
        spec_file.write_text(json.dumps(spec))
    path = os.pathsep.join(p for p in (str(FAULT_SITE), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "EMBEDDER_TEST_FAULT_FILE": str(spec_file)}
