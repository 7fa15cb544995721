"""The mechanism study (helpers.mechanism): one task and twin seed on a tiny twin, the volumes
rendered and encoded once, and the analysis (tables, ranks, verdicts) on results built by hand."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest
import yaml

from helpers import mechanism as mech
from helpers.compare import ORACLE
from helpers.manifest import load
from helpers.runs import RunSpec
from helpers.training import train_run

matplotlib.use("Agg")


def _manifest(folder: Path):
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "data": {"source": "synthetic", "synthetic": {"profile": "tiny", "seed": 5}},
        "encoders": {"image": {"randconv": {"kind": "builtin"}}, "ehr": {"onehot": {"kind": "builtin"}}},
        "output_dir": "out",
    }))
    return load(path)


def test_one_task_and_seed_renders_the_volumes_once_and_scores_every_setting(tmp_path):
    manifest = _manifest(tmp_path)
    spec = mech.MechanismSpec(manifest=manifest, task="mace", twin_seed=5, profile="tiny", shares=(0.0, 1.0),
                              interactions=(0.75,), fusions=("image_only", "ehr_only"), n_boot=20, l2_grid=(1e-4, 1e-2),
                              shifts=("none", "noise", "lab_units"), shift_studies=30)
    result = mech.run_mechanism(spec)
    grid = mech.settings(spec)
    assert [g.label for g in grid] == ["tiny/sweep/share-0_interaction-0.75_seed-5",
                                       "tiny/sweep/share-1_interaction-0.75_seed-5"]
    first, second = (manifest.output_dir / g.label for g in grid)
    # the second setting links the first one's volumes and image table; its records are its own
    images = second / "twin" / "mace" / "images"
    assert images.is_symlink() and images.resolve() == (first / "twin" / "mace" / "images").resolve()
    table = "embeddings/mace/image-randconv.parquet"
    assert os.path.samefile(first / table, second / table)
    assert list((second / "embeddings" / "mace").glob("image-randconv.tokens-*.npy"))
    truth = [pd.read_parquet(root / "twin" / "mace" / "ground_truth" / "factors.parquet") for root in (first, second)]
    assert np.allclose(truth[0]["ct_part"], 0) and np.allclose(truth[1]["ehr_part"], 0)
    # every setting scored, with the oracle
    results = mech.collect(manifest.output_dir, grid, ("mace",))
    assert set(results["strategy"]) == {"image_only", "ehr_only", "oracle"}
    assert set(results["image_share"]) == {0.0, 1.0} and set(results["cohort"]) == {"Internal", "External"}
    # what ran, written last
    assert result.path == mech.result_path(manifest.output_dir, "tiny", "mace", 5) and result.path.is_file()
    timings = pd.read_csv(result.path)
    assert list(timings["image_share"]) == [0.0, 1.0] and (timings["test_events"] > 0).all()
    assert timings.loc[0, "encode_seconds"] > 0 and timings.loc[1, "encode_seconds"] == 0  # encoded once
    # each strategy chose its penalty on validation at one setting, and kept it everywhere
    tuning = result.tuning
    assert list(tuning["fusion"]) == ["image_only"] * 2 + ["ehr_only"] * 2 and list(tuning["l2"]) == [1e-4, 1e-2] * 2
    assert tuning.groupby("fusion")["chosen"].sum().tolist() == [1, 1]
    assert set(tuning["setting"]) == {grid[mech.tuning_setting(grid)].label}
    for fusion, ehr_repr in (("image_only", "none"), ("ehr_only", "onehot")):
        pick = tuning[(tuning["fusion"] == fusion) & tuning["chosen"]]
        best = tuning[tuning["fusion"] == fusion]["val_c_index"].max()
        assert pick["val_c_index"].iloc[0] == best
        for root in (first, second):
            params = json.loads((root / "runs" / "mace" / ehr_repr / fusion / "seed-0" / "params.json").read_text())
            assert params["options"]["l2"] == pick["l2"].iloc[0]
    assert not (first / "runs" / "mace").joinpath("tuning").exists()  # tuning runs are kept apart
    # at the tuning setting each run is its chosen tuning run, copied rather than trained again:
    # the same predictions, and training it again gives them too (training is deterministic)
    here = manifest.output_dir / grid[mech.tuning_setting(grid)].label
    for fusion, ehr_repr in (("image_only", "none"), ("ehr_only", "onehot")):
        l2 = tuning[(tuning["fusion"] == fusion) & tuning["chosen"]]["l2"].iloc[0]
        run = here / "runs" / "mace" / ehr_repr / fusion / "seed-0"
        copied = pd.read_parquet(run / "predictions.parquet")
        assert copied.equals(pd.read_parquet(here / "tuning" / "mace" / fusion / f"l2-{l2:g}" / "predictions.parquet"))
        if fusion == "ehr_only":
            params = json.loads((run / "params.json").read_text())
            again = train_run(RunSpec(task="mace", ehr_repr=ehr_repr, fusion=fusion, seed=0, options=params["options"],
                                      cohort_path=Path(params["cohort_path"]), image_embeddings=None,
                                      ehr_embeddings=Path(params["ehr_embeddings"]), output_dir=tmp_path / "again"))
            pd.testing.assert_series_equal(again.predictions["risk"], copied["risk"])
    # the site shifts: the tuning setting's models scored on the external site under each shift,
    # the patients and outcomes the same, the internal site unchanged
    shifts = result.shifts
    assert shifts.equals(pd.read_csv(mech.shift_path(manifest.output_dir, "tiny", "mace", 5)))
    assert list(dict.fromkeys(shifts["shift"])) == ["none", "noise", "lab_units"]
    assert set(shifts["strategy"]) == {"image_only", "ehr_only", "oracle"}
    assert shifts["n"].nunique() == 1 and shifts["n"].iloc[0] >= 25 and shifts["events"].nunique() == 1
    oracle = shifts[shifts["strategy"] == "oracle"]
    assert oracle["c_index"].nunique() == 1 and (oracle["change"] == 0).all()  # the truth does not move
    # the EHR is the same under noise, the image under lab units: exactly no change there
    change = shifts.set_index(["shift", "strategy"])["change"]
    assert change[("noise", "ehr_only")] == 0.0 and change[("lab_units", "image_only")] == 0.0
    none_c = shifts[shifts["shift"] == "none"].set_index("strategy")["c_index"]
    for row in shifts[(shifts["shift"] != "none") & (shifts["strategy"] != "oracle")].itertuples():
        assert abs(row.c_index - none_c[row.strategy] - row.change) < 1e-9 and row.change_lower <= row.change <= row.change_upper
    labels = {s.shift: manifest.output_dir / s.label for s in mech.shift_settings(spec)}
    assert labels["noise"].name == "share-0_interaction-0.75_seed-5_shift-noise"
    # noise renders its own external volumes; lab units links those of none, and its image table
    ext = "twin/mace/images/site_b"
    assert not (labels["noise"] / ext).is_symlink() and (labels["lab_units"] / ext).is_symlink()
    assert (labels["lab_units"] / ext).resolve() == (labels["none"] / ext).resolve()
    assert os.path.samefile(labels["lab_units"] / table, labels["none"] / table)
    params = json.loads((labels["noise"] / "runs/mace/none/image_only/seed-0/params.json").read_text())
    assert params["trained_in"] == str(first / "runs/mace/none/image_only/seed-0")
    scored = pd.read_csv(labels["noise"] / "comparisons" / "mace" / "cindex.csv")
    assert set(scored["cohort"]) == {"External"}


def test_a_later_twin_seed_keeps_the_first_seeds_penalties(tmp_path):
    manifest = _manifest(tmp_path)
    first = tmp_path / "tuning-mace-seed-5.csv"
    pd.DataFrame({"task": "mace", "twin_seed": 5, "setting": "tiny/sweep/share-0.5_interaction-0.75_seed-5",
                  "fusion": ["image_only", "image_only", "ehr_only", "ehr_only"], "l2": [1e-4, 1e-2] * 2,
                  "val_c_index": [0.6, 0.5, 0.55, 0.7], "chosen": [True, False, False, True]}).to_csv(first, index=False)
    spec = mech.MechanismSpec(manifest=manifest, task="mace", twin_seed=6, profile="tiny", shares=(0.0, 1.0),
                              interactions=(0.75,), fusions=("image_only", "ehr_only"), n_boot=20,
                              l2_grid=(1e-4, 1e-2), tuned_at=first, shifts=())
    assert mech.kept_choices(spec) == {"image_only": 1e-4, "ehr_only": 1e-2}
    result = mech.run_mechanism(spec)
    # nothing tuned here: the record is the first seed's choices, under this seed
    assert not list(manifest.output_dir.rglob("tuning/mace"))
    assert list(result.tuning["twin_seed"].unique()) == [6] and list(result.tuning["l2"]) == [1e-4, 1e-2] * 2
    assert (result.tuning["setting"] == "tiny/sweep/share-0.5_interaction-0.75_seed-5").all()
    for g in mech.settings(spec):
        for fusion, ehr_repr, l2 in (("image_only", "none", 1e-4), ("ehr_only", "onehot", 1e-2)):
            params = json.loads((manifest.output_dir / g.label / "runs/mace" / ehr_repr / fusion / "seed-0"
                                 / "params.json").read_text())
            assert params["options"]["l2"] == l2
    # a record that cannot say what to keep is named
    frame = pd.read_csv(first)
    for change, message in ((lambda f: f.assign(task="pe"), r"tuning record of task\(s\) pe, not 'mace'"),
                            (lambda f: f[f["fusion"] != "ehr_only"], r"one chosen penalty per strategy; none for ehr_only"),
                            (lambda f: f.assign(l2=f["l2"] * 3), r"chosen penalties \[0.0003, 0.03\] are not in the study's grid"),
                            (lambda f: f.drop(columns="chosen"), r"lacks column\(s\) chosen")):
        change(frame).to_csv(tmp_path / "bad.csv", index=False)
        with pytest.raises(ValueError, match=message):
            mech.kept_choices(replace(spec, tuned_at=tmp_path / "bad.csv"))
    with pytest.raises(FileNotFoundError, match=r"no tuning record"):
        mech.kept_choices(replace(spec, tuned_at=tmp_path / "none.csv"))


def test_the_tuning_setting_is_the_middle_share_at_the_default_interaction():
    grid = [mech.Setting("tiny", s, k, 1, sweep=True) for k in (0.0, 0.75, 1.5) for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    chosen = grid[mech.tuning_setting(grid)]
    assert (chosen.image_share, chosen.interaction) == (0.5, 0.75)
    small = [mech.Setting("tiny", s, 0.75, 1, sweep=True) for s in (0.0, 1.0)]
    assert small[mech.tuning_setting(small)].image_share == 0.0


def test_the_spec_refuses_what_the_study_cannot_run(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(ValueError, match="compares with image_only; include it"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, fusions=("concat",))
    with pytest.raises(ValueError, match="parameter 'fusion': unknown value 'late'"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, fusions=("image_only", "late"))
    with pytest.raises(ValueError, match="parameter 'profile': unknown value 'huge'"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, profile="huge")
    with pytest.raises(ValueError, match="the first must be 'none'"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, shifts=("noise", "none"))
    with pytest.raises(ValueError, match="parameter 'shifts': unknown value 'contrast'"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, shifts=("none", "contrast"))
    with pytest.raises(ValueError, match="parameter 'shift_studies': expected an integer >= 20"):
        mech.MechanismSpec(manifest=manifest, task="pe", twin_seed=1, shift_studies=5)


def _results(attention_gain: float, interaction_gain: float) -> pd.DataFrame:
    """A results frame for one task: 2 twin seeds x kappa {0, 1} x share {0, 0.5, 1}, internal
    cohort, with image only rising and EHR only falling in s, concatenation at the better
    unimodal model plus ``interaction_gain * kappa``, cross-attention ``attention_gain`` above
    concatenation, and the oracle above everything."""
    rows = []
    for seed in (1, 2):
        for kappa in (0.0, 1.0):
            for share in (0.0, 0.5, 1.0):
                image, ehr = 0.55 + 0.2 * share, 0.75 - 0.2 * share
                concat = max(image, ehr) + interaction_gain * kappa + 0.001 * seed
                c = {"image_only": image, "ehr_only": ehr, "concat": concat, "cross_attention": concat + attention_gain,
                     "oracle": 0.95}
                for strategy, value in c.items():
                    rows.append({"task": "pe", "image_share": share, "interaction": kappa, "twin_seed": seed,
                                 "cohort": "Internal", "strategy": strategy, "c_index": value,
                                 "model": ORACLE if strategy == "oracle" else strategy, "lower": value - 0.03,
                                 "upper": value + 0.03, "n": 300, "events": 210})
    return pd.DataFrame(rows)


def test_tables_ranks_and_verdicts_follow_the_numbers():
    results = _results(attention_gain=0.0, interaction_gain=0.04)
    table = mech.setting_table(results)
    assert list(table.columns) == ["image_only", "ehr_only", "concat", "cross_attention", "oracle"]
    assert table.loc[("pe", 1.0, 0.5), "concat"] == pytest.approx(0.65 + 0.04 + 0.0015)
    ranks = mech.rank_first(results)
    assert ranks.loc[("pe", 0.0, 0.0), "seeds"] == 2
    assert ranks.loc[("pe", 0.0, 0.0), "concat"] == 2 and ranks.loc[("pe", 0.0, 0.0), "cross_attention"] == 2  # a tie
    verdicts = mech.judge(results).set_index("prediction")["held"].to_dict()
    assert verdicts == {"P1": True, "P2": True, "P3": True, "P4": True, "P5": True}
    # attention well above concatenation without an interaction, no gain from kappa: P2, P3, P4 fail
    verdicts = mech.judge(_results(attention_gain=0.05, interaction_gain=0.0)).set_index("prediction")["held"].to_dict()
    assert verdicts == {"P1": True, "P2": False, "P3": False, "P4": False, "P5": True}
    no_ehr = mech.judge(results[results["strategy"] != "ehr_only"]).set_index("prediction")["held"].to_dict()
    assert no_ehr == {"P1": None, "P2": True, "P3": None, "P4": None, "P5": True}
    fig = mech.mechanism_figure(results)
    assert len(fig.axes) == 2 and [ax.get_title() for ax in fig.axes] == ["PE, kappa 0", "PE, kappa 1"]


def test_shift_tables_and_verdicts_follow_the_numbers():
    """A hand-built shift table: records cost EHR only 0.03 and concatenation 0.01; noise costs
    image only 0.02, more than the other scanner shifts; lab units change nothing."""
    change = {("ehr_completeness", "ehr_only"): -0.03, ("ehr_completeness", "concat"): -0.01,
              ("noise", "image_only"): -0.02, ("noise", "concat"): -0.005, ("hu_offset", "image_only"): -0.001}
    rows = []
    for seed in (1, 2):
        for shift in ("none", "hu_offset", "noise", "slice_thickness", "ehr_completeness", "lab_units"):
            for strategy in ("image_only", "ehr_only", "concat", "oracle"):
                c = change.get((shift, strategy), 0.0)
                rows.append({"task": "pe", "twin_seed": seed, "shift": shift, "strategy": strategy, "n": 300,
                             "events": 180, "c_index": 0.6 + c, "lower": 0.55, "upper": 0.65, "change": c,
                             "change_lower": c - 0.01, "change_upper": c + 0.01 if c else 0.0, "p": 0.5})
    shifts = pd.DataFrame(rows)
    table = mech.shift_table(shifts)
    assert list(table.columns) == ["hu_offset", "noise", "slice_thickness", "ehr_completeness", "lab_units"]
    assert table.loc[("pe", "ehr_only"), "ehr_completeness"] == pytest.approx(-0.03)
    hurts = mech.shift_hurts(shifts)["hurt"]
    assert hurts[("pe", "ehr_only", "ehr_completeness")] == 2 and hurts[("pe", "concat", "ehr_completeness")] == 0
    verdicts = mech.judge_shifts(shifts).set_index("prediction")["held"]
    assert verdicts.to_dict() == {"S1": True, "S2": True, "S3": True, "S4": True}
    worse = shifts.copy()
    worse.loc[(worse["shift"] == "noise") & (worse["strategy"] == "concat"), "change"] = -0.04
    worse.loc[(worse["shift"] == "lab_units") & (worse["strategy"] == "ehr_only"), "change"] = 0.02
    verdicts = mech.judge_shifts(worse).set_index("prediction")
    held = {k: None if v is None else bool(v) for k, v in verdicts["held"].items()}
    assert held["S3"] is False and "noise: image_only -0.020, concatenation -0.040" in verdicts.loc["S3", "numbers"]
    assert held["S1"] is False and "0.0200 (ehr_only)" in verdicts.loc["S1", "numbers"]
    assert mech.shift_figure(shifts) is not None
