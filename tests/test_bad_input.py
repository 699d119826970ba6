"""Bad input, odd text and failing disks: python -m jobs.embed on the tiny BERT model (max_seq_length 32).

Every failure is one line on stderr (`jobs.embed: error: ...`, never a traceback) with its documented
exit code (2 bad input or usage, 1 run-time failure such as a full disk), leaves no file at OUT and no
hidden temporary file beside it, and leaves the work folder `.OUT.work` only where it holds committed
windows a rerun resumes from. Every run that succeeds has the input's rows, in order.
"""

from __future__ import annotations

import errno
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs.embed import main as embed_main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # exports the tiny model (~5 s), then ~60 jobs and one subprocess (~5 s)

DIM = 16  # the tiny BERT's Dense output
MIN_COSINE = 0.99999

LONG = ("Long text, far beyond max_seq_length: it is truncated, never refused. " * 1500)[:100_000]
# Texts that break naive pipelines: every one must be embedded, in its row, like sentence-transformers does.
NASTY = [
    "",
    " ",
    "\t\n\r\x0b\x0c",
    "plain ASCII text",
    "emoji 😀🚀🔥 and flags 🇯🇵🇺🇦 and skin tones 👍🏽",
    "family 👩\u200d👩\u200d👧\u200d👦 joined by zero-width joiners",
    "zero\u200bwidth\u200cnon\u200djoiner\u2060word\ufeffjoiner",
    "机器学习模型把句子变成向量。",
    "日本語のテキストとカタカナ、ひらがな",
    "한국어 문장도 임베딩합니다",
    "مرحبا بالعالم، هذا اختبار قصير.",
    "שלום עולם, זה מבחן",
    "mixed \u202eright-to-left override\u202c and \u200fRLM\u200e marks",
    "combining e\u0301 a\u0308 n\u0303 \u0336s\u0336t\u0336r\u0336u\u0336c\u0336k",
    "control \x01\x02\x07\x1b[31m red \x1b[0m \x7f \x85 characters",
    "NUL inside\x00the text",
    "\x00",
    "\x00\x00\x00\x00",
    "line\u2028separator\u2029paragraph",
    "private use \ue000\uf8ff and noncharacters \ufdd0\ufffe\uffff",
    "astral 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𐍈 𓀀 \U0010fffd",
    "a" * 5000,
    LONG,
]


# --------------------------------------------------------------------------------------------
# Running the job in-process and checking what it leaves behind


@pytest.fixture(scope="module")
def tiny_model(model_zoo, exported) -> str:
    exported("bert")  # export once, before any job: jobs then hit the session cache
    return model_zoo.model_arg("bert")


@dataclass
class Run:
    rc: int
    err: list[str]
    out: Path

    @property
    def error(self) -> str:
        return self.err[-1] if self.err else ""


@pytest.fixture
def embed(tiny_model, export_cache_dir, capsys):
    """embed(inputs, out, *extra) -> Run: jobs.embed.main in-process on the tiny model."""

    def run(inputs: Path | str, out: Path, *extra: str) -> Run:
        capsys.readouterr()
        rc = embed_main(["--in", str(inputs), "--out", str(out), "--model", tiny_model, "--cache-dir",
                         str(export_cache_dir), "--progress", "off", "--device", "cpu", *extra])
        return Run(rc, capsys.readouterr().err.strip().splitlines(), out)

    return run


def work_folder(out: Path) -> Path:
    return out.with_name(f".{out.name}.work")


def committed_parts(out: Path) -> list[Path]:
    return sorted(work_folder(out).glob("part-*.parquet"))


def assert_failed(run: Run, code: int, *fragments: str, progress_allowed: bool = False) -> None:
    """Exit code, one error line naming the fragments, no OUT, no temporary files, no empty work folder."""
    assert run.rc == code, run.err
    assert not any("Traceback" in line for line in run.err), run.err
    errors = [line for line in run.err if line.startswith("jobs.embed: error: ")]
    assert errors == [run.error], run.err  # exactly one error line, and it is the last line
    for fragment in fragments:
        assert fragment in run.error, run.error
    out = run.out
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.*.tmp")), list(out.parent.iterdir())
    work = work_folder(out)
    if work.exists():
        assert progress_allowed and committed_parts(out), f"{work} holds no committed progress: {list(work.iterdir())}"
        assert not list(work.glob(".*.tmp")), list(work.iterdir())


def vectors(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(valid mask, vectors of all rows with zeros in null slots)."""
    column = table.column("embedding").combine_chunks()
    assert column.type == pa.list_(pa.float32(), DIM)
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    rows = [[0.0] * DIM if v is None else v for v in column.to_pylist()]
    return valid, np.array(rows, dtype=np.float32).reshape(-1, DIM)


def assert_succeeded(run: Run, want_ids: list, want_columns: list[str] | None = None) -> pa.Table:
    """Exit 0, OUT holds exactly the wanted rows in order, every vector finite and unit-norm, nothing left over."""
    assert run.rc == 0, run.err
    table = pq.read_table(run.out)
    if want_columns is not None:
        assert table.column_names == [*want_columns, "text_key", "embedding"]
    assert table.column("id").to_pylist() == want_ids
    valid, values = vectors(table)
    assert np.isfinite(values).all()
    assert np.abs(np.linalg.norm(values[valid], axis=1) - 1).max(initial=0) < 1e-5
    assert not work_folder(run.out).exists()
    assert not list(run.out.parent.glob(f".{run.out.name}.*"))
    return table


def write(path: Path, **columns) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def texts_table(n: int, start: int = 0) -> dict:
    return {"id": pa.array(range(start, start + n), pa.int64()),
            "text": pa.array([f"row {i}: " + "word " * (i % 40) for i in range(start, start + n)])}


# --------------------------------------------------------------------------------------------
# Empty files and zero-row files


def test_empty_file_is_not_parquet(embed, tmp_path):
    (tmp_path / "empty.parquet").write_bytes(b"")
    run = embed(tmp_path / "empty.parquet", tmp_path / "out.parquet")
    assert_failed(run, 2, "empty.parquet is not a readable Parquet file", "0 bytes")


def test_empty_file_among_good_ones_fails_before_any_work(embed, tmp_path):
    write(tmp_path / "in" / "a.parquet", **texts_table(5))
    (tmp_path / "in" / "b.parquet").write_bytes(b"")
    run = embed(tmp_path / "in", tmp_path / "out.parquet")
    assert_failed(run, 2, "b.parquet is not a readable Parquet file")


def test_zero_row_files_beside_normal_ones_add_nothing(embed, tmp_path):
    empty = {"id": pa.array([], pa.int64()), "text": pa.array([], pa.string())}
    write(tmp_path / "in" / "a.parquet", **empty)
    write(tmp_path / "in" / "b.parquet", **texts_table(7))
    write(tmp_path / "in" / "c.parquet", **empty)
    write(tmp_path / "in" / "d.parquet", **texts_table(4, start=7))
    run = embed(tmp_path / "in", tmp_path / "out.parquet", "--window-rows", "3")
    assert_succeeded(run, list(range(11)), ["id"])


def test_only_zero_row_files_give_an_empty_output_with_the_schema(embed, tmp_path):
    for name in ("a", "b"):
        write(tmp_path / "in" / f"{name}.parquet", id=pa.array([], pa.int64()), text=pa.array([], pa.string()))
    run = embed(tmp_path / "in", tmp_path / "out.parquet")
    table = assert_succeeded(run, [], ["id"])
    assert table.num_rows == 0
    assert table.schema.field("id").type == pa.int64()
    assert b"embedder" in table.schema.metadata


# --------------------------------------------------------------------------------------------
# Schemas that differ between files


def test_carried_column_missing_in_a_later_file(embed, tmp_path):
    write(tmp_path / "in" / "a.parquet", id=[1], source=["s"], text=["x"])
    write(tmp_path / "in" / "b.parquet", id=[2], text=["y"])
    run = embed(tmp_path / "in", tmp_path / "out.parquet")
    assert_failed(run, 2, "b.parquet", "source", "missing")


@pytest.mark.parametrize("first,second", [(pa.int32(), pa.int64()), (pa.int64(), pa.int32())],
                         ids=["int32-then-int64", "int64-then-int32"])
def test_integer_widths_that_differ_between_files_are_widened(first, second, embed, tmp_path):
    big = 2**40 if second == pa.int64() else 2**31 - 1
    write(tmp_path / "in" / "a.parquet", id=pa.array([1, -2], first), text=["a", "b"])
    write(tmp_path / "in" / "b.parquet", id=pa.array([big, -big], second), text=["c", "d"])
    run = embed(tmp_path / "in", tmp_path / "out.parquet")
    table = assert_succeeded(run, [1, -2, big, -big], ["id"])
    assert table.schema.field("id").type == pa.int64()


def test_extra_column_in_a_later_file_is_not_carried_and_is_logged(embed, tmp_path, caplog):
    # Decision: the first file's columns define the output; a later file's extra column is dropped with a
    # warning naming it (the rows all stay). --keep-cols names the columns and silences the warning.
    write(tmp_path / "in" / "a.parquet", id=[1, 2], text=["a", "b"])
    write(tmp_path / "in" / "b.parquet", id=[3], extra=["e"], text=["c"])
    with caplog.at_level(logging.WARNING, logger="embedder.io.parquet"):
        run = embed(tmp_path / "in", tmp_path / "out.parquet")
    assert_succeeded(run, [1, 2, 3], ["id"])
    warnings = [r.getMessage() for r in caplog.records if r.name == "embedder.io.parquet"]
    assert len(warnings) == 1 and "b.parquet" in warnings[0] and "extra" in warnings[0]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="embedder.io.parquet"):
        run = embed(tmp_path / "in", tmp_path / "out2.parquet", "--keep-cols", "id")
    assert_succeeded(run, [1, 2, 3], ["id"])
    assert not [r for r in caplog.records if r.name == "embedder.io.parquet"]


# --------------------------------------------------------------------------------------------
# The text column's type and encoding


@pytest.mark.parametrize(
    ("column", "type_name"),
    [
        (pa.array([1, 2], pa.int32()), "int32"),
        (pa.array([1.5, 2.5]), "double"),
        (pa.array([[1], [2, 3]]), "list<element: int64>"),
        (pa.array([["a"], ["b"]]), "list<element: string>"),
        (pa.array([{"t": "a"}, {"t": "b"}]), "struct<t: string>"),
    ],
    ids=["int32", "double", "list-int", "list-string", "struct"],
)
def test_text_column_of_another_type(column, type_name, embed, tmp_path):
    write(tmp_path / "in.parquet", id=[1, 2], text=column)
    run = embed(tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert_failed(run, 2, f"column 'text' is {type_name}, not a string or binary (UTF-8) column")


def test_text_column_that_changes_type_in_a_later_file(embed, tmp_path):
    write(tmp_path / "in" / "a.parquet", **texts_table(3))
    write(tmp_path / "in" / "b.parquet", id=[3], text=pa.array([7], pa.int64()))
    run = embed(tmp_path / "in", tmp_path / "out.parquet")
    assert_failed(run, 2, "b.parquet", "column 'text' is int64")


@pytest.mark.parametrize("binary_type", [pa.binary(), pa.large_binary()], ids=["binary", "large_binary"])
def test_binary_text_holding_utf8_is_embedded_like_strings(binary_type, embed, tmp_path):
    texts = ["héllo wörld", None, "机器学习", "", "emoji 😀", None, "שלום"]
    write(tmp_path / "str.parquet", id=list(range(7)), text=pa.array(texts, pa.string()))
    write(tmp_path / "bin.parquet", id=list(range(7)),
          text=pa.array([None if t is None else t.encode() for t in texts], binary_type))
    as_strings = assert_succeeded(embed(tmp_path / "str.parquet", tmp_path / "s.parquet"), list(range(7)), ["id"])
    as_bytes = assert_succeeded(embed(tmp_path / "bin.parquet", tmp_path / "b.parquet"), list(range(7)), ["id"])
    assert as_bytes.equals(as_strings)
    assert vectors(as_bytes)[0].tolist() == [t is not None for t in texts]


@pytest.mark.parametrize("window_rows", ["20000", "64"], ids=["one-window", "windows-committed-first"])
def test_binary_text_with_invalid_utf8_names_the_row_in_its_file(window_rows, embed, tmp_path):
    write(tmp_path / "in" / "a.parquet", id=list(range(10)), text=pa.array([b"fine"] * 10, pa.binary()))
    texts = [f"row {i}".encode() for i in range(300)]
    texts[257] = b"caf\xe9 in Latin-1"
    pq.write_table(pa.table({"id": list(range(10, 310)), "text": pa.array(texts, pa.binary())}),
                   tmp_path / "in" / "b.parquet", row_group_size=100)
    run = embed(tmp_path / "in", tmp_path / "out.parquet", "--window-rows", window_rows)
    # The 64-row windows before the bad row are committed: that progress may stay, for a rerun to resume.
    assert_failed(run, 2, "b.parquet", "column 'text'", "not valid UTF-8", "row 257:", progress_allowed=True)
    if window_rows == "20000":
        assert not work_folder(run.out).exists()


def test_string_column_with_invalid_utf8_is_refused_not_a_traceback(embed, tmp_path):
    # Parquet readers do not validate string pages: a writer that mislabels bytes as strings gets this far.
    data = [b"good", b"bad \xff\xfe", b"also good"]
    offsets = pa.py_buffer(np.array([0, 4, 10, 19], dtype=np.int32).tobytes())
    text = pa.Array.from_buffers(pa.string(), 3, [None, offsets, pa.py_buffer(b"".join(data))])
    pq.write_table(pa.table({"id": [1, 2, 3], "text": text}), tmp_path / "in.parquet")
    run = embed(tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert_failed(run, 2, "in.parquet", "not valid UTF-8", "row 1:")


# --------------------------------------------------------------------------------------------
# Any Unicode: the job against sentence-transformers, and a fuzzed tokenizer + encoder


def test_any_unicode_is_embedded_in_order_like_sentence_transformers(embed, model_zoo, tmp_path):
    from sentence_transformers import SentenceTransformer

    texts = [t for pair in zip(NASTY, [None] * len(NASTY)) for t in pair][:-1]  # nulls between them
    write(tmp_path / "in.parquet", id=list(range(len(texts))), text=pa.array(texts, pa.string()))
    run = embed(tmp_path / "in.parquet", tmp_path / "out.parquet", "--window-rows", "7", "--max-tokens", "64")
    table = assert_succeeded(run, list(range(len(texts))), ["id"])
    valid, got = vectors(table)
    assert valid.tolist() == [t is not None for t in texts]

    model = SentenceTransformer(str(model_zoo.path("bert")), device="cpu")
    want = model.encode([t for t in texts if t is not None], normalize_embeddings=True, convert_to_numpy=True)
    cosine = (got[valid] * want).sum(axis=1)
    assert cosine.min() >= MIN_COSINE, {NASTY[i][:40]: float(c) for i, c in enumerate(cosine) if c < MIN_COSINE}


@pytest.fixture(scope="module")
def tokenizer_and_encoder(exported):
    from embedder.infer.session import create_encoder
    from embedder.infer.tokenize import TextTokenizer

    artifact = exported("bert")
    manifest = artifact.manifest
    tokenizer = TextTokenizer(artifact.tokenizer_path, int(manifest.max_seq_length))
    return tokenizer, create_encoder(artifact.graph_path, device="cpu", threads=1), int(manifest.pad_token_id)


def encode(tokenizer_and_encoder, texts: list[str], max_tokens: int, max_batch_size: int) -> np.ndarray:
    from embedder.infer.batching import pad_batch, plan_batches

    tokenizer, encoder, pad_id = tokenizer_and_encoder
    window = tokenizer.encode(texts)
    out = np.full((len(texts), encoder.dim), np.nan, dtype=np.float32)
    for rows in plan_batches(window.lengths, max_tokens, max_batch_size):
        batch = pad_batch(window.ids, window.offsets, rows, pad_id)
        out[batch.rows] = encoder(batch.input_ids, batch.attention_mask)
    return out


any_text = st.one_of(
    st.text(st.characters(exclude_categories=("Cs",)), max_size=300),  # every category but lone surrogates
    st.sampled_from(NASTY),
)


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts=st.lists(any_text, min_size=1, max_size=12), max_batch_size=st.integers(2, 8))
def test_fuzzed_text_gives_finite_unit_vectors_the_same_in_a_batch_or_alone(texts, max_batch_size,
                                                                         tokenizer_and_encoder):
    batched = encode(tokenizer_and_encoder, texts, max_tokens=256, max_batch_size=max_batch_size)
    alone = np.concatenate([encode(tokenizer_and_encoder, [t], max_tokens=256, max_batch_size=1) for t in texts])
    for got in (batched, alone):
        assert np.isfinite(got).all()
        assert np.abs(np.linalg.norm(got, axis=1) - 1).max() < 1e-5
    assert (batched * alone).sum(axis=1).min() >= MIN_COSINE


# --------------------------------------------------------------------------------------------
# Damaged Parquet files


@pytest.fixture
def good_file(tmp_path) -> Path:
    """2,000 rows in 4 row groups, plain-encoded text (one data page per column chunk)."""
    path = tmp_path / "good.parquet"
    pq.write_table(pa.table(texts_table(2000)), path, row_group_size=500, use_dictionary=False)
    return path


def test_truncated_file(embed, good_file, tmp_path):
    data = good_file.read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    run = embed(tmp_path / "cut.parquet", tmp_path / "out.parquet")
    assert_failed(run, 2, "cut.parquet is not a readable Parquet file")


@pytest.mark.parametrize(
    ("write_options", "message"),
    [
        ({"compression": "snappy"}, "Corrupt snappy compressed data"),
        ({"compression": "zstd"}, "ZSTD decompression failed"),
        ({"compression": "none", "write_page_checksum": True}, "CRC checksum verification failed"),
        # Uncompressed and unchecksummed: only the text's own validity can catch it (this damage makes bad UTF-8).
        ({"compression": "none"}, "not valid UTF-8"),
    ],
    ids=["snappy", "zstd", "crc", "plain"],
)
def test_corrupted_data_page_with_an_intact_footer(write_options, message, embed, tmp_path):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table(texts_table(2000)), path, row_group_size=500, use_dictionary=False, **write_options)
    chunk = pq.read_metadata(path).row_group(2).column(1)  # the text column of the third row group
    middle = chunk.data_page_offset + chunk.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[middle : middle + 16] = b"\xab" * 16
    path.write_bytes(bytes(data))
    assert pq.read_metadata(path).num_rows == 2000  # the footer still reads

    run = embed(path, tmp_path / "out.parquet")
    assert_failed(run, 2, "damaged.parquet", message)  # bad input: retrying will not help
    # With 400-row windows, the windows wholly before the first unreadable row are committed: progress may stay.
    run = embed(path, tmp_path / "out2.parquet", "--window-rows", "400")
    assert_failed(run, 2, "damaged.parquet", message, progress_allowed=True)
    bad_row = int(re.search(r"\(row (\d+):", run.error).group(1)) if "UTF-8" in message else 1000  # row group 2
    assert 1000 <= bad_row < 1500
    assert len(committed_parts(run.out)) == bad_row // 400


def test_corrupted_file_in_a_subprocess_prints_one_line_no_traceback(tiny_model, export_cache_dir, tmp_path):
    path = tmp_path / "damaged.parquet"
    pq.write_table(pa.table(texts_table(600)), path, row_group_size=300, use_dictionary=False, compression="none")
    chunk = pq.read_metadata(path).row_group(1).column(1)
    data = bytearray(path.read_bytes())
    data[chunk.data_page_offset + chunk.total_compressed_size // 2] = 0xFF
    path.write_bytes(bytes(data))
    out = tmp_path / "out.parquet"
    proc = subprocess.run([sys.executable, "-m", "jobs.embed", "--in", str(path), "--out", str(out), "--model",
                           tiny_model, "--cache-dir", str(export_cache_dir), "--progress", "off", "--device", "cpu"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert_failed(Run(proc.returncode, proc.stderr.strip().splitlines(), out), 2, "damaged.parquet", "not valid UTF-8")


# --------------------------------------------------------------------------------------------
# Output paths that cannot be written


@pytest.mark.parametrize(
    ("out", "message"),
    [
        (Path("/proc/embedder-test.parquet"), "output folder /proc is not writable"),  # root ignores chmod; /proc does not
        (Path("/proc/self/embedder-test.parquet"), "is not writable"),
    ],
    ids=["proc", "proc-self"],
)
def test_unwritable_output_folder(out, message, embed, tmp_path):
    write(tmp_path / "in.parquet", **texts_table(3))
    assert_failed(embed(tmp_path / "in.parquet", out), 2, message)


def test_output_folder_that_does_not_exist(embed, tmp_path):
    write(tmp_path / "in.parquet", **texts_table(3))
    out = tmp_path / "no" / "such" / "folder" / "out.parquet"
    assert_failed(embed(tmp_path / "in.parquet", out), 2, f"output folder {out.parent} does not exist")
    assert not (tmp_path / "no").exists()


# --------------------------------------------------------------------------------------------
# A full disk (simulated: pyarrow's writer raises ENOSPC on the Nth write of one kind of file)

ROWS, WINDOW = 30, 8  # four windows: 8, 8, 8, 6 rows; each committed part holds one row group


def disk_full(monkeypatch, method: str, target: str, nth: int) -> None:
    """ParquetWriter.<method> raises ENOSPC on its nth call for `target`: 'part' (a window being
    committed to the work folder) or 'out' (the final merge into OUT's temporary file)."""
    real = getattr(pq.ParquetWriter, method)
    calls = {"part": 0, "out": 0}

    def failing(self, *args, **kwargs):
        name = Path(str(getattr(self.where, "name", self.where))).name  # a path, or the file object written to
        kind = "part" if name.startswith(".part-") else "out"
        calls[kind] += 1
        if method == "close":
            real(self, *args, **kwargs)  # the footer is half written, then the disk fills
        if kind == target and calls[kind] == nth:
            raise OSError(errno.ENOSPC, "No space left on device")
        if method != "close":
            return real(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, method, failing)


@pytest.mark.parametrize(
    ("method", "target", "nth", "committed"),
    [
        ("write_table", "part", 1, 0),
        ("write_table", "part", 3, 2),
        ("close", "part", 2, 1),
        ("write_table", "out", 1, 4),
        ("write_table", "out", 4, 4),
        ("close", "out", 1, 4),
    ],
    ids=["first-window", "third-window", "second-window-footer", "merge-first", "merge-last", "merge-footer"],
)
def test_full_disk_fails_with_exit_1_keeps_progress_and_a_rerun_completes(method, target, nth, committed, embed,
                                                                        tmp_path, monkeypatch):
    write(tmp_path / "in.parquet", **texts_table(ROWS))
    args = ("--window-rows", str(WINDOW))
    reference = assert_succeeded(embed(tmp_path / "in.parquet", tmp_path / "ref.parquet", *args), list(range(ROWS)))

    out = tmp_path / "out.parquet"
    with monkeypatch.context() as patch:
        disk_full(patch, method, target, nth)
        run = embed(tmp_path / "in.parquet", out, *args)
    assert_failed(run, 1, "No space left on device", progress_allowed=True)
    assert len(committed_parts(out)) == committed

    # Space freed: the same command resumes from the committed windows and no row is lost.
    again = embed(tmp_path / "in.parquet", out, *args)
    table = assert_succeeded(again, list(range(ROWS)), ["id"])
    assert table.equals(reference)


def test_one_window_job_writes_each_vector_once(embed, tmp_path, monkeypatch):
    """With one window the committed part is OUT: renamed into place, not decoded and written again."""
    write(tmp_path / "in.parquet", **texts_table(ROWS))
    windowed = assert_succeeded(embed(tmp_path / "in.parquet", tmp_path / "windowed.parquet", "--window-rows",
                                      str(WINDOW)), list(range(ROWS)), ["id"])
    opened: list[str] = []
    real_init = pq.ParquetWriter.__init__

    def counting_init(self, where, *args, **kwargs):
        opened.append(Path(str(getattr(where, "name", where))).name)
        real_init(self, where, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "__init__", counting_init)
    out = tmp_path / "out.parquet"
    table = assert_succeeded(embed(tmp_path / "in.parquet", out), list(range(ROWS)), ["id"])
    assert len(opened) == 1 and opened[0].startswith(".part-000000.parquet."), opened
    assert table.schema.equals(windowed.schema, check_metadata=True)  # OUT's schema and embedder metadata
    np.testing.assert_allclose(vectors(table)[1], vectors(windowed)[1], atol=1e-6)
