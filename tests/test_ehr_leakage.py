"""The index rule: no OMOP record from the index day after the CT, or later, reaches an EHR
representation (one-hot features of ``helpers.ehr``; MEDS export + ``clmbr_mini`` embedding).

A record counts only if it is strictly before ``index_time``: ``datetime < index_time`` when
its ``*_datetime`` is known, else ``date < index date``. Each test plants records on a small
hand-made OMOP data set and checks that those at or after the CT leave every representation
unchanged, while those before it (positive controls) do change it.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.cohort import connect_omop
from helpers.ehr import onehot_features
from helpers.vocabulary import (
    GENDER_FEMALE,
    GENDER_MALE,
    OMOP_TABLES,
    VISIT_ER,
    concept_table,
    concepts_in_group,
)

INDEX = pd.Timestamp("2020-06-01 10:30")  # the CT, in the middle of the index day
DAY = INDEX.normalize()
LATER = pd.Timestamp("2021-01-01 09:00")  # person 1's second CT: records planted around INDEX precede it

# table, concept column, datetime column, date column (the OMOP CDM v5.4 names, as helpers.twin writes them)
TABLES = {
    "visit": ("visit_occurrence", "visit_concept_id", "visit_start_datetime", "visit_start_date"),
    "condition": ("condition_occurrence", "condition_concept_id", "condition_start_datetime", "condition_start_date"),
    "drug": ("drug_exposure", "drug_concept_id", "drug_exposure_start_datetime", "drug_exposure_start_date"),
    "procedure": ("procedure_occurrence", "procedure_concept_id", "procedure_datetime", "procedure_date"),
    "lab": ("measurement", "measurement_concept_id", "measurement_datetime", "measurement_date"),
}

# what is planted, per feature table: (kind, group, persons); the comment names the feature it sets
PLANTS = [
    ("condition", "heart_failure", (1, 3)),   # dx_heart_failure (also a MACE event at day 0.5)
    ("drug", "anticoagulant", (1, 3)),        # rx_anticoagulant (pe): anticoagulation started at the scan
    ("drug", "loop_diuretic", (1, 2, 3)),     # rx_loop_diuretic (pe and mace)
    ("procedure", "dialysis", (1, 3)),        # px_dialysis
]
LAB_PLANTS = [(1, 3.0, "mg/dL"), (2, 0.8, "mg/dL"), (3, 3.0, "mg/dL"), (1, 3.0, "mmol/L")]  # last one: unusable unit
TARGETS = ["dx_heart_failure", "rx_anticoagulant", "rx_loop_diuretic", "px_dialysis", "lab_creatinine_high"]


def _cid(group: str) -> int:
    return concepts_in_group(group)[0].concept_id


def _rec(kind, person, concept, when, value=None, unit=None) -> dict:
    """One record: ``when`` a Timestamp (datetime known; date = its day) or a date (date only)."""
    if isinstance(when, pd.Timestamp):
        return {"kind": kind, "person": person, "concept": concept, "date": when.date(), "datetime": when,
                "value": value, "unit": unit}
    return {"kind": kind, "person": person, "concept": concept, "date": when, "datetime": None,
            "value": value, "unit": unit}


def _baseline() -> list[dict]:
    """Person 1 (male): hypertension, a normal creatinine a month before. Person 2 (female):
    heart failure (date only), anticoagulant, dialysis, and a high creatinine on the index day
    *before* the scan (so it is the last value). Person 3 (male): only an old visit."""
    creat = _cid("creatinine")
    return [
        _rec("visit", 1, VISIT_ER, pd.Timestamp("2019-03-01 09:00")),
        _rec("condition", 1, _cid("hypertension"), pd.Timestamp("2019-03-01 10:00")),
        _rec("lab", 1, creat, pd.Timestamp("2020-05-01 08:00"), value=1.0, unit="mg/dL"),
        _rec("condition", 2, _cid("heart_failure"), dt.date(2018, 1, 1)),
        _rec("drug", 2, _cid("anticoagulant"), pd.Timestamp("2020-01-01 12:00")),
        _rec("procedure", 2, _cid("dialysis"), pd.Timestamp("2019-01-01 12:00")),
        _rec("visit", 2, VISIT_ER, pd.Timestamp("2020-06-01 07:45")),
        _rec("lab", 2, creat, pd.Timestamp("2020-06-01 08:00"), value=2.5, unit="mg/dL"),
        _rec("visit", 3, VISIT_ER, dt.date(2017, 5, 5)),
    ]


def _planted(when) -> list[dict]:
    """A record of every planted kind, for every planted person, at ``when``."""
    rows = [_rec(kind, p, _cid(group), when) for kind, group, persons in PLANTS for p in persons]
    rows += [_rec("lab", p, _cid("creatinine"), when, value=v, unit=u) for p, v, u in LAB_PLANTS]
    rows += [_rec("visit", p, VISIT_ER, when) for p in (1, 2, 3)]
    return rows


def _write_omop(folder: Path, records: list[dict], *, datetime_columns: bool = True) -> Path:
    """OMOP parquet tables (every table of ``OMOP_TABLES``) holding ``records``; with
    ``datetime_columns=False`` the event tables have no ``*_datetime`` column at all."""
    folder.mkdir(parents=True)
    tables = {
        "person": pd.DataFrame({
            "person_id": [1, 2, 3], "gender_concept_id": [GENDER_MALE, GENDER_FEMALE, GENDER_MALE],
            "year_of_birth": [1950, 1960, 1945], "month_of_birth": [6, 1, 3], "day_of_birth": [15, 2, 9],
            "birth_datetime": pd.to_datetime(["1950-06-15", "1960-01-02", "1945-03-09"]),
        }),
        "observation_period": pd.DataFrame({
            "observation_period_id": [1, 2, 3], "person_id": [1, 2, 3],
            "observation_period_start_date": [dt.date(2010, 1, 1)] * 3,
            "observation_period_end_date": [dt.date(2022, 1, 1)] * 3,
        }),
        "death": pd.DataFrame({"person_id": pd.Series([], dtype="int64"),
                               "death_date": pd.Series([], dtype="object"),
                               "death_datetime": pd.Series([], dtype="datetime64[us]")}),
        "concept": concept_table(),
    }
    frame = pd.DataFrame(records)
    for kind, (table, concept_col, dt_col, date_col) in TABLES.items():
        part = frame[frame["kind"] == kind].reset_index(drop=True)
        out = pd.DataFrame({
            f"{table}_id": np.arange(1, len(part) + 1, dtype=np.int64),
            "person_id": part["person"].astype("int64"),
            concept_col: part["concept"].astype("int64"),
            date_col: pd.Series(list(part["date"]), dtype="object"),
        })
        if datetime_columns:
            out[dt_col] = pd.to_datetime(part["datetime"]).astype("datetime64[us]")
        if kind == "lab":
            out["value_as_number"] = part["value"].astype("float64")
            out["unit_source_value"] = part["unit"].astype("object")
        tables[table] = out
    assert set(tables) == set(OMOP_TABLES)
    for name, table in tables.items():
        table.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def _cohort() -> pd.DataFrame:
    return pd.DataFrame({
        "study_id": ["s1", "s2", "s3", "s1_later"],
        "person_id": ["1", "2", "3", "1"],
        "index_time": [INDEX, INDEX, INDEX, LATER],
    })


AT_INDEX = ["s1", "s2", "s3"]

# records the index rule must never read for a CT at INDEX
LEAKS = {
    "at_the_scan": INDEX,
    "index_day_after_scan": INDEX + pd.Timedelta(hours=4, minutes=30),
    "index_day_one_second_after": INDEX + pd.Timedelta(seconds=1),
    "index_day_date_only": DAY.date(),
    "next_day": DAY + pd.Timedelta(days=1, hours=14),
    "next_day_date_only": (DAY + pd.Timedelta(days=1)).date(),
}
# records it must read (positive controls)
BEFORE = {
    "index_day_before_scan": INDEX - pd.Timedelta(minutes=1),
    "day_before_date_only": (DAY - pd.Timedelta(days=1)).date(),
}


# ----------------------------------------------------------------------------- one-hot


def _onehot(folder: Path, task: str, cohort: pd.DataFrame | None = None):
    con = connect_omop(folder)
    try:
        result = onehot_features(con, _cohort() if cohort is None else cohort, task)
    finally:
        con.close()
    return result.features.set_index("study_id"), result.unusable_measurements


class _Baseline(dict):
    """``(with_dt, task) -> (features, unusable_measurements)`` of the baseline, computed once."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, key: tuple[bool, str]):
        with_dt, task = key
        folder = self.root / f"dt{int(with_dt)}"
        if not folder.exists():
            _write_omop(folder, _baseline(), datetime_columns=with_dt)
        self[key] = _onehot(folder, task)
        return self[key]


@pytest.fixture(scope="module")
def onehot_baseline(tmp_path_factory: pytest.TempPathFactory) -> _Baseline:
    return _Baseline(tmp_path_factory.mktemp("onehot_base"))


def test_baseline_features_are_as_built(onehot_baseline) -> None:
    f, unusable = onehot_baseline[True, "pe"]
    assert f.loc["s1", TARGETS].tolist() == [0, 0, 0, 0, 0]
    assert f.loc["s3", TARGETS].tolist() == [0, 0, 0, 0, 0]
    # person 2: heart failure (date only, 2018), anticoagulant, dialysis, creatinine 2.5 at 08:00
    assert f.loc["s2", TARGETS].tolist() == [1, 1, 0, 1, 1]
    assert f.loc["s1", "dx_hypertension"] == 1 and f.loc["s1", "male"] == 1
    assert len(unusable) == 0
    # without datetime columns the index-day creatinine of person 2 is date-only: not used
    f_date_only, _ = onehot_baseline[False, "pe"]
    assert f_date_only.loc["s2", "lab_creatinine_high"] == 0
    assert f_date_only.loc["s2", TARGETS[:4]].tolist() == [1, 1, 0, 1]


@pytest.mark.parametrize("with_dt", [True, False], ids=["datetime-columns", "no-datetime-columns"])
@pytest.mark.parametrize("variant", list(LEAKS))
def test_records_at_or_after_the_scan_change_no_onehot_feature(onehot_baseline, tmp_path: Path, variant: str,
                                                                with_dt: bool) -> None:
    when = LEAKS[variant]
    folder = _write_omop(tmp_path / "omop", _baseline() + _planted(when), datetime_columns=with_dt)
    for task in ("pe", "mace"):
        base, base_unusable = onehot_baseline[with_dt, task]
        # the studies indexed at INDEX alone (unusable lab rows are counted over the cohort)
        got, unusable = _onehot(folder, task, _cohort().iloc[:3])
        pd.testing.assert_frame_equal(got, base.loc[AT_INDEX])
        pd.testing.assert_frame_equal(unusable, base_unusable, check_dtype=False)
        # the planted records are real: person 1's later CT does see them
        got, unusable = _onehot(folder, task)
        pd.testing.assert_frame_equal(got.loc[AT_INDEX], base.loc[AT_INDEX])
        later = [c for c in TARGETS if c in got.columns]
        assert got.loc["s1_later", later].eq(1).all(), got.loc["s1_later", later]
        assert base.loc["s1_later", later].eq(0).all()
        assert unusable.to_dict("records") == [{"lab": "creatinine", "unit": "mmol/L", "rows": 1}]


@pytest.mark.parametrize(
    ("variant", "with_dt"),
    [("index_day_before_scan", True), ("day_before_date_only", True), ("day_before_date_only", False)],
    ids=["index_day_before_scan", "day_before_date_only", "day_before_date_only-no-datetime-columns"],
)
def test_records_before_the_scan_do_count(onehot_baseline, tmp_path: Path, variant: str, with_dt: bool) -> None:
    when = BEFORE[variant]
    folder = _write_omop(tmp_path / "omop", _baseline() + _planted(when), datetime_columns=with_dt)
    base, _ = onehot_baseline[with_dt, "pe"]
    got, unusable = _onehot(folder, "pe")
    for study in ("s1", "s3"):
        assert got.loc[study, TARGETS].tolist() == [1, 1, 1, 1, 1], (study, got.loc[study, TARGETS])
        assert base.loc[study, TARGETS].tolist() == [0, 0, 0, 0, 0]
    assert got.loc["s2", "rx_loop_diuretic"] == 1 and base.loc["s2", "rx_loop_diuretic"] == 0
    # person 2's last creatinine: the planted 0.8 at 10:29 is after the 2.5 at 08:00; a date-only
    # record of the day before is placed at its end (23:59:59), still before 08:00 of the index day
    if variant == "index_day_before_scan":
        assert got.loc["s2", "lab_creatinine_high"] == 0
    elif with_dt:
        assert got.loc["s2", "lab_creatinine_high"] == 1
    else:  # no datetimes: the 2.5 of the index day is date-only, so only the planted 0.8 counts
        assert got.loc["s2", "lab_creatinine_high"] == 0
    assert unusable.to_dict("records") == [{"lab": "creatinine", "unit": "mmol/L", "rows": 1}]


def test_an_index_in_the_last_second_of_the_day_still_ignores_date_only_records(tmp_path: Path) -> None:
    index = DAY + pd.Timedelta(hours=23, minutes=59, seconds=59, milliseconds=500)
    cohort = pd.DataFrame({"study_id": ["s1"], "person_id": ["1"], "index_time": [index]})
    for when, counts in ((DAY.date(), 0), (DAY + pd.Timedelta(hours=23, minutes=59, seconds=59), 1)):
        folder = _write_omop(tmp_path / str(counts), _baseline() + [_rec("drug", 1, _cid("anticoagulant"), when)])
        con = connect_omop(folder)
        try:
            got = onehot_features(con, cohort, "pe").features.set_index("study_id")
        finally:
            con.close()
        assert got.loc["s1", "rx_anticoagulant"] == counts


def test_lookback_windows_are_kept(tmp_path: Path) -> None:
    """A record dated ``lookback_days`` before the index date counts; one day earlier does not."""
    records = _baseline() + [
        _rec("drug", 1, _cid("anticoagulant"), (DAY - pd.Timedelta(days=365)).date()),            # 1 year: in
        _rec("drug", 3, _cid("anticoagulant"), DAY - pd.Timedelta(days=366) + pd.Timedelta(hours=23)),  # out
        _rec("condition", 1, _cid("heart_failure"), DAY - pd.Timedelta(days=5 * 365) + pd.Timedelta(hours=1)),
        _rec("condition", 3, _cid("heart_failure"), (DAY - pd.Timedelta(days=5 * 365 + 1)).date()),
    ]
    f, _ = _onehot(_write_omop(tmp_path / "omop", records), "pe")
    assert f.loc["s1", ["rx_anticoagulant", "dx_heart_failure"]].tolist() == [1, 1]
    assert f.loc["s3", ["rx_anticoagulant", "dx_heart_failure"]].tolist() == [0, 0]


# ----------------------------------------------------------------------------- MEDS + clmbr_mini


def _meds_events(folder: Path, out: Path) -> pd.DataFrame:
    """The MEDS events as ``helpers.extract`` gets them: export, write, read back."""
    from helpers.meds import omop_to_meds, read_meds, write_meds

    con = connect_omop(folder)
    try:
        events = omop_to_meds(con)
    finally:
        con.close()
    return read_meds(write_meds(events, out))


@pytest.fixture(scope="module")
def clmbr(tmp_path_factory: pytest.TempPathFactory):
    """A tiny clmbr_mini pretrained on the baseline timelines (every code in the vocabulary)."""
    from helpers.encoders.clmbr_mini import ClmbrMiniConfig, ClmbrMiniEncoder, pretrain_clmbr_mini

    root = tmp_path_factory.mktemp("clmbr_leak")
    events = _meds_events(_write_omop(root / "omop", _baseline() + _planted(DAY - pd.Timedelta(days=30, hours=-9))),
                          root / "meds")
    config = ClmbrMiniConfig(hidden_size=16, n_layers=1, n_heads=2, intermediate_size=32, max_len=32,
                             min_count=1, n_bins=2, epochs=1, batch_size=4, seed=5)
    result = pretrain_clmbr_mini(events, [1, 2], [3], root / "model", config=config)
    encoder = ClmbrMiniEncoder(result.checkpoint)
    base_events = _meds_events(_write_omop(root / "base", _baseline()), root / "base_meds")
    return encoder, base_events, encoder.embed(base_events, _cohort())


@pytest.mark.parametrize("variant", list(LEAKS))
def test_records_at_or_after_the_scan_leave_the_clmbr_mini_embedding_unchanged(clmbr, tmp_path: Path,
                                                                               variant: str) -> None:
    encoder, base_events, base = clmbr
    events = _meds_events(_write_omop(tmp_path / "omop", _baseline() + _planted(LEAKS[variant])), tmp_path / "meds")
    assert len(events) == len(base_events) + len(_planted(LEAKS[variant]))  # every planted record is exported
    got = encoder.embed(events, _cohort())
    np.testing.assert_allclose(got[:3], base[:3], atol=1e-6)
    assert np.abs(got[3] - base[3]).max() > 1e-4  # person 1's later CT reads them


@pytest.mark.parametrize("variant", list(BEFORE))
def test_records_before_the_scan_change_the_clmbr_mini_embedding(clmbr, tmp_path: Path, variant: str) -> None:
    encoder, _, base = clmbr
    events = _meds_events(_write_omop(tmp_path / "omop", _baseline() + _planted(BEFORE[variant])), tmp_path / "meds")
    got = encoder.embed(events, _cohort())
    assert (np.abs(got - base).max(axis=1) > 1e-4).all()


def test_clmbr_mini_ignores_date_only_records_of_the_index_day_for_a_ct_in_its_last_second(clmbr,
                                                                                          tmp_path: Path) -> None:
    encoder, base_events, _ = clmbr
    index = DAY + pd.Timedelta(hours=23, minutes=59, seconds=59, milliseconds=500)
    cohort = pd.DataFrame({"study_id": ["s1", "s2", "s3"], "person_id": ["1", "2", "3"], "index_time": index})
    base = encoder.embed(base_events, cohort)
    date_only = _meds_events(_write_omop(tmp_path / "a", _baseline() + _planted(DAY.date())), tmp_path / "a_meds")
    np.testing.assert_allclose(encoder.embed(date_only, cohort), base, atol=1e-6)
    timed = _planted(DAY + pd.Timedelta(hours=23, minutes=59, seconds=58))
    events = _meds_events(_write_omop(tmp_path / "b", _baseline() + timed), tmp_path / "b_meds")
    assert (np.abs(encoder.embed(events, cohort) - base).max(axis=1) > 1e-4).all()
