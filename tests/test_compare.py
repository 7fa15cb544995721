from __future__ import annotations

import json

import numpy as np
import pandas as pd

from helpers import compare


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
