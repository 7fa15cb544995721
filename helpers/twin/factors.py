"""The twin's patients: latent factors, their copula, what each modality shows and the true
log-hazard built from them.

``FACTOR_COLUMNS`` names the factors, ``VISIBILITY`` the modalities that show each; the
population of each task (``_SPECS``: ages, prevalences, the external site's shift, the
paper's event rates, the hazard's scale) and the copula's correlations are set here.
``_log_hazard`` splits the true log-hazard into its image, EHR and interaction parts (see the
package docstring); ``factor_effects`` tabulates how each factor enters it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri

from helpers.tasks import DEFAULT_INTERACTION, TASKS

__all__ = ["FACTOR_COLUMNS", "VISIBILITY", "factor_effects"]

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
        contrast=False,
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
    task: str,
    spec: _TaskSpec,
    f: dict[str, np.ndarray],
    std: _Standardiser,
    image_share: float,
    interaction: float,
) -> dict[str, np.ndarray]:
    """The true log-hazard of factors ``f`` and its parts; ``interaction`` is kappa, the weight
    of the standardised CT core times the EHR modifier (before ``beta``)."""
    image, ehr, core, modifier = _raw_parts(task, f)
    img = (image - std.image[0]) / std.image[1]
    e = (ehr - std.ehr[0]) / std.ehr[1]
    inter = interaction * (core - std.core[0]) / std.core[1] * modifier
    image_part = spec.beta * math.sqrt(image_share) * img
    ehr_part = spec.beta * math.sqrt(1.0 - image_share) * e
    inter_part = spec.beta * inter
    return {
        "image_part": image_part,
        "ehr_part": ehr_part,
        "interaction_part": inter_part,
        "true_log_hazard": image_part + ehr_part + inter_part,
    }


def _check_interaction(interaction: Any, caller: str) -> float:
    """``interaction`` (kappa) as a float, or a ``ValueError`` naming it unless it is a finite
    number >= 0.

    >>> _check_interaction(0.35, "generate")
    0.35
    >>> _check_interaction(-1, "generate")
    Traceback (most recent call last):
    ...
    ValueError: generate: interaction must be a finite number >= 0, got -1
    """
    try:
        value = float(interaction)
    except (TypeError, ValueError):
        value = float("nan")
    if isinstance(interaction, bool) or not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"{caller}: interaction must be a finite number >= 0, got {interaction!r}")
    return value


def factor_effects(
    task: str,
    image_share: float = 0.5,
    seed: int = 0,
    interaction: float = DEFAULT_INTERACTION,
) -> list[dict[str, Any]]:
    """How each factor enters ``task``'s true log-hazard, one dict per factor.

    Keys: ``factor``; ``ct`` / ``ehr`` (bool: the modality shows it, see ``VISIBILITY``);
    ``image_term`` / ``ehr_term``: mean change of the image / EHR part of the log-hazard
    (natural-log units, after ``beta`` and the ``image_share`` weights) per unit of the
    factor (per year for ``age``, from 0 to 1 for binary factors), over the internal
    reference population; ``interaction``: ``"core"`` (the CT factor of the cross-modal
    interaction), ``"modifier"`` (the EHR factor) or ``""`` (every factor when the
    ``interaction`` weight, kappa, is 0). Positive = higher hazard.

    >>> rows = {r["factor"]: r for r in factor_effects("mace", image_share=0.5)}
    >>> rows["coronary_calcium"]["interaction"], rows["diabetes"]["interaction"]
    ('core', 'modifier')
    >>> {r["interaction"] for r in factor_effects("mace", interaction=0.0)}
    {''}
    """
    if task not in _SPECS:
        raise ValueError(
            f"factor_effects: unknown task {task!r}; expected one of {', '.join(_SPECS)}"
        )
    if not 0.0 <= float(image_share) <= 1.0:
        raise ValueError(f"factor_effects: image_share must be in [0, 1], got {image_share}")
    coupled = _check_interaction(interaction, "factor_effects") > 0.0
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
                "interaction": ("core" if diff[2] else ("modifier" if diff[3] else ""))
                if coupled
                else "",
            }
        )
    return rows
