"""The study's comparison tables at several settings of the twin, gathered into one frame.

Every setting of the digital twin (``helpers.tasks.Setting``) has its own folder
``<output_dir>/<setting label>``; ``collect`` reads the comparison table of each
(``comparisons/<task>/cindex.csv``, written by ``notebooks/04_compare.ipynb`` or by the
mechanism study, ``helpers.mechanism``) into one frame of ``RESULT_COLUMNS``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from helpers.compare import ORACLE
from helpers.tasks import TASKS, UNIMODAL_IMAGE, Setting

__all__ = ["RESULT_COLUMNS", "collect"]

RESULT_COLUMNS: tuple[str, ...] = (
    "task", "image_share", "interaction", "twin_seed", "cohort", "split", "fusion", "ehr_repr", "model", "seed", "n",
    "events", "c_index", "lower", "upper", "se", "n_redrawn",
    "diff_vs_image", "diff_vs_image_lower", "diff_vs_image_upper", "p_vs_image",
    "diff_vs_concat", "diff_vs_concat_lower", "diff_vs_concat_upper", "p_vs_concat",
)
_FEW_EVENTS = 5  # below this many events a cohort's C-index is flagged as noise in ``reading``
_UNIMODAL = ("image_only", "ehr_only")


def collect(output_dir: str | Path, settings: list[Setting], tasks: tuple[str, ...] = tuple(TASKS), *,
            ehr_reprs: tuple[str, ...] = ("onehot",), seed: int = 0) -> pd.DataFrame:
    """One row per task, setting, model and evaluation cohort (``RESULT_COLUMNS``), read from
    each setting's ``comparisons/<task>/cindex.csv``: the oracle, image only, and the models
    of ``ehr_reprs`` trained with ``seed`` (what the sweep trains at every setting; the study's
    own setting may hold more). A missing table is an error naming the file and the command
    that makes it."""
    frames = []
    for setting in settings:
        for task in tasks:
            path = Path(output_dir) / setting.label / "comparisons" / task / "cindex.csv"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no comparison at setting {setting.label} for task {task!r}; "
                                        f"run it with: snakemake {path}")
            frame = pd.read_csv(path)
            keep = (frame["model"] == ORACLE) | (frame["ehr_repr"].isin(ehr_reprs + (UNIMODAL_IMAGE,))
                                                  & (frame["seed"] == seed))
            frame = frame[keep].copy()
            frame.insert(0, "task", task)
            frame.insert(1, "image_share", setting.image_share)
            frame.insert(2, "interaction", setting.interaction)
            frame.insert(3, "twin_seed", setting.seed)
            frames.append(frame)
    if not frames:
        raise ValueError("collect: no setting given")
    results = pd.concat(frames, ignore_index=True)
    return results.loc[:, [c for c in RESULT_COLUMNS if c in results.columns]]
