"""The twin's records: each institution's record keeping and the OMOP CDM tables it writes.

``INSTITUTIONS`` maps the institution keys (``internal``, ``external``) to their site name,
``care_site_id`` and image format; ``_SITES`` holds each one's record keeping (history,
visit rates, coding sensitivity, lab units) and scanner. ``_build_ehr`` writes one
institution's observation periods, visits, conditions, drugs, measurements, procedures and
deaths from its simulated cohort (``outcomes``); ``_omop_tables`` joins the institutions,
assigns the OMOP ids and returns the tables named in ``OMOP_TABLE_NAMES``. No factor is
written into a table: the records show them only through codes, drugs and values.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
from scipy.special import ndtri

from helpers import vocabulary as voc
from helpers.tasks import SHIFTS, TASKS
from helpers.twin.factors import _relu
from helpers.twin.outcomes import _DAY, _Cohort, _group_ids

__all__ = ["INSTITUTIONS", "OMOP_TABLE_NAMES", "SITE_SHIFTS"]

# institution key -> (site name, care_site_id, image format)
INSTITUTIONS: dict[str, tuple[str, int, str]] = {
    "internal": ("site_a", 1, "nifti"),
    "external": ("site_b", 2, "dicom"),
}


OMOP_TABLE_NAMES: tuple[str, ...] = voc.OMOP_TABLES + voc.VOCABULARY_TABLES


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


# Which of the external site's traits a site shift takes over from it; every other trait is
# the internal site's. ``none``: the external population (its own patients, with the case-mix
# of ``helpers.twin.factors._SPECS``) recorded and scanned as at the internal site; ``all``:
# the external site as it is (the study's default). The single shifts separate what the
# external site changes, so that the mechanism study can show which shift hurts which
# strategy. Follow-up visits belong to record keeping but never change a recorded outcome
# (deaths and outcome codes are written whatever the site).
SITE_SHIFTS: dict[str, tuple[str, ...]] = {
    "none": (),
    "hu_offset": ("hu_offset",),
    "noise": ("noise_sd",),
    "slice_thickness": ("slice_mm", "n_slices", "pixel_mm"),
    "ehr_completeness": ("history_years", "visits_per_year", "min_history_visits", "code_sensitivity",
                         "false_code_rate", "repeat_codes", "drug_adherence", "vitals_prob", "labs_prob",
                         "followup_visits_per_year"),
    "lab_units": ("alt_units",),
    "all": tuple(f for f in _Site.__dataclass_fields__),
}


assert tuple(SITE_SHIFTS) == SHIFTS, "helpers.tasks.SHIFTS names the site shifts"


def _site(inst: str, shift: str = "all") -> _Site:
    """Institution ``inst``'s site under ``shift`` (a key of ``SITE_SHIFTS``): the internal
    site is always itself; the external one takes only the shift's traits from its own."""
    if shift not in SITE_SHIFTS:
        raise ValueError(f"site shift must be one of {', '.join(SITE_SHIFTS)}, got {shift!r}")
    if inst == "internal" or shift == "all":
        return _SITES[inst]
    own = _SITES[inst]
    return replace(_SITES["internal"], **{f: getattr(own, f) for f in SITE_SHIFTS[shift]})


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




_CODE_BY_ID = {c.concept_id: c.concept_code for c in voc.CONCEPTS + voc.STANDARD_CONCEPTS}
# the concept a record carries in its *_concept_id, by the concept the twin drew (ICD-10-CM ->
# SNOMED CT or 0, ingredient -> clinical drug; helpers.vocabulary.standard_concept_id)
_STANDARD_ID = {c.concept_id: voc.standard_concept_id(c) for c in voc.CONCEPTS}


def _standard(ids: np.ndarray) -> np.ndarray:
    return np.array([_STANDARD_ID[int(i)] for i in ids], dtype=np.int64)


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
    task: str, inst: str, c: _Cohort, seed: int, task_index: int, shift: str = "all"
) -> dict[str, dict[str, np.ndarray]]:
    """All OMOP rows of one institution, with local visit indices (ids assigned later);
    ``shift``: the site shift (``SITE_SHIFTS``)."""
    site = _site(inst, shift)
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
    task: str, parts: list[tuple[str, _Cohort, dict[str, Any]]], shift: str = "all"
) -> dict[str, pa.Table]:
    """Concatenate institutions and assign ids. ``parts``: (institution, cohort, ehr);
    ``shift``: the site shift (``SITE_SHIFTS``)."""
    lab_names = list(voc.LABS)
    lab_concept = {name: voc.concepts_in_group(name)[0] for name in lab_names}
    cols: dict[str, dict[str, list[Any]]] = {t: {} for t in voc.OMOP_TABLES if t != "concept"}

    def put(table: str, **values: Any) -> None:
        for k, v in values.items():
            cols[table].setdefault(k, []).append(np.asarray(v))

    visit_offset = 0
    for inst, c, ehr in parts:
        _, care_site, _ = INSTITUTIONS[inst]
        site = _site(inst, shift)
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
            "condition_concept_id": _i64(_standard(cd["condition_concept_id"])),
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
            "condition_source_concept_id": _i64(cd["condition_concept_id"]),
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
            "drug_concept_id": _i64(_standard(dr["drug_concept_id"])),
            "drug_exposure_start_date": _date(dr["drug_exposure_start_datetime"]),
            "drug_exposure_start_datetime": _ts(dr["drug_exposure_start_datetime"]),
            "drug_exposure_end_date": _date(
                dr["drug_exposure_start_datetime"] + (dr["days_supply"] - 1) * _DAY
            ),
            "drug_type_concept_id": _i64(np.full(n, voc.TYPE_EHR)),
            "quantity": _f64(dr["days_supply"].astype(np.float64)),
            "days_supply": _i64(dr["days_supply"]),
            "visit_occurrence_id": _i64(dr["visit_occurrence_id"]),
            "drug_source_value": _str([_CODE_BY_ID[_STANDARD_ID[int(i)]] for i in dr["drug_concept_id"]]),
            "drug_source_concept_id": _i64(np.zeros(n, np.int64)),
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
            "unit_concept_id": _i64(np.array([voc.UCUM[u] for u in m["unit_source_value"]], dtype=np.int64)),
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
    for name, frame in (("concept", voc.concept_table()), ("concept_ancestor", voc.concept_ancestor_table()),
                        ("concept_relationship", voc.concept_relationship_table())):
        tables[name] = pa.table({k: pa.array(frame[k].tolist()) for k in frame.columns})
    return tables


def _person_ids(inst: str, n: int) -> np.ndarray:
    """OMOP person ids, unique across a task's institutions (care_site_id * 1e6 + k)."""
    return INSTITUTIONS[inst][1] * 1_000_000 + np.arange(1, n + 1, dtype=np.int64)


def _study_ids(task: str, inst: str, n: int) -> list[str]:
    letter = INSTITUTIONS[inst][0][-1]
    return [f"{task}-{letter}-{i:06d}" for i in range(n)]
