"""Long documents (issue 14): --chunk splits texts at word starts, each chunk's vector is sentence-transformers'
vector of text[chunk_start:chunk_end], --chunk-pooling pools them per text, and identical texts in a window are
embedded once (dedup). Real text: docstrings of the standard library, joined into documents."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import fault_env
from models import corpus_lines, cosines, reference_vectors
from test_resume import killed_then_resumed, last_json, run_job

from embedder import Embedder, embed_parquet
from embedder.io.workfolder import WorkFolder
from jobs.embed import main as embed_main

pytestmark = pytest.mark.slow

# Text a tokenizer finds hard: accents precomposed and combining, emoji (with a joiner), CJK with and without
# spaces, Cyrillic, and runs of spaces and newlines.
MIXED = ("Voilà un café  très   spécial: naïve résumé, cafe\u0301 and nai\u0308ve. 😀 🚀 👩\u200d💻 emoji! "
         "你好 世界，这是一个测试。 机器学习模型把句子变成向量。 Привет, мир!\n\n  Indented line\tand a tab. ")
NO_SPACE = "https://example.com/" + "segment-of-a-very-long-url/" * 120  # thousands of characters, no whitespace


def documents(count: int, lines_per_doc: int = 25) -> list[str]:
    """Documents of real text: consecutive docstring lines joined, a few paragraphs each."""
    lines = corpus_lines()
    docs = []
    for index in range(count):
        chunk = lines[(index * lines_per_doc) % len(lines):][:lines_per_doc]
        docs.append("\n\n".join(" ".join(chunk[i:i + 5]) for i in range(0, len(chunk), 5)))
    return docs


def run_chunked(folder: Path, texts: list[str | None], model: str | None, cache: Path, **options) -> tuple[pa.Table, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    source, out = folder / "in.parquet", folder / "out.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}), source)
    metrics = embed_parquet(source, out, model=model, cache_dir=cache, device="cpu", **options)
    return pq.read_table(out), metrics


def chunk_texts(table: pa.Table, texts: list[str | None]) -> list[str]:
    return [texts[i][s:e] for i, s, e in zip(table.column("id").to_pylist(), table.column("chunk_start").to_pylist(),
                                             table.column("chunk_end").to_pylist()) if s is not None]


def vectors(table: pa.Table) -> np.ndarray:
    column = table.column("embedding").combine_chunks()
    return column.values.to_numpy().reshape(len(column), -1)


@pytest.mark.parametrize(("family", "chunk_tokens"), [("default", 64), ("roberta", 24), ("xlmr", 32)],
                         ids=["wordpiece", "byte-level-bpe", "sentencepiece"])
def test_chunk_vectors_are_sentence_transformers_vectors_of_the_chunk_text(family, chunk_tokens, model_zoo,
                                                                            export_cache_dir, exported, tmp_path):
    exported(family)
    texts = [*documents(6), MIXED * 3, NO_SPACE, "short text", "", None]
    table, metrics = run_chunked(tmp_path, texts, model_zoo.model_arg(family), export_cache_dir, chunk=True,
                                 chunk_tokens=chunk_tokens)
    ids = table.column("id").to_pylist()
    assert ids == sorted(ids) and set(ids) == set(range(len(texts)))  # input order, every row
    assert metrics["chunked_rows"] == 8  # the documents, the mixed text and the URL; not the short ones
    assert metrics["chunks"] == table.num_rows - 1  # the null text's row has no chunk
    url = texts.index(NO_SPACE)
    if family == "default":
        # WordPiece words end at every punctuation mark: the URL has word starts everywhere.
        assert metrics["cut_in_word"] == 0
        whole = [True for i in ids if texts[i] is not None]
    else:
        # For BPE and SentencePiece a word begins after a space: the URL is one word, longer than a chunk.
        assert metrics["cut_in_word"] > 0
        whole = [i != url for i in ids if texts[i] is not None]
    got = vectors(table.filter(table.column("chunk").is_valid()))
    want = reference_vectors(model_zoo.path(family), chunk_texts(table, texts))
    similarity = cosines(got, want)
    assert similarity[np.array(whole)].min() >= 0.9999, similarity[np.array(whole)].min()
    # A chunk cut inside the URL holds at most chunk_tokens tokens, so it is still a whole chunk of the model.
    assert np.isfinite(similarity).all()


def test_chunk_rows_cover_the_text_in_order_with_nulls_and_empty_text(model_zoo, export_cache_dir, exported,
                                                                       tmp_path):
    exported("bert")
    texts = [*documents(3), None, "", "one two three"]
    table, metrics = run_chunked(tmp_path, texts, model_zoo.model_arg("bert"), export_cache_dir, chunk=True,
                                 with_token_counts=True)
    assert table.column_names == ["id", "chunk", "chunk_start", "chunk_end", "text_key", "tokens", "truncated",
                                  "embedding"]
    assert table.schema.field("chunk").type == pa.int32() and table.schema.field("chunk_start").type == pa.int64()
    rows = table.to_pylist()
    by_id: dict[int, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["id"], []).append(row)
    assert list(by_id) == list(range(len(texts)))
    null, = by_id[3]
    assert null["chunk"] is None and null["chunk_start"] is None and null["embedding"] is None
    empty, = by_id[4]
    assert (empty["chunk"], empty["chunk_start"], empty["chunk_end"]) == (0, 0, 0) and empty["embedding"] is not None
    for index in (0, 1, 2):
        chunks, text = by_id[index], texts[index]
        assert len(chunks) > 1
        assert [c["chunk"] for c in chunks] == list(range(len(chunks)))
        assert chunks[0]["chunk_start"] == 0 and chunks[-1]["chunk_end"] == len(text)
        assert all(c["tokens"] <= 32 and not c["truncated"] for c in chunks)  # the tiny bert takes 32 tokens
        for before, after in zip(chunks, chunks[1:]):
            # No overlap: what lies between two chunks is whitespace, and the next begins a word.
            assert before["chunk_end"] <= after["chunk_start"]
            assert not text[before["chunk_end"]:after["chunk_start"]].strip()
            assert not text[after["chunk_start"]].isspace()
    assert metrics["truncated_rows"] == 0 and metrics["output_rows"] == table.num_rows
    meta = json.loads(table.schema.metadata[b"embedder"])
    assert meta["chunking"] == {"tokens": 32, "overlap": 0, "pooling": None}


def test_overlap_repeats_at_most_the_asked_tokens_from_a_word_start(model_zoo, export_cache_dir, exported, tmp_path):
    exported("bert")
    texts = documents(2)
    plain, _ = run_chunked(tmp_path / "plain", texts, model_zoo.model_arg("bert"), export_cache_dir, chunk=True)
    table, _ = run_chunked(tmp_path / "overlap", texts, model_zoo.model_arg("bert"), export_cache_dir, chunk=True,
                           chunk_overlap=8)
    assert table.num_rows > plain.num_rows  # overlapping chunks advance less each time
    embedder = Embedder(model_zoo.model_arg("bert"), cache_dir=export_cache_dir, device="cpu")
    tokenizer = embedder._window_embedder.tokenizer
    pairs = overlapping = 0
    for row, after in zip(table.to_pylist(), table.to_pylist()[1:]):
        if row["id"] != after["id"]:
            continue
        pairs += 1
        assert after["chunk_start"] > row["chunk_start"]
        if after["chunk_start"] < row["chunk_end"]:  # no word start among the last 8 tokens: no overlap there
            overlapping += 1
            shared = texts[row["id"]][after["chunk_start"]:row["chunk_end"]]
            assert int(tokenizer.encode([shared]).lengths[0]) - 2 <= 8  # [CLS] and [SEP] aside
    assert overlapping >= pairs * 0.8, (overlapping, pairs)


def test_chunk_pooling_pools_the_chunk_vectors_per_text(model_zoo, export_cache_dir, exported, tmp_path):
    exported("bert")
    texts = [*documents(3), None, "a short one"]
    rows, _ = run_chunked(tmp_path / "rows", texts, model_zoo.model_arg("bert"), export_cache_dir, chunk=True,
                          dedup=False)
    chunk_vectors = vectors(rows.filter(rows.column("chunk").is_valid()))
    owner = np.array([i for i in rows.column("id").to_pylist() if texts[i] is not None])
    for pooling in ("mean", "max", "first"):
        table, metrics = run_chunked(tmp_path / pooling, texts, model_zoo.model_arg("bert"), export_cache_dir,
                                     chunk_pooling=pooling, dedup=False)
        assert table.column_names == ["id", "chunks", "text_key", "embedding"] and table.num_rows == len(texts)
        assert table.column("chunks").to_pylist() == [int((owner == i).sum()) or None for i in range(len(texts))]
        assert table.column("embedding")[3].as_py() is None
        got = vectors(table.filter(table.column("chunks").is_valid()))
        for row, index in enumerate(i for i, t in enumerate(texts) if t is not None):
            mine = chunk_vectors[owner == index]
            want = {"mean": mine.mean(axis=0), "max": mine.max(axis=0), "first": mine[0]}[pooling]
            want = want / np.linalg.norm(want)
            np.testing.assert_allclose(got[row], want, atol=2e-6)
        assert metrics["output_rows"] == len(texts)


def test_encode_with_chunk_pooling_and_polars_frames_with_chunks(model_zoo, export_cache_dir, exported):
    import polars as pl

    exported("bert")
    texts = documents(2)
    pooled = Embedder(model_zoo.model_arg("bert"), cache_dir=export_cache_dir, device="cpu", chunk_pooling="mean")
    table = pooled.embed(pa.table({"text": texts}))
    np.testing.assert_array_equal(pooled.encode(texts), vectors(table))

    chunked = Embedder(model_zoo.model_arg("bert"), cache_dir=export_cache_dir, device="cpu", chunk=True)
    frame = pl.DataFrame({"doc": ["a", "b"], "text": texts})
    out = chunked.embed(frame)
    assert isinstance(out, pl.DataFrame)
    assert out.columns == ["doc", "text", "chunk", "chunk_start", "chunk_end", "embedding"]
    assert out.height == int(table.column("chunks").to_numpy().sum())
    assert out["doc"].to_list() == ["a"] * int(table.column("chunks")[0].as_py()) + ["b"] * int(
        table.column("chunks")[1].as_py())
    with pytest.raises(Exception, match="chunk_pooling"):
        chunked.encode(texts)


def test_dedup_embeds_repeated_texts_once_with_the_same_vectors(model_zoo, export_cache_dir, exported, tmp_path):
    exported("bert")
    base = [*documents(4, 3), *corpus_lines()[:80]]
    texts = [base[i % len(base)] for i in range(len(base) + 40)]  # 40 repeats
    once, metrics = run_chunked(tmp_path / "on", texts, model_zoo.model_arg("bert"), export_cache_dir,
                                pooling="mean")
    every, plain = run_chunked(tmp_path / "off", texts, model_zoo.model_arg("bert"), export_cache_dir,
                               pooling="mean", dedup=False)
    repeats = len(texts) - len(set(texts))
    assert metrics["deduplicated"] >= repeats and plain["deduplicated"] == 0
    assert metrics["real_tokens"] < plain["real_tokens"]
    assert cosines(vectors(once), vectors(every)).min() >= 0.99999
    got = vectors(once)
    first = {t: i for i, t in reversed(list(enumerate(texts)))}
    for i, t in enumerate(texts):
        np.testing.assert_array_equal(got[i], got[first[t]])  # copied, not recomputed


def test_windows_bounded_by_text_size_and_kill_9_mid_document_resumes_bit_identical(model_zoo, export_cache_dir,
                                                                                    exported, tmp_path):
    exported("bert")
    texts = [*documents(12, 40), None, MIXED]
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source, row_group_size=5)
    args = ["--in", str(source), "--model", model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir),
            "--device", "cpu", "--progress", "off", "--threads", "1", "--chunk", "--chunk-overlap", "4",
            "--window-mb", "0.004"]  # about 4 KB of text per window: several documents' windows
    reference = tmp_path / "reference.parquet"
    done = run_job([*args, "--out", str(reference)])
    assert done.returncode == 0, done.stderr
    metrics = last_json(done.stdout)
    assert metrics["windows"] >= 4 and metrics["rows"] == len(texts)

    out = tmp_path / "vecs.parquet"
    again = killed_then_resumed(args, out, tmp_path / "fault.json", 3)
    assert 0 < again["resumed_rows"] < len(texts)
    assert pq.read_table(out).equals(pq.read_table(reference))

    # Progress of a run with other chunking is not resumed into this one.
    killed = run_job([*args, "--out", str(tmp_path / "other.parquet")],
                     **fault_env(tmp_path / "fault2.json", point="window", count=2))
    assert killed.returncode == -signal.SIGKILL
    other = run_job([*[a if a != "4" else "6" for a in args], "--out", str(tmp_path / "other.parquet")])
    assert other.returncode == 2 and "chunking" in other.stderr
    assert Path(WorkFolder(tmp_path / "other.parquet").path).is_dir()


def test_shards_of_a_chunked_run_make_the_whole(model_zoo, export_cache_dir, exported, tmp_path):
    exported("bert")
    texts = documents(8, 10)
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": texts}), source, row_group_size=2)
    common = dict(model=model_zoo.model_arg("bert"), cache_dir=export_cache_dir, device="cpu", chunk=True,
                  window_rows=3)
    embed_parquet(source, tmp_path / "whole.parquet", **common)
    for shard in ("0/2", "1/2"):
        embed_parquet(source, tmp_path / f"shard{shard[0]}.parquet", shard=shard, **common)
    parts = pa.concat_tables([pq.read_table(tmp_path / f"shard{i}.parquet") for i in (0, 1)])
    whole = pq.read_table(tmp_path / "whole.parquet")
    assert parts.drop_columns(["embedding"]).equals(whole.drop_columns(["embedding"]))
    assert cosines(vectors(parts), vectors(whole)).min() >= 0.99999


@pytest.mark.parametrize(("flags", "message"), [
    (["--chunk", "--chunk-overlap", "30"], "--chunk-overlap 30 leaves no room"),
    (["--chunk", "--chunk-tokens", "2"], "--chunk-tokens 2 leaves no room"),
    (["--chunk", "--chunk-tokens", "33"], "--chunk-tokens 33 exceeds the 32 tokens"),
    (["--chunk-overlap", "3"], "apply with --chunk"),
    (["--chunk", "--keep-cols", "chunk_start"], "input already has column chunk_start"),
])
def test_bad_chunk_options_are_one_line_and_exit_2(flags, message, model_zoo, export_cache_dir, exported, tmp_path,
                                                    capsys):
    exported("bert")
    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"text": ["some text"], "chunk_start": [1]}), source)
    code = embed_main(["--in", str(source), "--out", str(tmp_path / "out.parquet"), "--model",
                       model_zoo.model_arg("bert"), "--cache-dir", str(export_cache_dir), "--device", "cpu",
                       "--progress", "off", "--keep-cols", "", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not (tmp_path / "out.parquet").exists()
