"""The digital twin: synthetic OMOP CDM records, CT volumes and their hidden ground truth.

``generate(out_dir)`` writes, for each task (``pe``, ``mace``), two institutions: ``internal``
(``site_a``, NIfTI volumes) and ``external`` (``site_b``, DICOM series), laid out as::

    <out_dir>/<task>/omop/<table>.parquet          OMOP CDM v5.4 tables (and ``concept``)
    <out_dir>/<task>/imaging_index.parquet         one row per CT study
    <out_dir>/<task>/images/site_a/<study_id>.nii.gz
    <out_dir>/<task>/images/site_b/<study_id>/<nnnn>.dcm
    <out_dir>/<task>/ground_truth/factors.parquet  latent factors and the true log-hazard
    <out_dir>/<task>/ground_truth/lesions.parquet  embolus / calcification voxel counts
    <out_dir>/<task>/ground_truth/masks/<study_id>.npz   uint8 mask: 1 embolus, 2 calcium
    <out_dir>/<task>/twin.json                     parameters, counts, event rates, timing

How it works. Each patient has correlated latent factors (a Gaussian copula): age, sex,
coronary calcium, cardiac dysfunction, cancer, renal dysfunction, chronic lung disease,
frailty, diabetes, hypertension, smoking, pulmonary-artery dilation and, per CT study, clot
burden and right-ventricular strain (``VISIBILITY`` says which modality shows each: clot burden
and coronary calcium only the CT; cancer, renal and lung disease, frailty, diabetes,
hypertension, smoking, age and sex only the records). Continuous factors are unitless severities, standard
normal in the internal population (higher = worse); binary factors are 0/1; age is in years.
The true log-hazard is ``beta * (sqrt(s) * image_part + sqrt(1 - s) * ehr_part +
interaction_part)`` where ``s`` is ``image_share``, the image part uses only CT-visible factors,
the EHR part only EHR-visible ones (both standardised on a reference sample of the internal
population, with non-linear terms), and the interaction couples one CT-only and one EHR-only
factor (pe: clot burden and RV strain matter more with cancer or lung disease; mace: coronary
calcium matters more with diabetes). Event times follow a Weibull proportional-hazards model
whose baseline is calibrated per institution (deterministic bisection) to the paper's event
rates. A patient's event time is drawn once, from the log-hazard of the first study; a later
PE study shows a new clot burden and RV strain but the same outcome, so in
``ground_truth/factors.parquet`` every study's ``true_log_hazard`` (and its ``image_part``,
``ehr_part``, ``interaction_part``) is that of the patient's first study, the one that
generated the outcome, while ``scan_log_hazard`` is the log-hazard of the study's own factors
(equal to ``true_log_hazard`` for first studies and for mace). Outcomes are never labelled:
deaths are ``death`` rows, MACE events are post-index condition codes, censoring is the end of
the observation period.

The CT volumes are phantoms at 64 x 64 pixels of 5.5-6 mm: body, lungs, heart and
ventricles, aorta, spine and the pulmonary arteries (trunk, main branches, three lobar
arteries per side), contrast-enhanced for PE. Each factor the CT shows has a visible
correlate: emboli are filling defects (clot at 25-65 HU in a 320 HU lumen) whose number of
affected lobar arteries, length and share of the lumen grow with the clot burden, with
central clots above the median and a saddle embolus across the bifurcation above about +1
sd; calcified plaques on the heart's surface grow in number and size with coronary calcium;
the RV, the pulmonary arteries and the heart widen with RV strain, PA dilation and cardiac
dysfunction. The masks mark exactly the voxels rendered as embolus or calcium.

A few studies (about 0.5 %) carry planted defects a cohort builder must exclude: zero
follow-up after the index, or a death recorded before the index CT. They are listed in
``ground_truth/factors.parquet`` (column ``defect``) and counted in ``twin.json``.

Nothing outside ``ground_truth/`` holds a factor directly. Results depend only on ``seed``
(and the other parameters), not on the number of worker processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.uid import generate_uid
from scipy.special import ndtri

from helpers import vocabulary as voc
from helpers.cohort import IMAGING_INDEX_COLUMNS
from helpers.imaging import Volume, write_dicom_series, write_nifti
from helpers.metrics import NoComparablePairsError, harrell_c
from helpers.tasks import TASKS

__all__ = [
    "GENERATOR_VERSION",
    "PROFILES",
    "INSTITUTIONS",
    "FACTOR_COLUMNS",
    "VISIBILITY",
    "OMOP_TABLE_NAMES",
    "factor_effects",
    "generate",
]

GENERATOR_VERSION = "1.2.0"

# Numbers of CT studies per task and institution.
PROFILES: dict[str, dict[str, dict[str, int]]] = {
    "paper": {
        "pe": {"internal": 4197, "external": 435},
        "mace": {"internal": 3788, "external": 682},
    },
    "quick": {
        "pe": {"internal": 420, "external": 120},
        "mace": {"internal": 420, "external": 120},
    },
}

# institution key -> (site name, care_site_id, image format)
INSTITUTIONS: dict[str, tuple[str, int, str]] = {
    "internal": ("site_a", 1, "nifti"),
    "external": ("site_b", 2, "dicom"),
}

FACTOR_COLUMNS: tuple[str, ...] = (
    "age",
    "male",
    "coronary_calcium",
    "cardiac_dysfunction",
    "cancer",
    "renal_dysfunction",
    "chronic_lung_disease",
    "frailty",
    "diabetes",
    "hypertension",
    "smoking",
    "pa_dilation",
    "clot_burden",
    "rv_strain",
)

# Where each factor can be seen: "ct" (the CT volume), "ehr" (the OMOP records). A factor
# missing from a modality leaves no trace there beyond its correlation with visible factors
# (the copula); tests/test_twin.py probes both modalities for it.
VISIBILITY: dict[str, tuple[str, ...]] = {
    "age": ("ehr",),
    "male": ("ehr",),
    "coronary_calcium": ("ct",),  # calcified plaques on the heart's surface
    "cardiac_dysfunction": ("ct", "ehr"),  # heart and LV size; heart-failure codes, NT-proBNP
    "cancer": ("ehr",),
    "renal_dysfunction": ("ehr",),
    "chronic_lung_disease": ("ehr",),
    "frailty": ("ehr",),
    "diabetes": ("ehr",),
    "hypertension": ("ehr",),
    "smoking": ("ehr",),
    "pa_dilation": ("ct", "ehr"),  # pulmonary-artery calibre; pulmonary-hypertension codes
    "clot_burden": ("ct",),  # filling defects in the pulmonary arteries (pe only)
    "rv_strain": ("ct", "ehr"),  # RV size; troponin, NT-proBNP, pulse, SpO2, I26.09
}

OMOP_TABLE_NAMES: tuple[str, ...] = voc.OMOP_TABLES

_DAY = 86_400  # seconds
_EPOCH_2015 = int(np.datetime64("2015-01-01T00:00:00", "s").astype(np.int64))
_LAST_FIRST_INDEX = int(np.datetime64("2022-12-31T00:00:00", "s").astype(np.int64))
_DATA_END = int(np.datetime64("2024-12-31T00:00:00", "s").astype(np.int64))
_LATER_STUDY_WINDOW_DAYS = 365.0
_LOSS_TO_FOLLOW_UP = 0.10
_DEFECT_FRACTION = 0.005
_REFERENCE_N = 20_000

_BINARY = ("male", "cancer", "chronic_lung_disease", "diabetes", "hypertension", "smoking")
_LATENT = FACTOR_COLUMNS  # order of the copula's dimensions


@dataclass(frozen=True)
class _TaskSpec:
    """Population and outcome settings of one task."""

    age_mean: float
    age_sd: float
    prevalence: dict[str, float]  # binary factors, internal population
    external_shift: dict[str, float]  # latent mean shifts (age: years)
    studies_per_patient: dict[str, float]
    target_rate: dict[str, float]
    weibull_shape: float
    beta: float
    kappa: float
    contrast: bool


_SPECS: dict[str, _TaskSpec] = {
    "pe": _TaskSpec(
        age_mean=62.0,
        age_sd=15.0,
        prevalence={
            "male": 0.48,
            "cancer": 0.22,
            "chronic_lung_disease": 0.18,
            "diabetes": 0.20,
            "hypertension": 0.50,
            "smoking": 0.20,
        },
        external_shift={
            "age": 4.0,
            "clot_burden": 0.3,
            "rv_strain": 0.3,
            "cancer": 0.35,
            "frailty": 0.3,
            "renal_dysfunction": 0.2,
            "cardiac_dysfunction": 0.2,
        },
        studies_per_patient={"internal": 4542 / 3764, "external": 435 / 396},
        target_rate={"internal": 0.07, "external": 0.19},
        weibull_shape=0.7,
        beta=1.55,
        kappa=0.35,
        contrast=True,
    ),
    "mace": _TaskSpec(
        age_mean=63.0,
        age_sd=11.0,
        prevalence={
            "male": 0.55,
            "cancer": 0.08,
            "chronic_lung_disease": 0.12,
            "diabetes": 0.28,
            "hypertension": 0.62,
            "smoking": 0.20,
        },
        external_shift={
            "age": -8.0,
            "coronary_calcium": -0.4,
            "cardiac_dysfunction": -0.3,
            "diabetes": -0.2,
            "hypertension": -0.2,
            "frailty": -0.3,
        },
        studies_per_patient={"internal": 4133 / 3947, "external": 682 / 665},
        target_rate={"internal": 0.46, "external": 0.28},
        weibull_shape=1.0,
        beta=1.25,
        kappa=0.35,
        contrast=False,
    ),
}


@dataclass(frozen=True)
class _Site:
    """Record keeping and scanner of one institution."""

    history_years: tuple[float, float]
    visits_per_year: float
    min_history_visits: int
    code_sensitivity: float
    false_code_rate: float
    repeat_codes: float
    drug_adherence: float
    vitals_prob: float
    labs_prob: float
    followup_visits_per_year: float
    alt_units: bool
    noise_sd: float
    hu_offset: float
    slice_mm: float
    n_slices: int
    pixel_mm: float
    matrix: int


_SITES: dict[str, _Site] = {
    "internal": _Site(
        history_years=(1.0, 8.0),
        visits_per_year=4.0,
        min_history_visits=1,
        code_sensitivity=0.85,
        false_code_rate=0.01,
        repeat_codes=1.5,
        drug_adherence=0.85,
        vitals_prob=0.8,
        labs_prob=0.5,
        followup_visits_per_year=2.0,
        alt_units=False,
        noise_sd=15.0,
        hu_offset=0.0,
        slice_mm=5.0,
        n_slices=20,
        pixel_mm=6.0,
        matrix=64,
    ),
    "external": _Site(
        history_years=(0.3, 3.0),
        visits_per_year=2.0,
        min_history_visits=0,
        code_sensitivity=0.6,
        false_code_rate=0.015,
        repeat_codes=0.8,
        drug_adherence=0.6,
        vitals_prob=0.5,
        labs_prob=0.3,
        followup_visits_per_year=1.0,
        alt_units=True,
        noise_sd=30.0,
        hu_offset=20.0,
        slice_mm=3.0,
        n_slices=33,
        pixel_mm=5.5,
        matrix=64,
    ),
}

# Pairwise correlations of the copula's latent normals (unlisted pairs: 0).
_CORRELATIONS: dict[tuple[str, str], float] = {
    ("age", "coronary_calcium"): 0.50,
    ("age", "renal_dysfunction"): 0.35,
    ("age", "frailty"): 0.45,
    ("age", "cardiac_dysfunction"): 0.30,
    ("age", "hypertension"): 0.35,
    ("age", "diabetes"): 0.20,
    ("age", "cancer"): 0.15,
    ("male", "coronary_calcium"): 0.20,
    ("coronary_calcium", "diabetes"): 0.30,
    ("coronary_calcium", "smoking"): 0.25,
    ("coronary_calcium", "hypertension"): 0.25,
    ("coronary_calcium", "cardiac_dysfunction"): 0.25,
    ("cardiac_dysfunction", "renal_dysfunction"): 0.25,
    ("cardiac_dysfunction", "pa_dilation"): 0.30,
    ("cardiac_dysfunction", "frailty"): 0.20,
    ("chronic_lung_disease", "smoking"): 0.45,
    ("chronic_lung_disease", "pa_dilation"): 0.30,
    ("cancer", "frailty"): 0.25,
    ("cancer", "smoking"): 0.20,
    ("renal_dysfunction", "diabetes"): 0.25,
    ("renal_dysfunction", "hypertension"): 0.25,
    ("clot_burden", "rv_strain"): 0.60,
    ("clot_burden", "pa_dilation"): 0.20,
    ("rv_strain", "pa_dilation"): 0.30,
    ("rv_strain", "chronic_lung_disease"): 0.15,
}


def _correlation_matrix() -> np.ndarray:
    """The copula's correlation matrix, shape (14, 14), made positive definite if needed."""
    k = len(_LATENT)
    pos = {name: i for i, name in enumerate(_LATENT)}
    r = np.eye(k)
    for (a, b), rho in _CORRELATIONS.items():
        r[pos[a], pos[b]] = r[pos[b], pos[a]] = rho
    w, v = np.linalg.eigh(r)
    if w.min() < 1e-6:
        r = (v * np.maximum(w, 1e-6)) @ v.T
        d = np.sqrt(np.diag(r))
        r = r / np.outer(d, d)
    return r


def _draw_factors(
    rng: np.random.Generator, spec: _TaskSpec, n: int, shift: dict[str, float]
) -> dict[str, np.ndarray]:
    """Latent factors of ``n`` patients (first study), float64 arrays of shape (n,)."""
    chol = np.linalg.cholesky(_correlation_matrix())
    z = rng.standard_normal((n, len(_LATENT))) @ chol.T
    out: dict[str, np.ndarray] = {}
    for i, name in enumerate(_LATENT):
        zi = z[:, i] + (0.0 if name == "age" else shift.get(name, 0.0))
        if name == "age":
            out[name] = np.clip(
                spec.age_mean + shift.get("age", 0.0) + spec.age_sd * zi, 18.0, 95.0
            )
        elif name in _BINARY:
            out[name] = (zi > ndtri(1.0 - spec.prevalence[name])).astype(np.float64)
        else:
            out[name] = zi
    return out


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _raw_parts(
    task: str, f: dict[str, np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Unstandardised (image, ehr, interaction core, interaction modifier) of the log-hazard."""
    if task == "pe":
        core = 0.8 * f["clot_burden"] + 0.6 * f["rv_strain"]
        image = (
            core
            + 0.3 * _relu(f["rv_strain"]) ** 2
            + 0.3 * f["pa_dilation"]
            + 0.35 * f["cardiac_dysfunction"]
        )
        ehr = (
            0.05 * (f["age"] - 62.0)
            + 0.2 * f["male"]
            + 1.0 * f["cancer"]
            + 0.45 * f["renal_dysfunction"]
            + 0.15 * _relu(f["renal_dysfunction"]) ** 2
            + 0.5 * f["chronic_lung_disease"]
            + 0.6 * f["frailty"]
            + 0.2 * f["diabetes"]
            + 0.1 * f["hypertension"]
            + 0.2 * f["smoking"]
            + 0.25 * f["cardiac_dysfunction"]
        )
        modifier = np.maximum(f["cancer"], f["chronic_lung_disease"])
    else:
        core = f["coronary_calcium"]
        image = (
            core
            + 0.25 * _relu(f["coronary_calcium"]) ** 2
            + 0.5 * f["cardiac_dysfunction"]
            + 0.2 * f["pa_dilation"]
            + 0.15 * f["rv_strain"]
        )
        ehr = (
            0.06 * (f["age"] - 63.0)
            + 0.3 * f["male"]
            + 0.45 * f["diabetes"]
            + 0.35 * f["hypertension"]
            + 0.3 * f["smoking"]
            + 0.3 * f["renal_dysfunction"]
            + 0.1 * _relu(f["renal_dysfunction"]) ** 2
            + 0.3 * f["frailty"]
            + 0.35 * f["cardiac_dysfunction"]
            + 0.2 * f["cancer"]
            + 0.1 * f["chronic_lung_disease"]
        )
        modifier = f["diabetes"]
    return image, ehr, core, modifier


def _study_factors(task: str, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Task-specific adjustments of the first-study factors (mace has no clot, mild RV)."""
    g = dict(f)
    if task == "mace":
        g["clot_burden"] = np.full_like(f["age"], np.nan)
        g["rv_strain"] = (
            0.5 * f["pa_dilation"] + 0.3 * f["cardiac_dysfunction"] + 0.5 * f["rv_strain"]
        )
    return g


@dataclass(frozen=True)
class _Standardiser:
    """Means and sds of the raw parts in the internal reference population."""

    image: tuple[float, float]
    ehr: tuple[float, float]
    core: tuple[float, float]


def _standardiser(task: str, spec: _TaskSpec, seed: int, task_index: int) -> _Standardiser:
    rng = np.random.default_rng([seed, task_index, 7919])
    f = _study_factors(task, _draw_factors(rng, spec, _REFERENCE_N, {}))
    image, ehr, core, _ = _raw_parts(task, f)

    def ms(x: np.ndarray) -> tuple[float, float]:
        return float(x.mean()), float(x.std())

    return _Standardiser(ms(image), ms(ehr), ms(core))


def _log_hazard(
    task: str, spec: _TaskSpec, f: dict[str, np.ndarray], std: _Standardiser, image_share: float
) -> dict[str, np.ndarray]:
    image, ehr, core, modifier = _raw_parts(task, f)
    img = (image - std.image[0]) / std.image[1]
    e = (ehr - std.ehr[0]) / std.ehr[1]
    inter = spec.kappa * (core - std.core[0]) / std.core[1] * modifier
    image_part = spec.beta * math.sqrt(image_share) * img
    ehr_part = spec.beta * math.sqrt(1.0 - image_share) * e
    inter_part = spec.beta * inter
    return {
        "image_part": image_part,
        "ehr_part": ehr_part,
        "interaction_part": inter_part,
        "true_log_hazard": image_part + ehr_part + inter_part,
    }


def factor_effects(task: str, image_share: float = 0.5, seed: int = 0) -> list[dict[str, Any]]:
    """How each factor enters ``task``'s true log-hazard, one dict per factor.

    Keys: ``factor``; ``ct`` / ``ehr`` (bool: the modality shows it, see ``VISIBILITY``);
    ``image_term`` / ``ehr_term``: mean change of the image / EHR part of the log-hazard
    (natural-log units, after ``beta`` and the ``image_share`` weights) per unit of the
    factor (per year for ``age``, from 0 to 1 for binary factors), over the internal
    reference population; ``interaction``: ``"core"`` (the CT factor of the cross-modal
    interaction), ``"modifier"`` (the EHR factor) or ``""``. Positive = higher hazard.
    """
    if task not in _SPECS:
        raise ValueError(
            f"factor_effects: unknown task {task!r}; expected one of {', '.join(_SPECS)}"
        )
    if not 0.0 <= float(image_share) <= 1.0:
        raise ValueError(f"factor_effects: image_share must be in [0, 1], got {image_share}")
    spec = _SPECS[task]
    task_index = list(TASKS).index(task)
    std = _standardiser(task, spec, seed, task_index)
    rng = np.random.default_rng([seed, task_index, 104729])
    f = _study_factors(task, _draw_factors(rng, spec, 4000, {}))
    base = _raw_parts(task, f)
    w_img = spec.beta * math.sqrt(image_share) / std.image[1]
    w_ehr = spec.beta * math.sqrt(1.0 - image_share) / std.ehr[1]
    rows = []
    for name in FACTOR_COLUMNS:
        if np.isnan(f[name]).all():
            continue
        if name in _BINARY:
            lo, hi = dict(f), dict(f)
            lo[name], hi[name] = np.zeros_like(f[name]), np.ones_like(f[name])
            a, b, step = _raw_parts(task, lo), _raw_parts(task, hi), 1.0
        else:
            moved = dict(f)
            moved[name] = f[name] + 0.1
            a, b, step = base, _raw_parts(task, moved), 0.1
        diff = [float(np.mean(hi_ - lo_)) / step for lo_, hi_ in zip(a, b, strict=True)]
        rows.append(
            {
                "factor": name,
                "ct": "ct" in VISIBILITY[name],
                "ehr": "ehr" in VISIBILITY[name],
                "image_term": round(w_img * diff[0], 3),
                "ehr_term": round(w_ehr * diff[1], 3),
                "interaction": "core" if diff[2] else ("modifier" if diff[3] else ""),
            }
        )
    return rows


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
) -> _Cohort:
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
        # a later CTPA shows a new or residual clot; RV strain follows the clot
        resid = pf["rv_strain"] - 0.6 * pf["clot_burden"]
        new_clot = 0.5 * sf["clot_burden"] + math.sqrt(0.75) * rng.standard_normal(n_studies)
        sf["clot_burden"] = np.where(later, new_clot, sf["clot_burden"])
        sf["rv_strain"] = np.where(
            later, resid[study_patient] + 0.6 * sf["clot_burden"], sf["rv_strain"]
        )
    scan = _log_hazard(task, spec, sf, std, image_share)
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

    target = spec.target_rate[inst]
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


# ---------------------------------------------------------------- EHR records


class _Rows:
    """Column-wise accumulator of one OMOP table's rows (arrays appended, then concatenated)."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}

    def add(self, **cols: Any) -> None:
        n = max(np.size(v) for v in cols.values() if not np.isscalar(v))
        for k, v in cols.items():
            arr = np.full(n, v) if np.isscalar(v) or v is None else np.asarray(v)
            self.parts.setdefault(k, []).append(arr)

    def get(self) -> dict[str, np.ndarray]:
        return {k: np.concatenate(v) if v else np.array([]) for k, v in self.parts.items()}


def _group_ids(group: str) -> np.ndarray:
    return np.array([c.concept_id for c in voc.concepts_in_group(group)], dtype=np.int64)


_CODE_BY_ID = {c.concept_id: c.concept_code for c in voc.CONCEPTS}


def _pick_visits(
    rng: np.random.Generator, patients: np.ndarray, v_start: np.ndarray, v_count: np.ndarray
) -> np.ndarray:
    """For each row's patient, a random one of its history visits (-1 if it has none)."""
    n = v_count[patients]
    pick = v_start[patients] + np.floor(rng.random(len(patients)) * np.maximum(n, 1)).astype(
        np.int64
    )
    return np.where(n > 0, pick, -1)


def _atherosclerosis(pf: dict[str, np.ndarray]) -> np.ndarray:
    """EHR-visible coronary risk, shape (n_patients,), about standard normal: the part of
    coronary disease that records can know (age, sex, diabetes, hypertension, smoking)."""
    raw = (
        0.04 * (pf["age"] - 62.0)
        + 0.5 * pf["male"]
        + 0.7 * pf["diabetes"]
        + 0.5 * pf["hypertension"]
        + 0.6 * pf["smoking"]
    )
    return (raw - 0.94) / 0.76


def _build_ehr(
    task: str, inst: str, c: _Cohort, seed: int, task_index: int
) -> dict[str, dict[str, np.ndarray]]:
    """All OMOP rows of one institution, with local visit indices (ids assigned later)."""
    site = _SITES[inst]
    site_index = 0 if inst == "internal" else 1
    rng = np.random.default_rng([seed, task_index, site_index, 2])
    n_pat = c.n_patients
    sp = c.study_patient
    first = np.flatnonzero(c.study_rank == 0)
    pf = {k: v[first] for k, v in c.factors.items()}  # patient-level factors (first study)
    study_time = c.first_time[sp] + np.round(c.study_offset * _DAY / 60).astype(np.int64) * 60
    study_date = study_time // _DAY * _DAY
    is_defect = c.defect != ""
    defect_patient = np.zeros(n_pat, bool)
    defect_patient[sp[is_defect]] = True

    # observation period
    hist_days = rng.uniform(*site.history_years, n_pat) * 365.25
    obs_start = (c.first_time - hist_days * _DAY) // _DAY * _DAY
    death_s = np.where(
        np.isfinite(c.death_time), c.first_time + np.nan_to_num(c.death_time, posinf=0) * _DAY, -1
    ).astype(np.int64)
    censor_s = (c.first_time + np.minimum(c.censor_time, 1e5) * _DAY).astype(np.int64)
    obs_end = np.where(death_s >= 0, death_s, censor_s) // _DAY * _DAY
    last_study_date = np.zeros(n_pat, np.int64)
    np.maximum.at(last_study_date, sp, study_date)
    obs_end = np.maximum(obs_end, last_study_date)
    planted_death = np.full(n_pat, -1, np.int64)
    for s in np.flatnonzero(is_defect):
        p = sp[s]
        obs_end[p] = study_date[s]
        death_s[p] = -1
        if c.defect[s] == "death_before_index":
            planted_death[p] = study_date[s] - int(c.defect_shift_days[s]) * _DAY + 9 * 3600

    # visits: history, index, follow-up, event
    rate = site.visits_per_year * (1 + 0.3 * _relu(pf["frailty"]) + 0.5 * pf["cancer"])
    n_hist = site.min_history_visits + rng.poisson(rate * hist_days / 365.25)
    hp = np.repeat(np.arange(n_pat), n_hist)
    h_start_day = (
        (c.first_time[hp] // _DAY)
        - 1
        - np.floor(rng.random(len(hp)) * np.maximum(hist_days[hp] - 1, 1))
    )
    h_time = (h_start_day * _DAY + rng.integers(7 * 3600, 18 * 3600, len(hp)) // 60 * 60).astype(
        np.int64
    )
    h_time = np.maximum(h_time, obs_start[hp])
    order = np.lexsort((h_time, hp))
    hp, h_time = hp[order], h_time[order]
    h_type = rng.choice(
        [voc.VISIT_OUTPATIENT, voc.VISIT_ER, voc.VISIT_INPATIENT],
        size=len(hp),
        p=[0.72, 0.18, 0.10],
    )
    v_start = np.concatenate([[0], np.cumsum(n_hist)[:-1]])

    if task == "pe":
        i_type = np.full(len(sp), voc.VISIT_ER)
    elif inst == "external":
        i_type = np.full(len(sp), voc.VISIT_ER)
    else:
        i_type = np.where(rng.random(len(sp)) < 0.6, voc.VISIT_OUTPATIENT, voc.VISIT_ER)
    i_time = study_time - rng.integers(20, 180, len(sp)) * 60

    fu_days = np.maximum((obs_end - c.first_time) / _DAY, 0)
    n_fu = rng.poisson(site.followup_visits_per_year * fu_days / 365.25)
    fp = np.repeat(np.arange(n_pat), n_fu)
    f_time = (
        c.first_time[fp] // _DAY
        + 1
        + np.floor(rng.random(len(fp)) * np.maximum(fu_days[fp] - 1, 0))
    ) * _DAY
    f_time = (f_time + rng.integers(8 * 3600, 17 * 3600, len(fp)) // 60 * 60).astype(np.int64)
    f_keep = f_time // _DAY * _DAY <= obs_end[fp]
    fp, f_time = fp[f_keep], f_time[f_keep]

    mace_event = (
        (task == "mace") & (c.mace_kind > 0) & (c.event_time <= c.censor_time) & ~defect_patient
    )
    ep = np.flatnonzero(mace_event)
    e_time = (c.first_time[ep] + c.event_time[ep] * _DAY).astype(np.int64) // 60 * 60

    visits = _Rows()
    visits.add(person=hp, start=h_time, concept=h_type)
    visits.add(person=sp, start=i_time, concept=i_type)
    visits.add(person=fp, start=f_time, concept=np.full(len(fp), voc.VISIT_OUTPATIENT))
    visits.add(person=ep, start=e_time, concept=np.full(len(ep), voc.VISIT_INPATIENT))
    vis = visits.get()
    n_h, n_i, n_f = len(hp), len(sp), len(fp)
    idx_visit = n_h + np.arange(n_i)  # local visit index of each study's index visit
    event_visit = n_h + n_i + n_f + np.arange(len(ep))
    los = np.select(
        [vis["concept"] == voc.VISIT_OUTPATIENT, vis["concept"] == voc.VISIT_ER],
        [np.full(len(vis["start"]), 3600), rng.integers(3, 9, len(vis["start"])) * 3600],
        (1 + rng.poisson(3, len(vis["start"]))) * _DAY,
    )
    vis["end"] = vis["start"] + los

    # conditions. CT-only factors (clot burden, coronary calcium) never enter a record: coronary
    # disease is coded from its EHR-visible risk factors, so codes correlate with calcium only
    # as far as those factors do.
    u = rng.random((n_pat, 8))
    athero = _atherosclerosis(pf)
    truth = {
        "cancer": pf["cancer"] > 0,
        "ckd": pf["renal_dysfunction"] > 0.9,
        "copd": pf["chronic_lung_disease"] > 0,
        "heart_failure": pf["cardiac_dysfunction"] > 1.1,
        "diabetes": pf["diabetes"] > 0,
        "hypertension": pf["hypertension"] > 0,
        "smoking": pf["smoking"] > 0,
        "hyperlipidemia": 0.6 * athero + 0.8 * ndtri(np.clip(u[:, 0], 1e-9, 1 - 1e-9)) > 0.2,
        "afib": u[:, 1]
        < 1 / (1 + np.exp(-(-3.0 + 0.06 * (pf["age"] - 65) + 0.5 * pf["cardiac_dysfunction"]))),
        "frailty": pf["frailty"] > 1.0,
        "prior_mi": (athero > 1.0) & (u[:, 2] < 0.4),
        "cad": (athero > 0.7) & (u[:, 3] < 0.7),
        "prior_vte": u[:, 4] < (0.15 if task == "pe" else 0.03),
        "pulmonary_hypertension": pf["pa_dilation"] > 1.3,
    }
    truth["cad"] = truth["cad"] | truth["prior_mi"]
    conds = _Rows()
    coded: dict[str, np.ndarray] = {}
    for group, present in truth.items():
        p_code = np.where(present, site.code_sensitivity, site.false_code_rate)
        has = rng.random(n_pat) < p_code
        coded[group] = has
        n_rows = np.where(has, 1 + rng.poisson(site.repeat_codes, n_pat), 0)
        rp = np.repeat(np.arange(n_pat), n_rows)
        ids = _group_ids(group)
        if group == "cancer":
            # breast cancer code only for women; one code per patient
            choice = rng.integers(0, len(ids), n_pat)
            breast = np.array(
                [c.concept_code.startswith("C50") for c in voc.concepts_in_group(group)]
            )
            choice = np.where(breast[choice] & (pf["male"] > 0), (choice + 1) % len(ids), choice)
        else:
            choice = rng.integers(0, len(ids), n_pat)
        vv = _pick_visits(rng, rp, v_start, n_hist)
        ok = vv >= 0
        conds.add(
            person=rp[ok],
            concept=ids[choice[rp[ok]]],
            visit=vv[ok],
            start=vis["start"][vv[ok]],
            acute=np.zeros(ok.sum(), bool),
        )
    # index-visit codes
    if task == "pe":
        pe_ids = _group_ids("pe")
        cor_pulmonale = np.array([c.concept_code == "I26.09" for c in voc.concepts_in_group("pe")])
        severe = (c.factors["rv_strain"] > 1.0) & (rng.random(len(sp)) < 0.7)
        pe_concept = np.where(severe, pe_ids[cor_pulmonale][0], pe_ids[~cor_pulmonale][0])
        conds.add(
            person=sp,
            concept=pe_concept,
            visit=idx_visit,
            start=i_time,
            acute=np.ones(len(sp), bool),
        )
        p_dysp, p_chest = 0.6, 0.35
    else:
        p_dysp, p_chest = 0.3, (0.7 if inst == "external" else 0.5)
    for group, p in (("dyspnea", p_dysp), ("chest_pain", p_chest)):
        sel = np.flatnonzero(rng.random(len(sp)) < p)
        conds.add(
            person=sp[sel],
            concept=np.full(len(sel), _group_ids(group)[0]),
            visit=idx_visit[sel],
            start=i_time[sel],
            acute=np.ones(len(sel), bool),
        )
    if len(ep):
        kind_group = {1: "mi", 2: "stroke", 3: "heart_failure"}
        eids = np.array([_group_ids(kind_group[k])[0] for k in c.mace_kind[ep]], dtype=np.int64)
        conds.add(
            person=ep, concept=eids, visit=event_visit, start=e_time, acute=np.ones(len(ep), bool)
        )

    # drugs
    chemo_pat = truth["cancer"] & (u[:, 5] < 0.5)
    indication = {
        "anticoagulant": truth["afib"] | truth["prior_vte"],
        "statin": truth["hyperlipidemia"] | truth["cad"],
        "antiplatelet": truth["cad"]
        | truth["prior_mi"]
        | (truth["diabetes"] & (pf["age"] > 60) & (u[:, 6] < 0.3)),
        "beta_blocker": truth["afib"] | truth["heart_failure"] | (truth["cad"] & (u[:, 7] < 0.7)),
        "antihypertensive": truth["hypertension"],
        "loop_diuretic": truth["heart_failure"] | (pf["renal_dysfunction"] > 1.8),
        "diabetes_drug": truth["diabetes"],
        "chemotherapy": chemo_pat,
        "copd_drug": truth["copd"],
        "steroid": (truth["copd"] & (u[:, 0] < 0.3)) | (truth["cancer"] & (u[:, 1] < 0.2)),
    }
    drugs = _Rows()
    for group, ind in indication.items():
        has = rng.random(n_pat) < np.where(ind, site.drug_adherence, 0.01)
        n_rows = np.where(has, 1 + rng.poisson(2.0, n_pat), 0)
        rp = np.repeat(np.arange(n_pat), n_rows)
        ids = _group_ids(group)
        choice = rng.integers(0, len(ids), n_pat)
        vv = _pick_visits(rng, rp, v_start, n_hist)
        ok = vv >= 0
        supply = np.where(rng.random(ok.sum()) < 0.5, 30, 90)
        drugs.add(
            person=rp[ok],
            concept=ids[choice[rp[ok]]],
            visit=vv[ok],
            start=vis["start"][vv[ok]],
            supply=supply,
        )
    if task == "pe":
        sel = np.flatnonzero(rng.random(len(sp)) < 0.95)
        ac = _group_ids("anticoagulant")
        drugs.add(
            person=sp[sel],
            concept=ac[rng.integers(0, len(ac), len(sel))],
            visit=idx_visit[sel],
            start=study_time[sel],
            supply=np.full(len(sel), 90),
        )

    # measurements
    meas = _Rows()
    vit_h = np.flatnonzero(rng.random(n_h) < site.vitals_prob)
    lab_h = np.flatnonzero(rng.random(n_h) < site.labs_prob)
    lab_names = list(voc.LABS)
    vital_names = ("sbp", "heart_rate", "spo2", "bmi")
    hf = truth["heart_failure"]
    per_lab_p = {
        "creatinine": np.ones(n_pat),
        "hemoglobin": np.ones(n_pat),
        "sodium": np.ones(n_pat),
        "cholesterol": np.full(n_pat, 0.4),
        "hdl": np.full(n_pat, 0.4),
        "hba1c": np.where(truth["diabetes"], 0.8, 0.3),
        "ntprobnp": np.where(hf, 0.6, 0.2),
        "troponin": np.full(n_pat, 0.1),
    }
    index_p = {
        "creatinine": 1.0,
        "hemoglobin": 1.0,
        "sodium": 1.0,
        "troponin": 0.9,
        "ntprobnp": 0.8 if task == "pe" else 0.4,
        "cholesterol": 0.1 if task == "pe" else 0.5,
        "hdl": 0.1 if task == "pe" else 0.5,
        "hba1c": 0.1 if task == "pe" else 0.4,
    }
    for name in lab_names:
        lab_i = lab_names.index(name)
        if name in vital_names:
            hv = vit_h
            iv = np.arange(n_i)
        else:
            hv = lab_h[rng.random(len(lab_h)) < per_lab_p[name][vis["person"][lab_h]]]
            iv = np.flatnonzero(rng.random(n_i) < index_p[name])
        meas.add(
            person=vis["person"][hv],
            visit=hv,
            lab=np.full(len(hv), lab_i),
            study=np.full(len(hv), -1),
            start=vis["start"][hv] + 15 * 60,
        )
        meas.add(
            person=sp[iv],
            visit=idx_visit[iv],
            lab=np.full(len(iv), lab_i),
            study=iv,
            start=i_time[iv] + 10 * 60,
        )
    m = meas.get()
    m["value"] = _lab_values(rng, task, m, pf, c.factors, lab_names)

    # procedures
    procs = _Rows()
    proc_plan = (
        ("dialysis", pf["renal_dysfunction"] > 2.0, 3.0, 5.0),
        ("spirometry", truth["copd"] & (rng.random(n_pat) < 0.6), 1.0, 0.3),
        ("echo", (pf["cardiac_dysfunction"] > 0.5) | truth["heart_failure"], 1.0, 0.5),
        ("pci", (truth["cad"] | truth["prior_mi"]) & (rng.random(n_pat) < 0.3), 1.0, 0.0),
        ("chemo_infusion", chemo_pat, 2.0, 3.0),
    )
    for group, ind, base, extra in proc_plan:
        has = ind & (rng.random(n_pat) < site.drug_adherence)
        n_rows = np.where(has, int(base) + rng.poisson(extra, n_pat), 0)
        rp = np.repeat(np.arange(n_pat), n_rows)
        vv = _pick_visits(rng, rp, v_start, n_hist)
        ok = vv >= 0
        procs.add(
            person=rp[ok],
            concept=np.full(ok.sum(), _group_ids(group)[0]),
            visit=vv[ok],
            start=vis["start"][vv[ok]] + 1800,
        )
    ct_group = TASKS[task].index_procedure_group
    procs.add(
        person=sp,
        concept=np.full(len(sp), _group_ids(ct_group)[0]),
        visit=idx_visit,
        start=study_time,
    )

    deaths = np.flatnonzero((death_s >= 0) | (planted_death >= 0))
    death_time = np.where(
        planted_death[deaths] >= 0, planted_death[deaths], death_s[deaths] // 60 * 60
    )
    return {
        "visits": vis,
        "conditions": conds.get(),
        "drugs": drugs.get(),
        "measurements": m,
        "procedures": procs.get(),
        "patients": {
            "obs_start": obs_start.astype(np.int64),
            "obs_end": obs_end.astype(np.int64),
            "first_time": c.first_time,
        },
        "deaths": {"person": deaths, "time": death_time.astype(np.int64)},
        "studies": {"time": study_time, "date": study_date},
    }


def _lab_values(
    rng: np.random.Generator,
    task: str,
    m: dict[str, np.ndarray],
    pf: dict[str, np.ndarray],
    sf: dict[str, np.ndarray],
    lab_names: list[str],
) -> np.ndarray:
    """Lab / vital values in the internal site's units, driven by the EHR-visible factors."""
    athero = _atherosclerosis(pf)
    p = m["person"]
    acute = m["study"] >= 0
    st = np.where(acute, m["study"], 0)
    rv = sf["rv_strain"][st] * acute
    n = len(p)
    noise = rng.standard_normal(n)
    age = pf["age"][p]
    male = pf["male"][p]
    values = np.zeros(n)
    formulas = {
        "creatinine": lambda: (
            (0.85 + 0.15 * male)
            * np.exp(
                0.35 * pf["renal_dysfunction"][p]
                + 0.2 * _relu(pf["renal_dysfunction"][p] - 1.5) ** 2
                + 0.1 * noise
            )
        ),
        "ntprobnp": lambda: np.exp(
            4.3
            + 0.9 * pf["cardiac_dysfunction"][p]
            + 0.7 * rv
            + 0.02 * (age - 60)
            + 0.3 * _relu(pf["renal_dysfunction"][p])
            + 0.5 * noise
        ),
        "troponin": lambda: np.exp(
            -4.5 + 0.7 * rv + 0.3 * pf["cardiac_dysfunction"][p] + 0.6 * noise
        ),
        "hemoglobin": lambda: (
            14.2
            + 1.0 * male
            - 1.3 * pf["cancer"][p]
            - 0.4 * _relu(pf["renal_dysfunction"][p])
            + 1.0 * noise
        ),
        "sodium": lambda: (
            139.5 - 1.5 * _relu(pf["cardiac_dysfunction"][p]) - 0.8 * pf["cancer"][p] + 2.5 * noise
        ),
        "cholesterol": lambda: 185 + 15 * athero[p] + 30 * noise,
        "hdl": lambda: 55 - 8 * male - 4 * pf["diabetes"][p] + 12 * noise,
        "hba1c": lambda: (
            5.4
            + 1.8 * pf["diabetes"][p]
            + 0.2 * pf["diabetes"][p] * np.abs(noise) * 5
            + 0.3 * noise
        ),
        "sbp": lambda: 122 + 16 * pf["hypertension"][p] + 0.3 * (age - 60) + 14 * noise,
        "heart_rate": lambda: 76 + 14 * rv + 3 * pf["frailty"][p] + 11 * noise,
        "spo2": lambda: 97.3 - 2.8 * pf["chronic_lung_disease"][p] - 1.8 * _relu(rv) + 1.3 * noise,
        "bmi": lambda: 28 + 2.5 * pf["diabetes"][p] - 1.5 * pf["cancer"][p] + 4.5 * noise,
    }
    lab = m["lab"]
    for i, name in enumerate(lab_names):
        sel = lab == i
        if sel.any():
            values[sel] = formulas[name]()[sel]
    bounds = {
        "creatinine": (0.3, 15.0),
        "ntprobnp": (5.0, 35000.0),
        "troponin": (0.001, 50.0),
        "hemoglobin": (5.0, 20.0),
        "sodium": (118.0, 160.0),
        "cholesterol": (80.0, 400.0),
        "hdl": (15.0, 120.0),
        "hba1c": (4.0, 14.0),
        "sbp": (75.0, 220.0),
        "heart_rate": (40.0, 170.0),
        "spo2": (70.0, 100.0),
        "bmi": (14.0, 60.0),
    }
    for i, name in enumerate(lab_names):
        sel = lab == i
        lo, hi = bounds[name]
        values[sel] = np.clip(values[sel], lo, hi)
    return values


# ---------------------------------------------------------------- tables


def _ts(seconds: np.ndarray) -> pa.Array:
    return pa.array(
        np.asarray(seconds, dtype=np.int64).astype("datetime64[s]").astype("datetime64[us]"),
        type=pa.timestamp("us"),
    )


def _date(seconds: np.ndarray) -> pa.Array:
    return pa.array(
        (np.asarray(seconds, dtype=np.int64) // _DAY).astype(np.int32), type=pa.int32()
    ).cast(pa.date32())


def _i64(x: Any) -> pa.Array:
    return pa.array(np.asarray(x, dtype=np.int64), type=pa.int64())


def _f64(x: Any) -> pa.Array:
    return pa.array(np.asarray(x, dtype=np.float64), type=pa.float64())


def _str(x: Any) -> pa.Array:
    return pa.array([None if v is None else str(v) for v in x], type=pa.string())


def _round_sig(x: np.ndarray, digits: int = 3) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    mag = np.floor(np.log10(np.maximum(np.abs(x), 1e-12)))
    scale = 10.0 ** (digits - 1 - mag)
    return np.round(x * scale) / scale


def _omop_tables(
    task: str, parts: list[tuple[str, _Cohort, dict[str, Any]]]
) -> dict[str, pa.Table]:
    """Concatenate institutions and assign ids. ``parts``: (institution, cohort, ehr)."""
    lab_names = list(voc.LABS)
    lab_concept = {name: voc.concepts_in_group(name)[0] for name in lab_names}
    cols: dict[str, dict[str, list[Any]]] = {t: {} for t in OMOP_TABLE_NAMES if t != "concept"}

    def put(table: str, **values: Any) -> None:
        for k, v in values.items():
            cols[table].setdefault(k, []).append(np.asarray(v))

    visit_offset = 0
    for inst, c, ehr in parts:
        _, care_site, _ = INSTITUTIONS[inst]
        site = _SITES[inst]
        person_ids = _person_ids(inst, c.n_patients)
        first = np.flatnonzero(c.study_rank == 0)
        age = c.factors["age"][first]
        birth = (c.first_time - np.round(age * 365.25) * _DAY) // _DAY * _DAY
        birth_dt = birth.astype("datetime64[s]").astype("datetime64[D]")
        ymd = birth_dt.astype(object)
        male = c.factors["male"][first] > 0
        put(
            "person",
            person_id=person_ids,
            gender_concept_id=np.where(male, voc.GENDER_MALE, voc.GENDER_FEMALE),
            year_of_birth=np.array([d.year for d in ymd]),
            month_of_birth=np.array([d.month for d in ymd]),
            day_of_birth=np.array([d.day for d in ymd]),
            birth_datetime=birth,
            race_concept_id=np.zeros(c.n_patients, np.int64),
            ethnicity_concept_id=np.zeros(c.n_patients, np.int64),
            person_source_value=np.array(
                [f"{INSTITUTIONS[inst][0]}-{i:06d}" for i in range(c.n_patients)], dtype=object
            ),
            gender_source_value=np.where(male, "M", "F").astype(object),
            care_site_id=np.full(c.n_patients, care_site),
        )
        pts = ehr["patients"]
        put(
            "observation_period",
            person_id=person_ids,
            observation_period_start_date=pts["obs_start"],
            observation_period_end_date=pts["obs_end"],
            period_type_concept_id=np.full(c.n_patients, voc.TYPE_EHR),
        )
        v = ehr["visits"]
        order = np.lexsort((v["start"], v["person"]))
        new_local = np.empty_like(order)
        new_local[order] = np.arange(len(order))
        visit_id = visit_offset + 1 + new_local  # id of each local visit
        put(
            "visit_occurrence",
            visit_occurrence_id=visit_id[order],
            person_id=person_ids[v["person"][order]],
            visit_concept_id=v["concept"][order],
            visit_start_datetime=v["start"][order],
            visit_end_datetime=v["end"][order],
            visit_type_concept_id=np.full(len(order), voc.TYPE_EHR),
            care_site_id=np.full(len(order), care_site),
        )
        visit_offset += len(order)
        cd = ehr["conditions"]
        put(
            "condition_occurrence",
            person_id=person_ids[cd["person"]],
            condition_concept_id=cd["concept"],
            condition_start_datetime=cd["start"],
            acute=cd["acute"],
            visit_occurrence_id=visit_id[cd["visit"]],
        )
        dr = ehr["drugs"]
        put(
            "drug_exposure",
            person_id=person_ids[dr["person"]],
            drug_concept_id=dr["concept"],
            drug_exposure_start_datetime=dr["start"],
            days_supply=dr["supply"],
            visit_occurrence_id=visit_id[dr["visit"]],
        )
        m = ehr["measurements"]
        concept = np.array([lab_concept[lab_names[i]].concept_id for i in m["lab"]], dtype=np.int64)
        value = m["value"].copy()
        unit = np.array([voc.LABS[lab_names[i]].unit for i in m["lab"]], dtype=object)
        low = np.array([voc.LABS[lab_names[i]].low for i in m["lab"]])
        high = np.array([voc.LABS[lab_names[i]].high for i in m["lab"]])
        if site.alt_units:
            for i, name in enumerate(lab_names):
                lab = voc.LABS[name]
                if lab.alt_unit is None:
                    continue
                sel = m["lab"] == i
                value[sel] *= lab.alt_factor
                low[sel] *= lab.alt_factor
                high[sel] *= lab.alt_factor
                unit[sel] = lab.alt_unit
        put(
            "measurement",
            person_id=person_ids[m["person"]],
            measurement_concept_id=concept,
            measurement_datetime=m["start"],
            value_as_number=_round_sig(value, 4),
            unit_source_value=unit,
            range_low=_round_sig(low, 4),
            range_high=_round_sig(high, 4),
            visit_occurrence_id=visit_id[m["visit"]],
        )
        pr = ehr["procedures"]
        put(
            "procedure_occurrence",
            person_id=person_ids[pr["person"]],
            procedure_concept_id=pr["concept"],
            procedure_datetime=pr["start"],
            visit_occurrence_id=visit_id[pr["visit"]],
        )
        de = ehr["deaths"]
        put("death", person_id=person_ids[de["person"]], death_datetime=de["time"])

    cat = {t: {k: np.concatenate(v) for k, v in d.items()} for t, d in cols.items()}
    tables: dict[str, pa.Table] = {}

    p = cat["person"]
    tables["person"] = pa.table(
        {
            "person_id": _i64(p["person_id"]),
            "gender_concept_id": _i64(p["gender_concept_id"]),
            "year_of_birth": _i64(p["year_of_birth"]),
            "month_of_birth": _i64(p["month_of_birth"]),
            "day_of_birth": _i64(p["day_of_birth"]),
            "birth_datetime": _ts(p["birth_datetime"]),
            "race_concept_id": _i64(p["race_concept_id"]),
            "ethnicity_concept_id": _i64(p["ethnicity_concept_id"]),
            "person_source_value": _str(p["person_source_value"]),
            "gender_source_value": _str(p["gender_source_value"]),
            "care_site_id": _i64(p["care_site_id"]),
        }
    )
    o = cat["observation_period"]
    tables["observation_period"] = pa.table(
        {
            "observation_period_id": _i64(np.arange(1, len(o["person_id"]) + 1)),
            "person_id": _i64(o["person_id"]),
            "observation_period_start_date": _date(o["observation_period_start_date"]),
            "observation_period_end_date": _date(o["observation_period_end_date"]),
            "period_type_concept_id": _i64(o["period_type_concept_id"]),
        }
    )
    v = cat["visit_occurrence"]
    tables["visit_occurrence"] = pa.table(
        {
            "visit_occurrence_id": _i64(v["visit_occurrence_id"]),
            "person_id": _i64(v["person_id"]),
            "visit_concept_id": _i64(v["visit_concept_id"]),
            "visit_start_date": _date(v["visit_start_datetime"]),
            "visit_start_datetime": _ts(v["visit_start_datetime"]),
            "visit_end_date": _date(v["visit_end_datetime"]),
            "visit_end_datetime": _ts(v["visit_end_datetime"]),
            "visit_type_concept_id": _i64(v["visit_type_concept_id"]),
            "care_site_id": _i64(v["care_site_id"]),
        }
    )

    def sort(d: dict[str, np.ndarray], keys: tuple[str, ...]) -> dict[str, np.ndarray]:
        order = np.lexsort(tuple(d[k] for k in reversed(keys)))
        return {k: val[order] for k, val in d.items()}

    cd = sort(
        cat["condition_occurrence"],
        ("person_id", "condition_start_datetime", "condition_concept_id", "visit_occurrence_id"),
    )
    n = len(cd["person_id"])
    start_day = cd["condition_start_datetime"] // _DAY * _DAY
    tables["condition_occurrence"] = pa.table(
        {
            "condition_occurrence_id": _i64(np.arange(1, n + 1)),
            "person_id": _i64(cd["person_id"]),
            "condition_concept_id": _i64(cd["condition_concept_id"]),
            "condition_start_date": _date(cd["condition_start_datetime"]),
            "condition_start_datetime": _ts(cd["condition_start_datetime"]),
            "condition_end_date": pa.array(
                np.where(cd["acute"], start_day // _DAY, 0).astype(np.int32),
                type=pa.int32(),
                mask=~cd["acute"].astype(bool),
            ).cast(pa.date32()),
            "condition_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "visit_occurrence_id": _i64(cd["visit_occurrence_id"]),
            "condition_source_value": _str(
                [_CODE_BY_ID[int(i)] for i in cd["condition_concept_id"]]
            ),
        }
    )
    dr = sort(
        cat["drug_exposure"],
        ("person_id", "drug_exposure_start_datetime", "drug_concept_id", "visit_occurrence_id"),
    )
    n = len(dr["person_id"])
    tables["drug_exposure"] = pa.table(
        {
            "drug_exposure_id": _i64(np.arange(1, n + 1)),
            "person_id": _i64(dr["person_id"]),
            "drug_concept_id": _i64(dr["drug_concept_id"]),
            "drug_exposure_start_date": _date(dr["drug_exposure_start_datetime"]),
            "drug_exposure_start_datetime": _ts(dr["drug_exposure_start_datetime"]),
            "drug_exposure_end_date": _date(
                dr["drug_exposure_start_datetime"] + (dr["days_supply"] - 1) * _DAY
            ),
            "drug_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "quantity": _f64(dr["days_supply"].astype(np.float64)),
            "days_supply": _i64(dr["days_supply"]),
            "visit_occurrence_id": _i64(dr["visit_occurrence_id"]),
            "drug_source_value": _str([_CODE_BY_ID[int(i)] for i in dr["drug_concept_id"]]),
        }
    )
    m = sort(
        cat["measurement"],
        ("person_id", "measurement_datetime", "measurement_concept_id", "visit_occurrence_id"),
    )
    n = len(m["person_id"])
    tables["measurement"] = pa.table(
        {
            "measurement_id": _i64(np.arange(1, n + 1)),
            "person_id": _i64(m["person_id"]),
            "measurement_concept_id": _i64(m["measurement_concept_id"]),
            "measurement_date": _date(m["measurement_datetime"]),
            "measurement_datetime": _ts(m["measurement_datetime"]),
            "measurement_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "value_as_number": _f64(m["value_as_number"]),
            "unit_concept_id": _i64(np.zeros(n, np.int64)),
            "unit_source_value": _str(m["unit_source_value"]),
            "range_low": _f64(m["range_low"]),
            "range_high": _f64(m["range_high"]),
            "visit_occurrence_id": _i64(m["visit_occurrence_id"]),
            "measurement_source_value": _str(
                [_CODE_BY_ID[int(i)] for i in m["measurement_concept_id"]]
            ),
        }
    )
    pr = sort(
        cat["procedure_occurrence"],
        ("person_id", "procedure_datetime", "procedure_concept_id", "visit_occurrence_id"),
    )
    n = len(pr["person_id"])
    tables["procedure_occurrence"] = pa.table(
        {
            "procedure_occurrence_id": _i64(np.arange(1, n + 1)),
            "person_id": _i64(pr["person_id"]),
            "procedure_concept_id": _i64(pr["procedure_concept_id"]),
            "procedure_date": _date(pr["procedure_datetime"]),
            "procedure_datetime": _ts(pr["procedure_datetime"]),
            "procedure_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "visit_occurrence_id": _i64(pr["visit_occurrence_id"]),
            "procedure_source_value": _str(
                [_CODE_BY_ID[int(i)] for i in pr["procedure_concept_id"]]
            ),
        }
    )
    de = sort(cat["death"], ("person_id",))
    n = len(de["person_id"])
    tables["death"] = pa.table(
        {
            "person_id": _i64(de["person_id"]),
            "death_date": _date(de["death_datetime"]),
            "death_datetime": _ts(de["death_datetime"]),
            "death_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "cause_concept_id": _i64(np.zeros(n, np.int64)),
            "cause_source_value": pa.nulls(n, type=pa.string()),
        }
    )
    concept = voc.concept_table()
    tables["concept"] = pa.table({k: pa.array(concept[k].tolist()) for k in concept.columns})
    return tables


def _person_ids(inst: str, n: int) -> np.ndarray:
    """OMOP person ids, unique across a task's institutions (care_site_id * 1e6 + k)."""
    return INSTITUTIONS[inst][1] * 1_000_000 + np.arange(1, n + 1, dtype=np.int64)


def _study_ids(task: str, inst: str, n: int) -> list[str]:
    letter = INSTITUTIONS[inst][0][-1]
    return [f"{task}-{letter}-{i:06d}" for i in range(n)]


# ---------------------------------------------------------------- outcomes as recorded


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


# ---------------------------------------------------------------- images


def _render(
    rng: np.random.Generator, job: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Render one CT: (hu float32 (z, y, x), mask uint8, spacing mm, origin mm)."""
    nz, n = job["n_slices"], job["matrix"]
    sz, sp = job["slice_mm"], job["pixel_mm"]
    origin = (-(nz - 1) * sz / 2.0, -(n - 1) * sp / 2.0, -(n - 1) * sp / 2.0)
    z = (origin[0] + sz * np.arange(nz)).astype(np.float32)
    y = (origin[1] + sp * np.arange(n)).astype(np.float32)[:, None]
    x = (origin[2] + sp * np.arange(n)).astype(np.float32)[None, :]
    Z = z[:, None, None]
    contrast = job["contrast"]
    clot = job["clot_burden"]
    rv = float(np.clip(job["rv_strain"], -2.5, 3.5))
    pa_d = float(np.clip(job["pa_dilation"], -2.5, 3.5))
    cal = float(job["coronary_calcium"])
    card = float(np.clip(job["cardiac_dysfunction"], -2.5, 3.5))
    bs = job["body_scale"]

    def ell(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0

    def zr(lo: float, hi: float) -> np.ndarray:
        return ((z >= lo) & (z <= hi))[:, None, None]

    hu = np.full((nz, n, n), -1000.0, np.float32)
    mask = np.zeros((nz, n, n), np.uint8)
    ax, ay = 150.0 * bs, 105.0 * bs
    fat = 8.0 + 12.0 * max(bs - 0.85, 0.0)
    hu[:, ell(0, 0, ax, ay)] = -100.0
    hu[:, ell(0, 0, ax - fat, ay - fat)] = 40.0
    # lungs with low-frequency texture, smaller towards the apex and base
    g = max(n // 8, 1)
    coarse = rng.normal(0.0, 35.0, (nz, g + 1, g + 1)).astype(np.float32)
    iy = (np.arange(n) * g) // n
    texture = coarse[:, iy][:, :, iy]
    lung_scale = np.sqrt(np.clip(1.0 - (z / 140.0) ** 2, 0.2, 1.0))
    lung = np.zeros((nz, n, n), bool)
    for side in (-1.0, 1.0):
        cx, cy = side * 68.0 * bs, 5.0
        for k in range(nz):
            lung[k] |= ell(cx, cy, 50.0 * bs * lung_scale[k], 72.0 * bs * lung_scale[k])
    hu[lung] = (-850.0 + texture)[lung]
    eff = job["effusion"]
    if eff > 0:
        effusion = lung & (y[None] > 5.0 + 72.0 * bs * (1.0 - 2.0 * eff))
        hu[effusion] = 15.0
    # heart and ventricles (lower half of the range)
    heart_z = zr(-60.0, 22.0)
    hs = 1.0 + 0.1 * max(card, 0.0)
    hu[heart_z & ell(18.0, -28.0, 52.0 * hs, 42.0 * hs)[None]] = 45.0
    r_lv = 17.0 * (1.0 + 0.12 * card)
    r_rv = 14.0 * (1.0 + 0.28 * rv)
    lv = heart_z & ell(34.0, -22.0, r_lv, r_lv * 0.9)[None]
    rvm = heart_z & ell(2.0, -46.0, r_rv * 1.1, r_rv * 0.8)[None]
    hu[lv] = 190.0 if contrast else 40.0
    hu[rvm] = 310.0 if contrast else 40.0
    # aorta (ascending, descending)
    aorta_hu = 230.0 if contrast else 40.0
    ascending = zr(-5.0, 60.0) & ell(28.0, -12.0, 14.0, 14.0)[None]
    aorta = ascending | ell(28.0, 45.0, 12.0, 12.0)[None]
    hu[aorta] = aorta_hu
    # pulmonary arteries: trunk, main branches, lobar branches (upper, middle, lower per side)
    segments = _pulmonary_arteries(bs, pa_d)
    artery = np.zeros((nz, n, n), bool)
    X3, Y3 = x[None], y[None]
    for a, b, r in segments.values():
        artery |= _capsule(X3, Y3, Z, a, b, r)
    artery &= ~aorta
    hu[artery] = 320.0 if contrast else 40.0
    # spine
    hu[:, ell(0.0, 72.0 * bs, 19.0, 17.0)] = 800.0
    hu[:, ell(0.0, 72.0 * bs, 15.0, 13.0)] = 620.0
    hu[:, ell(0.0, 72.0 * bs + 24.0, 20.0, 7.0)] = 650.0
    hu[:, ell(0.0, 72.0 * bs + 20.0, 6.0, 6.0)] = 20.0
    # emboli: filling defects in the contrast-filled lumen
    if contrast and np.isfinite(clot):
        for a, b, r, clot_hu in _emboli(rng, float(clot), segments):
            emb = _capsule(X3, Y3, Z, a, b, r + 0.35 * sp) & artery
            hu[emb] = clot_hu
            mask[emb] = 1
    # coronary calcifications on the heart's surface
    lam = 8.0 / (1.0 + math.exp(-1.5 * (cal - 0.5)))
    n_cal = int(rng.poisson(lam))
    for _ in range(min(n_cal, 20)):
        ang = rng.uniform(-2.6, 0.2)
        cx = 18.0 + 52.0 * hs * 0.85 * math.cos(ang)
        cy = -28.0 + 42.0 * hs * 0.85 * math.sin(ang)
        cz = rng.uniform(-45.0, 15.0)
        rc = 2.5 + 1.5 * rng.random() + 0.8 * max(cal, 0.0)
        reach = max(rc, 0.55 * max(sp, sz))
        d2 = (X3 - cx) ** 2 + (Y3 - cy) ** 2 + ((Z - cz) * (reach / max(reach, 0.55 * sz))) ** 2
        spot = (d2 <= reach * reach) & (mask == 0)
        hu[spot] = 400.0 + 600.0 * rng.random()
        mask[spot] = 2
    hu += job["hu_offset"]
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * job["noise_sd"]
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu, mask, (sz, sp, sp), origin


_Point = tuple[float, float, float]


def _pulmonary_arteries(bs: float, pa_d: float) -> dict[str, tuple[_Point, _Point, float]]:
    """Centre lines and radii of the pulmonary arteries: name -> (start, end, radius), mm.

    Points are LPS ``(x, y, z)``; ``bs`` scales the chest width, ``pa_d`` (pulmonary-artery
    dilation, unitless) widens every vessel. The trunk leaves the right ventricle and divides
    at ``z = 28`` mm; each main branch ends at its hilum, where the upper, middle (right) /
    lingular (left) and lower lobar arteries start."""
    r_pa = 12.5 * (1.0 + 0.15 * pa_d)
    r_lobar = 6.5 * (1.0 + 0.1 * pa_d)
    bif = (5.0, -40.0, 28.0)
    out: dict[str, tuple[_Point, _Point, float]] = {
        "trunk": ((5.0, -45.0, 8.0), (5.0, -40.0, 48.0), r_pa)
    }
    for side, name in ((-1.0, "right"), (1.0, "left")):
        hilum = (side * 55.0 * bs, -5.0, 24.0)
        out[f"{name}_main"] = (bif, hilum, 0.75 * r_pa)
        out[f"{name}_upper"] = (hilum, (side * 80.0 * bs, -20.0, 45.0), r_lobar)
        out[f"{name}_middle"] = (hilum, (side * 85.0 * bs, -35.0, 0.0), 0.9 * r_lobar)
        out[f"{name}_lower"] = (hilum, (side * 70.0 * bs, 20.0, -45.0), r_lobar)
    return out


def _emboli(
    rng: np.random.Generator, clot: float, segments: dict[str, tuple[_Point, _Point, float]]
) -> list[tuple[_Point, _Point, float, float]]:
    """Filling defects for a study with clot burden ``clot`` (unitless severity; standard
    normal in the internal population): a list of (start, end, radius mm, HU) capsules, to be
    intersected with the arterial lumen.

    The burden's percentile ``q`` sets how many lobar arteries hold a clot (every one near
    ``q = 1``; always at least one), how long each clot is and how much of the lumen it fills
    (from about half to occlusive); central clots in the main branches become likely above the
    median, and a saddle embolus astride the bifurcation above about +1 sd."""
    q = 0.5 * math.erfc(-clot / math.sqrt(2.0))
    lobar = [k for k in segments if k.endswith(("_upper", "_middle", "_lower"))]
    involved = [k for k in lobar if rng.random() < 0.08 + 0.9 * q]
    if not involved:
        involved = [lobar[int(rng.integers(0, len(lobar)))]]
    involved += [k for k in ("right_main", "left_main") if rng.random() < 1.1 * q**2]
    out = []
    for k in involved:
        a, b, r = segments[k]
        length = float(np.clip(0.3 + 0.6 * q + 0.1 * rng.standard_normal(), 0.2, 1.0))
        t0 = rng.uniform(0.0, 1.0 - length)
        fill = float(np.clip(0.5 + 0.45 * q + 0.08 * rng.standard_normal(), 0.4, 1.0))
        p0 = tuple(a[i] + t0 * (b[i] - a[i]) for i in range(3))
        p1 = tuple(a[i] + (t0 + length) * (b[i] - a[i]) for i in range(3))
        out.append((p0, p1, fill * r, float(rng.uniform(25.0, 65.0))))
    if rng.random() < 1.0 / (1.0 + math.exp(-3.0 * (clot - 1.2))):
        # saddle embolus: astride the bifurcation, reaching into both main branches
        a, _, _ = segments["right_main"]
        r = segments["right_main"][2]
        for k in ("right_main", "left_main"):
            _, b, _ = segments[k]
            end = tuple(a[i] + 0.45 * (b[i] - a[i]) for i in range(3))
            out.append((a, end, 0.85 * r, float(rng.uniform(25.0, 65.0))))
    return out


def _capsule(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    r: float,
) -> np.ndarray:
    """Boolean (z, y, x) mask of points within ``r`` mm of the segment a-b (x, y, z in mm).

    ``X`` (1, 1, nx), ``Y`` (1, ny, 1), ``Z`` (nz, 1, 1): voxel-centre coordinates (float32,
    ascending); only the segment's bounding box is evaluated."""
    out = np.zeros((Z.shape[0], Y.shape[1], X.shape[2]), bool)
    box = []
    for axis, coords in ((0, X.ravel()), (1, Y.ravel()), (2, Z.ravel())):
        lo, hi = min(a[axis], b[axis]) - r, max(a[axis], b[axis]) + r
        box.append(
            slice(int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, "right")))
        )
    sx, sy, sz = box
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return out
    x, y, z = X[:, :, sx], Y[:, sy, :], Z[sz]
    ax, ay, az = (float(v) for v in a)
    dx, dy, dz = (float(b[i]) - float(a[i]) for i in range(3))
    dd = dx * dx + dy * dy + dz * dz
    px, py, pz = x - ax, y - ay, z - az
    t = np.clip((px * dx + py * dy + pz * dz) / dd, 0.0, 1.0)
    out[sz, sy, sx] = (px - t * dx) ** 2 + (py - t * dy) ** 2 + (pz - t * dz) ** 2 <= float(r * r)
    return out


def _render_and_write(job: dict[str, Any]) -> tuple[int, int, int]:
    """Worker: render one study, write the volume and its mask; (study index, voxels 1, 2)."""
    rng = np.random.default_rng([job["seed"], job["task_index"], job["study_index"]])
    hu, mask, spacing, origin = _render(rng, job)
    vol = Volume(hu=hu, spacing=spacing, origin=origin)
    root = Path(job["root"])
    if job["format"] == "nifti":
        write_nifti(vol, root / job["image_path"])
    else:
        write_dicom_series(
            vol,
            root / job["image_path"],
            patient_id=job["patient_id"],
            study_uid=job["study_uid"],
            series_uid=job["series_uid"],
            study_datetime=job["study_datetime"],
            institution_name=job["institution_name"],
            series_description="CTA CHEST PE" if job["contrast"] else "CT CHEST WO",
        )
    np.savez_compressed(root / "ground_truth" / "masks" / f"{job['study_id']}.npz", mask=mask)
    return job["study_index"], int((mask == 1).sum()), int((mask == 2).sum())


def _image_jobs(
    task: str,
    task_index: int,
    seed: int,
    root: Path,
    parts: list[tuple[str, _Cohort, dict[str, Any], list[str]]],
) -> list[dict[str, Any]]:
    spec = _SPECS[task]
    jobs = []
    k = 0
    for inst, c, ehr, study_ids in parts:
        site = _SITES[inst]
        name, _, fmt = INSTITUTIONS[inst]
        rng = np.random.default_rng([seed, task_index, 0 if inst == "internal" else 1, 3])
        body = np.clip(1.0 + 0.08 * rng.standard_normal(c.n_patients), 0.8, 1.25)
        pids = _person_ids(inst, c.n_patients)
        f = c.factors
        # pleural effusion: heart failure, or an unrelated cause (never an EHR-only factor)
        other = (rng.random(len(c.study_patient)) < 0.12) * rng.random(len(c.study_patient))
        effusion = np.clip(0.07 * (f["cardiac_dysfunction"] - 0.8) + 0.12 * other, 0.0, 0.35)
        for s in range(len(c.study_patient)):
            p = c.study_patient[s]
            sid = study_ids[s]
            when = ehr["studies"]["time"][s].astype("datetime64[s]").astype(object)
            jobs.append(
                {
                    "seed": seed,
                    "task_index": task_index,
                    "study_index": k,
                    "study_id": sid,
                    "root": str(root),
                    "format": fmt,
                    "image_path": _image_path(name, sid, fmt),
                    "patient_id": str(pids[p]),
                    "study_uid": generate_uid(entropy_srcs=["twin", str(seed), task, sid, "study"]),
                    "series_uid": generate_uid(
                        entropy_srcs=["twin", str(seed), task, sid, "series"]
                    ),
                    "study_datetime": when,
                    "institution_name": name,
                    "contrast": spec.contrast,
                    "clot_burden": float(f["clot_burden"][s]),
                    "rv_strain": float(f["rv_strain"][s]),
                    "pa_dilation": float(f["pa_dilation"][s]),
                    "coronary_calcium": float(f["coronary_calcium"][s]),
                    "cardiac_dysfunction": float(f["cardiac_dysfunction"][s]),
                    "effusion": float(effusion[s]),
                    "body_scale": float(body[p]),
                    "noise_sd": site.noise_sd,
                    "hu_offset": site.hu_offset,
                    "slice_mm": site.slice_mm,
                    "n_slices": site.n_slices,
                    "pixel_mm": site.pixel_mm,
                    "matrix": site.matrix,
                }
            )
            k += 1
    return jobs


def _image_path(site_name: str, study_id: str, fmt: str) -> str:
    if fmt == "nifti":
        return f"images/{site_name}/{study_id}.nii.gz"
    return f"images/{site_name}/{study_id}"


def _run_jobs(
    jobs: list[dict[str, Any]], workers: int, progress: bool, label: str
) -> list[tuple[int, int, int]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=label, unit="study")
    results = []
    if workers <= 1 or len(jobs) < 64:
        for job in jobs:
            results.append(_render_and_write(job))
            if bar is not None:
                bar.update(1)
    else:
        # fork: workers need nothing from the caller's __main__ (spawn would re-import it)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for res in pool.map(_render_and_write, jobs, chunksize=32):
                results.append(res)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(results)


# ---------------------------------------------------------------- public entry point


def _check_sizes(profile: str, n_override: dict[str, int] | None) -> dict[str, dict[str, int]]:
    if profile not in PROFILES:
        raise ValueError(f"generate: profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    sizes = {t: dict(v) for t, v in PROFILES[profile].items()}
    if n_override is not None:
        unknown = set(n_override) - set(INSTITUTIONS)
        if unknown:
            raise ValueError(
                f"generate: n_override keys must be among internal, external; got {sorted(unknown)}"
            )
        for inst, n in n_override.items():
            if not isinstance(n, int | np.integer) or n < 5:
                raise ValueError(
                    f"generate: n_override[{inst!r}] must be an integer >= 5 studies, got {n!r}"
                )
            for t in sizes:
                sizes[t][inst] = int(n)
    return sizes


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def generate(
    out_dir: str | os.PathLike[str],
    *,
    profile: str = "quick",
    seed: int = 0,
    image_share: float = 0.5,
    tasks: tuple[str, ...] | list[str] = ("pe", "mace"),
    n_override: dict[str, int] | None = None,
    progress: bool = False,
    images: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the digital twin under ``out_dir/<task>/`` and return its summary.

    ``profile``: ``"quick"`` or ``"paper"`` (numbers of CT studies per institution, see
    ``PROFILES``); ``n_override`` (e.g. ``{"internal": 40, "external": 20}``) replaces them
    for every task. ``seed``: int >= 0; equal arguments give identical parquet files.
    ``image_share`` in [0, 1] (``data.synthetic.image_share`` in the manifest): how the
    non-interaction part of the true log-hazard is split between the modalities. The log-hazard
    is ``beta * (sqrt(s) * image + sqrt(1 - s) * ehr + interaction)`` with ``image`` and
    ``ehr`` standardised (mean 0, sd 1 in the internal reference population) and built from
    factors the CT, respectively the records, show; so ``s`` is the image part's share of
    their variance. At ``s = 0`` the CT part contributes nothing (``image_part`` is 0), at
    ``s = 1`` the EHR part nothing (``ehr_part`` is 0); the cross-modal interaction (a CT
    factor times an EHR factor, see the module docstring) stays, so fusion can help at any
    ``s``. ``images=False`` writes everything but the volumes and masks (the imaging index
    then points at files that do not exist). ``workers``: processes rendering volumes
    (default: up to 2); results do not depend on it.

    Each task is written to ``out_dir/<task>.tmp`` and renamed at the end, replacing an older
    twin. The summary, also written to ``out_dir/<task>/twin.json``, maps ``tasks`` ->
    task -> counts, event rates (observed event fraction within the task horizon, from the
    records), oracle C-index of ``true_log_hazard`` (``helpers.metrics.harrell_c`` on the
    studies a cohort builder keeps), defects and wall time.
    """
    t_all = time.perf_counter()
    sizes = _check_sizes(profile, n_override)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"generate: seed must be an integer >= 0, got {seed!r}")
    image_share = float(image_share)
    if not 0.0 <= image_share <= 1.0:
        raise ValueError(f"generate: image_share must be in [0, 1], got {image_share}")
    tasks = tuple(tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"generate: unknown task {t!r}; expected some of {', '.join(TASKS)}")
    n_workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "out_dir": str(out),
        "tasks": {},
    }
    for t in tasks:
        task_index = list(TASKS).index(t)
        summary["tasks"][t] = _generate_task(
            out,
            t,
            task_index,
            int(seed),
            image_share,
            profile,
            sizes[t],
            images,
            n_workers,
            progress,
        )
    summary["wall_time_s"] = round(time.perf_counter() - t_all, 3)
    return summary


def _generate_task(
    out: Path,
    task: str,
    task_index: int,
    seed: int,
    image_share: float,
    profile: str,
    sizes: dict[str, int],
    images: bool,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = _SPECS[task]
    tmp = out / f"{task}.tmp"
    final = out / task
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "omop").mkdir(parents=True)
    (tmp / "ground_truth" / "masks").mkdir(parents=True)
    std = _standardiser(task, spec, seed, task_index)

    parts = []
    for inst in INSTITUTIONS:
        c = _simulate_cohort(task, task_index, inst, sizes[inst], seed, image_share, std)
        ehr = _build_ehr(task, inst, c, seed, task_index)
        parts.append((inst, c, ehr, _study_ids(task, inst, len(c.study_patient))))
    t_sim = time.perf_counter() - t0

    tables = _omop_tables(task, [(i, c, e) for i, c, e, _ in parts])
    for name, table in tables.items():
        pq.write_table(table, tmp / "omop" / f"{name}.parquet")

    index_cols: dict[str, list[Any]] = {k: [] for k in IMAGING_INDEX_COLUMNS}
    gt: dict[str, list[Any]] = {}
    rates: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for inst, c, ehr, sids in parts:
        name, _, fmt = INSTITUTIONS[inst]
        pids = _person_ids(inst, c.n_patients)[c.study_patient]
        index_cols["study_id"] += sids
        index_cols["person_id"].append(pids)
        index_cols["institution"] += [name] * len(sids)
        index_cols["study_datetime"].append(ehr["studies"]["time"])
        index_cols["image_path"] += [_image_path(name, s, fmt) for s in sids]
        index_cols["image_format"] += [fmt] * len(sids)
        rec = _recorded_outcomes(task, c, ehr)
        valid = rec["valid"]
        true_time = c.event_time[c.study_patient] - c.study_offset
        cols = {
            "study_id": np.array(sids, dtype=object),
            "person_id": pids,
            "institution": np.array([name] * len(sids), dtype=object),
            **{k: c.factors[k] for k in FACTOR_COLUMNS},
            **c.hazard,
            "true_event_time_days": true_time,
            "first_event_is_death": c.fatal[c.study_patient],
            "recorded_time_days": rec["time"],
            "recorded_event": rec["event"],
            "defect": c.defect,
        }
        for k, v in cols.items():
            gt.setdefault(k, []).append(np.asarray(v))
        rates[name] = {
            "target_event_fraction": spec.target_rate[inst],
            "observed_event_fraction": round(float(rec["event"][valid].mean()), 4),
            "oracle_c_index": round(
                _oracle_c(
                    rec["time"][valid], rec["event"][valid], c.hazard["true_log_hazard"][valid]
                ),
                4,
            ),
            "baseline_log_hazard": round(c.baseline, 6),
        }
        counts[name] = {
            "studies": int(len(sids)),
            "patients": int(c.n_patients),
            "events": int(rec["event"][valid].sum()),
            "defects": {
                d: int((c.defect == d).sum()) for d in ("zero_follow_up", "death_before_index")
            },
        }

    index_table = pa.table(
        {
            "study_id": pa.array(index_cols["study_id"], type=pa.string()),
            "person_id": _i64(np.concatenate(index_cols["person_id"])),
            "institution": pa.array(index_cols["institution"], type=pa.string()),
            "study_datetime": _ts(np.concatenate(index_cols["study_datetime"])),
            "image_path": pa.array(index_cols["image_path"], type=pa.string()),
            "image_format": pa.array(index_cols["image_format"], type=pa.string()),
        }
    )
    pq.write_table(index_table, tmp / "imaging_index.parquet")
    gt_cat = {k: np.concatenate(v) for k, v in gt.items()}
    gt_table = pa.table(
        {
            k: (pa.array(v.tolist(), type=pa.string()) if v.dtype == object else pa.array(v))
            for k, v in gt_cat.items()
        }
    )
    pq.write_table(gt_table, tmp / "ground_truth" / "factors.parquet")

    t_img = time.perf_counter()
    if images:
        for inst in INSTITUTIONS:
            (tmp / "images" / INSTITUTIONS[inst][0]).mkdir(parents=True)
        jobs = _image_jobs(task, task_index, seed, tmp, parts)
        res = _run_jobs(jobs, workers, progress, f"{task} CT")
        pq.write_table(
            pa.table(
                {
                    "study_id": pa.array(
                        [jobs[i]["study_id"] for i, _, _ in res], type=pa.string()
                    ),
                    "embolus_voxels": _i64([r[1] for r in res]),
                    "calcification_voxels": _i64([r[2] for r in res]),
                }
            ),
            tmp / "ground_truth" / "lesions.parquet",
        )
    t_img = time.perf_counter() - t_img

    info = {
        "generator_version": GENERATOR_VERSION,
        "task": task,
        "parameters": {
            "profile": profile,
            "seed": seed,
            "image_share": image_share,
            "sizes": sizes,
            "images": images,
        },
        "counts": counts,
        "event_rates": rates,
        "omop_rows": {k: int(v.num_rows) for k, v in tables.items()},
        "timing_s": {
            "simulate": round(t_sim, 3),
            "images": round(t_img, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    info["disk_bytes"] = _dir_bytes(tmp)
    (tmp / "twin.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return info
