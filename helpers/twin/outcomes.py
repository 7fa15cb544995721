"""The twin's outcomes: each institution's cohort of patients and CT studies, their event
times, censoring and later studies, and the outcomes as a cohort builder reads them back.

``_simulate_cohort`` draws one institution's patients (factors from ``factors``), the dates
of their first and later index CTs, a Weibull event time per patient from the log-hazard of
the first study with a baseline calibrated (deterministic bisection) to the institution's
target event fraction within the horizon (``_target_rates``: the paper's rate, raised to a
profile's ``min_event_rate``), loss to follow-up, administrative censoring and the planted
defects. ``_recorded_outcomes`` reads time and event back from the records the way a cohort
builder does; ``_oracle_c`` scores the true log-hazard on them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from helpers import vocabulary as voc
from helpers.metrics import NoComparablePairsError, harrell_c
from helpers.tasks import TASKS
from helpers.twin.factors import (
    _SPECS,
    _draw_factors,
    _log_hazard,
    _Standardiser,
    _study_factors,
)

__all__: list[str] = []

_DAY = 86_400  # seconds
_EPOCH_2015 = int(np.datetime64("2015-01-01T00:00:00", "s").astype(np.int64))
_LAST_FIRST_INDEX = int(np.datetime64("2022-12-31T00:00:00", "s").astype(np.int64))
_DATA_END = int(np.datetime64("2024-12-31T00:00:00", "s").astype(np.int64))
_LATER_STUDY_WINDOW_DAYS = 365.0
_LOSS_TO_FOLLOW_UP = 0.10
_DEFECT_FRACTION = 0.005


@dataclass
class _Cohort:
    """One institution's simulated patients and studies (arrays; times in days from the
    patient's first index CT, datetimes in epoch seconds)."""

    n_patients: int
    study_patient: np.ndarray  # (n_studies,) patient index
    study_rank: np.ndarray  # (n_studies,) 0 for a patient's first study
    factors: dict[str, np.ndarray]  # per study
    hazard: dict[str, np.ndarray]  # per study: generating log-hazard, its parts, scan's own
    first_time: np.ndarray  # (n_patients,) epoch s of the first index CT
    study_offset: np.ndarray  # (n_studies,) days after the first index
    event_time: np.ndarray  # (n_patients,) days, first event (death for pe)
    fatal: np.ndarray  # (n_patients,) bool: the first event is a death
    mace_kind: np.ndarray  # (n_patients,) 0 death, 1 mi, 2 stroke, 3 heart failure
    death_time: np.ndarray  # (n_patients,) days (inf: none)
    censor_time: np.ndarray  # (n_patients,) days
    baseline: float
    defect: np.ndarray  # (n_studies,) "" or defect name
    defect_shift_days: np.ndarray  # (n_studies,) days before index of a planted death


def _target_rates(task: str, min_event_rate: float | None) -> dict[str, float]:
    """Each institution's target event fraction within the horizon: the paper's rate, raised to
    ``min_event_rate`` where a profile sets that floor (see ``helpers.tasks.Profile``).

    >>> _target_rates("pe", None)
    {'internal': 0.07, 'external': 0.19}
    >>> _target_rates("mace", 0.3)
    {'internal': 0.46, 'external': 0.3}
    """
    paper = _SPECS[task].target_rate
    if min_event_rate is None:
        return dict(paper)
    return {inst: max(rate, float(min_event_rate)) for inst, rate in paper.items()}


def _study_counts(rng: np.random.Generator, n_studies: int, mean: float) -> np.ndarray:
    extra = np.minimum(rng.poisson(max(mean - 1.0, 0.0), size=n_studies), 4)
    counts = 1 + extra
    cum = np.cumsum(counts)
    n_pat = int(np.searchsorted(cum, n_studies) + 1)
    counts = counts[:n_pat].copy()
    counts[-1] -= int(cum[n_pat - 1] - n_studies)
    return counts


def _simulate_cohort(
    task: str,
    task_index: int,
    inst: str,
    n_studies: int,
    seed: int,
    image_share: float,
    std: _Standardiser,
    interaction: float,
    target: float,
) -> _Cohort:
    """One institution's cohort of ``n_studies`` CT studies; ``interaction`` is kappa (see
    ``factors._log_hazard``), ``target`` the event fraction within the horizon that the
    baseline hazard is calibrated to."""
    spec = _SPECS[task]
    site_index = 0 if inst == "internal" else 1
    rng = np.random.default_rng([seed, task_index, site_index, 1])
    counts = _study_counts(rng, n_studies, spec.studies_per_patient[inst])
    n_pat = len(counts)
    shift = spec.external_shift if inst == "external" else {}
    pf = _study_factors(task, _draw_factors(rng, spec, n_pat, shift))
    study_patient = np.repeat(np.arange(n_pat), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    study_rank = np.arange(n_studies) - starts[study_patient]
    sf = {k: v[study_patient].copy() for k, v in pf.items()}
    later = study_rank > 0
    if task == "pe":
        # a later CTPA shows a new or residual clot (RV strain, a shared factor, is the
        # patient's: it does not follow a CT-exclusive factor, see factors._CORRELATIONS)
        new_clot = 0.5 * sf["clot_burden"] + math.sqrt(0.75) * rng.standard_normal(n_studies)
        sf["clot_burden"] = np.where(later, new_clot, sf["clot_burden"])
    scan = _log_hazard(task, spec, sf, std, image_share, interaction)
    # the event time is drawn once per patient from the first study's log-hazard: that is the
    # true log-hazard of every study of the patient; a later scan's own one is kept apart
    hazard = {k: v[starts[study_patient]] for k, v in scan.items()}
    hazard["scan_log_hazard"] = scan["true_log_hazard"]
    lp_first = hazard["true_log_hazard"][starts]

    horizon = float(TASKS[task].horizon_days)
    e = rng.exponential(size=n_pat)
    first_time = (
        _EPOCH_2015 + np.floor(rng.uniform(0, _LAST_FIRST_INDEX - _EPOCH_2015, n_pat) / 60) * 60
    )
    if task == "pe":
        admin_cap = np.full(n_pat, np.inf)
    else:
        admin_cap = (_DATA_END - first_time) / _DAY
    lost = rng.random(n_pat) < _LOSS_TO_FOLLOW_UP
    loss_span = np.where(np.isfinite(admin_cap), admin_cap, horizon + _LATER_STUDY_WINDOW_DAYS)
    loss_time = np.where(lost, rng.uniform(0.05, 1.0, n_pat) * loss_span, np.inf)
    frac = np.sort(rng.uniform(0.02, 0.98, (n_pat, 5)), axis=1)
    kind = rng.choice(4, size=n_pat, p=[0.2, 0.32, 0.2, 0.28])  # death, mi, stroke, hf
    post_death = rng.exponential(900.0, n_pat)
    post_death_happens = rng.random(n_pat) < 0.15

    def outcomes(b: float) -> dict[str, np.ndarray]:
        t = horizon * (e / np.exp(lp_first + b)) ** (1.0 / spec.weibull_shape)
        window = np.minimum(
            np.minimum(t, loss_time), np.minimum(_LATER_STUDY_WINDOW_DAYS, admin_cap)
        )
        offs = np.where(
            later, frac[study_patient, np.maximum(study_rank - 1, 0)] * window[study_patient], 0.0
        )
        last = np.zeros(n_pat)
        np.maximum.at(last, study_patient, offs)
        admin = last + horizon if task == "pe" else admin_cap
        censor = np.minimum(loss_time, admin)
        recorded = t <= censor
        ev = recorded[study_patient] & (t[study_patient] - offs <= horizon)
        return {"t": t, "offs": offs, "censor": censor, "event": ev}

    lo, hi = -25.0, 25.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if outcomes(mid)["event"].mean() < target:
            lo = mid
        else:
            hi = mid
    b = 0.5 * (lo + hi)
    out = outcomes(b)
    t = out["t"]
    if task == "pe":
        fatal = np.ones(n_pat, bool)
        kind = np.zeros(n_pat, np.int64)
    else:
        fatal = kind == 0
    death = np.where(fatal, t, np.where(post_death_happens, t + post_death, np.inf))
    death = np.where(death <= out["censor"], death, np.inf)

    defect = np.full(n_studies, "", dtype=object)
    shift_days = np.zeros(n_studies)
    n_defect = max(1, int(round(_DEFECT_FRACTION * n_studies)))
    single = np.flatnonzero((counts == 1) & (t > out["censor"]))
    if len(single) >= n_defect:
        chosen = np.sort(rng.choice(single, size=n_defect, replace=False))
        studies = starts[chosen]
        kinds = np.where(np.arange(n_defect) % 2 == 0, "zero_follow_up", "death_before_index")
        defect[studies] = kinds
        shift_days[studies] = np.where(
            kinds == "death_before_index", rng.integers(1, 60, n_defect), 0
        )
    return _Cohort(
        n_patients=n_pat,
        study_patient=study_patient,
        study_rank=study_rank,
        factors=sf,
        hazard=hazard,
        first_time=first_time.astype(np.int64),
        study_offset=out["offs"],
        event_time=t,
        fatal=fatal,
        mace_kind=kind,
        death_time=death,
        censor_time=out["censor"],
        baseline=b,
        defect=defect,
        defect_shift_days=shift_days,
    )



def _group_ids(group: str) -> np.ndarray:
    return np.array([c.concept_id for c in voc.concepts_in_group(group)], dtype=np.int64)




def _recorded_outcomes(task: str, c: _Cohort, ehr: dict[str, Any]) -> dict[str, np.ndarray]:
    """Per study, from the records (as a cohort builder reads them): time (days), event."""
    spec = TASKS[task]
    sp = c.study_patient
    idx_day = ehr["studies"]["date"] // _DAY
    obs_end = ehr["patients"]["obs_end"][sp] // _DAY
    death_day = np.full(c.n_patients, np.iinfo(np.int64).max)
    de = ehr["deaths"]
    death_day[de["person"]] = de["time"] // _DAY
    event_day = death_day[sp].copy()
    if spec.outcome_groups:
        ids = np.concatenate([_group_ids(g) for g in spec.outcome_groups])
        cd = ehr["conditions"]
        # history codes predate every study of a patient and events follow all of them, so
        # the first outcome code on or after the first index is the event for every study
        first_index_day = c.first_time // _DAY
        cd_day = cd["start"] // _DAY
        sel = np.isin(cd["concept"], ids) & (cd_day >= first_index_day[cd["person"]])
        first_out = np.full(c.n_patients, np.iinfo(np.int64).max)
        np.minimum.at(first_out, cd["person"][sel], cd_day[sel])
        event_day = np.minimum(event_day, first_out[sp])
    censor = np.minimum(obs_end, idx_day + spec.horizon_days)
    event = event_day <= censor
    end = np.where(event, event_day, censor)
    days = (end - idx_day).astype(np.float64)
    time_ = np.where(days > 0, days, np.where(event, 0.5, 0.0))
    valid = (c.defect == "") & (time_ > 0) & ~(death_day[sp] < idx_day)
    return {"time": time_, "event": event.astype(np.int64), "valid": valid}


def _oracle_c(time_: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """``helpers.metrics.harrell_c``, NaN where undefined (under 2 studies, no comparable pair)."""
    if len(time_) < 2:
        return float("nan")
    try:
        return harrell_c(time_, event, risk)
    except NoComparablePairsError:
        return float("nan")
