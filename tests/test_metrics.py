"""Tests for helpers.metrics against lifelines 0.30.3 and scikit-survival 0.28.0.

IPCW metrics are checked against ``sksurv.metrics.concordance_index_ipcw``,
``cumulative_dynamic_auc``, ``brier_score`` and ``integrated_brier_score``; the Cox calibration
slope against ``lifelines.CoxPHFitter``.

References are computed by calling the packages directly (versions pinned in pyproject.toml):
``lifelines.utils.concordance_index(time, -risk, event)`` (lifelines wants higher = longer
survival, hence the minus) and ``sksurv.metrics.concordance_index_censored(event, time, risk)``.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index
from sksurv.metrics import brier_score as sksurv_brier_score
from sksurv.metrics import (
    concordance_index_censored,
    concordance_index_ipcw,
    cumulative_dynamic_auc,
)
from sksurv.metrics import integrated_brier_score as sksurv_integrated_brier_score
from sksurv.util import Surv

from helpers.metrics import (
    BootstrapResult,
    NoComparablePairsError,
    PairedTestResult,
    _bootstrap_values,
    bootstrap_ci,
    bootstrap_metric,
    brier_score,
    calibration,
    harrell_c,
    holm,
    integrated_brier_score,
    paired_bootstrap_metric,
    paired_bootstrap_test,
    time_dependent_auc,
    uno_c,
)


def naive_harrell_c(time, event, risk) -> float:
    """O(n^2) Harrell's C written straight from the definition (risk: higher = earlier event).

    Ordered pair (i, j) is comparable when i had the event and j left later, or j was censored
    at the same time; credit 1 if risk_i > risk_j, 0.5 if equal.
    """
    credit = 0.0
    pairs = 0
    for i in range(len(time)):
        if not event[i]:
            continue
        for j in range(len(time)):
            if time[j] > time[i] or (time[j] == time[i] and not event[j]):
                pairs += 1
                if risk[i] > risk[j]:
                    credit += 1.0
                elif risk[i] == risk[j]:
                    credit += 0.5
    if pairs == 0:
        raise NoComparablePairsError("no comparable pairs")
    return credit / pairs


def lifelines_c(time, event, risk) -> float:
    return concordance_index(np.asarray(time), -np.asarray(risk, dtype=float), np.asarray(event))


@st.composite
def survival_data(draw, max_time: int = 5, max_risk: int = 4):
    """Small data sets with many tied (integer) times and tied risks."""
    n = draw(st.integers(min_value=2, max_value=30))
    time = draw(st.lists(st.integers(0, max_time), min_size=n, max_size=n))
    event = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    risk = draw(st.lists(st.integers(-max_risk, max_risk), min_size=n, max_size=n))
    scale = draw(st.sampled_from([1.0, 0.1, 1e3]))
    return (
        np.array(time, dtype=float),
        np.array(event, dtype=int),
        np.array(risk, dtype=float) * scale,
    )


def _has_pair(time, event) -> bool:
    try:
        naive_harrell_c(time, event, np.zeros(len(time)))
    except NoComparablePairsError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# harrell_c


@settings(deadline=None, max_examples=200)
@given(data=survival_data())
def test_harrell_c_matches_naive_and_lifelines(data):
    time, event, risk = data
    if not _has_pair(time, event):
        with pytest.raises(NoComparablePairsError):
            harrell_c(time=time, event=event, risk=risk)
        with pytest.raises(ZeroDivisionError):
            lifelines_c(time, event, risk)
        return
    fast = harrell_c(time=time, event=event, risk=risk)
    assert fast == pytest.approx(naive_harrell_c(time, event, risk), abs=1e-12)
    assert fast == pytest.approx(lifelines_c(time, event, risk), abs=1e-12)


@settings(deadline=None, max_examples=100)
@given(data=survival_data(max_time=3, max_risk=2))
def test_harrell_c_matches_sksurv_when_risks_are_not_within_tolerance(data):
    """scikit-survival uses the same comparable pairs as lifelines (an event is comparable with
    every later exit and with censorings at its own time; tied deaths are not comparable), so
    with risks that are equal or at least 1e-8 apart the two agree. Integer risks here."""
    time, event, risk = data
    if not _has_pair(time, event):
        return
    expected = concordance_index_censored(event.astype(bool), time, risk)[0]
    assert harrell_c(time=time, event=event, risk=risk) == pytest.approx(expected, abs=1e-12)


def test_sksurv_differs_only_through_its_risk_tie_tolerance():
    """sksurv's ``tied_tol=1e-8`` counts risks closer than 1e-8 as tied (credit 0.5); lifelines
    and harrell_c compare the floats exactly (credit 1 here)."""
    time, event, risk = np.array([1.0, 2.0]), np.array([1, 1]), np.array([1.0 + 1e-9, 1.0])
    assert harrell_c(time=time, event=event, risk=risk) == 1.0
    assert lifelines_c(time, event, risk) == 1.0
    assert concordance_index_censored(event.astype(bool), time, risk)[0] == 0.5
    assert concordance_index_censored(event.astype(bool), time, risk, tied_tol=0.0)[0] == 1.0


@pytest.mark.parametrize(
    ("time", "event", "risk"),
    [
        pytest.param([1, 2, 3, 4], [1, 1, 1, 1], [4, 3, 2, 1], id="all-events-perfect"),
        pytest.param([1, 2, 3, 4], [1, 1, 1, 1], [1, 2, 3, 4], id="all-events-reversed"),
        pytest.param([2, 2], [1, 0], [1.0, 0.0], id="death-and-censoring-same-time"),
        pytest.param([2, 2], [1, 0], [0.0, 1.0], id="death-and-censoring-same-time-wrong"),
        pytest.param([2, 2, 2, 3], [1, 1, 0, 1], [1, 1, 1, 0], id="tied-deaths-and-censoring"),
        pytest.param([1, 1, 2, 2, 3], [1, 1, 1, 0, 0], [3, 3, 3, 3, 3], id="all-risks-tied"),
        pytest.param([0, 0, 5], [1, 0, 0], [2, 1, 1], id="zero-times"),
    ],
)
def test_harrell_c_hand_cases(time, event, risk):
    expected = naive_harrell_c(time, event, risk)
    assert harrell_c(time=time, event=event, risk=risk) == pytest.approx(expected, abs=1e-12)
    assert harrell_c(time=time, event=event, risk=risk) == pytest.approx(
        lifelines_c(time, event, risk), abs=1e-12
    )


def test_harrell_c_death_comparable_with_censoring_at_same_time():
    # One pair only (death vs censoring at t=2); the two deaths at t=2 are not compared.
    assert harrell_c(time=[2, 2, 2], event=[1, 1, 0], risk=[1.0, 0.0, 0.5]) == 0.5


@pytest.mark.parametrize("n", [1000, 20000])
def test_harrell_c_random_large_matches_lifelines(n):
    gen = np.random.default_rng(n)
    time = np.round(gen.exponential(10.0, size=n), 1)  # many tied times
    event = gen.random(n) < 0.4
    risk = np.round(-time + gen.normal(0, 5.0, size=n), 0)  # many tied risks
    assert harrell_c(time=time, event=event, risk=risk) == pytest.approx(
        lifelines_c(time, event, risk), abs=1e-12
    )


def test_harrell_c_accepts_bool_event_and_int_time():
    time, risk = np.array([3, 1, 2]), np.array([0.1, 0.9, 0.5])
    assert harrell_c(time=time, event=np.array([True, True, False]), risk=risk) == 1.0


def test_all_censored_raises_no_comparable_pairs():
    with pytest.raises(NoComparablePairsError, match="No comparable pairs: 0 event"):
        harrell_c(time=[1, 2, 3], event=[0, 0, 0], risk=[1, 2, 3])
    assert issubclass(NoComparablePairsError, ValueError)
    with pytest.raises(ValueError, match="No comparable pairs"):
        bootstrap_ci(time=[1, 2, 3], event=[0, 0, 0], risk=[1, 2, 3], n_boot=5, rng=0)


# ---------------------------------------------------------------------------------------------
# input validation


_GOOD = {"time": [1.0, 2.0, 3.0], "event": [1, 0, 1], "risk": [0.3, 0.2, 0.1]}

_BAD_INPUTS = [
    pytest.param(
        {"risk": [0.1, 0.2]},
        "Dimension mismatch: 'risk' has 2 samples but 'time' has 3",
        id="risk-length",
    ),
    pytest.param(
        {"event": [1, 0]},
        "Dimension mismatch: 'event' has 2 samples but 'time' has 3",
        id="event-length",
    ),
    pytest.param(
        {"time": [[1.0, 2.0, 3.0]]}, r"'time' must be 1-D, got shape \(1, 3\)", id="time-2d"
    ),
    pytest.param(
        {"time": [1.0], "event": [1], "risk": [0.0]}, "at least 2 samples, got 1", id="one-sample"
    ),
    pytest.param({"risk": [0.1, np.nan, 0.3]}, "'risk' must be finite.*index 1", id="risk-nan"),
    pytest.param({"risk": [0.1, np.inf, 0.3]}, "'risk' must be finite", id="risk-inf"),
    pytest.param({"time": [1.0, np.nan, 3.0]}, "'time' must be finite", id="time-nan"),
    pytest.param(
        {"time": [1.0, -2.0, 3.0]},
        "'time' must be non-negative, got -2.0 at index 1",
        id="time-negative",
    ),
    pytest.param(
        {"event": [1, 2, 0]},
        "'event' must hold only 0/1 or bool, got 2.0 at index 1",
        id="event-not-binary",
    ),
    pytest.param({"risk": ["a", "b", "c"]}, "'risk' must be numeric or bool", id="risk-strings"),
    pytest.param({"n_boot": 0}, "'n_boot' must be at least 1, got 0", id="n-boot-zero"),
    pytest.param({"n_boot": 2.5}, "'n_boot' must be an integer", id="n-boot-float"),
    pytest.param({"alpha": 0.0}, "'alpha' must be a number strictly between 0 and 1", id="alpha-0"),
    pytest.param(
        {"alpha": 1.5}, "'alpha' must be a number strictly between 0 and 1", id="alpha-big"
    ),
    pytest.param({"rng": "seed"}, "'rng' must be a numpy.random.Generator", id="rng-string"),
]


@pytest.mark.parametrize(("changes", "message"), _BAD_INPUTS)
def test_bootstrap_ci_rejects_bad_input(changes, message):
    kwargs = {**_GOOD, "n_boot": 10, "rng": 0, **changes}
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**kwargs)


@pytest.mark.parametrize(
    ("changes", "message"),
    [p for p in _BAD_INPUTS if p.id not in {"alpha-0", "alpha-big"}],
)
def test_paired_bootstrap_test_rejects_bad_input(changes, message):
    kwargs = {**_GOOD, "n_boot": 10, "rng": 0, **changes}
    kwargs["risk_a"] = kwargs.pop("risk")
    kwargs["risk_b"] = (
        _GOOD["risk"][: len(kwargs["risk_a"])] if "risk" in changes else _GOOD["risk"]
    )
    message = message.replace("'risk'", "'risk_a'")
    with pytest.raises(ValueError, match=message):
        paired_bootstrap_test(**kwargs)


def test_harrell_c_names_risk_b_mismatch():
    with pytest.raises(
        ValueError, match="Dimension mismatch: 'risk_b' has 2 samples but 'time' has 3"
    ):
        paired_bootstrap_test(
            **{k: v for k, v in _GOOD.items() if k != "risk"},
            risk_a=_GOOD["risk"],
            risk_b=[0.1, 0.2],
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [p for p in _BAD_INPUTS if p.id in {"risk-length", "risk-nan", "time-negative", "one-sample"}],
)
def test_harrell_c_rejects_bad_input(changes, message):
    with pytest.raises(ValueError, match=message):
        harrell_c(**{**_GOOD, **changes})


# ---------------------------------------------------------------------------------------------
# bootstrap


def _random_data(n: int, seed: int, tied: bool = True):
    gen = np.random.default_rng(seed)
    time = gen.integers(1, 20, size=n).astype(float) if tied else gen.exponential(size=n)
    event = gen.random(n) < 0.5
    risk = np.round(-time / 5 + gen.normal(size=n), 1)
    return time, event, risk


@pytest.mark.parametrize("n", [3, 25, 200])
def test_weighted_matrix_path_equals_explicit_resampling(n):
    time, event, risk = _random_data(n, seed=n)
    other = np.random.default_rng(99).normal(size=n)
    matrix, redrawn_m = _bootstrap_values(
        time, event, [risk, other], 300, np.random.default_rng(7), "matrix"
    )
    explicit, redrawn_e = _bootstrap_values(
        time, event, [risk, other], 300, np.random.default_rng(7), "resample"
    )
    np.testing.assert_array_equal(matrix, explicit)
    assert redrawn_m == redrawn_e


def test_weighted_formula_equals_harrell_c_on_resampled_arrays():
    time, event, risk = _random_data(50, seed=3)
    gen = np.random.default_rng(11)
    indices = gen.integers(0, 50, size=(1, 50))
    values, redrawn = _bootstrap_values(time, event, [risk], 1, np.random.default_rng(11), "matrix")
    assert redrawn == 0
    expected = lifelines_c(time[indices[0]], event[indices[0]], risk[indices[0]])
    assert values[0, 0] == pytest.approx(expected, abs=1e-12)
    assert values[0, 0] == harrell_c(time[indices[0]], event[indices[0]], risk[indices[0]])


def test_bootstrap_same_seed_same_result():
    time, event, risk = _random_data(100, seed=1)
    first = bootstrap_ci(time=time, event=event, risk=risk, n_boot=200, rng=5)
    second = bootstrap_ci(
        time=time, event=event, risk=risk, n_boot=200, rng=np.random.default_rng(5)
    )
    assert isinstance(first, BootstrapResult)
    np.testing.assert_array_equal(first.samples, second.samples)
    assert (first.lower, first.upper, first.n_redrawn) == (
        second.lower,
        second.upper,
        second.n_redrawn,
    )
    third = bootstrap_ci(time=time, event=event, risk=risk, n_boot=200, rng=6)
    assert not np.array_equal(first.samples, third.samples)


@pytest.mark.parametrize("seed", range(5))
def test_bootstrap_ci_contains_estimate(seed):
    time, event, risk = _random_data(300, seed=seed, tied=False)
    result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=300, alpha=0.1, rng=seed)
    assert result.estimate == harrell_c(time=time, event=event, risk=risk)
    assert result.lower < result.estimate < result.upper
    assert result.samples.shape == (300,) and result.n_boot == 300
    assert 0.0 <= result.lower and result.upper <= 1.0


def test_bootstrap_counts_redrawn_resamples():
    # Only subject 0 has an event: a resample is scorable only if it holds subject 0 and one of
    # the others; a draw fails with probability (2/3)**3 + (1/3)**3 = 1/3, so about 150 of the
    # draws for 300 kept resamples are redrawn.
    result = bootstrap_ci(
        time=[1.0, 2.0, 3.0], event=[1, 0, 0], risk=[0.9, 0.5, 0.1], n_boot=300, rng=0
    )
    assert 50 < result.n_redrawn < 250
    assert result.samples.shape == (300,)
    np.testing.assert_array_equal(result.samples, 1.0)


def test_bootstrap_large_n_uses_resampling_path():
    time, event, risk = _random_data(4500, seed=2)
    result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=3, rng=0)
    explicit, _ = _bootstrap_values(time, event, [risk], 3, np.random.default_rng(0), "resample")
    np.testing.assert_array_equal(result.samples, explicit[:, 0])


# ---------------------------------------------------------------------------------------------
# paired test


def test_paired_identical_risks_give_zero_difference_and_p_one():
    time, event, risk = _random_data(150, seed=4)
    result = paired_bootstrap_test(
        time=time, event=event, risk_a=risk, risk_b=risk.copy(), n_boot=200, rng=0
    )
    assert isinstance(result, PairedTestResult)
    assert result.difference == 0.0 and result.lower == 0.0 and result.upper == 0.0
    assert result.p_value == 1.0


def test_paired_strong_versus_random_predictor():
    gen = np.random.default_rng(8)
    time = gen.exponential(size=400)
    event = gen.random(400) < 0.7
    strong = -time + 0.2 * gen.normal(size=400)
    noise = gen.normal(size=400)
    result = paired_bootstrap_test(
        time=time, event=event, risk_a=strong, risk_b=noise, n_boot=500, rng=1
    )
    assert result.c_a == harrell_c(time=time, event=event, risk=strong)
    assert result.c_b == harrell_c(time=time, event=event, risk=noise)
    assert result.difference == result.c_a - result.c_b
    assert result.lower > 0.2
    assert result.p_value == pytest.approx(2 / 501)
    reverse = paired_bootstrap_test(
        time=time, event=event, risk_a=noise, risk_b=strong, n_boot=500, rng=1
    )
    assert reverse.upper < -0.2 and reverse.p_value == result.p_value


def test_paired_same_seed_same_result():
    time, event, risk = _random_data(120, seed=5)
    other = np.random.default_rng(0).normal(size=120)
    first = paired_bootstrap_test(
        time=time, event=event, risk_a=risk, risk_b=other, n_boot=200, rng=3
    )
    second = paired_bootstrap_test(
        time=time, event=event, risk_a=risk, risk_b=other, n_boot=200, rng=3
    )
    assert first == second
    assert 0.0 < first.p_value <= 1.0


def test_paired_marginal_samples_match_single_bootstrap():
    time, event, risk = _random_data(80, seed=6)
    other = np.random.default_rng(1).normal(size=80)
    single = bootstrap_ci(time=time, event=event, risk=risk, n_boot=100, rng=4)
    values, _ = _bootstrap_values(time, event, [risk, other], 100, np.random.default_rng(4))
    np.testing.assert_array_equal(values[:, 0], single.samples)


# ---------------------------------------------------------------------------------------------
# IPCW metrics against scikit-survival 0.28.0
#
# Tolerance: rel=1e-9. Both sides compute the same sums in a different order (ours vectorised,
# sksurv in a Python loop), so only float rounding separates them on data where the documented
# conventions coincide: continuous times (no training censoring at a test event time) and risks
# never within sksurv's tied_tol=1e-8 of each other unless exactly equal. sksurv's censoring
# Kaplan-Meier raises for test times beyond the last training time, so the training data are
# followed longer than the test data.


def _ipcw_data(n_test: int, seed: int, *, tied_risk: bool = False):
    gen = np.random.default_rng(seed)

    def draw(n):
        lp = gen.normal(size=n)
        t = gen.exponential(100 / np.exp(lp))
        c = gen.uniform(0, 300, size=n)
        risk = lp + 0.7 * gen.normal(size=n)
        if tied_risk:
            risk = np.round(risk)
        return np.minimum(t, c), (t <= c).astype(int), risk

    train_time, train_event, _ = draw(3 * n_test)
    train_time[np.argmax(train_time)] = 1000.0
    time_, event, risk = draw(n_test)
    return time_, event, risk, train_time, train_event


def _surv(event, time_):
    return Surv.from_arrays(event=np.asarray(event).astype(bool), time=np.asarray(time_, float))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("tau", [None, 120.0])
@pytest.mark.parametrize("tied_risk", [False, True])
def test_uno_c_matches_sksurv(seed, tau, tied_risk):
    time_, event, risk, train_time, train_event = _ipcw_data(150, seed, tied_risk=tied_risk)
    ours = uno_c(time_, event, risk, train_time=train_time, train_event=train_event, tau=tau)
    theirs = concordance_index_ipcw(
        _surv(train_event, train_time), _surv(event, time_), risk, tau=tau
    )[0]
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("horizon", [30.0, 90.0])
@pytest.mark.parametrize("tied_risk", [False, True])
def test_time_dependent_auc_matches_sksurv(seed, horizon, tied_risk):
    time_, event, risk, train_time, train_event = _ipcw_data(150, seed, tied_risk=tied_risk)
    ours = time_dependent_auc(
        time_, event, risk, train_time=train_time, train_event=train_event, horizon=horizon
    )
    theirs = cumulative_dynamic_auc(
        _surv(train_event, train_time), _surv(event, time_), risk, [horizon]
    )[0][0]
    assert ours == pytest.approx(theirs, rel=1e-9)


@pytest.mark.parametrize("seed", range(3))
def test_brier_scores_match_sksurv(seed):
    time_, event, risk, train_time, train_event = _ipcw_data(150, seed)
    times = np.linspace(10.0, 150.0, 8)
    survival = np.exp(-times[None, :] / 100 * np.exp(risk)[:, None])
    train, test = _surv(train_event, train_time), _surv(event, time_)
    for k in (0, 4):
        ours = brier_score(
            time_, event, survival[:, k], train_time=train_time, train_event=train_event,
            horizon=times[k],
        )
        assert ours == pytest.approx(sksurv_brier_score(train, test, survival[:, k], times[k])[1][0], rel=1e-9)
    ours_ibs = integrated_brier_score(
        time_, event, survival, train_time=train_time, train_event=train_event, times=times
    )
    assert ours_ibs == pytest.approx(
        sksurv_integrated_brier_score(train, test, survival, times), rel=1e-9
    )


def test_administrative_censoring_at_the_horizon_keeps_controls():
    """Censored at the horizon means event-free through it: those subjects are controls, and
    the weights use G(horizon-) > 0. sksurv (time > t, G(t)) finds no control there."""
    time_ = np.array([10.0, 20.0, 30.0, 365.0, 365.0, 365.0])
    event = np.array([1, 1, 0, 0, 0, 0])
    risk = np.array([3.0, 2.0, 0.0, 1.0, 0.5, -1.0])
    kwargs = {"train_time": time_, "train_event": event, "horizon": 365.0}
    assert time_dependent_auc(time_, event, risk, **kwargs) == 1.0
    survival = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 1.0])
    assert brier_score(time_, event, survival, **kwargs) == 0.0


def test_uno_c_equals_harrell_c_without_censoring():
    gen = np.random.default_rng(3)
    time_ = gen.exponential(size=80)
    risk = -time_ + gen.normal(size=80)
    ones = np.ones(80)
    assert uno_c(time_, ones, risk, train_time=time_, train_event=ones, tau=None) == pytest.approx(
        harrell_c(time_, ones, risk), rel=1e-12
    )


_IPCW_GOOD = {
    "time": [1.0, 2.0, 3.0, 4.0],
    "event": [1, 0, 1, 0],
    "risk": [0.9, 0.5, 0.4, 0.1],
    "train_time": [1.0, 2.0, 3.0, 5.0],
    "train_event": [1, 0, 1, 0],
}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"event": [0, 0, 0, 0]}, "No comparable pairs", id="all-censored"),
        pytest.param({"time": [1.0], "event": [1], "risk": [0.1]}, "at least 2 samples", id="one"),
        pytest.param({"risk": [0.1, np.nan, 0.2, 0.3]}, "'risk' must be finite", id="nan"),
        pytest.param({"risk": [0.1, np.inf, 0.2, 0.3]}, "'risk' must be finite", id="inf"),
        pytest.param(
            {"risk": [0.1, 0.2]}, "'risk' has 2 samples but 'time' has 4", id="mismatch"
        ),
        pytest.param({"time": [1.0, -2.0, 3.0, 4.0]}, "'time' must be non-negative", id="neg"),
        pytest.param(
            {"train_time": [1.0, -1.0, 3.0, 5.0]}, "'train_time' must be non-negative", id="neg-tr"
        ),
        pytest.param(
            {"train_event": [1, 0]},
            "'train_event' has 2 samples but 'train_time' has 4",
            id="mismatch-train",
        ),
        pytest.param(
            {"train_time": [0.5, 0.6, 0.7, 0.8], "train_event": [0, 0, 0, 0]},
            "censoring distribution of 'train_time'/'train_event' is zero",
            id="censoring-zero",
        ),
    ],
)
@pytest.mark.parametrize("metric", ["uno_c", "time_dependent_auc"])
def test_ipcw_metrics_reject_bad_input(changes, message, metric):
    kwargs = {**_IPCW_GOOD, **changes}
    if metric == "uno_c":
        with pytest.raises(ValueError, match=message):
            uno_c(**kwargs, tau=None)
    else:
        if "No comparable" in message:
            message = "needs cases and controls, got 0 case"
        with pytest.raises(ValueError, match=message):
            time_dependent_auc(**kwargs, horizon=2.5)


def test_no_comparable_pairs_is_a_value_error_subclass_for_ipcw():
    with pytest.raises(NoComparablePairsError, match="No comparable pairs before tau=0.5"):
        uno_c(**_IPCW_GOOD, tau=0.5)
    with pytest.raises(NoComparablePairsError, match="0 control"):
        time_dependent_auc(**_IPCW_GOOD, horizon=10.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"horizon": -1.0}, "'horizon' must be positive"),
        ({"horizon": float("nan")}, "'horizon' must be a finite number"),
        ({"survival": [0.5, 1.2, 0.3, 0.2]}, "'survival' .* must lie in \\[0, 1\\], got 1.2"),
        ({"survival": [0.5, np.nan, 0.3, 0.2]}, "'survival' must be finite"),
    ],
)
def test_brier_score_rejects_bad_input(kwargs, message):
    base = {k: v for k, v in _IPCW_GOOD.items() if k != "risk"}
    with pytest.raises(ValueError, match=message):
        brier_score(**{**base, "survival": [0.5, 0.6, 0.3, 0.2], "horizon": 2.5, **kwargs})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"times": [2.0]}, "at least 2 time points"),
        ({"times": [3.0, 2.0]}, "strictly increasing"),
        ({"survival": np.full((4, 3), 0.5)}, "must have shape \\(n_samples, 2\\)"),
    ],
)
def test_integrated_brier_score_rejects_bad_input(kwargs, message):
    base = {k: v for k, v in _IPCW_GOOD.items() if k != "risk"}
    with pytest.raises(ValueError, match=message):
        integrated_brier_score(**{**base, "survival": np.full((4, 2), 0.5), "times": [1.5, 2.5], **kwargs})


# ---------------------------------------------------------------------------------------------
# generic bootstrap: weights travel with the patients


def test_bootstrap_metric_recomputes_weights_on_each_resample():
    time_, event, risk, train_time, train_event = _ipcw_data(60, 0)
    metric = partial(uno_c, tau=150.0)
    data = {"time": time_, "event": event, "risk": risk}
    train = {"train_time": train_time, "train_event": train_event}
    result = bootstrap_metric(metric, data, train=train, n_boot=20, rng=5)
    # Replay the draws: the test rows, then the training rows, for each resample.
    gen = np.random.default_rng(5)
    expected = []
    while len(expected) < 20:
        index = gen.integers(0, 60, size=60)
        train_index = gen.integers(0, 180, size=180)
        try:
            expected.append(metric(time_[index], event[index], risk[index],
                                   train_time=train_time[train_index],
                                   train_event=train_event[train_index]))
        except NoComparablePairsError:
            continue
    np.testing.assert_array_equal(result.samples, expected)
    assert result.estimate == metric(**data, **train)
    assert result.lower <= result.upper


def test_bootstrap_metric_of_harrell_c_matches_bootstrap_ci_distribution():
    time_, event, risk = _random_data(150, 1, tied=False)
    generic = bootstrap_metric(harrell_c, {"time": time_, "event": event, "risk": risk},
                               n_boot=300, rng=0)
    fast = bootstrap_ci(time=time_, event=event, risk=risk, n_boot=300, rng=1)
    assert generic.estimate == fast.estimate
    assert abs(generic.samples.std() - fast.samples.std()) < 0.3 * fast.samples.std()


def test_paired_bootstrap_metric_identical_models():
    time_, event, risk, train_time, train_event = _ipcw_data(80, 2)
    result = paired_bootstrap_metric(
        partial(time_dependent_auc, horizon=60.0),
        {"time": time_, "event": event},
        a={"risk": risk}, b={"risk": risk.copy()},
        train={"train_time": train_time, "train_event": train_event},
        n_boot=30, rng=0,
    )
    assert result.difference == 0 and result.p_value == 1.0 and result.lower == result.upper == 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_metric(harrell_c, {}, n_boot=5), "'data' must be a non-empty mapping"),
        (lambda: bootstrap_metric(harrell_c, {"time": [1, 2], "event": [1]}, n_boot=5),
         "Dimension mismatch in 'data': 'event' has 1 samples but 'time' has 2"),
        (lambda: bootstrap_metric(harrell_c, {"time": [1]}, n_boot=5), "at least 2 samples"),
        (lambda: paired_bootstrap_metric(harrell_c, {"time": [1, 2, 3], "event": [1, 1, 1]},
                                         a={"risk": [1, 2, 3]}, b={"risk": [1, 2]}, n_boot=5),
         "'b' has 2 samples but 'data' has 3"),
    ],
)
def test_bootstrap_metric_rejects_bad_input(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_bootstrap_metric_counts_redraws_and_gives_up():
    data = {"time": [1.0, 2.0], "event": [1, 0], "risk": [2.0, 1.0]}
    # Of the four equally likely resamples of two subjects, two have no comparable pair.
    result = bootstrap_metric(harrell_c, data, n_boot=200, rng=0)
    assert 100 < result.n_redrawn < 320 and (result.samples == 1.0).all()
    calls = []

    def only_the_full_data(**kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise NoComparablePairsError("none")
        return 0.5

    with pytest.raises(NoComparablePairsError, match="resamples had no comparable pair"):
        bootstrap_metric(only_the_full_data, data, n_boot=2, rng=0)


# ---------------------------------------------------------------------------------------------
# grouped bootstrap: repeat studies of a patient are resampled together


def _replay_bootstrap(time, event, risks, n_boot, seed, groups=None):
    """Reference for the documented draw, written out: blocks of ``min(256, 2**22 // G)``
    resamples drawn as ``rng.integers(0, G, size=(rows, G))`` over the sorted distinct ids, each
    drawn group bringing all its rows, each resample scored from scratch with harrell_c.
    Assumes no resample needs a redraw."""
    n = len(time)
    ids = np.arange(n) if groups is None else np.asarray(groups)
    _, codes = np.unique(ids, return_inverse=True)
    n_units = codes.max() + 1
    block = max(1, min(256, 2**22 // n_units))
    gen = np.random.default_rng(seed)
    out = []
    for first in range(0, n_boot, block):
        for draw in gen.integers(0, n_units, size=(min(block, n_boot - first), n_units)):
            index = np.concatenate([np.flatnonzero(codes == k) for k in draw])
            out.append([harrell_c(time[index], event[index], risk[index]) for risk in risks])
    return np.array(out)


def _patients_twice(columns, seed):
    """Every row of ``columns`` (one row per patient) twice, rows shuffled; with person ids
    whose sorted order is the original row order."""
    n = len(next(iter(columns.values())))
    rows = np.random.default_rng(seed).permutation(np.tile(np.arange(n), 2))
    person_id = np.array([f"patient-{i:04d}" for i in range(n)])
    return {key: np.asarray(value)[rows] for key, value in columns.items()}, person_id[rows]


def _clustered_ids(n, seed):
    """Person ids for n rows, 1 + Poisson(0.5) rows per person, in shuffled row order."""
    gen = np.random.default_rng(seed)
    ids = np.repeat(np.arange(n), 1 + gen.poisson(0.5, size=n))[:n]
    return gen.permutation(ids)


def test_ungrouped_bootstrap_keeps_its_draws():
    """groups=None (given or omitted) is the bootstrap of earlier versions: the replayed draws."""
    time, event, risk = _random_data(300, seed=12, tied=False)
    other = np.random.default_rng(3).normal(size=300)
    expected = _replay_bootstrap(time, event, [risk, other], 300, seed=9)
    for kwargs in ({}, {"groups": None}):
        result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=300, rng=9, **kwargs)
        np.testing.assert_array_equal(result.samples, expected[:, 0])
        assert result.n_redrawn == 0
        paired = paired_bootstrap_test(
            time=time, event=event, risk_a=risk, risk_b=other, n_boot=300, rng=9, **kwargs
        )
        differences = expected[:, 0] - expected[:, 1]
        lower, upper = np.quantile(differences, [0.025, 0.975])
        assert (paired.lower, paired.upper) == (lower, upper)
    data = {"time": time, "event": event, "risk": risk}
    # the generic bootstrap draws one resample at a time, rng.integers(0, n, size=n)
    generic = bootstrap_metric(harrell_c, data, n_boot=40, rng=2, groups=None)
    gen = np.random.default_rng(2)
    draws = [gen.integers(0, 300, size=300) for _ in range(40)]
    replay = [harrell_c(time[i], event[i], risk[i]) for i in draws]
    np.testing.assert_array_equal(generic.samples, replay)


def test_grouped_bootstrap_follows_the_documented_draw():
    time, event, risk = _random_data(400, seed=13, tied=False)
    other = np.random.default_rng(4).normal(size=400)
    person = _clustered_ids(400, seed=1)
    assert 200 < np.unique(person).size < 350
    expected = _replay_bootstrap(time, event, [risk, other], 300, seed=5, groups=person)
    result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=300, rng=5, groups=person)
    np.testing.assert_array_equal(result.samples, expected[:, 0])
    assert result.estimate == harrell_c(time=time, event=event, risk=risk)
    paired = paired_bootstrap_test(
        time=time, event=event, risk_a=risk, risk_b=other, n_boot=300, rng=5, groups=person
    )
    lower, upper = np.quantile(expected[:, 0] - expected[:, 1], [0.025, 0.975])
    assert (paired.lower, paired.upper) == (lower, upper)


@pytest.mark.parametrize("n", [5, 60, 300])
def test_grouped_matrix_path_equals_explicit_resampling(n):
    time, event, risk = _random_data(n, seed=n + 1)
    other = np.random.default_rng(98).normal(size=n)
    _, codes = np.unique(_clustered_ids(n, seed=n), return_inverse=True)
    matrix, redrawn_m = _bootstrap_values(
        time, event, [risk, other], 200, np.random.default_rng(3), "matrix", groups=codes
    )
    explicit, redrawn_e = _bootstrap_values(
        time, event, [risk, other], 200, np.random.default_rng(3), "resample", groups=codes
    )
    np.testing.assert_array_equal(matrix, explicit)
    assert redrawn_m == redrawn_e


def test_grouped_bootstrap_large_n_uses_resampling_path():
    time, event, risk = _random_data(4500, seed=2)
    person = _clustered_ids(4500, seed=2)
    result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=3, rng=0, groups=person)
    _, codes = np.unique(person, return_inverse=True)
    explicit, _ = _bootstrap_values(
        time, event, [risk], 3, np.random.default_rng(0), "resample", groups=codes
    )
    np.testing.assert_array_equal(result.samples, explicit[:, 0])
    expected = _replay_bootstrap(time, event, [risk], 3, seed=0, groups=person)
    np.testing.assert_array_equal(result.samples, expected[:, 0])


def test_every_row_its_own_group():
    time, event, risk = _random_data(250, seed=14, tied=False)
    plain = bootstrap_ci(time=time, event=event, risk=risk, n_boot=1000, rng=3)
    # ids sorting in row order: the very same draws
    same = bootstrap_ci(
        time=time, event=event, risk=risk, n_boot=1000, rng=3, groups=np.arange(250)
    )
    np.testing.assert_array_equal(same.samples, plain.samples)
    # string ids in another order (a pandas Series): other draws, same distribution
    ids = pd.Series([f"s{i}" for i in np.random.default_rng(0).permutation(250)])
    other = bootstrap_ci(time=time, event=event, risk=risk, n_boot=1000, rng=3, groups=ids)
    assert isinstance(other, BootstrapResult)
    assert not np.array_equal(other.samples, plain.samples)
    assert other.estimate == plain.estimate and other.n_boot == 1000 and other.n_redrawn == 0
    assert other.samples.shape == (1000,) and np.isfinite(other.samples).all()
    assert other.lower < other.estimate < other.upper
    assert abs(other.samples.mean() - plain.samples.mean()) < 0.2 * plain.samples.std()
    assert abs(other.samples.std() - plain.samples.std()) < 0.1 * plain.samples.std()


def test_patient_bootstrap_of_duplicated_data_is_that_of_the_deduplicated_data():
    """Every patient has two identical studies. Resampling patients gives, draw for draw, the
    bootstrap of one study per patient; resampling studies shrinks the interval by ~1/sqrt(2)."""
    time, event, risk = _random_data(200, seed=15)
    other = np.random.default_rng(5).normal(size=200)
    twice, person = _patients_twice({"time": time, "event": event, "a": risk, "b": other}, 0)
    once = bootstrap_ci(time=time, event=event, risk=risk, n_boot=1000, rng=8)
    patients = bootstrap_ci(
        time=twice["time"], event=twice["event"], risk=twice["a"], n_boot=1000, rng=8,
        groups=person,
    )
    np.testing.assert_array_equal(patients.samples, once.samples)
    assert (patients.estimate, patients.lower, patients.upper) == (
        once.estimate, once.lower, once.upper
    )
    studies = bootstrap_ci(
        time=twice["time"], event=twice["event"], risk=twice["a"], n_boot=1000, rng=8
    )
    assert studies.estimate == once.estimate
    assert studies.upper - studies.lower < 0.85 * (once.upper - once.lower)
    assert studies.samples.std() < 0.8 * once.samples.std()

    paired_once = paired_bootstrap_test(
        time=time, event=event, risk_a=risk, risk_b=other, n_boot=500, rng=4
    )
    paired_patients = paired_bootstrap_test(
        time=twice["time"], event=twice["event"], risk_a=twice["a"], risk_b=twice["b"],
        n_boot=500, rng=4, groups=person,
    )
    assert paired_patients == paired_once


def test_grouped_bootstrap_redraws_like_the_deduplicated_data():
    # Only patient 0 has an event; a resample is scorable only with patient 0 and another.
    once = bootstrap_ci(
        time=[1.0, 2.0, 3.0], event=[1, 0, 0], risk=[0.9, 0.5, 0.1], n_boot=300, rng=0
    )
    twice, person = _patients_twice(
        {"time": [1.0, 2.0, 3.0], "event": [1, 0, 0], "risk": [0.9, 0.5, 0.1]}, 1
    )
    grouped = bootstrap_ci(**twice, n_boot=300, rng=0, groups=person)
    assert 50 < grouped.n_redrawn < 250
    assert grouped.n_redrawn == once.n_redrawn
    np.testing.assert_array_equal(grouped.samples, 1.0)
    # Redraws among varying values: the grouped draws fill the same slots block by block.
    few = {"time": np.arange(1.0, 9.0), "event": [1, 0, 1, 0, 0, 0, 0, 0],
           "risk": [0.5, 0.9, 0.1, 0.3, 0.2, 0.0, 0.4, 0.6]}
    once = bootstrap_ci(**few, n_boot=600, rng=3)
    twice, person = _patients_twice(few, 4)
    grouped = bootstrap_ci(**twice, n_boot=600, rng=3, groups=person)
    assert grouped.n_redrawn == once.n_redrawn > 20
    assert np.unique(once.samples).size > 10
    np.testing.assert_array_equal(grouped.samples, once.samples)
    # One patient with every study: each resample is the full data.
    single = bootstrap_ci(time=[1.0, 2.0, 3.0], event=[1, 0, 1], risk=[1.0, 0.0, 0.5],
                          n_boot=20, rng=0, groups=[7, 7, 7])
    np.testing.assert_array_equal(single.samples, single.estimate)


@pytest.mark.parametrize("metric", ["harrell_c", "uno_c"])
def test_bootstrap_metric_patient_bootstrap_of_duplicated_data(metric):
    time_, event, risk, train_time, train_event = _ipcw_data(70, 3)
    other = np.random.default_rng(6).normal(size=70)
    data = {"time": time_, "event": event, "risk": risk}
    twice, person = _patients_twice({**data, "other": other}, 2)
    twice_other = twice.pop("other")
    if metric == "harrell_c":
        fn, train, train_twice, train_person = harrell_c, None, None, None
    else:
        fn = partial(uno_c, tau=150.0)
        train = {"train_time": train_time, "train_event": train_event}
        train_twice, train_person = _patients_twice(train, 3)
    once = bootstrap_metric(fn, data, train=train, n_boot=60, rng=7)
    grouped = bootstrap_metric(fn, twice, train=train_twice, n_boot=60, rng=7,
                               groups=person, train_groups=train_person)
    assert grouped.n_redrawn == once.n_redrawn
    if metric == "harrell_c":
        np.testing.assert_array_equal(grouped.samples, once.samples)
        assert grouped.estimate == once.estimate
    else:  # the IPCW sums run over the copies in another order
        np.testing.assert_allclose(grouped.samples, once.samples, rtol=1e-12, atol=0)
        assert grouped.estimate == pytest.approx(once.estimate, rel=1e-12)
    assert not np.allclose(grouped.samples, grouped.samples[0])

    paired_once = paired_bootstrap_metric(fn, {"time": time_, "event": event}, a={"risk": risk},
                                          b={"risk": other}, train=train, n_boot=40, rng=1)
    paired_grouped = paired_bootstrap_metric(
        fn, {k: v for k, v in twice.items() if k != "risk"}, a={"risk": twice["risk"]},
        b={"risk": twice_other}, train=train_twice, n_boot=40, rng=1, groups=person,
        train_groups=train_person,
    )
    assert paired_grouped.p_value == paired_once.p_value
    assert paired_grouped.difference == pytest.approx(paired_once.difference, rel=1e-12, abs=1e-15)
    assert paired_grouped.lower == pytest.approx(paired_once.lower, rel=1e-12, abs=1e-15)


def test_groups_of_mixed_types_are_numbered_by_first_appearance():
    time, event, risk = _random_data(40, seed=16, tied=False)
    ids = np.array([1, "a", 2.5, ("x", 1)] * 10, dtype=object)
    result = bootstrap_ci(time=time, event=event, risk=risk, n_boot=50, rng=0, groups=ids)
    assert result.samples.shape == (50,) and 0 <= result.lower <= result.upper <= 1


_DATA3 = {"time": [1.0, 2.0, 3.0], "event": [1, 0, 1], "risk": [0.3, 0.2, 0.1]}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda g: bootstrap_ci(**_DATA3, n_boot=5, rng=0, groups=g),
         "Dimension mismatch: 'groups' has 2 samples but 'time' has 3"),
        (lambda g: paired_bootstrap_test(_DATA3["time"], _DATA3["event"], _DATA3["risk"],
                                         _DATA3["risk"], n_boot=5, rng=0, groups=g),
         "Dimension mismatch: 'groups' has 2 samples but 'time' has 3"),
        (lambda g: bootstrap_metric(harrell_c, _DATA3, n_boot=5, rng=0, groups=g),
         "Dimension mismatch: 'groups' has 2 samples but 'data' has 3"),
        (lambda g: paired_bootstrap_metric(harrell_c, {"time": [1, 2, 3], "event": [1, 1, 1]},
                                           a={"risk": [1, 2, 3]}, b={"risk": [3, 2, 1]},
                                           n_boot=5, groups=g),
         "Dimension mismatch: 'groups' has 2 samples but 'data' has 3"),
        (lambda g: bootstrap_metric(partial(uno_c, tau=None), _DATA3, n_boot=5,
                                    train={"train_time": [1, 2, 3], "train_event": [1, 0, 1]},
                                    train_groups=g),
         "Dimension mismatch: 'train_groups' has 2 samples but 'train' has 3"),
    ],
)
def test_wrong_length_groups_are_rejected(call, message):
    with pytest.raises(ValueError, match=message):
        call(["p1", "p2"])


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (["p1", None, "p2"],
         r"'groups' must not hold missing values, got 1 \(first at index 1: None\)"),
        ([1.0, np.nan, np.nan], r"'groups' must not hold missing values, got 2 \(first at index 1"),
        (pd.Series(["a", pd.NA, "b"], dtype=object), "'groups' must not hold missing values"),
        (np.array(["2020-01-01", "NaT", "2020-01-02"], dtype="datetime64[D]"),
         "must not hold missing"),
        ([[1, 2, 3]], r"'groups' must be 1-D \(one id per row\), got shape \(1, 3\)"),
    ],
)
def test_groups_with_missing_ids_are_rejected(groups, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_ci(**_DATA3, n_boot=5, rng=0, groups=groups)
    with pytest.raises(ValueError, match=message):
        bootstrap_metric(harrell_c, _DATA3, n_boot=5, rng=0, groups=groups)


def test_train_groups_need_train():
    with pytest.raises(ValueError, match="'train_groups' was given without 'train'"):
        bootstrap_metric(harrell_c, _DATA3, n_boot=5, train_groups=[1, 2, 3])


# ---------------------------------------------------------------------------------------------
# calibration and Holm


def test_calibration_of_a_perfectly_calibrated_model():
    gen = np.random.default_rng(11)
    n, base = 4000, 0.002
    lp = gen.normal(scale=0.8, size=n)
    t = gen.exponential(1 / (base * np.exp(lp)))
    c = gen.uniform(100, 800, size=n)
    time_, event = np.minimum(t, c), (t <= c).astype(int)
    survival = np.exp(-base * 365 * np.exp(lp))
    result = calibration(time=time_, event=event, survival=survival, horizon=365.0)
    assert abs(result.slope - 1) < 3 * result.slope_se and result.slope_se < 0.06
    np.testing.assert_allclose(result.observed, result.predicted, atol=0.06)
    assert result.n.sum() == n and np.all(np.diff(result.predicted) > 0)
    # twice the spread of the linear predictor: the slope halves
    too_extreme = np.exp(-base * 365 * np.exp(2 * lp))
    assert calibration(time=time_, event=event, survival=too_extreme, horizon=365.0).slope == (
        pytest.approx(0.5, abs=0.05)
    )


def test_calibration_slope_matches_lifelines_cox():
    from lifelines import CoxPHFitter

    gen = np.random.default_rng(4)
    x = gen.normal(size=300)
    t = gen.exponential(1 / np.exp(0.7 * x))
    c = gen.uniform(0, 2, size=300)
    time_, event = np.minimum(t, c), (t <= c)
    survival = np.exp(-np.exp(x))  # log(-log S) = x
    result = calibration(time=time_, event=event, survival=survival, horizon=10.0)
    frame = pd.DataFrame({"time": time_, "event": event.astype(int), "x": x})
    # Continuous times, so lifelines' Efron ties equal our Breslow ties; its default Newton
    # stopping rule (precision 1e-7) is tightened so that the two optima agree closely.
    cph = CoxPHFitter().fit(frame, "time", "event", fit_options={"precision": 1e-12})
    assert result.slope == pytest.approx(cph.params_["x"], rel=1e-8)
    assert result.slope_se == pytest.approx(cph.standard_errors_["x"], rel=1e-4)


def test_calibration_rejects_bad_input():
    with pytest.raises(NoComparablePairsError, match="no event happens by the horizon"):
        calibration(time=[5.0, 6.0], event=[1, 1], survival=[0.5, 0.6], horizon=1.0, n_groups=2)
    with pytest.raises(ValueError, match="'n_groups' must be between 2"):
        calibration(time=[1.0, 2.0], event=[1, 0], survival=[0.5, 0.6], horizon=3.0, n_groups=5)
    with pytest.raises(ValueError, match="'survival' has 1 samples but 'time' has 2"):
        calibration(time=[1.0, 2.0], event=[1, 0], survival=[0.5], horizon=3.0, n_groups=2)


def test_holm_hand_example():
    # m = 4; sorted 0.005, 0.01, 0.03, 0.04 -> 4*0.005, 3*0.01, 2*0.03, max(1*0.04, 0.06)
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(holm([0.5, np.nan, 0.01]), [0.5, np.nan, 0.02])
    np.testing.assert_allclose(holm([0.6, 0.9]), [1.0, 1.0])
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match="'pvalues' must lie in \\[0, 1\\]"):
        holm([0.2, 1.5])


def test_calibration_slope_is_nan_for_constant_predictions_and_stable_for_extreme_ones():
    gen = np.random.default_rng(2)
    time_ = gen.exponential(size=200)
    event = np.ones(200)
    flat = calibration(time=time_, event=event, survival=np.zeros(200), horizon=1.0)
    assert np.isnan(flat.slope) and np.isnan(flat.slope_se)
    # probabilities at 0 and 1 are clipped to 1e-12; Newton needs its step halving here
    extreme = np.where(gen.random(200) < 0.5, 0.0, 1.0)
    result = calibration(time=time_, event=event, survival=extreme, horizon=1.0)
    assert np.isfinite(result.slope) and abs(result.slope) < 1
