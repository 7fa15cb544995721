"""The run format: where a training run lives, what it writes, and how it is read back.

One training run (one task, EHR representation, fusion strategy and seed) is a folder::

    <run_root>/runs/<task>/<ehr_repr>/<fusion>/seed-<seed>/
        params.json           what made it: names, input paths and their sha256, the encoders'
                              metadata, the training configuration
        predictions.parquet   study_id, split, risk (higher = earlier event), survival_<h>d
        model.pt              the trained weights
        metrics.json          Harrell's C per split; written last, so it marks a complete run

This module owns that format and needs no torch: the comparison reads runs through it, and so
can anyone scoring predictions made elsewhere. ``RunSpec`` names one run's inputs; training
it is ``helpers.training.train_run``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from helpers.tasks import EHR_REPRS, FUSIONS, UNIMODAL_IMAGE, check_choice, get_strategy, get_task

__all__ = [
    "RunSpec",
    "RunFormatError",
    "run_dir",
    "survival_column",
    "prediction_columns",
    "read_params",
    "collect_runs",
    "read_predictions",
]


class RunFormatError(ValueError):
    """A run folder does not hold what the run format says it must."""


def run_dir(run_root: str | Path, task: str, ehr_repr: str, fusion: str, seed: int) -> Path:
    """``<run_root>/runs/<task>/<ehr_repr>/<fusion>/seed-<seed>``.

    >>> run_dir("out", "pe", "none", "image_only", 2).as_posix()
    'out/runs/pe/none/image_only/seed-2'
    """
    return Path(run_root) / "runs" / task / ehr_repr / fusion / f"seed-{int(seed)}"


def survival_column(horizon_days: int) -> str:
    """Name of the predictions column with S(horizon | x).

    >>> survival_column(365)
    'survival_365d'
    """
    return f"survival_{int(horizon_days)}d"


def prediction_columns(horizon_days: int) -> tuple[str, ...]:
    """The columns of ``predictions.parquet`` for a task with this horizon."""
    return ("study_id", "split", "risk", survival_column(horizon_days))


@dataclass(frozen=True)
class RunSpec:
    """One training run: which model, on which inputs, written where.

    ``ehr_repr`` is ``UNIMODAL_IMAGE`` (``"none"``) exactly when the strategy uses no EHR;
    ``options`` are training hyper-parameters (fields of ``helpers.training.TrainConfig``;
    the ones not given keep their defaults there).
    """

    task: str
    ehr_repr: str
    fusion: str
    seed: int
    cohort_path: Path
    image_embeddings: Path | None
    ehr_embeddings: Path | None
    output_dir: Path
    options: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        get_task(self.task)
        strategy = get_strategy(self.fusion)
        check_choice("ehr_repr", self.ehr_repr, EHR_REPRS + (UNIMODAL_IMAGE,))
        if strategy.uses_ehr == (self.ehr_repr == UNIMODAL_IMAGE):
            expected = f"one of {', '.join(EHR_REPRS)}" if strategy.uses_ehr else f"{UNIMODAL_IMAGE!r}"
            raise RunFormatError(f"parameter 'ehr_repr': fusion {self.fusion!r} needs ehr_repr {expected}, "
                                 f"got {self.ehr_repr!r}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed or self.seed < 0:
            raise RunFormatError(f"parameter 'seed': expected an integer >= 0, got {self.seed!r}")
        for name, needed in (("image_embeddings", strategy.uses_image), ("ehr_embeddings", strategy.uses_ehr)):
            if needed and not getattr(self, name):
                raise RunFormatError(f"parameter {name!r}: fusion {self.fusion!r} needs it")

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.ehr_repr, self.fusion, int(self.seed))


def read_params(path: str | Path) -> dict:
    """A run's ``params.json`` (``path`` is the run folder), checked for the names that
    identify the run."""
    file = Path(path) / "params.json"
    if not file.is_file():
        raise RunFormatError(f"{file}: missing; a run folder holds params.json, predictions.parquet, metrics.json")
    params = json.loads(file.read_text())
    missing = [k for k in ("task", "ehr_repr", "fusion", "seed") if k not in params]
    if missing:
        raise RunFormatError(f"{file}: missing key(s) {', '.join(missing)}")
    return params


def collect_runs(runs_dir: str | Path, task: str) -> pd.DataFrame:
    """Every complete run of ``task`` under ``runs_dir`` (complete: ``metrics.json`` exists),
    identified by its ``params.json``. Columns: ehr_repr, fusion, seed, path. A run whose
    parameters disagree with its folder is an error, not a guess."""
    base = Path(runs_dir) / task
    rows = []
    for metrics in sorted(base.glob("*/*/seed-*/metrics.json")):
        folder = metrics.parent
        params = read_params(folder)
        if params["task"] != task:
            raise RunFormatError(f"{folder}: params.json says task {params['task']!r}, the folder is under {task!r}")
        check_choice("fusion", params["fusion"], FUSIONS)
        expected = base / params["ehr_repr"] / params["fusion"] / f"seed-{int(params['seed'])}"
        if expected.resolve() != folder.resolve():
            raise RunFormatError(f"{folder}: params.json describes run {params['ehr_repr']}/{params['fusion']}/"
                                 f"seed-{params['seed']}, which belongs in {expected}")
        rows.append({"ehr_repr": params["ehr_repr"], "fusion": params["fusion"], "seed": int(params["seed"]),
                     "path": folder})
    if not rows:
        raise FileNotFoundError(f"{base}: no complete training run (no */*/seed-*/metrics.json)")
    return pd.DataFrame(rows)


def read_predictions(runs: pd.DataFrame) -> dict[tuple[str, str, int], pd.DataFrame]:
    """Each run's ``predictions.parquet`` indexed by ``study_id``, keyed by
    ``(ehr_repr, fusion, seed)``."""
    out = {}
    for row in runs.itertuples(index=False):
        path = Path(row.path) / "predictions.parquet"
        frame = pd.read_parquet(path)
        missing = [c for c in ("study_id", "split", "risk") if c not in frame.columns]
        if missing:
            raise RunFormatError(f"{path}: missing column(s) {', '.join(missing)}")
        out[(row.ehr_repr, row.fusion, int(row.seed))] = frame.set_index("study_id")
    return out
