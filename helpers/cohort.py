"""Cohort construction: OMOP CDM tables + an imaging index -> one row per CT study.

The OMOP tables are queried with DuckDB, from a folder of ``<table>.parquet`` files (the
digital twin writes one) or from a DuckDB database file. The result follows the cohort table
format of DESIGN.md: ``study_id``, ``person_id`` (strings), ``institution``, ``index_time``,
``time`` (days from the index CT, > 0), ``event`` (1 observed, 0 censored) and ``split``.

Every study of the imaging index either enters the cohort or is listed in the exclusion table
with its reason: nothing is dropped silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd

from helpers.concepts import matched_sql, resolve
from helpers.imaging import IMAGING_INDEX_COLUMNS
from helpers.manifest import Manifest, ManifestError
from helpers.omop import CohortError, connect, connect_union, source_label
from helpers.tasks import Task, get_task
from helpers.vocabulary import OMOP_TABLES

__all__ = [
    "OMOP_TABLES",
    "IMAGING_INDEX_COLUMNS",
    "COHORT_COLUMNS",
    "SPLITS",
    "CohortResult",
    "CohortError",
    "connect_omop",
    "read_imaging_index",
    "DataPart",
    "task_parts",
    "task_index",
    "connect_task",
    "build_cohort",
    "assign_splits",
    "write_cohort",
    "read_cohort",
    "cohort_paths",
]

COHORT_COLUMNS = ("study_id", "person_id", "institution", "index_time", "time", "event", "split")
SPLITS = ("train", "val", "test", "external")

# A death or outcome on the day of the index CT is an event at half a day: dates in OMOP have
# a resolution of one day and a survival time must be positive.
SAME_DAY_EVENT_TIME = 0.5


@dataclass(frozen=True)
class CohortResult:
    """``cohort``: the cohort table; ``exclusions``: one row per excluded study with
    ``study_id``, ``institution`` and ``reason``."""

    cohort: pd.DataFrame
    exclusions: pd.DataFrame

    def exclusion_counts(self) -> pd.DataFrame:
        """Excluded studies counted by reason and institution (no identifiers)."""
        if self.exclusions.empty:
            return pd.DataFrame({"reason": [], "institution": [], "studies": []})
        return (
            self.exclusions.groupby(["reason", "institution"])
            .size()
            .rename("studies")
            .reset_index()
        )


def connect_omop(tables: str | Path) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with one view per OMOP table of ``tables`` (a folder of
    parquet, CSV or TSV files, a DuckDB file or a ``postgresql://`` URL), its columns in lower
    case and cast to the CDM types (``helpers.omop.connect``). Raises ``CohortError``
    (``helpers.omop.OmopSourceError``) naming what is missing or unreadable."""
    return connect(tables)


def read_imaging_index(path: Path) -> pd.DataFrame:
    """Read an imaging index (parquet or csv) and check its columns and values."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: imaging index not found")
    if path.suffix == ".csv":
        frame = pd.read_csv(path, dtype={"study_id": str, "person_id": str})
    else:
        frame = pd.read_parquet(path)
    missing = [c for c in IMAGING_INDEX_COLUMNS if c not in frame.columns]
    if missing:
        raise CohortError(
            f"{path}: imaging index lacks column(s) {', '.join(missing)}; expected "
            f"{', '.join(IMAGING_INDEX_COLUMNS)}"
        )
    frame = frame.loc[:, list(IMAGING_INDEX_COLUMNS)].copy()
    frame["study_id"] = frame["study_id"].astype(str)
    frame["person_id"] = frame["person_id"].astype(str)
    frame["institution"] = frame["institution"].astype(str)
    frame["study_datetime"] = pd.to_datetime(frame["study_datetime"], errors="coerce")
    bad_format = ~frame["image_format"].isin(["dicom", "nifti"])
    if bad_format.any():
        examples = frame.loc[bad_format, "image_format"].astype(str).unique()[:3]
        raise CohortError(
            f"{path}: column image_format must be 'dicom' or 'nifti'; {int(bad_format.sum())} "
            f"row(s) have other values, e.g. {', '.join(examples)}"
        )
    return frame


@dataclass(frozen=True)
class DataPart:
    """One source of a task's studies: its OMOP records (``omop``: a folder, DuckDB file or
    ``postgresql://`` URL), its imaging index (``index``: the file, for messages; an INSPECT
    release's ``study_mapping``) and the folder its ``image_path`` values are relative to
    (``root``). ``inspect``: the part is an INSPECT release (``helpers.inspect_release``);
    ``external``: every study of the part belongs to the external cohort; ``splits``: the
    INSPECT splits kept (None: all); ``pe_positive_only``: only the INSPECT studies whose
    report shows a PE."""

    omop: str | Path
    index: Path
    root: Path
    inspect: bool = False
    external: bool = False
    splits: tuple[str, ...] | None = None
    pe_positive_only: bool = False

    @property
    def label(self) -> str:
        return f"INSPECT release {self.root}" if self.inspect else f"imaging index {self.index}"


def task_parts(manifest: Manifest, task: str) -> tuple[DataPart, ...]:
    """Where ``task``'s studies come from under ``manifest``: the digital twin's folder; a
    real OMOP source with the task's CT archive, and for ``pe`` INSPECT as its external cohort
    when ``data.inspect`` is declared too; or an INSPECT release alone."""
    data = manifest.data
    if data.source == "synthetic":
        base = manifest.twin_dir / task
        if not (base / "twin.json").is_file():
            raise CohortError(f"{base}: no digital twin for task {task!r} at this setting; write it first "
                              f"(notebooks/00_twin.ipynb, or: snakemake {base / 'twin.json'})")
        return (DataPart(base / "omop", base / "imaging_index.parquet", base),)
    inspect = None
    if data.inspect is not None and task == "pe":
        from helpers.inspect_release import release_files

        src = data.inspect
        inspect = DataPart(src.omop, release_files(src.release)["study_mapping"], src.release, inspect=True,
                           external=data.source == "omop", splits=tuple(src.splits) if src.splits else None,
                           pe_positive_only=src.pe_positive_only)
    if data.source == "inspect":
        if inspect is None:
            raise ManifestError(f"{manifest.path}: data.source inspect holds the PE task only, not {task!r} "
                                f"(run the workflow with --config tasks=pe)")
        return (inspect,)
    omop = data.omop
    assert omop is not None
    if task not in omop.imaging:
        raise ManifestError(f"{manifest.path}: data.omop.imaging.{task}: no CT archive declared for task {task!r}")
    src = omop.imaging[task]
    return (DataPart(omop.tables, src.index, src.root),) + ((inspect,) if inspect else ())


def _part_index(part: DataPart) -> pd.DataFrame:
    """``part``'s imaging index (``read_imaging_index``; INSPECT's study mapping) with
    ``image_path`` made absolute under the part's root."""
    if part.inspect:
        from helpers.inspect_release import imaging_index

        index = imaging_index(part.root)
    else:
        index = read_imaging_index(part.index)
    index["image_path"] = [str(Path(part.root) / str(p)) for p in index["image_path"]]
    return index


def task_index(manifest: Manifest, task: str, offsets: tuple[int, ...] | None = None) -> pd.DataFrame:
    """The imaging index of every part of ``task`` (``task_parts``), one frame with absolute
    ``image_path`` values. ``offsets`` (from ``connect_task``): added to the ``person_id`` of
    each part's studies, as ``helpers.omop.connect_union`` adds them to its records (a
    ``person_id`` that is not an integer is left as it is, and the cohort step excludes it).
    Two parts holding one ``study_id`` is a ``CohortError`` naming both."""
    parts = task_parts(manifest, task)
    frames = []
    for k, part in enumerate(parts):
        index = _part_index(part)
        offset = offsets[k] if offsets else 0
        if offset:
            number = pd.to_numeric(index["person_id"], errors="coerce")
            whole = number.notna() & (number == number.round())
            index.loc[whole, "person_id"] = (number[whole].astype("int64") + offset).astype(str)
        frames.append(index)
    for k in range(1, len(frames)):
        for j in range(k):
            shared = sorted(set(frames[k]["study_id"]) & set(frames[j]["study_id"]))
            if shared:
                raise CohortError(f"{parts[j].label} and {parts[k].label}: {len(shared)} study_id(s) in both, e.g. "
                                  f"{shared[0]!r}; the study ids of the two sources must differ")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def connect_task(manifest: Manifest, task: str) -> tuple[duckdb.DuckDBPyConnection, tuple[int, ...]]:
    """One DuckDB connection over the OMOP records of every part of ``task`` (``connect_omop``
    for one; ``helpers.omop.connect_union`` for two: the second part's person and record ids
    are offset), and the offsets, for ``task_index``."""
    return connect_union([part.omop for part in task_parts(manifest, task)])


def _outcomes(con: duckdb.DuckDBPyConnection, studies: pd.DataFrame, task: Task) -> pd.DataFrame:
    """Per study: follow-up end, death date, first post-index outcome date, earliest death."""
    con.register("_studies", studies[["study_id", "person_key", "index_date"]])
    outcome_sql, outcomes = "NULL::DATE", ""
    if task.outcome_groups:
        # the task's outcome concept sets (helpers.concepts): standard concepts and descendants,
        # else the ICD-10-CM source codes
        resolve(con, task.outcome_groups)
        columns = {row[0] for row in con.execute("DESCRIBE condition_occurrence").fetchall()}
        day = "condition_start_date" if "condition_start_datetime" not in columns else \
            "coalesce(condition_start_date, CAST(condition_start_datetime AS DATE))"
        outcomes = f"""WITH outcome AS (
            SELECT person_id, {day} AS day
            FROM ({matched_sql(con, "Condition", alias="co")})
            WHERE grp IN ({", ".join(f"'{g}'" for g in task.outcome_groups)}))"""
        outcome_sql = """(
            SELECT min(o.day) FROM outcome o
            WHERE o.person_id = s.person_key AND o.day >= s.index_date
        )"""
    query = f"""
        {outcomes}
        SELECT s.study_id,
            (SELECT max(op.observation_period_end_date) FROM observation_period op
              WHERE op.person_id = s.person_key
                AND op.observation_period_start_date <= s.index_date
                AND op.observation_period_end_date >= s.index_date) AS followup_end,
            (SELECT min(d.death_date) FROM death d WHERE d.person_id = s.person_key) AS death_date,
            {outcome_sql} AS outcome_date,
            EXISTS (SELECT 1 FROM person p WHERE p.person_id = s.person_key) AS in_person
        FROM _studies s
    """
    out = con.execute(query).df()
    con.unregister("_studies")
    return out


def build_cohort(
    con: duckdb.DuckDBPyConnection,
    index: pd.DataFrame,
    task: str,
    *,
    imaging_root: Path,
    check_files: bool = True,
) -> CohortResult:
    """Build the ``task`` cohort from OMOP tables (``con``) and an imaging ``index``.

    For each study: ``index_time`` is the CT acquisition time; the event is death (and, for
    ``mace``, the first myocardial infarction, stroke or heart failure coded on or after the
    index date), whichever comes first; follow-up ends at the later of the end of the
    observation period that contains the index and a recorded death (a death index records
    deaths after the last encounter), and is administratively censored at the task horizon. ``time``
    is in days (an event on the index day counts as 0.5 days). Splits are not assigned here
    (see ``assign_splits``); the ``split`` column is left empty.

    Excluded, with a reason: duplicated study ids, unreadable acquisition time, image missing
    on disk, person absent from the OMOP ``person`` table, no observation period containing
    the index, death recorded before the index, and no follow-up after the index.
    """
    spec = get_task(task)
    studies = index.copy()
    reasons = pd.Series("", index=studies.index, dtype=object)

    def exclude(mask: pd.Series, reason: str) -> None:
        reasons[mask & (reasons == "")] = reason

    exclude(studies["study_id"].duplicated(keep="first"), "duplicate study_id in the imaging index")
    exclude(studies["study_datetime"].isna(), "acquisition time missing or unreadable")
    if check_files:
        root = Path(imaging_root)
        exists = studies["image_path"].map(lambda p: (root / str(p)).exists())
        exclude(~exists, "image not found on disk")
    person_key = pd.to_numeric(studies["person_id"], errors="coerce")
    exclude(person_key.isna(), "person_id is not an OMOP integer id")
    studies["person_key"] = person_key.fillna(-1).astype("int64")
    studies["index_date"] = studies["study_datetime"].dt.normalize()

    out = _outcomes(con, studies, spec).set_index("study_id")
    # duplicated study ids share one row of outcomes; only the first copy is kept anyway
    out = out[~out.index.duplicated()]
    merged = out.reindex(studies["study_id"]).reset_index(drop=True)
    merged.index = studies.index
    for column in ("followup_end", "death_date", "outcome_date"):
        merged[column] = pd.to_datetime(merged[column])

    exclude(~merged["in_person"].astype(bool), "person not in the OMOP person table")
    exclude(merged["followup_end"].isna(), "no observation period containing the index date")
    exclude(
        merged["death_date"].notna() & (merged["death_date"] < studies["index_date"]),
        "death recorded before the index CT",
    )

    horizon_end = studies["index_date"] + pd.to_timedelta(spec.horizon_days, unit="D")
    candidates = []
    if spec.death_is_event:
        candidates.append(merged["death_date"])
    if spec.outcome_groups:
        candidates.append(merged["outcome_date"])
    event_date = pd.concat(candidates, axis=1).min(axis=1) if candidates else pd.Series(pd.NaT, index=studies.index)
    # follow-up ends at the later of the observation period's end and a recorded death: a death
    # index records deaths after the last encounter, and censoring those at the period's end
    # would lose them
    death_after = merged["death_date"].where(merged["death_date"] >= studies["index_date"])
    followup_end = pd.concat([merged["followup_end"], death_after], axis=1).max(axis=1)
    censor_date = pd.concat([followup_end, horizon_end], axis=1).min(axis=1)
    event = event_date.notna() & (event_date <= censor_date)
    end_date = event_date.where(event, censor_date)
    days = (end_date - studies["index_date"]).dt.days.astype("float64")
    time = days.where(days > 0, np.where(event, SAME_DAY_EVENT_TIME, 0.0))
    exclude((~event) & (days <= 0), "no follow-up after the index CT")

    keep = reasons == ""
    cohort = pd.DataFrame(
        {
            "study_id": studies["study_id"].astype(str),
            "person_id": studies["person_id"].astype(str),
            "institution": studies["institution"].astype(str),
            "index_time": studies["study_datetime"],
            "time": time.astype("float64"),
            "event": event.astype("int64"),
            "split": "",
        }
    )[keep].reset_index(drop=True)
    exclusions = pd.DataFrame(
        {
            "study_id": studies.loc[~keep, "study_id"].astype(str),
            "institution": studies.loc[~keep, "institution"].astype(str),
            "reason": reasons[~keep].astype(str),
        }
    ).reset_index(drop=True)
    return CohortResult(cohort=cohort, exclusions=exclusions)


def assign_splits(
    cohort: pd.DataFrame,
    *,
    test_fraction: float,
    val_fraction: float,
    external_institutions: list[str],
    seed: int,
) -> pd.DataFrame:
    """Assign ``split`` at the patient level.

    Studies of ``external_institutions`` become ``external``. Internal patients are shuffled
    with ``numpy.random.default_rng(seed)`` and taken in that order into ``test`` until it
    holds ``test_fraction`` of the internal studies, then into ``val`` until it holds
    ``val_fraction`` of the rest; the others are ``train``. A person is never in two of
    train/val/test.

    >>> df = pd.DataFrame({"person_id": list("aabcdefghij"), "institution": ["x"] * 10 + ["y"]})
    >>> out = assign_splits(df, test_fraction=0.3, val_fraction=0.2, external_institutions=["y"], seed=0)
    >>> int(out.groupby("person_id")["split"].nunique().max()), int((out.split == "external").sum())
    (1, 1)
    """
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    out = cohort.copy()
    external = out["institution"].isin(external_institutions)
    out["split"] = np.where(external, "external", "train")
    internal = out.loc[~external]
    counts = internal.groupby("person_id").size()
    persons = counts.index.to_numpy()
    order = np.random.default_rng(seed).permutation(len(persons))
    persons, sizes = persons[order], counts.to_numpy()[order]
    cumulative = np.cumsum(sizes)
    n_internal = int(cumulative[-1]) if len(cumulative) else 0
    n_test = test_fraction * n_internal
    in_test = cumulative - sizes < n_test
    rest_cumulative = np.cumsum(np.where(in_test, 0, sizes))
    n_val = val_fraction * (n_internal - int(sizes[in_test].sum()))
    in_val = ~in_test & (rest_cumulative - sizes < n_val)
    split_of = pd.Series(np.where(in_test, "test", np.where(in_val, "val", "train")), index=persons)
    out.loc[~external, "split"] = out.loc[~external, "person_id"].map(split_of).to_numpy()
    return out


def cohort_paths(manifest: Manifest, task: str) -> dict[str, Path]:
    """Where the cohort step writes for ``task``: the cohort table, the imaging table
    (study -> absolute image path and format), the exclusions and a JSON summary."""
    folder = manifest.run_root / "cohorts"
    return {
        "cohort": folder / f"{task}.parquet",
        "imaging": folder / f"{task}_imaging.parquet",
        "exclusions": folder / f"{task}_exclusions.parquet",
        "summary": folder / f"{task}_summary.json",
        "concept_sets": folder / f"{task}_concept_sets.csv",
        "labels": folder / f"{task}_label_agreement.csv",
    }


def _atomic_parquet(frame: pd.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


def imaging_files(index: pd.DataFrame, imaging_root: Path, study_ids) -> pd.DataFrame:
    """The rows of the imaging ``index`` for ``study_ids`` (the first of a duplicated id):
    ``study_id``, ``image_path`` made absolute under ``imaging_root``, ``image_format``."""
    imaging = index.loc[index["study_id"].isin(list(study_ids)), ["study_id", "image_path", "image_format"]]
    imaging = imaging.drop_duplicates("study_id").copy()
    imaging["image_path"] = [str((Path(imaging_root) / p).resolve()) for p in imaging["image_path"]]
    return imaging


def write_cohort(
    result: CohortResult, index: pd.DataFrame, imaging_root: Path, paths: dict[str, Path]
) -> dict:
    """Write the cohort, its imaging table, exclusions and a summary; return the summary.

    The summary holds counts only (no identifiers or dates), so the book may show it.
    """
    cohort = result.cohort
    imaging = imaging_files(index, imaging_root, cohort["study_id"])
    summary = {
        "studies_in_index": int(len(index)),
        "studies_in_cohort": int(len(cohort)),
        "studies_excluded": int(len(result.exclusions)),
        "exclusions": result.exclusion_counts().to_dict(orient="records"),
        "by_split": {
            split: {
                "studies": int((cohort.split == split).sum()),
                "patients": int(cohort.loc[cohort.split == split, "person_id"].nunique()),
                "events": int(cohort.loc[cohort.split == split, "event"].sum()),
            }
            for split in SPLITS
        },
    }
    _atomic_parquet(imaging, paths["imaging"])
    _atomic_parquet(result.exclusions, paths["exclusions"])
    paths["summary"].write_text(json.dumps(summary, indent=2))
    _atomic_parquet(cohort, paths["cohort"])  # last: its presence means the step finished
    return summary


def read_cohort(path: Path) -> pd.DataFrame:
    """Read a cohort table and check the DESIGN.md format; errors name the file and column."""
    path = Path(path)
    if not path.is_file():
        raise CohortError(f"{path}: cohort table not found")
    frame = pd.read_parquet(path)
    missing = [c for c in COHORT_COLUMNS if c not in frame.columns]
    if missing:
        raise CohortError(f"{path}: cohort table lacks column(s) {', '.join(missing)}")
    problems = []
    if frame["study_id"].duplicated().any():
        problems.append(f"{int(frame['study_id'].duplicated().sum())} duplicated study_id")
    if not (frame["time"] > 0).all():
        problems.append(f"{int((~(frame['time'] > 0)).sum())} row(s) with time <= 0 or missing")
    if not frame["event"].isin([0, 1]).all():
        problems.append("column event must hold 0/1")
    bad_split = ~frame["split"].isin(SPLITS)
    if bad_split.any():
        problems.append(f"{int(bad_split.sum())} row(s) with split outside {', '.join(SPLITS)}")
    internal = frame[frame["split"] != "external"]
    if (internal.groupby("person_id")["split"].nunique() > 1).any():
        problems.append("a person appears in more than one of train/val/test")
    if problems:
        raise CohortError(f"{path}: " + "; ".join(problems))
    frame["study_id"] = frame["study_id"].astype(str)
    frame["person_id"] = frame["person_id"].astype(str)
    frame["event"] = frame["event"].astype("int64")
    frame["time"] = frame["time"].astype("float64")
    return frame


def make_source(manifest: Manifest, task: str, *, progress: bool = False) -> dict:
    """The data of ``task``: for the digital twin, write it at the manifest's setting (profile,
    image share, interaction, seed) into ``twin_dir/<task>`` and return its ``twin.json``; for
    real data, check the sources exist and describe them (counts only, no identifiers).
    Deciding *whether* to run is the workflow's business (Snakemake), not this function's."""
    get_task(task)
    if manifest.data.source != "synthetic":
        parts = task_parts(manifest, task)
        return {"source": manifest.data.source,
                "parts": [{"tables": source_label(p.omop), "imaging_index": str(p.index), "inspect": p.inspect,
                           "external": p.external} for p in parts]}
    from helpers.twin import generate

    s = manifest.synthetic
    generate(manifest.twin_dir, profile=s.profile, seed=s.seed, image_share=s.image_share, interaction=s.interaction,
             tasks=(task,), progress=progress, site_shift=s.shift or "all")
    return json.loads((manifest.twin_dir / task / "twin.json").read_text())


__all__ += ["make_source", "imaging_files", "inspect_selection"]


# EHR encoder kinds that read the records as MEDS timelines (helpers.meds).
MEDS_KINDS = ("clmbr_mini", "clmbr")


@dataclass
class CohortBuild:
    """What ``make_cohort`` made: the cohort (with exclusions), the summary it wrote (counts
    only), the rows of every OMOP table, the written paths, the MEDS folder (or None) and
    the concept-set report (``helpers.concepts.report``: what the outcome's and the one-hot
    features' concept sets matched in the source, by route)."""

    result: CohortResult
    summary: dict
    table_rows: dict[str, int]
    paths: dict[str, Path]
    meds: Path | None
    concept_sets: pd.DataFrame | None = None
    labels: tuple[pd.DataFrame, dict] | None = None


def make_cohort(manifest: Manifest, task: str, *, meds: bool | None = None) -> CohortBuild:
    """The cohort step of ``task``: read the OMOP tables and the imaging index where the
    manifest points, build one row per CT study (every excluded study counted with its
    reason), assign patient-level splits with the manifest's ``splits``, write the cohort, its
    imaging table, exclusions and summary (``cohort_paths``), and export the records as MEDS
    (``<run_root>/meds/<task>``, with the cohort's splits) when ``meds`` is true; by default
    when one of the manifest's EHR encoders reads MEDS (``MEDS_KINDS``)."""
    from helpers.meds import omop_to_meds, write_meds

    get_task(task)
    parts = task_parts(manifest, task)
    inspect = next((p for p in parts if p.inspect), None)
    con, offsets = connect_task(manifest, task)
    labels = None
    try:
        index = task_index(manifest, task, offsets)
        rows = {t: int(con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0]) for t in OMOP_TABLES}
        built = build_cohort(con, index, task, imaging_root=Path("/"))  # image paths are absolute
        sets = concept_set_report(con, task)
        sp = manifest.splits
        paths = cohort_paths(manifest, task)
        cohort, exclusions = built.cohort, built.exclusions
        if inspect is not None:  # its PE label and splits
            from helpers import inspect_release

            cohort, exclusions = inspect_selection(cohort, exclusions, inspect)
        if inspect is None or inspect.external:
            external = list(sp.external_institutions) + ([inspect_release.INSTITUTION] if inspect else [])
            cohort = assign_splits(cohort, test_fraction=sp.test_fraction[task], val_fraction=sp.val_fraction,
                                   external_institutions=external, seed=sp.seed)
        if inspect is not None:  # INSPECT's 12-month label, only to check the derived outcome
            table, agreement = inspect_release.label_agreement(
                cohort[cohort["institution"] == inspect_release.INSTITUTION], inspect_release.labels(inspect.root),
                get_task(task).horizon_days)
            labels = (table, agreement)
            paths["labels"].parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(paths["labels"])
        result = CohortResult(cohort=cohort, exclusions=exclusions)
        summary = write_cohort(result, index, Path("/"), paths)
        if labels is not None:
            summary["label_agreement"] = labels[1]
            paths["summary"].write_text(json.dumps(summary, indent=2))
        sets.to_csv(paths["concept_sets"], index=False)
        if meds is None:
            meds = any(spec.kind in MEDS_KINDS for spec in manifest.encoders.ehr.values())
        folder = None
        if meds:
            from helpers.meds import cohort_subject_splits

            folder = manifest.run_root / "meds" / task
            write_meds(omop_to_meds(con), folder, subject_splits=cohort_subject_splits(cohort),
                       dataset_name=f"{task} ({manifest.data.source})")
    finally:
        con.close()
    return CohortBuild(result=result, summary=summary, table_rows=rows, paths=paths, meds=folder, concept_sets=sets,
                       labels=labels)


def inspect_selection(cohort: pd.DataFrame, exclusions: pd.DataFrame,
                      part: DataPart) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The INSPECT studies of ``cohort`` that ``part`` keeps, the others moved to ``exclusions``
    with their reason: with ``pe_positive_only``, a study whose report shows no PE
    (``helpers.inspect_release.PE_LABEL``) or that has no label; INSPECT alone, a study
    without a split gets none (``given_splits``: INSPECT's splits as given); INSPECT as the
    external cohort with ``splits``, a study of another split. Other studies stay as they are."""
    from helpers import inspect_release

    mine = cohort["institution"] == inspect_release.INSTITUTION
    drops: list[tuple[pd.Series, str]] = []
    if part.pe_positive_only:
        positive = inspect_release.pe_positive(part.root)
        label = cohort["study_id"].map(positive)
        drops += [(mine & label.isna(), f"no {inspect_release.PE_LABEL} label in INSPECT's labels file"),
                  (mine & (label == False), "no PE on the CTPA (INSPECT's pe_positive_nlp label)")]  # noqa: E712
    given = inspect_release.splits(part.root)
    if part.external and part.splits is not None:
        named = {inspect_release.SPLIT_NAMES[s] for s in part.splits}
        split = cohort["study_id"].map(given)
        drops += [(mine & split.isna(), "not in INSPECT's splits file"),
                  (mine & split.notna() & ~split.isin(named),
                   f"INSPECT split not among data.inspect.splits ({', '.join(part.splits)})")]
    taken = pd.Series(False, index=cohort.index)
    for mask, reason in drops:
        mask = mask.fillna(False).astype(bool) & ~taken
        exclusions = pd.concat([exclusions, cohort.loc[mask, ["study_id", "institution"]].assign(reason=reason)],
                               ignore_index=True)
        taken |= mask
    cohort = cohort[~taken].reset_index(drop=True)
    if not part.external:  # INSPECT alone: its own splits, as given
        cohort, exclusions = given_splits(cohort, given, exclusions, "not in INSPECT's splits file")
    return cohort, exclusions


def given_splits(cohort: pd.DataFrame, given: pd.Series, exclusions: pd.DataFrame,
                 reason: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``cohort`` with the ``split`` of each study taken from ``given`` (study_id -> split);
    a study without one leaves the cohort and joins ``exclusions`` with ``reason``."""
    known = cohort["study_id"].astype(str).isin(given.index)
    out = cohort.loc[known].copy()
    out["split"] = given.loc[out["study_id"].astype(str)].to_numpy()
    dropped = cohort.loc[~known, ["study_id", "institution"]].assign(reason=reason)
    return out.reset_index(drop=True), pd.concat([exclusions, dropped], ignore_index=True)


def concept_set_report(con: duckdb.DuckDBPyConnection, task: str) -> pd.DataFrame:
    """``helpers.concepts.report`` for the concept sets ``task`` reads: its outcome's (MACE:
    myocardial infarction, stroke, heart failure) and its one-hot features' (``helpers.ehr``),
    with ``use``: what each set is for."""
    from helpers.concepts import report
    from helpers.ehr import FEATURES

    spec = get_task(task)
    uses: dict[str, list[str]] = {g: ["outcome"] for g in spec.outcome_groups}
    for feature in FEATURES[task]:
        if feature.group:
            uses.setdefault(feature.group, []).append(feature.name)
    table = report(con, list(uses))
    table.insert(1, "use", [", ".join(uses[name]) for name in table["concept_set"]])
    return table


__all__ += ["MEDS_KINDS", "CohortBuild", "make_cohort", "concept_set_report", "given_splits"]


def exclusion_flow(manifest: Manifest, task: str, image_encoder: str) -> pd.DataFrame:
    """From the imaging index to the analysis, counts only: the studies the cohort step
    excluded (by reason and institution), then the cohort studies whose CT the image encoder
    ``image_encoder`` could not read (``image-<encoder>.exclusions.csv``: they stay in the
    cohort with a missing image, which the models treat as such; counted by the kind of error,
    since the full reasons name files), and the cohort. Columns ``step``, ``reason``,
    ``institution``, ``studies``."""
    from helpers.embeddings import embedding_path, exclusions_path

    paths = cohort_paths(manifest, task)
    cohort = read_cohort(paths["cohort"])
    excluded = pd.read_parquet(paths["exclusions"])
    rows = [{"step": "cohort: excluded", "reason": r.reason, "institution": r.institution, "studies": int(r.studies)}
            for r in CohortResult(cohort=cohort, exclusions=excluded).exclusion_counts().itertuples(index=False)]
    unread = exclusions_path(embedding_path(manifest.run_root, task, "image", image_encoder))
    if unread.is_file():
        frame = pd.read_csv(unread, dtype={"study_id": str})
        frame = frame.merge(cohort[["study_id", "institution"]], on="study_id", how="left")
        # by the kind of error: the full reason names files, which may carry identifiers
        for (error, institution), group in frame.groupby(["error", "institution"], dropna=False):
            rows.append({"step": f"image encoder {image_encoder}: CT unreadable, image missing", "reason": error,
                         "institution": institution, "studies": len(group)})
    for institution, group in cohort.groupby("institution"):
        rows.append({"step": "cohort: analysed", "reason": "", "institution": institution, "studies": len(group)})
    return pd.DataFrame(rows, columns=["step", "reason", "institution", "studies"])


__all__ += ["exclusion_flow"]
