"""scripts/make_corpus.py: row count and id order, determinism, folder split, null fraction."""

import importlib.util
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_corpus.py"
SMALL = ["--packages", "json,email"]  # a few hundred docstrings, parsed in ~0.1 s


@pytest.fixture(scope="module")
def make_corpus():
    spec = importlib.util.spec_from_file_location("make_corpus", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stdlib_corpus_has_rows_in_id_order_and_real_cleaned_text(make_corpus, tmp_path):
    out = tmp_path / "sample.parquet"
    summary = make_corpus.main(["--out", str(out), "--rows", "2000"])
    table = pq.read_table(out)
    assert table.schema == pa.schema([("id", pa.int64()), ("source", pa.string()),
                                      ("text", pa.string())])
    assert table["id"].to_pylist() == list(range(2000))
    texts = table["text"].to_pylist()
    assert len(set(texts)) == 2000  # stdlib has thousands of distinct docstrings: no cycling
    assert all(t and t == t.strip() and "\t" not in t for t in texts)  # cleandoc'd
    assert summary["rows"] == 2000 and summary["files"] == 1 and summary["null_texts"] == 0
    assert summary["chars_p95"] > 2 * summary["chars_median"]  # long-tailed lengths
    assert [p.name for p in tmp_path.iterdir()] == ["sample.parquet"]  # no temp files left


def test_same_arguments_give_identical_content_and_cycle_when_rows_exceed_docstrings(
        make_corpus, tmp_path, caplog):
    args = [*SMALL, "--rows", "1000", "--seed", "7"]
    with caplog.at_level(logging.INFO, logger="make_corpus"):
        first = make_corpus.main(["--out", str(tmp_path / "a.parquet"), *args])
    make_corpus.main(["--out", str(tmp_path / "b.parquet"), *args])
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b)
    distinct = first["distinct_texts"]
    assert distinct < 1000 and "cycling" in caplog.text
    texts = a["text"].to_pylist()
    assert len(set(texts)) == distinct and texts[distinct:] == texts[:1000 - distinct]


def test_files_split_rows_in_order_with_continuous_ids_and_rerun_replaces_folder(
        make_corpus, tmp_path):
    out = tmp_path / "corpus"
    make_corpus.main(["--out", str(out), *SMALL, "--rows", "1000", "--files", "4"])
    summary = make_corpus.main(["--out", str(out), *SMALL, "--rows", "1000", "--files", "3",
                                "--row-group-rows", "100"])
    parts = sorted(out.iterdir())
    assert [p.name for p in parts] == [f"part-{i:05d}.parquet" for i in range(3)]
    ids = [pq.read_table(p)["id"].to_pylist() for p in parts]
    assert all(len(chunk) in (333, 334) for chunk in ids)
    assert sum(ids, []) == list(range(1000)) and summary["files"] == 3
    assert pq.ParquetFile(parts[0]).metadata.row_group(0).num_rows == 100
    assert [p.name for p in tmp_path.iterdir()] == ["corpus"]


def test_null_fraction_nulls_exactly_that_share_of_texts(make_corpus, tmp_path):
    out = tmp_path / "nulls.parquet"
    summary = make_corpus.main(["--out", str(out), *SMALL, "--rows", "1000",
                                "--null-fraction", "0.25"])
    table = pq.read_table(out)
    assert table["text"].null_count == 250 == summary["null_texts"]
    assert table["source"].null_count == 0 and table["id"].to_pylist() == list(range(1000))


def test_repeat_fraction_repeats_that_share_of_earlier_texts_deterministically(make_corpus, tmp_path):
    args = [*SMALL, "--rows", "300", "--seed", "5", "--null-fraction", "0.1", "--repeat-fraction", "0.3"]
    summary = make_corpus.main(["--out", str(tmp_path / "a.parquet"), *args])
    make_corpus.main(["--out", str(tmp_path / "b.parquet"), *args])
    a = pq.read_table(tmp_path / "a.parquet")
    assert a.equals(pq.read_table(tmp_path / "b.parquet"))  # same --seed, same rows
    assert a["id"].to_pylist() == list(range(300)) and summary["repeated_rows"] == 90
    texts, sources = a["text"].to_pylist(), a["source"].to_pylist()
    seen, repeats = {}, 0
    for text, source in zip(texts, sources):
        if text is not None and text in seen:
            repeats += 1
            assert seen[text] == source  # a repeat copies the earlier row's source with its text
        elif text is not None:
            seen[text] = source
    assert repeats == 90 and a["text"].null_count == 30  # 300 rows < the docstrings: no cycling repeats
    plain = make_corpus.main(["--out", str(tmp_path / "c.parquet"), *args[:-2]])
    assert "repeated_rows" not in plain
    assert len({t for t in pq.read_table(tmp_path / "c.parquet")["text"].to_pylist() if t}) == 270
    other = make_corpus.main(["--out", str(tmp_path / "d.parquet"), *args[:5], "6", *args[6:]])
    assert other["repeated_rows"] == 90
    assert not pq.read_table(tmp_path / "d.parquet").equals(a)  # another --seed, other rows


def test_repeat_fraction_zero_leaves_the_corpus_as_before(make_corpus, tmp_path):
    args = [*SMALL, "--rows", "500", "--seed", "2", "--null-fraction", "0.2"]
    make_corpus.main(["--out", str(tmp_path / "a.parquet"), *args])
    make_corpus.main(["--out", str(tmp_path / "b.parquet"), *args, "--repeat-fraction", "0"])
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert a.equals(b)
    # The repeats only overwrite rows: the nulls and every row that is not a repeat stay where they were.
    make_corpus.main(["--out", str(tmp_path / "c.parquet"), *args, "--repeat-fraction", "0.5"])
    c = pq.read_table(tmp_path / "c.parquet")
    kept = [x == y for x, y in zip(a["text"].to_pylist(), c["text"].to_pylist())]
    assert sum(kept) == 500 - 250 and c["text"].null_count == a["text"].null_count == 100


def test_edit_fraction_edits_that_share_of_rows_and_nothing_else(make_corpus, tmp_path):
    args = [*SMALL, "--rows", "400", "--seed", "3", "--null-fraction", "0.05"]
    make_corpus.main(["--out", str(tmp_path / "day1.parquet"), *args])
    summary = make_corpus.main(["--out", str(tmp_path / "day2.parquet"), *args, "--edit-fraction", "0.02"])
    again = make_corpus.main(["--out", str(tmp_path / "again.parquet"), *args, "--edit-fraction", "0.02"])
    day1, day2 = pq.read_table(tmp_path / "day1.parquet"), pq.read_table(tmp_path / "day2.parquet")
    assert day2.equals(pq.read_table(tmp_path / "again.parquet")) and summary["edited_rows"] == again["edited_rows"] == 8
    assert day1["id"].equals(day2["id"]) and day1["source"].equals(day2["source"])
    pairs = list(zip(day1["text"].to_pylist(), day2["text"].to_pylist()))
    edited = [(old, new) for old, new in pairs if old != new]
    assert len(edited) == 8
    assert all(old is not None and new.startswith(old + "\n\n") and len(new) > len(old) + 2 for old, new in edited)
