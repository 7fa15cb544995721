"""OMOP CDM -> MEDS (Medical Event Data Standard, version 0.3), the format femr reads.

A MEDS dataset is a folder::

    data/<shard>.parquet          subject_id int64, time timestamp[us], code string,
                                  numeric_value float32 (+ extra column unit string)
    metadata/dataset.json         dataset_name, dataset_version, etl_name, etl_version,
                                  meds_version, created_at
    metadata/codes.parquet        code, description, parent_codes (list<string>)
    metadata/subject_splits.parquet  subject_id int64, split string (when splits are given)
    metadata/omop_to_meds.json    what the export kept and what it could not map (this module)

One row is one event; rows are sorted by ``subject_id`` then ``time`` (static events, whose
``time`` is null, first) then ``code``. Codes are ``VOCABULARY/CONCEPT_CODE`` taken from the
OMOP ``concept`` table (``ICD10CM/I26.99``, ``RxNorm/1364430``, ``LOINC/2160-0``,
``CPT4/71275``, ``Visit/IP``, ``Gender/F``), never the local ``concept_id``; birth and death
are ``MEDS_BIRTH`` and ``MEDS_DEATH``.

Mapping choices (each one stated where it matters downstream):

* ``subject_id`` is OMOP ``person.person_id`` unchanged (int64). The cohort table's
  ``person_id`` is the same number written as a string, so ``cohort_subject_ids(cohort)``
  is ``int64(person_id)``; ``person_source_value`` is not used.
* Event times are the OMOP ``*_datetime`` columns; a record with only a date (datetime null
  or column absent) is placed at 23:59:59 of that day (as meds_etl does), so a date-only record
  is never seen as earlier than something that happened later that day (an index CT in
  particular). A reader that keeps the events with ``time < index_time`` (``clmbr_mini``)
  thus applies the index rule of ``helpers.ehr``: a timed record counts iff ``datetime <
  index_time``, a date-only one iff its date is before the index date (``clmbr_mini`` cuts a
  CT in the last second of a day, after 23:59:59, at 23:59:59 so that this stays exact).
* Gender is a static event (``time`` null). ``MEDS_BIRTH`` is at ``birth_datetime``, else at
  ``year/month/day_of_birth`` (month 7 and day 1 when missing).
* Visits are exported at their start; conditions, drugs and procedures at their start;
  measurements with ``value_as_number`` as ``numeric_value`` and ``unit_source_value`` in the
  extra ``unit`` column. ``observation_period`` is not an event and is not exported.
* Nothing is dropped silently: a record whose concept is 0, absent from ``concept`` or
  without a vocabulary/code, or with neither datetime nor date, is left out and counted per
  table in ``events.attrs["meds_report"]`` (and in ``metadata/omop_to_meds.json``).
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "MEDS_VERSION",
    "BIRTH_CODE",
    "DEATH_CODE",
    "DATA_COLUMNS",
    "MedsError",
    "omop_to_meds",
    "omop_codes",
    "cohort_subject_ids",
    "cohort_subject_splits",
    "write_meds",
    "read_meds",
    "export_omop_to_meds",
]

_log = logging.getLogger(__name__)

MEDS_VERSION = "0.3.3"
ETL_NAME = "helpers.meds"
ETL_VERSION = "1.0.0"
BIRTH_CODE = "MEDS_BIRTH"
DEATH_CODE = "MEDS_DEATH"
DATA_COLUMNS = ("subject_id", "time", "code", "numeric_value", "unit")

_DATA_SCHEMA = pa.schema(
    [
        ("subject_id", pa.int64()),
        ("time", pa.timestamp("us")),
        ("code", pa.string()),
        ("numeric_value", pa.float32()),
        ("unit", pa.string()),
    ]
)
_CODES_SCHEMA = pa.schema([("code", pa.string()), ("description", pa.string()), ("parent_codes", pa.list_(pa.string()))])
_SPLITS_SCHEMA = pa.schema([("subject_id", pa.int64()), ("split", pa.string())])

# table, concept column, datetime column, date column, value column, unit column
_EVENT_TABLES: tuple[tuple[str, str, str, str, str | None, str | None], ...] = (
    ("visit_occurrence", "visit_concept_id", "visit_start_datetime", "visit_start_date", None, None),
    ("condition_occurrence", "condition_concept_id", "condition_start_datetime", "condition_start_date", None, None),
    ("drug_exposure", "drug_concept_id", "drug_exposure_start_datetime", "drug_exposure_start_date", None, None),
    ("procedure_occurrence", "procedure_concept_id", "procedure_datetime", "procedure_date", None, None),
    ("measurement", "measurement_concept_id", "measurement_datetime", "measurement_date", "value_as_number", "unit_source_value"),
)


class MedsError(ValueError):
    """A MEDS folder or events table is malformed, or a cohort does not map to subjects."""


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> set[str]:
    try:
        return {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
    except duckdb.Error as err:
        raise MedsError(f"OMOP table {table!r} is not available on the connection: {err}") from err


def _time_expr(columns: set[str], dt: str, date: str, alias: str = "t") -> str:
    """SQL for an event's time: the datetime, else the date at 23:59:59 (the date's day, even
    when the date column is stored as a timestamp)."""
    parts = []
    if dt in columns:
        parts.append(f"CAST({alias}.{dt} AS TIMESTAMP)")
    if date in columns:
        parts.append(f"CAST(CAST({alias}.{date} AS DATE) AS TIMESTAMP) + INTERVAL 86399 SECOND")
    if not parts:
        raise MedsError(f"OMOP table lacks both {dt!r} and {date!r}")
    return parts[0] if len(parts) == 1 else f"coalesce({', '.join(parts)})"


def omop_to_meds(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """Every OMOP event as one MEDS row.

    ``con`` has one view per OMOP table (``helpers.cohort.connect_omop``). Returns a
    DataFrame with ``subject_id`` (int64, = OMOP person_id), ``time`` (datetime64[us], NaT for
    static events), ``code`` (str), ``numeric_value`` (float32, NaN when none) and ``unit``
    (str or None), sorted by subject, time (static first), code. ``attrs["meds_report"]``
    lists per source table the rows read, exported and left out (``unmapped_concept``: concept
    0 without a source concept, unknown or without vocabulary/code; ``no_time``: neither
    datetime nor date). A record whose concept is 0 is exported under its source concept
    (``*_source_concept_id``) where it has one.
    """
    report = []
    parts = []
    concept = "(SELECT concept_id, vocabulary_id, concept_code FROM concept)"
    mapped = "(c.vocabulary_id IS NOT NULL AND c.concept_code IS NOT NULL AND c.vocabulary_id <> '' AND c.concept_code <> '' AND c.concept_id <> 0)"
    for table, concept_col, dt, date, value, unit in _EVENT_TABLES:
        cols = _columns(con, table)
        for needed in ("person_id", concept_col):
            if needed not in cols:
                raise MedsError(f"OMOP table {table!r} lacks column {needed!r}")
        time = _time_expr(cols, dt, date)
        value_sql = f"CAST(t.{value} AS FLOAT)" if value and value in cols else "CAST(NULL AS FLOAT)"
        unit_sql = f"CAST(t.{unit} AS VARCHAR)" if unit and unit in cols else "CAST(NULL AS VARCHAR)"
        # a record without a standard concept (concept id 0) keeps its source concept, as a
        # real export leaves an unmapped ICD-10-CM code in *_source_concept_id
        source_col = concept_col.replace("_concept_id", "_source_concept_id")
        key = (f"CASE WHEN coalesce(t.{concept_col}, 0) = 0 THEN t.{source_col} ELSE t.{concept_col} END"
               if source_col in cols else f"t.{concept_col}")
        base = f"""
            SELECT CAST(t.person_id AS BIGINT) AS subject_id, {time} AS time,
                   c.vocabulary_id || '/' || c.concept_code AS code, {mapped} AS mapped,
                   {value_sql} AS numeric_value, {unit_sql} AS unit
            FROM {table} t LEFT JOIN {concept} c ON c.concept_id = {key}
        """
        counts = con.execute(
            f"SELECT count(*), count(*) FILTER (WHERE NOT mapped), "
            f"count(*) FILTER (WHERE mapped AND time IS NULL) FROM ({base})"
        ).fetchall()[0]
        report.append(_report_row(table, *counts))
        parts.append(f"SELECT subject_id, time, code, numeric_value, unit FROM ({base}) WHERE mapped AND time IS NOT NULL")

    # person: gender (static) and birth.
    pcols = _columns(con, "person")
    birth_parts = []
    if "birth_datetime" in pcols:
        birth_parts.append("CAST(p.birth_datetime AS TIMESTAMP)")
    if "year_of_birth" in pcols:
        month = "coalesce(p.month_of_birth, 7)" if "month_of_birth" in pcols else "7"
        day = "coalesce(p.day_of_birth, 1)" if "day_of_birth" in pcols else "1"
        birth_parts.append(f"CAST(make_date(CAST(p.year_of_birth AS INT), CAST({month} AS INT), CAST({day} AS INT)) AS TIMESTAMP)")
    if not birth_parts:
        raise MedsError("OMOP table 'person' lacks both 'birth_datetime' and 'year_of_birth'")
    birth = birth_parts[0] if len(birth_parts) == 1 else f"coalesce({', '.join(birth_parts)})"
    n_person, n_birth = con.execute(f"SELECT count(*), count({birth}) FROM person p").fetchall()[0]
    report.append(_report_row("person (birth)", n_person, 0, n_person - n_birth))
    parts.append(
        f"SELECT CAST(p.person_id AS BIGINT), {birth}, '{BIRTH_CODE}', CAST(NULL AS FLOAT), CAST(NULL AS VARCHAR) "
        f"FROM person p WHERE {birth} IS NOT NULL"
    )
    gender = f"""SELECT CAST(p.person_id AS BIGINT) AS subject_id, c.vocabulary_id || '/' || c.concept_code AS code,
                        {mapped} AS mapped
                 FROM person p LEFT JOIN {concept} c ON c.concept_id = p.gender_concept_id"""
    n_gender, n_unmapped = con.execute(f"SELECT count(*), count(*) FILTER (WHERE NOT mapped) FROM ({gender})").fetchall()[0]
    report.append(_report_row("person (gender)", n_gender, n_unmapped, 0))
    parts.append(
        f"SELECT subject_id, CAST(NULL AS TIMESTAMP), code, CAST(NULL AS FLOAT), CAST(NULL AS VARCHAR) FROM ({gender}) WHERE mapped"
    )
    dcols = _columns(con, "death")
    dtime = _time_expr(dcols, "death_datetime", "death_date", alias="d")
    n_death, n_dnull = con.execute(f"SELECT count(*), count(*) FILTER (WHERE {dtime} IS NULL) FROM death d").fetchall()[0]
    report.append(_report_row("death", n_death, 0, n_dnull))
    parts.append(
        f"SELECT CAST(d.person_id AS BIGINT), {dtime}, '{DEATH_CODE}', CAST(NULL AS FLOAT), CAST(NULL AS VARCHAR) "
        f"FROM death d WHERE {dtime} IS NOT NULL"
    )

    query = " UNION ALL ".join(f"({p})" for p in parts)
    arrow = con.sql(
        f"SELECT * FROM ({query}) ORDER BY subject_id, time ASC NULLS FIRST, code, numeric_value NULLS FIRST"
    ).to_arrow_table()
    arrow = arrow.rename_columns(list(DATA_COLUMNS)).cast(_DATA_SCHEMA)
    events = _to_pandas(arrow)
    left_out = sum(r["unmapped_concept"] + r["no_time"] for r in report)
    if left_out:
        _log.warning("omop_to_meds: %d OMOP record(s) left out (see attrs['meds_report']): %s", left_out,
                     "; ".join(f"{r['table']}: {r['unmapped_concept']} unmapped, {r['no_time']} without time"
                               for r in report if r["unmapped_concept"] or r["no_time"]))
    events.attrs["meds_report"] = report
    return events


def _report_row(table: str, rows: int, unmapped: int, no_time: int) -> dict:
    rows, unmapped, no_time = int(rows), int(unmapped), int(no_time)
    return {"table": table, "rows": rows, "exported": rows - unmapped - no_time,
            "unmapped_concept": unmapped, "no_time": no_time}


def _to_pandas(table: pa.Table) -> pd.DataFrame:
    frame = table.to_pandas()
    frame["subject_id"] = frame["subject_id"].astype("int64")
    frame["time"] = pd.to_datetime(frame["time"]).astype("datetime64[us]")
    frame["numeric_value"] = frame["numeric_value"].astype("float32")
    return frame


def omop_codes(con: duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The MEDS ``codes`` metadata from the OMOP ``concept`` table: ``code``
    (``VOCAB/CODE``), ``description`` (concept_name), ``parent_codes`` (empty lists: the
    export carries no concept hierarchy), plus ``MEDS_BIRTH`` and ``MEDS_DEATH``."""
    frame = con.execute(
        """SELECT DISTINCT vocabulary_id || '/' || concept_code AS code, concept_name AS description
           FROM concept WHERE vocabulary_id IS NOT NULL AND concept_code IS NOT NULL AND concept_id <> 0
           ORDER BY code"""
    ).df()
    frame = frame.drop_duplicates("code").reset_index(drop=True)
    extra = pd.DataFrame({"code": [BIRTH_CODE, DEATH_CODE], "description": ["Birth", "Death"]})
    frame = pd.concat([frame, extra], ignore_index=True)
    frame["parent_codes"] = [[] for _ in range(len(frame))]
    return frame


def cohort_subject_ids(cohort: pd.DataFrame) -> np.ndarray:
    """MEDS ``subject_id`` (int64) of each cohort row: the cohort's ``person_id`` string is the
    OMOP ``person_id``. Raises ``MedsError`` naming values that are not integers."""
    if "person_id" not in cohort.columns:
        raise MedsError("cohort lacks column 'person_id'")
    values = cohort["person_id"].astype(str)
    ok = values.str.fullmatch(r"-?\d+")
    if not ok.all():
        bad = values[~ok].unique()[:5]
        raise MedsError(
            f"cohort column 'person_id' must hold integer OMOP person_id values; "
            f"{int((~ok).sum())} row(s) do not, e.g. {', '.join(bad)}"
        )
    return values.astype("int64").to_numpy()


def cohort_subject_splits(cohort: pd.DataFrame) -> pd.DataFrame:
    """MEDS subject splits from a cohort table: ``train`` -> ``train``, ``val`` -> ``tuning``,
    ``test`` -> ``held_out`` (MEDS names), ``external`` kept as ``external``. Raises
    ``MedsError`` when a person has studies in two splits."""
    names = {"train": "train", "val": "tuning", "test": "held_out", "external": "external"}
    if "split" not in cohort.columns:
        raise MedsError("cohort lacks column 'split'")
    unknown = sorted(set(cohort["split"].astype(str)) - set(names))
    if unknown:
        raise MedsError(f"cohort column 'split' has unknown value(s) {unknown}; expected {sorted(names)}")
    frame = pd.DataFrame({"subject_id": cohort_subject_ids(cohort), "split": cohort["split"].map(names).to_numpy()})
    frame = frame.drop_duplicates()
    dup = frame["subject_id"].duplicated(keep=False)
    if dup.any():
        raise MedsError(
            f"cohort: {int(frame.loc[dup, 'subject_id'].nunique())} person(s) appear in two splits, "
            f"e.g. {', '.join(map(str, frame.loc[dup, 'subject_id'].unique()[:5]))}"
        )
    return frame.sort_values("subject_id").reset_index(drop=True)


def _check_events(events: pd.DataFrame, source: str) -> None:
    missing = [c for c in DATA_COLUMNS[:4] if c not in events.columns]
    if missing:
        raise MedsError(f"{source}: missing MEDS column(s) {', '.join(missing)}; expected {', '.join(DATA_COLUMNS[:4])}")
    if events["code"].isna().any():
        raise MedsError(f"{source}: column 'code' has {int(events['code'].isna().sum())} null value(s)")


def write_meds(
    events: pd.DataFrame,
    out_dir: Path,
    *,
    subject_splits: pd.DataFrame | None = None,
    codes: pd.DataFrame | None = None,
    dataset_name: str = "helpers-omop",
    dataset_version: str = "1",
    subjects_per_shard: int | None = None,
) -> Path:
    """Write ``events`` (``omop_to_meds`` output) as a MEDS 0.3 folder, atomically (a temp
    folder renamed when complete; an existing ``out_dir`` is replaced).

    ``subject_splits``: ``subject_id``, ``split`` (e.g. ``cohort_subject_splits``); ``codes``:
    ``code``, ``description``, ``parent_codes`` (default: the event codes without
    description). ``subjects_per_shard`` splits ``data/`` into files of that many subjects
    (default one file ``data/0.parquet``). Returns ``out_dir``.
    """
    _check_events(events, "events")
    out_dir = Path(out_dir)
    frame = events.loc[:, [c for c in DATA_COLUMNS if c in events.columns]].copy()
    if "unit" not in frame.columns:
        frame["unit"] = None
    frame["time"] = pd.to_datetime(frame["time"]).astype("datetime64[us]")
    frame = frame.sort_values(["subject_id", "time", "code"], na_position="first", kind="stable")
    table = pa.Table.from_pandas(frame, schema=_DATA_SCHEMA, preserve_index=False)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "data").mkdir(parents=True)
    (tmp / "metadata").mkdir()
    subjects = frame["subject_id"].to_numpy()
    if subjects_per_shard and len(subjects):
        unique = np.unique(subjects)
        for shard, start in enumerate(range(0, len(unique), subjects_per_shard)):
            lo, hi = unique[start], unique[min(start + subjects_per_shard, len(unique)) - 1]
            a, b = np.searchsorted(subjects, lo, "left"), np.searchsorted(subjects, hi, "right")
            pq.write_table(table.slice(a, b - a), tmp / "data" / f"{shard}.parquet")
    else:
        pq.write_table(table, tmp / "data" / "0.parquet")
    if codes is None:
        codes = pd.DataFrame({"code": sorted(frame["code"].unique()), "description": None})
        codes["parent_codes"] = [[] for _ in range(len(codes))]
    codes = codes.copy()
    if "parent_codes" not in codes.columns:
        codes["parent_codes"] = [[] for _ in range(len(codes))]
    pq.write_table(pa.Table.from_pandas(codes[["code", "description", "parent_codes"]], schema=_CODES_SCHEMA,
                                        preserve_index=False), tmp / "metadata" / "codes.parquet")
    if subject_splits is not None:
        for c in ("subject_id", "split"):
            if c not in subject_splits.columns:
                raise MedsError(f"subject_splits lacks column {c!r}")
        splits = subject_splits[["subject_id", "split"]].astype({"subject_id": "int64", "split": str})
        pq.write_table(pa.Table.from_pandas(splits, schema=_SPLITS_SCHEMA, preserve_index=False),
                       tmp / "metadata" / "subject_splits.parquet")
    dataset = {
        "dataset_name": dataset_name,
        "dataset_version": dataset_version,
        "etl_name": ETL_NAME,
        "etl_version": ETL_VERSION,
        "meds_version": MEDS_VERSION,
        "created_at": datetime.now(UTC).replace(microsecond=0).isoformat(),
    }
    (tmp / "metadata" / "dataset.json").write_text(json.dumps(dataset, indent=2) + "\n")
    report = events.attrs.get("meds_report")
    if report is not None:
        (tmp / "metadata" / "omop_to_meds.json").write_text(json.dumps({"tables": report}, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def read_meds(meds_dir: Path) -> pd.DataFrame:
    """Read the events of a MEDS folder (every ``data/**/*.parquet``) as ``omop_to_meds``
    returns them, sorted by subject, time (static first), code. ``attrs["meds_report"]`` is
    restored when the folder has ``metadata/omop_to_meds.json``."""
    meds_dir = Path(meds_dir)
    files = sorted((meds_dir / "data").rglob("*.parquet"))
    if not files:
        raise MedsError(f"{meds_dir}: no data/*.parquet files (not a MEDS folder?)")
    tables = []
    for file in files:
        table = pq.read_table(file)
        missing = [c for c in DATA_COLUMNS[:4] if c not in table.column_names]
        if missing:
            raise MedsError(f"{file}: missing MEDS column(s) {', '.join(missing)}")
        if "unit" not in table.column_names:
            table = table.append_column("unit", pa.nulls(len(table), pa.string()))
        tables.append(table.select(list(DATA_COLUMNS)).cast(_DATA_SCHEMA))
    events = _to_pandas(pa.concat_tables(tables))
    events = events.sort_values(["subject_id", "time", "code"], na_position="first", kind="stable").reset_index(drop=True)
    report = meds_dir / "metadata" / "omop_to_meds.json"
    if report.is_file():
        events.attrs["meds_report"] = json.loads(report.read_text())["tables"]
    return events


def export_omop_to_meds(omop_tables: Path, out_dir: Path, *, cohort: pd.DataFrame | None = None,
                        dataset_name: str = "helpers-omop") -> Path:
    """``connect_omop`` + ``omop_to_meds`` + ``write_meds`` with the concept descriptions and,
    when ``cohort`` is given, its subject splits. Returns ``out_dir``."""
    from helpers.cohort import connect_omop

    con = connect_omop(Path(omop_tables))
    try:
        events = omop_to_meds(con)
        codes = omop_codes(con)
    finally:
        con.close()
    splits = cohort_subject_splits(cohort) if cohort is not None else None
    return write_meds(events, out_dir, subject_splits=splits, codes=codes, dataset_name=dataset_name)
