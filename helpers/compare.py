"""Model comparison: C-index with bootstrap CIs, paired tests and the paper's Table 1 layout;
IPCW metrics (Uno's C, time-dependent AUC, integrated Brier score), calibration, Holm-adjusted
p-values and seed-to-seed variation.

Reads the runs written by the training notebook through ``helpers.runs`` (the run format);
scoring uses ``helpers.metrics`` only. The oracle (the twin's true log-hazard, read through
``helpers.truth``) is a reference row of the comparison, scored like a model but never tested
and never a candidate for "best".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.manifest import Manifest
from helpers.metrics import (
    NoComparablePairsError,
    bootstrap_ci,
    bootstrap_metric,
    brier_score,
    calibration,
    harrell_c,
    holm,
    integrated_brier_score,
    paired_bootstrap_test,
    time_dependent_auc,
    uno_c,
)
from helpers.runs import collect_runs, read_predictions, survival_column
from helpers.tasks import EHR_REPRESENTATIONS, MULTIMODAL, STRATEGIES, UNIMODAL_IMAGE

__all__ = [
    "EVAL_SPLITS",
    "ORACLE",
    "TASK_COLUMNS",
    "best_model",
    "validation_scores",
    "calibration_table",
    "collect_runs",
    "differences",
    "model_label",
    "oracle_risk",
    "read_predictions",
    "row_order",
    "score_extended",
    "score_runs",
    "seed_summary",
    "table1",
    "table1_markdown",
    "table1_paper",
    "write_outputs",
    "write_table1",
]

EVAL_SPLITS = {"test": "Internal", "external": "External"}
ORACLE = "Oracle (true risk)"
_REFERENCES = (("image", "Image only"), ("concat", "Concatenation"))


def row_order(labels: list[str]) -> list[str]:
    """``labels`` in the paper's Table 1 order: image only, EHR only (one-hot, CLMBR), then per
    EHR representation concatenation, contrastive, cross-attention, co-attention (image guide),
    co-attention (EHR guide); other labels after them in their given order, the oracle last.

    >>> row_order([ORACLE, "Concatenation (one-hot)", "EHR only (one-hot)", "Image only"])
    ['Image only', 'EHR only (one-hot)', 'Concatenation (one-hot)', 'Oracle (true risk)']
    """
    canonical = [model_label(UNIMODAL_IMAGE, "image_only")]
    canonical += [model_label(r, "ehr_only") for r in EHR_REPRESENTATIONS]
    canonical += [model_label(r, f) for r in EHR_REPRESENTATIONS for f in MULTIMODAL]
    rank = {label: k for k, label in enumerate(canonical)}
    known = sorted((label for label in labels if label in rank), key=rank.__getitem__)
    others = [label for label in labels if label not in rank and label != ORACLE]
    return known + others + ([ORACLE] if ORACLE in labels else [])


def model_label(ehr_repr: str, fusion: str) -> str:
    """Row label as in the paper's Table 1, e.g. ``Concatenation (one-hot)``.

    >>> model_label("none", "image_only"), model_label("onehot", "concat")
    ('Image only', 'Concatenation (one-hot)')
    """
    name = STRATEGIES[fusion].label if fusion in STRATEGIES else fusion
    if ehr_repr == UNIMODAL_IMAGE:
        return name
    return f"{name} ({EHR_REPRESENTATIONS[ehr_repr].label if ehr_repr in EHR_REPRESENTATIONS else ehr_repr})"


# The oracle's key among the runs' (ehr_repr, fusion, seed) keys: its rows have no EHR
# representation, strategy or training seed.
_ORACLE_KEY = None


def _identity(key: tuple[str, str, int] | None) -> tuple[str | None, str | None, float]:
    return (None, None, np.nan) if key is _ORACLE_KEY else key


def _label(key: tuple[str, str, int] | None) -> str:
    return ORACLE if key is _ORACLE_KEY else model_label(*key[:2])


def _describe(key: tuple[str, str, int] | None) -> str:
    return "the oracle" if key is _ORACLE_KEY else f"run {key[0]}/{key[1]}/seed-{key[2]}"


def oracle_risk(manifest: Manifest, task: str) -> pd.Series | None:
    """The twin's true log-hazard per study (None for real data)."""
    if manifest.data.source != "synthetic":
        return None
    from helpers.truth import read_truth

    truth = read_truth(manifest.twin_dir, task, reader="oracle", columns=["study_id", "true_log_hazard"])
    return truth.set_index("study_id")["true_log_hazard"]


def score_runs(
    runs: pd.DataFrame,
    cohort: pd.DataFrame,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    oracle: pd.Series | None = None,
) -> pd.DataFrame:
    """One row per model, seed and evaluation split: C-index, 95% CI and bootstrap standard
    error (``se``), and paired tests against the image-only model (``p_vs_image``, with the
    difference ``diff_vs_image`` and its 95% CI ``diff_vs_image_lower``/``_upper``) and against
    concatenation with the same EHR representation (``*_vs_concat``), each on the same
    bootstrap resamples of the split. ``p_vs_*_holm`` are Holm-adjusted within one task and
    cohort (the tests behind one column of Table 1; the oracle is not tested).
    Every bootstrap resamples patients (``person_id``) with all their studies, so repeat scans
    of one patient are never treated as independent. Each (split, comparison) draws from
    ``numpy.random.default_rng([seed, ...])``."""
    outcome = _outcome(cohort)
    preds = {key: frame["risk"] for key, frame in read_predictions(runs).items()}
    if oracle is not None:
        preds[_ORACLE_KEY] = oracle
    out = []
    for s_idx, (split, column) in enumerate(EVAL_SPLITS.items()):
        ids = outcome.index[outcome["split"] == split]
        if len(ids) == 0:
            continue
        time = outcome.loc[ids, "time"].to_numpy()
        event = outcome.loc[ids, "event"].to_numpy()
        groups = outcome.loc[ids, "person_id"].to_numpy()
        if event.sum() == 0:
            continue
        for m_idx, (key, risk_all) in enumerate(preds.items()):
            ehr_repr, fusion, run_seed = _identity(key)
            missing = ids.difference(risk_all.index)
            if len(missing):
                raise ValueError(f"{_describe(key)}: no prediction for {len(missing)} {split} studies, e.g. {', '.join(missing[:3])}")
            risk = risk_all.loc[ids].to_numpy()
            ci = bootstrap_ci(time=time, event=event, risk=risk, n_boot=n_boot, rng=np.random.default_rng([seed, s_idx, m_idx]),
                              groups=groups)
            row = {
                "model": _label(key), "ehr_repr": ehr_repr, "fusion": fusion, "seed": run_seed, "split": split,
                "cohort": column, "n": len(ids), "events": int(event.sum()), "c_index": ci.estimate, "lower": ci.lower,
                "upper": ci.upper, "se": float(np.std(ci.samples, ddof=1)) if n_boot > 1 else np.nan,
                "n_redrawn": ci.n_redrawn,
            }
            for name, ref in (("image", (UNIMODAL_IMAGE, "image_only", run_seed)), ("concat", (ehr_repr, "concat", run_seed))):
                for suffix in ("", "_lower", "_upper"):
                    row[f"diff_vs_{name}{suffix}"] = np.nan
                row[f"p_vs_{name}"] = np.nan
                if key is _ORACLE_KEY or ref == key or ref not in preds:
                    continue
                if name == "concat" and fusion in ("image_only", "ehr_only"):
                    continue  # as in the paper, unimodal models are tested against image-only only
                test = paired_bootstrap_test(time=time, event=event, risk_a=risk, risk_b=preds[ref].loc[ids].to_numpy(),
                                             n_boot=n_boot, rng=np.random.default_rng([seed, s_idx, m_idx, len(name)]),
                                             groups=groups)
                row[f"p_vs_{name}"] = test.p_value
                row[f"diff_vs_{name}"], row[f"diff_vs_{name}_lower"], row[f"diff_vs_{name}_upper"] = (
                    test.difference, test.lower, test.upper)
            out.append(row)
    scores = pd.DataFrame(out)
    for column in ("p_vs_image_holm", "p_vs_concat_holm"):
        scores[column] = np.nan
    for _, part in scores.groupby(["cohort", "seed"]) if len(scores) else []:
        pvalues = part[["p_vs_image", "p_vs_concat"]].to_numpy()
        adjusted = holm(pvalues.ravel()).reshape(pvalues.shape)
        scores.loc[part.index, "p_vs_image_holm"] = adjusted[:, 0]
        scores.loc[part.index, "p_vs_concat_holm"] = adjusted[:, 1]
    return scores


def table1(scores: pd.DataFrame, *, alpha: float = 0.05, adjusted: bool = False) -> pd.DataFrame:
    """The paper's layout: one row per model (in the paper's order, see :func:`row_order`), one
    column per cohort; cells ``0.837 (0.828-0.847)`` with ``*`` for p < alpha against
    image-only and ``+`` against concatenation (raw p-values as in the paper, or the
    Holm-adjusted ones with ``adjusted=True``). Uses the smallest seed of each model.
    ``table.attrs["best"]`` holds the best model per column (the oracle excluded)."""
    models = scores[scores["model"] != ORACLE]
    first = pd.concat([models[models["seed"] == models.groupby(["ehr_repr", "fusion"])["seed"].transform("min")],
                       scores[scores["model"] == ORACLE]])
    order = row_order(list(dict.fromkeys(first["model"])))
    suffix = "_holm" if adjusted else ""
    cells, best = {}, {}
    for column in EVAL_SPLITS.values():
        part = first[first["cohort"] == column].set_index("model")
        if part.empty:
            continue
        models = part[part.index != ORACLE]
        best[column] = models["c_index"].idxmax() if len(models) else None
        texts = {}
        for model, r in part.iterrows():
            marks = ("*" if r[f"p_vs_image{suffix}"] < alpha else "") + ("+" if r[f"p_vs_concat{suffix}"] < alpha else "")
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


# ---------------------------------------------------------------------------------------------
# Beyond Harrell's C: IPCW metrics, calibration, differences, seeds, Table 1 across tasks

TASK_COLUMNS = ("pe", "mace")


def _survival_column(frame: pd.DataFrame, horizon: int) -> str | None:
    column = survival_column(horizon)
    return column if column in frame.columns else None


def _survival_grid(frame: pd.DataFrame, outcome: pd.DataFrame, ids: pd.Index, times: np.ndarray) -> np.ndarray | None:
    """Survival of ``ids`` at ``times`` from a Breslow baseline refitted on the run's training
    predictions (the baseline the training notebook uses); None when the run has no training
    predictions (e.g. predictions brought from elsewhere)."""
    from helpers.metrics import BreslowBaseline

    train_ids = frame.index[frame["split"] == "train"].intersection(outcome.index)
    if len(train_ids) == 0 or outcome.loc[train_ids, "event"].sum() == 0:
        return None
    baseline = BreslowBaseline(frame.loc[train_ids, "risk"].to_numpy(), outcome.loc[train_ids, "time"].to_numpy(),
                               outcome.loc[train_ids, "event"].to_numpy())
    risk = frame.loc[ids, "risk"].to_numpy()
    return np.column_stack([baseline.survival(risk, float(t)) for t in times])


def _outcome(cohort: pd.DataFrame) -> pd.DataFrame:
    """``time``, ``event``, ``split`` and ``person_id`` (as strings) indexed by ``study_id``."""
    missing = [c for c in ("study_id", "person_id", "time", "event", "split") if c not in cohort.columns]
    if missing:
        raise ValueError(f"cohort table: missing column(s) {', '.join(missing)}")
    outcome = cohort.set_index("study_id")[["time", "event", "split", "person_id"]].copy()
    outcome["person_id"] = outcome["person_id"].astype(str)
    return outcome


@dataclass(frozen=True)
class _Censoring:
    """Where an evaluation split's censoring distribution comes from: ``source`` (a label),
    ``fixed`` (``train_time``/``train_event`` for point estimates), ``own`` (the evaluation
    patients themselves) and ``train_groups`` (patients of ``fixed`` when it is another split)."""

    source: str
    fixed: dict
    own: bool
    train_groups: np.ndarray | None = None

    def bootstrap(self, fn, data: dict, *, groups: np.ndarray, n_boot: int, rng: np.random.Generator):
        """``bootstrap_metric`` of ``fn`` resampling patients, with the censoring refitted on
        every resample (jointly with the evaluation patients when they are its source)."""
        if self.own:
            return bootstrap_metric(fn, {**data, "train_time": data["time"], "train_event": data["event"]},
                                    groups=groups, n_boot=n_boot, rng=rng)
        return bootstrap_metric(fn, data, train=self.fixed, groups=groups, train_groups=self.train_groups,
                                n_boot=n_boot, rng=rng)


def _censoring_source(split: str, train: pd.DataFrame, time: np.ndarray, event: np.ndarray) -> _Censoring:
    """Internal test split: the internal training split's censoring; external: its own."""
    if split == "external":
        return _Censoring("external cohort", {"train_time": time, "train_event": event}, own=True)
    return _Censoring("internal train split",
                      {"train_time": train["time"].to_numpy(), "train_event": train["event"].to_numpy()},
                      own=False, train_groups=train["person_id"].to_numpy())


def _safe(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except NoComparablePairsError:
        return None


def score_extended(
    runs: pd.DataFrame,
    cohort: pd.DataFrame,
    *,
    horizon: int,
    n_boot: int = 1000,
    seed: int = 0,
    oracle: pd.Series | None = None,
    n_times: int = 10,
) -> pd.DataFrame:
    """One row per model, seed and evaluation split: Uno's C truncated at the horizon
    (``uno_c`` with ``uno_lower``/``uno_upper``), the cumulative/dynamic AUC at the horizon
    (``auc``, ``auc_lower``/``auc_upper``), the Brier score at the horizon (``brier``), the
    integrated Brier score over ``n_times`` equally spaced times up to the horizon (``ibs``,
    ``ibs_lower``/``ibs_upper``) and the Cox calibration slope at the horizon
    (``calibration_slope``, ``calibration_slope_se``).

    Censoring weights come from the Kaplan-Meier censoring distribution of the cohort being
    scored: for the internal test split, the internal ``train`` split (same institution, same
    follow-up); for the external cohort, the external cohort itself, since its censoring
    (other follow-up, other loss to follow-up) is its own. Confidence intervals are percentile
    bootstraps (``n_boot`` resamples) that resample evaluation patients (``person_id``, with
    all their studies and their weights) and refit the censoring distribution each time: the
    training patients independently for the internal split, the same resampled patients for
    the external cohort. The integrated Brier score uses
    survival curves from a Breslow baseline refitted on the run's training predictions; the
    oracle has no survival predictions, so only its Uno's C and AUC are given. A metric that is
    undefined on a split (no case or no comparable pair) is NaN.
    """
    outcome = _outcome(cohort)
    train = outcome[outcome["split"] == "train"]
    if train.empty:
        raise ValueError("score_extended: the cohort has no 'train' split for the censoring distribution")
    preds = read_predictions(runs)
    if oracle is not None:
        preds[_ORACLE_KEY] = pd.DataFrame({"risk": oracle})
    times = np.linspace(horizon / n_times, horizon, n_times)
    out = []
    for s_idx, (split, column) in enumerate(EVAL_SPLITS.items()):
        ids = outcome.index[outcome["split"] == split]
        if len(ids) == 0:
            continue
        time = outcome.loc[ids, "time"].to_numpy()
        event = outcome.loc[ids, "event"].to_numpy()
        groups = outcome.loc[ids, "person_id"].to_numpy()
        censoring = _censoring_source(split, train, time, event)
        for m_idx, (key, frame) in enumerate(preds.items()):
            ehr_repr, fusion, run_seed = _identity(key)
            risk = frame.loc[ids, "risk"].to_numpy()
            rng = np.random.default_rng([seed, s_idx, m_idx, 7])
            row = {"model": _label(key),
                   "ehr_repr": ehr_repr, "fusion": fusion, "seed": run_seed, "split": split, "cohort": column,
                   "n": len(ids), "events_by_horizon": int(((time <= horizon) & (event == 1)).sum()),
                   "censoring_from": censoring.source}
            data = {"time": time, "event": event, "risk": risk}
            for name, fn in (("uno", partial(uno_c, tau=float(horizon))),
                             ("auc", partial(time_dependent_auc, horizon=float(horizon)))):
                result = _safe(censoring.bootstrap, fn, data, groups=groups, n_boot=n_boot, rng=rng)
                key = "uno_c" if name == "uno" else "auc"
                row[key], row[f"{name}_lower"], row[f"{name}_upper"] = (
                    (result.estimate, result.lower, result.upper) if result else (np.nan,) * 3)
            column_name = _survival_column(frame, horizon)
            row.update({"brier": np.nan, "ibs": np.nan, "ibs_lower": np.nan, "ibs_upper": np.nan,
                        "calibration_slope": np.nan, "calibration_slope_se": np.nan})
            if column_name is not None:
                survival = frame.loc[ids, column_name].to_numpy()
                row["brier"] = brier_score(time, event, survival, horizon=float(horizon), **censoring.fixed)
                cal = _safe(calibration, time=time, event=event, survival=survival, horizon=float(horizon),
                            n_groups=min(10, len(ids)))
                if cal is not None:
                    row["calibration_slope"], row["calibration_slope_se"] = cal.slope, cal.slope_se
                grid = _survival_grid(frame, outcome, ids, times)
                if grid is not None:
                    ibs = censoring.bootstrap(partial(integrated_brier_score, times=times),
                                              {"time": time, "event": event, "survival": grid},
                                              groups=groups, n_boot=n_boot, rng=rng)
                    row["ibs"], row["ibs_lower"], row["ibs_upper"] = ibs.estimate, ibs.lower, ibs.upper
            out.append(row)
    return pd.DataFrame(out)


def differences(scores: pd.DataFrame) -> pd.DataFrame:
    """Long table of C-index differences from :func:`score_runs`: one row per model, seed,
    cohort and reference (``Image only`` or ``Concatenation``) with ``difference``, its paired
    95% CI (``lower``, ``upper``), the raw ``p_value`` and the Holm-adjusted ``p_holm``."""
    rows = []
    for _, r in scores.iterrows():
        for name, reference in _REFERENCES:
            if pd.isna(r.get(f"p_vs_{name}", np.nan)):
                continue
            rows.append({"model": r["model"], "ehr_repr": r["ehr_repr"], "fusion": r["fusion"], "seed": r["seed"],
                         "cohort": r["cohort"], "reference": reference, "difference": r[f"diff_vs_{name}"],
                         "lower": r[f"diff_vs_{name}_lower"], "upper": r[f"diff_vs_{name}_upper"],
                         "p_value": r[f"p_vs_{name}"], "p_holm": r[f"p_vs_{name}_holm"]})
    columns = ["model", "ehr_repr", "fusion", "seed", "cohort", "reference", "difference", "lower", "upper",
               "p_value", "p_holm"]
    return pd.DataFrame(rows, columns=columns)


def seed_summary(scores: pd.DataFrame, metric: str = "c_index") -> pd.DataFrame:
    """Seed-to-seed variation kept apart from test-set sampling variation: per model and cohort,
    the number of seeds, the mean and standard deviation of ``metric`` over seeds
    (``sd_seeds``, NaN with one seed) and the mean bootstrap standard error within a seed
    (``se_bootstrap``, from the ``se`` column when present)."""
    frame = scores[scores["model"] != ORACLE]
    grouped = frame.groupby(["model", "cohort"], sort=False)
    summary = grouped[metric].agg(n_seeds="count", mean="mean", sd_seeds="std")
    summary["se_bootstrap"] = grouped["se"].mean() if "se" in frame.columns else np.nan
    summary = summary.reset_index()
    order = {label: k for k, label in enumerate(row_order(list(dict.fromkeys(summary["model"]))))}
    return summary.sort_values(["cohort", "model"], key=lambda c: c.map(order) if c.name == "model" else c,
                               kind="stable").reset_index(drop=True)


# A run that kept the weights of one of its first epochs: early stopping found the validation C
# falling from the start, so the strategy barely trained (see ``early_stopping``).
EARLY_EPOCHS = 2


def early_stopping(runs: pd.DataFrame) -> pd.DataFrame:
    """Where early stopping stopped each run, from its ``metrics.json``: model, seed, the epoch
    whose weights it kept (``best_epoch``, counted from 1), the epochs it ran, its train and
    validation C, and ``early`` (kept one of the first ``EARLY_EPOCHS`` epochs)."""
    rows = []
    for row in runs.itertuples(index=False):
        metrics = json.loads((Path(row.path) / "metrics.json").read_text())
        splits = metrics.get("splits", {})
        rows.append({"model": model_label(row.ehr_repr, row.fusion), "seed": int(row.seed),
                     "best_epoch": int(metrics["best_epoch"]), "epochs": int(metrics["epochs"]),
                     "train_c": splits.get("train", {}).get("c_index", np.nan),
                     "val_c": splits.get("val", {}).get("c_index", np.nan)})
    frame = pd.DataFrame(rows, columns=["model", "seed", "best_epoch", "epochs", "train_c", "val_c"])
    frame["early"] = frame["best_epoch"] <= EARLY_EPOCHS
    order = {label: k for k, label in enumerate(row_order(list(dict.fromkeys(frame["model"]))))}
    return frame.sort_values(["model", "seed"], key=lambda c: c.map(order) if c.name == "model" else c,
                             kind="stable").reset_index(drop=True)


def early_stopping_reading(table: pd.DataFrame) -> str:
    """A sentence on ``early_stopping``'s table: which models kept the weights of one of their
    first epochs in every seed, in some, or none did."""
    if table.empty:
        return "No run to describe."
    share = table.groupby("model", sort=False)["early"].agg(["sum", "count"])
    always = [m for m, r in share.iterrows() if r["sum"] == r["count"]]
    some = [m for m, r in share.iterrows() if 0 < r["sum"] < r["count"]]
    if not always and not some:
        return (f"Every run trained past epoch {EARLY_EPOCHS} before early stopping chose its weights.")
    text = []
    if always:
        text.append(f"{', '.join(always)} kept the weights of epoch {EARLY_EPOCHS} or earlier in every seed")
    if some:
        text.append(f"{', '.join(some)} did in some seeds")
    return ("; ".join(text) + ". The validation C of such a run fell from its first passes over the data: the model "
            "fits its input's noise faster than the signal, so its test C says more about that input (its "
            "width against the number of events) than about the strategy. Compare its train and validation C.")


def validation_scores(runs: pd.DataFrame, cohort: pd.DataFrame) -> pd.DataFrame:
    """Harrell's C of every run on the internal ``val`` split (ehr_repr, fusion, seed,
    c_index): what choices between models are made on, never the test or external studies."""
    outcome = _outcome(cohort)
    ids = outcome.index[outcome["split"] == "val"]
    if len(ids) == 0 or outcome.loc[ids, "event"].sum() == 0:
        raise ValueError("validation_scores: the cohort has no 'val' split with an event to choose models on")
    time, event = outcome.loc[ids, "time"].to_numpy(), outcome.loc[ids, "event"].to_numpy()
    rows = []
    for (ehr_repr, fusion, run_seed), frame in read_predictions(runs).items():
        missing = ids.difference(frame.index)
        if len(missing):
            raise ValueError(f"run {ehr_repr}/{fusion}/seed-{run_seed}: no prediction for {len(missing)} val studies")
        rows.append({"ehr_repr": ehr_repr, "fusion": fusion, "seed": run_seed,
                     "c_index": harrell_c(time=time, event=event, risk=frame.loc[ids, "risk"].to_numpy())})
    return pd.DataFrame(rows, columns=["ehr_repr", "fusion", "seed", "c_index"])


def best_model(scores: pd.DataFrame) -> tuple[str, str] | None:
    """``(ehr_repr, fusion)`` of the model with the highest mean C-index over seeds in
    ``scores`` (the oracle excluded; pass :func:`validation_scores`, so that the choice never
    looks at test or external studies); None when ``scores`` is empty."""
    if "cohort" in scores.columns and set(scores["cohort"]) - {"Validation"}:
        raise ValueError("best_model: choose on validation scores (compare.validation_scores), not on "
                         f"{', '.join(sorted(set(scores['cohort'])))} scores")
    part = scores[scores.get("model", pd.Series("", index=scores.index)) != ORACLE]
    if part.empty:
        return None
    means = part.groupby(["ehr_repr", "fusion"])["c_index"].mean()
    return tuple(means.idxmax())


def calibration_table(
    frame: pd.DataFrame, cohort: pd.DataFrame, *, horizon: int, n_groups: int = 10
) -> pd.DataFrame:
    """Calibration by risk group at the horizon for one run's predictions (``frame`` indexed
    by ``study_id``) on each evaluation split: ``cohort``, ``group`` (1 = lowest predicted
    risk), ``n``, ``events``, ``predicted`` and Kaplan-Meier ``observed`` event probability,
    and the split's Cox calibration ``slope`` and ``slope_se`` repeated on each row."""
    column = _survival_column(frame, horizon)
    if column is None:
        raise ValueError(f"predictions have no survival_{int(horizon)}d column; calibration needs it")
    outcome = cohort.set_index("study_id")[["time", "event", "split"]]
    rows = []
    for split, name in EVAL_SPLITS.items():
        ids = outcome.index[outcome["split"] == split]
        if len(ids) < 2:
            continue
        result = _safe(calibration, time=outcome.loc[ids, "time"].to_numpy(), event=outcome.loc[ids, "event"].to_numpy(),
                       survival=frame.loc[ids, column].to_numpy(), horizon=float(horizon),
                       n_groups=min(n_groups, len(ids)))
        if result is None:
            continue
        for k in range(result.predicted.size):
            rows.append({"cohort": name, "group": k + 1, "n": int(result.n[k]), "events": int(result.events[k]),
                         "predicted": result.predicted[k], "observed": result.observed[k],
                         "slope": result.slope, "slope_se": result.slope_se})
    return pd.DataFrame(rows, columns=["cohort", "group", "n", "events", "predicted", "observed", "slope", "slope_se"])


def table1_paper(scores_by_task: dict[str, pd.DataFrame], *, alpha: float = 0.05, adjusted: bool = False) -> pd.DataFrame:
    """Table 1 across tasks as in the paper: rows in the paper's order (models not run are
    omitted, the oracle last), columns ``Internal PE``, ``Internal MACE``, ``External PE``,
    ``External MACE`` (those with scores), cells as in :func:`table1`. ``attrs["best"]`` holds
    the best model of each column."""
    per_task = {task: table1(scores, alpha=alpha, adjusted=adjusted) for task, scores in scores_by_task.items()}
    columns, best, labels = {}, {}, []
    for cohort in EVAL_SPLITS.values():
        for task in sorted(per_task, key=lambda t: TASK_COLUMNS.index(t) if t in TASK_COLUMNS else len(TASK_COLUMNS)):
            table = per_task[task]
            if cohort not in table.columns:
                continue
            name = f"{cohort} {task.upper()}"
            columns[name] = table[cohort]
            best[name] = table.attrs["best"].get(cohort)
            labels += list(table.index)
    out = pd.DataFrame(columns).reindex(row_order(list(dict.fromkeys(labels))))
    out.index.name = "Model"
    out.attrs["best"] = best
    return out


def write_table1(table: pd.DataFrame, out_dir: Path) -> None:
    """Write ``table1.csv`` and ``table1.md`` (best of each column in bold) into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "table1.md").write_text(table1_markdown(table) + "\n")
    tmp = out_dir / ".table1.csv.tmp"
    table.to_csv(tmp)
    tmp.replace(out_dir / "table1.csv")


# ---------------------------------------------------------------------------------------------
# One task, end to end (what notebooks/04_compare.ipynb calls)


@dataclass
class TaskScores:
    """What ``score_task`` computed and wrote for one task (see its docstring)."""

    task: str
    runs: pd.DataFrame
    cohort: pd.DataFrame
    scores: pd.DataFrame
    table: pd.DataFrame
    differences: pd.DataFrame
    extended: pd.DataFrame
    seeds: pd.DataFrame
    best: tuple[str, str] | None
    best_predictions: pd.DataFrame | None
    calibration: pd.DataFrame | None
    out_dir: Path


def score_task(manifest: Manifest, task: str, *, runs_dir: Path | None = None, n_boot: int = 1000,
               n_boot_extended: int = 200, seed: int = 0) -> TaskScores:
    """Score every run of ``task`` and write the comparison folder
    (``<run_root>/comparisons/<task>``): Harrell's C with patient-bootstrap CIs and paired tests
    (``cindex.csv``, ``table1.csv``/``.md``, ``best.json``), the differences against the
    references (``differences.csv``), Uno's C, AUC, Brier scores and calibration slopes
    (``metrics.csv``), seed-to-seed variation (``seeds.csv``) and the calibration of the model
    chosen on validation (``calibration.csv``). On the twin the oracle is scored as a reference
    row."""
    from helpers.cohort import cohort_paths, read_cohort
    from helpers.tasks import get_task

    spec = get_task(task)
    runs_dir = Path(runs_dir) if runs_dir else manifest.run_root / "runs"
    out_dir = manifest.run_root / "comparisons" / task
    runs = collect_runs(runs_dir, task)
    cohort = read_cohort(cohort_paths(manifest, task)["cohort"])
    oracle = oracle_risk(manifest, task)
    scores = score_runs(runs, cohort, n_boot=n_boot, seed=seed, oracle=oracle)
    table = table1(scores)
    write_outputs(scores, table, out_dir)
    diffs = differences(scores)
    diffs.to_csv(out_dir / "differences.csv", index=False)
    extended = score_extended(runs, cohort, horizon=spec.horizon_days, n_boot=n_boot_extended, seed=seed, oracle=oracle)
    extended.to_csv(out_dir / "metrics.csv", index=False)
    seeds = seed_summary(scores)
    seeds.to_csv(out_dir / "seeds.csv", index=False)
    best = best_model(validation_scores(runs, cohort))  # chosen on the validation split
    frame = calib = None
    if best is not None:
        run = runs[(runs["ehr_repr"] == best[0]) & (runs["fusion"] == best[1])].sort_values("seed").iloc[:1]
        frame = read_predictions(run)[(best[0], best[1], int(run["seed"].iloc[0]))]
        calib = calibration_table(frame, cohort, horizon=spec.horizon_days)
        calib.to_csv(out_dir / "calibration.csv", index=False)
    return TaskScores(task=task, runs=runs, cohort=cohort, scores=scores, table=table, differences=diffs,
                      extended=extended, seeds=seeds, best=best, best_predictions=frame, calibration=calib,
                      out_dir=out_dir)


__all__ += ["TaskScores", "score_task", "EARLY_EPOCHS", "early_stopping", "early_stopping_reading"]
