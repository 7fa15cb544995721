"""Speed of helpers.metrics against lifelines' concordance_index.

Run from the repository root with one thread, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py

Prints wall-clock seconds (best of ``--repeats`` runs for the fast calls) at n = 1,000 and
10,000: ``harrell_c``, ``bootstrap_ci`` and ``paired_bootstrap_test`` with 1,000 resamples, and
lifelines' ``concordance_index(time, -risk, event)`` as a single call and (at n = 1,000 only) as a
1,000-resample bootstrap loop; the loop is timed on ``--lifelines-resamples`` resamples and
extrapolated linearly when that is fewer than 1,000. Data are synthetic (exponential times,
about 40% censored, times rounded so that ties occur).

With ``--simulate`` it instead checks the statistics by simulation (``--replicates`` data sets
of ``--n`` subjects from a Cox model, ``--n-boot`` resamples each): the coverage of the 95%
percentile intervals of ``bootstrap_ci`` (Harrell's C) and of ``bootstrap_metric`` with
``uno_c`` (weights recomputed on each resample), against the large-sample value of each index
(one data set of 200,000 subjects), and the type-I error of ``paired_bootstrap_test`` at 5%
for two different risk scores with the same true C.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from lifelines.utils import concordance_index

from helpers.metrics import (
    bootstrap_ci,
    bootstrap_metric,
    harrell_c,
    paired_bootstrap_test,
    uno_c,
)

_N_BOOT = 1000


def _data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    time_ = np.round(rng.exponential(100.0, size=n), 0) + 1.0
    event = (rng.random(n) < 0.6).astype(int)
    risk_a = -np.log(time_) + rng.normal(size=n)
    risk_b = rng.normal(size=n)
    return time_, event, risk_a, risk_b


def _best_of(function: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def _lifelines_bootstrap(time_, event, risk, n_resamples: int, rng: np.random.Generator) -> None:
    n = time_.shape[0]
    for _ in range(n_resamples):
        index = rng.integers(0, n, size=n)
        try:
            concordance_index(time_[index], -risk[index], event[index])
        except ZeroDivisionError:
            continue


def _cox_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Cox model with a standard-normal linear predictor, censoring uniform on (0, 3); returns
    time, event and two risk scores with equal true concordance (independent noise)."""
    lp = rng.normal(size=n)
    event_time = rng.exponential(1 / np.exp(lp))
    censor = rng.uniform(0, 3, size=n)
    risk_a = lp + rng.normal(size=n)
    risk_b = lp + rng.normal(size=n)
    return np.minimum(event_time, censor), (event_time <= censor).astype(int), risk_a, risk_b


def simulate(replicates: int, n: int, n_boot: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    tau = 2.0
    big_time, big_event, big_a, _ = _cox_data(200_000, rng)
    train_time, train_event, _, _ = _cox_data(2_000, np.random.default_rng(seed + 1))
    true_harrell = harrell_c(time=big_time, event=big_event, risk=big_a)
    true_uno = uno_c(big_time, big_event, big_a, train_time=big_time, train_event=big_event, tau=tau)
    covered_harrell = covered_uno = rejected = 0
    start = time.perf_counter()
    for _ in range(replicates):
        time_, event, risk_a, risk_b = _cox_data(n, rng)
        ci = bootstrap_ci(time=time_, event=event, risk=risk_a, n_boot=n_boot, rng=rng)
        covered_harrell += ci.lower <= true_harrell <= ci.upper
        uno = bootstrap_metric(
            partial(uno_c, tau=tau),
            {"time": time_, "event": event, "risk": risk_a},
            train={"train_time": train_time, "train_event": train_event},
            n_boot=n_boot,
            rng=rng,
        )
        covered_uno += uno.lower <= true_uno <= uno.upper
        test = paired_bootstrap_test(
            time=time_, event=event, risk_a=risk_a, risk_b=risk_b, n_boot=n_boot, rng=rng
        )
        rejected += test.p_value < 0.05
    seconds = time.perf_counter() - start
    half_width = 1.96 * np.sqrt(0.05 * 0.95 / replicates)
    print(f"{replicates} replicates of n = {n}, {n_boot} resamples each ({seconds:.0f} s)")
    print(f"large-sample Harrell's C = {true_harrell:.4f}, Uno's C (tau = {tau:g}) = {true_uno:.4f}")
    print(f"coverage of 95% CI, Harrell's C (bootstrap_ci):       {covered_harrell / replicates:.3f}")
    print(f"coverage of 95% CI, Uno's C (bootstrap_metric):       {covered_uno / replicates:.3f}")
    print(f"type-I error at 5%, paired_bootstrap_test:            {rejected / replicates:.3f}")
    print(f"(Monte Carlo half-width of a 95% interval around 0.95 or 0.05: {half_width:.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast call (best kept)")
    parser.add_argument(
        "--lifelines-resamples",
        type=int,
        default=200,
        help="resamples actually timed for the lifelines bootstrap loop (extrapolated to 1000)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", action="store_true", help="coverage and type-I error instead of speed")
    parser.add_argument("--replicates", type=int, default=400, help="simulated data sets (--simulate)")
    parser.add_argument("--n", type=int, default=200, help="subjects per data set (--simulate)")
    parser.add_argument("--n-boot", type=int, default=500, help="resamples per data set (--simulate)")
    args = parser.parse_args()
    if args.simulate:
        simulate(args.replicates, args.n, args.n_boot, args.seed)
        return
    rng = np.random.default_rng(args.seed)

    print(f"{'n':>6}  {'what':<54} {'seconds':>9}  {'lifelines / ours':>16}")
    for n in (1_000, 10_000):
        time_, event, risk_a, risk_b = _data(n, rng)
        assert harrell_c(time=time_, event=event, risk=risk_a) == concordance_index(
            time_, -risk_a, event
        )
        ours_c = _best_of(partial(harrell_c, time=time_, event=event, risk=risk_a), args.repeats)
        theirs_c = _best_of(partial(concordance_index, time_, -risk_a, event), args.repeats)
        slow_repeats = args.repeats if n <= 1_000 else 1
        ours_boot = _best_of(
            partial(bootstrap_ci, time=time_, event=event, risk=risk_a, n_boot=_N_BOOT, rng=1),
            slow_repeats,
        )
        ours_paired = _best_of(
            partial(
                paired_bootstrap_test,
                time=time_,
                event=event,
                risk_a=risk_a,
                risk_b=risk_b,
                n_boot=_N_BOOT,
                rng=1,
            ),
            slow_repeats,
        )
        print(f"{n:>6}  {'harrell_c':<54} {ours_c:>9.4f}  {theirs_c / ours_c:>16.1f}")
        print(f"{n:>6}  {'lifelines concordance_index':<54} {theirs_c:>9.4f}")
        if n <= 1_000:
            timed = min(args.lifelines_resamples, _N_BOOT)
            start = time.perf_counter()
            _lifelines_bootstrap(time_, event, risk_a, timed, np.random.default_rng(1))
            theirs_boot = (time.perf_counter() - start) * _N_BOOT / timed
            label = "lifelines bootstrap loop, 1000 resamples"
            if timed < _N_BOOT:
                label += f" (x{_N_BOOT // timed} of {timed})"
            print(
                f"{n:>6}  {'bootstrap_ci, 1000 resamples':<54} {ours_boot:>9.4f}"
                f"  {theirs_boot / ours_boot:>16.1f}"
            )
            print(f"{n:>6}  {label:<54} {theirs_boot:>9.4f}")
        else:
            print(f"{n:>6}  {'bootstrap_ci, 1000 resamples':<54} {ours_boot:>9.4f}")
        print(f"{n:>6}  {'paired_bootstrap_test, 1000 resamples':<54} {ours_paired:>9.4f}")


if __name__ == "__main__":
    main()
