"""Build a Parquet text corpus from the docstrings of installed Python packages.

Why: benchmarks and tests of the embedding job need REAL text written by people, with the
long-tailed length distribution of a search corpus (many one-liners, a few page-long essays),
not uniform synthetic text. Docstrings ship with every Python install; reading them with `ast`
needs no network and imports nothing. Output is deterministic for one Python install,
--packages and --seed: files are read in sorted order, docstrings cleaned (inspect.cleandoc +
strip), de-duplicated, shuffled by --seed, and cycled in that order if --rows exceeds their
number. --repeat-fraction F then makes round(F * rows) rows repeat the text (and source) of an earlier row,
as real corpora repeat boilerplate (licence headers, "See also", cookie banners): for a dedup benchmark.
The repeated rows and which earlier row each copies are drawn from their own stream of --seed, so F=0
leaves the output exactly as it was. --edit-fraction F edits round(F * rows) non-null rows, as a corpus changes
from one night to the next: each gets the first line of another docstring appended (stream [seed, 2]); the
same --seed with and without it gives yesterday's and today's corpus, row for row (scripts/bench_reuse.py).
Columns: id (int64, 0..N-1), source ("module:Qualified.name"), text (string, may be null).

Rerun:  python scripts/make_corpus.py                      # data/sample.parquet, 2,000 rows
        python scripts/make_corpus.py --out data/bench_1m --rows 1000000 --files 8
        python scripts/make_corpus.py --out data/repeat40.parquet --rows 4000 --repeat-fraction 0.4
        python scripts/make_corpus.py --out data/day2.parquet --rows 200000 --edit-fraction 0.02
"""
import argparse
import ast
import importlib.util
import inspect
import json
import logging
import os
import shutil
import sysconfig
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

log = logging.getLogger("make_corpus")
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
DEFS = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # if/try/with bodies can hold defs


def package_sources(name: str) -> list[tuple[Path, Path]]:
    """(import root, .py file) pairs for 'stdlib' or one importable package/module, sorted."""
    if name == "stdlib":
        root = top = Path(sysconfig.get_paths()["stdlib"])
    else:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not (spec.origin or "").endswith(".py"):
            raise SystemExit(f"make_corpus: no Python source found for package {name!r}")
        top = Path(spec.origin).parent if spec.submodule_search_locations else Path(spec.origin)
        root = top.parent
    if top.is_file():
        return [(root, top)]
    found = []
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and d.isidentifier())
        found += [(root, Path(folder, f)) for f in sorted(files) if f.endswith(".py")]
    return found


def module_name(root: Path, path: Path) -> str:
    """Dotted module name of `path` under the import root `root`."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def file_docstrings(module: str, path: Path) -> list[tuple[str, str]]:
    """(source, cleaned docstring) for the module and each class/function in it, file order."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # SyntaxWarning for old escape sequences
        try:
            tree = ast.parse(path.read_bytes())
        except (SyntaxError, ValueError):
            return []
    found = [(module, ast.get_docstring(tree, clean=False))]

    def visit(node: ast.AST, prefix: str) -> None:  # prefix: "", "Cls." or "func.<locals>."
        for child in ast.iter_child_nodes(node):
            if isinstance(child, DEFS):
                found.append((f"{module}:{prefix}{child.name}", ast.get_docstring(child, False)))
                scope = "." if isinstance(child, ast.ClassDef) else ".<locals>."
                visit(child, prefix + child.name + scope)
            elif isinstance(child, BLOCKS):
                visit(child, prefix)

    visit(tree, "")
    return [(src, text) for src, doc in found if doc and (text := inspect.cleandoc(doc).strip())]


def collect(packages: list[str]) -> tuple[list[str], list[str]]:
    """Sources and distinct docstrings (first occurrence wins) over the packages, read order."""
    seen: dict[str, str] = {}
    files = dict.fromkeys(pair for name in packages for pair in package_sources(name))
    for root, path in files:
        for source, text in file_docstrings(module_name(root, path), path):
            seen.setdefault(text, source)
    return list(seen.values()), list(seen.keys())


def row_indices(n_docs: int, rows: int, seed: int, nulls: float) -> tuple[np.ndarray, ...]:
    """Per-row document index (shuffled, cycled) and text index (n_docs marks a null text)."""
    rng = np.random.default_rng(seed)
    doc = rng.permutation(n_docs)[np.arange(rows) % n_docs]
    text = doc.copy()
    text[rng.choice(rows, size=round(rows * nulls), replace=False)] = n_docs
    return doc, text


def repeat_rows(doc: np.ndarray, text: np.ndarray, null: int, seed: int, fraction: float) -> int:
    """Make round(fraction * rows) non-null rows (never the first) copy the text and source of an earlier row
    that keeps its own, uniformly drawn; in place. Returns how many rows repeat. A stream of its own
    ([seed, 1]) leaves the row order and nulls of row_indices as they are."""
    count = round(len(text) * fraction)
    if not count:
        return 0
    filled = np.flatnonzero(text != null)
    if count > len(filled) - 1:
        raise SystemExit(f"make_corpus: --repeat-fraction {fraction} asks {count} repeated rows, but only "
                         f"{max(len(filled) - 1, 0)} non-null rows follow the first one")
    rng = np.random.default_rng([seed, 1])
    repeats = np.sort(rng.choice(filled[1:], size=count, replace=False))
    originals = np.setdiff1d(filled, repeats, assume_unique=True)  # sorted; holds filled[0]
    earlier = np.searchsorted(originals, repeats)  # originals before each repeated row: at least 1
    copied = originals[rng.integers(0, earlier)]
    doc[repeats], text[repeats] = doc[copied], text[copied]
    return count


def edit_rows(column: pa.Array, texts: list[str], seed: int, fraction: float) -> pa.Array:
    """round(fraction * rows) non-null rows with the first line of another docstring appended ([seed, 2])."""
    count = round(len(column) * fraction)
    if not count:
        return column
    filled = np.flatnonzero(column.is_valid().to_numpy(zero_copy_only=False))
    if count > len(filled):
        raise SystemExit(f"make_corpus: --edit-fraction {fraction} asks {count} edited rows of {len(filled)} non-null")
    rng = np.random.default_rng([seed, 2])
    rows = np.sort(rng.choice(filled, size=count, replace=False))
    added = rng.integers(0, len(texts), size=count)
    edited = [column[int(r)].as_py() + "\n\n" + texts[int(a)].splitlines()[0] for r, a in zip(rows, added)]
    mask = np.zeros(len(column), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(column, pa.array(mask), pa.array(edited, pa.string()))


def build_tables(sources: list[str], texts: list[str], rows: int, files: int, seed: int,
                 null_fraction: float, repeat_fraction: float = 0.0, edit_fraction: float = 0.0) -> list[pa.Table]:
    """One table per output file, rows split in order, built with vectorised take."""
    source_arr, text_arr = pa.array(sources, pa.string()), pa.array(texts + [None], pa.string())
    doc, text = row_indices(len(texts), rows, seed, null_fraction)
    repeat_rows(doc, text, len(texts), seed, repeat_fraction)
    column = edit_rows(text_arr.take(pa.array(text)), texts, seed, edit_fraction)
    bounds = np.linspace(0, rows, files + 1).astype(np.int64)
    return [pa.table({"id": pa.array(np.arange(a, b, dtype=np.int64)),
                      "source": source_arr.take(pa.array(doc[a:b])),
                      "text": column.slice(a, b - a)})
            for a, b in zip(bounds[:-1], bounds[1:])]


def write_atomic(tables: list[pa.Table], out: Path, row_group_rows: int) -> None:
    """Write a file (one table) or folder (several) beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = (out.with_name(f".{out.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    try:
        if len(tables) > 1:
            tmp.mkdir()
        for i, table in enumerate(tables):
            path = tmp / f"part-{i:05d}.parquet" if len(tables) > 1 else tmp
            pq.write_table(table, path, row_group_size=row_group_rows)
    except BaseException:
        remove(tmp)
        raise
    if out.is_dir() or (tmp.is_dir() and out.exists()):  # os.replace cannot swap these
        out.rename(old)
    os.replace(tmp, out)
    remove(old)


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def summary(tables: list[pa.Table], out: Path, distinct: int, seconds: float) -> dict:
    """The JSON summary: counts and the character-length distribution of non-null texts."""
    lengths = np.concatenate([pc.utf8_length(t["text"]).drop_null().to_numpy() for t in tables])
    lengths = lengths if lengths.size else np.zeros(1, np.int64)  # an all-null corpus
    median, p95 = np.percentile(lengths, [50, 95]).round(1).tolist()
    return {"rows": sum(t.num_rows for t in tables), "files": len(tables),
            "distinct_texts": distinct, "null_texts": sum(t["text"].null_count for t in tables),
            "chars_mean": round(float(lengths.mean()), 1), "chars_median": median,
            "chars_p95": p95, "chars_max": int(lengths.max()), "seconds": round(seconds, 2),
            "out": str(out)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("data/sample.parquet"))
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--files", type=int, default=1, help="K > 1 writes a folder of K files")
    p.add_argument("--row-group-rows", type=int, default=10_000)
    p.add_argument("--packages", default="stdlib", help="comma list: stdlib and/or packages")
    p.add_argument("--seed", type=int, default=0, help="row order and null positions")
    p.add_argument("--null-fraction", type=float, default=0.0)
    p.add_argument("--repeat-fraction", type=float, default=0.0,
                   help="share of rows that repeat the text of an earlier row (default 0: none)")
    p.add_argument("--edit-fraction", type=float, default=0.0,
                   help="share of non-null rows edited (a line of another docstring appended), as a corpus changes "
                        "between nightly runs (default 0: none)")
    a = p.parse_args(argv)
    if not (1 <= a.files <= a.rows and a.row_group_rows >= 1 and 0 <= a.null_fraction <= 1
            and 0 <= a.repeat_fraction < 1 and 0 <= a.edit_fraction <= 1):
        p.error("need 1 <= files <= rows, row-group-rows >= 1, 0 <= null-fraction <= 1 and "
                "0 <= repeat-fraction < 1")
    return a


def main(argv: list[str] | None = None) -> dict:
    """Build the corpus, write it, print and return the summary."""
    args, start = parse_args(argv), time.perf_counter()
    sources, texts = collect([n.strip() for n in args.packages.split(",") if n.strip()])
    if not texts:
        raise SystemExit(f"make_corpus: no docstrings found in {args.packages!r}")
    if args.rows > len(texts):
        log.info("%d rows > %d distinct docstrings: cycling through them %.1f times",
                 args.rows, len(texts), args.rows / len(texts))
    tables = build_tables(sources, texts, args.rows, args.files, args.seed, args.null_fraction,
                          args.repeat_fraction, args.edit_fraction)
    write_atomic(tables, args.out, args.row_group_rows)
    result = summary(tables, args.out, len(texts), time.perf_counter() - start)
    if args.repeat_fraction:
        result["repeated_rows"] = round(args.rows * args.repeat_fraction)
    if args.edit_fraction:
        result["edited_rows"] = round(args.rows * args.edit_fraction)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    main()
