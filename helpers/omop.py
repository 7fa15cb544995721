"""Opening an OMOP CDM v5.4 source: ``connect`` gives an in-memory DuckDB connection with one
view (or table) per OMOP table the study reads, its columns named in lower case and cast to
the CDM's types, whatever the source.

A source (``data.omop.tables`` in the manifest) is one of:

* a folder of per-table files, ``<table>.parquet``, ``.csv``, ``.csv.gz``, ``.tsv`` or
  ``.tsv.gz`` (file names in any case: exports write ``PERSON.csv`` too); CSV and TSV files are
  read as text and cast to the CDM types (an empty field is a null);
* a DuckDB database file holding the tables (table names in any case);
* a ``postgresql://`` URL (libpq's form: ``postgresql://user@/db?host=/socket/dir``; a
  schema other than the user's default through ``options=-csearch_path%3Dcdm``). The tables
  are copied out with PostgreSQL's own ``COPY ... TO STDOUT (FORMAT csv)`` through psycopg and
  loaded like CSV files. Why not DuckDB's ``postgres`` scanner or ibis: the scanner is a DuckDB
  extension fetched from the internet on first use, which the study's machines (and many
  hospital networks) do not allow; ibis would add a dataframe layer the study does not use.
  psycopg installs offline (its binary wheel bundles libpq) and ``COPY`` is the fastest way out
  of PostgreSQL. The copy holds the whole table in memory; a database far larger than memory
  wants a parquet export instead.

Column names in any case (``PERSON_ID``, ``condition_start_DATETIME``) become the CDM's lower
case; two columns that differ only in case are an error. Every CDM column present is cast to
its type of ``CDM_TYPES`` (ids ``BIGINT``, dates ``DATE``, datetimes ``TIMESTAMP``, values
``DOUBLE``, codes ``VARCHAR``): a value that cannot be cast (``'03/01/2020'`` for a date, ``'1.5'``
for an id) is an ``OmopSourceError`` naming the source, table, column, type, the number of such
values and one of them; columns outside the CDM are kept as they are. The columns of
``REQUIRED_COLUMNS`` must be there. ``concept_ancestor`` and ``concept_relationship`` are read
when the source has them (``OPTIONAL_TABLES``).

``describe`` lists each table's row count and the columns it lacks (``python -m helpers
manifest check``).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import duckdb
import pyarrow.parquet as pq

from helpers.vocabulary import OMOP_TABLES

__all__ = ["CohortError", "OmopSourceError", "CDM_TYPES", "REQUIRED_COLUMNS", "OPTIONAL_TABLES", "connect", "connect_union",
           "describe", "is_url", "source_label", "scratch_postgres", "load_into_postgres"]


class CohortError(ValueError):
    """An input of the cohort is missing, or lacks a column, or has bad values (the message
    names the file, table or column); ``helpers.cohort`` raises it too."""


class OmopSourceError(CohortError):
    """An OMOP source that cannot be read as CDM v5.4 (message names the source, table and column)."""


_ID, _INT, _DATE, _TS, _NUM, _TEXT = "BIGINT", "INTEGER", "DATE", "TIMESTAMP", "DOUBLE", "VARCHAR"


def _ids(*names: str) -> dict[str, str]:
    return dict.fromkeys(names, _ID)


# CDM v5.4 columns of the tables the study reads, with the DuckDB type each is cast to (every
# *_id and *_concept_id as BIGINT: local concept ids reach 2,000,000,000 and above).
CDM_TYPES: dict[str, dict[str, str]] = {
    "person": {**_ids("person_id", "gender_concept_id", "race_concept_id", "ethnicity_concept_id", "location_id",
                      "provider_id", "care_site_id", "gender_source_concept_id", "race_source_concept_id",
                      "ethnicity_source_concept_id"),
               "year_of_birth": _INT, "month_of_birth": _INT, "day_of_birth": _INT, "birth_datetime": _TS,
               "person_source_value": _TEXT, "gender_source_value": _TEXT, "race_source_value": _TEXT,
               "ethnicity_source_value": _TEXT},
    "observation_period": {**_ids("observation_period_id", "person_id", "period_type_concept_id"),
                           "observation_period_start_date": _DATE, "observation_period_end_date": _DATE},
    "visit_occurrence": {**_ids("visit_occurrence_id", "person_id", "visit_concept_id", "visit_type_concept_id",
                                "provider_id", "care_site_id", "visit_source_concept_id", "admitted_from_concept_id",
                                "discharged_to_concept_id", "preceding_visit_occurrence_id"),
                         "visit_start_date": _DATE, "visit_start_datetime": _TS, "visit_end_date": _DATE,
                         "visit_end_datetime": _TS, "visit_source_value": _TEXT, "admitted_from_source_value": _TEXT,
                         "discharged_to_source_value": _TEXT},
    "condition_occurrence": {**_ids("condition_occurrence_id", "person_id", "condition_concept_id",
                                    "condition_type_concept_id", "condition_status_concept_id", "provider_id",
                                    "visit_occurrence_id", "visit_detail_id", "condition_source_concept_id"),
                             "condition_start_date": _DATE, "condition_start_datetime": _TS,
                             "condition_end_date": _DATE, "condition_end_datetime": _TS, "stop_reason": _TEXT,
                             "condition_source_value": _TEXT, "condition_status_source_value": _TEXT},
    "drug_exposure": {**_ids("drug_exposure_id", "person_id", "drug_concept_id", "drug_type_concept_id",
                             "route_concept_id", "provider_id", "visit_occurrence_id", "visit_detail_id",
                             "drug_source_concept_id"),
                      "drug_exposure_start_date": _DATE, "drug_exposure_start_datetime": _TS,
                      "drug_exposure_end_date": _DATE, "drug_exposure_end_datetime": _TS, "verbatim_end_date": _DATE,
                      "stop_reason": _TEXT, "refills": _INT, "quantity": _NUM, "days_supply": _INT, "sig": _TEXT,
                      "lot_number": _TEXT, "drug_source_value": _TEXT, "route_source_value": _TEXT,
                      "dose_unit_source_value": _TEXT},
    "measurement": {**_ids("measurement_id", "person_id", "measurement_concept_id", "measurement_type_concept_id",
                           "operator_concept_id", "value_as_concept_id", "unit_concept_id", "provider_id",
                           "visit_occurrence_id", "visit_detail_id", "measurement_source_concept_id",
                           "unit_source_concept_id", "measurement_event_id", "meas_event_field_concept_id"),
                    "measurement_date": _DATE, "measurement_datetime": _TS, "measurement_time": _TEXT,
                    "value_as_number": _NUM, "range_low": _NUM, "range_high": _NUM,
                    "measurement_source_value": _TEXT, "unit_source_value": _TEXT, "value_source_value": _TEXT},
    "procedure_occurrence": {**_ids("procedure_occurrence_id", "person_id", "procedure_concept_id",
                                    "procedure_type_concept_id", "modifier_concept_id", "provider_id",
                                    "visit_occurrence_id", "visit_detail_id", "procedure_source_concept_id"),
                             "procedure_date": _DATE, "procedure_datetime": _TS, "procedure_end_date": _DATE,
                             "procedure_end_datetime": _TS, "quantity": _INT, "procedure_source_value": _TEXT,
                             "modifier_source_value": _TEXT},
    "death": {**_ids("person_id", "death_type_concept_id", "cause_concept_id", "cause_source_concept_id"),
              "death_date": _DATE, "death_datetime": _TS, "cause_source_value": _TEXT},
    "concept": {"concept_id": _ID, "concept_name": _TEXT, "domain_id": _TEXT, "vocabulary_id": _TEXT,
                "concept_class_id": _TEXT, "standard_concept": _TEXT, "concept_code": _TEXT,
                "valid_start_date": _DATE, "valid_end_date": _DATE, "invalid_reason": _TEXT},
    "concept_ancestor": {**_ids("ancestor_concept_id", "descendant_concept_id"),
                         "min_levels_of_separation": _INT, "max_levels_of_separation": _INT},
    "concept_relationship": {**_ids("concept_id_1", "concept_id_2"), "relationship_id": _TEXT,
                             "valid_start_date": _DATE, "valid_end_date": _DATE, "invalid_reason": _TEXT},
}

# The columns without which no query of the study can run (each table's dates are checked
# where they are read: a record needs its date or its datetime, ``helpers.ehr``).
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "person": ("person_id",),
    "observation_period": ("person_id", "observation_period_start_date", "observation_period_end_date"),
    "visit_occurrence": ("person_id",),
    "condition_occurrence": ("person_id", "condition_concept_id"),
    "drug_exposure": ("person_id", "drug_concept_id"),
    "measurement": ("person_id", "measurement_concept_id"),
    "procedure_occurrence": ("person_id", "procedure_concept_id"),
    "death": ("person_id", "death_date"),
    "concept": ("concept_id", "vocabulary_id", "concept_code"),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id"),
}

# Vocabulary tables read when present (concept sets resolve descendants and mappings through them).
OPTIONAL_TABLES: tuple[str, ...] = ("concept_ancestor", "concept_relationship")

_SUFFIXES = (".parquet", ".csv", ".csv.gz", ".tsv", ".tsv.gz")


def is_url(source: str | Path) -> bool:
    """Whether ``source`` is a PostgreSQL URL rather than a path."""
    return isinstance(source, str) and source.split("://", 1)[0] in ("postgresql", "postgres")


def source_label(source: str | Path) -> str:
    """``source`` as it may be shown: a URL without its password."""
    text = str(source)
    if is_url(text) and "@" in text.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = text.split("://", 1)
        credentials, host = rest.split("@", 1)
        return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"
    return text


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _text(path: Path | str) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _cast(column: str, target: str, source_type: str) -> tuple[str, str | None]:
    """SQL of ``column`` cast to ``target`` and, where a value may not cast, the SQL of a
    value that is present but does not cast (None where every value casts)."""
    col = _quoted(column)
    if source_type == target or (target == _ID and source_type in ("INTEGER", "SMALLINT", "TINYINT", "BIGINT")):
        return f"CAST({col} AS {target})", None
    text = source_type == _TEXT
    present = f"nullif(trim({col}), '')" if text else col
    if target == _DATE:
        value = f"coalesce(TRY_CAST({present} AS DATE), CAST(TRY_CAST({present} AS TIMESTAMP) AS DATE))"
    elif target == _TS:
        value = f"coalesce(TRY_CAST({present} AS TIMESTAMP), CAST(TRY_CAST({present} AS TIMESTAMPTZ) AS TIMESTAMP))"
    elif target in (_ID, _INT):
        number = f"TRY_CAST({present} AS DOUBLE)"
        value = f"(CASE WHEN {number} = round({number}) THEN TRY_CAST({number} AS {target}) END)"
    elif target == _TEXT:
        return f"CAST({col} AS VARCHAR)", None
    else:
        value = f"TRY_CAST({present} AS {target})"
    return value, f"({present} IS NOT NULL AND {value} IS NULL)"


def _typed(con: duckdb.DuckDBPyConnection, table: str, source: str, where: str, *, names: list[str] | None = None,
           materialize: bool = False, schema: str = "main") -> None:
    """``CREATE VIEW`` (or ``TABLE``, ``materialize``) ``<schema>.<table>`` over the relation
    ``source`` with lower-case column names and the CDM types; ``where`` names the source in
    errors; ``names``: the source's own column names where DuckDB renames a pair on read
    (parquet)."""
    raw = None
    if materialize:  # read the source once: into a raw table, checked and cast from there
        raw = f"_raw_{schema}_{table}"
        con.execute(f"CREATE TEMP TABLE {raw} AS SELECT * FROM {source}")
        source = raw
    described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    columns = {row[0]: row[1] for row in described}
    for group in (names or [], list(columns)):
        seen: dict[str, str] = {}
        for column in group:
            if column.lower() in seen:
                raise OmopSourceError(f"{where}: table {table!r} has columns {seen[column.lower()]!r} and {column!r}, "
                                      f"which differ only in case")
            seen[column.lower()] = column
    lower = {c.lower(): c for c in columns}
    missing = [c for c in REQUIRED_COLUMNS.get(table, ()) if c not in lower]
    if missing:
        raise OmopSourceError(f"{where}: table {table!r} lacks required column(s) {', '.join(missing)} "
                              f"(OMOP CDM v5.4; has {', '.join(columns) or 'no columns'})")
    types = CDM_TYPES.get(table, {})
    select, checks = [], []
    for column, source_type in columns.items():
        target = types.get(column.lower())
        if target is None:
            select.append(f"{_quoted(column)} AS {_quoted(column.lower())}")
            continue
        value, bad = _cast(column, target, source_type)
        select.append(f"{value} AS {_quoted(column.lower())}")
        if bad is not None:
            checks.append((column, target, bad))
    if checks:
        counts = con.execute(f"SELECT {', '.join(f'count_if({bad})' for _, _, bad in checks)} FROM {source}").fetchone()
        for (column, target, bad), count in zip(checks, counts, strict=True):
            if count:
                example = con.execute(f"SELECT {_quoted(column)} FROM {source} WHERE {bad} LIMIT 1").fetchone()[0]
                raise OmopSourceError(
                    f"{where}: table {table!r}, column {column!r}: {count} value(s) cannot be read as {target} "
                    f"(OMOP CDM v5.4 type), e.g. {str(example)!r}")
    kind = "TABLE" if materialize else "VIEW"
    con.execute(f"CREATE {kind} {schema}.{table} AS SELECT {', '.join(select)} FROM {source}")
    if raw is not None:
        con.execute(f"DROP TABLE {raw}")


def _files(folder: Path) -> dict[str, Path]:
    """The file of each OMOP table in ``folder`` (any case, any of ``_SUFFIXES``)."""
    found: dict[str, list[Path]] = {}
    for path in folder.iterdir():
        name = path.name.lower()
        for suffix in _SUFFIXES:
            if name.endswith(suffix) and path.is_file():
                found.setdefault(name[: -len(suffix)], []).append(path)
    out = {}
    for table in OMOP_TABLES + OPTIONAL_TABLES:
        paths = sorted(found.get(table, []))
        if len(paths) > 1:
            raise OmopSourceError(f"{folder}: table {table!r} is in {len(paths)} files "
                                  f"({', '.join(p.name for p in paths)}); keep one")
        if paths:
            out[table] = paths[0]
    return out


def _reader(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".parquet"):
        return f"read_parquet({_text(path.as_posix())})"
    delim = "\\t" if ".tsv" in name else ","
    return (f"read_csv({_text(path.as_posix())}, header = true, all_varchar = true, delim = '{delim}', "
            f"quote = '\"', escape = '\"')")


def _check_header(path: Path) -> None:
    """A CSV/TSV file must start with a header line (a file with none gives a table of junk
    column names, reported as missing columns; an empty file is its own error)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", errors="replace") as handle:
        if not handle.readline().strip():
            raise OmopSourceError(f"{path}: empty, or its first line is blank; expected a header line")


def _open_folder(folder: Path, con: duckdb.DuckDBPyConnection, schema: str, *, materialize: bool = False) -> None:
    files = _files(folder)
    missing = [t for t in OMOP_TABLES if t not in files]
    if missing:
        raise OmopSourceError(f"{folder}: OMOP table file(s) missing: {', '.join(missing)} "
                              f"(as <table>.parquet, .csv, .csv.gz, .tsv or .tsv.gz, any case)")
    for table, path in files.items():
        parquet = path.name.lower().endswith(".parquet")
        if not parquet:
            _check_header(path)
        try:
            _typed(con, table, _reader(path), str(path), names=pq.read_schema(path).names if parquet else None,
                   materialize=materialize or not parquet, schema=schema)
        except duckdb.Error as err:
            raise OmopSourceError(f"{path}: cannot be read as table {table!r}: {err}") from None


def _open_duckdb(path: Path, con: duckdb.DuckDBPyConnection, schema: str) -> None:
    alias = f"omop_source_{schema}"
    try:
        con.execute(f"ATTACH {_text(path.as_posix())} AS {alias} (READ_ONLY)")
    except duckdb.Error as err:
        raise OmopSourceError(f"{path}: not a DuckDB database ({err})") from None
    present = {row[0].lower(): row[0] for row in con.execute(
        f"SELECT table_name FROM information_schema.tables WHERE table_catalog = '{alias}'").fetchall()}
    missing = [t for t in OMOP_TABLES if t not in present]
    if missing:
        raise OmopSourceError(f"{path}: OMOP table(s) missing from the database: {', '.join(missing)}")
    for table in OMOP_TABLES + OPTIONAL_TABLES:
        if table in present:
            _typed(con, table, f"{alias}.{_quoted(present[table])}", f"{path}", schema=schema)


def _open_postgres(url: str, con: duckdb.DuckDBPyConnection, schema: str) -> None:
    try:
        import psycopg
    except ImportError:  # pragma: no cover - a pinned dependency
        raise OmopSourceError(f"{source_label(url)}: reading PostgreSQL needs psycopg (pip install psycopg psycopg-binary)") from None
    label = source_label(url)
    try:
        pg = psycopg.connect(url, connect_timeout=20)
    except psycopg.Error as err:
        raise OmopSourceError(f"{label}: cannot connect to PostgreSQL: {str(err).strip()}") from None
    folder = Path(tempfile.mkdtemp(prefix="omop-pg-"))
    try:
        with pg, pg.cursor() as cur:
            cur.execute("SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema() AND table_type IN ('BASE TABLE', 'VIEW')")
            # a server in SQL_ASCII hands text back as bytes
            names = [row[0].decode() if isinstance(row[0], bytes) else row[0] for row in cur.fetchall()]
            present = {name.lower(): name for name in names}
            missing = [t for t in OMOP_TABLES if t not in present]
            if missing:
                cur.execute("SELECT current_schema()")
                schema = cur.fetchone()[0]
                schema = schema.decode() if isinstance(schema, bytes) else schema
                raise OmopSourceError(f"{label}: OMOP table(s) missing from schema {schema!r}: {', '.join(missing)} "
                                      f"(another schema: add options=-csearch_path%3D<schema> to the URL)")
            for table in OMOP_TABLES + OPTIONAL_TABLES:
                if table not in present:
                    continue
                path = folder / f"{table}.csv"
                with path.open("wb") as handle, cur.copy(
                        f"COPY (SELECT * FROM {_quoted(present[table])}) TO STDOUT (FORMAT csv, HEADER)") as copy:
                    for chunk in copy:
                        handle.write(chunk)
                try:
                    _typed(con, table, _reader(path), f"{label} table {present[table]}", materialize=True,
                           schema=schema)
                except duckdb.Error as err:
                    raise OmopSourceError(f"{label}: table {present[table]!r} cannot be read: {err}") from None
    finally:
        pg.close()
        shutil.rmtree(folder, ignore_errors=True)


def connect(source: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view (or table) per OMOP table of ``source``
    (see the module docstring), columns in lower case and cast to ``CDM_TYPES``. Raises
    ``OmopSourceError`` naming the source and what is wrong: a missing source, table or
    required column, or a value that is not of its column's CDM type."""
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        _open(source, con, "main")
    except BaseException:
        con.close()
        raise
    return con


def _open(source: str | Path, con: duckdb.DuckDBPyConnection, schema: str) -> None:
    if is_url(source):
        _open_postgres(str(source), con, schema)
        return
    path = Path(source)
    if path.is_dir():
        _open_folder(path, con, schema)
    elif path.is_file():
        _open_duckdb(path, con, schema)
    else:
        raise OmopSourceError(f"{path}: no such folder, DuckDB file or postgresql:// URL")


# The vocabulary tables of a union, each keyed by what makes a row one fact: a later source
# adds only the rows whose key the earlier ones lack (two exports of one vocabulary agree).
_VOCABULARY_KEYS: dict[str, tuple[str, ...]] = {
    "concept": ("concept_id",),
    "concept_ancestor": ("ancestor_concept_id", "descendant_concept_id"),
    "concept_relationship": ("concept_id_1", "concept_id_2", "relationship_id"),
}


def _row_id_columns(con: duckdb.DuckDBPyConnection, relation: str) -> list[str]:
    """The id columns of ``relation`` that name a person or a record (``person_id``,
    ``visit_occurrence_id``, ``measurement_id``, ...), not a concept."""
    return [row[0] for row in con.execute(f"DESCRIBE {relation}").fetchall()
            if row[0].endswith("_id") and not row[0].endswith("concept_id") and row[1] == "BIGINT"]


def connect_union(sources: list[str | Path] | tuple[str | Path, ...]) -> tuple[duckdb.DuckDBPyConnection, tuple[int, ...]]:
    """One in-memory DuckDB connection over several OMOP sources (each read as ``connect``
    reads one, into its own schema ``src<k>``), and the offset added to the person and record
    ids of each. Every clinical table is the union of the sources' tables (columns by name; one
    source's optional column is null in the others), with the ``k``-th source's ids of persons
    and records (every ``*_id`` column but the concept ids) raised by ``k * step``, where
    ``step`` is the smallest power of ten above every such id of every source: two institutions
    that both number their patients from 1 stay two sets of patients. The vocabulary tables are
    the first source's rows plus the rows of later ones whose key it lacks (``concept_id``; the
    concept pair of ``concept_ancestor``; pair and relationship of ``concept_relationship``).
    One source gives ``connect(source)`` and offset 0. An offset that would overflow a 64-bit
    id is an ``OmopSourceError``. The imaging index of the ``k``-th source must add the same
    offset to its ``person_id`` (``helpers.cohort.task_index``)."""
    sources = list(sources)
    if not sources:
        raise ValueError("parameter 'sources': expected at least one OMOP source")
    if len(sources) == 1:
        return connect(sources[0]), (0,)
    con = duckdb.connect()
    con.execute("SET TimeZone = 'UTC'")
    try:
        for k, source in enumerate(sources):
            con.execute(f"CREATE SCHEMA src{k}")
            _open(source, con, f"src{k}")
        present = {(row[0], row[1]) for row in con.execute(
            "SELECT table_schema, table_name FROM information_schema.tables").fetchall()}
        clinical = [t for t in OMOP_TABLES if t not in _VOCABULARY_KEYS]
        largest = 0
        ids: dict[tuple[int, str], list[str]] = {}
        for k in range(len(sources)):
            for table in clinical:
                ids[k, table] = _row_id_columns(con, f"src{k}.{table}")
                if ids[k, table]:
                    value = con.execute(f"SELECT max(greatest({', '.join(f'abs({_quoted(c)})' for c in ids[k, table])})) "
                                        f"FROM src{k}.{table}").fetchall()[0][0]
                    largest = max(largest, int(value or 0))
        step = 10 ** len(str(largest))
        if (len(sources) - 1) * step + largest >= 2 ** 63:
            raise OmopSourceError(f"{', '.join(map(source_label, sources))}: ids up to {largest} leave no room to keep "
                                  f"{len(sources)} sources' persons apart in 64-bit ids")
        offsets = tuple(k * step for k in range(len(sources)))
        for table in clinical:
            parts = []
            for k in range(len(sources)):
                moved = ", ".join(f"{_quoted(c)} + {offsets[k]} AS {_quoted(c)}" for c in ids[k, table])
                parts.append(f"SELECT * {f'REPLACE ({moved}) ' if moved and offsets[k] else ''}FROM src{k}.{table}")
            con.execute(f"CREATE VIEW main.{table} AS " + " UNION ALL BY NAME ".join(parts))
        for table, key in _VOCABULARY_KEYS.items():
            have = [k for k in range(len(sources)) if (f"src{k}", table) in present]
            if not have:
                continue
            parts = []
            for n, k in enumerate(have):
                earlier = " AND ".join(f"NOT EXISTS (SELECT 1 FROM src{j}.{table} e WHERE "
                                       + " AND ".join(f"e.{c} = t.{c}" for c in key) + ")" for j in have[:n])
                parts.append(f"SELECT t.* FROM src{k}.{table} t" + (f" WHERE {earlier}" if earlier else ""))
            con.execute(f"CREATE VIEW main.{table} AS " + " UNION ALL BY NAME ".join(parts))
    except BaseException:
        con.close()
        raise
    return con, offsets


def describe(con: duckdb.DuckDBPyConnection) -> list[dict]:
    """Per OMOP table of ``con`` (``connect``): its name, row count and the optional CDM columns
    it lacks (of ``CDM_TYPES``), in ``OMOP_TABLES`` order, then the optional tables present."""
    present = {row[0] for row in con.execute(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main'").fetchall()}
    rows = []
    for table in OMOP_TABLES + OPTIONAL_TABLES:
        if table not in present:
            continue
        columns = {row[0] for row in con.execute(f"DESCRIBE {table}").fetchall()}
        rows.append({"table": table, "rows": int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0]),
                     "columns": len(columns),
                     "absent_cdm_columns": [c for c in CDM_TYPES.get(table, {}) if c not in columns]})
    return rows


# ------------------------------------------------------------------- a PostgreSQL to try it on

_PG_TYPES = {_ID: "bigint", _INT: "integer", _DATE: "date", _TS: "timestamp", _NUM: "double precision",
             _TEXT: "text"}


@contextlib.contextmanager
def scratch_postgres(user: str = "study"):
    """A throw-away PostgreSQL cluster (``initdb``, ``pg_ctl`` on the PATH) in a temporary
    folder, listening on a Unix socket only; yields its URL and removes it on exit. As root
    (which PostgreSQL refuses) it runs as ``nobody`` through ``runuser``. For the tests and
    ``benchmarks/cohort_sources.py``; a study reads a real database."""
    for tool in ("initdb", "pg_ctl"):
        if shutil.which(tool) is None:
            raise OmopSourceError(f"scratch_postgres: {tool} is not on the PATH (PostgreSQL's server tools)")
    run_as = []
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            raise OmopSourceError("scratch_postgres: running as root without runuser; PostgreSQL refuses root")
        run_as = ["runuser", "-u", "nobody", "--"]
    root = Path(tempfile.mkdtemp(prefix="omop-pg-cluster-"))
    data, socket = root / "data", root / "socket"
    socket.mkdir()
    if run_as:
        os.chmod(root, 0o755)
        for path in (root, socket):
            os.chown(path, 65534, 65534)
    env = {**os.environ, "LC_ALL": "C"}
    try:
        subprocess.run(run_as + ["initdb", "-D", str(data), "-U", user, "-A", "trust", "-E", "UTF8", "--no-sync"],
                       check=True, capture_output=True, env=env)
        subprocess.run(run_as + ["pg_ctl", "-D", str(data), "-w", "-l", str(root / "log.txt"), "-o",
                                 f"-k {socket} -c listen_addresses='' -c fsync=off", "start"],
                       check=True, capture_output=True, env=env)
        yield f"postgresql://{user}@/postgres?host={socket}"
    finally:
        if data.exists():
            subprocess.run(run_as + ["pg_ctl", "-D", str(data), "-m", "immediate", "stop"], capture_output=True, env=env)
        shutil.rmtree(root, ignore_errors=True)


def load_into_postgres(url: str, folder: str | Path, *, schema: str = "cdm", upper: tuple[str, ...] = ()) -> None:
    """Load the ``<table>.parquet`` files of ``folder`` (OMOP tables) into ``schema`` of the
    PostgreSQL database at ``url``, each column with its CDM type (``CDM_TYPES``); the tables
    of ``upper`` get upper-case column names, as some loaders write them."""
    import pandas as pd
    import psycopg

    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute(f"CREATE SCHEMA IF NOT EXISTS {_quoted(schema)}")
        for path in sorted(Path(folder).glob("*.parquet")):
            table = path.stem
            frame = pd.read_parquet(path)
            columns = [f"{_quoted(c.upper() if table in upper else c)} "
                       f"{_PG_TYPES[CDM_TYPES.get(table, {}).get(c, _TEXT)]}" for c in frame.columns]
            pg.execute(f"CREATE TABLE {_quoted(schema)}.{_quoted(table)} ({', '.join(columns)})")
            with pg.cursor().copy(f"COPY {_quoted(schema)}.{_quoted(table)} FROM STDIN (FORMAT csv, HEADER)") as copy:
                copy.write(frame.to_csv(index=False, date_format="%Y-%m-%d %H:%M:%S"))
