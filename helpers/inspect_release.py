"""INSPECT as downloaded: the public PE cohort of CTPA studies with EHR (Huang et al., 2023).

A release folder (``data.inspect.release`` in the manifest) holds::

    study_mapping_<date>.tsv   impression_id, person_id, image_id, procedure_DATETIME
    labels_<date>.tsv          impression_id and one column per label (pe_positive_nlp,
                               12_month_mortality, ...)
    splits_<date>.tsv          impression_id, split (train, valid, test)
    CTPA/<image_id>.nii.gz     the CT volumes

and its EHR is an OMOP CDM source (``data.inspect.omop``: any source ``helpers.omop`` reads).
Column names are read in any case. ``imaging_index`` turns the study mapping into the study's
imaging index (one study per ``impression_id``, ``institution`` ``inspect``); ``splits``
gives INSPECT's own splits (``valid`` is the study's validation split), used as they are;
``pe_positive`` INSPECT's label of a PE on the CTPA (``pe_positive_nlp``, from the report),
with which the cohort keeps the studies with a PE, as the paper's external cohort does;
``label_agreement`` compares the 12-month mortality derived from the death and observation
records with INSPECT's label (``TRUE``, ``FALSE`` or ``Censored``), which the study never trains
on. Every file problem is an ``InspectError`` naming the file and the column.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from helpers.omop import CohortError

__all__ = ["InspectError", "INSTITUTION", "release_files", "imaging_index", "splits", "labels", "pe_positive",
           "label_agreement", "SPLIT_NAMES", "PE_LABEL"]

INSTITUTION = "inspect"
# INSPECT's label of a PE on the CTPA, read from its report (TRUE or FALSE)
PE_LABEL = "pe_positive_nlp"
# INSPECT's split names -> the study's
SPLIT_NAMES: dict[str, str] = {"train": "train", "valid": "val", "test": "test"}
_COLUMNS = {
    "study_mapping": ("impression_id", "person_id", "image_id", "procedure_datetime"),
    "labels": ("impression_id",),
    "splits": ("impression_id", "split"),
}


class InspectError(CohortError):
    """An INSPECT release that cannot be read as downloaded (names the file and column)."""


def release_files(release: str | Path) -> dict[str, Path]:
    """The release's ``study_mapping``, ``labels`` and ``splits`` files (``<kind>_*.tsv``, one
    of each) and its ``CTPA`` folder."""
    release = Path(release)
    if not release.is_dir():
        raise InspectError(f"{release}: no such folder (data.inspect.release: the INSPECT release as downloaded)")
    out: dict[str, Path] = {}
    for kind in _COLUMNS:
        found = sorted(release.glob(f"{kind}_*.tsv")) + sorted(release.glob(f"{kind}.tsv"))
        if len(found) != 1:
            raise InspectError(f"{release}: expected one {kind}_<date>.tsv, found "
                               f"{', '.join(p.name for p in found) or 'none'}")
        out[kind] = found[0]
    ctpa = release / "CTPA"
    if not ctpa.is_dir():
        raise InspectError(f"{release}: no CTPA/ folder (the volumes, CTPA/<image_id>.nii.gz)")
    out["CTPA"] = ctpa
    return out


def _read(path: Path, kind: str) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        raise InspectError(f"{path}: not a tab-separated table ({err})") from None
    frame.columns = [c.strip().lower() for c in frame.columns]
    missing = [c for c in _COLUMNS[kind] if c not in frame.columns]
    if missing:
        raise InspectError(f"{path}: lacks column(s) {', '.join(missing)} (INSPECT's {kind} has "
                           f"{', '.join(_COLUMNS[kind])}); it has {', '.join(frame.columns)}")
    duplicated = frame["impression_id"].duplicated()
    if duplicated.any():
        raise InspectError(f"{path}: impression_id {frame.loc[duplicated, 'impression_id'].iloc[0]!r} appears "
                           f"{int(duplicated.sum()) + 1} times or more; expected one row per impression")
    return frame


def imaging_index(release: str | Path) -> pd.DataFrame:
    """The imaging index of the release (``helpers.imaging.IMAGING_INDEX_COLUMNS``): ``study_id``
    is the ``impression_id``, ``image_path`` ``CTPA/<image_id>.nii.gz`` (relative to the
    release), ``study_datetime`` the ``procedure_DATETIME`` (unreadable times become missing,
    and the cohort step excludes those studies with that reason)."""
    files = release_files(release)
    mapping = _read(files["study_mapping"], "study_mapping")
    return pd.DataFrame({
        "study_id": mapping["impression_id"].astype(str),
        "person_id": mapping["person_id"].astype(str),
        "institution": INSTITUTION,
        "study_datetime": pd.to_datetime(mapping["procedure_datetime"], errors="coerce"),
        "image_path": "CTPA/" + mapping["image_id"].astype(str) + ".nii.gz",
        "image_format": "nifti",
    })


def splits(release: str | Path) -> pd.Series:
    """INSPECT's split of each ``impression_id``, in the study's names (``SPLIT_NAMES``)."""
    path = release_files(release)["splits"]
    frame = _read(path, "splits")
    given = frame["split"].str.strip().str.lower()
    unknown = sorted(set(given) - set(SPLIT_NAMES))
    if unknown:
        raise InspectError(f"{path}: column split holds {', '.join(map(repr, unknown))}; expected "
                           f"{', '.join(SPLIT_NAMES)}")
    return pd.Series(given.map(SPLIT_NAMES).to_numpy(), index=frame["impression_id"].astype(str), name="split")


def labels(release: str | Path, column: str = "12_month_mortality") -> pd.Series:
    """INSPECT's label ``column`` per ``impression_id``: ``TRUE``, ``FALSE`` or ``Censored``."""
    path = release_files(release)["labels"]
    frame = _read(path, "labels")
    if column.lower() not in frame.columns:
        raise InspectError(f"{path}: no column {column!r}; it has {', '.join(frame.columns)}")
    values = frame[column.lower()].astype(str).str.strip()
    canonical = {"true": "TRUE", "false": "FALSE", "censored": "Censored"}
    mapped = values.str.lower().map(canonical)
    if mapped.isna().any():
        raise InspectError(f"{path}: column {column!r} holds {values[mapped.isna()].iloc[0]!r}; expected TRUE, FALSE "
                           f"or Censored")
    return pd.Series(mapped.to_numpy(), index=frame["impression_id"].astype(str), name=column)


def pe_positive(release: str | Path) -> pd.Series:
    """Whether INSPECT's report found a PE on each ``impression_id``'s CTPA (``PE_LABEL``:
    ``TRUE`` or ``FALSE``, any case), as bool."""
    path = release_files(release)["labels"]
    frame = _read(path, "labels")
    if PE_LABEL not in frame.columns:
        raise InspectError(f"{path}: no column {PE_LABEL!r} (INSPECT's PE label, which selects the studies with a PE; "
                           f"data.inspect.pe_positive_only: false keeps every CTPA); it has {', '.join(frame.columns)}")
    values = frame[PE_LABEL].astype(str).str.strip()
    mapped = values.str.lower().map({"true": True, "false": False})
    if mapped.isna().any():
        raise InspectError(f"{path}: column {PE_LABEL!r} holds {values[mapped.isna()].iloc[0]!r}; expected TRUE or FALSE")
    return pd.Series(mapped.astype(bool).to_numpy(), index=frame["impression_id"].astype(str), name=PE_LABEL)


def label_agreement(cohort: pd.DataFrame, label: pd.Series, horizon_days: int = 365) -> tuple[pd.DataFrame, dict]:
    """The derived outcome of each cohort study as INSPECT's label would read it (``TRUE``: an
    event within ``horizon_days``; ``FALSE``: followed that long without one; ``Censored``:
    follow-up ended before without an event) against ``label``: the cross table (derived in
    rows) and a summary (studies compared, agreement, and Cohen's kappa over the studies both
    call TRUE or FALSE)."""
    derived = pd.Series("Censored", index=cohort["study_id"].astype(str).to_numpy())
    event = cohort["event"].to_numpy() == 1
    time = cohort["time"].to_numpy()
    derived[event & (time <= horizon_days)] = "TRUE"
    derived[(~event) & (time >= horizon_days)] = "FALSE"
    both = derived.index.intersection(label.index)
    pair = pd.DataFrame({"derived": derived.loc[both].to_numpy(), "inspect": label.loc[both].to_numpy()})
    order = ["TRUE", "FALSE", "Censored"]
    table = pd.crosstab(pair["derived"], pair["inspect"]).reindex(index=order, columns=order, fill_value=0)
    decided = pair[pair["derived"].isin(order[:2]) & pair["inspect"].isin(order[:2])]
    kappa = float("nan")
    if decided["derived"].nunique() + decided["inspect"].nunique() > 2:  # defined unless one class only
        from sklearn.metrics import cohen_kappa_score

        kappa = float(cohen_kappa_score(decided["derived"], decided["inspect"]))
    summary = {"studies": int(len(pair)), "cohort_without_label": int(len(derived) - len(both)),
               "agreement": float((pair["derived"] == pair["inspect"]).mean()) if len(pair) else float("nan"),
               "decided_studies": int(len(decided)), "kappa_decided": kappa}
    return table, summary
