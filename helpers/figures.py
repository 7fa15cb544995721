"""Figures and display tables of the book. Each function returns the matplotlib Figure (or a
DataFrame) and shows counts and summaries only, never identifiers or dates."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

__all__ = ["cohort_table", "km_by_group", "slice_strip", "embedding_pca", "learning_curves", "cindex_forest",
           "difference_forest", "calibration_plot", "km_by_risk_tertile", "pretraining_curves", "reconstruction_grid",
           "probe_bars", "shareable", "png_with_alt"]


def cohort_table(cohort: pd.DataFrame, horizon_days: int) -> pd.DataFrame:
    """Studies, patients, events, event rate and median follow-up per split."""
    rows = {}
    for split, part in cohort.groupby("split", sort=False):
        rows[split] = {
            "institution": ", ".join(sorted(part["institution"].unique())),
            "studies": len(part),
            "patients": part["person_id"].nunique(),
            "events": int(part["event"].sum()),
            "event rate": round(float(part["event"].mean()), 3),
            "median follow-up (days)": float(part["time"].median()),
        }
    order = [s for s in ("train", "val", "test", "external") if s in rows]
    table = pd.DataFrame(rows).T.loc[order]
    table.attrs["horizon_days"] = horizon_days
    return table


def km_by_group(cohort: pd.DataFrame, column: str, *, title: str, horizon: int) -> plt.Figure:
    """Kaplan-Meier survival curves (lifelines) for each value of ``column``."""
    from lifelines import KaplanMeierFitter  # imported here: lifelines takes a second to import

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for value, part in cohort.groupby(column, sort=True):
        KaplanMeierFitter(label=f"{value} (n={len(part)})").fit(part["time"], part["event"]).plot_survival_function(ax=ax, ci_show=True)
    ax.set_xlim(0, horizon)
    ax.set_xlabel("days after the index CT")
    ax.set_ylabel("event-free probability")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def slice_strip(slices: np.ndarray, *, title: str, n: int = 6) -> plt.Figure:
    """``n`` evenly spaced windowed slices (values in [0, 1]) of one volume, (z, y, x)."""
    picks = np.linspace(0, len(slices) - 1, n).round().astype(int)
    fig, axes = plt.subplots(1, n, figsize=(2 * n, 2.3))
    for ax, k in zip(axes, picks, strict=True):
        ax.imshow(slices[k], cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"slice {k}", fontsize=8)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def embedding_pca(embedding: np.ndarray, groups: np.ndarray, *, title: str) -> plt.Figure:
    """First two principal components of the embeddings, coloured by ``groups``."""
    x = embedding - embedding.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    pcs = x @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 4))
    for value in sorted(set(groups)):
        mask = groups == value
        ax.scatter(pcs[mask, 0], pcs[mask, 1], s=6, alpha=0.5, label=f"{value} (n={int(mask.sum())})")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def learning_curves(history: pd.DataFrame) -> plt.Figure:
    """Training and validation loss, and validation C-index, per epoch."""
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax1.plot(history["epoch"], history["train_loss"], label="train (with L2)")
    ax1.plot(history["epoch"], history["val_loss"], label="validation")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("Cox loss")
    ax1.legend()
    ax2.plot(history["epoch"], history["val_c_index"])
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation Harrell's C")
    fig.tight_layout()
    return fig


def cindex_forest(scores: pd.DataFrame, *, title: str) -> plt.Figure:
    """C-index and 95% CI per model (rows) and cohort (colours)."""
    models = list(dict.fromkeys(scores["model"]))
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(models) + 1.2))
    for k, (cohort, part) in enumerate(scores.groupby("cohort", sort=False)):
        part = part.drop_duplicates("model").set_index("model").reindex(models)
        y = np.arange(len(models)) + (k - 0.5) * 0.25
        ax.errorbar(part["c_index"], y, xerr=[part["c_index"] - part["lower"], part["upper"] - part["c_index"]],
                    fmt="o", capsize=3, label=cohort)
    ax.axvline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_yticks(np.arange(len(models)), models)
    ax.invert_yaxis()
    ax.set_xlabel("Harrell's C (95% bootstrap CI)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def difference_forest(diffs: pd.DataFrame, *, title: str) -> plt.Figure:
    """C-index differences with paired 95% bootstrap CIs (``compare.differences``): one panel
    per reference (vs image only, vs concatenation), rows = models, colours = cohorts; the
    Holm-adjusted p-value is written next to each interval."""
    references = list(dict.fromkeys(diffs["reference"])) or ["Image only"]
    models = list(dict.fromkeys(diffs["model"]))
    fig, axes = plt.subplots(1, len(references), figsize=(5.2 * len(references), 0.5 * max(len(models), 1) + 1.4),
                             sharey=True, squeeze=False)
    cohorts = list(dict.fromkeys(diffs["cohort"]))
    for ax, reference in zip(axes[0], references, strict=True):
        for k, cohort in enumerate(cohorts):
            part = diffs[(diffs["reference"] == reference) & (diffs["cohort"] == cohort)]
            part = part.drop_duplicates("model").set_index("model").reindex(models)
            y = np.arange(len(models)) + (k - (len(cohorts) - 1) / 2) * 0.25
            ax.errorbar(part["difference"], y, xerr=[part["difference"] - part["lower"], part["upper"] - part["difference"]],
                        fmt="o", capsize=3, label=cohort, color=f"C{k}")
            for yy, (_, r) in zip(y, part.iterrows(), strict=True):
                if pd.notna(r["difference"]):
                    ax.annotate(f"p={r['p_value']:.3f} (Holm {r['p_holm']:.3f})", (r["upper"], yy),
                                xytext=(4, -3), textcoords="offset points", fontsize=7)
        ax.axvline(0.0, color="grey", lw=0.8, ls="--")
        ax.set_title(f"vs {reference.lower()}", fontsize=10)
        ax.set_xlabel("difference in Harrell's C (paired 95% CI)")
    axes[0][0].set_yticks(np.arange(len(models)), models)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return fig


def calibration_plot(table: pd.DataFrame, *, title: str) -> plt.Figure:
    """Predicted vs Kaplan-Meier observed event probability by risk group at the horizon
    (``compare.calibration_table``), one colour per cohort, with the Cox calibration slope."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    top = 0.0
    for k, (cohort, part) in enumerate(table.groupby("cohort", sort=False)):
        slope, se = part["slope"].iloc[0], part["slope_se"].iloc[0]
        ax.plot(part["predicted"], part["observed"], "o-", color=f"C{k}",
                label=f"{cohort} (slope {slope:.2f} ± {1.96 * se:.2f})")
        top = max(top, part["predicted"].max(), part["observed"].max())
    top = min(1.0, 1.05 * top) if top > 0 else 1.0
    ax.plot([0, top], [0, top], color="grey", lw=0.8, ls="--", label="ideal")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("predicted event probability (group mean)")
    ax.set_ylabel("observed (Kaplan-Meier) event probability")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def km_by_risk_tertile(time: np.ndarray, event: np.ndarray, risk: np.ndarray, *, horizon: float,
                       title: str) -> plt.Figure:
    """Kaplan-Meier curves of the low, middle and high thirds of predicted risk (higher risk =
    earlier event), with lifelines' multivariate log-rank test across the three groups in the
    title. The test's p-value is also stored as ``fig.logrank_p``."""
    from lifelines import KaplanMeierFitter
    from lifelines.statistics import multivariate_logrank_test

    time, event, risk = (np.asarray(a, dtype=float) for a in (time, event, risk))
    ranks = np.argsort(np.argsort(risk, kind="stable"), kind="stable")
    tertile = np.minimum(3 * ranks // len(risk), 2)
    names = np.array(["low risk", "middle risk", "high risk"])[tertile]
    test = multivariate_logrank_test(time, names, event)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k, name in enumerate(["low risk", "middle risk", "high risk"]):
        mask = names == name
        KaplanMeierFitter(label=f"{name} (n={int(mask.sum())}, events={int(event[mask].sum())})").fit(
            time[mask], event[mask]).plot_survival_function(ax=ax, ci_show=True, color=f"C{k}")
    ax.set_xlim(0, horizon)
    ax.set_xlabel("days after the index CT")
    ax.set_ylabel("event-free probability")
    ax.set_title(f"{title}\nlog-rank test, 3 groups: chi2 = {test.test_statistic:.1f}, p = {test.p_value:.2g}", fontsize=10)
    fig.tight_layout()
    fig.logrank_p = float(test.p_value)
    return fig


def pretraining_curves(history: pd.DataFrame, *, title: str, ylabel: str = "loss") -> plt.Figure:
    """Self-supervised pretraining loss per epoch, train and validation (``history`` has
    columns epoch, split, loss)."""
    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    for split, part in history.groupby("split", sort=True):
        ax.plot(part["epoch"], part["loss"], marker="o", ms=3, label=split)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    return fig


def reconstruction_grid(original: np.ndarray, masked: np.ndarray, reconstruction: np.ndarray, *, title: str,
                        n: int = 4) -> plt.Figure:
    """Rows: windowed slices, what the masked autoencoder saw, what it reconstructed."""
    n = min(n, len(original))
    fig, axes = plt.subplots(3, n, figsize=(2.0 * n, 6.2), squeeze=False)
    for row, (images, label) in enumerate(((original, "slice"), (masked, "visible patches"),
                                           (reconstruction, "reconstruction"))):
        for col in range(n):
            ax = axes[row, col]
            ax.imshow(np.asarray(images[col]).squeeze(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(label)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def probe_bars(probes: pd.DataFrame, *, title: str) -> plt.Figure:
    """Linear-probe scores per factor: R^2 of continuous factors (left, chance 0) and AUC of
    binary ones (right, chance 0.5); bars of factors the CT shows in blue, others orange."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    for ax, metric, floor in ((axes[0], "R2", 0.0), (axes[1], "AUC", 0.5)):
        part = probes[(probes["metric"] == metric) & probes["score"].notna()]
        labels = [f"{f} ({s})" for f, s in zip(part["factor"], part["shown_by"], strict=True)]
        ax.barh(labels, part["score"], color=["tab:blue" if "CT" in s else "tab:orange" for s in part["shown_by"]])
        ax.axvline(floor, color="k", lw=0.8)
        ax.set_xlabel(f"cross-validated {'R²' if metric == 'R2' else 'AUC'}")
        ax.set_xlim(min(floor, float(part["score"].min()) if len(part) else floor) - 0.05, 1.0)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def shareable(value, base: Path | None = None):
    """``value`` (a JSON-like structure) with every absolute path made shareable: relative to
    ``base`` (default: the working directory) when it is inside it, else only its last two
    parts after ``...``; so that a page never shows a folder of the machine that built it.

    >>> shareable({"checkpoint": "/srv/build/outputs/ct_mae", "n": 3}, base=Path("/srv/build"))
    {'checkpoint': 'outputs/ct_mae', 'n': 3}
    >>> shareable(["/elsewhere/models/rad-dino"], base=Path("/srv/build"))
    ['.../models/rad-dino']
    """
    base = Path.cwd() if base is None else Path(base)
    if isinstance(value, dict):
        return {k: shareable(v, base) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(shareable(v, base) for v in value)
    if isinstance(value, str) and value.startswith("/"):
        path = Path(value)
        if path.is_relative_to(base):
            return path.relative_to(base).as_posix()
        return ".../" + "/".join(path.parts[-2:])
    return value


def png_with_alt(fig: plt.Figure, path: Path, alt: str, *, dpi: int = 110):
    """Save ``fig`` as the PNG ``path`` and return it as an HTML ``<img>`` with ``alt`` text
    (the image inline, so the executed notebook and the book carry it): the way a figure of
    the book gets a description for readers who cannot see it. Closes the figure."""
    import base64
    import html

    from IPython.display import HTML

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return HTML(f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt, quote=True)}" '
                f'style="max-width: 100%;">')
