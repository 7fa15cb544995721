"""Fusion under modality imbalance: the study's comparison at several settings of the twin.

The digital twin's true log-hazard is ``beta * (sqrt(s) * image + sqrt(1 - s) * ehr +
interaction)`` with ``s = image_share`` (see ``helpers.twin``). The imbalance study is not a
pipeline of its own: the Snakefile runs the same notebooks (twin, cohort, embeddings, training,
comparison) at each setting, each into its own folder ``<output_dir>/<setting label>``
(``helpers.tasks.Setting``). ``collect`` gathers the comparison tables of those settings
(``comparisons/<task>/cindex.csv``, written by ``notebooks/04_compare.ipynb``) into one frame;
``imbalance_figure`` draws C against ``s``, ``summarise`` and ``wide_table`` tabulate it and
``reading`` turns the numbers into sentences.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.compare import ORACLE
from helpers.tasks import TASKS, UNIMODAL_IMAGE, Setting

__all__ = ["RESULT_COLUMNS", "collect", "imbalance_figure", "summarise", "wide_table", "reading"]

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


# ------------------------------------------------------------------------- figure and reading


def _labels(results: pd.DataFrame) -> list[str]:
    from helpers.compare import row_order

    return row_order(list(dict.fromkeys(results["model"])))


def imbalance_figure(results: pd.DataFrame, *, title: str | None = None):
    """Harrell's C against ``image_share``: one panel per task (rows) and cohort (columns),
    one line per model with its 95% bootstrap band, the oracle (true log-hazard) dashed.
    ``results`` is a frame returned by ``imbalance_sweep``. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt


    missing = [c for c in ("task", "image_share", "cohort", "model", "c_index", "lower", "upper") if c not in results]
    if missing:
        raise ValueError(f"results: missing column(s) {', '.join(missing)}")
    if results.empty:
        raise ValueError("results: no rows to plot")
    tasks = list(dict.fromkeys(results["task"]))
    cohorts = [c for c in ("Internal", "External") if c in set(results["cohort"])]
    cohorts += [c for c in dict.fromkeys(results["cohort"]) if c not in cohorts]
    labels = _labels(results)
    colours = dict(zip([m for m in labels if m != ORACLE], plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(len(tasks), len(cohorts), figsize=(5.2 * len(cohorts), 3.6 * len(tasks)),
                             squeeze=False, sharex=True)
    for i, task in enumerate(tasks):
        for j, cohort in enumerate(cohorts):
            ax = axes[i, j]
            part = results[(results["task"] == task) & (results["cohort"] == cohort)]
            for model in labels:
                line = part[part["model"] == model].sort_values("image_share")
                if line.empty:
                    continue
                x = line["image_share"].to_numpy(float)
                if model == ORACLE:
                    ax.plot(x, line["c_index"], "k--", lw=1.5, label=model)
                    continue
                colour = colours.get(model)
                ax.plot(x, line["c_index"], "-o", ms=3, lw=1.4, color=colour, label=model)
                ax.fill_between(x, line["lower"], line["upper"], color=colour, alpha=0.12, lw=0)
            ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
            n = part["n"].agg(["min", "max"]) if "n" in part and len(part) else None
            events = part["events"].agg(["min", "max"]) if "events" in part and len(part) else None
            extra = ""
            if n is not None and events is not None:
                extra = (f"\nn {_span(n)}, events {_span(events)}")
            ax.set_title(f"{task.upper()}, {cohort.lower()} cohort{extra}", fontsize=9)
            ax.set_xticks(sorted(results["image_share"].unique()))
            if i == len(tasks) - 1:
                ax.set_xlabel("image share s (CT part of the true risk)")
            if j == 0:
                ax.set_ylabel("Harrell's C")
    found: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(name, handle)
    seen = {name: found[name] for name in labels if name in found}
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(4, len(seen)), fontsize=8,
               frameon=False)
    fig.suptitle(title or "Fusion under modality imbalance: C-index against the twin's image share", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(seen) / 4), 1, 1))
    return fig


def _span(values: pd.Series) -> str:
    lo, hi = int(values["min"]), int(values["max"])
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per task, cohort and share: C of image only, EHR only, the best multimodal model (by C
    on that cohort, so optimistic), its gain over the better unimodal model, whether its paired
    95% CI against image only excludes 0, and the oracle's C."""

    rows = []
    for (task, cohort, share), part in results.groupby(["task", "cohort", "image_share"], sort=False):
        by = part.assign(key=part["fusion"].where(part["model"] != ORACLE, "oracle")).set_index("key")["c_index"]
        multi = part[~part["fusion"].isin(_UNIMODAL) & (part["model"] != ORACLE)]
        row = {"task": task, "cohort": cohort, "image_share": share,
               "n": int(part["n"].max()), "events": int(part["events"].max()),
               "image_only": _c_of(by, "image_only"), "ehr_only": _c_of(by, "ehr_only")}
        unimodal = np.nanmax([row["image_only"], row["ehr_only"]]) if not (
            np.isnan(row["image_only"]) and np.isnan(row["ehr_only"])) else np.nan
        if len(multi):
            best = multi.loc[multi["c_index"].idxmax()]
            row.update({"best_fusion": best["model"], "best_fusion_c": float(best["c_index"]),
                        "gain_over_unimodal": float(best["c_index"]) - unimodal,
                        "best_fusion_beats_image_ci": bool(best["diff_vs_image_lower"] > 0)
                        if pd.notna(best.get("diff_vs_image_lower")) else None,
                        "fusions_above_both_unimodal": int((multi["c_index"] > unimodal).sum())})
        else:
            row.update({"best_fusion": None, "best_fusion_c": np.nan, "gain_over_unimodal": np.nan,
                        "best_fusion_beats_image_ci": None, "fusions_above_both_unimodal": 0})
        row["oracle"] = _c_of(by, "oracle")
        rows.append(row)
    return pd.DataFrame(rows)


def wide_table(results: pd.DataFrame) -> pd.DataFrame:
    """Harrell's C with its 95% CI as text (``0.712 [0.651, 0.770]``): one row per task,
    cohort and model (in the paper's order, the oracle last), one column per share."""
    labels = _labels(results)
    frame = results.assign(
        cell=[f"{c:.3f} [{lo:.3f}, {hi:.3f}]" for c, lo, hi in results[["c_index", "lower", "upper"]].to_numpy()],
        order=results["model"].map({m: k for k, m in enumerate(labels)}),
    )
    table = frame.pivot_table(index=["task", "cohort", "order", "model"], columns="image_share", values="cell",
                              aggfunc="first")
    table = table.sort_index(level=["task", "cohort", "order"], ascending=[True, False, True])
    table.index = table.index.droplevel("order")
    table.columns = [f"s = {c:g}" for c in table.columns]
    return table


def _c_of(c_by_fusion: pd.Series, fusion: str) -> float:
    return float(c_by_fusion.loc[fusion]) if fusion in c_by_fusion.index else np.nan


def reading(results: pd.DataFrame) -> str:
    """A short reading of ``results`` in Markdown, every statement computed from the numbers:
    how the unimodal models follow the knob, which model is best at each share, where fusion
    gains most, how wide the intervals are, and the gap to the oracle."""
    summary = summarise(results)
    lines = []
    for (task, cohort), part in summary.groupby(["task", "cohort"], sort=False):
        part = part.sort_values("image_share")
        rows = results[(results["task"] == task) & (results["cohort"] == cohort)]
        models = rows[rows["model"] != ORACLE]
        first, last = part.iloc[0], part.iloc[-1]
        s0, s1 = f"{first['image_share']:g}", f"{last['image_share']:g}"
        text = [f"**{task.upper()}, {cohort.lower()} cohort** ({_span(part['n'].agg(['min', 'max']))} studies, "
                f"{_span(part['events'].agg(['min', 'max']))} events)."]
        if len(part) > 1:
            text.append(f"From s = {s0} to s = {s1}, image only goes from {first['image_only']:.3f} to "
                        f"{last['image_only']:.3f} and EHR only from {first['ehr_only']:.3f} to {last['ehr_only']:.3f}"
                        f" ({_direction(last['image_only'] - first['image_only'], 'image only')}; "
                        f"{_direction(last['ehr_only'] - first['ehr_only'], 'EHR only')}).")
        best = []
        for share, group in models.groupby("image_share"):
            top = group.loc[group["c_index"].idxmax()]
            best.append(f"s = {share:g}: {top['model']} ({top['c_index']:.3f})")
        text.append("Best model by C at each share: " + "; ".join(best) + ".")
        wins = part[part["gain_over_unimodal"] > 0]
        text.append(f"The best multimodal model is above both unimodal models at {len(wins)} of {len(part)} shares.")
        if part["gain_over_unimodal"].notna().any():
            top = part.loc[part["gain_over_unimodal"].idxmax()]
            sig = top["best_fusion_beats_image_ci"]
            text.append(f"Its largest margin over the better unimodal model is {top['gain_over_unimodal']:+.3f} "
                        f"({top['best_fusion']} at s = {top['image_share']:g})"
                        + ("" if sig is None else
                           f"; its paired 95% CI against image only {'excludes' if sig else 'includes'} 0") + ".")
            inner = part[(part["image_share"] > 0) & (part["image_share"] < 1)]["gain_over_unimodal"]
            outer = part[(part["image_share"] == 0) | (part["image_share"] == 1)]["gain_over_unimodal"]
            if len(inner) and len(outer):
                if inner.mean() <= 0:
                    verdict = ("so the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "is not reproduced here: fusion does not gain on average even at the mixed shares")
                elif inner.mean() > outer.mean():
                    verdict = ("as the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "would predict")
                else:
                    verdict = ("not as the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "would predict")
                text.append(f"The mean margin is {inner.mean():+.3f} at the mixed shares and {outer.mean():+.3f} at the "
                            f"extremes, {verdict}.")
        image_max = part["image_only"].max()
        if np.isfinite(image_max) and image_max < 0.55:
            text.append(f"Image only stays at or near chance at every share (at most {image_max:.3f}): its embeddings "
                        f"carry little signal that transfers to this cohort, so the knob cannot show in them.")
        few = part[part["events"] < _FEW_EVENTS]
        if len(few):
            text.append(f"At s = {', '.join(f'{v:g}' for v in few['image_share'])} this cohort has fewer than "
                        f"{_FEW_EVENTS} events ({', '.join(str(int(v)) for v in few['events'])}): those C-indices are "
                        f"little more than noise.")
        half = ((models["upper"] - models["lower"]) / 2).median()
        text.append(f"The median half-width of a 95% interval is {half:.3f}: differences smaller than that are "
                    f"within test-set sampling noise, and each model was trained with one seed.")
        if part["oracle"].notna().any():
            best_c = models.groupby("image_share")["c_index"].max()
            gap = (part.set_index("image_share")["oracle"] - best_c).dropna()
            text.append(f"The oracle (true log-hazard) is {gap.min():.3f} to {gap.max():.3f} above the best model")
            above = gap[gap < 0]
            text[-1] += ("." if above.empty else
                         f"; at s = {', '.join(f'{v:g}' for v in above.index)} the best model scores above the oracle, "
                         f"which only test-set noise and picking the best model on the test set can explain.")
        lines.append(" ".join(text))
    return "\n\n".join(lines)


def _direction(delta: float, name: str) -> str:
    if not np.isfinite(delta):
        return f"{name}: not available"
    if abs(delta) < 0.01:
        return f"{name} roughly flat"
    return f"{name} {'rises' if delta > 0 else 'falls'} by {abs(delta):.3f}"
