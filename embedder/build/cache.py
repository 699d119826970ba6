"""Content-addressed cache of exported graphs: key, lock, atomic install, verified manifest.

Layout: CACHE/<model key>/<exporter key>/{model.onnx, [model.cuda.onnx,] tokenizer.json, manifest.json};
the manifest's `graphs` names the graph file for each device kind (cpu, cuda).
The model key hashes the model's files and every option that shapes the graph; the exporter key
hashes the torch, transformers and onnx versions that wrote it. A host without torch (inference
only) cannot know which exporter a build host used, so it takes the newest verified entry under
the model key.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from embedder.build.int8_graph import INT8_FORMAT, recipe_for
from embedder.build.isa import isa_kind, note_int8_host
from embedder.config import ExportOptions
from embedder.errors import ExportError
from embedder.manifest import MANIFEST_FILE, TOKENIZER_FILE, Artifact, Manifest
from embedder.model.spec import ModelSpec, hash_files

logger = logging.getLogger(__name__)

# Bump when the exporter's output changes for the same inputs (wrapper, names, post-processing).
EXPORT_FORMAT = 4  # 4: the CPU graph folds attention key Transposes (cpu_graph.py)


def _sha256(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _installed_version(package: str) -> str | None:
    # Read from package metadata: importing torch just to learn its version costs seconds.
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def exporter_versions() -> dict[str, str | None]:
    return {name: _installed_version(name) for name in ("torch", "transformers", "onnx")}


def model_key(spec: ModelSpec, options: ExportOptions, content_hash: str) -> str:
    """Hash of the model's content and every choice that shapes its graph."""
    return _sha256(
        {
            "format": EXPORT_FORMAT,
            "model": content_hash,
            "pooling": [p.value for p in spec.pooling],
            "dense": [[d.path.name, d.in_features, d.out_features, d.bias, d.activation] for d in spec.dense],
            "normalize": options.normalize,
            "max_seq_length": spec.max_seq_length,
            "do_lower_case": spec.do_lower_case,
            "precision": options.precision,
            "opset": options.opset,
            # Only int8 keys change with its rewrite: fp32 and fp16 entries stay valid. The recipe follows the
            # CPU kind: a graph smoothed for VNNI saturates AVX2's int8 products, so each kind has its own entry.
            **({"int8_format": INT8_FORMAT, "int8_recipe": recipe_for(isa_kind()).name}
               if options.precision == "int8" else {}),
        }
    )


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock across processes; released by the OS if the holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _verify(folder: Path) -> Manifest | None:
    """The manifest if the folder is complete and its files hash as recorded; else None."""
    try:
        manifest = Manifest.from_record(json.loads((folder / MANIFEST_FILE).read_text()))
        for name, digest in manifest.files.items():
            if hash_files([folder / name]) != digest:
                logger.warning("cached %s in %s does not match its manifest hash; re-exporting", name, folder)
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.warning("cache entry %s is incomplete or corrupt (%s); re-exporting", folder, e)
        return None


def _candidates(model_dir: Path, exporter: str | None) -> list[Path]:
    if exporter is not None:
        return [model_dir / exporter]
    entries = [p for p in model_dir.glob("*") if p.is_dir() and not p.name.startswith(".")]
    return sorted(entries, key=lambda p: p.stat().st_mtime, reverse=True)


def get_or_export(spec: ModelSpec, options: ExportOptions, cache_dir: Path) -> Artifact:
    """A verified graph for this model and options, exported under a lock on a miss."""
    content_hash = spec.content_hash()
    key = model_key(spec, options, content_hash)
    versions = exporter_versions()
    can_export = versions["torch"] is not None and versions["transformers"] is not None
    exporter = _sha256(versions)[:16] if can_export else None
    model_dir = cache_dir / key[:32]
    try:
        with _locked(cache_dir / f"{key[:32]}.lock"):
            for folder in _candidates(model_dir, exporter):
                if folder.is_dir():
                    manifest = _verify(folder)
                    if manifest is not None:
                        logger.info("cache hit: %s", folder)
                        note_int8_host(manifest.record.get("quantization"))
                        return Artifact(folder, manifest, hit=True)
                    shutil.rmtree(folder, ignore_errors=True)
            if exporter is None:
                raise ExportError(
                    f"no cached graph for {spec.name} in {cache_dir}, and exporting needs torch and transformers: "
                    "install them, or run 'python -m jobs.export' where they are and share the cache folder"
                )
            logger.info("cache miss: exporting %s to %s", spec.name, model_dir / exporter)
            return _install(spec, options, model_dir, exporter, key, content_hash, versions)
    except OSError as e:
        raise ExportError(f"cache folder {cache_dir} is not usable: {e}") from e


def _install(spec, options, model_dir: Path, exporter: str, key: str, content_hash: str, versions) -> Artifact:
    from embedder.build.export import export_graph  # torch lives behind this import

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=model_dir))
    try:
        fields = export_graph(spec, options, staging)
        manifest = {
            "key": key,
            "model": spec.name,
            "model_path": str(spec.root),
            "model_hash": content_hash,
            "model_type": spec.model_type,
            "pooling": [p.value for p in spec.pooling],
            "dense": [{"in": d.in_features, "out": d.out_features, "activation": d.activation} for d in spec.dense],
            "normalize": options.normalize,
            "dim": spec.dim,
            "max_seq_length": spec.max_seq_length,
            "do_lower_case": spec.do_lower_case,
            "include_prompt": spec.include_prompt,
            "prompts": spec.prompts,
            "default_prompt_name": spec.default_prompt_name,
            "precision": options.precision,
            "opset": options.opset,
            "export_format": EXPORT_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **fields,
            "exporter": {**versions, **fields["exporter"]},
            "files": {name: hash_files([staging / name]) for name in sorted({*fields["graphs"].values(), TOKENIZER_FILE})},
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        final = model_dir / exporter
        os.replace(staging, final)  # atomic: readers see no folder or a complete one
        return Artifact(final, Manifest.from_record(manifest), hit=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
