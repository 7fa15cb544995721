"""Figures and tables of the digital-twin chapter (``notebooks/00_twin.ipynb``).

Every function reads one task's twin folder (``<twin_dir>/<task>``, see ``helpers.twin``) or
its ``twin.json`` summary; the ground truth through ``helpers.truth`` (reader ``twin_chapter``). Nothing shown identifies a synthetic patient: no study or person
ids, no source values, no birth dates and no dates of service; times are days relative to
the index CT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from lifelines import KaplanMeierFitter

from helpers.imaging import load_volume, window
from helpers.tasks import DEFAULT_INTERACTION, TASKS
from helpers.truth import read_lesions, read_mask, read_truth
from helpers.twin import INSTITUTIONS, factor_effects, information_balance

__all__ = [
    "WINDOWS",
    "ct_examples",
    "ehr_timeline",
    "event_rate_table",
    "factor_table",
    "km_by_institution",
    "knob_table",
]

WINDOWS: dict[str, tuple[float, float]] = {"PE": (-1350.0, 150.0), "MACE": (-125.0, 225.0)}
_SITE_LABEL = {name: f"{inst} ({name}, {fmt})" for inst, (name, _, fmt) in INSTITUTIONS.items()}
_READER = "twin_chapter"


def _where(task_dir: Path) -> tuple[Path, str]:
    """``(twin_dir, task)`` of a task folder ``<twin_dir>/<task>``."""
    task_dir = Path(task_dir)
    return task_dir.parent, task_dir.name


def _example_study(task_dir: Path, task: str, site: str) -> pd.Series:
    """The imaging-index row of a study of ``site`` with a typical-to-large lesion load (the
    80th percentile of embolus voxels for pe, calcification voxels for mace)."""
    index = pd.read_parquet(task_dir / "imaging_index.parquet")
    lesions = read_lesions(*_where(task_dir), reader=_READER)
    column = "embolus_voxels" if task == "pe" else "calcification_voxels"
    rows = index.merge(lesions, on="study_id")
    rows = rows[rows["institution"] == site].sort_values([column, "study_id"], kind="stable")
    if rows.empty:
        raise ValueError(f"ct_examples: no study of institution {site!r} in {task_dir}")
    return rows.iloc[int(0.8 * (len(rows) - 1))]


def _lesion_slices(mask: np.ndarray, n: int) -> list[int]:
    """``n`` slice indices spread over the slices holding lesions (evenly spaced if none)."""
    counts = (mask > 0).sum(axis=(1, 2))
    with_lesion = np.flatnonzero(counts)
    if len(with_lesion) == 0:
        return np.linspace(0, len(counts) - 1, n + 2).round().astype(int)[1:-1].tolist()
    picks = {int(with_lesion[int(q * (len(with_lesion) - 1))]) for q in np.linspace(0, 1, n)}
    picks.add(int(np.argmax(counts)))
    return sorted(picks)[:n] if len(picks) >= n else sorted(picks)


def ct_examples(task_dir: str | Path, task: str, *, n_slices: int = 3) -> plt.Figure:
    """Axial slices of one internal (NIfTI) and one external (DICOM) study of ``task``, each in
    the PE window [-1350, 150] HU and the MACE window [-125, 225] HU, with the lesion masks
    outlined (red: embolus, yellow: coronary calcium). Slices are labelled by their height
    in mm relative to the volume's centre."""
    task_dir = Path(task_dir)
    rows = []
    for site, _, _ in INSTITUTIONS.values():
        row = _example_study(task_dir, task, site)
        vol = load_volume(task_dir / row["image_path"])
        mask = read_mask(*_where(task_dir), row["study_id"], reader=_READER)
        rows.append((site, vol, mask, _lesion_slices(mask, n_slices)))
    ncols = max(len(r[3]) for r in rows)
    fig, axes = plt.subplots(2 * len(rows), ncols, figsize=(2.6 * ncols, 2.6 * 2 * len(rows)))
    axes = np.atleast_2d(axes)
    for i, (site, vol, mask, picks) in enumerate(rows):
        z = vol.origin[0] + vol.spacing[0] * np.arange(vol.shape[0])
        centre = 0.5 * (z[0] + z[-1])
        for j, (wname, (lo, hi)) in enumerate(WINDOWS.items()):
            r = 2 * i + j
            for c in range(ncols):
                ax = axes[r, c]
                ax.axis("off")
                if c >= len(picks):
                    continue
                k = picks[c]
                ax.imshow(window(vol.hu[k], lo, hi), cmap="gray", vmin=0, vmax=1)
                for label, color in ((1, "red"), (2, "yellow")):
                    if (mask[k] == label).any():
                        ax.contour(mask[k] == label, levels=[0.5], colors=color, linewidths=0.8)
                ax.set_title(f"z {z[k] - centre:+.0f} mm", fontsize=8)
            axes[r, 0].text(
                -0.08,
                0.5,
                f"{_SITE_LABEL[site]}\n{wname} window [{lo:.0f}, {hi:.0f}] HU",
                transform=axes[r, 0].transAxes,
                rotation=90,
                va="center",
                ha="right",
                fontsize=8,
            )
    fig.suptitle(f"Twin CT ({task.upper()}); red: embolus mask, yellow: calcium mask", fontsize=10)
    fig.tight_layout()
    return fig


_DOMAINS = (
    ("visit_occurrence", "visit_concept_id", "visit_start_datetime", "visits"),
    ("condition_occurrence", "condition_concept_id", "condition_start_datetime", "conditions"),
    ("drug_exposure", "drug_concept_id", "drug_exposure_start_datetime", "drugs"),
    ("measurement", "measurement_concept_id", "measurement_datetime", "measurements"),
    ("procedure_occurrence", "procedure_concept_id", "procedure_datetime", "procedures"),
)


def _timeline_rows(task_dir: Path, task: str) -> pd.DataFrame:
    """Records of one synthetic patient (an internal patient with an event and a median
    number of condition records), as ``domain``, ``concept``, ``days`` from the index CT."""
    factors = read_truth(
        *_where(task_dir),
        reader=_READER,
        columns=["study_id", "person_id", "institution", "recorded_event", "defect"],
    )
    index = pd.read_parquet(task_dir / "imaging_index.parquet")
    omop = task_dir / "omop"
    conditions = pd.read_parquet(omop / "condition_occurrence.parquet", columns=["person_id"])
    n_cond = conditions["person_id"].value_counts()
    site = INSTITUTIONS["internal"][0]
    pool = factors[(factors["institution"] == site) & (factors["defect"] == "")]
    with_event = pool[pool["recorded_event"] == 1]
    pool = with_event if len(with_event) else pool
    pool = pool.drop_duplicates("person_id").assign(
        n=lambda d: d["person_id"].map(n_cond).fillna(0)
    )
    pool = pool.sort_values(["n", "study_id"], kind="stable")
    chosen = pool.iloc[len(pool) // 2]
    person = int(chosen["person_id"])
    index_time = pd.Timestamp(
        index.loc[index["study_id"] == chosen["study_id"], "study_datetime"].iloc[0]
    )
    names = pd.read_parquet(omop / "concept.parquet", columns=["concept_id", "concept_name"])
    names = dict(zip(names["concept_id"], names["concept_name"], strict=True))
    parts = []
    for table, concept_col, time_col, domain in _DOMAINS:
        rows = pd.read_parquet(
            omop / f"{table}.parquet",
            columns=[concept_col, time_col],
            filters=[("person_id", "=", person)],
        )
        parts.append(
            pd.DataFrame(
                {
                    "domain": domain,
                    "concept": rows[concept_col].map(names).fillna("other").to_numpy(),
                    "days": (pd.to_datetime(rows[time_col]) - index_time).dt.total_seconds()
                    / 86400.0,
                }
            )
        )
    death = pd.read_parquet(
        omop / "death.parquet", columns=["death_datetime"], filters=[("person_id", "=", person)]
    )
    parts.append(
        pd.DataFrame(
            {
                "domain": "death",
                "concept": "death",
                "days": (pd.to_datetime(death["death_datetime"]) - index_time).dt.total_seconds()
                / 86400.0,
            }
        )
    )
    parts.append(pd.DataFrame({"domain": ["index CT"], "concept": [task.upper()], "days": [0.0]}))
    return pd.concat(parts, ignore_index=True).sort_values("days", kind="stable")


def ehr_timeline(task_dir: str | Path, task: str) -> tuple[plt.Figure, pd.DataFrame]:
    """The record of one synthetic patient: a figure with one lane per OMOP domain (x: days
    relative to the index CT, negative = before) and a table of the distinct conditions and
    drugs with the day each was first recorded. No ids, no dates."""
    rows = _timeline_rows(Path(task_dir), task)
    horizon = TASKS[task].horizon_days
    lanes = ["index CT", "death", "procedures", "measurements", "drugs", "conditions", "visits"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for y, lane in enumerate(lanes):
        part = rows[rows["domain"] == lane]
        marker = {"index CT": "*", "death": "X"}.get(lane, "|")
        size = 140 if lane in ("index CT", "death") else 60
        ax.scatter(part["days"], np.full(len(part), y), marker=marker, s=size, alpha=0.7)
    ax.axvline(0.0, color="black", lw=0.8, ls="--")
    ax.axvspan(0.0, horizon, color="tab:orange", alpha=0.08, label=f"horizon ({horizon} days)")
    ax.set_yticks(range(len(lanes)), lanes)
    ax.set_xlabel("days relative to the index CT")
    ax.set_title(f"One synthetic patient's record ({task.upper()} twin, internal site)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    first = (
        rows[rows["domain"].isin(["conditions", "drugs", "procedures"])]
        .groupby(["domain", "concept"], as_index=False)["days"]
        .min()
        .rename(columns={"days": "first recorded (days from index CT)"})
        .round(0)
    )
    return fig, first


def km_by_institution(task_dir: str | Path, task: str) -> plt.Figure:
    """Kaplan-Meier event-free curves per institution from the recorded outcomes (what a
    cohort builder sees, planted defects left out), and dashed, the true event times without
    censoring (ground truth, known only in the twin)."""
    f = read_truth(*_where(Path(task_dir)), reader=_READER)
    f = f[f["defect"] == ""]
    horizon = TASKS[task].horizon_days
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, (site, part) in enumerate(f.groupby("institution", sort=True)):
        color = f"C{k}"
        KaplanMeierFitter(label=f"{site}: recorded (n={len(part)})").fit(
            part["recorded_time_days"], part["recorded_event"]
        ).plot_survival_function(ax=ax, ci_show=True, color=color)
        grid = np.linspace(0, horizon, 200)
        true = np.asarray(part["true_event_time_days"])
        ax.plot(
            grid,
            [(true > t).mean() for t in grid],
            ls="--",
            color=color,
            label=f"{site}: true, uncensored",
        )
    ax.set_xlim(0, horizon)
    ax.set_xlabel("days after the index CT")
    ax.set_ylabel("event-free probability")
    ax.set_title(f"Kaplan-Meier by institution ({task.upper()} twin)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def knob_table(info: dict[str, Any]) -> pd.DataFrame:
    """The generator's settings from a task's ``twin.json``: the manifest knobs
    (``data.synthetic``) and the sizes they imply."""
    p = info["parameters"]
    rows = [
        (
            "profile",
            p["profile"],
            "numbers of CT studies and event rates (tiny, quick: small teaching twins with "
            "raised event rates; paper: the paper's sizes and rates)",
        ),
        ("seed", p["seed"], "every random draw; equal settings give identical files"),
        (
            "image_share",
            p["image_share"],
            "share of the non-interaction log-hazard variance carried by CT factors",
        ),
    ]
    if "interaction" in p:
        rows.append(
            (
                "interaction",
                p["interaction"],
                "weight (kappa) of the cross-modal interaction: CT factor x EHR modifier",
            )
        )
    if p.get("min_event_rate") is not None:
        rows.append(
            (
                "min_event_rate",
                p["min_event_rate"],
                "floor on each institution's event fraction (raises the paper's rates)",
            )
        )
    for inst, n in p["sizes"].items():
        rows.append((f"studies ({inst})", n, "from the profile"))
    rows.append(("generator_version", info["generator_version"], "the twin's code version"))
    return pd.DataFrame(rows, columns=["knob", "value", "what it sets"]).set_index("knob")


def factor_table(task: str, image_share: float, interaction: float = DEFAULT_INTERACTION) -> pd.DataFrame:
    """Which modality shows each factor, its group (CT-exclusive, EHR-exclusive, shared) and
    how it enters the true log-hazard (per unit of the factor, natural-log units; see
    ``helpers.twin.factor_effects``)."""
    t = pd.DataFrame(factor_effects(task, image_share, interaction=interaction))
    t["CT"] = np.where(t["ct"], "yes", "")
    t["EHR"] = np.where(t["ehr"], "yes", "")
    t["group"] = t["group"].map({"ct": "CT-exclusive", "ehr": "EHR-exclusive", "shared": "shared"})
    t["interaction"] = t["interaction"].map(
        {"core": "CT factor of the interaction", "modifier": "EHR factor of the interaction", "": ""}
    )
    t = t.rename(columns={"term": "log-hazard per unit"})
    cols = ["factor", "CT", "EHR", "group", "log-hazard per unit", "interaction"]
    return t[cols].set_index("factor")


def balance_table(task_dir: Path, task: str) -> pd.DataFrame:
    """What each group of factors explains of the true log-hazard of the internal studies
    (``helpers.twin.information_balance``: R^2 of a fit on the factors and their squares)."""
    factors = read_truth(*_where(Path(task_dir)), reader=_READER)
    internal = factors[factors["institution"] == INSTITUTIONS["internal"][0]]
    r2 = information_balance(internal, task)
    labels = {
        "ct_exclusive": "CT-exclusive factors",
        "ehr_exclusive": "EHR-exclusive factors",
        "ct_visible": "everything the CT shows",
        "ehr_visible": "everything the records show",
        "additive": "all factors, additively",
        "non_additive": "non-additive share (the interaction)",
    }
    return pd.DataFrame({"R²": [r2[k] for k in labels]}, index=pd.Index(labels.values(), name="explains"))


def event_rate_table(info: dict[str, Any]) -> pd.DataFrame:
    """Per institution: studies, patients, events, the event fraction within the horizon
    against its target (the paper's rate, raised by a teaching profile's floor; both shown),
    and the oracle C-index of the true log-hazard."""
    rows = []
    for site, counts in info["counts"].items():
        r = info["event_rates"][site]
        rows.append(
            {
                "institution": _SITE_LABEL.get(site, site),
                "studies": counts["studies"],
                "patients": counts["patients"],
                "events": counts["events"],
                "event fraction": r["observed_event_fraction"],
                "target": r["target_event_fraction"],
                "paper's rate": r.get("paper_event_fraction", r["target_event_fraction"]),
                "oracle C-index": r["oracle_c_index"],
            }
        )
    return pd.DataFrame(rows).set_index("institution")
