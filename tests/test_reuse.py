"""Incremental runs (issue 15): --reuse PREV takes the vectors of unchanged texts from an earlier output, the
rest is embedded, and --id-col writes the ids added, changed and deleted. Real docstrings, tiny BERT model."""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from models import corpus_lines, cosines
from test_resume import killed_then_resumed, run_job

from embedder import embed_parquet
from embedder.errors import InputError, UsageError
from embedder.infer.keys import text_keys

pytestmark = pytest.mark.slow

LINES = corpus_lines()


def write(path, ids, texts, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, pa.int64()), "text": pa.array(texts, pa.string())}), path,
                   row_group_size=row_group_size)
    return path


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), -1)


@pytest.fixture(scope="module")
def common(model_zoo, export_cache_dir, exported):
    exported("bert")
    return dict(model=model_zoo.model_arg("bert"), cache_dir=export_cache_dir, device="cpu", pooling="mean",
                window_rows=70)


@pytest.fixture(scope="module")
def yesterday(tmp_path_factory, common):
    """300 rows of docstrings (some repeated, two nulls, one empty) and their output."""
    folder = tmp_path_factory.mktemp("yesterday")
    texts = LINES[:300]
    texts[7], texts[8], texts[9] = None, "", None
    source = write(folder / "in.parquet", list(range(300)), texts)
    embed_parquet(source, folder / "out.parquet", **common)
    return texts, folder / "out.parquet"


def today(texts: list) -> tuple[list[int], list]:
    """Yesterday's rows with 3 edited, 5 deleted, 4 new, and the rest in another order."""
    rows = [(i, t) for i, t in enumerate(texts) if i not in (20, 21, 22, 23, 24)]
    rows = [(i, t + " (edited)" if i in (3, 40, 41) and t else t) for i, t in rows]
    rows = rows[150:] + rows[:150]  # reordered
    rows += [(1000 + k, f"A new docstring number {k} about {LINES[400 + k]}") for k in range(4)]
    return [i for i, _ in rows], [t for _, t in rows]


def test_text_key_is_the_hash_of_the_text_and_on_by_default(yesterday):
    texts, out = yesterday
    table = pq.read_table(out)
    assert table.column_names == ["id", "text_key", "embedding"]
    assert table.schema.field("text_key").type == pa.binary(16)
    keys = table.column("text_key").to_pylist()
    assert keys[7] is None and keys[9] is None  # null text: no key
    want = text_keys([t for t in texts if t is not None])
    assert [k for k in keys if k is not None] == [bytes(row) for row in want]


@pytest.mark.parametrize("form", ["file", "folder", "glob"])
def test_reuse_takes_previous_vectors_and_equals_a_full_run(form, yesterday, common, tmp_path):
    texts, prev = yesterday
    if form == "folder":  # the same output as a folder of parts
        folder = tmp_path / "prev"
        embed_parquet(write(tmp_path / "y.parquet", list(range(300)), texts), str(folder) + "/", **common)
        prev = folder
    elif form == "glob":
        prev = str(prev.parent / "out*.parquet")
    ids, new_texts = today(texts)
    source = write(tmp_path / "in.parquet", ids, new_texts)
    metrics = embed_parquet(source, tmp_path / "reuse.parquet", reuse=prev, **common)
    full = embed_parquet(source, tmp_path / "full.parquet", **common)

    changed = 3 + 4  # 3 edited, 4 new
    assert metrics["reused_rows"] == metrics["embedded_rows"] - changed
    assert metrics["real_tokens"] < full["real_tokens"] / 10
    reused, fresh = pq.read_table(tmp_path / "reuse.parquet"), pq.read_table(tmp_path / "full.parquet")
    assert reused.drop_columns(["embedding"]).equals(fresh.drop_columns(["embedding"]))
    valid = reused.column("embedding").is_valid().to_numpy(zero_copy_only=False)
    assert cosines(vectors(reused)[valid], vectors(fresh)[valid]).min() >= 0.99999
    # Reused vectors are PREV's exact values.
    previous = pq.read_table(yesterday[1])
    by_id = dict(zip(previous.column("id").to_pylist(), vectors(previous)))
    for row, (i, text) in enumerate(zip(ids, new_texts)):
        if i < 1000 and text and i not in (3, 40, 41):
            np.testing.assert_array_equal(vectors(reused)[row], by_id[i])


def test_change_set_lists_added_changed_and_deleted_ids(yesterday, common, tmp_path):
    texts, prev = yesterday
    ids, new_texts = today(texts)
    new_texts[ids.index(8)] = None  # '' became null: changed
    source = write(tmp_path / "in.parquet", ids, new_texts)
    embed_parquet(source, tmp_path / "out.parquet", reuse=prev, id_col="id", **common)
    changes = pq.read_table(tmp_path / "out.parquet.changes.parquet").to_pylist()
    got = {kind: sorted(r["id"] for r in changes if r["change"] == kind) for kind in ("added", "changed", "deleted")}
    assert got == {"added": [1000, 1001, 1002, 1003], "changed": [3, 8, 40, 41], "deleted": [20, 21, 22, 23, 24]}


def test_duplicates_inside_prev_and_nulls_and_empty_texts(common, tmp_path):
    texts = [LINES[0], LINES[1], LINES[0], None, "", LINES[2], ""]
    prev = tmp_path / "prev.parquet"
    embed_parquet(write(tmp_path / "a.parquet", list(range(7)), texts), prev, **common)
    again = [LINES[0], None, "", LINES[1]]
    metrics = embed_parquet(write(tmp_path / "b.parquet", list(range(4)), again), tmp_path / "out.parquet",
                            reuse=prev, **common)
    assert metrics["reused_rows"] == 3 and metrics["null_rows"] == 1 and metrics["real_tokens"] == 0
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.column("embedding")[1].as_py() is None


def test_prev_made_otherwise_warns_and_embeds_everything_or_fails_with_strict(yesterday, common, tmp_path, caplog):
    texts, prev = yesterday
    source = write(tmp_path / "in.parquet", list(range(300)), texts)
    with caplog.at_level(logging.WARNING):
        metrics = embed_parquet(source, tmp_path / "out.parquet", reuse=prev, prompt="query: ", **common)
    assert metrics["reused_rows"] == 0 and metrics["real_tokens"] > 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "--reuse" in r.getMessage()]
    assert len(warnings) == 1 and "prompt" in warnings[0], warnings
    with pytest.raises(UsageError, match="prompt"):
        embed_parquet(source, tmp_path / "strict.parquet", reuse=prev, reuse_strict=True, prompt="query: ", **common)
    assert not (tmp_path / "strict.parquet").exists()

    no_keys = tmp_path / "nokeys.parquet"
    embed_parquet(source, no_keys, text_key=False, **common)
    assert "text_key" not in pq.read_schema(no_keys).names
    metrics = embed_parquet(source, tmp_path / "out2.parquet", reuse=no_keys, **common)
    assert metrics["reused_rows"] == 0
    with pytest.raises(UsageError, match="text_key"):
        embed_parquet(source, tmp_path / "strict2.parquet", reuse=no_keys, reuse_strict=True, **common)

    other = tmp_path / "other.parquet"  # another model: the default one
    with pytest.raises(InputError, match="does not exist"):
        embed_parquet(source, other, reuse=tmp_path / "missing.parquet", **common)


def test_reuse_per_chunk(common, tmp_path):
    docs = ["\n\n".join(LINES[i:i + 12]) for i in range(0, 120, 12)]
    prev = tmp_path / "prev.parquet"
    embed_parquet(write(tmp_path / "a.parquet", list(range(10)), docs), prev, chunk=True, **common)
    edited = list(docs)
    edited[4] = edited[4] + "\n\nA paragraph added at the end of this document."
    metrics = embed_parquet(write(tmp_path / "b.parquet", list(range(10)), edited), tmp_path / "out.parquet",
                            reuse=prev, chunk=True, **common)
    assert 0 < metrics["chunks"] - metrics["reused_rows"] <= 2  # only the last chunk(s) of the edited document
    full = embed_parquet(write(tmp_path / "b.parquet", list(range(10)), edited), tmp_path / "full.parquet",
                         chunk=True, **common)
    assert full["chunks"] == metrics["chunks"]
    a, b = pq.read_table(tmp_path / "out.parquet"), pq.read_table(tmp_path / "full.parquet")
    assert a.drop_columns(["embedding"]).equals(b.drop_columns(["embedding"]))
    assert cosines(vectors(a), vectors(b)).min() >= 0.99999


def test_kill_9_during_a_reuse_run_resumes_bit_identical(yesterday, common, model_zoo, export_cache_dir, tmp_path):
    texts, prev = yesterday
    ids, new_texts = today(texts)
    source = write(tmp_path / "in.parquet", ids, new_texts, row_group_size=50)
    args = ["--in", str(source), "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir),
            "--device", "cpu", "--pooling", "mean", "--window-rows", "70", "--progress", "off", "--threads", "1",
            "--reuse", str(prev), "--id-col", "id"]
    reference = tmp_path / "reference.parquet"
    assert run_job([*args, "--out", str(reference)]).returncode == 0
    out = tmp_path / "out.parquet"
    metrics = killed_then_resumed(args, out, tmp_path / "fault.json", 2)
    assert metrics["resumed_rows"] == 140 and metrics["reused_rows"] > 0
    assert pq.read_table(out).equals(pq.read_table(reference))
    assert pq.read_table(str(out) + ".changes.parquet").equals(pq.read_table(str(reference) + ".changes.parquet"))


def test_bad_reuse_options_are_one_line_exit_2(yesterday, model_zoo, export_cache_dir, tmp_path, capsys):
    from jobs.embed import main

    texts, prev = yesterday
    source = write(tmp_path / "in.parquet", list(range(300)), texts)
    base = ["--in", str(source), "--out", str(tmp_path / "o.parquet"), "--model", model_zoo.model_arg("bert"),
            "--cache-dir", str(export_cache_dir), "--device", "cpu", "--progress", "off"]
    for flags, message in ((["--reuse", str(tmp_path / "nope.parquet")], "does not exist"),
                           (["--id-col", "id"], "apply with --reuse"),
                           (["--reuse", str(prev), "--id-col", "nope"], "--id-col nope"),
                           (["--reuse", str(source)], "cannot reuse")):
        strict = ["--reuse-strict"] if message == "cannot reuse" else []
        assert main([*base, *flags, *strict]) == 2, flags
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o.parquet").exists()
    assert json.loads(pq.read_schema(prev).metadata[b"embedder"])["model"]
