"""The imbalance study's tables (helpers.imbalance): gathering the comparisons of several twin
settings, and the figure and reading on a results frame built by hand."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from helpers import imbalance
from helpers.compare import ORACLE, model_label
from helpers.tasks import DEFAULT_INTERACTION, Setting

matplotlib.use("Agg")


def test_collect_reads_each_setting_and_names_a_missing_one(tmp_path):
    settings = [Setting("tiny", s, DEFAULT_INTERACTION, 3) for s in (0.0, 1.0)]
    for k, setting in enumerate(settings):
        folder = tmp_path / setting.label / "comparisons" / "pe"
        folder.mkdir(parents=True)
        pd.DataFrame({"model": ["Image only", ORACLE, "EHR only (CLMBR)"], "cohort": ["Internal"] * 3,
                      "fusion": ["image_only", None, "ehr_only"], "ehr_repr": ["none", None, "clmbr"],
                      "seed": [0, None, 0], "c_index": [0.6 + k / 10, 0.9, 0.7]}).to_csv(folder / "cindex.csv", index=False)
    results = imbalance.collect(tmp_path, settings, ("pe",))
    assert list(results["image_share"]) == [0.0, 0.0, 1.0, 1.0], "only what the sweep trains (one-hot, seed 0)"
    assert results.loc[results["model"] == "Image only", "c_index"].tolist() == [0.6, 0.7]
    assert set(results["twin_seed"]) == {3} and set(results["interaction"]) == {DEFAULT_INTERACTION}
    missing = settings + [Setting("tiny", 0.5, DEFAULT_INTERACTION, 3)]
    with pytest.raises(FileNotFoundError, match=r"share-0.5_interaction-0.75_seed-3/comparisons/pe/cindex.csv: no comparison"):
        imbalance.collect(tmp_path, missing, ("pe",))


def _frame(mid_gain: float) -> pd.DataFrame:
    rows = []
    for cohort, n, events in (("Internal", 110, 9), ("External", 119, 23)):
        for s in (0.0, 0.5, 1.0):
            img, ehr = 0.6 + 0.2 * s, 0.8 - 0.2 * s
            best = max(img, ehr)
            concat = best + (mid_gain if s == 0.5 else -0.01)
            for fusion, repr_, c in (("image_only", "none", img), ("ehr_only", "onehot", ehr),
                                     ("concat", "onehot", concat), (None, None, 0.9)):
                rows.append({"task": "pe", "image_share": s, "cohort": cohort, "fusion": fusion,
                             "model": ORACLE if fusion is None else model_label(repr_, fusion),
                             "n": n, "events": events, "c_index": c, "lower": c - 0.05, "upper": c + 0.05,
                             "diff_vs_image_lower": (c - img - 0.02) if fusion == "concat" else np.nan})
    return pd.DataFrame(rows)


def test_figure_has_a_panel_per_task_and_cohort_and_a_dashed_oracle():
    fig = imbalance.imbalance_figure(_frame(0.05))
    axes = fig.get_axes()
    assert len(axes) == 2
    assert [ax.get_title().splitlines()[0] for ax in axes] == ["PE, internal cohort", "PE, external cohort"]
    lines = {line.get_label(): line for line in axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"Image only", "EHR only (one-hot)", "Concatenation (one-hot)", ORACLE}
    assert lines[ORACLE].get_linestyle() == "--"
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == ORACLE
    with pytest.raises(ValueError, match="missing column"):
        imbalance.imbalance_figure(_frame(0.05).drop(columns="upper"))


def test_reading_follows_the_numbers():
    helps = imbalance.reading(_frame(0.05))
    assert "Concatenation (one-hot) at s = 0.5" in helps
    assert "above both unimodal models at 1 of 3 shares" in helps
    assert ", as the paper's claim" in helps
    assert "image only rises by 0.200" in helps and "EHR only falls by 0.200" in helps
    hurts = imbalance.reading(_frame(-0.03))
    assert "above both unimodal models at 0 of 3 shares" in hurts
    assert "is not reproduced here" in hurts
    few = _frame(0.05)
    few.loc[(few["cohort"] == "Internal") & (few["image_share"] == 0.5), "events"] = 2
    assert "At s = 0.5 this cohort has fewer than 5 events (2)" in imbalance.reading(few)
    summary = imbalance.summarise(_frame(0.05))
    mid = summary[(summary["cohort"] == "Internal") & (summary["image_share"] == 0.5)].iloc[0]
    assert mid["gain_over_unimodal"] == pytest.approx(0.05)
    assert mid["oracle"] == pytest.approx(0.9)
    table = imbalance.wide_table(_frame(0.05))
    assert list(table.columns) == ["s = 0", "s = 0.5", "s = 1"]
    assert table.index.get_level_values("model")[-1] == ORACLE
