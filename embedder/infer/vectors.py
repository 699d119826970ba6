"""Vectors as the output stores them: the first D dimensions L2-normalized again (--truncate-dim), then the
output dtype (--output-dtype). numpy only: the inference path never imports torch.

The formulas are sentence-transformers' own, so that a stored vector equals
`quantize_embeddings(SentenceTransformer(m, truncate_dim=D).encode(texts, normalize_embeddings=True),
precision=dtype, ranges=ranges)` for the same float vectors (sentence_transformers/util/quantization.py, 6.x):
int8 and uint8 cut each dimension's [min, max] range into 255 steps (float32 arithmetic, floor, clip to 0..255,
int8 then shifts by -128); binary and ubinary keep the sign bit (> 0), packed 8 dimensions per byte with
numpy.packbits (big-endian bit order, the last byte padded with zero bits), binary shifted by -128 into int8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from embedder.config import CALIBRATED_DTYPES, OutputOptions
from embedder.errors import UsageError
from embedder.model.spec import ModelSpec
from embedder.schema import OUTPUT_DTYPES, embedding_type, stored_width

logger = logging.getLogger(__name__)

# sentence-transformers warns below this many calibration vectors: the ranges are unstable.
FEW_CALIBRATION_VECTORS = 100
FIRST_WINDOW = "the first window"


@dataclass(frozen=True, eq=False)
class VectorFormat:
    """How the graph's normalized vectors (model_dim long) become the stored ones."""

    model_dim: int
    dtype: str = "float32"
    truncate_dim: int | None = None
    ranges: np.ndarray | None = None  # int8/uint8: float32 (2, dim), per-dimension min then max
    calibration: str | None = None  # where the ranges came from, for the metadata

    @classmethod
    def for_model(cls, spec: ModelSpec, options: OutputOptions) -> VectorFormat:
        """The format options ask for, checked against the model (before any export); --truncate-dim defaults to
        the truncate_dim in the model's config_sentence_transformers.json, as sentence-transformers' does."""
        dim = spec.dim
        truncate_dim = options.truncate_dim if options.truncate_dim is not None else spec.truncate_dim
        if truncate_dim is not None:
            if truncate_dim > dim:
                raise UsageError(f"--truncate-dim {truncate_dim} exceeds the model's dimension {dim}")
            if options.truncate_dim is None:
                logger.info("truncating vectors to %d dimensions: the truncate_dim of %s's config", truncate_dim,
                            spec.name)
            elif spec.matryoshka_dims and truncate_dim not in (*spec.matryoshka_dims, dim):
                logger.warning("--truncate-dim %d is not one of the dimensions %s was trained for (%s): its "
                               "vectors may be much worse than at those", truncate_dim, spec.name,
                               ", ".join(map(str, spec.matryoshka_dims)))
        return cls(dim, options.dtype, truncate_dim)

    @property
    def dim(self) -> int:
        """Dimensions of a stored vector (before packing)."""
        return self.truncate_dim if self.truncate_dim is not None else self.model_dim

    @property
    def width(self) -> int:
        """Values per stored vector: dim, or dim / 8 rounded up for binary and ubinary."""
        return stored_width(self.dtype, self.dim)

    @property
    def numpy_dtype(self) -> np.dtype:
        """The dtype of a stored value."""
        return OUTPUT_DTYPES[self.dtype][0]

    @property
    def arrow_type(self):
        return embedding_type(self.dtype, self.dim)

    @property
    def needs_ranges(self) -> bool:
        """int8/uint8 output whose ranges are not known yet."""
        return self.dtype in CALIBRATED_DTYPES and self.ranges is None

    def with_ranges(self, ranges: np.ndarray, calibration: str) -> VectorFormat:
        ranges = np.asarray(ranges, dtype=np.float32)
        if ranges.shape != (2, self.dim):
            raise UsageError(f"quantization ranges of shape {ranges.shape}; {self.dim}-dimension vectors need "
                             f"(2, {self.dim})")
        return replace(self, ranges=ranges, calibration=calibration)

    def calibrated(self, vectors: np.ndarray, source: str) -> VectorFormat:
        """This format with ranges from float vectors (model_dim or dim long; the former are cut as rows are)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] not in (self.model_dim, self.dim):
            raise UsageError(f"{source}: calibration vectors of shape {vectors.shape}; need {self.dim} or "
                             f"{self.model_dim} dimensions")
        if vectors.shape[1] != self.dim:
            vectors = self.cut(vectors)
        if len(vectors) < 2:
            hint = ("; pass --calibration FILE (a Parquet file of float vectors in an 'embedding' column) or a "
                    "larger --window-rows") if source == FIRST_WINDOW else ""
            raise UsageError(f"--output-dtype {self.dtype} calibrates its ranges on {source}, which has "
                             f"{len(vectors)} vector(s); at least 2 are needed{hint}")
        if len(vectors) < FEW_CALIBRATION_VECTORS:
            logger.warning("--output-dtype %s: ranges calibrated on only %d vectors (%s); quantization is more "
                           "stable with more: pass --calibration FILE", self.dtype, len(vectors), source)
        return self.with_ranges(quantization_ranges(vectors), f"{source} ({len(vectors)} vectors)")

    def cut(self, vectors: np.ndarray) -> np.ndarray:
        """The first truncate_dim dimensions, L2-normalized again (as torch.nn.functional.normalize: the norm
        floored at 1e-12); vectors as they are without truncation."""
        if self.truncate_dim is None or self.truncate_dim == vectors.shape[1]:
            return vectors
        head = vectors[:, : self.truncate_dim]
        norms = np.linalg.norm(head, axis=1, keepdims=True)
        return (head / np.maximum(norms, np.float32(1e-12))).astype(np.float32, copy=False)

    def store(self, vectors: np.ndarray) -> np.ndarray:
        """The graph's float32 vectors (n, model_dim) as stored: (n, width) of the dtype."""
        if self.needs_ranges:
            raise UsageError(f"--output-dtype {self.dtype} has no ranges yet")  # the embedder calibrates first
        return quantize(self.cut(vectors), self.dtype, self.ranges)

    def metadata(self) -> dict:
        """What the output file records about its vectors (README, Output)."""
        return {
            "dim": self.dim,
            "model_dim": self.model_dim,
            "truncate_dim": self.truncate_dim,
            "output_dtype": self.dtype,
            # float32 holds every value exactly in JSON's doubles: np.float32(value) gives the same bits back.
            "ranges": None if self.ranges is None else self.ranges.astype(np.float64).tolist(),
            "calibration": self.calibration,
        }


def quantization_ranges(vectors: np.ndarray) -> np.ndarray:
    """Per-dimension (min, max) of float vectors, as sentence-transformers computes them from calibration vectors."""
    return np.vstack((np.min(vectors, axis=0), np.max(vectors, axis=0)))


def ranges_from_metadata(metadata: dict) -> np.ndarray | None:
    """The ranges an output file's `embedder` metadata records, as the float32 array they were computed as."""
    ranges = metadata.get("ranges")
    return None if ranges is None else np.asarray(ranges, dtype=np.float32)


def quantize(vectors: np.ndarray, dtype: str, ranges: np.ndarray | None = None) -> np.ndarray:
    """sentence-transformers' quantize_embeddings(vectors, precision=dtype, ranges=ranges), plus float16."""
    if dtype == "float32":
        return vectors.astype(np.float32, copy=False)
    if dtype == "float16":
        return vectors.astype(np.float16)
    if dtype in CALIBRATED_DTYPES:
        ranges = ranges.astype(np.float32, copy=False)
        starts = ranges[0, :]
        steps = (ranges[1, :] - starts) / 255
        steps = np.where(steps == 0, 1, steps)
        q_vals = np.clip(np.floor((vectors - starts) / steps), 0, 255)
        return q_vals.astype(np.uint8) if dtype == "uint8" else (q_vals - 128).astype(np.int8)
    if dtype == "binary":
        return (np.packbits(vectors > 0, axis=-1) - 128).astype(np.int8)
    if dtype == "ubinary":
        return np.packbits(vectors > 0, axis=-1)
    raise UsageError(f"--output-dtype {dtype} is not supported; valid: {', '.join(OUTPUT_DTYPES)}")
