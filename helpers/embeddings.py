"""Embedding tables: the parquet format every encoder writes and every fusion run reads.

Format (DESIGN.md): ``study_id`` (string), ``embedding`` (fixed-size list of float32) and
optional ``tokens`` (list of fixed-size lists of float32, e.g. one per CT slice). The parquet
schema metadata key ``helpers`` holds JSON describing the encoder, its checkpoint hash and the
preprocessing parameters.

When every study has the same number of tokens, ``write_embeddings`` also writes them as one
float32 ``.npy`` array next to the table (``<stem>.tokens-<key>.npy``, named in the metadata
as ``token_file``), a copy that ``read_embeddings`` loads in a fraction of a second instead of
decoding the nested parquet column (about 5 s for 4,600 studies x 16 slices x 1,152). The
parquet keeps its ``tokens`` column, so the table stands alone; a table without the copy, or
whose copy is missing or does not match, is read from the column.

An image encoder leaves out a study whose CT cannot be read; such studies are listed, with
the reason, in a CSV file next to the table (``exclusions_path``; columns
``EXCLUSION_COLUMNS``), and counted in the table's metadata. Training marks a cohort study
absent from the table as missing that modality (``helpers.training.split_arrays``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "EXCLUSION_COLUMNS",
    "EmbeddingTable",
    "EmbeddingError",
    "write_embeddings",
    "read_embeddings",
    "embedding_path",
    "exclusions_path",
    "write_exclusions",
]

_META_KEY = b"helpers"
# The metadata key naming the table's .npy copy of its tokens (see the module's docstring).
_TOKEN_FILE = "token_file"
# One row per study an extraction left out: its id, the image it could not read, the class
# of the error and its message (which names the file or folder and what was expected).
EXCLUSION_COLUMNS = ("study_id", "image_path", "error", "reason")


class EmbeddingError(ValueError):
    """An embedding table is malformed or does not match the cohort."""


@dataclass
class EmbeddingTable:
    """``embedding``: float32 array, shape (n_studies, dim). ``tokens``: None, or a list of
    float32 arrays of shape (n_tokens_i, dim_tokens), one per study. ``metadata``: encoder
    name, checkpoint hash, preprocessing. ``token_array()``: the tokens as one array when every
    study has the same number."""

    study_ids: np.ndarray
    embedding: np.ndarray
    tokens: list[np.ndarray] | None = None
    metadata: dict = field(default_factory=dict)
    # (n, T, d) array whose rows are ``tokens`` (views of it), set when read from a file
    _token_block: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return int(self.embedding.shape[1])

    def token_array(self) -> np.ndarray | None:
        """The tokens as one float32 array (n_studies, T, dim_tokens) when every study has T
        tokens; None without tokens or with different counts. Read from a file, it is the
        memory the per-study arrays of ``tokens`` are views of (no copy)."""
        if self.tokens is None:
            return None
        if self._token_block is None or len(self._token_block) != len(self.tokens):
            if len({np.shape(t) for t in self.tokens}) != 1:
                return None
            self._token_block = np.stack([np.asarray(t, dtype=np.float32) for t in self.tokens])
        return self._token_block

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
        block = self._token_block[rows] if self._token_block is not None and self.tokens is not None else None
        tokens = (list(block) if block is not None else [self.tokens[i] for i in rows]) if self.tokens is not None else None
        return EmbeddingTable(np.asarray(wanted, dtype=object), self.embedding[rows], tokens, self.metadata, block)


def embedding_path(run_root: Path, task: str, modality: str, encoder: str) -> Path:
    """``<run_root>/embeddings/<task>/<modality>-<encoder>.parquet``."""
    return Path(run_root) / "embeddings" / task / f"{modality}-{encoder}.parquet"


def exclusions_path(table: Path) -> Path:
    """The studies left out of the embedding table ``table``, next to it:
    ``<run_root>/embeddings/<task>/<modality>-<encoder>.exclusions.csv``.

    >>> exclusions_path(Path("out/embeddings/pe/image-randconv.parquet")).as_posix()
    'out/embeddings/pe/image-randconv.exclusions.csv'
    """
    table = Path(table)
    return table.with_name(f"{table.stem}.exclusions.csv")


def write_exclusions(table: Path, rows: list[dict]) -> Path:
    """Write the exclusions of the embedding table ``table`` (``exclusions_path``): one CSV
    row per dict of ``rows`` with the keys ``EXCLUSION_COLUMNS``; a header only when none was
    left out. Written atomically; returns the path."""
    path = exclusions_path(table)
    for i, row in enumerate(rows):
        if set(row) != set(EXCLUSION_COLUMNS):
            raise EmbeddingError(f"'rows'[{i}]: expected the keys {', '.join(EXCLUSION_COLUMNS)}, got {', '.join(row)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=EXCLUSION_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


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
    meta = {k: v for k, v in (metadata or {}).items() if k != _TOKEN_FILE}
    meta.setdefault("dim", dim)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    block = _equal_block(tokens)
    if block is not None:
        # the copy first, under a name no earlier table used, so that the table never names a
        # copy of other tokens
        token_file = token_cache_path(path, uuid.uuid4().hex[:16])
        tmp = token_file.with_name(token_file.name + ".tmp")
        with tmp.open("wb") as fh:
            np.save(fh, block)
        tmp.replace(token_file)
        meta[_TOKEN_FILE] = {"file": token_file.name, "study_ids_sha256": _ids_digest(study_ids)}
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    for stale in path.parent.glob(f"{path.stem}.tokens-*.npy"):
        if stale.name != meta.get(_TOKEN_FILE, {}).get("file"):
            stale.unlink(missing_ok=True)
    return path


def token_cache_path(table: Path, key: str) -> Path:
    """The ``.npy`` copy of the tokens of the table ``table`` written under ``key``.

    >>> token_cache_path(Path("out/embeddings/pe/image-randconv.parquet"), "0123").as_posix()
    'out/embeddings/pe/image-randconv.tokens-0123.npy'
    """
    table = Path(table)
    return table.with_name(f"{table.stem}.tokens-{key}.npy")


def _equal_block(tokens: list[np.ndarray] | None) -> np.ndarray | None:
    """The tokens as one (n, T, d) float32 array when every study has the same T > 0."""
    if not tokens or len({np.shape(t) for t in tokens}) != 1 or np.shape(tokens[0])[0] == 0:
        return None
    return np.stack([np.asarray(t, dtype=np.float32) for t in tokens])


def _cached_tokens(path: Path, entry: object, ids: np.ndarray, column_type: pa.DataType) -> np.ndarray | None:
    """The token copy that ``entry`` (the table's ``token_file`` metadata) names, if it is
    there and was written with these study ids in this order and the column's token dimension;
    None otherwise (the column is read)."""
    if not isinstance(entry, dict) or Path(str(entry.get("file", ""))).name != entry.get("file"):
        return None
    if entry.get("study_ids_sha256") != _ids_digest(ids):
        return None
    try:
        block = np.load(path.with_name(entry["file"]), allow_pickle=False)
    except (OSError, ValueError):
        return None
    inner = getattr(column_type, "value_type", None)
    dim = inner.list_size if inner is not None and pa.types.is_fixed_size_list(inner) else -1
    if block.dtype != np.float32 or block.ndim != 3 or len(block) != len(ids) or block.shape[2] != dim:
        return None
    return block


def _ids_digest(ids) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()


def read_embeddings(path: Path, *, tokens: bool = True) -> EmbeddingTable:
    """Read and check an embedding table: the columns, fixed dimension, no duplicated study
    ids, no NaN or infinite values. Errors name the file and give counts and examples.
    ``tokens=False`` skips the token column (faster when only the pooled embedding is used)."""
    path = Path(path)
    if not path.is_file():
        raise EmbeddingError(f"{path}: embedding table not found")
    schema = pq.read_schema(path)
    names = schema.names
    raw = (schema.metadata or {}).get(_META_KEY)
    metadata = json.loads(raw) if raw else {}
    token_entry = metadata.pop(_TOKEN_FILE, None)  # where the tokens' copy is, not what the encoder did
    # memory_map: the file's pages are decoded in place instead of read into a buffer first; on
    # a 210 MB token table that buffer cost 2 to 15 s of page faults (pyarrow's mimalloc pool),
    # the mapped read about 1.3 s. Tables are replaced by renaming, never rewritten in place.
    table = pq.read_table(path, columns=[c for c in names if c != "tokens"], memory_map=True)
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
    token_arrays = block = None
    if tokens and "tokens" in names:
        block = _cached_tokens(path, token_entry, ids, schema.field("tokens").type)
        if block is not None:
            token_arrays = list(block)
        else:
            column = pq.read_table(path, columns=["tokens"], memory_map=True).column("tokens")
            token_arrays, block = _token_lists(column, path)
    if token_arrays is not None:
        if block is not None:  # every study has the same number of tokens: checked in blocks of rows
            step = max(1, (1 << 22) // max(1, block[0].size))
            good = np.concatenate([np.isfinite(block[a:a + step]).all(axis=(1, 2)) for a in range(0, len(block), step)]
                                  or [np.zeros(0, dtype=bool)])
            bad_tok = np.flatnonzero(~good if block.shape[1] else np.ones(len(block), dtype=bool)).tolist()
        else:
            bad_tok = [i for i, t in enumerate(token_arrays) if len(t) == 0 or not np.isfinite(t).all()]
        if bad_tok:
            problems.append(f"{len(bad_tok)} row(s) with empty or non-finite tokens, e.g. {', '.join(map(str, ids[bad_tok][:5]))}")
    if problems:
        raise EmbeddingError(f"{path}: " + "; ".join(problems))
    return EmbeddingTable(ids, embedding, token_arrays, metadata, block)


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


def _token_lists(column: pa.ChunkedArray, path: Path) -> tuple[list[np.ndarray], np.ndarray | None]:
    """A list<fixed_size_list<float>> column as one float32 (n_tokens_i, dim) array per row,
    and, when every row has the same number T of tokens, the (n, T, dim) array they are views
    of (else None). No per-row copies."""
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
    lengths = np.diff(offsets)
    if len(lengths) and lengths.min() == lengths.max():
        block = flat[base : base + len(lengths) * int(lengths[0])].reshape(len(lengths), int(lengths[0]), dim)
        return list(block), block
    return [flat[a - base : b - base] for a, b in zip(offsets[:-1], offsets[1:], strict=True)], None


def _duplicated(values: np.ndarray) -> list[bool]:
    seen: set = set()
    out = []
    for v in values:
        out.append(v in seen)
        seen.add(v)
    return out
