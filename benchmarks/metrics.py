"""Speed of helpers.metrics against lifelines' concordance_index.

Run from the repository root with one thread, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py

Prints wall-clock seconds (best of ``--repeats`` runs for the fast calls) at n = 1,000 and
10,000: ``harrell_c``, ``bootstrap_ci`` and ``paired_bootstrap_test`` with 1,000 resamples, and
lifelines' ``concordance_index(time, -risk, event)`` as a single call and (at n = 1,000 only) as a
1,000-resample bootstrap loop; the loop is timed on ``--lifelines-resamples`` resamples and
extrapolated linearly when that is fewer than 1,000. Data are synthetic (exponential times,
about 40% censored, times rounded so that ties occur).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
from lifelines.utils import concordance_index

from helpers.metrics import bootstrap_ci, harrell_c, paired_bootstrap_test

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
    args = parser.parse_args()
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
