"""Feature scaling fitted on the training split, the one input path of every model.

Frozen embeddings hold columns that barely vary in the training studies: regional intensity
histograms of air, a one-hot code that three patients carry. Dividing by such a spread turns a
small shift at another site (a scanner's HU offset, a coding habit) into a value of tens or
hundreds of standard deviations, and a model that passes magnitudes to its head collapses
there. So the scaler

* drops columns whose training standard deviation is below ``REL_TOL`` (0.1%) of the 90th
  percentile of the standard deviations of the non-constant columns (a high percentile, so
  that an embedding made mostly of near-constant columns still has a reference), and every
  constant column (they are set to 0 after scaling, which for a linear layer is the same as
  removing them), and
* bounds the standardised values to ``[-CLIP, CLIP]`` (5 standard deviations).

``helpers.fusion`` (the models) and ``helpers.probes`` (the linear probes) both use it, and so
does the scaled-embedding benchmark. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CLIP", "REL_TOL", "Scaler", "fit_scaler", "length_ratio"]

REL_TOL = 1e-3
REFERENCE_QUANTILE = 0.9
CLIP = 5.0
# rows per block of fit_scaler's float64 passes: about 8 MB of float64 values
_BLOCK_VALUES = 1 << 20


@dataclass(frozen=True)
class Scaler:
    """``mean``, ``scale`` (float64, (d,)) and ``keep`` (bool, (d,)) from :func:`fit_scaler`;
    ``clip`` bounds the standardised values (None: unbounded)."""

    mean: np.ndarray
    scale: np.ndarray
    keep: np.ndarray
    clip: float | None = CLIP

    def transform(self, x: np.ndarray) -> np.ndarray:
        """``clip((x - mean) / scale) * keep`` over the last axis (float64)."""
        z = (np.asarray(x, dtype=np.float64) - self.mean) / self.scale
        if self.clip is not None:
            z = np.clip(z, -self.clip, self.clip)
        return z * self.keep

    @property
    def n_dropped(self) -> int:
        return int((~self.keep).sum())


def fit_scaler(x: np.ndarray, *, rel_tol: float = REL_TOL, clip: float | None = CLIP, name: str = "x") -> Scaler:
    """Fit on the training rows ``x`` (n, d), n >= 2.

    A column is kept when its standard deviation is positive and at least ``rel_tol`` times
    the 90th percentile of the standard deviations of the columns that vary. Dropped columns get scale 1 and
    are zeroed by :meth:`Scaler.transform`.

    >>> x = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.00001], [4.0, 1.0, 5.0]])
    >>> s = fit_scaler(x)
    >>> s.keep.tolist(), s.transform([[100.0, 7.0, 6.0]]).round(2).tolist()
    ([True, False, False], [[5.0, 0.0, 0.0]])
    """
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
    if arr.ndim != 2:
        raise ValueError(f"fit_scaler: '{name}' must be 2-d (n, d), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"fit_scaler: '{name}' needs at least 2 training rows, got {arr.shape[0]}")
    # Mean and standard deviation in float64, two passes over blocks of rows: a float32 input
    # (a million per-slice tokens) is never copied whole to float64.
    n, d = arr.shape
    step = max(1, _BLOCK_VALUES // max(d, 1))
    blocks = [slice(a, min(n, a + step)) for a in range(0, n, step)]
    total = np.zeros(d)
    for rows in blocks:
        block = arr[rows].astype(np.float64)
        if not np.isfinite(block).all():
            raise ValueError(f"fit_scaler: '{name}' holds NaN or infinite values")
        total += block.sum(axis=0)
    if clip is not None and not clip > 0:
        raise ValueError(f"fit_scaler: 'clip' must be > 0 or None, got {clip}")
    mean = total / n
    squares = np.zeros(d)
    for rows in blocks:
        deviation = arr[rows].astype(np.float64) - mean
        squares += np.einsum("ij,ij->j", deviation, deviation)
    std = np.sqrt(squares / n)
    varying = std > 0
    keep = varying.copy()
    if varying.any():
        keep &= std >= rel_tol * float(np.quantile(std[varying], REFERENCE_QUANTILE))
    scale = np.where(keep, std, 1.0)
    return Scaler(mean=mean, scale=scale, keep=keep, clip=clip)


def length_ratio(train: np.ndarray, internal: np.ndarray, external: np.ndarray, *, scaler: Scaler | None = None) -> float:
    """Median Euclidean length of the scaled ``external`` rows over that of the scaled
    ``internal`` rows (studies not used to fit), with the scaler fitted on ``train`` (or the
    given ``scaler``). About 1 when the external site looks like the internal one to the
    models; a site whose embeddings sit many training SDs away gives a large ratio."""
    scaler = fit_scaler(train) if scaler is None else scaler
    inside = np.linalg.norm(scaler.transform(internal), axis=1)
    outside = np.linalg.norm(scaler.transform(external), axis=1)
    if len(inside) == 0 or len(outside) == 0:
        raise ValueError("length_ratio: 'internal' and 'external' need at least one row each")
    return float(np.median(outside) / np.median(inside))
