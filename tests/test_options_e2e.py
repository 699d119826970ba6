"""Options the other tests never run through the command lines, each against sentence-transformers.

jobs.embed's --prompt, --max-seq-len, --pooling and --prometheus-out, and jobs.export's --no-normalize,
on the tiny "bert" model (Transformer, CLS pooling, Dense 32 -> 16 with Tanh, Normalize) and real text.

The CLS vector of this random-weight model barely depends on the text (any two rows: cosine above 0.9998),
so where an option must be seen to change the vectors (prompt, truncation) the tests pool by mean.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from models import MAX_SEQ_LENGTH, TEXTS, assert_vectors_match, corpus_lines, cosines, onnx_vectors, update_json

from embedder.manifest import MANIFEST_FILE, Artifact, Manifest
from jobs.embed import main as embed_main
from jobs.export import main as export_main

pytestmark = pytest.mark.slow

# Real text of varied lengths, then the test texts ('' and one past max_seq_length among them).
JOB_TEXTS = corpus_lines()[:40] + TEXTS
PROMPTS = {"query": "query: ", "passage": "passage: "}
SHORT = 8  # a --max-seq-len below the tiny models' MAX_SEQ_LENGTH
# Below this cosine two vectors of a row count as different: far below MIN_COSINE, far above chance.
DIFFERENT = 0.999


def sentence_transformer(path: Path, pooling: str | None = None, drop_normalize: bool = False):
    """sentence-transformers on the CPU, loaded afresh from the model folder (so changing one never changes
    another), with its Pooling module replaced by one of mode `pooling` and its Normalize module left out
    if asked; the other modules as saved."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    model = SentenceTransformer(str(path), device="cpu")
    modules = list(model)
    if pooling is None and not drop_normalize:
        return model
    assert [type(m).__name__ for m in modules] == ["Transformer", "Pooling", "Dense", "Normalize"]
    if pooling is not None:
        modules[1] = Pooling(modules[1].embedding_dimension, pooling_mode=pooling)
    if drop_normalize:
        modules.pop()
    return SentenceTransformer(modules=modules, device="cpu")


def st_encode(model, texts: list[str], **kwargs) -> np.ndarray:
    return model.encode(texts, batch_size=8, convert_to_numpy=True, **kwargs)


def run_embed(folder: Path, model: Path, cache: Path, texts: list[str | None],
              *flags: str) -> tuple[np.ndarray, dict, dict]:
    """jobs.embed on the CPU over a Parquet file of (id, text); the non-null vectors in row order, the
    output's `embedder` metadata and the metrics JSON."""
    folder.mkdir(parents=True, exist_ok=True)
    source, out, metrics = folder / "in.parquet", folder / "out.parquet", folder / "metrics.json"
    pq.write_table(pa.table({"id": list(range(len(texts))), "text": pa.array(texts, pa.string())}), source)
    rc = embed_main(["--in", str(source), "--out", str(out), "--model", str(model), "--cache-dir", str(cache),
                     "--device", "cpu", "--progress", "off", "--metrics-out", str(metrics), *flags])
    assert rc == 0
    table = pq.read_table(out)
    assert table.column("id").to_pylist() == list(range(len(texts)))
    embedding = table.column("embedding").combine_chunks().drop_null()
    vectors = embedding.flatten().to_numpy().reshape(len(embedding), -1)
    return vectors, json.loads(table.schema.metadata[b"embedder"]), json.loads(metrics.read_text())


@pytest.fixture(scope="module")
def bert(model_zoo) -> Path:
    return model_zoo.path("bert")


@pytest.fixture(scope="module")
def bert_st(bert):
    """The tiny bert as sentence-transformers loads it: the modules the references are built from."""
    model = sentence_transformer(bert)
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert model[1].pooling_mode == "cls" and model.max_seq_length == MAX_SEQ_LENGTH
    return model


# ---------------------------------------------------------------------------------------------
# --prompt


@pytest.fixture(scope="module")
def prompted(bert, tmp_path_factory) -> Path:
    """The tiny bert with prompts and a default prompt in config_sentence_transformers.json (other keys kept),
    pooling by mean: a prompt hardly moves its CLS vector (cosine 0.99999 with and without)."""
    path = tmp_path_factory.mktemp("prompted") / "bert-prompts"
    shutil.copytree(bert, path)
    update_json(path / "config_sentence_transformers.json", prompts=PROMPTS, default_prompt_name="query")
    update_json(path / "1_Pooling" / "config.json", pooling_mode="mean")
    return path


@pytest.fixture(scope="module")
def prompted_st(prompted):
    model = sentence_transformer(prompted)
    # The oracle reads the files as written: mean pooling, and its plain encode() applies the default prompt.
    assert model[1].pooling_mode == "mean"
    assert model.default_prompt_name == "query" and model.prompts["passage"] == "passage: "
    np.testing.assert_array_equal(st_encode(model, JOB_TEXTS[:5]), st_encode(model, JOB_TEXTS[:5], prompt="query: "))
    return model


@pytest.mark.parametrize(
    ("flags", "prompt", "st_kwargs"),
    [
        pytest.param([], "query: ", {}, id="default-prompt-name"),
        pytest.param(["--prompt", "passage"], "passage: ", {"prompt_name": "passage"}, id="prompt-name"),
        pytest.param(["--prompt", "search: "], "search: ", {"prompt": "search: "}, id="literal-prompt"),
        pytest.param(["--prompt", ""], "", {"prompt": ""}, id="empty-prompt-overrides-default"),
    ],
)
def test_prompt_equals_sentence_transformers(flags, prompt, st_kwargs, prompted, prompted_st, export_cache_dir,
                                             tmp_path):
    """Without --prompt the model's default prompt is prepended, a prompt name is looked up in the model's
    config, anything else is a literal prefix ('' none), as in encode(); the metadata records the text."""
    got, meta, _ = run_embed(tmp_path, prompted, export_cache_dir, JOB_TEXTS, *flags)
    assert_vectors_match(got, st_encode(prompted_st, JOB_TEXTS, **st_kwargs))
    assert meta["prompt"] == prompt
    # The prompt moves every row's vector, so the match above tells this prompt from another one.
    other = st_encode(prompted_st, JOB_TEXTS, prompt="passage: " if prompt == "query: " else "query: ")
    assert cosines(got, other).max() < DIFFERENT


# ---------------------------------------------------------------------------------------------
# --max-seq-len


def test_max_seq_len_truncates_as_sentence_transformers_does(bert, bert_st, export_cache_dir, tmp_path):
    """--max-seq-len 8 cuts every row at 8 tokens (specials included), as max_seq_length = 8 does in
    sentence-transformers; truncated_rows counts the rows that were longer. Mean pooling (--pooling mean),
    so that a cut row's vector really changes."""
    lengths = [len(ids) for ids in bert_st.tokenizer(JOB_TEXTS, truncation=False)["input_ids"]]
    cut = np.array(lengths) > SHORT
    assert 0 < cut.sum() < len(JOB_TEXTS)  # some rows are cut, some are not

    got, meta, metrics = run_embed(tmp_path, bert, export_cache_dir, JOB_TEXTS, "--pooling", "mean",
                                   "--max-seq-len", str(SHORT))
    short = sentence_transformer(bert, pooling="mean")
    short.max_seq_length = SHORT
    assert_vectors_match(got, st_encode(short, JOB_TEXTS))
    assert meta["max_seq_length"] == SHORT
    assert metrics["truncated_rows"] == cut.sum()
    # Rows cut to the same 8 tokens are embedded once (dedup): real tokens count each distinct sequence once.
    kept = {tuple(ids) for ids in bert_st.tokenizer(JOB_TEXTS, truncation=True, max_length=SHORT)["input_ids"]}
    assert metrics["real_tokens"] == sum(len(ids) for ids in kept) < sum(min(n, SHORT) for n in lengths)
    assert metrics["deduplicated"] == len(JOB_TEXTS) - len(kept)
    # Exactly the rows longer than 8 tokens differ from those at the model's own limit of 32.
    full = st_encode(sentence_transformer(bert, pooling="mean"), JOB_TEXTS)
    assert cosines(got[cut], full[cut]).max() < DIFFERENT
    assert_vectors_match(got[~cut], full[~cut])


def test_max_seq_len_above_the_models_limit_is_a_usage_error(bert, tmp_path, capsys):
    """Above the model's max_seq_length (its position table ends there): exit 2, one line, no output, and
    no export first (the cache folder, cold, stays empty)."""
    source, out, cache = tmp_path / "in.parquet", tmp_path / "out.parquet", tmp_path / "cache"
    pq.write_table(pa.table({"text": TEXTS}), source)
    rc = embed_main(["--in", str(source), "--out", str(out), "--model", str(bert), "--cache-dir", str(cache),
                     "--device", "cpu", "--progress", "off", "--log-level", "ERROR",
                     "--max-seq-len", str(MAX_SEQ_LENGTH + 1)])
    captured = capsys.readouterr()
    assert (rc, captured.out) == (2, "")
    assert captured.err.strip().splitlines() == [
        f"jobs.embed: error: --max-seq-len {MAX_SEQ_LENGTH + 1} exceeds the model's max_seq_length {MAX_SEQ_LENGTH}"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.parquet"]  # no output, no work folder, no export


# ---------------------------------------------------------------------------------------------
# --pooling


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_pooling_override_equals_sentence_transformers_with_that_pooling(mode, bert, bert_st, export_cache_dir,
                                                                         tmp_path):
    """--pooling replaces only the Pooling module: the model's Dense and Normalize still follow it."""
    got, meta, _ = run_embed(tmp_path, bert, export_cache_dir, JOB_TEXTS, "--pooling", mode)
    assert_vectors_match(got, st_encode(sentence_transformer(bert, pooling=mode), JOB_TEXTS))
    assert meta["pooling"] == [mode]
    # Not the model's own CLS pooling under another name.
    assert cosines(got, st_encode(bert_st, JOB_TEXTS)).max() < DIFFERENT


# ---------------------------------------------------------------------------------------------
# jobs.export --no-normalize


def test_export_no_normalize_graph_gives_the_pipelines_raw_vectors(bert, bert_st, export_cache_dir, capsys):
    """The cache entry jobs.export prints runs the pipeline without its Normalize module: vectors of any
    length, equal to sentence-transformers' Transformer -> Pooling -> Dense."""
    argv = ["--model", str(bert), "--cache-dir", str(export_cache_dir), "--no-normalize", "--log-level", "ERROR"]
    assert export_main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    folder = Path(printed["folder"])
    manifest = Manifest.from_record(json.loads((folder / MANIFEST_FILE).read_text()))
    assert printed["normalize"] is False and manifest.normalize is False
    got = onnx_vectors(Artifact(folder, manifest, hit=printed["cache_hit"]), JOB_TEXTS)

    without_normalize = sentence_transformer(bert, drop_normalize=True)
    assert_vectors_match(got, st_encode(without_normalize, JOB_TEXTS, normalize_embeddings=False))
    assert (np.abs(np.linalg.norm(got, axis=1) - 1) > 1e-2).all(), "a raw vector has unit length"
    # Normalized afterwards, they are the model's own vectors.
    assert_vectors_match(got / np.linalg.norm(got, axis=1, keepdims=True), st_encode(bert_st, JOB_TEXTS))


# ---------------------------------------------------------------------------------------------
# --prometheus-out

# The figures a successful run writes, by the metrics JSON key each one carries.
GAUGES = {
    "embedder_rows": "rows",
    "embedder_null_rows": "null_rows",
    "embedder_output_rows": "output_rows",
    "embedder_real_tokens": "real_tokens",
    "embedder_padded_tokens": "padded_tokens",
    "embedder_padding_efficiency": "padding_efficiency",
    "embedder_wall_seconds": "wall_seconds",
    "embedder_rows_per_second": "rows_per_second",
    "embedder_tokens_per_second": "tokens_per_second",
    "embedder_peak_rss_megabytes": "peak_rss_mb",
}
_SAMPLE = re.compile(r'(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)\{output="(?P<output>(?:[^"\\]|\\.)*)"\} (?P<value>\S+)')


def parse_prometheus(text: str) -> dict[str, tuple[str, float]]:
    """Prometheus text format, strictly: every sample preceded by its HELP and a gauge TYPE, one sample a
    name. Returns name -> (output label, value)."""
    assert text.endswith("\n")
    samples: dict[str, tuple[str, float]] = {}
    helped, typed = set(), set()
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert help_text, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            name, kind = line[len("# TYPE "):].split(" ")
            assert kind == "gauge", line
            typed.add(name)
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"not a sample line: {line!r}"
            name = match["name"]
            assert name in helped and name in typed and name not in samples, line
            samples[name] = (match["output"], float(match["value"]))
    return samples


def test_prometheus_out_records_success_then_failure_atomically(bert, export_cache_dir, tmp_path, capsys):
    """After a success the file holds exit code 0 and every figure of the metrics JSON; after a failure,
    exit code 2 and no figures. Each write replaces the file by a rename and leaves nothing beside it."""
    textfile = tmp_path / "textfile"
    textfile.mkdir()
    prom = textfile / "embedder.prom"
    texts = [None, *JOB_TEXTS, None]  # null rows, so rows, null_rows and output_rows are told apart
    out = tmp_path / "run" / "out.parquet"

    started = time.time()
    _, _, metrics = run_embed(out.parent, bert, export_cache_dir, texts, "--prometheus-out", str(prom))
    samples = parse_prometheus(prom.read_text())
    assert {label for label, _ in samples.values()} == {str(out)}
    values = {name: value for name, (_, value) in samples.items()}
    assert values.pop("embedder_last_exit_code") == 0
    assert started <= values.pop("embedder_last_run_timestamp_seconds") <= time.time() + 0.001  # written as %.3f
    assert values["embedder_rows"] == len(texts) and values["embedder_null_rows"] == 2
    assert values["embedder_output_rows"] == len(texts)
    # Every other gauge is the metrics JSON's own figure, exactly.
    assert values == {name: float(metrics[key]) for name, key in GAUGES.items()}
    assert [p.name for p in textfile.iterdir()] == ["embedder.prom"]
    inode = prom.stat().st_ino

    # The same job reading a column the input does not have: a usage error, and the file says so.
    rc = embed_main(["--in", str(out.parent / "in.parquet"), "--out", str(out), "--model", str(bert),
                     "--cache-dir", str(export_cache_dir), "--device", "cpu", "--progress", "off",
                     "--text-col", "body", "--overwrite", "--prometheus-out", str(prom)])
    assert rc == 2
    assert "column 'body' not found" in capsys.readouterr().err
    samples = parse_prometheus(prom.read_text())
    assert set(samples) == {"embedder_last_exit_code", "embedder_last_run_timestamp_seconds"}
    assert samples["embedder_last_exit_code"] == (str(out), 2)
    assert [p.name for p in textfile.iterdir()] == ["embedder.prom"]
    # A new file renamed over the old one (a reader never sees it half written), not rewritten in place.
    assert prom.stat().st_ino != inode


def test_prometheus_label_escapes_what_the_format_requires(tmp_path):
    """A path with a backslash, a quote or a newline still gives one sample per line."""
    from embedder.run.report import write_prometheus

    path = tmp_path / "embedder.prom"
    write_prometheus(path, 'out\\dir/"x"\nname.parquet', 0, {"rows": 3})
    samples = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert samples[0] == 'embedder_last_exit_code{output="out\\\\dir/\\"x\\"\\nname.parquet"} 0'
    assert [s.split("{")[0] for s in samples] == ["embedder_last_exit_code", "embedder_last_run_timestamp_seconds",
                                                   "embedder_rows"]
