"""Validated, frozen configuration objects passed down from jobs/ into the library."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from embedder.errors import UsageError
from embedder.model.spec import Pooling, parse_pooling
from embedder.schema import EMBEDDING_COLUMN, OUTPUT_DTYPES, TOKENS_COLUMN, TRUNCATED_COLUMN

# Graph precisions. Which device kinds run each is the device table's (infer/devices.py): int8 uses
# CPU-only kernels; fp16 is for CUDA (on the CPU onnxruntime casts much of it back to fp32, so it would
# not be the fp16 measured by the gate on a GPU host). Both are gated against fp32 at export.
PRECISIONS = ("fp32", "int8", "fp16")
DEFAULT_OPSET = 17


@dataclass(frozen=True)
class ExportOptions:
    """Choices that change the exported graph (and so are part of its cache key)."""

    # None: the model's own pooling. The --pooling string ("cls+mean") is parsed here, so the command line
    # and the Python API cannot read it differently.
    pooling: tuple[Pooling, ...] | str | None = None
    normalize: bool = True
    precision: str = "fp32"
    opset: int = DEFAULT_OPSET

    def __post_init__(self) -> None:
        object.__setattr__(self, "pooling", parse_pooling(self.pooling) if self.pooling else None)
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision '{self.precision}' is not supported; valid: {', '.join(PRECISIONS)}")
        if not 14 <= self.opset <= 20:
            raise UsageError(f"opset {self.opset} is outside the supported range 14..20")


# Output dtypes whose values need per-dimension ranges (calibrated, stored in the file's metadata).
CALIBRATED_DTYPES = ("int8", "uint8")


@dataclass(frozen=True)
class OutputOptions:
    """How vectors are stored and what comes with them; none of it changes the graph or its cache entry."""

    truncate_dim: int | None = None  # keep the first D dimensions, L2-normalized again; None: the model's own
    dtype: str = "float32"  # one of OUTPUT_DTYPES (embedder/schema.py)
    calibration: str | None = None  # int8/uint8: a Parquet file (path or URI) of float vectors in `embedding`
    token_counts: bool = False  # add `tokens` and `truncated` columns
    text_key: bool = True  # add `text_key`, what a later --reuse matches rows by (Embedder.embed: off)

    def __post_init__(self) -> None:
        if self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"--output-dtype {self.dtype} is not supported; valid: {', '.join(OUTPUT_DTYPES)}")
        if self.truncate_dim is not None and (isinstance(self.truncate_dim, bool) or self.truncate_dim < 1):
            raise UsageError(f"--truncate-dim must be at least 1, got {self.truncate_dim}")
        if self.calibration is not None:
            if self.dtype not in CALIBRATED_DTYPES:
                raise UsageError(f"--calibration sets the ranges of --output-dtype int8 or uint8, not {self.dtype}")
            object.__setattr__(self, "calibration", _location(self.calibration, "--calibration"))

    @property
    def calibrated(self) -> bool:
        """The dtype needs per-dimension ranges."""
        return self.dtype in CALIBRATED_DTYPES

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the job adds after the carried ones (--chunk adds its own: schema.added_columns)."""
        return (TOKENS_COLUMN, TRUNCATED_COLUMN, EMBEDDING_COLUMN) if self.token_counts else (EMBEDDING_COLUMN,)


CHUNK_POOLINGS = ("mean", "max", "first")


@dataclass(frozen=True)
class ChunkOptions:
    """--chunk: texts longer than the model takes are split at word starts instead of truncated."""

    tokens: int | None = None  # most tokens per chunk, special tokens and prompt included; None: max_seq_length
    overlap: int = 0  # most tokens a chunk repeats from the one before (snapped to a word start)
    pooling: str | None = None  # None: one row per chunk; mean, max or first: one row per text

    def __post_init__(self) -> None:
        if self.tokens is not None and (isinstance(self.tokens, bool) or self.tokens < 2):
            raise UsageError(f"--chunk-tokens must be at least 2, got {self.tokens}")
        if isinstance(self.overlap, bool) or self.overlap < 0:
            raise UsageError(f"--chunk-overlap must be 0 or more, got {self.overlap}")
        if self.pooling is not None and self.pooling not in CHUNK_POOLINGS:
            raise UsageError(f"--chunk-pooling {self.pooling} is not supported; valid: {', '.join(CHUNK_POOLINGS)}")

    @property
    def layout(self) -> str:
        """The output's chunk columns (schema.CHUNK_FIELDS): "rows", one row per chunk, or "pooled", one per text."""
        return "rows" if self.pooling is None else "pooled"

    def metadata(self) -> dict:
        """What the output file's metadata and the resume fingerprint record (tokens as resolved by the caller)."""
        return {"tokens": self.tokens, "overlap": self.overlap, "pooling": self.pooling}


def chunk_options(chunk: bool, tokens: int | None, overlap: int, pooling: str | None) -> ChunkOptions | None:
    """--chunk and its options as given (--chunk-pooling implies --chunk); its options without it are refused."""
    if not (chunk or pooling):
        if tokens is not None or overlap:
            raise UsageError("--chunk-tokens and --chunk-overlap apply with --chunk")
        return None
    return ChunkOptions(tokens, overlap, pooling)


@dataclass(frozen=True)
class TextSource:
    """Where a row's text comes from: one column, or a str.format template over several ({title}\n\n{body}).

    With a template a null field reads as empty text, and a row whose fields are all null has no text (a null
    vector), as a null in the one text column does.
    """

    column: str | None = "text"
    template: str | None = None

    def __post_init__(self) -> None:
        if self.template is not None:
            if self.column is not None:
                raise UsageError("--text-col and --text-template are mutually exclusive: the template names its "
                                 "columns ({title}); drop --text-col")
            template_fields(self.template)  # refuse a bad template now
        elif not self.column:
            raise UsageError("--text-col must name a column")

    @classmethod
    def of(cls, text_col: str | None, template: str | None) -> TextSource:
        """--text-col (default 'text' when there is no template) and --text-template as given."""
        if template is None:
            return cls("text" if text_col is None else text_col)
        return cls(text_col, template)

    @property
    def columns(self) -> tuple[str, ...]:
        """The input columns the text is made of, in order of first use."""
        return template_fields(self.template) if self.template is not None else (self.column,)


def template_fields(template: str) -> tuple[str, ...]:
    """The column names a --text-template's {fields} name, each once; refuses what str.format cannot fill by name."""
    import string

    names: list[str] = []
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise UsageError(f"--text-template {template!r}: {e}") from None
    for _, name, spec, _ in parsed:
        if name is None:
            continue
        if not name or name.isdigit() or any(c in name for c in ".[]"):
            raise UsageError(f"--text-template {template!r}: field {{{name}}} must name a column, as in {{title}} "
                             "(no positions, attributes or indexes)")
        if spec and "{" in spec:
            raise UsageError(f"--text-template {template!r}: nested fields in format specs are not supported")
        if name not in names:
            names.append(name)
    if not names:
        raise UsageError(f"--text-template {template!r} names no column; use {{column}} fields")
    try:
        template.format_map(dict.fromkeys(names, ""))  # a format spec str cannot take ({title:d}) fails now
    except (ValueError, TypeError) as e:
        raise UsageError(f"--text-template {template!r}: {e}") from None
    return tuple(names)


def default_cache_dir() -> Path:
    """$EMBEDDER_CACHE, else the user's cache folder."""
    import os

    if os.environ.get("EMBEDDER_CACHE"):
        return Path(os.environ["EMBEDDER_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "embedder"


@dataclass(frozen=True)
class JobConfig:
    """Everything one run of the batch job needs, checked once here."""

    inputs: str  # a file, folder or glob; a local path or a URI (s3://)
    output: str  # a file, or a folder of parts where it ends in '/'; a local path or a URI
    model: str | None = None
    text_col: str | None = None  # None: "text", unless text_template names the columns
    keep_cols: tuple[str, ...] | str | None = None  # None: every column but the text column(s); "a,b" as --keep-cols
    device: str = "auto"
    export: ExportOptions = ExportOptions()
    max_seq_len: int | None = None  # None: the model's max_seq_length
    max_tokens: int | None = None  # padded tokens (rows x longest row) per batch; None: sized for the device
    max_batch_size: int = 256
    window_rows: int = 20000
    prompt: str | None = None  # None: the model's default prompt, if it has one
    cache_dir: Path | None = None
    threads: int | None = None
    metrics_out: Path | None = None
    overwrite: bool = False
    progress: str = "auto"
    shard: tuple[int, int] | str = (0, 1)  # (index, count) or "I/N": this job embeds part index of count
    resume: bool = False  # insist on resuming committed progress (it is resumed by default anyway)
    restart: bool = False  # discard committed progress
    prometheus_out: Path | None = None
    text_template: str | None = None  # "{title}\n\n{body}": the text made of several columns
    output_options: OutputOptions = OutputOptions()  # --truncate-dim, --output-dtype, --calibration, --with-token-counts
    reuse: str | None = None  # --reuse PREV: an earlier output whose vectors are taken for unchanged texts
    reuse_strict: bool = False  # a PREV made with other options is an error, not a warning and a full run
    id_col: str | None = None  # with reuse: write the ids added, changed and deleted beside OUT
    chunking: ChunkOptions | None = None  # --chunk; None: texts are truncated at max_seq_length
    dedup: bool = True  # identical token sequences in a window are embedded once
    window_mb: float = 16.0  # most megabytes of text per window, whatever window_rows says

    def __post_init__(self) -> None:
        # The command line's string forms are parsed here, once for every caller (jobs/, embedder.api).
        object.__setattr__(self, "inputs", _location(self.inputs, "--in"))
        object.__setattr__(self, "output", _location(self.output, "--out"))
        if self.keep_cols is not None:
            object.__setattr__(self, "keep_cols", parse_columns(self.keep_cols))
        object.__setattr__(self, "shard", parse_shard(self.shard))
        check_embedding_options(self.max_seq_len, self.max_tokens, self.max_batch_size, self.window_rows, self.threads)
        if not self.window_mb > 0:
            raise UsageError(f"--window-mb must be above 0, got {self.window_mb}")
        if self.progress not in ("auto", "on", "off"):
            raise UsageError(f"--progress must be auto, on or off, got {self.progress}")
        if self.reuse is not None:
            object.__setattr__(self, "reuse", _location(self.reuse, "--reuse"))
            if self.id_col is not None and not self.output_options.text_key:
                raise UsageError("--id-col compares text keys: drop --no-text-key")
        elif self.reuse_strict or self.id_col:
            raise UsageError("--reuse-strict and --id-col apply with --reuse PREV")
        if self.resume and self.restart:
            raise UsageError("--resume and --restart contradict each other; pick one")
        text = TextSource.of(self.text_col, self.text_template)
        object.__setattr__(self, "text_col", text.column)
        kept = [name for name in text.columns if self.keep_cols and name in self.keep_cols]
        if kept:
            # The reader hands the window embedder each column once, and the text columns are consumed.
            raise UsageError(f"--keep-cols names {', '.join(kept)}, which the text is read from; the output cannot "
                             "carry a text column yet: copy it under another name to keep it")
        if self.output_options.calibrated and self.output_options.calibration is None and self.shard[1] > 1:
            # Each shard would calibrate on its own first window: the shards' vectors would not be comparable.
            raise UsageError(f"--shard with --output-dtype {self.output_options.dtype} needs --calibration FILE, so that "
                             "every shard quantizes with the same ranges")

    @property
    def text(self) -> TextSource:
        """Where each row's text comes from."""
        return TextSource(self.text_col, self.text_template)


def _location(value, flag: str) -> str:
    """A path or URI as given (a trailing '/' is meaningful); a PathLike becomes its string."""
    import os

    text = os.fspath(value) if not isinstance(value, str) else value
    if not text:
        raise UsageError(f"{flag} must name a file, folder or URI")
    return text


def check_embedding_options(max_seq_len: int | None, max_tokens: int | None, max_batch_size: int, window_rows: int,
                            threads: int | None) -> None:
    """Refuse limits no run can use; the job and embedder.api.Embedder share them (messages name the flags)."""
    for name, value in (("max_tokens", max_tokens), ("max_batch_size", max_batch_size), ("window_rows", window_rows),
                        ("threads", threads)):
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if max_seq_len is not None and max_seq_len < 2:
        raise UsageError(f"--max-seq-len must be at least 2, got {max_seq_len}")


def parse_columns(value: str | Iterable[str]) -> tuple[str, ...]:
    """Column names: "a,b" as --keep-cols takes them ('' for none), or any iterable of names."""
    if isinstance(value, str):
        return tuple(c.strip() for c in value.split(",") if c.strip())
    return tuple(value)


def parse_shard(value: str | tuple[int, int]) -> tuple[int, int]:
    """'I/N' or (I, N) -> (I, N) with 0 <= I < N."""
    try:
        index, count = (int(x) for x in (value.split("/") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise UsageError(f"--shard {value}: expected I/N, for example 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {index}/{count}: need 0 <= I < N")
    return index, count
