"""The twin's patients: latent factors, their copula, what each modality shows and the true
log-hazard built from them.

``FACTOR_COLUMNS`` names the factors, ``VISIBILITY`` the modalities that show each; the
population of each task (``_SPECS``: ages, prevalences, the external site's shift, the
paper's event rates, the hazard's scale) and the copula's correlations are set here.
``_log_hazard`` splits the true log-hazard into its CT-exclusive, EHR-exclusive, shared and
interaction parts (see the package docstring); ``factor_effects`` tabulates how each factor
enters it and ``information_balance`` what each group of factors explains of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import ndtri

from helpers.tasks import DEFAULT_INTERACTION, TASKS

__all__ = ["FACTOR_COLUMNS", "VISIBILITY", "GROUPS", "INTERACTIONS", "PARTS", "SHARED_WEIGHT", "factor_effects",
           "information_balance"]

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


# The groups the log-hazard is built from: factors only the CT shows, only the records show,
# and both show. The copula correlates factors only within a group.
GROUPS: dict[str, tuple[str, ...]] = {
    "ct": tuple(k for k, v in VISIBILITY.items() if v == ("ct",)),
    "ehr": tuple(k for k, v in VISIBILITY.items() if v == ("ehr",)),
    "shared": tuple(k for k, v in VISIBILITY.items() if set(v) == {"ct", "ehr"}),
}
_GROUP_OF = {k: g for g, names in GROUPS.items() for k in names}

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
        beta=1.0,
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
        beta=1.1,
        contrast=False,
    ),
}



# Pairwise correlations of the copula's latent normals (unlisted pairs: 0). Factors correlate
# only within their group (``GROUPS``: CT-exclusive, EHR-exclusive, shared): a factor only one
# modality shows must leave no trace in the other, not even through a correlated factor, or
# ``image_share`` would not split the information between the modalities (a clinical
# correlation such as clot burden with RV strain, or coronary calcium with age, is given up for
# that).
_CORRELATIONS: dict[tuple[str, str], float] = {
    ("age", "renal_dysfunction"): 0.35,
    ("age", "frailty"): 0.45,
    ("age", "hypertension"): 0.35,
    ("age", "diabetes"): 0.20,
    ("age", "cancer"): 0.15,
    ("chronic_lung_disease", "smoking"): 0.45,
    ("cancer", "frailty"): 0.25,
    ("cancer", "smoking"): 0.20,
    ("renal_dysfunction", "diabetes"): 0.25,
    ("renal_dysfunction", "hypertension"): 0.25,
    ("cardiac_dysfunction", "pa_dilation"): 0.30,
    ("rv_strain", "pa_dilation"): 0.30,
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


_RELU_MEAN = 1.0 / math.sqrt(2.0 * math.pi)  # E[max(Z, 0)] for a standard normal Z


# The cross-modal interaction of each task: a CT-exclusive factor times a continuous
# EHR-exclusive one (pe: a large clot kills the frail; mace: coronary calcium matters more
# with kidney disease).
INTERACTIONS: dict[str, tuple[str, str]] = {
    "pe": ("clot_burden", "frailty"),
    "mace": ("coronary_calcium", "renal_dysfunction"),
}
# gamma: the weight of the shared part (factors both modalities show), fixed at every image share.
SHARED_WEIGHT = 0.5
PARTS: tuple[str, ...] = ("ct_part", "ehr_part", "shared_part", "interaction_part")


def _raw_parts(task: str, f: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Unstandardised parts of the log-hazard: ``ct`` (CT-exclusive factors), ``ehr``
    (EHR-exclusive), ``shared`` (factors both show) and ``interaction`` (the product of the
    task's ``INTERACTIONS`` pair)."""
    if task == "pe":
        ct = f["clot_burden"] + 0.3 * _relu(f["clot_burden"]) ** 2
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
        )
        shared = (
            0.6 * f["rv_strain"]
            + 0.3 * _relu(f["rv_strain"]) ** 2
            + 0.3 * f["pa_dilation"]
            + 0.35 * f["cardiac_dysfunction"]
        )
    else:
        ct = f["coronary_calcium"] + 0.25 * _relu(f["coronary_calcium"]) ** 2
        ehr = (
            0.06 * (f["age"] - 63.0)
            + 0.3 * f["male"]
            + 0.45 * f["diabetes"]
            + 0.35 * f["hypertension"]
            + 0.3 * f["smoking"]
            + 0.3 * f["renal_dysfunction"]
            + 0.1 * _relu(f["renal_dysfunction"]) ** 2
            + 0.3 * f["frailty"]
            + 0.2 * f["cancer"]
            + 0.1 * f["chronic_lung_disease"]
        )
        shared = 0.5 * f["cardiac_dysfunction"] + 0.2 * f["pa_dilation"] + 0.15 * f["rv_strain"]
    a, b = INTERACTIONS[task]
    if task == "pe":
        # only a large clot in a frail patient: the positive parts, each centred on its
        # population mean so that the product stays orthogonal to every single-factor term
        return {"ct": ct, "ehr": ehr, "shared": shared,
                "interaction": (_relu(f[a]) - _RELU_MEAN) * (_relu(f[b]) - _RELU_MEAN)}
    return {"ct": ct, "ehr": ehr, "shared": shared, "interaction": f[a] * f[b]}


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
    """Means and sds of the raw parts (``_raw_parts``) in the internal reference population."""

    moments: dict[str, tuple[float, float]]

    def __call__(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: (raw[k] - m) / sd for k, (m, sd) in self.moments.items()}


def _standardiser(task: str, spec: _TaskSpec, seed: int, task_index: int) -> _Standardiser:
    rng = np.random.default_rng([seed, task_index, 7919])
    raw = _raw_parts(task, _study_factors(task, _draw_factors(rng, spec, _REFERENCE_N, {})))
    return _Standardiser({k: (float(v.mean()), float(v.std())) for k, v in raw.items()})


def _log_hazard(
    task: str,
    spec: _TaskSpec,
    f: dict[str, np.ndarray],
    std: _Standardiser,
    image_share: float,
    interaction: float,
) -> dict[str, np.ndarray]:
    """The true log-hazard of factors ``f`` and its parts (``PARTS``):
    ``beta * (sqrt(s) * ct + sqrt(1 - s) * ehr + gamma * shared + kappa * interaction)``, each
    part standardised on the internal reference population, ``s = image_share``, ``gamma =
    SHARED_WEIGHT``, ``kappa = interaction``."""
    z = std(_raw_parts(task, f))
    parts = {
        "ct_part": spec.beta * math.sqrt(image_share) * z["ct"],
        "ehr_part": spec.beta * math.sqrt(1.0 - image_share) * z["ehr"],
        "shared_part": spec.beta * SHARED_WEIGHT * z["shared"],
        "interaction_part": spec.beta * interaction * z["interaction"],
    }
    parts["true_log_hazard"] = sum(parts[k] for k in PARTS)
    return parts


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
    ``group`` (``GROUPS``: ``ct``, ``ehr`` or ``shared``); ``term``: mean change of the
    log-hazard's additive part (natural-log units, after ``beta``, the ``image_share`` weights
    and gamma) per unit of the factor (per year for ``age``, from 0 to 1 for binary factors),
    over the internal reference population; ``interaction``: ``"core"`` (the CT factor of the
    cross-modal interaction), ``"modifier"`` (its EHR factor) or ``""`` (every factor when the
    ``interaction`` weight, kappa, is 0). Positive = higher hazard.

    >>> rows = {r["factor"]: r for r in factor_effects("mace", image_share=0.5)}
    >>> rows["coronary_calcium"]["interaction"], rows["renal_dysfunction"]["interaction"]
    ('core', 'modifier')
    >>> rows["coronary_calcium"]["group"], rows["age"]["group"], rows["cardiac_dysfunction"]["group"]
    ('ct', 'ehr', 'shared')
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
    weights = {
        "ct": spec.beta * math.sqrt(image_share),
        "ehr": spec.beta * math.sqrt(1.0 - image_share),
        "shared": spec.beta * SHARED_WEIGHT,
    }

    def additive(g: dict[str, np.ndarray]) -> np.ndarray:
        z = std(_raw_parts(task, g))
        return sum(w * z[k] for k, w in weights.items())

    base = additive(f)
    rows = []
    for name in FACTOR_COLUMNS:
        if np.isnan(f[name]).all():
            continue
        if name in _BINARY:
            lo, hi = dict(f), dict(f)
            lo[name], hi[name] = np.zeros_like(f[name]), np.ones_like(f[name])
            term = float(np.mean(additive(hi) - additive(lo)))
        else:
            moved = dict(f)
            moved[name] = f[name] + 0.1
            term = float(np.mean(additive(moved) - base)) / 0.1
        core, modifier = INTERACTIONS[task]
        rows.append(
            {
                "factor": name,
                "ct": "ct" in VISIBILITY[name],
                "ehr": "ehr" in VISIBILITY[name],
                "group": _GROUP_OF[name],
                "term": round(term, 3),
                "interaction": {core: "core", modifier: "modifier"}.get(name, "") if coupled else "",
            }
        )
    return rows


def _design(frame: Any, names: list[str]) -> np.ndarray:
    """Columns 1, x and x^2 (x alone for binary factors) of the factors ``names`` of ``frame``."""
    columns = [np.ones(len(frame))]
    for name in names:
        x = np.asarray(frame[name], dtype=float)
        columns.append(x)
        if name not in _BINARY:
            columns.append(x**2)
    return np.column_stack(columns)


def _r2(y: np.ndarray, x: np.ndarray) -> float:
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    resid = y - x @ coef
    return float(1.0 - resid.var() / y.var()) if y.var() > 0 else float("nan")


def information_balance(frame: Any, task: str, *, column: str = "true_log_hazard") -> dict[str, float]:
    """How much of ``column`` (in ``frame``, one row per study with the factor columns) each
    group of factors explains: the R^2 of a least-squares fit on the factors with their squares
    (binary factors alone) of the CT-exclusive factors (``ct_exclusive``), the EHR-exclusive
    ones (``ehr_exclusive``), everything each modality shows (``ct_visible``, ``ehr_visible``)
    and all factors (``additive``); ``non_additive`` is 1 - ``additive``, the share no sum of
    single-factor terms captures. Factors that are missing for the task (pe's clot burden in
    mace) are left out. With ``scan_log_hazard`` in ``frame`` (the ground truth's columns),
    only the studies whose own factors made the true log-hazard are fitted: a later pe study
    shows a new clot but keeps its patient's first outcome.
    """
    present = [k for k in FACTOR_COLUMNS if k in frame and np.isfinite(np.asarray(frame[k], dtype=float)).all()]
    missing = [k for k in FACTOR_COLUMNS if k not in frame and k != "clot_burden"]
    if missing:
        raise ValueError(f"information_balance: frame lacks the factor column(s) {', '.join(missing)}")
    if column not in frame:
        raise ValueError(f"information_balance: frame lacks the column {column!r}")
    if "scan_log_hazard" in frame and column == "true_log_hazard":
        # a later pe study shows a new clot but keeps the first study's outcome: only the rows
        # whose own factors made their log-hazard (first studies, every mace study) are fitted
        own = np.isclose(np.asarray(frame["scan_log_hazard"], dtype=float), np.asarray(frame[column], dtype=float),
                         rtol=0.0, atol=1e-9)
        frame = frame[own] if hasattr(frame, "loc") else {k: np.asarray(v)[own] for k, v in frame.items()}
    y = np.asarray(frame[column], dtype=float)
    sets = {
        "ct_exclusive": [k for k in present if VISIBILITY[k] == ("ct",)],
        "ehr_exclusive": [k for k in present if VISIBILITY[k] == ("ehr",)],
        "ct_visible": [k for k in present if "ct" in VISIBILITY[k]],
        "ehr_visible": [k for k in present if "ehr" in VISIBILITY[k]],
        "additive": present,
    }
    out = {name: round(_r2(y, _design(frame, names)), 4) for name, names in sets.items()}
    out["non_additive"] = round(1.0 - out["additive"], 4)
    return out
