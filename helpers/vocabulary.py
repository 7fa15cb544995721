"""The small clinical vocabulary shared by the digital twin and the curated EHR features.

Codes are real codes from their vocabularies: ICD-10-CM for diagnoses as recorded (source
concepts), SNOMED CT for the standard condition concepts they map to (``MAPS_TO``), RxNorm
ingredients and the clinical drugs the twin records (``CLINICAL_DRUGS``), LOINC for labs and
vitals, UCUM for their units, CPT4 for procedures. Their OMOP ``concept_id`` values are
*local* ids (OMOP reserves ids above 2,000,000,000 for site-specific concepts), because the
Athena vocabulary cannot be shipped here; the well-known standard ids for gender, visit type,
record provenance and the UCUM units are the real ones. The study's concept sets
(``helpers.concepts``) select concepts by ``(vocabulary_id, concept_code)`` through the
``concept`` table and their descendants through ``concept_ancestor``, never by
``concept_id``, so they work unchanged on a real OMOP database.

Each source concept has a ``group``: the clinical idea the twin uses to emit it and the
features use to read it (for example every lung-cancer code is in group ``cancer``). The twin
writes ``concept``, ``concept_ancestor`` and ``concept_relationship`` (``concept_table``,
``concept_ancestor_table``, ``concept_relationship_table``) as a real export does.
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
    "concept_ancestor_table",
    "concept_relationship_table",
    "concepts_in_group",
    "standard_concept_id",
    "STANDARD_CONDITIONS",
    "STANDARD_CONCEPTS",
    "MAPS_TO",
    "CLINICAL_DRUGS",
    "UCUM",
    "VOCABULARY_TABLES",
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

# The vocabulary tables the twin writes next to ``concept`` (read when a source has them).
VOCABULARY_TABLES: tuple[str, ...] = ("concept_ancestor", "concept_relationship")

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

# ---------------------------------------------------------------- standard concepts
# A real OMOP export records conditions as standard SNOMED CT concepts (``condition_concept_id``)
# and keeps the ICD-10-CM code it came from in ``condition_source_concept_id``; drugs as RxNorm
# clinical drugs, whose ingredient is their ancestor in ``concept_ancestor``; lab units as UCUM
# concepts (``unit_concept_id``). The study's concept sets (``helpers.concepts``) start from the
# standard concepts below and take their descendants; the twin writes its records the same way.

# Each condition group's standard concepts (SNOMED CT), every one a root of the group's concept
# set (with its descendants). In the twin's ``concept_ancestor`` a group's later concepts descend
# from its first, except those of ``SEPARATE_ROOTS``. The roots are the standard SNOMED CT
# concepts of these conditions; check them against your Athena release before a real study
# (``helpers.concepts`` reports what each set matched). The twin's clinical-drug codes
# (``CLINICAL_DRUGS``) illustrate the layout only: on real data drugs are found from their
# ingredients, through ``concept_ancestor``.
STANDARD_CONDITIONS: dict[str, list[tuple[str, str]]] = {
    "pe": [("59282003", "Pulmonary embolism"), ("233935004", "Pulmonary thromboembolism"),
           ("706870000", "Acute pulmonary embolism with acute cor pulmonale")],
    "cancer": [("363346000", "Malignant neoplastic disease"), ("93880001", "Primary malignant neoplasm of lung"),
               ("254837009", "Malignant neoplasm of breast"), ("363406005", "Malignant tumor of colon"),
               ("363418001", "Malignant tumor of pancreas")],
    "ckd": [("709044004", "Chronic kidney disease"), ("433144002", "Chronic kidney disease stage 3"),
            ("431857002", "Chronic kidney disease stage 4")],
    "copd": [("13645005", "Chronic obstructive lung disease"), ("51615001", "Fibrosis of lung")],
    "heart_failure": [("84114007", "Heart failure"), ("441481004", "Chronic systolic heart failure")],
    # acute MI only: in SNOMED CT an old myocardial infarction descends from 22298006 too
    "mi": [("57054005", "Acute myocardial infarction")],
    "prior_mi": [("1755008", "Old myocardial infarction")],
    "cad": [("53741008", "Coronary arteriosclerosis")],
    "stroke": [("230690007", "Cerebrovascular accident"), ("432504007", "Cerebral infarction")],
    "diabetes": [("73211009", "Diabetes mellitus"), ("44054006", "Diabetes mellitus type 2")],
    "hypertension": [("38341003", "Hypertensive disorder"), ("59621000", "Essential hypertension")],
    "hyperlipidemia": [("55822004", "Hyperlipidemia")],
    "afib": [("49436004", "Atrial fibrillation")],
    "frailty": [("248279007", "Frailty")],
    "smoking": [("56294008", "Nicotine dependence")],
    "pulmonary_hypertension": [("70995007", "Pulmonary hypertension")],
    "chest_pain": [("29857009", "Chest pain")],
    "dyspnea": [("267036007", "Dyspnea")],
}

# ICD-10-CM code -> the SNOMED CT code it maps to ("Maps to"); None: no standard mapping in the
# twin's vocabulary, so a record of it has condition_concept_id 0 and only its source concept
# (the concept sets' source route finds it).
MAPS_TO: dict[str, str | None] = {
    "I26.99": "233935004", "I26.09": "706870000", "Z86.711": None, "C34.90": "93880001", "C50.919": "254837009",
    "C18.9": "363406005", "C25.9": "363418001", "N18.30": "433144002", "N18.4": "431857002", "J44.9": "13645005",
    "J84.10": "51615001", "I50.9": "84114007", "I50.22": "441481004", "I21.9": "57054005", "I25.2": "1755008",
    "I25.10": "53741008", "I63.9": "432504007", "E11.9": "44054006", "I10": "59621000", "E78.5": "55822004",
    "I48.91": "49436004", "R54": "248279007", "Z74.01": None, "F17.210": "56294008", "I27.20": "70995007",
    "R07.9": "29857009", "R06.02": "267036007",
}

# RxNorm ingredient code -> the clinical drug (SCD) the twin records for it.
CLINICAL_DRUGS: dict[str, tuple[str, str]] = {
    "1364430": ("1364445", "apixaban 5 MG Oral Tablet"),
    "1114195": ("1232086", "rivaroxaban 20 MG Oral Tablet"),
    "11289": ("855332", "warfarin sodium 5 MG Oral Tablet"),
    "67108": ("854235", "enoxaparin sodium 40 MG in 0.4 ML Prefilled Syringe"),
    "83367": ("617310", "atorvastatin 20 MG Oral Tablet"),
    "301542": ("859751", "rosuvastatin calcium 10 MG Oral Tablet"),
    "1191": ("243670", "aspirin 81 MG Oral Tablet"),
    "6918": ("866514", "metoprolol tartrate 50 MG Oral Tablet"),
    "29046": ("314076", "lisinopril 10 MG Oral Tablet"),
    "17767": ("197361", "amlodipine 5 MG Oral Tablet"),
    "4603": ("313988", "furosemide 40 MG Oral Tablet"),
    "6809": ("861007", "metformin hydrochloride 500 MG Oral Tablet"),
    "274783": ("261551", "insulin glargine 100 UNT/ML Injectable Solution"),
    "40048": ("597195", "carboplatin 10 MG/ML Injectable Solution"),
    "56946": ("583214", "paclitaxel 6 MG/ML Injectable Solution"),
    "69120": ("485032", "tiotropium 0.018 MG Inhalant Powder"),
    "435": ("745679", "albuterol 0.09 MG/ACTUAT Metered Dose Inhaler"),
    "8640": ("312615", "prednisone 20 MG Oral Tablet"),
}

# UCUM unit concepts (their OMOP concept ids) of the labs' units.
UCUM: dict[str, int] = {
    "mg/dL": 8840, "umol/L": 8749, "pg/mL": 8845, "ng/mL": 8842, "ng/L": 8725, "g/dL": 8713, "g/L": 8636,
    "mmol/L": 8753, "%": 8554, "mm[Hg]": 8876, "/min": 8541, "kg/m2": 9531,
}

SEPARATE_ROOTS: frozenset[str] = frozenset({"51615001"})  # pulmonary fibrosis is not a COPD

STANDARD_ID_BASE = LOCAL_ID_BASE + 1000  # local ids of the SNOMED CT and clinical-drug concepts


def _standard_concepts() -> tuple[Concept, ...]:
    rows, k = [], 0
    for group, codes in STANDARD_CONDITIONS.items():
        for code, name in codes:
            k += 1
            rows.append(Concept(STANDARD_ID_BASE + k, "Condition", "SNOMED", code, name, group))
    by_code = {c.concept_code: c for c in CONCEPTS if c.vocabulary_id == "RxNorm"}
    for ingredient, (code, name) in CLINICAL_DRUGS.items():
        k += 1
        rows.append(Concept(STANDARD_ID_BASE + k, "Drug", "RxNorm", code, name, by_code[ingredient].group))
    return tuple(rows)


STANDARD_CONCEPTS: tuple[Concept, ...] = _standard_concepts()

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
    classes = {"ICD10CM": "ICD10CM code", "RxNorm": "Ingredient", "LOINC": "Lab Test", "CPT4": "CPT4",
               "SNOMED": "Clinical Finding"}
    rows = [
        {
            "concept_id": c.concept_id,
            "concept_name": c.concept_name,
            "domain_id": c.domain_id,
            "vocabulary_id": c.vocabulary_id,
            "concept_class_id": "Clinical Drug" if c.concept_id > STANDARD_ID_BASE and c.domain_id == "Drug"
            else classes[c.vocabulary_id],
            # ICD-10-CM codes are source concepts: standard_concept is null, they map to SNOMED CT
            "standard_concept": None if c.vocabulary_id == "ICD10CM" else "S",
            "concept_code": c.concept_code,
        }
        for c in CONCEPTS + STANDARD_CONCEPTS
    ]
    for unit, cid in UCUM.items():
        rows.append({"concept_id": cid, "concept_name": unit, "domain_id": "Unit", "vocabulary_id": "UCUM",
                     "concept_class_id": "Unit", "standard_concept": "S", "concept_code": unit})
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


def _by_code(vocabulary_id: str) -> dict[str, Concept]:
    return {c.concept_code: c for c in CONCEPTS + STANDARD_CONCEPTS if c.vocabulary_id == vocabulary_id}


def concept_ancestor_table() -> pd.DataFrame:
    """The OMOP ``concept_ancestor`` table of the twin's vocabulary: every standard concept is
    its own ancestor (level 0); a condition group's later SNOMED CT concepts descend from its
    first (unless in ``SEPARATE_ROOTS``); a clinical drug descends from its ingredient.

    >>> t = concept_ancestor_table()
    >>> drug = _by_code("RxNorm")["1364445"].concept_id  # apixaban 5 MG Oral Tablet
    >>> _by_code("RxNorm")["1364430"].concept_id in set(t.loc[t.descendant_concept_id == drug, "ancestor_concept_id"])
    True
    """
    rows = [(c.concept_id, c.concept_id, 0) for c in CONCEPTS + STANDARD_CONCEPTS if c.vocabulary_id != "ICD10CM"]
    snomed = _by_code("SNOMED")
    for codes in STANDARD_CONDITIONS.values():
        root = snomed[codes[0][0]].concept_id
        rows += [(root, snomed[code].concept_id, 1) for code, _ in codes[1:] if code not in SEPARATE_ROOTS]
    rxnorm = _by_code("RxNorm")
    rows += [(rxnorm[ingredient].concept_id, rxnorm[drug].concept_id, 1)
             for ingredient, (drug, _) in CLINICAL_DRUGS.items()]
    frame = pd.DataFrame(rows, columns=["ancestor_concept_id", "descendant_concept_id", "min_levels_of_separation"])
    frame["max_levels_of_separation"] = frame["min_levels_of_separation"]
    return frame.astype("int64")


def concept_relationship_table() -> pd.DataFrame:
    """The OMOP ``concept_relationship`` rows of the twin's vocabulary: each ICD-10-CM code
    ``Maps to`` its SNOMED CT concept (``MAPS_TO``, both directions), each clinical drug
    ``RxNorm has ing`` its ingredient."""
    icd, snomed, rxnorm = _by_code("ICD10CM"), _by_code("SNOMED"), _by_code("RxNorm")
    rows = []
    for code, target in MAPS_TO.items():
        if target is not None:
            rows += [(icd[code].concept_id, snomed[target].concept_id, "Maps to"),
                     (snomed[target].concept_id, icd[code].concept_id, "Mapped from")]
    for ingredient, (drug, _) in CLINICAL_DRUGS.items():
        rows.append((rxnorm[drug].concept_id, rxnorm[ingredient].concept_id, "RxNorm has ing"))
    return pd.DataFrame(rows, columns=["concept_id_1", "concept_id_2", "relationship_id"]).astype(
        {"concept_id_1": "int64", "concept_id_2": "int64"})


def standard_concept_id(concept: Concept) -> int:
    """The concept a twin record of ``concept`` carries in its ``*_concept_id``: the SNOMED CT
    concept an ICD-10-CM code maps to (0 where it maps to none), the clinical drug of an
    ingredient; the concept itself otherwise."""
    if concept.vocabulary_id == "ICD10CM":
        target = MAPS_TO[concept.concept_code]
        return 0 if target is None else _by_code("SNOMED")[target].concept_id
    if concept.vocabulary_id == "RxNorm" and concept.concept_code in CLINICAL_DRUGS:
        return _by_code("RxNorm")[CLINICAL_DRUGS[concept.concept_code][0]].concept_id
    return concept.concept_id
