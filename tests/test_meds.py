"""OMOP -> MEDS export (helpers.meds): a hand-made mini OMOP, and a small twin written here."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from helpers.cohort import connect_omop
from helpers.meds import (
    BIRTH_CODE,
    DEATH_CODE,
    MedsError,
    cohort_subject_ids,
    cohort_subject_splits,
    export_omop_to_meds,
    omop_codes,
    omop_to_meds,
    read_meds,
    write_meds,
)
from helpers.vocabulary import OMOP_TABLES

D = dt.date
T = dt.datetime


def _mini_omop(folder: Path) -> Path:
    """Two persons; person 2 has a condition with an unknown concept and one with concept 0,
    a date-only drug, and a death."""
    concept = pd.DataFrame(
        {
            "concept_id": [8507, 8532, 9201, 2000000001, 2000000028, 2000000046, 2000000058, 2000000099],
            "concept_name": ["MALE", "FEMALE", "Inpatient Visit", "PE", "apixaban", "Creatinine", "CTA chest", "no code"],
            "domain_id": ["Gender", "Gender", "Visit", "Condition", "Drug", "Measurement", "Procedure", "Condition"],
            "vocabulary_id": ["Gender", "Gender", "Visit", "ICD10CM", "RxNorm", "LOINC", "CPT4", None],
            "concept_class_id": ["Gender"] * 8,
            "standard_concept": ["S"] * 8,
            "concept_code": ["M", "F", "IP", "I26.99", "1364430", "2160-0", "71275", None],
        }
    )
    person = pd.DataFrame(
        {
            "person_id": [1, 2],
            "gender_concept_id": [8532, 8507],
            "year_of_birth": [1950, 1960],
            "month_of_birth": [3, None],
            "day_of_birth": [4, None],
            "birth_datetime": [T(1950, 3, 4), None],
            "person_source_value": ["site_a-000000", "site_a-000001"],
        }
    )
    visit = pd.DataFrame(
        {
            "visit_occurrence_id": [1, 2],
            "person_id": [1, 2],
            "visit_concept_id": [9201, 9201],
            "visit_start_date": [D(2020, 1, 1), D(2021, 5, 1)],
            "visit_start_datetime": [T(2020, 1, 1, 8), T(2021, 5, 1, 9)],
        }
    )
    condition = pd.DataFrame(
        {
            "condition_occurrence_id": [1, 2, 3, 4],
            "person_id": [1, 2, 2, 2],
            "condition_concept_id": [2000000001, 2000000001, 2000000099, 0],
            "condition_start_date": [D(2020, 1, 1), D(2021, 5, 1), D(2021, 5, 1), D(2021, 5, 1)],
            "condition_start_datetime": [T(2020, 1, 1, 9), T(2021, 5, 1, 10), T(2021, 5, 1, 10), T(2021, 5, 1, 10)],
        }
    )
    drug = pd.DataFrame(
        {
            "drug_exposure_id": [1],
            "person_id": [2],
            "drug_concept_id": [2000000028],
            "drug_exposure_start_date": [D(2021, 5, 2)],
            "drug_exposure_start_datetime": pd.Series([None], dtype="datetime64[us]"),
        }
    )
    measurement = pd.DataFrame(
        {
            "measurement_id": [1, 2],
            "person_id": [1, 1],
            "measurement_concept_id": [2000000046, 2000000046],
            "measurement_date": [D(2020, 1, 1), D(2020, 1, 2)],
            "measurement_datetime": [T(2020, 1, 1, 9, 30), T(2020, 1, 2, 9, 30)],
            "value_as_number": [1.25, None],
            "unit_source_value": ["mg/dL", "mg/dL"],
        }
    )
    procedure = pd.DataFrame(
        {
            "procedure_occurrence_id": [1],
            "person_id": [1],
            "procedure_concept_id": [2000000058],
            "procedure_date": [D(2020, 1, 1)],
            "procedure_datetime": [T(2020, 1, 1, 8, 30)],
        }
    )
    death = pd.DataFrame({"person_id": [2], "death_date": [D(2022, 1, 1)], "death_datetime": [T(2022, 1, 1, 12)]})
    period = pd.DataFrame(
        {"observation_period_id": [1, 2], "person_id": [1, 2],
         "observation_period_start_date": [D(2019, 1, 1)] * 2, "observation_period_end_date": [D(2022, 1, 1)] * 2}
    )
    tables = {
        "person": person, "visit_occurrence": visit, "condition_occurrence": condition, "drug_exposure": drug,
        "measurement": measurement, "procedure_occurrence": procedure, "death": death,
        "observation_period": period, "concept": concept,
    }
    assert set(tables) == set(OMOP_TABLES)
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


@pytest.fixture
def mini(tmp_path: Path):
    con = connect_omop(_mini_omop(tmp_path / "omop"))
    yield con
    con.close()


def test_mini_omop_events_codes_and_times(mini) -> None:
    events = omop_to_meds(mini)
    assert list(events.columns) == ["subject_id", "time", "code", "numeric_value", "unit"]
    assert events["subject_id"].dtype == np.int64
    assert events["time"].dtype == "datetime64[us]"
    assert events["numeric_value"].dtype == np.float32
    one = events[events.subject_id == 1]
    assert one["code"].tolist() == [
        "Gender/F", BIRTH_CODE, "Visit/IP", "CPT4/71275", "ICD10CM/I26.99", "LOINC/2160-0", "LOINC/2160-0",
    ]
    assert pd.isna(one["time"].iloc[0])  # gender is static
    assert one["time"].iloc[1] == pd.Timestamp("1950-03-04")
    lab = one[one.code == "LOINC/2160-0"]
    assert lab["numeric_value"].iloc[0] == pytest.approx(1.25)
    assert np.isnan(lab["numeric_value"].iloc[1])
    assert lab["unit"].tolist() == ["mg/dL", "mg/dL"]
    two = events[events.subject_id == 2]
    # birth from year/month/day (7/1 when missing); date-only drug at 23:59:59; death
    assert two.loc[two.code == BIRTH_CODE, "time"].iloc[0] == pd.Timestamp("1960-07-01")
    assert two.loc[two.code == "RxNorm/1364430", "time"].iloc[0] == pd.Timestamp("2021-05-02 23:59:59")
    assert two.loc[two.code == DEATH_CODE, "time"].iloc[0] == pd.Timestamp("2022-01-01 12:00")
    # sorted by subject, time (static first)
    key = events.assign(t=events["time"].fillna(pd.Timestamp.min))
    assert key.sort_values(["subject_id", "t"], kind="stable").index.equals(key.index)


def test_unmapped_rows_are_counted_not_silently_dropped(mini) -> None:
    events = omop_to_meds(mini)
    report = {r["table"]: r for r in events.attrs["meds_report"]}
    cond = report["condition_occurrence"]
    assert (cond["rows"], cond["exported"], cond["unmapped_concept"], cond["no_time"]) == (4, 2, 2, 0)
    assert (events.code == "ICD10CM/I26.99").sum() == 2
    total_exported = sum(r["exported"] for r in report.values())
    assert total_exported == len(events)


def test_write_and_read_back_meds_folder(mini, tmp_path: Path) -> None:
    events = omop_to_meds(mini)
    cohort = pd.DataFrame({"person_id": ["1", "2"], "split": ["train", "test"]})
    out = write_meds(events, tmp_path / "meds", subject_splits=cohort_subject_splits(cohort),
                     codes=omop_codes(mini), dataset_name="mini")
    assert sorted(p.name for p in (out / "metadata").iterdir()) == [
        "codes.parquet", "dataset.json", "omop_to_meds.json", "subject_splits.parquet"
    ]
    schema = pq.read_schema(out / "data" / "0.parquet")
    assert [str(schema.field(c).type) for c in ("subject_id", "time", "code", "numeric_value")] == [
        "int64", "timestamp[us]", "string", "float"
    ]
    dataset = json.loads((out / "metadata" / "dataset.json").read_text())
    assert dataset["meds_version"] == "0.3.3" and dataset["dataset_name"] == "mini"
    splits = pd.read_parquet(out / "metadata" / "subject_splits.parquet")
    assert splits.to_dict("list") == {"subject_id": [1, 2], "split": ["train", "held_out"]}
    codes = pd.read_parquet(out / "metadata" / "codes.parquet")
    assert {"ICD10CM/I26.99", BIRTH_CODE, DEATH_CODE} <= set(codes.code)
    back = read_meds(out)
    pd.testing.assert_frame_equal(back, events.reset_index(drop=True))
    assert back.attrs["meds_report"] == events.attrs["meds_report"]


def test_sharded_write_keeps_subjects_whole(mini, tmp_path: Path) -> None:
    events = omop_to_meds(mini)
    out = write_meds(events, tmp_path / "meds", subjects_per_shard=1)
    shards = sorted((out / "data").glob("*.parquet"))
    assert len(shards) == 2
    assert [pd.read_parquet(s).subject_id.unique().tolist() for s in shards] == [[1], [2]]
    pd.testing.assert_frame_equal(read_meds(out), events.reset_index(drop=True))


@pytest.mark.parametrize(
    ("cohort", "match"),
    [
        (pd.DataFrame({"person_id": ["1", "site_a-000001"]}), "person_id.*integer.*site_a-000001"),
        (pd.DataFrame({"study": ["x"]}), "lacks column 'person_id'"),
    ],
    ids=["not-an-integer", "no-column"],
)
def test_cohort_subject_ids_errors(cohort: pd.DataFrame, match: str) -> None:
    with pytest.raises(MedsError, match=match):
        cohort_subject_ids(cohort)


def test_person_in_two_splits_is_an_error() -> None:
    cohort = pd.DataFrame({"person_id": ["1", "1"], "split": ["train", "test"]})
    with pytest.raises(MedsError, match="1 person\\(s\\) appear in two splits"):
        cohort_subject_splits(cohort)


def test_read_meds_rejects_a_folder_without_data(tmp_path: Path) -> None:
    with pytest.raises(MedsError, match="no data/\\*.parquet"):
        read_meds(tmp_path)


def test_a_twin_exports_every_record(tmp_path: Path) -> None:
    from helpers import cohort as hc
    from helpers.twin import generate

    generate(tmp_path / "twin", profile="tiny", seed=4, tasks=("pe",), n_override={"internal": 60, "external": 20},
             images=False)
    omop = tmp_path / "twin" / "pe" / "omop"
    con = connect_omop(omop)
    try:
        index = hc.read_imaging_index(tmp_path / "twin" / "pe" / "imaging_index.parquet")
        built = hc.build_cohort(con, index, "pe", imaging_root=tmp_path / "twin" / "pe")
    finally:
        con.close()
    cohort = hc.assign_splits(built.cohort, test_fraction=0.25, val_fraction=0.15, external_institutions=["site_b"], seed=0)
    out = export_omop_to_meds(omop, tmp_path / "meds", cohort=cohort)
    events = read_meds(out)
    report = events.attrs["meds_report"]
    assert all(r["unmapped_concept"] == 0 and r["no_time"] == 0 for r in report)
    measurement = pq.read_metadata(omop / "measurement.parquet").num_rows
    assert (events.code.str.startswith("LOINC/")).sum() == measurement
    # every cohort person is a MEDS subject with a birth and a gender
    subjects = set(cohort_subject_ids(cohort))
    assert subjects <= set(events.subject_id)
    assert set(events.loc[events.code == BIRTH_CODE, "subject_id"]) >= subjects
    assert set(events.loc[events.code.str.startswith("Gender/"), "subject_id"]) >= subjects
    # standard concepts, and ICD-10-CM for the records without a standard mapping (their source concept)
    assert set(events.code.str.split("/").str[0]) == {"SNOMED", "ICD10CM", "RxNorm", "LOINC", "CPT4", "Visit", "Gender",
                                                      BIRTH_CODE, DEATH_CODE}
