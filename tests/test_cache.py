"""embedder.build.cache: content-addressed, verified, locked graph cache.

Tests that corrupt an entry first copy it out of the session cache, so other tests keep theirs.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from models import (
    REPO_ROOT,
    TEXTS,
    assert_vectors_match,
    fake_hub_snapshot,
    module_command,
    onnx_vectors,
    run_python,
    write_spec_folder,
)

import embedder.build.cache as cache_module
from embedder import ExportOptions, Pooling, get_or_export, load_spec
from embedder.build.cache import model_key
from embedder.build.export import MAX_ABS_DIFF, MIN_COSINE
from embedder.errors import ExportError, UsageError
from embedder.manifest import MANIFEST_FILE, Manifest
from embedder.model.spec import hash_files

# Prints, as JSON, the exit code and cache_hit of jobs.export on the given model and cache, and
# whether the process imported torch or transformers' modeling code on the way.
_EXPORT_AND_REPORT_IMPORTS = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from jobs.export import main
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["--model", sys.argv[1], "--cache-dir", sys.argv[2], "--log-level", "ERROR"])
    print(json.dumps({
        "code": code,
        "cache_hit": json.loads(out.getvalue())["cache_hit"] if code == 0 else None,
        "imported": sorted(m for m in ("torch", "transformers.modeling_utils", "sentence_transformers")
                           if m in sys.modules),
    }))
    """
)


def copy_entry(artifact, cache_dir):
    """Copy one cache entry (CACHE/<model key>/<exporter key>/) into another cache folder."""
    target = cache_dir / artifact.folder.parent.name / artifact.folder.name
    shutil.copytree(artifact.folder, target)
    return target


def assert_entry_valid(artifact) -> None:
    """Every file hashes as the manifest records."""
    for name, digest in artifact.manifest.files.items():
        assert hash_files([artifact.folder / name]) == digest, name


# ---------------------------------------------------------------------------------------------
# Keys and options (no export)


def test_model_key_changes_with_every_choice_that_shapes_the_graph(tmp_path):
    root = write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})
    spec = load_spec(str(root))
    base = model_key(spec, ExportOptions(), "content")
    assert model_key(load_spec(str(root)), ExportOptions(), "content") == base
    variants = [
        model_key(spec, ExportOptions(), "other content"),
        model_key(spec.with_pooling((Pooling.CLS,)), ExportOptions(), "content"),
        model_key(spec, ExportOptions(normalize=False), "content"),
        model_key(spec, ExportOptions(opset=18), "content"),
        model_key(spec, ExportOptions(precision="int8"), "content"),
    ]
    assert len({base, *variants}) == 1 + len(variants)


def test_a_new_int8_rewrite_retires_int8_entries_only(tmp_path, monkeypatch):
    from embedder.build import cache

    spec = load_spec(str(write_spec_folder(tmp_path / "m", pooling_config={"pooling_mode": "mean"})))
    before = {p: model_key(spec, ExportOptions(precision=p), "content") for p in ("fp32", "int8")}
    monkeypatch.setattr(cache, "INT8_FORMAT", cache.INT8_FORMAT + 1)
    after = {p: model_key(spec, ExportOptions(precision=p), "content") for p in ("fp32", "int8")}
    assert after["fp32"] == before["fp32"] and after["int8"] != before["int8"]


@pytest.mark.parametrize("options", [{"precision": "int4"}, {"opset": 13}, {"opset": 21}])
def test_export_options_reject_unsupported_values(options):
    with pytest.raises(UsageError):
        ExportOptions(**options)


# ---------------------------------------------------------------------------------------------
# Hits, manifest, corruption


@pytest.mark.slow
@pytest.mark.parametrize("family", ["distilbert", "default"])
def test_second_request_is_a_verified_hit(model_zoo, exported, export_cache_dir, family):
    first = exported(family)  # exported by this call or by an earlier test into the same session cache
    second = get_or_export(load_spec(model_zoo.model_arg(family)), ExportOptions(), export_cache_dir)
    assert second.hit
    assert second.folder == first.folder and second.manifest == first.manifest


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bert", "default"])
def test_manifest_records_validation_figures_and_file_hashes(model_zoo, exported, family):
    artifact = exported(family)
    manifest = json.loads((artifact.folder / MANIFEST_FILE).read_text())
    assert manifest == artifact.manifest.record
    assert artifact.manifest == Manifest.from_record(manifest)  # the typed view of the same file
    validation = manifest["validation"]
    assert 0 <= validation["max_abs_diff"] <= MAX_ABS_DIFF
    assert MIN_COSINE <= validation["min_cosine"] <= 1 + 1e-6
    assert validation["thresholds"] == {"max_abs_diff": MAX_ABS_DIFF, "min_cosine": MIN_COSINE}
    assert validation["batch_size"] == len(validation["lengths"]) >= 3
    assert sorted(manifest["files"]) == sorted({*manifest["graphs"].values(), "tokenizer.json"})
    assert "model.onnx" in manifest["files"]
    assert all(len(digest) == 64 for digest in manifest["files"].values())
    assert_entry_valid(artifact)
    spec = load_spec(model_zoo.model_arg(family))
    assert manifest["model_hash"] == spec.content_hash()
    assert manifest["key"] == model_key(spec, ExportOptions(), spec.content_hash())
    assert (manifest["dim"], manifest["max_seq_length"]) == (spec.dim, spec.max_seq_length)
    assert manifest["pooling"] == [p.value for p in spec.pooling]


CORRUPTIONS = {
    "truncated graph": lambda folder: (folder / "model.onnx").write_bytes(
        (folder / "model.onnx").read_bytes()[: (folder / "model.onnx").stat().st_size // 2]
    ),
    "missing tokenizer": lambda folder: (folder / "tokenizer.json").unlink(),
    "altered CUDA graph": lambda folder: (folder / "model.cuda.onnx").write_bytes(
        (folder / "model.cuda.onnx").read_bytes()[:-1] + b"\0"
    ),
    "garbage manifest": lambda folder: (folder / MANIFEST_FILE).write_text("{not json"),
}


@pytest.mark.slow
@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_detected_and_re_exported(model_zoo, exported, tmp_path, caplog, corrupt):
    original = exported("distilbert")
    cache_dir = tmp_path / "cache"
    corrupt(copy_entry(original, cache_dir))
    spec = load_spec(model_zoo.model_arg("distilbert"))
    with caplog.at_level(logging.WARNING, logger="embedder.build.cache"):
        repaired = get_or_export(spec, ExportOptions(), cache_dir)
    assert not repaired.hit
    assert any("re-exporting" in r.getMessage() for r in caplog.records)
    assert repaired.folder == cache_dir / original.folder.parent.name / original.folder.name
    assert_entry_valid(repaired)
    assert_vectors_match(onnx_vectors(repaired, TEXTS), onnx_vectors(original, TEXTS))
    assert get_or_export(spec, ExportOptions(), cache_dir).hit


@pytest.mark.slow
def test_hub_id_and_local_folder_of_the_same_model_share_one_entry(model_zoo, exported, export_cache_dir,
                                                                   tmp_path, monkeypatch):
    local = exported("bert")
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    fake_hub_snapshot(hub, "acme/tiny-bert", model_zoo.path("bert"), "e" * 40)
    artifact = get_or_export(load_spec("acme/tiny-bert"), ExportOptions(), export_cache_dir)
    assert artifact.hit and artifact.folder == local.folder


@pytest.mark.slow
def test_host_without_torch_uses_a_verified_entry_and_never_exports(model_zoo, exported, export_cache_dir,
                                                                   tmp_path, monkeypatch):
    built_with_torch = exported("distilbert")
    no_torch = {"torch": None, "transformers": None, "onnx": "1"}
    monkeypatch.setattr(cache_module, "exporter_versions", lambda: no_torch)
    spec = load_spec(model_zoo.model_arg("distilbert"))
    artifact = get_or_export(spec, ExportOptions(), export_cache_dir)
    assert artifact.hit and artifact.folder == built_with_torch.folder
    with pytest.raises(ExportError, match="exporting needs torch and transformers"):
        get_or_export(spec, ExportOptions(), tmp_path / "empty-cache")


# ---------------------------------------------------------------------------------------------
# Processes


@pytest.mark.slow
def test_warm_cache_hit_does_not_import_torch(model_zoo, exported, export_cache_dir):
    exported("bert")
    result = run_python(_EXPORT_AND_REPORT_IMPORTS, model_zoo.path("bert"), export_cache_dir)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "cache_hit": True, "imported": []}


@pytest.mark.slow
def test_two_processes_on_a_cold_cache_export_exactly_once(model_zoo, tmp_path):
    cache_dir = tmp_path / "cold-cache"
    command = module_command("jobs.export", "--model", model_zoo.path("roberta"), "--cache-dir", cache_dir)
    processes = [
        subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=180) for p in processes]
    for process, (_, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    manifests = [json.loads(out) for out, _ in outputs]
    assert sorted(m["cache_hit"] for m in manifests) == [False, True]
    assert sum(err.count("cache miss") for _, err in outputs) == 1
    assert manifests[0]["folder"] == manifests[1]["folder"]
    entries = [p.name for p in (cache_dir / manifests[0]["key"][:32]).iterdir()]
    assert entries == [Path(manifests[0]["folder"]).name], "a staging folder was left behind"
