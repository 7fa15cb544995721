"""The digital twin's ground truth, read through one door.

The twin writes its hidden truth under ``<twin_dir>/<task>/ground_truth/`` (see
``helpers.twin``): ``factors.parquet`` (one row per CT study: the latent factors, the true
log-hazard and its parts, the true and recorded outcomes, the planted defects),
``lesions.parquet`` (embolus and calcification voxels per study) and ``masks/<study_id>.npz``.
Nothing that trains or selects a model may see it: only evaluation reads it, and every
reader names itself (``reader``, one of ``READERS``) so that a search for the callers of this
module lists everything that looks at the truth:

- ``twin_chapter``: the figures and tables of the twin chapter (``helpers.twin_views``);
- ``oracle``: the true log-hazard scored as a model (``helpers.compare.oracle_risk``);
- ``probes``: linear probes of frozen embeddings (``helpers.probes``, the embeddings chapter);
- ``saliency``: checks of attribution maps against the lesion masks;
- ``mechanism``: what each group of factors explains at each setting of the mechanism study
  (``helpers.mechanism.balance``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from helpers.tasks import get_task

__all__ = ["READERS", "ANATOMY", "truth_dir", "read_truth", "read_lesions", "mask_path", "read_mask", "read_anatomy"]

READERS: tuple[str, ...] = ("twin_chapter", "oracle", "probes", "saliency", "mechanism")

# Labels of the anatomy map the twin saves with each lesion mask (``anatomy`` in the mask's
# .npz, ``helpers.twin.phantom``): the structures whose size carries the CT's shared factors
# (RV strain, pulmonary-artery dilation, cardiac dysfunction). Saliency is scored against them
# as well as against the lesions.
ANATOMY: dict[str, int] = {"heart": 1, "pulmonary_arteries": 2}


def _check_reader(reader: str) -> None:
    if reader not in READERS:
        raise ValueError(
            f"ground truth: unknown reader {reader!r}; expected one of {', '.join(READERS)} "
            "(the ground truth is for evaluation only)"
        )


def truth_dir(twin_dir: str | os.PathLike[str], task: str, *, reader: str) -> Path:
    """``<twin_dir>/<task>/ground_truth`` (it need not exist).

    >>> truth_dir("twin", "pe", reader="oracle").as_posix()
    'twin/pe/ground_truth'
    >>> truth_dir("twin", "pe", reader="training")
    Traceback (most recent call last):
    ...
    ValueError: ground truth: unknown reader 'training'; expected one of twin_chapter, oracle, probes, saliency, mechanism (the ground truth is for evaluation only)
    """
    _check_reader(reader)
    get_task(task)
    return Path(twin_dir) / task / "ground_truth"


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the twin's ground truth is missing (write the twin first: "
            "python -m helpers twin --out <twin_dir>)"
        )
    return path


def _read_parquet(path: Path, columns: Iterable[str] | None) -> pd.DataFrame:
    _existing(path)
    if columns is None:
        return pd.read_parquet(path)
    columns = list(columns)
    missing = [c for c in columns if c not in pq.read_schema(path).names]
    if missing:
        raise ValueError(f"{path}: no column(s) {', '.join(missing)}")
    return pd.read_parquet(path, columns=columns)


def read_truth(
    twin_dir: str | os.PathLike[str],
    task: str,
    *,
    reader: str,
    columns: Iterable[str] | None = None,
) -> pd.DataFrame:
    """``<twin_dir>/<task>/ground_truth/factors.parquet`` as a frame (``columns``: only
    these), in the order of the imaging index. ``reader``: who reads it, one of ``READERS``
    (``ValueError`` otherwise); ``FileNotFoundError`` naming the path when it is missing."""
    return _read_parquet(truth_dir(twin_dir, task, reader=reader) / "factors.parquet", columns)


def read_lesions(
    twin_dir: str | os.PathLike[str],
    task: str,
    *,
    reader: str,
    columns: Iterable[str] | None = None,
) -> pd.DataFrame:
    """``<twin_dir>/<task>/ground_truth/lesions.parquet``: ``study_id``, ``embolus_voxels``,
    ``calcification_voxels`` (written only by a twin with volumes). As ``read_truth``."""
    return _read_parquet(truth_dir(twin_dir, task, reader=reader) / "lesions.parquet", columns)


def mask_path(
    twin_dir: str | os.PathLike[str], task: str, study_id: str, *, reader: str
) -> Path:
    """Path of one study's lesion mask, ``.../ground_truth/masks/<study_id>.npz`` (it need not
    exist).

    >>> mask_path("twin", "mace", "mace-a-000001", reader="saliency").as_posix()
    'twin/mace/ground_truth/masks/mace-a-000001.npz'
    """
    return truth_dir(twin_dir, task, reader=reader) / "masks" / f"{study_id}.npz"


def _mask_file_array(twin_dir, task: str, study_id: str, reader: str, key: str) -> np.ndarray:
    """Array ``key`` of one study's mask file; ``FileNotFoundError`` naming the path when the
    file is missing, ``ValueError`` naming it when the array is (a twin written before the
    generator that added it)."""
    path = _existing(mask_path(twin_dir, task, study_id, reader=reader))
    with np.load(path) as data:
        if key not in data.files:
            raise ValueError(f"{path}: no {key!r} array (a twin written by an older generator); write the twin again")
        return data[key]


def read_mask(
    twin_dir: str | os.PathLike[str], task: str, study_id: str, *, reader: str
) -> np.ndarray:
    """One study's lesion mask: uint8, shape ``(z, y, x)`` of its volume; 1 embolus, 2 calcium,
    0 elsewhere. ``FileNotFoundError`` naming the path when it is missing."""
    return _mask_file_array(twin_dir, task, study_id, reader, "mask")


def read_anatomy(
    twin_dir: str | os.PathLike[str], task: str, study_id: str, *, reader: str
) -> np.ndarray:
    """One study's anatomy map, saved with its lesion mask: uint8, shape ``(z, y, x)``;
    ``ANATOMY`` labels (1 heart and ventricles, 2 pulmonary arteries), 0 elsewhere. A mask
    file of a twin older than generator 1.4.0 has none: ``ValueError`` naming the file."""
    return _mask_file_array(twin_dir, task, study_id, reader, "anatomy")
