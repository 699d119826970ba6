"""Session fixtures shared by the test modules.

Models are built lazily, once per session, by `model_zoo`; graphs are exported lazily, once per
session and per (family, pooling), into `export_cache_dir` by `exported`. A test that only needs
one family never pays for the others. Builders and helpers live in tests/models.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from models import BUILDERS

from embedder import Artifact, ExportOptions, Pooling, get_or_export, load_spec
from embedder.model.spec import default_model_path


class ModelZoo:
    """Tiny models built on first use into one session folder; "default" is the shipped model."""

    def __init__(self, root: Path):
        self.root = root
        self._paths: dict[str, Path] = {}

    def path(self, family: str) -> Path:
        """The model folder of a family, building it on first use."""
        if family != "default" and family not in BUILDERS:
            raise KeyError(f"unknown model family {family!r}; known: default, {', '.join(BUILDERS)}")
        if family not in self._paths:
            self._paths[family] = default_model_path() if family == "default" else BUILDERS[family](self.root)
        return self._paths[family]

    def model_arg(self, family: str) -> str | None:
        """What load_spec and --model take for this family (None selects the shipped default)."""
        return None if family == "default" else str(self.path(family))


@pytest.fixture(scope="session", autouse=True)
def offline_test_environment(tmp_path_factory):
    """No network, no writes to the user's caches: every subprocess inherits these too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        patch.setenv("TOKENIZERS_PARALLELISM", "false")
        patch.setenv("HF_HUB_CACHE", str(tmp_path_factory.mktemp("empty-hf-cache")))
        patch.setenv("EMBEDDER_CACHE", str(tmp_path_factory.mktemp("default-embedder-cache")))
        yield


@pytest.fixture(scope="session")
def model_zoo(tmp_path_factory) -> ModelZoo:
    """Lazily built tiny models (see tests/models.py BUILDERS) plus the shipped default."""
    return ModelZoo(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def export_cache_dir(tmp_path_factory) -> Path:
    """The graph cache shared by the whole session (tests that corrupt entries copy it first).

    $EMBEDDER_TEST_EXPORT_CACHE names a folder kept between sessions instead: scripts/gpu_check.py sets
    it so that its rerun on the same GPU machine skips the exports.
    """
    kept = os.environ.get("EMBEDDER_TEST_EXPORT_CACHE")
    if kept:
        Path(kept).mkdir(parents=True, exist_ok=True)
        return Path(kept)
    return tmp_path_factory.mktemp("export-cache")


@pytest.fixture(scope="session")
def exported(model_zoo, export_cache_dir):
    """exported(family, pooling=None, precision="fp32") -> Artifact: the family's graph, exported once per session."""
    artifacts: dict[tuple, Artifact] = {}

    def export(family: str, pooling: tuple[Pooling, ...] | None = None, precision: str = "fp32") -> Artifact:
        key = (family, pooling, precision)
        if key not in artifacts:
            spec = load_spec(model_zoo.model_arg(family), pooling)
            artifacts[key] = get_or_export(spec, ExportOptions(precision=precision), export_cache_dir)
        return artifacts[key]

    return export
