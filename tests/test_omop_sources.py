"""OMOP CDM sources (helpers.omop): the same twin tables as parquet, as CSV exports (upper-case
file and column names, text dates, gzip, TSV), as a DuckDB file and in a real PostgreSQL
server give the same cohort and the same features, row for row; bad values are named."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from helpers import cohort as hc
from helpers.ehr import onehot_features
from helpers.omop import (
    CDM_TYPES,
    OmopSourceError,
    connect,
    describe,
    load_into_postgres,
    scratch_postgres,
    source_label,
)
from helpers.twin import generate
from helpers.vocabulary import OMOP_TABLES, VOCABULARY_TABLES

TABLES = OMOP_TABLES + VOCABULARY_TABLES


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    out = tmp_path_factory.mktemp("omop-twin")
    generate(out, profile="tiny", seed=4, tasks=("pe",), images=False)
    return out / "pe"


def _cohort_and_features(source, twin: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    con = connect(source)
    index = hc.read_imaging_index(twin / "imaging_index.parquet")
    result = hc.build_cohort(con, index, "pe", imaging_root=twin, check_files=False)
    cohort = result.cohort.sort_values("study_id").reset_index(drop=True)
    features = onehot_features(con, cohort, "pe").features.sort_values("study_id").reset_index(drop=True)
    con.close()
    return cohort, features


def _export(twin: Path, folder: Path, *, suffix: str, upper: bool) -> Path:
    """The twin's tables as a CSV/TSV export: dates and datetimes as text, upper-case names."""
    folder.mkdir(parents=True)
    for table in TABLES:
        frame = pd.read_parquet(twin / "omop" / f"{table}.parquet")
        for column in frame.columns:
            if pd.api.types.is_datetime64_any_dtype(frame[column]):
                text = frame[column].dt.strftime("%Y-%m-%d %H:%M:%S")
                frame[column] = text.where(frame[column].notna(), None)
        if upper:
            frame.columns = [c.upper() for c in frame.columns]
        name = table.upper() if upper else table
        sep = "\t" if suffix.startswith(".tsv") else ","
        frame.to_csv(folder / f"{name}{suffix}", index=False, sep=sep,
                     compression="gzip" if suffix.endswith(".gz") else None)
    return folder


@pytest.mark.parametrize("suffix, upper", [(".csv", True), (".csv.gz", False), (".tsv", True)])
def test_csv_exports_give_the_parquet_cohort_and_features(twin, tmp_path, suffix, upper):
    expected = _cohort_and_features(twin / "omop", twin)
    assert len(expected[0]) > 100 and expected[0]["event"].sum() > 5 and expected[1].iloc[:, 1:].to_numpy().sum() > 0
    got = _cohort_and_features(_export(twin, tmp_path / "export", suffix=suffix, upper=upper), twin)
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[1], expected[1])


def test_every_table_is_cast_to_the_cdm_types(twin, tmp_path):
    con = connect(_export(twin, tmp_path / "export", suffix=".csv", upper=True))
    for table in OMOP_TABLES:
        types = {row[0]: row[1] for row in con.execute(f"DESCRIBE {table}").fetchall()}
        for column, kind in types.items():
            if column in CDM_TYPES[table]:
                assert kind == CDM_TYPES[table][column], (table, column, kind)
    rows = {row["table"]: row["rows"] for row in describe(con)}
    assert rows["person"] == len(pd.read_parquet(twin / "omop" / "person.parquet"))


def _duckdb_file(twin: Path, database: Path, *, upper: bool = False) -> Path:
    """The twin's tables in a DuckDB database file (table names upper-case with ``upper``)."""
    con = duckdb.connect(str(database))
    for table in TABLES:
        name = table.upper() if upper else table
        con.execute(f"CREATE TABLE {name} AS SELECT * FROM read_parquet('{twin / 'omop' / f'{table}.parquet'}')")
    con.close()
    return database


def test_a_duckdb_file_gives_the_parquet_cohort(twin, tmp_path):
    database = _duckdb_file(twin, tmp_path / "omop.duckdb", upper=True)
    expected = _cohort_and_features(twin / "omop", twin)
    got = _cohort_and_features(database, twin)
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[1], expected[1])


def _copy_tables(twin: Path, folder: Path) -> Path:
    shutil.copytree(twin / "omop", folder)
    return folder


def test_bad_values_and_layouts_are_named(twin, tmp_path):
    export = _export(twin, tmp_path / "dates", suffix=".csv", upper=False)
    death = pd.read_csv(export / "death.csv")
    death.loc[0, "death_date"] = "03/01/2020"
    death.to_csv(export / "death.csv", index=False)
    with pytest.raises(OmopSourceError, match=r"death.csv: table 'death', column 'death_date': 1 value\(s\) cannot be "
                                              r"read as DATE \(OMOP CDM v5.4 type\), e.g. '03/01/2020'"):
        connect(export)
    export = _export(twin, tmp_path / "ids", suffix=".csv", upper=True)
    person = pd.read_csv(export / "PERSON.csv")
    person["PERSON_ID"] = person["PERSON_ID"].astype(float)
    person.loc[2, "PERSON_ID"] = 10.5
    person.to_csv(export / "PERSON.csv", index=False)
    with pytest.raises(OmopSourceError, match=r"table 'person', column 'PERSON_ID': 1 value\(s\) cannot be read as "
                                              r"BIGINT .* e.g. '10.5'"):
        connect(export)
    both = _copy_tables(twin, tmp_path / "both")
    pd.read_parquet(both / "death.parquet").to_csv(both / "DEATH.csv", index=False)
    with pytest.raises(OmopSourceError, match=r"table 'death' is in 2 files \(DEATH.csv, death.parquet\); keep one"):
        connect(both)
    lacking = _copy_tables(twin, tmp_path / "lacking")
    pd.read_parquet(lacking / "death.parquet").drop(columns="death_date").to_parquet(lacking / "death.parquet")
    with pytest.raises(OmopSourceError, match=r"death.parquet: table 'death' lacks required column\(s\) death_date"):
        connect(lacking)
    empty = _copy_tables(twin, tmp_path / "empty")
    (empty / "death.parquet").unlink()
    (empty / "death.csv").write_text("")
    with pytest.raises(OmopSourceError, match=r"death.csv: empty, or its first line is blank; expected a header line"):
        connect(empty)
    with pytest.raises(OmopSourceError, match=r"no such folder, DuckDB file or postgresql:// URL"):
        connect(tmp_path / "nowhere")


def test_an_all_empty_text_column_is_typed(twin, tmp_path):
    """pandas writes a column with no values as text (or null); DuckDB then cannot coalesce it
    with a timestamp. Cast to the CDM type, it is a null timestamp."""
    folder = _copy_tables(twin, tmp_path / "omop")
    frame = pd.read_parquet(folder / "condition_occurrence.parquet")
    frame["condition_start_datetime"] = pd.Series([None] * len(frame), dtype=object)
    frame["condition_start_date"] = frame["condition_start_date"].astype(str)
    frame.to_parquet(folder / "condition_occurrence.parquet")
    con = connect(folder)
    kinds = {r[0]: r[1] for r in con.execute("DESCRIBE condition_occurrence").fetchall()}
    assert kinds["condition_start_datetime"] == "TIMESTAMP" and kinds["condition_start_date"] == "DATE"
    cohort, features = _cohort_and_features(folder, twin)
    assert len(cohort) > 100 and features.iloc[:, 1:].to_numpy().sum() > 0


def test_a_url_is_shown_without_its_password():
    assert source_label("postgresql://study:secret@db.example/omop") == "postgresql://study@db.example/omop"
    assert source_label("postgresql://study@/omop?host=/tmp") == "postgresql://study@/omop?host=/tmp"


# ------------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL 15 cluster in a temporary folder, on a Unix socket only."""
    if not (shutil.which("initdb") and shutil.which("pg_ctl")):
        pytest.skip("PostgreSQL (initdb, pg_ctl) is not on the PATH")
    with scratch_postgres() as url:
        yield url


def test_postgresql_gives_the_parquet_cohort_row_for_row(twin, postgres, tmp_path):
    # typed CDM tables in schema cdm, the measurement table's column names in upper case
    load_into_postgres(postgres, twin / "omop", schema="cdm", upper=("measurement",))
    got = _cohort_and_features(f"{postgres}&options=-csearch_path%3Dcdm", twin)
    expected = _cohort_and_features(twin / "omop", twin)
    pd.testing.assert_frame_equal(got[0], expected[0])
    pd.testing.assert_frame_equal(got[1], expected[1])
    with pytest.raises(OmopSourceError, match=r"OMOP table\(s\) missing from schema 'public': person, "
                                              r".*add options=-csearch_path%3D<schema> to the URL"):
        connect(postgres)
    with pytest.raises(OmopSourceError, match=r"cannot connect to PostgreSQL"):
        connect(f"postgresql://study@/postgres?host={tmp_path}")


def test_a_union_of_sources_keeps_their_persons_and_records_apart(twin, tmp_path):
    from helpers.omop import connect_union

    # the same tables twice, once from a DuckDB file: ids collide everywhere, vocabularies agree
    database = _duckdb_file(twin, tmp_path / "omop.duckdb")
    union, offsets = connect_union([twin / "omop", database])
    single = connect(twin / "omop")
    try:
        largest = max(int(single.execute(f"SELECT max(person_id) FROM {t}").fetchall()[0][0] or 0) for t in ("person", "death"))
        assert offsets[0] == 0 and offsets[1] > largest and offsets[1] == 10 ** len(str(offsets[1] - 1))
        for table in OMOP_TABLES:
            n = single.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            both = union.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            # clinical tables hold both copies; the vocabulary holds one (the second adds nothing new)
            assert both == (n if table == "concept" else 2 * n), table
        for table in VOCABULARY_TABLES:
            assert (union.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
                    == single.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0])
        persons = union.execute("SELECT count(DISTINCT person_id) FROM person").fetchall()[0][0]
        assert persons == 2 * single.execute("SELECT count(*) FROM person").fetchall()[0][0]
        ids = union.execute("SELECT count(DISTINCT measurement_id), count(*) FROM measurement").fetchall()[0]
        assert ids[0] == ids[1]
        # concept ids are not offset: the second copy's records keep their concepts
        assert union.execute(f"SELECT count(*) FROM condition_occurrence WHERE person_id >= {offsets[1]} "
                             "AND condition_concept_id IN (SELECT concept_id FROM concept)").fetchall()[0][0] > 0
        # the second copy's cohort, through offset persons, is the first's
        index = hc.read_imaging_index(twin / "imaging_index.parquet")
        moved = index.assign(person_id=(index["person_id"].astype(int) + offsets[1]).astype(str),
                             study_id="b-" + index["study_id"])
        got = hc.build_cohort(union, moved, "pe", imaging_root=twin, check_files=False).cohort
        expected = hc.build_cohort(single, index, "pe", imaging_root=twin, check_files=False).cohort
        pd.testing.assert_frame_equal(got[["time", "event"]], expected[["time", "event"]])
    finally:
        union.close()
        single.close()
    # ids so large that an offset would overflow are refused, naming the sources
    huge = _copy_tables(twin, tmp_path / "huge")
    person = pd.read_parquet(huge / "person.parquet")
    person.loc[0, "person_id"] = 5 * 10 ** 18
    person.to_parquet(huge / "person.parquet")
    with pytest.raises(OmopSourceError, match=r"huge.*ids up to 5000000000000000000 leave no room"):
        connect_union([huge, twin / "omop"])
