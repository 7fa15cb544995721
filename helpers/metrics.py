"""Metrics for right-censored survival data: discrimination, calibration and their bootstrap.

Harrell's C (:func:`harrell_c`, O(n log n)) with its bootstrap (:func:`bootstrap_ci`,
:func:`paired_bootstrap_test`); inverse-probability-of-censoring-weighted (IPCW) metrics
(:func:`uno_c`, :func:`time_dependent_auc`, :func:`brier_score`,
:func:`integrated_brier_score`) with a generic patient bootstrap that recomputes every weight
on every resample (:func:`bootstrap_metric`, :func:`paired_bootstrap_metric`); calibration at a
horizon (:func:`calibration`); Holm's step-down adjustment (:func:`holm`). Every bootstrap takes
``groups=`` (one id per row, e.g. ``person_id``) to resample patients instead of rows, keeping
the repeat studies of a patient together.

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

IPCW conventions (the IPCW metrics). The censoring distribution ``G(t) = P(C > t)`` is the
Kaplan-Meier estimate of the *training* data with the roles of event and censoring swapped;
at a tied time, events leave before censorings (as in scikit-survival's
``CensoringDistributionEstimator``). After the last training time ``G`` stays at its last value.
A right-censored time ``c`` means ``T > c``, so a subject censored exactly at the evaluation
time ``t`` is a control (event-free beyond ``t``), and an observation at time ``s`` needed
``C >= s``: weights use the left limit ``G(s-)``, as in Uno et al. (2011). scikit-survival
uses ``G(s)`` and ``time > t``; the two agree whenever no training censoring time equals a
test event time or ``t`` and no test subject is censored exactly at ``t``. The left limit keeps
the metrics defined at a horizon where follow-up is administratively censored (there
``G(horizon) = 0`` but ``G(horizon-) > 0``).

This module depends on numpy and scipy only, so it scores predictions from any model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

__all__ = [
    "BreslowBaseline",
    "BootstrapResult",
    "CalibrationResult",
    "NoComparablePairsError",
    "PairedTestResult",
    "bootstrap_ci",
    "bootstrap_metric",
    "brier_score",
    "calibration",
    "harrell_c",
    "holm",
    "integrated_brier_score",
    "paired_bootstrap_metric",
    "paired_bootstrap_test",
    "time_dependent_auc",
    "uno_c",
]

# Above this many subjects the bootstrap scores each resample with the O(n log n) counter
# instead of the O(n^2)-memory weighted-matrix products.
_MATRIX_MAX_SAMPLES = 4000
# Resamples drawn per block, bounded so that one block of drawn unit codes (subjects or groups)
# stays near 32 MiB.
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
    """Percentile bootstrap of a metric (Harrell's C for :func:`bootstrap_ci`).

    Attributes
    ----------
    estimate : float
        The metric on the full data (for Harrell's C, in [0, 1]).
    lower, upper : float
        Percentile confidence limits (``alpha / 2`` and ``1 - alpha / 2`` quantiles of
        ``samples``).
    n_boot : int
        Number of resamples kept (length of ``samples``).
    n_redrawn : int
        Resamples that had no comparable pair and were replaced by a fresh draw.
    samples : numpy.ndarray
        float64, shape ``(n_boot,)``: the metric on each kept resample.
    """

    estimate: float
    lower: float
    upper: float
    n_boot: int
    n_redrawn: int
    samples: np.ndarray


@dataclass(frozen=True)
class PairedTestResult:
    """Paired bootstrap comparison of two models on the same subjects.

    Attributes
    ----------
    c_a, c_b : float
        The metric of model a and model b on the full data (Harrell's C of ``risk_a`` and
        ``risk_b`` for :func:`paired_bootstrap_test`).
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


def _is_missing(value: object) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN, NaT
    except (TypeError, ValueError):  # pandas.NA: its comparisons have no truth value
        return True


def _group_codes(groups: object, n: int, name: str, against: str) -> np.ndarray:
    """Validate one group id per row; return int64 codes ``0..G-1`` (shape (n,)).

    Codes number the distinct ids in sorted order (``numpy.unique``); ids of mixed types that do
    not sort are numbered in order of first appearance. Missing ids (None, NaN, NaT,
    ``pandas.NA``) are rejected: a row without a patient cannot be resampled with its patient.
    """
    array = np.asarray(groups)
    if array.ndim != 1:
        raise ValueError(f"'{name}' must be 1-D (one id per row), got shape {array.shape}")
    if array.shape[0] != n:
        raise ValueError(
            f"Dimension mismatch: '{name}' has {array.shape[0]} samples but '{against}' has {n}"
        )
    kind = array.dtype.kind
    if kind in "fc":
        missing = np.isnan(array)
    elif kind in "mM":
        missing = np.isnat(array)
    elif kind == "O":
        missing = np.array([_is_missing(value) for value in array.tolist()], dtype=bool)
    else:
        missing = np.zeros(n, dtype=bool)
    if missing.any():
        first = int(np.flatnonzero(missing)[0])
        raise ValueError(
            f"'{name}' must not hold missing values, got {int(missing.sum())} "
            f"(first at index {first}: {array[first]!r})"
        )
    try:
        _, codes = np.unique(array, return_inverse=True)
    except TypeError:
        lookup: dict[object, int] = {}
        codes = np.array([lookup.setdefault(value, len(lookup)) for value in array.tolist()])
    return np.asarray(codes, dtype=np.int64).reshape(n)


class _Resampler:
    """Turns draws of resampling units into resampled rows: subjects, or whole groups.

    Without ``codes`` the ``n`` rows are the units. With ``codes`` (int64, (n,), every value of
    ``0..G-1`` used, as from :func:`_group_codes`) unit ``k`` is group ``k``, and a resample
    takes all rows of each drawn group: a group drawn twice contributes its rows twice, so the
    resample size varies. A draw is ``G`` unit codes with replacement (``n_units`` =
    ``G``, or ``n`` without groups), drawn as ``rng.integers(0, G, size=(rows, G))``; with one
    row per group in sorted group order the rows drawn are exactly those of the ungrouped
    bootstrap with the same generator.
    """

    def __init__(self, n: int, codes: np.ndarray | None = None) -> None:
        self.n = n
        self.codes = codes
        if codes is None:
            self.n_units = n
        else:
            self.n_units = int(codes.max()) + 1
            self.members = np.argsort(codes, kind="stable")
            self.sizes = np.bincount(codes, minlength=self.n_units)
            self.first = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])

    def draw(self, rng: np.random.Generator, rows: int | None = None) -> np.ndarray:
        """Unit codes, int64: shape ``(n_units,)`` (``rows`` None) or ``(rows, n_units)``."""
        size = self.n_units if rows is None else (rows, self.n_units)
        return rng.integers(0, self.n_units, size=size)

    def weights(self, draws: np.ndarray) -> np.ndarray:
        """Multiplicities, int64 (rows, n): how often each row is in each resample of ``draws``."""
        rows, units = draws.shape
        offsets = (np.arange(rows, dtype=np.int64) * units)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=rows * units).reshape(rows, units)
        return counts if self.codes is None else counts[:, self.codes]

    def indices(self, draw: np.ndarray) -> np.ndarray:
        """Row indices, int64, of the resample ``draw`` (one row of unit codes)."""
        if self.codes is None:
            return draw
        sizes = self.sizes[draw]
        ends = np.cumsum(sizes)
        position = np.arange(ends[-1]) + np.repeat(self.first[draw] - (ends - sizes), sizes)
        return self.members[position]


class _WeightedScorer:
    """Score resamples given as multiplicity vectors ``w`` (how often each subject was drawn).

    ``C(w) = sum_ij w_i w_j credit_ij / sum_ij w_i w_j comparable_ij``. The numerators come from
    one float32 matrix product per block; every partial sum is a multiple of 0.5 no larger than
    the resample's total weight ``sum_i w_i`` (``n``, or with groups at most ``(n + 1)**2 / 4
    < 2**22`` for n <= 4000), so they are exact. Denominators are integer suffix sums in exit
    order.
    """

    def __init__(self, structure: _PairStructure, event: np.ndarray, risks: list[np.ndarray]):
        self.structure = structure
        self.n_risks = len(risks)
        self.credit = np.concatenate([_credit_matrix(structure, risk) for risk in risks], axis=1)

    def __call__(self, draws: np.ndarray, resampler: _Resampler) -> tuple[np.ndarray, np.ndarray]:
        return self.score(resampler.weights(draws))

    def score(self, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """C of each risk per row of ``weights`` (int64, (rows, n)), and which rows are valid."""
        rows, n = weights.shape
        weighted = (weights.astype(np.float32) @ self.credit).reshape(rows, self.n_risks, n)
        numerator = np.einsum("rkn,rn->rk", weighted.astype(np.float64), weights.astype(np.float64))
        cumulative = np.zeros((rows, n + 1), dtype=np.int64)
        np.cumsum(weights[:, self.structure.order], axis=1, out=cumulative[:, 1:])
        later = cumulative[:, -1:] - cumulative[:, self.structure.starts]
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

    def __call__(self, draws: np.ndarray, resampler: _Resampler) -> tuple[np.ndarray, np.ndarray]:
        rows = draws.shape[0]
        values = np.zeros((rows, len(self.risks)))
        valid = np.zeros(rows, dtype=bool)
        for row, draw in enumerate(draws):
            index = resampler.indices(draw)
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
    groups: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """C of each risk on ``n_boot`` resamples of the subjects; float64 (n_boot, len(risks)).

    Resamples are drawn in blocks of ``min(256, 2**22 // G)`` rows with
    ``rng.integers(0, G, size=(rows, G))``, ``G`` the number of resampling units: the ``n``
    subjects, or the groups when ``groups`` (int64 codes ``0..G-1`` per subject, see
    :func:`_group_codes`) is given, each drawn group then bringing all its subjects. Rows with
    no comparable pair are redrawn (counted in the second return value). ``method`` is
    ``"matrix"`` (weighted products on multiplicity vectors), ``"resample"`` (explicit row
    indices) or ``"auto"`` (matrix up to 4000 subjects). The draws do not depend on
    ``method``, and both give the same floats.
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
    resampler = _Resampler(n, groups)
    block_rows = max(1, min(_BLOCK_MAX_ROWS, _BLOCK_ELEMENTS // resampler.n_units))
    values = np.empty((n_boot, len(risks)))
    n_redrawn = 0
    for first in range(0, n_boot, block_rows):
        pending = np.arange(first, min(first + block_rows, n_boot))
        while pending.size:
            draws = resampler.draw(rng, pending.size)
            block_values, valid = scorer(draws, resampler)
            values[pending[valid]] = block_values[valid]
            pending = pending[~valid]
            n_redrawn += int(pending.size)
            if n_redrawn > _MAX_REDRAWS_PER_RESAMPLE * n_boot:
                among = f"{n} subjects"
                if groups is not None:
                    among += f" in {resampler.n_units} groups"
                raise NoComparablePairsError(
                    f"{n_redrawn} resamples had no comparable pair while drawing {n_boot}; "
                    f"too few comparable pairs ({structure.n_pairs}) among {among}"
                )
    return values, n_redrawn


def _percentile_result(estimate: float, samples: np.ndarray, *, alpha: float, n_boot: int, n_redrawn: int) -> BootstrapResult:
    """The percentile interval of bootstrap ``samples`` around ``estimate``."""
    lower, upper = np.quantile(samples, [alpha / 2, 1 - alpha / 2])
    return BootstrapResult(
        estimate=estimate, lower=float(lower), upper=float(upper), n_boot=n_boot, n_redrawn=n_redrawn, samples=samples
    )


def bootstrap_ci(
    time: object,
    event: object,
    risk: object,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator | int | None = None,
    groups: object | None = None,
) -> BootstrapResult:
    """Percentile bootstrap confidence interval for Harrell's C.

    Subjects are resampled with replacement (``n_samples`` draws per resample), or with
    ``groups`` whole groups are: each resample draws ``G`` group ids with replacement (``G``
    distinct groups) and takes every row of each drawn group, so repeat studies of one patient
    stay together (a group drawn twice contributes its rows twice). A resample with no
    comparable pair is redrawn and counted in ``n_redrawn``, never silently dropped. Up to 4000
    subjects every resample is scored with weighted matrix products (about 0.1 s for 1000
    subjects and 1000 resamples, grouped or not); above that each resample is scored in
    O(n log n).

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
    groups : array_like, shape (n_samples,), optional
        The resampling unit of each row, e.g. the ``person_id`` of each study: any hashable
        ids (ints, strings, ...), no missing values. ``None`` (the default) makes every row its
        own unit, with exactly the draws of earlier versions. Group codes are drawn as
        ``rng.integers(0, G, size=(rows, G))`` over the sorted distinct ids, in the blocks the
        ungrouped bootstrap uses for ``n`` subjects; with one row per group, in sorted id
        order, the resamples are those of ``groups=None``.

    Returns
    -------
    BootstrapResult
        ``estimate`` is C on the full data (all rows, grouped or not); ``lower``/``upper`` the
        ``alpha / 2`` and ``1 - alpha / 2`` quantiles of ``samples`` (float64, shape
        (n_boot,)).

    Raises
    ------
    NoComparablePairsError
        If the full data have no comparable pair.
    ValueError
        If an input is malformed, e.g. ``groups`` of the wrong length or with missing ids.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> time = gen.exponential(size=200)
    >>> result = bootstrap_ci(time=time, event=np.ones(200), risk=-time + gen.normal(size=200),
    ...                       n_boot=200, rng=1)
    >>> result.lower < result.estimate < result.upper, result.samples.shape, result.n_redrawn
    (True, (200,), 0)

    Repeat studies of a patient share its outcome, so resampling studies treats copies as
    independent evidence. Below every patient has two identical studies: resampling patients
    (``groups``) reproduces the bootstrap of the de-duplicated data draw for draw, while
    resampling studies narrows the interval by about ``1 / sqrt(2)``:

    >>> risk = -time + gen.normal(size=200)
    >>> person_id = np.array([f"p{i:03d}" for i in range(200)])
    >>> once = bootstrap_ci(time=time, event=np.ones(200), risk=risk, n_boot=500, rng=1)
    >>> twice = dict(time=np.tile(time, 2), event=np.ones(400), risk=np.tile(risk, 2))
    >>> patients = bootstrap_ci(**twice, n_boot=500, rng=1, groups=np.tile(person_id, 2))
    >>> bool(np.array_equal(patients.samples, once.samples)), patients.estimate == once.estimate
    (True, True)
    >>> studies = bootstrap_ci(**twice, n_boot=500, rng=1)
    >>> bool(studies.upper - studies.lower < 0.85 * (once.upper - once.lower))
    True
    """
    time_arr, event_arr, (risk_arr,) = _check_survival_inputs(time, event, risk=risk)
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    generator = _as_generator(rng)
    codes = None if groups is None else _group_codes(groups, time_arr.shape[0], "groups", "time")
    estimate = harrell_c(time_arr, event_arr, risk_arr)
    values, n_redrawn = _bootstrap_values(
        time_arr, event_arr, [risk_arr], n_boot, generator, groups=codes
    )
    return _percentile_result(estimate, values[:, 0], alpha=alpha, n_boot=n_boot, n_redrawn=n_redrawn)


def paired_bootstrap_test(
    time: object,
    event: object,
    risk_a: object,
    risk_b: object,
    n_boot: int = 1000,
    rng: np.random.Generator | int | None = None,
    groups: object | None = None,
) -> PairedTestResult:
    """Compare the C of two risk scores on the same subjects with a paired bootstrap.

    Both scores are evaluated on the same resamples, so the interval and the test account for
    their correlation. With ``groups`` whole groups (e.g. patients with several studies) are
    resampled, as in :func:`bootstrap_ci`. With ``d_b`` the resampled differences
    ``C_a - C_b``, the two-sided p-value is ``min(1, 2 * min(1 + #{d_b <= 0}, 1 + #{d_b >= 0})
    / (n_boot + 1))``; the +1 keeps it above 0, and identical scores give exactly 1.

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
    groups : array_like, shape (n_samples,), optional
        The resampling unit of each row (e.g. ``person_id``), as in :func:`bootstrap_ci`;
        ``None`` resamples rows.

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

    Two studies per patient (ids repeated), resampled by patient:

    >>> twice = paired_bootstrap_test(time=np.tile(time, 2), event=np.ones(600),
    ...                               risk_a=np.tile(strong, 2), risk_b=np.tile(weak, 2),
    ...                               n_boot=200, rng=2, groups=np.tile(np.arange(300), 2))
    >>> twice.difference == result.difference, twice.p_value == result.p_value
    (True, True)
    """
    time_arr, event_arr, (a_arr, b_arr) = _check_survival_inputs(
        time, event, risk_a=risk_a, risk_b=risk_b
    )
    n_boot = _check_n_boot(n_boot)
    generator = _as_generator(rng)
    codes = None if groups is None else _group_codes(groups, time_arr.shape[0], "groups", "time")
    c_a = harrell_c(time_arr, event_arr, a_arr)
    c_b = harrell_c(time_arr, event_arr, b_arr)
    values, n_redrawn = _bootstrap_values(
        time_arr, event_arr, [a_arr, b_arr], n_boot, generator, groups=codes
    )
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


# ---------------------------------------------------------------------------------------------
# Inverse probability of censoring weights


@dataclass(frozen=True)
class CalibrationResult:
    """Calibration of predicted event probabilities at a horizon.

    Attributes
    ----------
    horizon : float
        The time at which the probabilities are predicted (same unit as ``time``).
    predicted : numpy.ndarray
        float64, shape ``(n_groups,)``: mean predicted event probability ``1 - S(horizon)`` in
        each risk group, groups ordered from the lowest to the highest predicted risk.
    observed : numpy.ndarray
        float64, shape ``(n_groups,)``: Kaplan-Meier event probability by the horizon in each
        group, ``1 - KM(horizon)``.
    n : numpy.ndarray
        int64, shape ``(n_groups,)``: subjects per group.
    events : numpy.ndarray
        int64, shape ``(n_groups,)``: events observed up to the horizon per group.
    slope, slope_se : float
        Cox calibration slope and its standard error: the coefficient of
        ``log(-log S(horizon | x))`` in a Cox model of the follow-up truncated at the horizon
        (1 is ideal; below 1 the predictions are too extreme, above 1 too modest). Both are NaN
        when the predictions do not vary (a slope is then undefined).
    """

    horizon: float
    predicted: np.ndarray
    observed: np.ndarray
    n: np.ndarray
    events: np.ndarray
    slope: float
    slope_se: float


class _CensoringKM:
    """Kaplan-Meier estimate of the censoring survival function ``G(t) = P(C > t)``.

    Built from training ``time`` (float64, (n,)) and ``event`` (bool, (n,)): censorings are the
    "events", and subjects with an event at a tied time leave the risk set first.
    """

    def __init__(self, time: np.ndarray, event: np.ndarray) -> None:
        times, inverse = np.unique(time, return_inverse=True)
        n_events = np.bincount(inverse, weights=event.astype(np.float64), minlength=times.size)
        n_total = np.bincount(inverse, minlength=times.size).astype(np.float64)
        n_censored = n_total - n_events
        at_risk = time.shape[0] - np.concatenate([[0.0], np.cumsum(n_total)[:-1]])
        at_risk_censoring = at_risk - n_events
        hazard = np.divide(
            n_censored,
            at_risk_censoring,
            out=np.zeros_like(n_censored),
            where=at_risk_censoring > 0,
        )
        self.times = times
        self.survival = np.cumprod(1.0 - hazard)

    def left_limit(self, t: np.ndarray) -> np.ndarray:
        """``G(t-)``: probability of remaining uncensored up to just before ``t``."""
        index = np.searchsorted(self.times, t, side="left") - 1
        return np.where(index >= 0, self.survival[np.maximum(index, 0)], 1.0)

    def at(self, t: np.ndarray) -> np.ndarray:
        """``G(t)``, right-continuous."""
        index = np.searchsorted(self.times, t, side="right") - 1
        return np.where(index >= 0, self.survival[np.maximum(index, 0)], 1.0)

    def inverse_weights(self, t: np.ndarray, what: str) -> np.ndarray:
        """``1 / G(t-)``; raises when the censoring survival is zero at a needed time."""
        g = self.left_limit(t)
        if (g <= 0).any():
            first = float(np.asarray(t)[g <= 0].min())
            raise ValueError(
                f"the censoring distribution of 'train_time'/'train_event' is zero before "
                f"{first:g} ({what}); every training subject still at risk was censored earlier, "
                "so inverse probability of censoring weights are undefined there"
            )
        return 1.0 / g


def _check_train(train_time: object, train_event: object) -> _CensoringKM:
    time_arr = _as_1d_numeric(train_time, "train_time")
    event_arr = _as_1d_numeric(train_event, "train_event")
    if event_arr.shape[0] != time_arr.shape[0]:
        raise ValueError(
            f"Dimension mismatch: 'train_event' has {event_arr.shape[0]} samples but "
            f"'train_time' has {time_arr.shape[0]}"
        )
    if time_arr.shape[0] < 1:
        raise ValueError("'train_time' must hold at least 1 sample, got 0")
    if (time_arr < 0).any():
        first = int(np.flatnonzero(time_arr < 0)[0])
        raise ValueError(
            f"'train_time' must be non-negative, got {time_arr[first]} at index {first}"
        )
    if ((event_arr != 0) & (event_arr != 1)).any():
        raise ValueError("'train_event' must hold only 0/1 or bool")
    return _CensoringKM(time_arr, event_arr.astype(bool))


def _check_time_point(value: object, name: str, *, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, Real) or not np.isfinite(float(value)):
        raise ValueError(f"'{name}' must be a finite number, got {value!r}")
    if float(value) <= 0:
        raise ValueError(f"'{name}' must be positive, got {value!r}")
    return float(value)


def _check_probabilities(values: np.ndarray, name: str) -> np.ndarray:
    outside = (values < 0) | (values > 1)
    if outside.any():
        first = int(np.flatnonzero(outside.ravel())[0])
        raise ValueError(
            f"'{name}' holds survival probabilities and must lie in [0, 1], got "
            f"{values.ravel()[first]} at flat index {first}"
        )
    return values


def _suffix_rank_counts(
    rank_by_pos: np.ndarray, starts: np.ndarray, query: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per query ``k``: positions ``p >= starts[k]`` with rank below / at most ``query[k]``.

    The per-query form of :func:`_suffix_rank_totals` (same block decomposition of the prefix
    ``[0, start)``); returns two int64 arrays shaped like ``query``.
    """
    n = rank_by_pos.shape[0]
    n_ranks = int(rank_by_pos.max()) + 1
    all_sorted = np.sort(rank_by_pos)
    less = np.searchsorted(all_sorted, query, side="left").astype(np.int64)
    at_most = np.searchsorted(all_sorted, query, side="right").astype(np.int64)
    positions = np.arange(n, dtype=np.int64)
    max_start = int(starts.max()) if starts.size else 0
    level = 0
    while (1 << level) <= max_start:
        selected = ((starts >> level) & 1).astype(bool)
        if selected.any():
            keys = np.sort((positions >> level) * n_ranks + rank_by_pos)
            block = (starts[selected] >> level) - 1
            base = block << level
            level_queries = block * n_ranks + query[selected]
            less[selected] -= np.searchsorted(keys, level_queries, side="left") - base
            at_most[selected] -= np.searchsorted(keys, level_queries, side="right") - base
        level += 1
    return less, at_most


def uno_c(
    time: object,
    event: object,
    risk: object,
    *,
    train_time: object,
    train_event: object,
    tau: float | None,
) -> float:
    """Uno's concordance index: Harrell's pairs weighted by ``1 / G(T_i-)^2``.

    Parameters
    ----------
    time, event, risk : array_like, shape (n_samples,)
        Test data as in :func:`harrell_c`; **higher risk means an earlier event**.
    train_time, train_event : array_like, shape (n_train,)
        Training data; their censoring distribution ``G`` gives the weights.
    tau : float or None
        Truncation time: only events before ``tau`` count as the earlier member of a pair
        (``None``: no truncation). Choose ``tau`` where ``G`` is still well above 0.

    Returns
    -------
    float
        C in [0, 1]. An ordered pair ``(i, j)`` is comparable as in :func:`harrell_c`, with
        ``time[i] < tau``; its weight is ``1 / G(time[i]-)^2``. Equals scikit-survival's
        ``concordance_index_ipcw`` up to its ``tied_tol`` on risks and the ``G(s-)`` convention
        of the module docstring. O(n log^2 n).

    Raises
    ------
    NoComparablePairsError
        If no event before ``tau`` has a comparable partner.

    Examples
    --------
    >>> uno_c(time=[1, 2, 3, 4], event=[1, 1, 0, 1], risk=[4, 3, 2, 1],
    ...       train_time=[1, 2, 3, 4], train_event=[1, 0, 1, 0], tau=None)
    1.0
    """
    time_arr, event_arr, (risk_arr,) = _check_survival_inputs(time, event, risk=risk)
    censoring = _check_train(train_time, train_event)
    tau_value = _check_time_point(tau, "tau", allow_none=True)
    structure = _PairStructure(time_arr, event_arr)
    kept = np.ones(structure.event_index.size, dtype=bool)
    event_times = time_arr[structure.event_index]
    if tau_value is not None:
        kept = event_times < tau_value
    comparable = (structure.n - structure.starts)[kept]
    if not kept.any() or comparable.sum() == 0:
        raise NoComparablePairsError(
            _no_pairs_message(event_arr) if structure.n_pairs == 0 else
            f"No comparable pairs before tau={tau_value:g}: no event before tau has a later exit"
        )
    weights = censoring.inverse_weights(event_times[kept], "at a test event time") ** 2
    _, rank = np.unique(risk_arr, return_inverse=True)
    rank = rank.astype(np.int64)
    less, at_most = _suffix_rank_counts(
        rank[structure.order], structure.starts[kept], rank[structure.event_index[kept]]
    )
    numerator = np.sum(weights * (less + 0.5 * (at_most - less)))
    return float(numerator / np.sum(weights * comparable))


def time_dependent_auc(
    time: object,
    event: object,
    risk: object,
    *,
    train_time: object,
    train_event: object,
    horizon: float,
) -> float:
    """Cumulative/dynamic AUC at ``horizon`` with IPCW.

    Cases had the event by the horizon (``event == 1`` and ``time <= horizon``) and weigh
    ``1 / G(time-)``; controls are event-free beyond it (``time > horizon``, or censored at it)
    and weigh 1 (their common weight ``1 / G(horizon-)`` cancels). The AUC is the weighted
    share of case-control pairs where the case has the higher risk, ties counting one half.

    Parameters
    ----------
    time, event, risk : array_like, shape (n_samples,)
        Test data as in :func:`harrell_c`; **higher risk means an earlier event**.
    train_time, train_event : array_like, shape (n_train,)
        Training data for the censoring distribution.
    horizon : float
        Positive evaluation time, same unit as ``time``.

    Returns
    -------
    float
        AUC in [0, 1]; equals scikit-survival's ``cumulative_dynamic_auc`` at one time point up
        to its ``tied_tol`` and the conventions of the module docstring.

    Raises
    ------
    NoComparablePairsError
        If there is no case or no control.

    Examples
    --------
    >>> time_dependent_auc(time=[1, 2, 5, 6], event=[1, 1, 0, 1], risk=[3, 1, 2, 0],
    ...                    train_time=[1, 2, 5, 6], train_event=[1, 1, 0, 1], horizon=3)
    0.75
    """
    time_arr, event_arr, (risk_arr,) = _check_survival_inputs(time, event, risk=risk)
    censoring = _check_train(train_time, train_event)
    horizon_value = _check_time_point(horizon, "horizon")
    cases = event_arr & (time_arr <= horizon_value)
    controls = (time_arr > horizon_value) | ((time_arr == horizon_value) & ~event_arr)
    if not cases.any() or not controls.any():
        raise NoComparablePairsError(
            f"time_dependent_auc at horizon={horizon_value:g} needs cases and controls, got "
            f"{int(cases.sum())} case(s) and {int(controls.sum())} control(s)"
        )
    weights = censoring.inverse_weights(time_arr[cases], "at a test event time")
    control_risk = np.sort(risk_arr[controls])
    case_risk = risk_arr[cases]
    less = np.searchsorted(control_risk, case_risk, side="left")
    at_most = np.searchsorted(control_risk, case_risk, side="right")
    credit = np.sum(weights * (less + 0.5 * (at_most - less)))
    return float(credit / (np.sum(weights) * control_risk.size))


def brier_score(
    time: object,
    event: object,
    survival: object,
    *,
    train_time: object,
    train_event: object,
    horizon: float,
) -> float:
    """IPCW Brier score (Graf et al., 1999) of predicted survival at ``horizon``.

    ``mean_i [ S_i^2 * case_i / G(time_i-) + (1 - S_i)^2 * control_i / G(horizon-) ]`` with
    cases and controls as in :func:`time_dependent_auc`; censored subjects before the horizon
    contribute 0 and are represented through the weights.

    Parameters
    ----------
    time, event : array_like, shape (n_samples,)
        Test data as in :func:`harrell_c`.
    survival : array_like, shape (n_samples,)
        Predicted probability of being event-free at ``horizon``, in [0, 1] (**higher means a
        later event**, the opposite of ``risk``).
    train_time, train_event : array_like, shape (n_train,)
        Training data for the censoring distribution.
    horizon : float
        Positive evaluation time.

    Returns
    -------
    float
        The Brier score, >= 0; lower is better (0.25 is the score of predicting 0.5 for all
        when half the subjects have the event).

    Examples
    --------
    >>> brier_score(time=[1, 2, 5, 6], event=[1, 1, 0, 1], survival=[0.0, 0.0, 1.0, 1.0],
    ...             train_time=[1, 2, 5, 6], train_event=[1, 1, 0, 1], horizon=3)
    0.0
    """
    time_arr, event_arr, (surv_arr,) = _check_survival_inputs(time, event, survival=survival)
    _check_probabilities(surv_arr, "survival")
    censoring = _check_train(train_time, train_event)
    horizon_value = _check_time_point(horizon, "horizon")
    return float(_brier_at(time_arr, event_arr, surv_arr, censoring, horizon_value))


def _brier_at(
    time: np.ndarray, event: np.ndarray, survival: np.ndarray, censoring: _CensoringKM, t: float
) -> float:
    cases = event & (time <= t)
    controls = (time > t) | ((time == t) & ~event)
    score = np.zeros(time.shape[0])
    if cases.any():
        weights = censoring.inverse_weights(time[cases], "at a test event time")
        score[cases] = survival[cases] ** 2 * weights
    if controls.any():
        weight = censoring.inverse_weights(np.array([t]), f"at the evaluation time {t:g}")[0]
        score[controls] = (1.0 - survival[controls]) ** 2 * weight
    return float(np.mean(score))


def integrated_brier_score(
    time: object,
    event: object,
    survival: object,
    *,
    train_time: object,
    train_event: object,
    times: object,
) -> float:
    """Integrated Brier score: the trapezoidal mean of :func:`brier_score` over ``times``.

    Parameters
    ----------
    time, event : array_like, shape (n_samples,)
        Test data as in :func:`harrell_c`.
    survival : array_like, shape (n_samples, n_times)
        Predicted event-free probability of each subject at each of ``times``, in [0, 1].
    train_time, train_event : array_like, shape (n_train,)
        Training data for the censoring distribution.
    times : array_like, shape (n_times,)
        At least two strictly increasing positive evaluation times.

    Returns
    -------
    float
        ``trapezoid(BS(t), t) / (times[-1] - times[0])``, as scikit-survival's
        ``integrated_brier_score``; lower is better.

    Examples
    --------
    >>> integrated_brier_score(time=[1, 2, 5, 6], event=[1, 1, 0, 1],
    ...                        survival=[[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]],
    ...                        train_time=[1, 2, 5, 6], train_event=[1, 1, 0, 1], times=[3, 4])
    0.0
    """
    times_arr = _as_1d_numeric(times, "times")
    if times_arr.shape[0] < 2:
        raise ValueError(f"'times' must hold at least 2 time points, got {times_arr.shape[0]}")
    if (times_arr <= 0).any() or (np.diff(times_arr) <= 0).any():
        raise ValueError(f"'times' must be positive and strictly increasing, got {times_arr}")
    surv_arr = np.asarray(survival)
    if surv_arr.ndim != 2 or surv_arr.shape[1] != times_arr.shape[0]:
        raise ValueError(
            f"'survival' must have shape (n_samples, {times_arr.shape[0]}) to match 'times', "
            f"got shape {surv_arr.shape}"
        )
    if surv_arr.dtype.kind not in "biuf" or not np.isfinite(surv_arr).all():
        raise ValueError("'survival' must be finite numbers")
    surv_arr = _check_probabilities(surv_arr.astype(np.float64), "survival")
    time_arr, event_arr, _ = _check_survival_inputs(time, event, survival=surv_arr[:, 0])
    censoring = _check_train(train_time, train_event)
    scores = np.array(
        [
            _brier_at(time_arr, event_arr, surv_arr[:, k], censoring, float(t))
            for k, t in enumerate(times_arr)
        ]
    )
    return float(np.trapezoid(scores, times_arr) / (times_arr[-1] - times_arr[0]))


# ---------------------------------------------------------------------------------------------
# Generic patient bootstrap


def _as_columns(data: Mapping[str, object], name: str) -> dict[str, np.ndarray]:
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"'{name}' must be a non-empty mapping of argument name to array")
    columns = {key: np.asarray(value) for key, value in data.items()}
    lengths = {key: (value.shape[0] if value.ndim else -1) for key, value in columns.items()}
    first_key = next(iter(lengths))
    for key, length in lengths.items():
        if length != lengths[first_key]:
            raise ValueError(
                f"Dimension mismatch in '{name}': '{key}' has {length} samples but "
                f"'{first_key}' has {lengths[first_key]}"
            )
    if lengths[first_key] < 2:
        raise ValueError(f"'{name}' must hold at least 2 samples, got {lengths[first_key]}")
    return columns


def _resamplers(
    columns: dict[str, np.ndarray],
    train_columns: dict[str, np.ndarray] | None,
    groups: object | None,
    train_groups: object | None,
) -> tuple[_Resampler, _Resampler | None]:
    """The resamplers of ``data`` and ``train`` (rows, or the groups given for them)."""
    n = next(iter(columns.values())).shape[0]
    codes = None if groups is None else _group_codes(groups, n, "groups", "data")
    if train_columns is None:
        if train_groups is not None:
            raise ValueError("'train_groups' was given without 'train'")
        return _Resampler(n, codes), None
    n_train = next(iter(train_columns.values())).shape[0]
    train_codes = None
    if train_groups is not None:
        train_codes = _group_codes(train_groups, n_train, "train_groups", "train")
    return _Resampler(n, codes), _Resampler(n_train, train_codes)


def _draw_values(
    evaluate: Callable[[np.ndarray, np.ndarray | None], np.ndarray],
    resampler: _Resampler,
    train_resampler: _Resampler | None,
    n_boot: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, int]:
    """Evaluate ``n_boot`` resamples, each drawn as G units of data, then G_train of train."""
    values: list[np.ndarray] = []
    n_redrawn = 0
    while len(values) < n_boot:
        index = resampler.indices(resampler.draw(rng))
        train_index = (
            None if train_resampler is None else train_resampler.indices(train_resampler.draw(rng))
        )
        try:
            values.append(np.atleast_1d(evaluate(index, train_index)))
        except NoComparablePairsError as err:
            n_redrawn += 1
            if n_redrawn > _MAX_REDRAWS_PER_RESAMPLE * n_boot:
                raise NoComparablePairsError(
                    f"{n_redrawn} resamples had no comparable pair while drawing {n_boot}: {err}"
                ) from err
    return np.array(values, dtype=np.float64), n_redrawn


def bootstrap_metric(
    fn: Callable[..., float],
    data: Mapping[str, object],
    *,
    train: Mapping[str, object] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator | int | None = None,
    groups: object | None = None,
    train_groups: object | None = None,
) -> BootstrapResult:
    """Percentile bootstrap of any metric, resampling patients with everything they carry.

    Each resample draws ``n`` rows of ``data`` with replacement (every array in it with the
    same indices) and, when ``train`` is given, independently ``n_train`` rows of ``train``.
    With ``groups`` (``train_groups``) it draws ``G`` group ids with replacement instead and
    takes every row of each drawn group, a group drawn twice twice, so repeat studies of a
    patient are resampled together and a resample holds a varying number of rows. The metric
    is recomputed from scratch as ``fn(**data_rows, **train_rows)``. For the IPCW metrics the
    censoring distribution is refitted on the resampled training data and each drawn test
    patient carries its own weight, so no weight is ever left at the original
    indexing (torchsurv's bootstrap of its IPCW metrics keeps the weights fixed). A resample on
    which ``fn`` raises :class:`NoComparablePairsError` is redrawn and counted.

    Parameters
    ----------
    fn : callable
        Metric called with keyword arguments, returning a float (e.g. ``functools.partial(uno_c,
        tau=365)``).
    data : mapping of str to array_like, each shape (n_samples, ...)
        The evaluation patients (e.g. ``{"time": t, "event": e, "risk": r}``).
    train : mapping of str to array_like, each shape (n_train, ...), optional
        Data resampled on their own (e.g. ``{"train_time": tt, "train_event": te}``).
    n_boot : int
        Number of resamples kept, at least 1.
    alpha : float
        The interval covers ``1 - alpha``.
    rng : numpy.random.Generator, int or None
        Source of randomness (an int is a seed).
    groups : array_like, shape (n_samples,), optional
        The resampling unit of each row of ``data`` (e.g. ``person_id``; any hashable ids, no
        missing values). ``None``: every row is its own unit, as in earlier versions, same
        draws. A resample draws ``rng.integers(0, G, size=G)`` over the sorted distinct ids.
    train_groups : array_like, shape (n_train,), optional
        The same for ``train`` (only with ``train``).

    Returns
    -------
    BootstrapResult
        ``estimate`` is ``fn`` on the full data; ``lower``/``upper`` percentile limits.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> t = gen.exponential(size=100)
    >>> res = bootstrap_metric(harrell_c, {"time": t, "event": np.ones(100), "risk": -t},
    ...                        n_boot=50, rng=1)
    >>> res.estimate, res.lower, res.n_boot
    (1.0, 1.0, 50)

    Patients with two studies each, resampled by patient, give the resamples of the
    de-duplicated data:

    >>> r = -t + gen.normal(size=100)
    >>> once = bootstrap_metric(harrell_c, {"time": t, "event": np.ones(100), "risk": r},
    ...                         n_boot=50, rng=1)
    >>> twice = bootstrap_metric(harrell_c, {"time": np.tile(t, 2), "event": np.ones(200),
    ...                                      "risk": np.tile(r, 2)},
    ...                          n_boot=50, rng=1, groups=np.tile(np.arange(100), 2))
    >>> bool(np.array_equal(once.samples, twice.samples))
    True
    """
    columns = _as_columns(data, "data")
    train_columns = None if train is None else _as_columns(train, "train")
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    generator = _as_generator(rng)
    resampler, train_resampler = _resamplers(columns, train_columns, groups, train_groups)
    estimate = float(fn(**columns, **(train_columns or {})))

    def evaluate(index: np.ndarray, train_index: np.ndarray | None) -> np.ndarray:
        rows = {key: value[index] for key, value in columns.items()}
        if train_columns is not None:
            rows.update({key: value[train_index] for key, value in train_columns.items()})
        return np.array([fn(**rows)])

    values, n_redrawn = _draw_values(evaluate, resampler, train_resampler, n_boot, generator)
    return _percentile_result(estimate, values[:, 0], alpha=alpha, n_boot=n_boot, n_redrawn=n_redrawn)


def paired_bootstrap_metric(
    fn: Callable[..., float],
    data: Mapping[str, object],
    *,
    a: Mapping[str, object],
    b: Mapping[str, object],
    train: Mapping[str, object] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    rng: np.random.Generator | int | None = None,
    groups: object | None = None,
    train_groups: object | None = None,
) -> PairedTestResult:
    """Paired bootstrap of ``fn`` for two models scored on the same patients.

    On each resample the same rows of ``data``, ``a`` and ``b`` (and the same resampled
    ``train``) give ``fn(**data, **a) - fn(**data, **b)``. The two-sided p-value is that of
    :func:`paired_bootstrap_test`: ``min(1, 2 * min(1 + #{d <= 0}, 1 + #{d >= 0}) / (n_boot +
    1))``.

    Parameters
    ----------
    fn, data, train, n_boot, rng, groups, train_groups
        As in :func:`bootstrap_metric` (``groups`` resamples whole groups of rows of ``data``,
        ``a`` and ``b`` together).
    a, b : mapping of str to array_like, each shape (n_samples, ...)
        The model-specific arguments (e.g. ``{"risk": risk_a}`` and ``{"risk": risk_b}``).
    alpha : float
        ``lower``/``upper`` cover ``1 - alpha`` of the resampled differences.

    Returns
    -------
    PairedTestResult
        ``c_a``/``c_b`` hold the metric of ``a``/``b`` on the full data.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> t = gen.exponential(size=200)
    >>> res = paired_bootstrap_metric(harrell_c, {"time": t, "event": np.ones(200)},
    ...                               a={"risk": -t}, b={"risk": gen.normal(size=200)},
    ...                               n_boot=100, rng=1)
    >>> res.difference > 0.4, res.p_value < 0.05
    (True, True)
    """
    columns = _as_columns(data, "data")
    a_columns = _as_columns(a, "a")
    b_columns = _as_columns(b, "b")
    n = next(iter(columns.values())).shape[0]
    for name, group in (("a", a_columns), ("b", b_columns)):
        length = next(iter(group.values())).shape[0]
        if length != n:
            raise ValueError(
                f"Dimension mismatch: '{name}' has {length} samples but 'data' has {n}"
            )
    train_columns = None if train is None else _as_columns(train, "train")
    n_boot = _check_n_boot(n_boot)
    alpha = _check_alpha(alpha)
    generator = _as_generator(rng)
    resampler, train_resampler = _resamplers(columns, train_columns, groups, train_groups)
    extra = train_columns or {}
    value_a = float(fn(**columns, **a_columns, **extra))
    value_b = float(fn(**columns, **b_columns, **extra))

    def evaluate(index: np.ndarray, train_index: np.ndarray | None) -> np.ndarray:
        rows = {key: value[index] for key, value in columns.items()}
        if train_columns is not None:
            rows.update({key: value[train_index] for key, value in train_columns.items()})
        first = fn(**rows, **{key: value[index] for key, value in a_columns.items()})
        second = fn(**rows, **{key: value[index] for key, value in b_columns.items()})
        return np.array([first - second])

    values, n_redrawn = _draw_values(evaluate, resampler, train_resampler, n_boot, generator)
    differences = values[:, 0]
    lower, upper = np.quantile(differences, [alpha / 2, 1 - alpha / 2])
    at_or_below = 1 + int(np.sum(differences <= 0))
    at_or_above = 1 + int(np.sum(differences >= 0))
    return PairedTestResult(
        c_a=value_a,
        c_b=value_b,
        difference=value_a - value_b,
        lower=float(lower),
        upper=float(upper),
        p_value=min(1.0, 2 * min(at_or_below, at_or_above) / (n_boot + 1)),
        n_boot=n_boot,
        n_redrawn=n_redrawn,
    )


# ---------------------------------------------------------------------------------------------
# Calibration and multiple comparisons


def _kaplan_meier_at(time: np.ndarray, event: np.ndarray, t: float) -> float:
    """Kaplan-Meier event-free probability at ``t`` (right-continuous)."""
    times, inverse = np.unique(time, return_inverse=True)
    deaths = np.bincount(inverse, weights=event.astype(np.float64), minlength=times.size)
    total = np.bincount(inverse, minlength=times.size)
    at_risk = time.shape[0] - np.concatenate([[0], np.cumsum(total)[:-1]])
    keep = times <= t
    return float(np.prod(1.0 - deaths[keep] / at_risk[keep]))


def _cox_slope(time: np.ndarray, event: np.ndarray, x: np.ndarray) -> tuple[float, float]:
    """Coefficient and standard error of a one-covariate Cox model (Breslow ties).

    Newton-Raphson with step halving on the partial log-likelihood. Returns ``(nan, nan)`` when
    the covariate does not vary within any risk set at an event (the slope is undefined).
    """
    order = np.argsort(-time, kind="stable")
    time, event, x = time[order], event[order], x[order]
    x = x - x.mean()
    # the last index of each block of tied times, in descending time order
    last = np.r_[np.flatnonzero(np.diff(time) != 0), time.size - 1]
    first = np.r_[0, last[:-1] + 1]
    deaths = np.add.reduceat(event.astype(np.float64), first)
    x_deaths = np.add.reduceat(np.where(event, x, 0.0), first)

    def evaluate(beta: float) -> tuple[float, float, float]:
        eta = beta * x
        shift = eta.max()
        w = np.exp(eta - shift)
        s0 = np.cumsum(w)[last]
        mean = np.cumsum(w * x)[last] / s0
        second = np.cumsum(w * x * x)[last] / s0
        loglik = float(np.sum(beta * x_deaths - deaths * (np.log(s0) + shift)))
        gradient = float(np.sum(x_deaths - deaths * mean))
        information = float(np.sum(deaths * np.maximum(second - mean**2, 0.0)))
        return loglik, gradient, information

    beta = 0.0
    loglik, gradient, information = evaluate(beta)
    if information <= 1e-12 * max(1.0, float(np.sum(deaths))):
        return float("nan"), float("nan")
    for _ in range(100):
        step = gradient / information
        for _ in range(60):
            trial = evaluate(beta + step)
            if trial[0] >= loglik - 1e-12 * abs(loglik):
                break
            step /= 2
        beta += step
        loglik, gradient, information = trial
        if abs(step) < 1e-10 * max(1.0, abs(beta)):
            break
    if information <= 0:
        return float("nan"), float("nan")
    return float(beta), float(1.0 / np.sqrt(information))


def calibration(
    time: object,
    event: object,
    survival: object,
    *,
    horizon: float,
    n_groups: int = 10,
) -> CalibrationResult:
    """Calibration at ``horizon``: predicted vs Kaplan-Meier observed event probability.

    Subjects are split into ``n_groups`` groups of (nearly) equal size by predicted event
    probability ``1 - survival`` (deciles by default). The slope is the Cox calibration slope:
    the coefficient of ``log(-log(survival))`` (clipped to [1e-12, 1 - 1e-12] first) in a Cox
    model of the follow-up truncated at ``horizon`` (events after it censored there). For a
    proportional-hazards model this covariate is the linear predictor up to a constant, so 1
    means calibrated spread.

    Parameters
    ----------
    time, event : array_like, shape (n_samples,)
        As in :func:`harrell_c`.
    survival : array_like, shape (n_samples,)
        Predicted event-free probability at ``horizon``, in [0, 1]; **higher means a later
        event**.
    horizon : float
        Positive time of the predictions.
    n_groups : int
        Number of risk groups, between 2 and ``n_samples``.

    Returns
    -------
    CalibrationResult

    Raises
    ------
    NoComparablePairsError
        If no event happens by the horizon.

    Examples
    --------
    >>> gen = np.random.default_rng(0)
    >>> lp = gen.normal(size=2000)
    >>> t = gen.exponential(1 / (0.1 * np.exp(lp)))
    >>> result = calibration(time=t, event=np.ones(2000), survival=np.exp(-0.1 * np.exp(lp)),
    ...                      horizon=1.0)
    >>> bool(abs(result.slope - 1) < 3 * result.slope_se), result.predicted.shape
    (True, (10,))
    """
    time_arr, event_arr, (surv_arr,) = _check_survival_inputs(time, event, survival=survival)
    _check_probabilities(surv_arr, "survival")
    horizon_value = _check_time_point(horizon, "horizon")
    if isinstance(n_groups, bool) or not isinstance(n_groups, Integral):
        raise ValueError(f"'n_groups' must be an integer, got {n_groups!r}")
    if not 2 <= n_groups <= time_arr.shape[0]:
        raise ValueError(
            f"'n_groups' must be between 2 and the number of samples ({time_arr.shape[0]}), "
            f"got {n_groups}"
        )
    events_by_horizon = event_arr & (time_arr <= horizon_value)
    if not events_by_horizon.any():
        raise NoComparablePairsError(
            f"calibration at horizon={horizon_value:g}: no event happens by the horizon"
        )
    predicted_risk = 1.0 - surv_arr
    groups = np.array_split(np.argsort(predicted_risk, kind="stable"), int(n_groups))
    predicted = np.array([predicted_risk[g].mean() for g in groups])
    observed = np.array(
        [1.0 - _kaplan_meier_at(time_arr[g], event_arr[g], horizon_value) for g in groups]
    )
    sizes = np.array([g.size for g in groups], dtype=np.int64)
    events = np.array([int(events_by_horizon[g].sum()) for g in groups], dtype=np.int64)
    clipped = np.clip(surv_arr, 1e-12, 1 - 1e-12)
    covariate = np.log(-np.log(clipped))
    slope, slope_se = _cox_slope(np.minimum(time_arr, horizon_value), events_by_horizon, covariate)
    return CalibrationResult(
        horizon=horizon_value,
        predicted=predicted,
        observed=observed,
        n=sizes,
        events=events,
        slope=slope,
        slope_se=slope_se,
    )


def holm(pvalues: object) -> np.ndarray:
    """Holm's step-down adjustment of p-values for a family of tests.

    With the ``m`` non-missing p-values sorted as ``p_(1) <= ... <= p_(m)``, the adjusted
    value of ``p_(k)`` is ``max_{j <= k} min(1, (m - j + 1) p_(j))``. It controls the
    family-wise error rate under any dependence between the tests. NaN entries (tests not
    done) stay NaN and do not count in ``m``.

    Parameters
    ----------
    pvalues : array_like, shape (m,)
        p-values in [0, 1] (NaN allowed).

    Returns
    -------
    numpy.ndarray
        float64, shape (m,): adjusted p-values in the input order.

    Examples
    --------
    >>> np.round(holm([0.01, 0.04, 0.03, 0.005]), 12).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"'pvalues' must be 1-D, got shape {p.shape}")
    present = ~np.isnan(p)
    if ((p[present] < 0) | (p[present] > 1)).any():
        raise ValueError(f"'pvalues' must lie in [0, 1], got {p[present].min()}..{p[present].max()}")
    adjusted = np.full(p.shape, np.nan)
    values = p[present]
    m = values.size
    if m == 0:
        return adjusted
    order = np.argsort(values, kind="stable")
    scaled = np.minimum(1.0, (m - np.arange(m)) * values[order])
    result = np.empty(m)
    result[order] = np.maximum.accumulate(scaled)
    adjusted[present] = result
    return adjusted


class BreslowBaseline:
    """Breslow estimate of the cumulative baseline hazard from training data, giving
    survival probabilities ``S(t | x) = exp(-H0(t) * exp(log_hz))``.

    ``log_hz``, ``time`` (days) and ``event`` are arrays of shape (n,).
    """

    def __init__(self, log_hz: np.ndarray, time: np.ndarray, event: np.ndarray) -> None:
        log_hz = np.asarray(log_hz, dtype=np.float64)
        time = np.asarray(time, dtype=np.float64)
        event = np.asarray(event).astype(bool)
        self.shift = float(log_hz.max())
        risk = np.exp(log_hz - self.shift)
        order = np.argsort(time, kind="stable")
        time, risk, event = time[order], risk[order], event[order]
        at_risk = np.cumsum(risk[::-1])[::-1]
        unique_times, first = np.unique(time, return_index=True)
        deaths = np.add.reduceat(event.astype(np.float64), first)
        self.times = unique_times
        self.cumhaz = np.cumsum(deaths / at_risk[first])

    def cumulative_hazard(self, t: float) -> float:
        """H0(t), on the scale of ``exp(log_hz - shift)``."""
        k = np.searchsorted(self.times, t, side="right")
        return float(self.cumhaz[k - 1]) if k > 0 else 0.0

    def survival(self, log_hz: np.ndarray, t: float) -> np.ndarray:
        """S(t | x) for each log-hazard, float64 array (n,) in [0, 1]."""
        with np.errstate(over="ignore"):  # exp overflowing to inf gives S = 0, the right limit
            return np.exp(-self.cumulative_hazard(t) * np.exp(np.asarray(log_hz, dtype=np.float64) - self.shift))
