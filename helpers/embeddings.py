"""Embedding tables: the parquet format every encoder writes and every fusion run reads.

Format (DESIGN.md): ``study_id`` (string), ``embedding`` (fixed-size list of float32) and
optional ``tokens`` (list of fixed-size lists of float32, e.g. one per CT slice). The parquet
schema metadata key ``helpers`` holds JSON describing the encoder, its checkpoint hash and the
preprocessing parameters.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["EmbeddingTable", "EmbeddingError", "write_embeddings", "read_embeddings", "embedding_path"]

_META_KEY = b"helpers"


class EmbeddingError(ValueError):
    """An embedding table is malformed or does not match the cohort."""


@dataclass
class EmbeddingTable:
    """``embedding``: float32 array, shape (n_studies, dim). ``tokens``: None, or a list of
    float32 arrays of shape (n_tokens_i, dim_tokens), one per study. ``metadata``: encoder
    name, checkpoint hash, preprocessing."""

    study_ids: np.ndarray
    embedding: np.ndarray
    tokens: list[np.ndarray] | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def align(self, study_ids: np.ndarray | list[str], *, source: str = "embedding table") -> EmbeddingTable:
        """The rows for ``study_ids`` in that order; ``EmbeddingError`` if any is missing
        (with the count and up to five examples)."""
        position = {sid: i for i, sid in enumerate(self.study_ids)}
        wanted = [str(s) for s in study_ids]
        missing = [s for s in wanted if s not in position]
        if missing:
            raise EmbeddingError(
                f"{source}: {len(missing)} of {len(wanted)} cohort studies have no embedding, "
                f"e.g. {', '.join(missing[:5])}"
            )
        rows = np.array([position[s] for s in wanted], dtype=np.int64)
        tokens = [self.tokens[i] for i in rows] if self.tokens is not None else None
        return EmbeddingTable(np.asarray(wanted, dtype=object), self.embedding[rows], tokens, self.metadata)


def embedding_path(run_root: Path, task: str, modality: str, encoder: str) -> Path:
    """``<run_root>/embeddings/<task>/<modality>-<encoder>.parquet``."""
    return Path(run_root) / "embeddings" / task / f"{modality}-{encoder}.parquet"


def write_embeddings(
    path: Path,
    study_ids: list[str] | np.ndarray,
    embedding: np.ndarray,
    *,
    tokens: list[np.ndarray] | None = None,
    metadata: dict | None = None,
) -> Path:
    """Write an embedding table atomically (a temp file renamed when complete)."""
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2:
        raise EmbeddingError(f"embedding must have shape (n_studies, dim), got {embedding.shape}")
    if len(study_ids) != embedding.shape[0]:
        raise EmbeddingError(
            f"Dimension mismatch: 'embedding' has {embedding.shape[0]} rows but 'study_ids' has {len(study_ids)}"
        )
    dim = embedding.shape[1]
    columns = {
        "study_id": pa.array([str(s) for s in study_ids], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1)), dim),
    }
    if tokens is not None:
        if len(tokens) != embedding.shape[0]:
            raise EmbeddingError(f"'tokens' has {len(tokens)} entries but there are {embedding.shape[0]} studies")
        tdim = int(np.asarray(tokens[0]).shape[1])
        flat = np.concatenate([np.asarray(t, dtype=np.float32).reshape(-1, tdim) for t in tokens])
        offsets = np.concatenate([[0], np.cumsum([len(t) for t in tokens])]).astype(np.int32)
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1)), tdim)
        columns["tokens"] = pa.ListArray.from_arrays(pa.array(offsets), inner)
    table = pa.table(columns)
    meta = dict(metadata or {})
    meta.setdefault("dim", dim)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def read_embeddings(path: Path, *, tokens: bool = True) -> EmbeddingTable:
    """Read and check an embedding table: the columns, fixed dimension, no duplicated study
    ids, no NaN or infinite values. Errors name the file and give counts and examples.
    ``tokens=False`` skips the token column (faster when only the pooled embedding is used)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: embedding table not found")
    names = pq.read_schema(path).names
    table = pq.read_table(path, columns=[c for c in names if tokens or c != "tokens"])
    for column in ("study_id", "embedding"):
        if column not in table.column_names:
            raise EmbeddingError(f"{path}: missing column {column!r}; expected study_id, embedding[, tokens]")
    ids = np.asarray(table.column("study_id").to_pylist(), dtype=object).astype(str).astype(object)
    embedding = _fixed_matrix(table.column("embedding"), path, "embedding")
    problems = []
    dup = ids[np.asarray(_duplicated(ids))]
    if len(dup):
        problems.append(f"{len(dup)} duplicated study_id, e.g. {', '.join(map(str, dup[:5]))}")
    bad = ~np.isfinite(embedding).all(axis=1)
    if bad.any():
        problems.append(f"{int(bad.sum())} row(s) with NaN or infinite values, e.g. {', '.join(map(str, ids[bad][:5]))}")
    token_arrays = None
    if "tokens" in table.column_names:
        token_arrays = _token_lists(table.column("tokens"), path)
        bad_tok = [i for i, t in enumerate(token_arrays) if len(t) == 0 or not np.isfinite(t).all()]
        if bad_tok:
            problems.append(f"{len(bad_tok)} row(s) with empty or non-finite tokens, e.g. {', '.join(map(str, ids[bad_tok][:5]))}")
    if problems:
        raise EmbeddingError(f"{path}: " + "; ".join(problems))
    raw = (table.schema.metadata or {}).get(_META_KEY)
    metadata = json.loads(raw) if raw else {}
    return EmbeddingTable(ids, embedding, token_arrays, metadata)


def _fixed_matrix(column: pa.ChunkedArray, path: Path, name: str) -> np.ndarray:
    """A fixed-size-list (or equal-length list) column as a float32 (n, dim) array, without
    going through Python objects."""
    array = column.combine_chunks()
    if array.null_count:
        raise EmbeddingError(f"{path}: column {name!r} has {array.null_count} missing row(s)")
    if pa.types.is_fixed_size_list(array.type):
        dim = array.type.list_size
    elif pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        lengths = np.diff(array.offsets.to_numpy())
        if len(lengths) and (lengths.min() != lengths.max() or lengths.min() == 0):
            raise EmbeddingError(
                f"{path}: embeddings have different or empty lengths {sorted(set(lengths.tolist()))[:5]}"
            )
        dim = int(lengths[0]) if len(lengths) else 0
    else:
        raise EmbeddingError(f"{path}: column {name!r} must be a list of floats, got {array.type}")
    values = array.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    return values.reshape(len(array), dim)


def _token_lists(column: pa.ChunkedArray, path: Path) -> list[np.ndarray]:
    """A list<fixed_size_list<float>> column as one float32 (n_tokens_i, dim) array per row."""
    array = column.combine_chunks()
    if array.null_count:
        raise EmbeddingError(f"{path}: column 'tokens' has {array.null_count} missing row(s)")
    offsets = array.offsets.to_numpy()
    inner = array.values
    if not pa.types.is_fixed_size_list(inner.type):
        raise EmbeddingError(f"{path}: column 'tokens' must be a list of fixed-size lists of floats, got {array.type}")
    dim = inner.type.list_size
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    base = offsets[0]
    return [flat[a - base : b - base] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


def _duplicated(values: np.ndarray) -> list[bool]:
    seen: set = set()
    out = []
    for v in values:
        out.append(v in seen)
        seen.add(v)
    return out
