"""Cohort construction and one-hot features on hand-made OMOP tables with known answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import cohort as hc
from helpers.ehr import FEATURES, features_table, onehot_features
from helpers.vocabulary import GENDER_FEMALE, GENDER_MALE, concept_table, concepts_in_group


def cid(group: str) -> int:
    return concepts_in_group(group)[0].concept_id


D = pd.Timestamp


def write_omop(folder: Path, *, persons, periods, deaths=(), conditions=(), drugs=(), measurements=(), procedures=()):
    folder.mkdir(parents=True)
    tables = {
        "person": pd.DataFrame(persons, columns=["person_id", "gender_concept_id", "year_of_birth", "month_of_birth", "day_of_birth"]),
        "observation_period": pd.DataFrame(periods, columns=["person_id", "observation_period_start_date", "observation_period_end_date"]),
        "death": pd.DataFrame(list(deaths), columns=["person_id", "death_date"]),
        "condition_occurrence": pd.DataFrame(list(conditions), columns=["person_id", "condition_concept_id", "condition_start_date"]),
        "drug_exposure": pd.DataFrame(list(drugs), columns=["person_id", "drug_concept_id", "drug_exposure_start_date"]),
        "measurement": pd.DataFrame(list(measurements), columns=["measurement_id", "person_id", "measurement_concept_id", "measurement_date", "measurement_datetime", "value_as_number", "unit_source_value"]),
        "procedure_occurrence": pd.DataFrame(list(procedures), columns=["person_id", "procedure_concept_id", "procedure_date"]),
        "visit_occurrence": pd.DataFrame({"visit_occurrence_id": [1], "person_id": [1]}),
        "concept": concept_table(),
    }
    date_columns = {"observation_period_start_date", "observation_period_end_date", "death_date", "condition_start_date",
                    "drug_exposure_start_date", "measurement_date", "procedure_date"}
    for name, frame in tables.items():
        for column in frame.columns:
            if column in date_columns:
                frame[column] = pd.to_datetime(frame[column]).dt.date
            elif column.endswith("datetime"):
                frame[column] = pd.to_datetime(frame[column])
        frame.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


@pytest.fixture()
def world(tmp_path):
    index_day = D("2020-06-01 10:30")
    persons = [(p, GENDER_MALE if p % 2 else GENDER_FEMALE, 1950, 6, 15) for p in range(1, 9)]
    periods = [(p, "2010-01-01", "2022-01-01") for p in range(1, 9)]
    periods[3] = (4, "2010-01-01", "2020-06-01")  # follow-up ends on the index day
    periods[7] = (8, "2010-01-01", "2019-12-31")  # the index is after the last observation period
    deaths = [(2, "2020-09-01"), (3, "2020-06-01"), (5, "2019-01-01")]
    conditions = [
        (6, cid("mi"), "2020-07-01"),            # MACE event after the index
        (7, cid("mi"), "2019-07-01"),            # before the index: history, not an outcome
        (1, cid("cancer"), "2018-01-01"),        # within 5 years
        (7, cid("cancer"), "2014-01-01"),        # older than 5 years: not a feature
        (1, cid("heart_failure"), "2020-06-02"), # after the index: never a feature
    ]
    drugs = [(1, cid("anticoagulant"), "2020-01-01")]
    creat = concepts_in_group("creatinine")[0].concept_id
    measurements = [
        (1, 1, creat, "2020-05-01", "2020-05-01 08:00", 2.0, "mg/dL"),     # high
        (2, 1, creat, "2020-05-20", "2020-05-20 08:00", 1.0, "MG/DL "),    # last value: normal (any case)
        (3, 2, creat, "2020-05-20", "2020-05-20 08:00", 200.0, "µmol/l"),  # 2.26 mg/dL: high
        (4, 3, creat, "2020-05-20", "2020-05-20 08:00", 3.0, "mmol/L"),    # unit not recognised
    ]
    omop = write_omop(tmp_path / "omop", persons=persons, periods=periods, deaths=deaths, conditions=conditions,
                      drugs=drugs, measurements=measurements)
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for p in range(1, 9):
        (root / f"s{p}.nii.gz").write_bytes(b"x")
        rows.append((f"s{p}", str(p), "site_a", index_day, f"s{p}.nii.gz", "nifti"))
    rows.append(("s9", "9", "site_a", index_day, "s9.nii.gz", "nifti"))          # image missing
    (root / "s10.nii.gz").write_bytes(b"x")
    rows.append(("s10", "99", "site_b", index_day, "s10.nii.gz", "nifti"))       # person unknown
    rows.append(("s1", "1", "site_a", index_day, "s1.nii.gz", "nifti"))          # duplicate
    index = pd.DataFrame(rows, columns=list(hc.IMAGING_INDEX_COLUMNS))
    index.to_parquet(tmp_path / "index.parquet")
    return {"omop": omop, "root": root, "index": tmp_path / "index.parquet"}


def test_pe_cohort_times_events_and_exclusions(world):
    con = hc.connect_omop(world["omop"])
    index = hc.read_imaging_index(world["index"])
    result = hc.build_cohort(con, index, "pe", imaging_root=world["root"])
    got = result.cohort.set_index("study_id")
    assert got.loc["s2", "event"] == 1 and got.loc["s2", "time"] == 92.0    # death 92 days later
    assert got.loc["s3", "event"] == 1 and got.loc["s3", "time"] == 0.5     # death on the index day
    assert got.loc["s1", "event"] == 0 and got.loc["s1", "time"] == 365.0   # censored at the horizon
    assert got.loc["s6", "event"] == 0                                      # an MI is not a PE event
    reasons = result.exclusions.set_index("study_id")["reason"]
    assert reasons["s4"] == "no follow-up after the index CT"
    assert reasons["s5"] == "death recorded before the index CT"
    assert reasons["s9"] == "image not found on disk"
    assert reasons["s10"] == "person not in the OMOP person table"
    assert reasons["s8"] == "no observation period containing the index date"
    assert reasons["s1"] == "duplicate study_id in the imaging index"
    assert len(result.cohort) + len(result.exclusions) == len(index)
    assert list(result.cohort.columns) == list(hc.COHORT_COLUMNS)


def test_a_death_after_the_observation_period_ends_follow_up_there(tmp_path):
    """A death recorded after the last encounter (a death index) is an event, not a censoring at
    the end of the observation period; with no death, follow-up ends with the period."""
    persons = [(p, GENDER_MALE, 1950, 6, 15) for p in (1, 2, 3)]
    periods = [(p, "2010-01-01", "2020-08-01") for p in (1, 2, 3)]
    deaths = [(1, "2020-12-01"), (2, "2022-01-01")]  # within the PE horizon; after it
    omop = write_omop(tmp_path / "omop", persons=persons, periods=periods, deaths=deaths)
    root = tmp_path / "images"
    root.mkdir()
    rows = []
    for p in (1, 2, 3):
        (root / f"s{p}.nii.gz").write_bytes(b"x")
        rows.append((f"s{p}", str(p), "site_a", D("2020-06-01 10:30"), f"s{p}.nii.gz", "nifti"))
    index = pd.DataFrame(rows, columns=list(hc.IMAGING_INDEX_COLUMNS))
    got = hc.build_cohort(hc.connect_omop(omop), index, "pe", imaging_root=root).cohort.set_index("study_id")
    assert got.loc["s1", "event"] == 1 and got.loc["s1", "time"] == 183.0   # death 6 months later
    assert got.loc["s2", "event"] == 0 and got.loc["s2", "time"] == 365.0   # followed to the horizon
    assert got.loc["s3", "event"] == 0 and got.loc["s3", "time"] == 61.0    # censored at the period's end


def test_mace_events_come_from_conditions_after_the_index(world):
    con = hc.connect_omop(world["omop"])
    result = hc.build_cohort(con, hc.read_imaging_index(world["index"]), "mace", imaging_root=world["root"])
    got = result.cohort.set_index("study_id")
    assert got.loc["s6", "event"] == 1 and got.loc["s6", "time"] == 30.0
    assert got.loc["s7", "event"] == 0 and got.loc["s7", "time"] == (D("2022-01-01") - D("2020-06-01")).days


def test_onehot_features_respect_windows_units_and_the_index(world):
    con = hc.connect_omop(world["omop"])
    cohort = hc.build_cohort(con, hc.read_imaging_index(world["index"]), "pe", imaging_root=world["root"]).cohort
    result = onehot_features(con, cohort, "pe")
    f = result.features.set_index("study_id")
    assert list(f.columns) == [feat.name for feat in FEATURES["pe"]]
    assert f.loc["s1", "dx_cancer"] == 1 and f.loc["s7", "dx_cancer"] == 0
    assert f.loc["s1", "dx_heart_failure"] == 0          # coded after the index
    assert f.loc["s1", "rx_anticoagulant"] == 1
    assert f.loc["s1", "lab_creatinine_high"] == 0       # the last value counts
    assert f.loc["s2", "lab_creatinine_high"] == 1       # converted from umol/L
    assert f.loc["s3", "lab_creatinine_high"] == 0
    assert f.loc["s1", "male"] == 1 and f.loc["s2", "male"] == 0
    assert f.loc["s1", "age_ge_65"] == 1 and f.loc["s1", "age_ge_80"] == 0
    unusable = result.unusable_measurements
    assert unusable.to_dict("records") == [{"lab": "creatinine", "unit": "mmol/L", "rows": 1}]
    assert f.dtypes.eq(np.float32).all()


def test_feature_declaration_is_readable():
    table = features_table("mace")
    assert {"feature", "rule", "look-back", "rationale"} == set(table.columns)
    assert table.set_index("feature").loc["lab_sbp_ge_140", "rule"].startswith("last sbp > 140")


def test_splits_are_patient_level_and_sized():
    rng = np.random.default_rng(0)
    persons = np.repeat(np.arange(400), rng.integers(1, 4, size=400)).astype(str)
    cohort = pd.DataFrame({"person_id": persons, "institution": np.where(persons.astype(int) < 350, "site_a", "site_b")})
    out = hc.assign_splits(cohort, test_fraction=0.25, val_fraction=0.15, external_institutions=["site_b"], seed=3)
    internal = out[out.institution == "site_a"]
    assert internal.groupby("person_id")["split"].nunique().max() == 1
    assert abs((internal.split == "test").mean() - 0.25) < 0.02
    assert (out.loc[out.institution == "site_b", "split"] == "external").all()
    again = hc.assign_splits(cohort, test_fraction=0.25, val_fraction=0.15, external_institutions=["site_b"], seed=3)
    assert again["split"].equals(out["split"])


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(hc.CohortError, match=r"OMOP table file\(s\) missing: person, observation_period"):
        hc.connect_omop(tmp_path)
    bad = tmp_path / "index.csv"
    pd.DataFrame({"study_id": ["a"], "person_id": [1]}).to_csv(bad, index=False)
    with pytest.raises(hc.CohortError, match=r"index.csv: imaging index lacks column\(s\) institution"):
        hc.read_imaging_index(bad)
    cohort = pd.DataFrame({"study_id": ["a", "a"], "person_id": ["1", "2"], "institution": "x",
                           "index_time": pd.Timestamp("2020-01-01"), "time": [1.0, 0.0], "event": [0, 1], "split": ["train", "test"]})
    cohort.to_parquet(tmp_path / "c.parquet")
    with pytest.raises(hc.CohortError, match=r"1 duplicated study_id; 1 row\(s\) with time <= 0"):
        hc.read_cohort(tmp_path / "c.parquet")


def test_column_and_table_names_in_any_case_read_the_same(world, tmp_path):
    """An export that spells its columns in upper case (parquet files) or its tables and columns
    so (a DuckDB file) gives the same cohort and features, with the CDM's lower-case names."""
    import duckdb

    index = hc.read_imaging_index(world["index"])
    expected = hc.build_cohort(hc.connect_omop(world["omop"]), index, "pe", imaging_root=world["root"]).cohort
    upper = tmp_path / "upper"
    upper.mkdir()
    for path in world["omop"].glob("*.parquet"):
        frame = pd.read_parquet(path)
        frame.columns = [c.upper() for c in frame.columns]
        frame.to_parquet(upper / path.name, index=False)
    con = hc.connect_omop(upper)
    assert "person_id" in con.execute("SELECT * FROM person LIMIT 1").df().columns
    got = hc.build_cohort(con, index, "pe", imaging_root=world["root"]).cohort
    pd.testing.assert_frame_equal(got, expected)
    np.testing.assert_array_equal(onehot_features(con, got, "pe").features.to_numpy(),
                                  onehot_features(hc.connect_omop(world["omop"]), expected, "pe").features.to_numpy())
    database = tmp_path / "omop.duckdb"
    with duckdb.connect(str(database)) as db:
        for path in upper.glob("*.parquet"):
            db.execute(f"CREATE TABLE {path.stem.upper()} AS SELECT * FROM read_parquet('{path.as_posix()}')")
    got = hc.build_cohort(hc.connect_omop(database), index, "pe", imaging_root=world["root"]).cohort
    pd.testing.assert_frame_equal(got, expected)
    clash = pd.read_parquet(upper / "death.parquet").assign(death_date=pd.Timestamp("2020-01-01").date())
    clash.to_parquet(upper / "death.parquet", index=False)
    with pytest.raises(hc.CohortError, match=r"death.parquet: table 'death' has columns 'DEATH_DATE' and 'death_date', "
                                             r"which differ only in case"):
        hc.connect_omop(upper)


def test_the_meds_export_reads_upper_case_columns(tmp_path):
    """Upper-case column spellings (``CONDITION_START_DATETIME``) reach the MEDS export of the
    CLMBR encoders as the CDM's names: the same timelines as from the original tables."""
    from helpers.meds import omop_to_meds
    from helpers.twin import generate

    generate(tmp_path / "twin", profile="tiny", seed=3, n_override={"internal": 30, "external": 10}, images=False,
             tasks=("pe",))
    source = tmp_path / "twin" / "pe" / "omop"
    upper = tmp_path / "upper"
    upper.mkdir()
    for path in source.glob("*.parquet"):
        frame = pd.read_parquet(path)
        frame.columns = [c.upper() for c in frame.columns]
        frame.to_parquet(upper / path.name, index=False)
    pd.testing.assert_frame_equal(omop_to_meds(hc.connect_omop(upper)), omop_to_meds(hc.connect_omop(source)))
