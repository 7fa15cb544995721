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
  pair the resamples);
* both again with ``groups``: the rows are studies of about n / 1.2 patients
  (1 + Poisson(0.2) studies each; 830 patients at n = 1,000), and patients are resampled.

Slow bootstraps (the references, and ours at n = 100,000) are timed on fewer resamples and
extrapolated linearly to 1,000 (each resample costs the same); such lines say "extrapolated from
k resamples". torchsurv builds n x n matrices: it runs in a child process
whose peak memory is reported, and it is not run where the peak measured at a smaller n, scaled
by n^2, would exceed ``--max-gb``; a reference whose time, scaled from a smaller n by its
complexity, would exceed ``--max-seconds`` is not run either. Each skip prints why. Data are
synthetic (exponential times, about 40% censored, times rounded so that ties occur). The
default run takes a few minutes on one core.

With ``--simulate`` it instead checks the statistics by simulation, in two scenarios of
``--replicates`` data sets (default 2000) of about ``--n`` studies (default 400) from a Cox model:
*independent* (one study per patient) and *clustered* (1 + min(Poisson(0.2), 3) studies per
patient, about 17% repeat studies, which share the patient's time, event and risk signal, with
small per-scan noise on the risk scores). It reports the coverage of the 95% percentile
intervals of ``bootstrap_ci`` (Harrell's C, ``--n-boot`` resamples) and of ``bootstrap_metric``
with ``uno_c`` (weights recomputed on each resample; ``--n-boot-uno`` resamples, fewer because
each recomputes Uno's C from scratch), against the population value of each index (one data set
of ``--population`` studies of the same process), and the type-I error of
``paired_bootstrap_test`` at 5% for two risk scores with the same population C; in the
clustered scenario with study-level resampling and with patient-level resampling (``groups``).
Each figure comes with its Monte-Carlo standard error. The defaults take about 20 minutes on
one core; ``--jobs k`` spreads the replicates over k processes (same results: each replicate
has its own seed).
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
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


def _person_ids(n: int, rng: np.random.Generator) -> np.ndarray:
    """Patient ids of ``n`` studies, 1 + Poisson(0.2) consecutive studies per patient (about
    ``n / 1.2`` patients); the times and outcomes of ``_data`` are not shared within a patient,
    which does not matter for timing."""
    return np.repeat(np.arange(n), 1 + rng.poisson(0.2, size=n))[:n]


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


# ---------------------------------------------------------------------------------------------
# --simulate: coverage and type-I error

_TAU = 2.0  # Uno's C truncation; censoring is uniform on (0, 3), so G(tau-) = 1/3
_REPEAT_RATE = 0.2  # extra studies per patient ~ Poisson(0.2), capped
_MAX_STUDIES = 4
_PATIENT_SHARE = 0.9  # of the risk-score noise variance (1): per patient; the rest per scan


@dataclass(frozen=True)
class _Sample:
    """One simulated data set, a row per study: outcome, two risk scores of equal population
    concordance (independent, equally noisy versions of the linear predictor), patient ids."""

    time: np.ndarray
    event: np.ndarray
    risk_a: np.ndarray
    risk_b: np.ndarray
    person: np.ndarray


def _patients(n_patients: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Cox model with a standard-normal linear predictor (baseline hazard 1) and censoring
    uniform on (0, 3): returns the linear predictor, time and event of each patient."""
    lp = rng.normal(size=n_patients)
    event_time = rng.exponential(1 / np.exp(lp))
    censor = rng.uniform(0, 3, size=n_patients)
    return lp, np.minimum(event_time, censor), (event_time <= censor).astype(int)


def _independent_sample(n: int, rng: np.random.Generator) -> _Sample:
    """``n`` patients with one study each; risk = linear predictor + N(0, 1) noise."""
    lp, time_, event = _patients(n, rng)
    return _Sample(time_, event, lp + rng.normal(size=n), lp + rng.normal(size=n), np.arange(n))


def _studies_per_patient(n_patients: int, rng: np.random.Generator) -> np.ndarray:
    return 1 + np.minimum(rng.poisson(_REPEAT_RATE, size=n_patients), _MAX_STUDIES - 1)


def _clustered_sample(n: int, rng: np.random.Generator) -> _Sample:
    """About ``n`` studies from ``n / 1.2`` patients with ``1 + min(Poisson(0.2), 3)`` studies
    each. Repeat studies share the patient's time, event and linear predictor; each risk score's
    N(0, 1) noise is a patient component (variance 0.9) plus a per-scan one (variance 0.1)."""
    n_patients = round(n / (1 + _REPEAT_RATE))
    lp, time_, event = _patients(n_patients, rng)
    person = np.repeat(np.arange(n_patients), _studies_per_patient(n_patients, rng))
    rows = person.size

    def score() -> np.ndarray:
        patient = np.sqrt(_PATIENT_SHARE) * rng.normal(size=n_patients)
        return lp[person] + patient[person] + np.sqrt(1 - _PATIENT_SHARE) * rng.normal(size=rows)

    return _Sample(time_[person], event[person], score(), score(), person)


_SCENARIOS = {"independent": _independent_sample, "clustered": _clustered_sample}
# (scenario, resampling unit): in the independent scenario a study is a patient
_ARMS = [("independent", "study"), ("clustered", "study"), ("clustered", "patient")]


def _uno_columns(sample: _Sample) -> dict[str, np.ndarray]:
    """Uno's C with the censoring distribution of the data set itself (resampled with it)."""
    return {
        "time": sample.time,
        "event": sample.event,
        "risk": sample.risk_a,
        "train_time": sample.time,
        "train_event": sample.event,
    }


def _population_values(n_studies: int, seed: np.random.SeedSequence) -> dict[str, dict[str, float]]:
    """Harrell's and Uno's C of ``risk_a`` and ``risk_b`` on one very large data set per scenario."""
    values = {}
    for (scenario, make), child in zip(_SCENARIOS.items(), seed.spawn(len(_SCENARIOS)), strict=True):
        sample = make(n_studies, np.random.default_rng(child))
        uno = partial(uno_c, tau=_TAU, train_time=sample.time, train_event=sample.event)
        values[scenario] = {
            "harrell": harrell_c(time=sample.time, event=sample.event, risk=sample.risk_a),
            "harrell_b": harrell_c(time=sample.time, event=sample.event, risk=sample.risk_b),
            "uno": uno(sample.time, sample.event, sample.risk_a),
            "uno_b": uno(sample.time, sample.event, sample.risk_b),
            "studies": sample.time.size,
            "patients": int(sample.person.max()) + 1,
        }
    return values


def _replicate(task: tuple) -> dict[str, tuple[float, ...]]:
    """One replicate of every scenario: per arm, (Harrell covered, Harrell estimate, Harrell
    bootstrap SD, Uno covered, Uno estimate, Uno bootstrap SD, paired test rejected at 5%,
    resamples redrawn); per scenario, (studies, patients, events)."""
    seed, n, n_boot, n_boot_uno, truth = task
    rng = np.random.default_rng(seed)
    out: dict[str, tuple[float, ...]] = {}
    for scenario, make in _SCENARIOS.items():
        sample = make(n, rng)
        out[scenario] = (sample.time.size, int(sample.person.max()) + 1, int(sample.event.sum()))
        for arm_scenario, unit in _ARMS:
            if arm_scenario != scenario:
                continue
            groups = sample.person if unit == "patient" else None
            ci = bootstrap_ci(
                time=sample.time, event=sample.event, risk=sample.risk_a, n_boot=n_boot, rng=rng,
                groups=groups,
            )
            uno = bootstrap_metric(
                partial(uno_c, tau=_TAU), _uno_columns(sample), n_boot=n_boot_uno, rng=rng,
                groups=groups,
            )
            test = paired_bootstrap_test(
                time=sample.time, event=sample.event, risk_a=sample.risk_a, risk_b=sample.risk_b,
                n_boot=n_boot, rng=rng, groups=groups,
            )
            harrell_true, uno_true = truth[scenario]["harrell"], truth[scenario]["uno"]
            out[f"{scenario}/{unit}"] = (
                float(ci.lower <= harrell_true <= ci.upper),
                ci.estimate,
                float(ci.samples.std()),
                float(uno.lower <= uno_true <= uno.upper),
                uno.estimate,
                float(uno.samples.std()),
                float(test.p_value < 0.05),
                float(ci.n_redrawn + uno.n_redrawn + test.n_redrawn),
            )
    return out


def simulate(
    replicates: int, n: int, n_boot: int, n_boot_uno: int, seed: int, jobs: int, population: int
) -> None:
    started = time.perf_counter()
    population_seed, *replicate_seeds = np.random.SeedSequence(seed).spawn(replicates + 1)
    truth = _population_values(population, population_seed)
    tasks = [(child, n, n_boot, n_boot_uno, truth) for child in replicate_seeds]
    results: list[dict[str, tuple[float, ...]]] = []
    step = max(1, replicates // 20)

    def progress() -> None:
        if len(results) % step == 0 or len(results) == replicates:
            elapsed = time.perf_counter() - started
            print(f"  {len(results)}/{replicates} replicates, {elapsed:.0f} s", file=sys.stderr, flush=True)

    if jobs > 1:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
            for result in pool.map(_replicate, tasks, chunksize=max(1, min(20, replicates // (4 * jobs)))):
                results.append(result)
                progress()
    else:
        for task in tasks:
            results.append(_replicate(task))
            progress()
    seconds = time.perf_counter() - started

    def column(key: str, k: int) -> np.ndarray:
        return np.array([result[key][k] for result in results])

    def cell(p: float) -> str:
        return f"{p:.3f} ({np.sqrt(p * (1 - p) / replicates):.3f})"

    print(f"Simulation: {replicates} replicates per scenario, seed {seed}, "
          f"{jobs} process(es), {seconds:.0f} s wall time")
    print(f"Harrell's C: bootstrap_ci, {n_boot} resamples; paired test: paired_bootstrap_test, "
          f"{n_boot} resamples;")
    print(f"Uno's C (tau = {_TAU:g}, censoring distribution from the data set itself, resampled "
          f"with it): bootstrap_metric, {n_boot_uno} resamples")
    print("  (fewer for Uno: bootstrap_metric recomputes uno_c from scratch on each resample, "
          "about 40x the cost of a matrix-scored Harrell resample).")
    print("Data: Cox model, linear predictor lp ~ N(0, 1), baseline hazard 1, censoring U(0, 3); "
          "risk scores a, b = lp + independent N(0, 1) noise")
    print("  (equal population C, so the paired test's null holds).")
    print(f"  independent: {n} patients, one study each.")
    print(f"  clustered: {round(n / (1 + _REPEAT_RATE))} patients with 1 + min(Poisson({_REPEAT_RATE:g}), "
          f"{_MAX_STUDIES - 1}) studies; repeat studies share time, event and lp; score noise =")
    print(f"  patient N(0, {_PATIENT_SHARE:g}) + per-scan N(0, {1 - _PATIENT_SHARE:.1g}).")
    for scenario in _SCENARIOS:
        studies, patients, events = (column(scenario, k) for k in range(3))
        repeat = 1 - patients.sum() / studies.sum()
        print(f"  {scenario:<12} per replicate: studies {studies.mean():.0f} "
              f"({studies.min():.0f}-{studies.max():.0f}), patients {patients.mean():.0f}, "
              f"repeat studies {repeat:.1%}, events {events.mean():.0f} (min {events.min():.0f})")
    print(f"Population values (target), from one data set of ~{population:,} studies per scenario:")
    for scenario, values in truth.items():
        print(f"  {scenario:<12} Harrell's C {values['harrell']:.4f} (score b: {values['harrell_b']:.4f}), "
              f"Uno's C {values['uno']:.4f} (score b: {values['uno_b']:.4f}); "
              f"{values['studies']:,} studies of {values['patients']:,} patients")
    print()
    print("Coverage of the 95% percentile interval and type-I error of the paired test at 5%,")
    print("with the Monte-Carlo standard error in parentheses:")
    header = (f"{'scenario':<12} {'resampling':<16} {'Harrell cover':>15} {'Uno cover':>15} "
              f"{'paired type I':>15}")
    print(header)
    verdicts = []
    for scenario, unit in _ARMS:
        key = f"{scenario}/{unit}"
        harrell, uno, rejected = column(key, 0).mean(), column(key, 3).mean(), column(key, 6).mean()
        label = "study (=patient)" if scenario == "independent" else unit
        print(f"{scenario:<12} {label:<16} {cell(harrell):>15} {cell(uno):>15} {cell(rejected):>15}")
        if unit == "patient" or scenario == "independent":
            verdicts.append((f"{scenario}/{label}", harrell, uno, rejected))
    print()
    print("Spread: SD of the estimates over replicates vs mean bootstrap SD; bias = mean estimate - target")
    for scenario, unit in _ARMS:
        key = f"{scenario}/{unit}"
        parts = []
        for name, k, target in (("Harrell", 1, "harrell"), ("Uno", 4, "uno")):
            estimates = column(key, k)
            parts.append(f"{name} SD {estimates.std(ddof=1):.4f} vs boot {column(key, k + 1).mean():.4f}, "
                         f"bias {estimates.mean() - truth[scenario][target]:+.4f}")
        print(f"  {scenario:<12} {unit:<8} " + "; ".join(parts) + f"; redrawn {column(key, 7).sum():.0f}")
    print()
    ok = all(abs(h - 0.95) <= 0.015 and abs(u - 0.95) <= 0.015 and abs(r - 0.05) <= 0.015
             for _, h, u, r in verdicts)
    print("Acceptance (patient-level resampling; coverage 0.95 +- 0.015 for both C's, "
          f"type I 0.05 +- 0.015): {'met' if ok else 'NOT met'}")
    for name, h, u, r in verdicts:
        print(f"  {name}: Harrell {h:.3f}, Uno {u:.3f}, type I {r:.3f}")
    print("Note: np.quantile's linear interpolation puts each percentile limit ~0.95 order statistics")
    print("inside the (B + 1) * alpha / 2-th one, an expected coverage loss of about 1.9 / (B + 1): "
          f"{1.9 / (n_boot + 1):.3f} for B = {n_boot}, {1.9 / (n_boot_uno + 1):.3f} for B = {n_boot_uno}.")


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
    parser.add_argument("--replicates", type=int, default=2000, help="simulated data sets per scenario (--simulate)")
    parser.add_argument("--n", type=int, default=400, help="studies per data set (--simulate)")
    parser.add_argument(
        "--n-boot", type=int, default=1000, help="resamples for Harrell's C and the paired test (--simulate)"
    )
    parser.add_argument("--n-boot-uno", type=int, default=250, help="resamples for Uno's C (--simulate)")
    parser.add_argument(
        "--population", type=int, default=200_000, help="studies in the data set giving the population values (--simulate)"
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for --simulate (default: 1, none)")
    args = parser.parse_args()
    if args.simulate:
        simulate(args.replicates, args.n, args.n_boot, args.n_boot_uno, args.seed, args.jobs, args.population)
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

        person = _person_ids(n, rng)
        n_groups = np.unique(person).size
        grouped_note = f"{n_groups:,} patients" + (f"; {ours_note}" if ours_note else "")
        ours_grouped = _best_of(
            partial(bootstrap_ci, time=time_, event=event, risk=risk_a, n_boot=k_ours, rng=1, groups=person),
            1 if n > 1_000 else repeats,
        ) * _N_BOOT / k_ours
        _line(n, "bootstrap_ci, grouped, 1000 resamples", ours_grouped, note=grouped_note)
        ours_grouped = _best_of(
            partial(
                paired_bootstrap_test, time=time_, event=event, risk_a=risk_a, risk_b=risk_b, n_boot=k_ours, rng=1,
                groups=person,
            ),
            1 if n > 1_000 else repeats,
        ) * _N_BOOT / k_ours
        _line(n, "paired_bootstrap_test, grouped, 1000 resamples", ours_grouped, note=grouped_note)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
