"""Feature scaling fitted on the training split, the one input path of every model.

Frozen embeddings hold columns that barely vary in the training studies: regional intensity
histograms of air, a one-hot code that three patients carry. Dividing by such a spread turns a
small shift at another site (a scanner's HU offset, a coding habit) into a value of tens or
hundreds of standard deviations, and a model that passes magnitudes to its head collapses
there. So the scaler

* drops columns whose training standard deviation is below ``REL_TOL`` (1%) of the median
  standard deviation of the non-constant columns, and every constant column (they are set to
  0 after scaling, which for a linear layer is the same as removing them), and
* bounds the standardised values to ``[-CLIP, CLIP]`` (5 standard deviations).

``helpers.fusion`` (the models) and ``helpers.probes`` (the linear probes) both use it, and so
does the scaled-embedding benchmark. numpy only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CLIP", "REL_TOL", "Scaler", "fit_scaler"]

REL_TOL = 1e-2
CLIP = 5.0


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
    the median standard deviation of the columns that vary. Dropped columns get scale 1 and
    are zeroed by :meth:`Scaler.transform`.

    >>> x = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.00001], [4.0, 1.0, 5.0]])
    >>> s = fit_scaler(x)
    >>> s.keep.tolist(), s.transform([[100.0, 7.0, 6.0]]).round(2).tolist()
    ([True, False, False], [[5.0, 0.0, 0.0]])
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"fit_scaler: '{name}' must be 2-d (n, d), got shape {arr.shape}")
    if arr.shape[0] < 2:
        raise ValueError(f"fit_scaler: '{name}' needs at least 2 training rows, got {arr.shape[0]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"fit_scaler: '{name}' holds NaN or infinite values")
    if clip is not None and not clip > 0:
        raise ValueError(f"fit_scaler: 'clip' must be > 0 or None, got {clip}")
    mean, std = arr.mean(axis=0), arr.std(axis=0)
    varying = std > 0
    keep = varying.copy()
    if varying.any():
        keep &= std >= rel_tol * float(np.median(std[varying]))
    scale = np.where(keep, std, 1.0)
    return Scaler(mean=mean, scale=scale, keep=keep, clip=clip)
