"""Discrimination metrics for right-censored survival data: Harrell's C and its bootstrap.

Risk convention everywhere: ``risk`` is a score where a **higher value means an earlier event**
(scikit-survival's convention; a Cox linear predictor or a hazard ratio qualifies). lifelines'
``concordance_index(time, predicted_scores, event)`` expects the opposite direction, so
``harrell_c(time=t, event=e, risk=r) == lifelines.utils.concordance_index(t, -r, e)``.

Pairs and ties follow lifelines exactly. An ordered pair ``(i, j)`` is *comparable* when
subject ``i`` had the event (``event[i] == 1``) and either ``time[j] > time[i]``, or
``time[j] == time[i]`` and ``j`` was censored (a censoring at the time of a death is taken to
happen just after it). Two deaths at the same time are not comparable, nor is anything with an
earlier censoring. A comparable pair earns credit 1 when ``risk[i] > risk[j]``, 0.5 when
``risk[i] == risk[j]`` (exact equality of the float64 values) and 0 otherwise; C is the total
credit divided by the number of comparable pairs. scikit-survival's
``concordance_index_censored`` uses the same pairs but treats risks within ``tied_tol=1e-8`` of
each other as tied, so it differs only when two distinct risks are that close.

Inputs: ``time`` is non-negative and finite (any unit; days in this study), ``event`` holds
0/1 or bool (1 = event observed, 0 = censored), ``risk`` is finite. All are 1-D with one entry
per subject and at least two subjects.

This module depends on numpy only, so it scores predictions from any model.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = [
    "BootstrapResult",
    "NoComparablePairsError",
    "PairedTestResult",
    "bootstrap_ci",
    "harrell_c",
    "paired_bootstrap_test",
]

# Above this many subjects the bootstrap scores each resample with the O(n log n) counter
# instead of the O(n^2)-memory weighted-matrix products.
_MATRIX_MAX_SAMPLES = 4000
# Resamples drawn per block, bounded so that one block of indices stays near 32 MiB.
_BLOCK_ELEMENTS = 1 << 22
_BLOCK_MAX_ROWS = 256
# Give up when this many resamples per requested one had no comparable pair.
_MAX_REDRAWS_PER_RESAMPLE = 100


class NoComparablePairsError(ValueError):
    """No ordered pair of subjects is comparable, so the concordance index is undefined.

    Raised for instance when every subject is censored, or when all events share one time and
    nobody is followed beyond it. Subclasses :class:`ValueError`.
    """


@dataclass(frozen=True)
class BootstrapResult:
    """Percentile bootstrap of Harrell's C.

    Attributes
    ----------
    estimate : float
        Harrell's C on the full data, in [0, 1].
    lower, upper : float
        Percentile confidence limits (``alpha / 2`` and ``1 - alpha / 2`` quantiles of
        ``samples``).
    n_boot : int
        Number of resamples kept (length of ``samples``).
    n_redrawn : int
        Resamples that had no comparable pair and were replaced by a fresh draw.
    samples : numpy.ndarray
        float64, shape ``(n_boot,)``: C on each kept resample.
    """

    estimate: float
    lower: float
    upper: float
    n_boot: int
    n_redrawn: int
    samples: np.ndarray


@dataclass(frozen=True)
class PairedTestResult:
    """Paired bootstrap comparison of two risk scores on the same subjects.

    Attributes
    ----------
    c_a, c_b : float
        Harrell's C of ``risk_a`` and ``risk_b`` on the full data.
    difference : float
        ``c_a - c_b``.
    lower, upper : float
        Percentile 95% confidence limits of the difference over the resamples.
    p_value : float
        Two-sided bootstrap p-value for "no difference", in ``(0, 1]``.
    n_boot : int
        Number of resamples kept.
    n_redrawn : int
        Resamples that had no comparable pair and were replaced by a fresh draw.
    """

    c_a: float
    c_b: float
    difference: float
    lower: float
    upper: float
    p_value: float
    n_boot: int
    n_redrawn: int


# ---------------------------------------------------------------------------------------------
# Validation


def _as_1d_numeric(values: object, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"'{name}' must be 1-D, got shape {array.shape}")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"'{name}' must be numeric or bool, got dtype {array.dtype}")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"'{name}' must be finite, got {int(bad.sum())} NaN/inf value(s) "
            f"(first at index {first}: {array[first]})"
        )
    return array


def _check_survival_inputs(
    time: object, event: object, **risks: object
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Validate survival inputs; return ``time`` (float64), ``event`` (bool) and the risks (float64)."""
    time_arr = _as_1d_numeric(time, "time")
    event_arr = _as_1d_numeric(event, "event")
    risk_arrs = [_as_1d_numeric(value, name) for name, value in risks.items()]
    n = time_arr.shape[0]
    for name, array in [("event", event_arr), *zip(risks, risk_arrs, strict=True)]:
        if array.shape[0] != n:
            raise ValueError(
                f"Dimension mismatch: '{name}' has {array.shape[0]} samples but 'time' has {n}"
            )
    if n < 2:
        raise ValueError(f"'time' must hold at least 2 samples, got {n}")
    if (time_arr < 0).any():
        first = int(np.flatnonzero(time_arr < 0)[0])
        raise ValueError(f"'time' must be non-negative, got {time_arr[first]} at index {first}")
    not_binary = (event_arr != 0) & (event_arr != 1)
    if not_binary.any():
        first = int(np.flatnonzero(not_binary)[0])
        raise ValueError(
            f"'event' must hold only 0/1 or bool, got {event_arr[first]} at index {first}"
        )
    return time_arr, event_arr.astype(bool), risk_arrs


def _check_n_boot(n_boot: object) -> int:
    if isinstance(n_boot, bool) or not isinstance(n_boot, Integral):
        raise ValueError(f"'n_boot' must be an integer, got {n_boot!r}")
    if n_boot < 1:
        raise ValueError(f"'n_boot' must be at least 1, got {n_boot}")
    return int(n_boot)


def _check_alpha(alpha: object) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"'alpha' must be a number strictly between 0 and 1, got {alpha!r}")
    return float(alpha)


def _as_generator(rng: np.random.Generator | int | None) -> np.random.Generator:
    if rng is None or isinstance(rng, np.random.Generator):
        return np.random.default_rng(rng)
    if isinstance(rng, bool) or not isinstance(rng, Integral):
        raise ValueError(
            f"'rng' must be a numpy.random.Generator, an int seed or None, got {rng!r}"
        )
    if rng < 0:
        raise ValueError(f"'rng' seed must be non-negative, got {rng}")
    return np.random.default_rng(int(rng))


# ---------------------------------------------------------------------------------------------
# Harrell's C in O(n log n)


class _PairStructure:
    """Comparable-pair layout of ``(time, event)``, shared by every risk score.

    Subjects are put in *exit order*: by time, deaths before censorings at a tied time. An event
    ``i`` is then comparable exactly with the subjects from position ``starts`` onwards (those
    after every death tied with it).

    Attributes: ``order`` (int64, (n,)) sorts subjects into exit order; ``event_index`` (int64,
    (m,)) are the subjects with an event; ``starts`` (int64, (m,)) their first comparable position.
    """

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        self.n = time.shape[0]
        self.order = np.lexsort((~event, time))
        sorted_time = time[self.order]
        death_times = np.sort(time[event])
        self.event_index = np.flatnonzero(event)
        event_times = time[self.event_index]
        n_before = np.searchsorted(sorted_time, event_times, side="left")
        n_tied_deaths = np.searchsorted(death_times, event_times, side="right") - np.searchsorted(
            death_times, event_times, side="left"
        )
        self.starts = (n_before + n_tied_deaths).astype(np.int64)
        self.n_pairs = int(np.sum(self.n - self.starts))


def _suffix_rank_totals(
    rank_by_pos: np.ndarray, starts: np.ndarray, query: np.ndarray
) -> tuple[int, int]:
    """Sum over queries ``k`` of the positions ``p >= starts[k]`` with rank below / at most ``query[k]``.

    ``rank_by_pos`` (int64, (n,)) holds dense ranks 0..K-1 by position; ``starts`` and
    ``query`` are int64 of one shape. Returns the two totals ``(less, at_most)`` as Python ints.
    A suffix count is the total minus the count in the prefix ``[0, start)``, which splits into
    one aligned block of size ``2**level`` for each set bit of ``start``. Each level costs one
    sort of the keys ``block * K + rank`` and binary searches with sorted queries: O(n log^2 n)
    elementary steps, all inside numpy.
    """
    n = rank_by_pos.shape[0]
    n_ranks = int(rank_by_pos.max()) + 1
    all_sorted = np.sort(rank_by_pos)
    queries = np.sort(query)
    less = int(np.searchsorted(all_sorted, queries, side="left").sum())
    at_most = int(np.searchsorted(all_sorted, queries, side="right").sum())
    positions = np.arange(n, dtype=np.int64)
    max_start = int(starts.max()) if starts.size else 0
    level = 0
    while (1 << level) <= max_start:
        selected = ((starts >> level) & 1).astype(bool)
        if selected.any():
            keys = np.sort((positions >> level) * n_ranks + rank_by_pos)
            block = (starts[selected] >> level) - 1
            # Every position occurs once, so block b starts at index b * 2**level of ``keys``.
            in_block_start = int((block << level).sum())
            level_queries = np.sort(block * n_ranks + query[selected])
            less -= int(np.searchsorted(keys, level_queries, side="left").sum()) - in_block_start
            at_most -= (
                int(np.searchsorted(keys, level_queries, side="right").sum()) - in_block_start
            )
        level += 1
    return less, at_most


def _concordance_counts(structure: _PairStructure, risk: np.ndarray) -> tuple[int, int, int]:
    """Return ``(concordant, tied_risk, comparable)`` pair counts (Python ints) for ``risk``."""
    if structure.n_pairs == 0:
        return 0, 0, 0
    _, rank = np.unique(risk, return_inverse=True)
    rank = rank.astype(np.int64)
    less, at_most = _suffix_rank_totals(
        rank[structure.order], structure.starts, rank[structure.event_index]
    )
    return less, at_most - less, structure.n_pairs


def _ratio(concordant: float, tied: float, pairs: float) -> float:
    # Same operations as lifelines' _concordance_ratio, so the floats agree bit for bit.
    return (concordant + tied / 2) / pairs


def _no_pairs_message(event: np.ndarray) -> str:
    return (
        f"No comparable pairs: {int(event.sum())} event(s) among {event.shape[0]} subjects, and "
        "no event is followed by a later exit or a censoring at the same time"
    )


def harrell_c(time: object, event: object, risk: object) -> float:
    """Harrell's concordance index of ``risk`` for right-censored data.

    Parameters
    ----------
    time : array_like, shape (n_samples,)
        Follow-up times, finite and non-negative (days in this study).
    event : array_like, shape (n_samples,)
        1 or True where the event was observed, 0 or False where censored.
    risk : array_like, shape (n_samples,)
        Predicted risk, finite; **higher means an earlier event**.

    Returns
    -------
    float
        C in [0, 1]; 0.5 is chance, 1 a perfect ranking. Equals
        ``lifelines.utils.concordance_index(time, -risk, event)`` exactly, ties included (see the
        module docstring for which pairs count). Runs in O(n log n).

    Raises
    ------
    NoComparablePairsError
        If no pair is comparable (for example when every subject is censored).
    ValueError
        If an input is malformed; the message names the argument.

    Examples
    --------
    >>> harrell_c(time=[1.0, 2.0, 3.0, 4.0], event=[1, 1, 0, 1], risk=[0.9, 0.4, 0.5, 0.1])
    0.8
    >>> harrell_c(time=[2, 2, 5], event=[1, 0, 1], risk=[1.0, 1.0, 0.0])
    0.75
    """
    time_arr, event_arr, (risk_arr,) = _check_survival_inputs(time, event, risk=risk)
    structure = _PairStructure(time_arr, event_arr)
    if structure.n_pairs == 0:
        raise NoComparablePairsError(_no_pairs_message(event_arr))
    return _ratio(*_concordance_counts(structure, risk_arr))


# ---------------------------------------------------------------------------------------------
# Bootstrap


def _credit_matrix(structure: _PairStructure, risk: np.ndarray) -> np.ndarray:
    """float32, (n, n): credit of ordered pair (i, j), i.e. comparable * (1, 0.5 or 0 by risk)."""
    n = structure.n
    position = np.empty(n, dtype=np.int64)
    position[structure.order] = np.arange(n)
    start = np.full(n, n, dtype=np.int64)
    start[structure.event_index] = structure.starts
    credit = (risk[:, None] > risk[None, :]).astype(np.float32)
    credit += np.float32(0.5) * (risk[:, None] == risk[None, :])
    credit *= position[None, :] >= start[:, None]
    return credit


class _WeightedScorer:
    """Score resamples given as multiplicity vectors ``w`` (how often each subject was drawn).

    ``C(w) = sum_ij w_i w_j credit_ij / sum_ij w_i w_j comparable_ij``. The numerators come from
    one float32 matrix product per block; every partial sum is a multiple of 0.5 below 2**23 for
    n <= 4000, so they are exact. Denominators are integer suffix sums in exit order.
    """

    def __init__(self, structure: _PairStructure, event: np.ndarray, risks: list[np.ndarray]):
        self.structure = structure
        self.n_risks = len(risks)
        self.credit = np.concatenate([_credit_matrix(structure, risk) for risk in risks], axis=1)

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows, n = indices.shape
        offsets = (np.arange(rows, dtype=np.int64) * n)[:, None]
        weights = np.bincount((indices + offsets).ravel(), minlength=rows * n).reshape(rows, n)
        weighted = (weights.astype(np.float32) @ self.credit).reshape(rows, self.n_risks, n)
        numerator = np.einsum("rkn,rn->rk", weighted.astype(np.float64), weights.astype(np.float64))
        cumulative = np.zeros((rows, n + 1), dtype=np.int64)
        np.cumsum(weights[:, self.structure.order], axis=1, out=cumulative[:, 1:])
        later = n - cumulative[:, self.structure.starts]
        denominator = np.einsum(
            "rm,rm->r", later, weights[:, self.structure.event_index].astype(np.int64)
        )
        valid = denominator > 0
        values = np.zeros((rows, self.n_risks))
        values[valid] = numerator[valid] / denominator[valid, None]
        return values, valid


class _ResampleScorer:
    """Score resamples by running the O(n log n) counter on each explicitly resampled data set."""

    def __init__(self, time: np.ndarray, event: np.ndarray, risks: list[np.ndarray]):
        self.time, self.event, self.risks = time, event, risks

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = indices.shape[0]
        values = np.zeros((rows, len(self.risks)))
        valid = np.zeros(rows, dtype=bool)
        for row, index in enumerate(indices):
            structure = _PairStructure(self.time[index], self.event[index])
            if structure.n_pairs == 0:
                continue
            valid[row] = True
            for k, risk in enumerate(self.risks):
                values[row, k] = _ratio(*_concordance_counts(structure, risk[index]))
        return values, valid


def _bootstrap_values(
    time: np.ndarray,
    event: np.ndarray,
    risks: list[np.ndarray],
    n_boot: int,
    rng: np.random.Generator,
    method: str = "auto",
) -> tuple[np.ndarray, int]:
    """C of each risk on ``n_boot`` resamples of the subjects; float64 (n_boot, len(risks)).

    Resamples are drawn in blocks of ``min(256, 2**22 // n)`` rows with
    ``rng.integers(0, n, size=(rows, n))``; rows with no comparable pair are redrawn (counted in
    the second return value). ``method`` is ``"matrix"`` (weighted products), ``"resample"``
    (explicit resampling) or ``"auto"`` (matrix up to 4000 subjects). The draws do not depend
    on ``method``, and both give the same floats.
    """
    n = time.shape[0]
    if method == "auto":
        method = "matrix" if n <= _MATRIX_MAX_SAMPLES else "resample"
    structure = _PairStructure(time, event)
    if structure.n_pairs == 0:
        raise NoComparablePairsError(_no_pairs_message(event))
    if method == "matrix":
        scorer: _WeightedScorer | _ResampleScorer = _WeightedScorer(structure, event, risks)
    elif method == "resample":
        scorer = _ResampleScorer(time, event, risks)
    else:
        raise ValueError(f"'method' must be 'auto', 'matrix' or 'resample', got {method!r}")
    block_rows = max(1, min(_BLOCK_MAX_ROWS, _BLOCK_ELEMENTS // n))
    values = np.empty((n_boot, len(risks)))
    n_redrawn = 0
    for first in range(0, n_boot, block_rows):
        pending = np.arange(first, min(first + block_rows, n_boot))
        while pending.size:
            indices = rng.integers(0, n, size=(pending.size, n))
            block_values, valid = scorer(indices)
            values[pending[valid]] = block_values[valid]
            pending = pending[~valid]
            n_redrawn += int(pending.size)
            if n_redrawn > _MAX_REDRAWS_PER_RESAMPLE * n_boot:
                raise NoComparablePairsError(
                    f"{n_redrawn} resamples had no comparable pair while drawing {n_boot}; "
                    f"too few comparable pairs ({structure.n_pairs}) among {n} subjects"
                )
    return values, n_redrawn


def bootstrap_ci(
    time: object,
    event: object,
    risk: object,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator | int | None = None,
) -> BootstrapResult:
    """Percentile bootstrap confidence interval for Harrell's C.

    Subjects are resampled with replacement (``n_samples`` draws per resample). A resample with
    no comparable pair is redrawn and counted in ``n_redrawn``, never silently dropped. Up to
    4000 subjects every resample is scored with weighted matrix products (about 0.1 s for
    1000 subjects and 1000 resamples); above that each resample is scored in O(n log n).

    Parameters
    ----------
    time, event, risk : array_like, shape (n_samples,)
        As in :func:`harrell_c`; **higher risk means an earlier event**.
    n_boot : int
        Number of resamples, at least 1.
    alpha : float
        The interval covers ``1 - alpha``; strictly between 0 and 1.
    rng : numpy.random.Generator, int or None
        Source of randomness (an int is a seed). Pass one for reproducible results.

    Returns
    -------
    BootstrapResult
        ``estimate`` is C on the full data; ``lower``/``upper`` the ``alpha / 2`` and
        ``1 - alpha / 2`` quantiles of ``samples`` (float64, shape (n_boot,)).

    Raises
    ------
    NoComparablePairsError
        If the full data have no comparable pair.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> time = gen.exponential(size=200)
    >>> result = bootstrap_ci(time=time, event=np.ones(200), risk=-time + gen.normal(size=200),
    ...                       n_boot=200, rng=1)
    >>> result.lower < result.estimate < result.upper, result.samples.shape, result.n_redrawn
    (True, (200,), 0)
    """
    time_arr, event_arr, (risk_arr,) = _check_survival_inputs(time, event, risk=risk)
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    generator = _as_generator(rng)
    estimate = harrell_c(time_arr, event_arr, risk_arr)
    values, n_redrawn = _bootstrap_values(time_arr, event_arr, [risk_arr], n_boot, generator)
    samples = values[:, 0]
    lower, upper = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(
        estimate=estimate,
        lower=float(lower),
        upper=float(upper),
        n_boot=n_boot,
        n_redrawn=n_redrawn,
        samples=samples,
    )


def paired_bootstrap_test(
    time: object,
    event: object,
    risk_a: object,
    risk_b: object,
    n_boot: int = 1000,
    rng: np.random.Generator | int | None = None,
) -> PairedTestResult:
    """Compare the C of two risk scores on the same subjects with a paired bootstrap.

    Both scores are evaluated on the same resamples, so the interval and the test account for
    their correlation. With ``d_b`` the resampled differences ``C_a - C_b``, the two-sided
    p-value is ``min(1, 2 * min(1 + #{d_b <= 0}, 1 + #{d_b >= 0}) / (n_boot + 1))``; the +1
    keeps it above 0, and identical scores give exactly 1.

    Parameters
    ----------
    time, event : array_like, shape (n_samples,)
        As in :func:`harrell_c`.
    risk_a, risk_b : array_like, shape (n_samples,)
        The two predicted risks, finite; **higher means an earlier event**.
    n_boot : int
        Number of resamples, at least 1.
    rng : numpy.random.Generator, int or None
        Source of randomness (an int is a seed).

    Returns
    -------
    PairedTestResult
        ``lower``/``upper`` are the 2.5% and 97.5% quantiles of the resampled differences.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> time = gen.exponential(size=300)
    >>> strong, weak = -time + 0.1 * gen.normal(size=300), gen.normal(size=300)
    >>> result = paired_bootstrap_test(time=time, event=np.ones(300), risk_a=strong,
    ...                                risk_b=weak, n_boot=200, rng=2)
    >>> result.difference > 0.3, result.p_value < 0.01
    (True, True)
    """
    time_arr, event_arr, (a_arr, b_arr) = _check_survival_inputs(
        time, event, risk_a=risk_a, risk_b=risk_b
    )
    n_boot = _check_n_boot(n_boot)
    generator = _as_generator(rng)
    c_a = harrell_c(time_arr, event_arr, a_arr)
    c_b = harrell_c(time_arr, event_arr, b_arr)
    values, n_redrawn = _bootstrap_values(time_arr, event_arr, [a_arr, b_arr], n_boot, generator)
    differences = values[:, 0] - values[:, 1]
    lower, upper = np.quantile(differences, [0.025, 0.975])
    at_or_below = 1 + int(np.sum(differences <= 0))
    at_or_above = 1 + int(np.sum(differences >= 0))
    p_value = min(1.0, 2 * min(at_or_below, at_or_above) / (n_boot + 1))
    return PairedTestResult(
        c_a=c_a,
        c_b=c_b,
        difference=c_a - c_b,
        lower=float(lower),
        upper=float(upper),
        p_value=p_value,
        n_boot=n_boot,
        n_redrawn=n_redrawn,
    )
