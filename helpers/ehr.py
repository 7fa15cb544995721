"""Curated one-hot EHR features (the paper's "manually curated 1-hot encoding").

Each task has a readable declaration: a list of ``Feature`` rows, each a binary indicator
computed from the OMOP records *before* the index CT over a stated look-back window:
demographics, diagnoses, medications, procedures, and labs or vitals binned against their
reference range. The PE list follows the variables of the PESI score; the MACE list those of
the PREVENT equations. ``features_table(task)`` shows the declaration; ``onehot_features``
computes it with DuckDB.

Which records a feature may read (the index rule; the same as the MEDS / clmbr_mini path):
a condition, drug, procedure or measurement record is used only if it is strictly before the
study's ``index_time`` (the CT acquisition time):

* when its datetime column (``condition_start_datetime``, ``drug_exposure_start_datetime``,
  ``procedure_datetime``, ``measurement_datetime``) exists and is not null, it is used iff
  ``datetime < index_time``;
* otherwise (datetime null, or the column absent) it is used iff its date
  (``condition_start_date``, ``drug_exposure_start_date``, ``procedure_date``,
  ``measurement_date``) is strictly before the index date: a date-only record of the index day
  may have been written after the scan, so it is never used.

Nothing recorded at the scan (same instant) or later, on the index day or after, reaches a
feature. Within that, a record also has to fall in the feature's look-back window: its date
(the datetime's date when the date is null) is on or after ``index date - lookback_days``.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import pandas as pd

from helpers.concepts import concept_set, matched_sql, resolve
from helpers.tasks import get_task
from helpers.vocabulary import GENDER_MALE, LABS

__all__ = ["Feature", "FEATURES", "features_table", "onehot_features", "OnehotResult"]


@dataclass(frozen=True)
class Feature:
    """One binary feature.

    ``kind`` is ``age`` (age at index >= ``threshold`` years), ``sex`` (male), ``condition``,
    ``drug`` or ``procedure`` (any record of ``group`` strictly before the index CT and dated
    on or after ``index date - lookback_days``), or ``lab`` (the last value of ``group`` in
    that window is above (``direction="high"``) or below (``"low"``) ``threshold``, in the
    unit of ``helpers.vocabulary.LABS``; ``threshold=None`` means the reference range's
    bound). "Strictly before the index CT" is the module's index rule: ``datetime <
    index_time`` when the record's datetime is known, else ``date < index date``.
    """

    name: str
    kind: str
    group: str = ""
    lookback_days: int = 0
    direction: str = ""
    threshold: float | None = None
    why: str = ""


_YEAR = 365
_HISTORY = 5 * 365

_COMMON: list[Feature] = [
    Feature("age_ge_50", "age", threshold=50, why="age"),
    Feature("age_ge_65", "age", threshold=65, why="age"),
    Feature("age_ge_80", "age", threshold=80, why="age (PESI: age > 80 in sPESI)"),
    Feature("male", "sex", why="sex"),
    Feature("dx_heart_failure", "condition", "heart_failure", _HISTORY, why="chronic heart failure"),
    Feature("dx_ckd", "condition", "ckd", _HISTORY, why="chronic kidney disease"),
    Feature("dx_diabetes", "condition", "diabetes", _HISTORY, why="diabetes"),
    Feature("dx_hypertension", "condition", "hypertension", _HISTORY, why="hypertension"),
    Feature("dx_afib", "condition", "afib", _HISTORY, why="atrial fibrillation"),
    Feature("dx_smoking", "condition", "smoking", _HISTORY, why="current smoking"),
    Feature("rx_loop_diuretic", "drug", "loop_diuretic", _YEAR, why="diuretic treatment"),
    Feature("lab_creatinine_high", "lab", "creatinine", _YEAR, "high", why="renal function"),
    Feature("lab_ntprobnp_high", "lab", "ntprobnp", _YEAR, "high", why="cardiac strain"),
    Feature("px_dialysis", "procedure", "dialysis", _HISTORY, why="end-stage renal disease"),
]

FEATURES: dict[str, list[Feature]] = {
    "pe": _COMMON
    + [
        Feature("dx_cancer", "condition", "cancer", _HISTORY, why="PESI: cancer"),
        Feature("dx_chronic_lung", "condition", "copd", _HISTORY, why="PESI: chronic lung disease"),
        Feature("dx_prior_vte", "condition", "prior_vte", _HISTORY, why="prior venous thromboembolism"),
        Feature("dx_frailty", "condition", "frailty", _HISTORY, why="frailty / immobility"),
        Feature("dx_pulmonary_hypertension", "condition", "pulmonary_hypertension", _HISTORY, why="pulmonary hypertension"),
        Feature("rx_chemotherapy", "drug", "chemotherapy", _YEAR, why="active cancer treatment"),
        Feature("rx_anticoagulant", "drug", "anticoagulant", _YEAR, why="prior anticoagulation"),
        Feature("rx_steroid", "drug", "steroid", _YEAR, why="systemic steroids"),
        Feature("px_chemo_infusion", "procedure", "chemo_infusion", _YEAR, why="active cancer treatment"),
        Feature("lab_heart_rate_ge_110", "lab", "heart_rate", 30, "high", 110.0, why="PESI: pulse >= 110/min"),
        Feature("lab_sbp_lt_100", "lab", "sbp", 30, "low", 100.0, why="PESI: systolic BP < 100 mmHg"),
        Feature("lab_spo2_lt_90", "lab", "spo2", 30, "low", 90.0, why="PESI: O2 saturation < 90%"),
        Feature("lab_troponin_high", "lab", "troponin", 30, "high", why="myocardial injury"),
        Feature("lab_hemoglobin_low", "lab", "hemoglobin", _YEAR, "low", why="anaemia"),
        Feature("lab_sodium_low", "lab", "sodium", _YEAR, "low", why="hyponatraemia"),
    ],
    "mace": _COMMON
    + [
        Feature("dx_prior_mi", "condition", "prior_mi", _HISTORY, why="prior myocardial infarction"),
        Feature("dx_cad", "condition", "cad", _HISTORY, why="coronary artery disease"),
        Feature("dx_hyperlipidemia", "condition", "hyperlipidemia", _HISTORY, why="hyperlipidaemia"),
        Feature("rx_statin", "drug", "statin", _YEAR, why="PREVENT: statin use"),
        Feature("rx_antihypertensive", "drug", "antihypertensive", _YEAR, why="PREVENT: antihypertensive use"),
        Feature("rx_antiplatelet", "drug", "antiplatelet", _YEAR, why="antiplatelet therapy"),
        Feature("rx_diabetes_drug", "drug", "diabetes_drug", _YEAR, why="diabetes treatment"),
        Feature("px_pci", "procedure", "pci", _HISTORY, why="prior coronary intervention"),
        Feature("lab_sbp_ge_140", "lab", "sbp", _YEAR, "high", 140.0, why="PREVENT: systolic BP"),
        Feature("lab_cholesterol_high", "lab", "cholesterol", _YEAR, "high", why="PREVENT: total cholesterol"),
        Feature("lab_hdl_low", "lab", "hdl", _YEAR, "low", why="PREVENT: HDL cholesterol"),
        Feature("lab_hba1c_high", "lab", "hba1c", _YEAR, "high", 6.5, why="PREVENT: HbA1c"),
        Feature("lab_bmi_ge_30", "lab", "bmi", _YEAR, "high", why="PREVENT: BMI"),
    ],
}


def features_table(task: str) -> pd.DataFrame:
    """The declaration of ``task``'s features as a table (for the book)."""
    get_task(task)
    rows = []
    for f in FEATURES[task]:
        if f.kind == "lab":
            lab = LABS[f.group]
            bound = f.threshold if f.threshold is not None else (lab.high if f.direction == "high" else lab.low)
            rule = f"last {f.group} {'>' if f.direction == 'high' else '<'} {bound:g} {lab.unit} (LOINC {lab.code})"
        elif f.kind == "age":
            rule = f"age at index >= {f.threshold:g} years"
        elif f.kind == "sex":
            rule = "gender concept MALE"
        else:
            rule = f"any {f.kind} in concept set {f.group}: {concept_set(f.group).describe()}"
        window = f"{f.lookback_days} days" if f.lookback_days else "at index"
        rows.append({"feature": f.name, "rule": rule, "look-back": window, "rationale": f.why})
    return pd.DataFrame(rows)


@dataclass(frozen=True)
class OnehotResult:
    """``features``: one row per study (``study_id`` then one 0/1 float32 column per feature);
    ``unusable_measurements``: lab rows in a look-back window that could not be used (unit not
    recognised or value missing), counted by lab and unit."""

    features: pd.DataFrame
    unusable_measurements: pd.DataFrame


# feature kind -> OMOP domain of its concept sets (helpers.concepts)
_DOMAIN = {"condition": "Condition", "drug": "Drug", "procedure": "Procedure", "lab": "Measurement"}

# feature kind -> OMOP table, concept column, datetime column, date column
_RECORDS: dict[str, tuple[str, str, str, str]] = {
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_datetime", "condition_start_date"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_datetime", "drug_exposure_start_date"),
    "procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_datetime", "procedure_date"),
    "lab": ("measurement", "measurement_concept_id", "measurement_datetime", "measurement_date"),
}


@dataclass(frozen=True)
class _Timing:
    """SQL over a record ``t`` joined to its study ``s`` (``_studies``): ``before`` is the
    index rule (module docstring), ``day`` the record's date for the look-back window, ``at``
    its time for ordering (a date-only record at 23:59:59 of its day, as in ``helpers.meds``)."""

    before: str
    day: str
    at: str


def _timing(con, table: str, dt_col: str, date_col: str, alias: str = "t") -> _Timing:
    columns = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
    dt = f"CAST({alias}.{dt_col} AS TIMESTAMP)" if dt_col in columns else None
    date = f"CAST({alias}.{date_col} AS DATE)" if date_col in columns else None
    if dt and date:
        return _Timing(
            before=f"(CASE WHEN {dt} IS NOT NULL THEN {dt} < s.index_time ELSE {date} < s.index_day END)",
            day=f"coalesce({date}, CAST({dt} AS DATE))",
            at=f"coalesce({dt}, CAST({date} AS TIMESTAMP) + INTERVAL 86399 SECOND)",
        )
    if dt:
        return _Timing(before=f"{dt} < s.index_time", day=f"CAST({dt} AS DATE)", at=dt)
    if date:
        return _Timing(before=f"{date} < s.index_day", day=date,
                       at=f"CAST({date} AS TIMESTAMP) + INTERVAL 86399 SECOND")
    raise ValueError(f"OMOP table {table!r} has neither {dt_col!r} nor {date_col!r}: cannot place its records in time")


def _flags(con, kind: str, features: list[Feature]) -> pd.DataFrame:
    if not features:
        return pd.DataFrame(columns=["study_id", "name"])
    table, _, dt_col, date_col = _RECORDS[kind]
    timing = _timing(con, table, dt_col, date_col)
    resolve(con, sorted({f.group for f in features}))
    windows = ", ".join(f"('{f.name}', '{f.group}', {int(f.lookback_days)})" for f in features)
    query = f"""
        WITH feats(name, grp, lookback) AS (VALUES {windows}),
             t AS ({matched_sql(con, _DOMAIN[kind])})
        SELECT DISTINCT s.study_id, feats.name
        FROM _studies s
        JOIN t ON t.person_id = s.person_key
        JOIN feats ON feats.grp = t.grp
        WHERE {timing.before}
          AND {timing.day} >= s.index_day - feats.lookback * INTERVAL 1 DAY
    """
    return con.execute(query).df()


# A unit as exports spell it, compared without case, surrounding spaces or the micro sign's
# spelling ("MG/DL ", "mg/dl" and "mg/dL" are one unit; "µmol/L" is "umol/L").
_UNIT_KEY_SQL = "replace(replace(lower(trim({})), 'µ', 'u'), 'μ', 'u')"


def _unit_key(unit: str) -> str:
    """The key ``_UNIT_KEY_SQL`` gives ``unit``.

    >>> _unit_key(" µmol/L"), _unit_key("MG/DL")
    ('umol/l', 'mg/dl')
    """
    return unit.strip().lower().replace("µ", "u").replace("μ", "u")


def _labs(con, features: list[Feature]) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not features:
        return pd.DataFrame(columns=["study_id", "name"]), pd.DataFrame(columns=["lab", "unit", "rows"])
    table, _, dt_col, date_col = _RECORDS["lab"]
    timing = _timing(con, table, dt_col, date_col, alias="m")
    groups = sorted({f.group for f in features})
    resolve(con, groups)
    columns = {row[0] for row in con.execute("DESCRIBE measurement").fetchall()}
    units = ", ".join(
        f"('{g}', '{LABS[g].unit}', '{_unit_key(LABS[g].unit)}', 1.0)"
        + (f", ('{g}', '{LABS[g].alt_unit}', '{_unit_key(LABS[g].alt_unit)}', {LABS[g].alt_factor!r})"
           if LABS[g].alt_unit else "")
        for g in groups
    )
    windows = ", ".join(f"('{f.name}', '{f.group}', {int(f.lookback_days)})" for f in features)
    unit_concept = "m.unit_concept_id" if "unit_concept_id" in columns else "NULL::BIGINT"
    unit_text = "m.unit_source_value" if "unit_source_value" in columns else "NULL::VARCHAR"
    # a lab's unit: its UCUM concept (unit_concept_id), else its text (unit_source_value)
    base = f"""
        WITH declared(grp, ucum, unit_key, factor) AS (VALUES {units}),
             units AS (SELECT d.grp, d.unit_key, d.factor, c.concept_id AS unit_concept_id FROM declared d
                       LEFT JOIN concept c ON c.vocabulary_id = 'UCUM' AND c.concept_code = d.ucum),
             feats(name, grp, lookback) AS (VALUES {windows}),
             m AS ({matched_sql(con, "Measurement")}),
             rows AS (
                SELECT s.study_id, feats.name, m.grp, {timing.at} AS at, m.measurement_id,
                       m.value_as_number AS value, coalesce({unit_text}, CAST({unit_concept} AS VARCHAR)) AS unit,
                       nullif({unit_concept}, 0) AS unit_concept_id,
                       {_UNIT_KEY_SQL.format(unit_text)} AS unit_key
                FROM _studies s
                JOIN m ON m.person_id = s.person_key
                JOIN feats ON feats.grp = m.grp
                WHERE {timing.before}
                  AND {timing.day} >= s.index_day - feats.lookback * INTERVAL 1 DAY)
    """
    unit_match = ("u.grp = r.grp AND (r.unit_concept_id = u.unit_concept_id "
                  "OR (r.unit_concept_id IS NULL AND r.unit_key = u.unit_key))")
    values = con.execute(
        base
        + """
        SELECT r.study_id, r.name, arg_max(r.value / u.factor, (r.at, r.measurement_id)) AS value
        FROM rows r JOIN units u ON """ + unit_match + """
        WHERE r.value IS NOT NULL
        GROUP BY r.study_id, r.name
        """
    ).df()
    unusable = con.execute(
        base
        + """
        SELECT r.grp AS lab, coalesce(r.unit, '(none)') AS unit, count(DISTINCT r.measurement_id) AS rows
        FROM rows r LEFT JOIN units u ON """ + unit_match + """
        WHERE u.grp IS NULL OR r.value IS NULL
        GROUP BY ALL ORDER BY lab, unit
        """
    ).df()
    by_name = {f.name: f for f in features}
    hits = []
    for row in values.itertuples(index=False):
        f = by_name[row.name]
        lab = LABS[f.group]
        if f.direction == "high":
            on = row.value > (f.threshold if f.threshold is not None else lab.high)
        else:
            on = row.value < (f.threshold if f.threshold is not None else lab.low)
        if on:
            hits.append((row.study_id, row.name))
    return pd.DataFrame(hits, columns=["study_id", "name"]), unusable


def onehot_features(con: duckdb.DuckDBPyConnection, cohort: pd.DataFrame, task: str) -> OnehotResult:
    """Compute ``task``'s one-hot features for every study of ``cohort``.

    ``con`` is a DuckDB connection with the OMOP views (``helpers.cohort.connect_omop``);
    ``cohort`` needs ``study_id``, ``person_id`` and ``index_time``. A condition, drug,
    procedure or measurement record enters a feature only if it is strictly before the index
    CT: ``datetime < index_time`` when its ``*_datetime`` is present and not null, else
    ``date < index date`` (a date-only record of the index day is never used); and only if
    its date is within the feature's look-back window. Age is taken at the index date.
    """
    get_task(task)
    features = FEATURES[task]
    studies = pd.DataFrame(
        {
            "study_id": cohort["study_id"].astype(str).to_numpy(),
            "person_key": pd.to_numeric(cohort["person_id"]).astype("int64").to_numpy(),
            "index_date": pd.to_datetime(cohort["index_time"]).dt.normalize().to_numpy(),
            "index_day": pd.to_datetime(cohort["index_time"]).dt.date.to_numpy(),  # DuckDB DATE
            "index_time": pd.to_datetime(cohort["index_time"]).to_numpy(),
        }
    )
    con.register("_studies", studies)
    try:
        parts = [_flags(con, kind, [f for f in features if f.kind == kind])
                 for kind in ("condition", "drug", "procedure")]
        labs, unusable = _labs(con, [f for f in features if f.kind == "lab"])
        parts.append(labs)
        person = con.execute(
            """SELECT s.study_id, p.gender_concept_id AS gender,
                      date_diff('day', make_date(p.year_of_birth::INT, coalesce(p.month_of_birth, 7)::INT,
                                                 coalesce(p.day_of_birth, 1)::INT), s.index_date) / 365.25 AS age
               FROM _studies s JOIN person p ON p.person_id = s.person_key"""
        ).df()
    finally:
        con.unregister("_studies")
    for f in features:
        if f.kind == "age":
            parts.append(pd.DataFrame({"study_id": person.loc[person.age >= f.threshold, "study_id"], "name": f.name}))
        elif f.kind == "sex":
            parts.append(pd.DataFrame({"study_id": person.loc[person.gender == GENDER_MALE, "study_id"], "name": f.name}))
    hits = pd.concat([p for p in parts if len(p)], ignore_index=True) if any(len(p) for p in parts) else pd.DataFrame(columns=["study_id", "name"])
    matrix = np.zeros((len(studies), len(features)), dtype=np.float32)
    row_of = {sid: i for i, sid in enumerate(studies["study_id"])}
    col_of = {f.name: j for j, f in enumerate(features)}
    for sid, name in hits[["study_id", "name"]].itertuples(index=False):
        matrix[row_of[sid], col_of[name]] = 1.0
    table = pd.DataFrame(matrix, columns=[f.name for f in features])
    table.insert(0, "study_id", studies["study_id"].to_numpy())
    return OnehotResult(features=table, unusable_measurements=unusable)
