"""INSPECT as downloaded (helpers.inspect_release): a release folder built here from the tiny
twin in INSPECT's published layout (study_mapping, labels, splits as TSV; CTPA/<image_id>.nii.gz)
with an OMOP export as real ones are (CSV, upper-case column names, standard concepts, clinical
drugs, UCUM units, null datetimes, deaths after the last encounter), run through the same
01_cohort notebook as the twin."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest
import yaml
from sklearn.metrics import cohen_kappa_score

from helpers import inspect_release as ir
from helpers.twin import generate
from helpers.vocabulary import OMOP_TABLES, VOCABULARY_TABLES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
N_FLIPPED = 3  # labels the fixture sets against the records, to be found by the agreement check


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    generate(root / "twin", profile="tiny", seed=12, tasks=("pe",))
    twin = root / "twin" / "pe"
    index = pd.read_parquet(twin / "imaging_index.parquet")
    truth = pd.read_parquet(twin / "ground_truth" / "factors.parquet").set_index("study_id")
    index = index[index["image_format"] == "nifti"].reset_index(drop=True)  # INSPECT ships NIfTI
    out = root / "release"
    (out / "CTPA").mkdir(parents=True)
    image_ids = [hashlib.sha256(s.encode()).hexdigest()[:16] for s in index["study_id"]]
    for path, image_id in zip(index["image_path"], image_ids, strict=True):
        shutil.copy(twin / path, out / "CTPA" / f"{image_id}.nii.gz")
    impressions = [f"imp-{k:05d}" for k in range(len(index))]
    pd.DataFrame({"impression_id": impressions, "person_id": index["person_id"], "image_id": image_ids,
                  "procedure_DATETIME": index["study_datetime"].dt.strftime("%Y-%m-%d %H:%M:%S")}).to_csv(
        out / "study_mapping_20250611.tsv", sep="\t", index=False)
    persons = index["person_id"].astype(int)
    split = np.select([persons % 10 < 7, persons % 10 < 8], ["train", "valid"], "test")
    split_frame = pd.DataFrame({"impression_id": impressions, "split": split})
    split_frame.iloc[:-2].to_csv(out / "splits_20250611.tsv", sep="\t", index=False)  # two studies lack a split
    # INSPECT's label from the twin's recorded outcome, a few flipped
    t = truth.loc[index["study_id"]]
    label = np.where((t["recorded_event"] == 1) & (t["recorded_time_days"] <= 365), "TRUE",
                     np.where(t["recorded_time_days"] >= 365, "FALSE", "Censored"))
    decided = np.flatnonzero(np.isin(label, ["TRUE", "FALSE"]) & (t["defect"] == "").to_numpy())[:N_FLIPPED]
    label[decided] = np.where(label[decided] == "TRUE", "FALSE", "TRUE")
    pd.DataFrame({"impression_id": impressions, "1_month_mortality": "FALSE", "12_month_mortality": label}).to_csv(
        out / "labels_20250611.tsv", sep="\t", index=False)
    # the EHR as a CSV export: upper-case columns, null datetimes, deaths after the last encounter
    omop = out / "omop"
    omop.mkdir()
    deaths = pd.read_parquet(twin / "omop" / "death.parquet")
    every = pd.read_parquet(twin / "imaging_index.parquet")
    last_study = every.assign(person_id=every["person_id"].astype(int)).groupby("person_id")["study_datetime"].max()
    for table in OMOP_TABLES + VOCABULARY_TABLES:
        frame = pd.read_parquet(twin / "omop" / f"{table}.parquet")
        if table == "condition_occurrence":
            frame.loc[frame.index % 2 == 0, "condition_start_datetime"] = pd.NaT
        if table == "observation_period":
            # a death index: the records end at the later of the last CT and 30 days before the death
            death = pd.to_datetime(frame["person_id"].map(deaths.set_index("person_id")["death_date"]))
            last_ct = pd.to_datetime(frame["person_id"].map(last_study)).dt.normalize()
            moved = death.notna()
            frame.loc[moved, "observation_period_end_date"] = np.maximum(
                death[moved] - pd.Timedelta(days=30), last_ct[moved]).dt.date
        for column in frame.columns:
            if pd.api.types.is_datetime64_any_dtype(frame[column]):
                frame[column] = frame[column].dt.strftime("%Y-%m-%d %H:%M:%S")
        frame.columns = [c.upper() for c in frame.columns]
        frame.to_csv(omop / f"{table.upper()}.csv", index=False)
    return {"root": root, "release": out, "labels": label, "flipped": decided, "split": split_frame, "twin": twin,
            "index": index, "impressions": impressions}


def _manifest(folder: Path, release: Path) -> Path:
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "data": {"source": "inspect", "inspect": {"release": str(release), "omop": str(release / "omop")}},
        "encoders": {"image": {"randconv": {"kind": "builtin"}}, "ehr": {"onehot": {"kind": "builtin"}}},
        "output_dir": str(folder / "out"),
    }))
    return path


def test_the_cohort_notebook_reads_inspect_as_downloaded(release, tmp_path):
    manifest = _manifest(tmp_path, release["release"])
    executed = tmp_path / "01_cohort.ipynb"
    papermill.execute_notebook(str(PROJECT_ROOT / "notebooks" / "01_cohort.ipynb"), str(executed),
                               parameters={"task": "pe", "manifest": str(manifest), "meds": False},
                               kernel_name="python3", progress_bar=False, cwd=str(PROJECT_ROOT / "notebooks"))
    folder = tmp_path / "out" / "real" / "inspect" / "cohorts"
    cohort = pd.read_parquet(folder / "pe.parquet")
    summary = json.loads((folder / "pe_summary.json").read_text())
    # INSPECT's splits as given (valid is the validation split); two studies without one are excluded
    given = release["split"].set_index("impression_id")["split"].map(ir.SPLIT_NAMES)
    assert (cohort["split"].to_numpy() == given.loc[cohort["study_id"]].to_numpy()).all()
    assert set(cohort["split"]) == {"train", "val", "test"} and "external" not in set(cohort["split"])
    exclusions = pd.read_parquet(folder / "pe_exclusions.parquet")
    reasons = exclusions.groupby("reason").size()
    assert reasons.get("not in INSPECT's splits file") == 2
    # deaths after the last encounter are found: the derived outcome agrees with the records' truth
    truth = pd.read_parquet(release["twin"] / "ground_truth" / "factors.parquet").set_index("study_id")
    ids = dict(zip(release["impressions"], release["index"]["study_id"], strict=True))
    recorded = truth.loc[[ids[s] for s in cohort["study_id"]]]
    assert (cohort["event"].to_numpy() == recorded["recorded_event"].to_numpy()).all()
    assert np.allclose(cohort["time"].to_numpy(), recorded["recorded_time_days"].to_numpy())
    # the label agreement: exactly the flipped labels disagree
    agreement = summary["label_agreement"]
    flipped = {release["impressions"][k] for k in release["flipped"]} & set(cohort["study_id"])
    assert agreement["studies"] == len(cohort) and agreement["cohort_without_label"] == 0
    assert agreement["agreement"] == pytest.approx(1 - len(flipped) / len(cohort))
    table = pd.read_csv(folder / "pe_label_agreement.csv", index_col=0)
    assert int(table.to_numpy().sum()) == len(cohort)
    assert int(np.trace(table.to_numpy())) == len(cohort) - len(flipped)
    # every concept set matched, by the standard route where the export maps
    sets = pd.read_csv(folder / "pe_concept_sets.csv")
    assert sets["matched"].all()
    text = executed.read_text()
    assert "Cohen's kappa" in text and "All " in text and "concept sets matched records" in text


def test_kappa_matches_scikit_learn(release):
    cohort = pd.DataFrame({"study_id": [f"s{k}" for k in range(8)], "event": [1, 1, 0, 0, 0, 1, 0, 0],
                           "time": [100, 400, 500, 365, 20, 30, 800, 900]})
    label = pd.Series(["TRUE", "TRUE", "FALSE", "TRUE", "FALSE", "TRUE", "FALSE", "Censored"],
                      index=cohort["study_id"])
    table, summary = ir.label_agreement(cohort, label)
    derived = ["TRUE", "Censored", "FALSE", "FALSE", "Censored", "TRUE", "FALSE", "FALSE"]
    keep = [k for k in range(8) if derived[k] != "Censored" and label.iloc[k] != "Censored"]
    expected = cohen_kappa_score([derived[k] for k in keep], [label.iloc[k] for k in keep])
    assert summary["kappa_decided"] == pytest.approx(expected, abs=1e-12)
    assert summary["agreement"] == pytest.approx(4 / 8) and summary["decided_studies"] == len(keep)
    assert table.loc["FALSE", "TRUE"] == 1 and table.loc["Censored", "TRUE"] == 1


def test_bad_release_files_are_named(release, tmp_path):
    bad = tmp_path / "release"
    shutil.copytree(release["release"], bad, ignore=shutil.ignore_patterns("CTPA", "omop"))
    with pytest.raises(ir.InspectError, match=r"no CTPA/ folder"):
        ir.imaging_index(bad)
    (bad / "CTPA").mkdir()
    (bad / "splits_20250611.tsv").rename(bad / "splits_old.tsv")
    (bad / "splits_20250612.tsv").write_text("impression_id\tsplit\nimp-00000\tholdout\n")
    with pytest.raises(ir.InspectError, match=r"expected one splits_<date>.tsv, found splits_20250612.tsv, splits_old.tsv"):
        ir.splits(bad)
    (bad / "splits_old.tsv").unlink()
    with pytest.raises(ir.InspectError, match=r"splits_20250612.tsv: column split holds 'holdout'; expected train, valid, test"):
        ir.splits(bad)
    (bad / "labels_20250611.tsv").write_text("impression_id\t12_month_mortality\nimp-1\tmaybe\n")
    with pytest.raises(ir.InspectError, match=r"column '12_month_mortality' holds 'maybe'"):
        ir.labels(bad)
    (bad / "study_mapping_20250611.tsv").write_text("impression_id\tperson_id\nimp-1\t1\nimp-1\t2\n")
    with pytest.raises(ir.InspectError, match=r"lacks column\(s\) image_id, procedure_datetime"):
        ir.imaging_index(bad)


def test_manifest_check_opens_the_sources(release, tmp_path, capsys):
    from helpers.__main__ import main

    manifest = _manifest(tmp_path, release["release"])
    assert main(["manifest", "check", str(manifest)]) == 0
    out = capsys.readouterr().out
    persons = len(pd.read_parquet(release["twin"] / "omop" / "person.parquet"))
    assert f"  person: {persons:,} rows" in out and "concept_ancestor:" in out
    assert f"INSPECT release {release['release']}: {len(release['index']):,} studies" in out
    assert "splits train" in out and "manifest OK" in out
    (release["release"] / "omop" / "DEATH.csv").rename(tmp_path / "DEATH.csv")
    try:
        assert main(["manifest", "check", str(manifest)]) == 2
        assert "OMOP table file(s) missing: death" in capsys.readouterr().err
    finally:
        (tmp_path / "DEATH.csv").rename(release["release"] / "omop" / "DEATH.csv")
