"""Model comparison: C-index with bootstrap CIs, paired tests and the paper's Table 1 layout.

Reads the runs written by the training notebook (``runs/<task>/<ehr_repr>/<fusion>/seed-<k>``);
scoring uses ``helpers.metrics`` only. The oracle (the twin's true log-hazard) is read from
the twin's ground-truth folder, the one place outside the twin where that folder is read.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.manifest import Manifest
from helpers.metrics import bootstrap_ci, paired_bootstrap_test
from helpers.tasks import UNIMODAL_IMAGE

__all__ = [
    "EVAL_SPLITS",
    "ORACLE",
    "collect_runs",
    "model_label",
    "oracle_risk",
    "score_runs",
    "table1",
    "table1_markdown",
    "write_outputs",
]

EVAL_SPLITS = {"test": "Internal", "external": "External"}
ORACLE = "Oracle (true risk)"
_FUSION_NAMES = {
    "image_only": "Image only",
    "ehr_only": "EHR only",
    "concat": "Concatenation",
    "contrastive": "Contrastive learning",
    "cross_attention": "Cross-attention",
    "coattn_image_guided": "Co-attention (image guide)",
    "coattn_ehr_guided": "Co-attention (EHR guide)",
}
_REPR_NAMES = {"onehot": "one-hot", "clmbr": "CLMBR"}


def model_label(ehr_repr: str, fusion: str) -> str:
    """Row label as in the paper's Table 1, e.g. ``Concatenation (one-hot)``.

    >>> model_label("none", "image_only"), model_label("onehot", "concat")
    ('Image only', 'Concatenation (one-hot)')
    """
    name = _FUSION_NAMES.get(fusion, fusion)
    return name if ehr_repr == UNIMODAL_IMAGE else f"{name} ({_REPR_NAMES.get(ehr_repr, ehr_repr)})"


def collect_runs(runs_dir: Path, task: str) -> pd.DataFrame:
    """Every complete run of ``task`` under ``runs_dir`` (a run is complete when its
    ``metrics.json`` exists). Columns: ehr_repr, fusion, seed, path."""
    base = Path(runs_dir) / task
    rows = []
    for metrics in sorted(base.glob("*/*/seed-*/metrics.json")):
        folder = metrics.parent
        rows.append({
            "ehr_repr": folder.parent.parent.name,
            "fusion": folder.parent.name,
            "seed": int(folder.name.removeprefix("seed-")),
            "path": folder,
        })
    if not rows:
        raise FileNotFoundError(f"{base}: no complete training run (no */*/seed-*/metrics.json)")
    return pd.DataFrame(rows)


def oracle_risk(manifest: Manifest, task: str) -> pd.Series | None:
    """The twin's true log-hazard per study (None for real data)."""
    if manifest.data.source != "synthetic":
        return None
    path = manifest.twin_dir / task / "ground_truth" / "factors.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the twin's ground truth is missing")
    truth = pd.read_parquet(path, columns=["study_id", "true_log_hazard"])
    return truth.set_index("study_id")["true_log_hazard"]


def score_runs(
    runs: pd.DataFrame,
    cohort: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    oracle: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per model, seed and evaluation split: C-index, 95% CI, and paired tests
    against the image-only model (``p_vs_image``) and against concatenation with the same EHR
    representation (``p_vs_concat``), each on the same bootstrap resamples of the split.
    Each (split, comparison) draws from ``numpy.random.default_rng([seed, ...])``."""
    outcome = cohort.set_index("study_id")[["time", "event", "split"]]
    preds = {}
    for row in runs.itertuples(index=False):
        frame = pd.read_parquet(Path(row.path) / "predictions.parquet")
        preds[(row.ehr_repr, row.fusion, row.seed)] = frame.set_index("study_id")["risk"]
    if oracle is not None:
        preds[("oracle", "oracle", 0)] = oracle
    out = []
    for s_idx, (split, column) in enumerate(EVAL_SPLITS.items()):
        ids = outcome.index[outcome["split"] == split]
        if len(ids) == 0:
            continue
        time = outcome.loc[ids, "time"].to_numpy()
        event = outcome.loc[ids, "event"].to_numpy()
        if event.sum() == 0:
            continue
        for m_idx, ((ehr_repr, fusion, run_seed), risk_all) in enumerate(preds.items()):
            missing = ids.difference(risk_all.index)
            if len(missing):
                raise ValueError(f"run {ehr_repr}/{fusion}/seed-{run_seed}: no prediction for {len(missing)} {split} studies, e.g. {', '.join(missing[:3])}")
            risk = risk_all.loc[ids].to_numpy()
            ci = bootstrap_ci(time=time, event=event, risk=risk, n_boot=n_boot, rng=np.random.default_rng([seed, s_idx, m_idx]))
            row = {
                "model": ORACLE if fusion == "oracle" else model_label(ehr_repr, fusion),
                "ehr_repr": ehr_repr, "fusion": fusion, "seed": run_seed, "split": split, "cohort": column,
                "n": len(ids), "events": int(event.sum()), "c_index": ci.estimate, "lower": ci.lower,
                "upper": ci.upper, "n_redrawn": ci.n_redrawn,
            }
            for name, ref in (("image", (UNIMODAL_IMAGE, "image_only", run_seed)), ("concat", (ehr_repr, "concat", run_seed))):
                row[f"p_vs_{name}"] = np.nan
                if fusion == "oracle" or ref == (ehr_repr, fusion, run_seed) or ref not in preds:
                    continue
                test = paired_bootstrap_test(time=time, event=event, risk_a=risk, risk_b=preds[ref].loc[ids].to_numpy(),
                                             n_boot=n_boot, rng=np.random.default_rng([seed, s_idx, m_idx, len(name)]))
                row[f"p_vs_{name}"] = test.p_value
            out.append(row)
    return pd.DataFrame(out)


def table1(scores: pd.DataFrame, *, alpha: float = 0.05) -> pd.DataFrame:
    """The paper's layout: one row per model, one column per cohort; cells
    ``0.837 (0.828-0.847)`` with ``*`` for p < alpha against image-only and ``+`` against
    concatenation. Uses the smallest seed of each model. A ``best`` marker column set holds
    the best model per column (the oracle excluded)."""
    first = scores[scores["seed"] == scores.groupby(["ehr_repr", "fusion"])["seed"].transform("min")]
    order = list(dict.fromkeys(first["model"]))
    cells, best = {}, {}
    for column in EVAL_SPLITS.values():
        part = first[first["cohort"] == column].set_index("model")
        if part.empty:
            continue
        models = part[part.index != ORACLE]
        best[column] = models["c_index"].idxmax() if len(models) else None
        texts = {}
        for model, r in part.iterrows():
            marks = ("*" if r["p_vs_image"] < alpha else "") + ("+" if r["p_vs_concat"] < alpha else "")
            texts[model] = f"{r['c_index']:.3f}{marks} ({r['lower']:.3f}-{r['upper']:.3f})"
        cells[column] = texts
    table = pd.DataFrame(cells).reindex(order)
    table.index.name = "Model"
    table.attrs["best"] = best
    return table


def table1_markdown(table: pd.DataFrame) -> str:
    """Table 1 as a Markdown table with the best model of each column in bold."""
    best = table.attrs.get("best", {})
    columns = list(table.columns)
    lines = ["| Model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for model, row in table.iterrows():
        cells = []
        for column in columns:
            text = "" if pd.isna(row[column]) else str(row[column]).replace("*", "\\*")
            cells.append(f"**{text}**" if best.get(column) == model and text else text)
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(scores: pd.DataFrame, table: pd.DataFrame, out_dir: Path) -> None:
    """Write ``cindex.csv`` (long), ``table1.csv`` and ``table1.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    scores.to_csv(out_dir / "cindex.csv", index=False)
    (out_dir / "table1.md").write_text(table1_markdown(table) + "\n")
    (out_dir / "best.json").write_text(json.dumps(table.attrs.get("best", {}), indent=2))
    tmp = out_dir / ".table1.csv.tmp"
    table.to_csv(tmp)
    tmp.replace(out_dir / "table1.csv")
