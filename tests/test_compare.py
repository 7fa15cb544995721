from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import compare
from helpers.metrics import holm


def _params(folder, task, repr_, fusion, seed):
    """The run format's params.json (what collect_runs identifies a run by)."""
    (folder / "params.json").write_text(json.dumps({"task": task, "ehr_repr": repr_, "fusion": fusion, "seed": seed}))


def _fake_runs(tmp_path, n=300):
    rng = np.random.default_rng(0)
    truth = rng.normal(size=n)
    time = rng.exponential(np.exp(-truth)) * 100 + 1
    event = (rng.random(n) < 0.6).astype(int)
    ids = [f"s{i}" for i in range(n)]
    split = np.where(np.arange(n) < 150, "test", "external")
    cohort = pd.DataFrame({"study_id": ids, "person_id": ids, "institution": "x", "time": time, "event": event, "split": split})
    risks = {("none", "image_only"): truth + rng.normal(scale=2, size=n),
             ("onehot", "ehr_only"): rng.normal(size=n),
             ("onehot", "concat"): truth + rng.normal(scale=0.3, size=n)}
    for (repr_, fusion), risk in risks.items():
        folder = tmp_path / "runs" / "pe" / repr_ / fusion / "seed-0"
        folder.mkdir(parents=True)
        pd.DataFrame({"study_id": ids, "split": split, "risk": risk}).to_parquet(folder / "predictions.parquet")
        _params(folder, "pe", repr_, fusion, 0)
        (folder / "metrics.json").write_text(json.dumps({}))
    # an incomplete run (no metrics.json) is not collected
    (tmp_path / "runs" / "pe" / "onehot" / "broken" / "seed-0").mkdir(parents=True)
    return cohort, pd.Series(truth, index=ids)


def test_scores_table1_and_markers(tmp_path):
    cohort, oracle = _fake_runs(tmp_path)
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    assert sorted(runs["fusion"]) == ["concat", "ehr_only", "image_only"]
    scores = compare.score_runs(runs, cohort, n_boot=200, oracle=oracle)
    assert set(scores["cohort"]) == {"Internal", "External"}
    assert scores["c_index"].between(0, 1).all()
    assert ((scores["lower"] <= scores["c_index"]) & (scores["c_index"] <= scores["upper"])).all()
    concat = scores[(scores.fusion == "concat") & (scores.split == "test")].iloc[0]
    assert concat["p_vs_image"] < 0.05 and np.isnan(concat["p_vs_concat"])
    table = compare.table1(scores)
    assert list(table.columns) == ["Internal", "External"]
    assert table.loc["Concatenation (one-hot)", "Internal"].split(" ")[0].endswith("*")
    assert table.attrs["best"]["Internal"] == "Concatenation (one-hot)"  # the oracle is not a model
    md = compare.table1_markdown(table)
    assert "| **" in md and "Oracle (true risk)" in md
    compare.write_outputs(scores, table, tmp_path / "cmp")
    assert pd.read_csv(tmp_path / "cmp" / "table1.csv", index_col=0).shape == (4, 2)


def _fake_study(tmp_path, task="pe", n=360, seeds=(0,), fusions=("image_only", "ehr_only", "concat", "contrastive")):
    """Runs with train/test/external splits and survival at a 365-day horizon (Cox model with a
    baseline hazard of 0.002/day), follow-up administratively censored at the horizon."""
    rng = np.random.default_rng(1)
    truth = rng.normal(size=n)
    event_time = rng.exponential(1 / (0.002 * np.exp(truth)))
    censor = np.minimum(rng.uniform(100, 800, size=n), 365.0)
    time = np.minimum(event_time, censor)
    event = (event_time <= censor).astype(int)
    ids = [f"{task}{i}" for i in range(n)]
    split = np.array(["train", "test", "external"])[np.arange(n) % 3]
    split[np.arange(n) % 6 == 0] = "val"
    cohort = pd.DataFrame({"study_id": ids, "person_id": ids, "institution": "x", "time": time, "event": event,
                           "split": split})
    noise = {"image_only": 1.5, "ehr_only": 3.0, "concat": 0.4, "contrastive": 0.2}
    for fusion in fusions:
        for seed in seeds:
            risk = truth + rng.normal(scale=noise[fusion], size=n)
            repr_ = "none" if fusion == "image_only" else "onehot"
            folder = tmp_path / "runs" / task / repr_ / fusion / f"seed-{seed}"
            folder.mkdir(parents=True)
            from helpers.metrics import BreslowBaseline

            train = split == "train"
            baseline = BreslowBaseline(risk[train], time[train], event[train])
            pd.DataFrame({"study_id": ids, "split": split, "risk": risk,
                          "survival_365d": baseline.survival(risk, 365)}).to_parquet(folder / "predictions.parquet")
            _params(folder, task, repr_, fusion, seed)
            (folder / "metrics.json").write_text("{}")
    return cohort, pd.Series(truth, index=ids)


def test_score_runs_keeps_differences_and_holm(tmp_path):
    cohort, _ = _fake_study(tmp_path)
    scores = compare.score_runs(compare.collect_runs(tmp_path / "runs", "pe"), cohort, n_boot=100)
    row = scores[(scores.fusion == "contrastive") & (scores.cohort == "Internal")].iloc[0]
    assert row["diff_vs_image_lower"] <= row["diff_vs_image"] <= row["diff_vs_image_upper"]
    assert row["p_vs_image_holm"] >= row["p_vs_image"]
    internal = scores[scores.cohort == "Internal"]
    pvalues = internal[["p_vs_image", "p_vs_concat"]].to_numpy().ravel()
    expected = holm(pvalues)
    np.testing.assert_allclose(internal[["p_vs_image_holm", "p_vs_concat_holm"]].to_numpy().ravel(), expected)
    diffs = compare.differences(scores)
    # image only has no test against itself; concat none against itself; ehr_only against
    # image only (as in the paper, unimodal rows are not tested against concatenation);
    # contrastive against both references; concat against image only: 4 per cohort
    assert len(diffs) == 8 and set(diffs["reference"]) == {"Image only", "Concatenation"}
    ehr_only = diffs[diffs["model"] == "EHR only (one-hot)"]
    assert set(ehr_only["reference"]) == {"Image only"}


def test_score_extended_metrics_are_sane(tmp_path):
    cohort, oracle = _fake_study(tmp_path, fusions=("image_only", "contrastive"))
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    ext = compare.score_extended(runs, cohort, horizon=365, n_boot=20, oracle=oracle)
    assert len(ext) == 6 and set(ext["cohort"]) == {"Internal", "External"}
    for name, column in (("uno", "uno_c"), ("auc", "auc"), ("ibs", "ibs")):
        models = ext[ext.model != compare.ORACLE]
        assert ((models[f"{name}_lower"] <= models[column]) & (models[column] <= models[f"{name}_upper"])).all()
    good = ext[(ext.fusion == "contrastive") & (ext.cohort == "Internal")].iloc[0]
    poor = ext[(ext.fusion == "image_only") & (ext.cohort == "Internal")].iloc[0]
    assert good["auc"] > poor["auc"] and good["ibs"] < poor["ibs"] and 0 < good["brier"] < 0.25
    assert 0.6 < good["calibration_slope"] < 1.6
    oracle_rows = ext[ext.model == compare.ORACLE]
    assert oracle_rows["ibs"].isna().all() and oracle_rows["uno_c"].notna().all()
    assert oracle_rows["fusion"].isna().all() and oracle_rows["seed"].isna().all(), "the oracle is no strategy"
    calib = compare.calibration_table(compare.read_predictions(runs)[("onehot", "contrastive", 0)], cohort, horizon=365)
    assert list(calib["group"][:10]) == list(range(1, 11)) and calib["n"].sum() == 240


def test_seed_summary_separates_seed_and_bootstrap_variation(tmp_path):
    cohort, _ = _fake_study(tmp_path, seeds=(0, 1, 2), fusions=("image_only", "concat"))
    scores = compare.score_runs(compare.collect_runs(tmp_path / "runs", "pe"), cohort, n_boot=50)
    summary = compare.seed_summary(scores)
    assert list(summary["model"][:2]) == ["Image only", "Concatenation (one-hot)"]
    assert (summary["n_seeds"] == 3).all() and (summary["sd_seeds"] > 0).all() and (summary["se_bootstrap"] > 0).all()
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    assert compare.best_model(compare.validation_scores(runs, cohort)) == ("onehot", "concat")
    with pytest.raises(ValueError, match="choose on validation"):
        compare.best_model(scores)


def test_table1_paper_layout_markers_and_order(tmp_path):
    def scores_row(model, ehr_repr, fusion, cohort, c, p_image=np.nan, p_concat=np.nan):
        return {"model": model, "ehr_repr": ehr_repr, "fusion": fusion, "seed": 0, "cohort": cohort, "c_index": c,
                "lower": c - 0.01, "upper": c + 0.01, "p_vs_image": p_image, "p_vs_concat": p_concat,
                "p_vs_image_holm": min(1.0, 3 * p_image), "p_vs_concat_holm": min(1.0, 3 * p_concat)}

    by_task = {}
    for task, shift in (("mace", 0.0), ("pe", 0.05)):
        rows = []
        for cohort in ("Internal", "External"):
            rows += [
                scores_row("Concatenation (one-hot)", "onehot", "concat", cohort, 0.80 + shift, 0.01),
                scores_row("Image only", "none", "image_only", cohort, 0.74 + shift),
                scores_row("Contrastive learning (one-hot)", "onehot", "contrastive", cohort, 0.83 + shift, 0.001, 0.03),
                scores_row("EHR only (one-hot)", "onehot", "ehr_only", cohort, 0.70 + shift, 0.2, 0.04),
                scores_row(compare.ORACLE, None, None, cohort, 0.95),
            ]
        by_task[task] = pd.DataFrame(rows)
    table = compare.table1_paper(by_task)
    assert list(table.columns) == ["Internal PE", "Internal MACE", "External PE", "External MACE"]
    assert list(table.index) == ["Image only", "EHR only (one-hot)", "Concatenation (one-hot)",
                                 "Contrastive learning (one-hot)", compare.ORACLE]
    assert table.loc["Contrastive learning (one-hot)", "Internal PE"] == "0.880*+ (0.870-0.890)"
    assert table.loc["EHR only (one-hot)", "External MACE"] == "0.700+ (0.690-0.710)"
    assert table.loc["Image only", "Internal PE"] == "0.790 (0.780-0.800)"
    assert table.attrs["best"] == dict.fromkeys(table.columns, "Contrastive learning (one-hot)")
    md = compare.table1_markdown(table)
    assert "| Contrastive learning (one-hot) | **0.880\\*+ (0.870-0.890)** |" in md
    adjusted = compare.table1_paper(by_task, adjusted=True)
    assert adjusted.loc["Contrastive learning (one-hot)", "Internal PE"] == "0.880* (0.870-0.890)"
    compare.write_table1(table, tmp_path / "cmp")
    assert pd.read_csv(tmp_path / "cmp" / "table1.csv", index_col=0).shape == (5, 4)
    assert (tmp_path / "cmp" / "table1.md").read_text().startswith("| Model | Internal PE |")


def test_figures_draw(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from helpers import figures

    cohort, _ = _fake_study(tmp_path, fusions=("image_only", "concat", "contrastive"))
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    scores = compare.score_runs(runs, cohort, n_boot=30)
    figures.difference_forest(compare.differences(scores), title="d")
    frame = compare.read_predictions(runs)[("onehot", "contrastive", 0)]
    figures.calibration_plot(compare.calibration_table(frame, cohort, horizon=365), title="c")
    test = cohort[cohort.split == "test"]
    fig = figures.km_by_risk_tertile(test["time"], test["event"], frame.loc[test["study_id"], "risk"],
                                     horizon=365, title="km")
    assert 0 <= fig.logrank_p < 0.05
    plt.close("all")


def test_external_censoring_is_the_external_cohorts_own(tmp_path):
    """Uno's C of the external cohort weights by the external cohort's own censoring
    distribution, the internal test split by the internal training split's."""
    from functools import partial

    from helpers.metrics import uno_c

    cohort, _ = _fake_study(tmp_path, fusions=("image_only", "contrastive"))
    cohort.loc[cohort["split"] == "external", "time"] *= 0.5  # other follow-up at the other site
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    ext = compare.score_extended(runs, cohort, horizon=365, n_boot=20)
    row = ext[(ext.fusion == "contrastive") & (ext.cohort == "External")].iloc[0]
    part = cohort[cohort["split"] == "external"].set_index("study_id")
    risk = compare.read_predictions(runs)[("onehot", "contrastive", 0)].loc[part.index, "risk"]
    own = partial(uno_c, time=part["time"], event=part["event"], risk=risk, tau=365.0)
    assert row["censoring_from"] == "external cohort"
    assert row["uno_c"] == pytest.approx(own(train_time=part["time"], train_event=part["event"]), abs=1e-12)
    train = cohort[cohort["split"] == "train"]
    assert row["uno_c"] != pytest.approx(own(train_time=train["time"], train_event=train["event"]), abs=1e-6)
    assert (ext.loc[ext.cohort == "Internal", "censoring_from"] == "internal train split").all()


def test_collect_runs_reads_params_and_refuses_a_misplaced_run(tmp_path):
    from helpers.runs import RunFormatError

    _fake_runs(tmp_path)
    runs = compare.collect_runs(tmp_path / "runs", "pe")
    assert set(zip(runs["ehr_repr"], runs["fusion"], strict=True)) == {
        ("none", "image_only"), ("onehot", "ehr_only"), ("onehot", "concat")}
    moved = tmp_path / "runs" / "pe" / "onehot" / "concat" / "seed-0"
    _params(moved, "pe", "clmbr", "concat", 0)
    with pytest.raises(RunFormatError, match=r"describes run clmbr/concat/seed-0, which belongs in .*clmbr/concat/seed-0"):
        compare.collect_runs(tmp_path / "runs", "pe")
    (moved / "params.json").unlink()
    with pytest.raises(RunFormatError, match=r"params.json: missing"):
        compare.collect_runs(tmp_path / "runs", "pe")


def test_run_spec_checks_names_and_inputs(tmp_path):
    from helpers.runs import RunFormatError, RunSpec
    from helpers.tasks import ParameterError

    common = {"task": "pe", "seed": 0, "cohort_path": tmp_path / "c.parquet", "output_dir": tmp_path / "run"}
    spec = RunSpec(ehr_repr="none", fusion="image_only", image_embeddings=tmp_path / "i.parquet", ehr_embeddings=None,
                   **common)
    assert spec.key == ("none", "image_only", 0)
    with pytest.raises(RunFormatError, match="fusion 'concat' needs ehr_repr one of onehot, clmbr"):
        RunSpec(ehr_repr="none", fusion="concat", image_embeddings=tmp_path / "i", ehr_embeddings=tmp_path / "e", **common)
    with pytest.raises(RunFormatError, match="parameter 'ehr_embeddings': fusion 'ehr_only' needs it"):
        RunSpec(ehr_repr="onehot", fusion="ehr_only", image_embeddings=None, ehr_embeddings=None, **common)
    with pytest.raises(ParameterError, match="parameter 'fusion': unknown value 'late'"):
        RunSpec(ehr_repr="onehot", fusion="late", image_embeddings=None, ehr_embeddings=None, **common)


def test_scoring_needs_no_torch():
    import subprocess
    import sys

    code = "import sys, helpers.compare, helpers.runs, helpers.metrics; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_early_stopping_names_the_runs_that_kept_their_first_epochs(tmp_path):
    from helpers.compare import early_stopping, early_stopping_reading

    rows = []
    for fusion, ehr_repr, seed, best in (("image_only", "none", 0, 1), ("image_only", "none", 1, 2),
                                         ("concat", "onehot", 0, 1), ("concat", "onehot", 1, 9),
                                         ("ehr_only", "onehot", 0, 12), ("ehr_only", "onehot", 1, 15)):
        folder = tmp_path / ehr_repr / fusion / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"best_epoch": best, "epochs": best + 10, "splits": {
            "train": {"c_index": 0.7}, "val": {"c_index": 0.6}}}))
        rows.append({"ehr_repr": ehr_repr, "fusion": fusion, "seed": seed, "path": folder})
    table = early_stopping(pd.DataFrame(rows))
    assert list(table["model"]) == ["Image only"] * 2 + ["EHR only (one-hot)"] * 2 + ["Concatenation (one-hot)"] * 2
    assert table["early"].tolist() == [True, True, False, False, True, False]
    text = early_stopping_reading(table)
    assert text.startswith("Image only kept the weights of epoch 2 or earlier in every seed; "
                           "Concatenation (one-hot) did in some seeds.")
    assert early_stopping_reading(table[table["model"].str.startswith("EHR")]).startswith("Every run trained past")
