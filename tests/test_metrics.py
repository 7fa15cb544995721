"""Tests for helpers.metrics against lifelines 0.30.3 and scikit-survival 0.28.0.

References are computed by calling the packages directly (versions pinned in pyproject.toml):
``lifelines.utils.concordance_index(time, -risk, event)`` (lifelines wants higher = longer
survival, hence the minus) and ``sksurv.metrics.concordance_index_censored(event, time, risk)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines.utils import concordance_index
from sksurv.metrics import concordance_index_censored

from helpers.metrics import (
    BootstrapResult,
    NoComparablePairsError,
    PairedTestResult,
    _bootstrap_values,
    bootstrap_ci,
    harrell_c,
    paired_bootstrap_test,
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
