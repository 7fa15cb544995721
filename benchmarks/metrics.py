"""Speed of helpers.metrics against lifelines, scikit-survival and torchsurv.

Run from the repository root with one thread, e.g.::

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/metrics.py [--sizes 1000,10000,100000]

Prints wall-clock seconds (best of ``--repeats`` runs for the fast calls) at n = 1,000, 10,000
and 100,000, and for each reference the ratio reference / ours:

* ``harrell_c`` against lifelines' ``concordance_index(time, -risk, event)`` and torchsurv's
  ``ConcordanceIndex`` (single calls);
* ``uno_c`` (truncated at the 80th percentile of time) against scikit-survival's
  ``concordance_index_ipcw``;
* ``bootstrap_ci`` with 1,000 resamples against a 1,000-resample lifelines loop and torchsurv's
  ``confidence_interval(method="bootstrap")``;
* ``paired_bootstrap_test`` with 1,000 resamples (no reference: torchsurv's ``compare`` does not
  pair the resamples).

Slow bootstraps (the references, and ours at n = 100,000) are timed on fewer resamples and
extrapolated linearly to 1,000 (each resample costs the same); such lines say "extrapolated from
k resamples". torchsurv builds n x n matrices: it runs in a child process
whose peak memory is reported, and it is not run where the peak measured at a smaller n, scaled
by n^2, would exceed ``--max-gb``; a reference whose time, scaled from a smaller n by its
complexity, would exceed ``--max-seconds`` is not run either. Each skip prints why. Data are
synthetic (exponential times, about 40% censored, times rounded so that ties occur). The
default run takes a few minutes on one core.

With ``--simulate`` it instead checks the statistics by simulation (``--replicates`` data sets
of ``--n`` subjects from a Cox model, ``--n-boot`` resamples each): the coverage of the 95%
percentile intervals of ``bootstrap_ci`` (Harrell's C) and of ``bootstrap_metric`` with
``uno_c`` (weights recomputed on each resample), against the large-sample value of each index
(one data set of 200,000 subjects), and the type-I error of ``paired_bootstrap_test`` at 5%
for two different risk scores with the same true C.
"""

from __future__ import annotations

import argparse
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial

import lifelines
import numpy as np
import sksurv
import torchsurv
from lifelines.utils import concordance_index
from sksurv.metrics import concordance_index_ipcw
from sksurv.util import Surv

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


def _torchsurv_job(time_, event, risk, n_bootstraps: int) -> tuple[float, float, float]:
    """Child process: torchsurv's C-index (and bootstrap CI when ``n_bootstraps``), returning
    (seconds for the C-index, seconds for the CI, peak resident memory in GB above what the
    process held before the first call)."""
    import resource

    import torch
    from torchsurv.metrics.cindex import ConcordanceIndex

    torch.set_num_threads(1)
    f32 = torch.float32  # torchsurv's bootstrap mixes dtypes with float64 input
    args = (torch.as_tensor(risk, dtype=f32), torch.as_tensor(event).bool(), torch.as_tensor(time_, dtype=f32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    metric = ConcordanceIndex()
    metric(*args)
    c_seconds = time.perf_counter() - start
    ci_seconds = float("nan")
    if n_bootstraps:
        torch.manual_seed(0)
        start = time.perf_counter()
        metric.confidence_interval(method="bootstrap", n_bootstraps=n_bootstraps)
        ci_seconds = time.perf_counter() - start
    return c_seconds, ci_seconds, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20


def _in_child(function, *args):
    """Run ``function(*args)`` in a fresh process (its own peak memory, freed afterwards)."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def _line(n: int, what: str, seconds: float | None, ratio: float | None = None, note: str = "") -> None:
    sec = f"{seconds:>9.4f}" if seconds is not None else f"{'-':>9}"
    rat = f"{ratio:>10.1f}" if ratio is not None else f"{'':>10}"
    print(f"{n:>7,}  {what:<46} {sec}  {rat}  {note}".rstrip(), flush=True)


def _resamples(n: int, budget: int) -> int:
    """Resamples to time: ``budget`` at n = 1,000, scaled as 1/n, between 2 and 1000."""
    return max(2, min(_N_BOOT, budget * 1_000 // n))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated numbers of subjects")
    parser.add_argument("--repeats", type=int, default=3, help="runs per fast call (best kept)")
    parser.add_argument(
        "--lifelines-resamples",
        type=int,
        default=200,
        help="resamples timed for the lifelines bootstrap loop at n = 1,000 (scaled down as 1/n "
        "above; extrapolated to 1000)",
    )
    parser.add_argument(
        "--torchsurv-resamples",
        type=int,
        default=20,
        help="resamples timed for torchsurv's bootstrap CI at n = 1,000 (scaled down as 1/n above)",
    )
    parser.add_argument(
        "--ours-resamples",
        type=int,
        default=10_000,
        help="resamples timed for our bootstraps, given at n = 1,000 and scaled as 1/n, at most 1000 "
        "(the default times all 1000 up to n = 10,000 and 100 at n = 100,000, then extrapolates)",
    )
    parser.add_argument("--max-gb", type=float, default=8.0, help="torchsurv is not run above this peak memory")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="a reference call is not run above this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate", action="store_true", help="coverage and type-I error instead of speed")
    parser.add_argument("--replicates", type=int, default=400, help="simulated data sets (--simulate)")
    parser.add_argument("--n", type=int, default=200, help="subjects per data set (--simulate)")
    parser.add_argument("--n-boot", type=int, default=500, help="resamples per data set (--simulate)")
    args = parser.parse_args()
    if args.simulate:
        simulate(args.replicates, args.n, args.n_boot, args.seed)
        return
    sizes = [int(v) for v in args.sizes.split(",")]
    rng = np.random.default_rng(args.seed)
    started = time.perf_counter()
    print(f"lifelines {lifelines.__version__}, scikit-survival {sksurv.__version__}, torchsurv {torchsurv.__version__}")
    print(f"{'n':>7}  {'what':<46} {'seconds':>9}  {'ref / ours':>10}  note")
    torch_peak: tuple[int, float] | None = None  # (n, GB) of the largest torchsurv run
    sksurv_time: tuple[int, float] | None = None
    for n in sizes:
        time_, event, risk_a, risk_b = _data(n, rng)
        repeats = args.repeats if n <= 10_000 else 1
        assert harrell_c(time=time_, event=event, risk=risk_a) == concordance_index(time_, -risk_a, event)
        ours_c = _best_of(partial(harrell_c, time=time_, event=event, risk=risk_a), repeats)
        _line(n, "harrell_c", ours_c)
        theirs = _best_of(partial(concordance_index, time_, -risk_a, event), repeats)
        _line(n, "lifelines concordance_index", theirs, theirs / ours_c)

        k_torch = _resamples(n, args.torchsurv_resamples)
        estimated_gb = None if torch_peak is None else torch_peak[1] * (n / torch_peak[0]) ** 2
        if estimated_gb is not None and estimated_gb > args.max_gb:
            _line(n, "torchsurv ConcordanceIndex", None, note=(
                f"not run: n x n matrices, peak {torch_peak[1]:.1f} GB at n = {torch_peak[0]:,} -> "
                f"~{estimated_gb:,.0f} GB here (> --max-gb {args.max_gb:g})"))
            theirs_ci = None
        else:
            c_sec, ci_sec, peak = _in_child(_torchsurv_job, time_, event, risk_a, k_torch)
            torch_peak = (n, peak)
            _line(n, "torchsurv ConcordanceIndex", c_sec, c_sec / ours_c, f"peak memory +{peak:.2f} GB")
            theirs_ci = ci_sec * _N_BOOT / k_torch

        tau = float(np.quantile(time_, 0.8))
        uno = partial(uno_c, time_, event, risk_a, train_time=time_, train_event=event, tau=tau)
        ours_uno = _best_of(uno, repeats)
        _line(n, "uno_c", ours_uno)
        survival = Surv.from_arrays(event=event.astype(bool), time=time_)
        estimated = None if sksurv_time is None else sksurv_time[1] * (n / sksurv_time[0]) ** 2
        if estimated is not None and estimated > args.max_seconds:
            _line(n, "scikit-survival concordance_index_ipcw", None, note=(
                f"not run: O(n^2), {sksurv_time[1]:.2f} s at n = {sksurv_time[0]:,} -> ~{estimated:,.0f} s here "
                f"(> --max-seconds {args.max_seconds:g})"))
        else:
            theirs = _best_of(partial(concordance_index_ipcw, survival, survival, risk_a, tau=tau), 1)
            sksurv_time = (n, theirs)
            _line(n, "scikit-survival concordance_index_ipcw", theirs, theirs / ours_uno)

        k_ours = _resamples(n, args.ours_resamples)
        ours_note = f"extrapolated from {k_ours} resamples" if k_ours < _N_BOOT else ""
        ours_boot = _best_of(
            partial(bootstrap_ci, time=time_, event=event, risk=risk_a, n_boot=k_ours, rng=1), 1 if n > 1_000 else repeats
        ) * _N_BOOT / k_ours
        _line(n, "bootstrap_ci, 1000 resamples", ours_boot, note=ours_note)
        k_life = _resamples(n, args.lifelines_resamples)
        start = time.perf_counter()
        _lifelines_bootstrap(time_, event, risk_a, k_life, np.random.default_rng(1))
        theirs = (time.perf_counter() - start) * _N_BOOT / k_life
        note = f"extrapolated from {k_life} resamples" if k_life < _N_BOOT else ""
        _line(n, "lifelines loop, 1000 resamples", theirs, theirs / ours_boot, note)
        if theirs_ci is not None:
            note = f"extrapolated from {k_torch} resamples" if k_torch < _N_BOOT else ""
            _line(n, "torchsurv bootstrap CI, 1000 resamples", theirs_ci, theirs_ci / ours_boot, note)
        else:
            _line(n, "torchsurv bootstrap CI, 1000 resamples", None, note="not run: see ConcordanceIndex above")

        ours_paired = _best_of(
            partial(paired_bootstrap_test, time=time_, event=event, risk_a=risk_a, risk_b=risk_b, n_boot=k_ours, rng=1),
            1 if n > 1_000 else repeats,
        ) * _N_BOOT / k_ours
        _line(n, "paired_bootstrap_test, 1000 resamples", ours_paired, note=ours_note)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
