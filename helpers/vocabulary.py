"""The small clinical vocabulary shared by the digital twin and the curated EHR features.

Codes are real codes from their source vocabularies (ICD-10-CM for diagnoses, RxNorm
ingredients for drugs, LOINC for labs and vitals, CPT4 for procedures). Their OMOP
``concept_id`` values are *local* ids (OMOP reserves ids above 2,000,000,000 for site-specific
concepts), because the Athena vocabulary cannot be shipped here; the well-known standard ids
for gender, visit type and record provenance are the real ones. Feature definitions select
concepts by ``(vocabulary_id, concept_code)`` through the ``concept`` table, never by
``concept_id``, so they work unchanged on a real OMOP database whose ``concept`` table carries
these codes.

Each concept has a ``group``: the clinical idea the twin uses to emit it and the features use
to read it (for example every lung-cancer code is in group ``cancer``).
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

__all__ = [
    "Concept",
    "Lab",
    "CONCEPTS",
    "LABS",
    "GENDER_MALE",
    "GENDER_FEMALE",
    "VISIT_INPATIENT",
    "VISIT_OUTPATIENT",
    "VISIT_ER",
    "TYPE_EHR",
    "LOCAL_ID_BASE",
    "OMOP_TABLES",
    "concept_table",
    "concepts_in_group",
]

LOCAL_ID_BASE = 2_000_000_000

# The OMOP CDM v5.4 tables the study reads (and the digital twin writes).
OMOP_TABLES: tuple[str, ...] = (
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "drug_exposure",
    "measurement",
    "procedure_occurrence",
    "death",
    "concept",
)

# Standard OMOP concept ids (real values from the OMOP standardized vocabularies).
GENDER_MALE = 8507
GENDER_FEMALE = 8532
VISIT_INPATIENT = 9201
VISIT_OUTPATIENT = 9202
VISIT_ER = 9203
TYPE_EHR = 32817


@dataclass(frozen=True)
class Concept:
    """One concept: ``domain_id`` is the OMOP domain (Condition, Drug, Measurement, ...)."""

    concept_id: int
    domain_id: str
    vocabulary_id: str
    concept_code: str
    concept_name: str
    group: str


@dataclass(frozen=True)
class Lab:
    """A measurement with its unit and reference range (in the internal site's unit).

    ``alt_unit`` and ``alt_factor`` describe how another site may report it:
    ``value_in_alt_unit = value * alt_factor``.
    """

    code: str
    unit: str
    low: float
    high: float
    alt_unit: str | None = None
    alt_factor: float = 1.0


_RAW: list[tuple[str, str, str, str, str]] = [
    # domain, vocabulary, code, name, group
    ("Condition", "ICD10CM", "I26.99", "Other pulmonary embolism without acute cor pulmonale", "pe"),
    ("Condition", "ICD10CM", "I26.09", "Other pulmonary embolism with acute cor pulmonale", "pe"),
    ("Condition", "ICD10CM", "Z86.711", "Personal history of pulmonary embolism", "prior_vte"),
    ("Condition", "ICD10CM", "C34.90", "Malignant neoplasm of unspecified part of unspecified bronchus or lung", "cancer"),
    ("Condition", "ICD10CM", "C50.919", "Malignant neoplasm of unspecified site of unspecified female breast", "cancer"),
    ("Condition", "ICD10CM", "C18.9", "Malignant neoplasm of colon, unspecified", "cancer"),
    ("Condition", "ICD10CM", "C25.9", "Malignant neoplasm of pancreas, unspecified", "cancer"),
    ("Condition", "ICD10CM", "N18.30", "Chronic kidney disease, stage 3 unspecified", "ckd"),
    ("Condition", "ICD10CM", "N18.4", "Chronic kidney disease, stage 4 (severe)", "ckd"),
    ("Condition", "ICD10CM", "J44.9", "Chronic obstructive pulmonary disease, unspecified", "copd"),
    ("Condition", "ICD10CM", "J84.10", "Pulmonary fibrosis, unspecified", "copd"),
    ("Condition", "ICD10CM", "I50.9", "Heart failure, unspecified", "heart_failure"),
    ("Condition", "ICD10CM", "I50.22", "Chronic systolic (congestive) heart failure", "heart_failure"),
    ("Condition", "ICD10CM", "I21.9", "Acute myocardial infarction, unspecified", "mi"),
    ("Condition", "ICD10CM", "I25.2", "Old myocardial infarction", "prior_mi"),
    ("Condition", "ICD10CM", "I25.10", "Atherosclerotic heart disease of native coronary artery without angina pectoris", "cad"),
    ("Condition", "ICD10CM", "I63.9", "Cerebral infarction, unspecified", "stroke"),
    ("Condition", "ICD10CM", "E11.9", "Type 2 diabetes mellitus without complications", "diabetes"),
    ("Condition", "ICD10CM", "I10", "Essential (primary) hypertension", "hypertension"),
    ("Condition", "ICD10CM", "E78.5", "Hyperlipidemia, unspecified", "hyperlipidemia"),
    ("Condition", "ICD10CM", "I48.91", "Unspecified atrial fibrillation", "afib"),
    ("Condition", "ICD10CM", "R54", "Age-related physical debility", "frailty"),
    ("Condition", "ICD10CM", "Z74.01", "Bed confinement status", "frailty"),
    ("Condition", "ICD10CM", "F17.210", "Nicotine dependence, cigarettes, uncomplicated", "smoking"),
    ("Condition", "ICD10CM", "I27.20", "Pulmonary hypertension, unspecified", "pulmonary_hypertension"),
    ("Condition", "ICD10CM", "R07.9", "Chest pain, unspecified", "chest_pain"),
    ("Condition", "ICD10CM", "R06.02", "Shortness of breath", "dyspnea"),
    ("Drug", "RxNorm", "1364430", "apixaban", "anticoagulant"),
    ("Drug", "RxNorm", "1114195", "rivaroxaban", "anticoagulant"),
    ("Drug", "RxNorm", "11289", "warfarin", "anticoagulant"),
    ("Drug", "RxNorm", "67108", "enoxaparin", "anticoagulant"),
    ("Drug", "RxNorm", "83367", "atorvastatin", "statin"),
    ("Drug", "RxNorm", "301542", "rosuvastatin", "statin"),
    ("Drug", "RxNorm", "1191", "aspirin", "antiplatelet"),
    ("Drug", "RxNorm", "6918", "metoprolol", "beta_blocker"),
    ("Drug", "RxNorm", "29046", "lisinopril", "antihypertensive"),
    ("Drug", "RxNorm", "17767", "amlodipine", "antihypertensive"),
    ("Drug", "RxNorm", "4603", "furosemide", "loop_diuretic"),
    ("Drug", "RxNorm", "6809", "metformin", "diabetes_drug"),
    ("Drug", "RxNorm", "274783", "insulin glargine", "diabetes_drug"),
    ("Drug", "RxNorm", "40048", "carboplatin", "chemotherapy"),
    ("Drug", "RxNorm", "56946", "paclitaxel", "chemotherapy"),
    ("Drug", "RxNorm", "69120", "tiotropium", "copd_drug"),
    ("Drug", "RxNorm", "435", "albuterol", "copd_drug"),
    ("Drug", "RxNorm", "8640", "prednisone", "steroid"),
    ("Measurement", "LOINC", "2160-0", "Creatinine [Mass/volume] in Serum or Plasma", "creatinine"),
    ("Measurement", "LOINC", "33762-6", "NT-proBNP [Mass/volume] in Serum or Plasma", "ntprobnp"),
    ("Measurement", "LOINC", "10839-9", "Troponin I.cardiac [Mass/volume] in Serum or Plasma", "troponin"),
    ("Measurement", "LOINC", "718-7", "Hemoglobin [Mass/volume] in Blood", "hemoglobin"),
    ("Measurement", "LOINC", "2951-2", "Sodium [Moles/volume] in Serum or Plasma", "sodium"),
    ("Measurement", "LOINC", "2093-3", "Cholesterol [Mass/volume] in Serum or Plasma", "cholesterol"),
    ("Measurement", "LOINC", "2085-9", "HDL Cholesterol [Mass/volume] in Serum or Plasma", "hdl"),
    ("Measurement", "LOINC", "4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "hba1c"),
    ("Measurement", "LOINC", "8480-6", "Systolic blood pressure", "sbp"),
    ("Measurement", "LOINC", "8867-4", "Heart rate", "heart_rate"),
    ("Measurement", "LOINC", "59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry", "spo2"),
    ("Measurement", "LOINC", "39156-5", "Body mass index (BMI) [Ratio]", "bmi"),
    ("Procedure", "CPT4", "71275", "Computed tomographic angiography, chest", "ctpa"),
    ("Procedure", "CPT4", "71250", "Computed tomography, thorax; without contrast material", "ct_chest"),
    ("Procedure", "CPT4", "90935", "Hemodialysis procedure with single evaluation", "dialysis"),
    ("Procedure", "CPT4", "94010", "Spirometry", "spirometry"),
    ("Procedure", "CPT4", "93306", "Echocardiography, transthoracic, complete", "echo"),
    ("Procedure", "CPT4", "92928", "Percutaneous transcatheter placement of intracoronary stent", "pci"),
    ("Procedure", "CPT4", "96413", "Chemotherapy administration, intravenous infusion", "chemo_infusion"),
]

CONCEPTS: tuple[Concept, ...] = tuple(
    Concept(LOCAL_ID_BASE + i + 1, dom, voc, code, name, group)
    for i, (dom, voc, code, name, group) in enumerate(_RAW)
)

# Labs keyed by group, with units and reference ranges at the internal site.
LABS: dict[str, Lab] = {
    "creatinine": Lab("2160-0", "mg/dL", 0.6, 1.3, alt_unit="umol/L", alt_factor=88.42),
    "ntprobnp": Lab("33762-6", "pg/mL", 0.0, 300.0),
    "troponin": Lab("10839-9", "ng/mL", 0.0, 0.04, alt_unit="ng/L", alt_factor=1000.0),
    "hemoglobin": Lab("718-7", "g/dL", 12.0, 17.5, alt_unit="g/L", alt_factor=10.0),
    "sodium": Lab("2951-2", "mmol/L", 135.0, 145.0),
    "cholesterol": Lab("2093-3", "mg/dL", 0.0, 200.0, alt_unit="mmol/L", alt_factor=1 / 38.67),
    "hdl": Lab("2085-9", "mg/dL", 40.0, 1000.0, alt_unit="mmol/L", alt_factor=1 / 38.67),
    "hba1c": Lab("4548-4", "%", 4.0, 5.7),
    "sbp": Lab("8480-6", "mm[Hg]", 90.0, 130.0),
    "heart_rate": Lab("8867-4", "/min", 50.0, 100.0),
    "spo2": Lab("59408-5", "%", 92.0, 100.0),
    "bmi": Lab("39156-5", "kg/m2", 18.5, 30.0),
}


def concepts_in_group(group: str) -> list[Concept]:
    """All concepts of one ``group``; raises ``KeyError`` naming the group if there are none."""
    found = [c for c in CONCEPTS if c.group == group]
    if not found:
        known = sorted({c.group for c in CONCEPTS})
        raise KeyError(f"no concept in group {group!r}; known groups: {', '.join(known)}")
    return found


def concept_table() -> pd.DataFrame:
    """The OMOP ``concept`` table (CDM v5.4 columns) for the vocabulary above.

    >>> t = concept_table()
    >>> t.loc[t.concept_code == "I21.9", "vocabulary_id"].item()
    'ICD10CM'
    """
    rows = [
        {
            "concept_id": c.concept_id,
            "concept_name": c.concept_name,
            "domain_id": c.domain_id,
            "vocabulary_id": c.vocabulary_id,
            "concept_class_id": c.domain_id,
            "standard_concept": "S",
            "concept_code": c.concept_code,
        }
        for c in CONCEPTS
    ]
    fixed = [
        (GENDER_MALE, "MALE", "Gender", "Gender", "M"),
        (GENDER_FEMALE, "FEMALE", "Gender", "Gender", "F"),
        (VISIT_INPATIENT, "Inpatient Visit", "Visit", "Visit", "IP"),
        (VISIT_OUTPATIENT, "Outpatient Visit", "Visit", "Visit", "OP"),
        (VISIT_ER, "Emergency Room Visit", "Visit", "Visit", "ER"),
        (TYPE_EHR, "EHR", "Type Concept", "Type Concept", "OMOP4976890"),
    ]
    for cid, name, dom, voc, code in fixed:
        rows.append(
            {
                "concept_id": cid,
                "concept_name": name,
                "domain_id": dom,
                "vocabulary_id": voc,
                "concept_class_id": dom,
                "standard_concept": "S",
                "concept_code": code,
            }
        )
    return pd.DataFrame(rows).astype({"concept_id": "int64"})
