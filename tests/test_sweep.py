"""The image-share sweep (helpers.sweep): parameter checks, the premise that the twin's CTs do
not depend on image_share, a tiny end-to-end sweep with resume, and the figure and reading on
a results frame built by hand."""

from __future__ import annotations

import json

import matplotlib
import numpy as np
import pandas as pd
import pytest

from helpers import sweep
from helpers.compare import ORACLE, model_label
from helpers.imaging import load_volume
from helpers.tasks import ParameterError
from helpers.twin import generate

matplotlib.use("Agg")

TINY = {"internal": 80, "external": 40}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"shares": (0.0, 1.5)}, r"parameter 'shares': every image share must be in \[0, 1\]; got 1.5"),
        ({"shares": "0,-0.1"}, r"in \[0, 1\]; got -0.1"),
        ({"shares": "0,abc"}, r"'abc' is not a number"),
        ({"shares": ""}, r"no image share given"),
        ({"shares": (0.5, 0.5)}, r"duplicated image share\(s\) 0.5"),
        ({"fusions": ("concat", "late")}, r"parameter 'fusions': unknown value\(s\) 'late'; expected some of image_only"),
        ({"fusions": ()}, r"parameter 'fusions': empty"),
        ({"tasks": ("pe", "copd")}, r"parameter 'tasks': unknown value\(s\) 'copd'"),
        ({"profile": "huge"}, r"parameter 'profile': unknown value 'huge'"),
        ({"n_boot": 0}, r"parameter 'n_boot': expected an integer >= 1, got 0"),
        ({"train_seed": -1}, r"parameter 'train_seed': expected an integer >= 0, got -1"),
    ],
)
def test_bad_parameters_are_refused_before_any_work(tmp_path, kwargs, match):
    out = tmp_path / "sweep"
    with pytest.raises(ParameterError, match=match):
        sweep.imbalance_sweep(out, **kwargs)
    assert not out.exists()


def test_parse_shares_sorts_and_accepts_numbers():
    assert sweep.parse_shares("1, 0.25,0") == (0.0, 0.25, 1.0)
    assert sweep.parse_shares([0.5, 0]) == (0.0, 0.5)


def test_twin_volumes_do_not_depend_on_image_share(tmp_path):
    """The premise of encoding the CTs once per task: at the same seed the twin renders the
    same volumes at every image_share (only outcomes, dates and defects change)."""
    sizes = {"internal": 10, "external": 5}
    for share in (0.0, 1.0):
        generate(tmp_path / str(share), profile="quick", seed=7, image_share=share, tasks=("pe",), n_override=sizes)
    a = pd.read_parquet(tmp_path / "0.0" / "pe" / "imaging_index.parquet")
    b = pd.read_parquet(tmp_path / "1.0" / "pe" / "imaging_index.parquet")
    assert a["study_id"].tolist() == b["study_id"].tolist()
    assert a["image_path"].tolist() == b["image_path"].tolist()
    for path in a["image_path"]:
        va, vb = load_volume(tmp_path / "0.0" / "pe" / path), load_volume(tmp_path / "1.0" / "pe" / path)
        np.testing.assert_array_equal(va.hu, vb.hu)
        assert va.spacing == vb.spacing
    truth = [pd.read_parquet(tmp_path / s / "pe" / "ground_truth" / "factors.parquet") for s in ("0.0", "1.0")]
    assert not np.allclose(truth[0]["true_log_hazard"], truth[1]["true_log_hazard"])


def test_tiny_sweep_scores_every_model_and_resumes(tmp_path, monkeypatch):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "sweep"
    args = {"shares": (0.0, 1.0), "tasks": ("mace",), "fusions": ("image_only", "concat"), "n_boot": 20,
            "n_override": TINY}
    results = sweep.imbalance_sweep(out, **args)
    assert list(results.columns) == list(sweep.RESULT_COLUMNS)
    assert len(results) == 2 * 2 * 3  # shares x cohorts x (fusions + oracle)
    assert set(results["fusion"]) == {"image_only", "concat", "oracle"}
    assert set(results["cohort"]) == {"Internal", "External"}
    assert (results["lower"] <= results["c_index"]).all() and (results["c_index"] <= results["upper"]).all()
    assert (results["n"] > 0).all() and (results["events"] > 0).all()
    assert (out / "imbalance.csv").is_file()
    assert (out / "0" / "quick" / "runs" / "mace" / "onehot" / "concat" / "seed-0" / "metrics.json").is_file()
    # the shares share the reference volumes: only the reference twin has an images folder
    assert (out / "images" / "quick" / "twin" / "mace" / "images").is_dir()
    assert not (out / "1" / "quick" / "twin" / "mace" / "images").exists()
    params = json.loads((out / "1" / "quick" / "runs" / "mace" / "onehot" / "concat" / "seed-0" / "params.json").read_text())
    assert "ground_truth" not in json.dumps(params)
    oracle = results[results["fusion"] == "oracle"]
    assert (oracle["c_index"] > 0.6).all()

    def no_training(*_, **__):
        raise AssertionError("a share with up-to-date results was recomputed")

    monkeypatch.setattr(sweep, "_train", no_training)
    again = sweep.imbalance_sweep(out, **args)
    pd.testing.assert_frame_equal(again, results)
    timings = sweep.sweep_timings(out)
    assert len(timings) == 2 and (timings["total"] > 0).all()
    with pytest.raises(AssertionError, match="recomputed"):
        sweep.imbalance_sweep(out, **{**args, "n_boot": 21})


def _frame(mid_gain: float) -> pd.DataFrame:
    rows = []
    for cohort, n, events in (("Internal", 110, 9), ("External", 119, 23)):
        for s in (0.0, 0.5, 1.0):
            img, ehr = 0.6 + 0.2 * s, 0.8 - 0.2 * s
            best = max(img, ehr)
            concat = best + (mid_gain if s == 0.5 else -0.01)
            for fusion, repr_, c in (("image_only", "none", img), ("ehr_only", "onehot", ehr),
                                     ("concat", "onehot", concat), ("oracle", "oracle", 0.9)):
                rows.append({"task": "pe", "image_share": s, "cohort": cohort, "fusion": fusion,
                             "model": ORACLE if fusion == "oracle" else model_label(repr_, fusion),
                             "n": n, "events": events, "c_index": c, "lower": c - 0.05, "upper": c + 0.05,
                             "diff_vs_image_lower": (c - img - 0.02) if fusion == "concat" else np.nan})
    return pd.DataFrame(rows)


def test_figure_has_a_panel_per_task_and_cohort_and_a_dashed_oracle():
    fig = sweep.imbalance_figure(_frame(0.05))
    axes = fig.get_axes()
    assert len(axes) == 2
    assert [ax.get_title().splitlines()[0] for ax in axes] == ["PE, internal cohort", "PE, external cohort"]
    lines = {line.get_label(): line for line in axes[0].get_lines() if not line.get_label().startswith("_")}
    assert set(lines) == {"Image only", "EHR only (one-hot)", "Concatenation (one-hot)", ORACLE}
    assert lines[ORACLE].get_linestyle() == "--"
    assert [t.get_text() for t in fig.legends[0].get_texts()][-1] == ORACLE
    with pytest.raises(ValueError, match="missing column"):
        sweep.imbalance_figure(_frame(0.05).drop(columns="upper"))


def test_reading_follows_the_numbers():
    helps = sweep.reading(_frame(0.05))
    assert "Concatenation (one-hot) at s = 0.5" in helps
    assert "above both unimodal models at 1 of 3 shares" in helps
    assert ", as the paper's claim" in helps
    assert "image only rises by 0.200" in helps and "EHR only falls by 0.200" in helps
    hurts = sweep.reading(_frame(-0.03))
    assert "above both unimodal models at 0 of 3 shares" in hurts
    assert "is not reproduced here" in hurts
    few = _frame(0.05)
    few.loc[(few["cohort"] == "Internal") & (few["image_share"] == 0.5), "events"] = 2
    assert "At s = 0.5 this cohort has fewer than 5 events (2)" in sweep.reading(few)
    summary = sweep.summarise(_frame(0.05))
    mid = summary[(summary["cohort"] == "Internal") & (summary["image_share"] == 0.5)].iloc[0]
    assert mid["gain_over_unimodal"] == pytest.approx(0.05)
    assert mid["oracle"] == pytest.approx(0.9)
    table = sweep.wide_table(_frame(0.05))
    assert list(table.columns) == ["s = 0", "s = 0.5", "s = 1"]
    assert table.index.get_level_values("model")[-1] == ORACLE
