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
N_NO_PE = 4  # CTPAs whose report shows no PE: not in the cohort of mortality after PE


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
    # INSPECT's PE label (written True/FALSE, as its files mix cases): a few CTPAs without a PE,
    # none of them a flipped label or a study without a split
    no_pe = [k for k in range(len(index) - 2) if k not in set(decided)][-N_NO_PE:]
    pe = np.where(np.isin(np.arange(len(index)), no_pe), "FALSE", "True")
    pd.DataFrame({"impression_id": impressions, "pe_positive_nlp": pe, "1_month_mortality": "FALSE",
                  "12_month_mortality": label}).to_csv(out / "labels_20250611.tsv", sep="\t", index=False)
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
            "index": index, "impressions": impressions, "no_pe": [impressions[k] for k in no_pe]}


def _manifest(folder: Path, release: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
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
    # the cohort is mortality after PE: the CTPAs whose report shows none are excluded, named
    no_pe = exclusions[exclusions["reason"] == "no PE on the CTPA (INSPECT's pe_positive_nlp label)"]
    assert sorted(no_pe["study_id"]) == sorted(release["no_pe"])
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
    with pytest.raises(ir.InspectError, match=r"no column 'pe_positive_nlp' .*pe_positive_only: false keeps every CTPA"):
        ir.pe_positive(bad)
    (bad / "labels_20250611.tsv").write_text("impression_id\tpe_positive_nlp\nimp-1\ttrue\nimp-2\tpossible\n")
    with pytest.raises(ir.InspectError, match=r"column 'pe_positive_nlp' holds 'possible'; expected TRUE or FALSE"):
        ir.pe_positive(bad)
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
    assert f"INSPECT release {release['release']} (the study's data): {len(release['index']):,} studies" in out
    assert "splits train" in out and "manifest OK" in out
    assert f"a PE on {len(release['index']) - N_NO_PE:,} CTPAs (the cohort keeps those)" in out
    (release["release"] / "omop" / "DEATH.csv").rename(tmp_path / "DEATH.csv")
    try:
        assert main(["manifest", "check", str(manifest)]) == 2
        assert "OMOP table file(s) missing: death" in capsys.readouterr().err
    finally:
        (tmp_path / "DEATH.csv").rename(release["release"] / "omop" / "DEATH.csv")


# ------------------------------------------- INSPECT as the external cohort of an internal source

def _mixed_manifest(folder: Path, release: Path, internal: Path, **inspect) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "data": {"source": "omop",
                 "omop": {"tables": str(internal / "omop"),
                          "imaging": {"pe": {"index": str(internal / "imaging_index.parquet"), "root": str(internal)}}},
                 "inspect": {"release": str(release), "omop": str(release / "omop"), **inspect}},
        "encoders": {"image": {"randconv": {"kind": "builtin"}}, "ehr": {"onehot": {"kind": "builtin"}}},
        "splits": {"external_institutions": []},
        "output_dir": str(folder / "out"),
    }))
    return path


@pytest.fixture(scope="module")
def internal(tmp_path_factory):
    """Another tiny twin as the internal OMOP source: its persons are numbered like INSPECT's."""
    root = tmp_path_factory.mktemp("internal")
    generate(root, profile="tiny", seed=13, tasks=("pe",))
    return root / "pe"


def test_inspect_is_the_external_cohort_of_an_internal_omop_source(release, internal, tmp_path):
    from helpers.cohort import connect_task, make_cohort, task_parts
    from helpers.ehr import onehot_features
    from helpers.manifest import load

    both_persons = set(pd.read_parquet(internal / "omop" / "person.parquet")["person_id"]) & set(
        pd.read_parquet(release["twin"] / "omop" / "person.parquet")["person_id"])
    assert both_persons  # the two sources number their persons alike: the union must keep them apart
    mixed = load(_mixed_manifest(tmp_path / "mixed", release["release"], internal), verify=False)
    alone_internal = load(_mixed_manifest(tmp_path / "internal", release["release"], internal), verify=False)
    alone_internal = alone_internal.model_copy(update={"data": alone_internal.data.model_copy(update={"inspect": None})})
    alone_inspect = load(_manifest(tmp_path / "inspect", release["release"]), verify=False)
    assert [p.inspect for p in task_parts(mixed, "pe")] == [False, True]
    built = make_cohort(mixed, "pe", meds=True)
    cohort = built.result.cohort
    ours = cohort[cohort["institution"] != ir.INSTITUTION]
    theirs = cohort[cohort["institution"] == ir.INSTITUTION].set_index("study_id")
    # the internal studies and their splits are those of the internal source alone, row for row
    reference = make_cohort(alone_internal, "pe", meds=False).result.cohort
    pd.testing.assert_frame_equal(ours.reset_index(drop=True), reference.reset_index(drop=True),
                                  check_dtype=False)  # index_time: ns after joining INSPECT's, us alone
    assert set(ours["split"]) == {"train", "val", "test"}
    # every INSPECT study is external, with the outcome INSPECT alone gives it; the two studies
    # without an INSPECT split are kept (every split is used by default)
    assert (theirs["split"] == "external").all()
    inspect_alone = make_cohort(alone_inspect, "pe", meds=False).result.cohort.set_index("study_id")
    assert len(theirs) == len(inspect_alone) + 2
    common = inspect_alone.index
    pd.testing.assert_frame_equal(theirs.loc[common, ["time", "event", "index_time"]],
                                  inspect_alone[["time", "event", "index_time"]])
    # INSPECT's persons are offset past every id of the internal source, and no person is in both
    con, offsets = connect_task(mixed, "pe")
    try:
        assert offsets[0] == 0 and offsets[1] > max(int(p) for p in ours["person_id"])
        moved = theirs.loc[common, "person_id"].astype(int) - offsets[1]
        assert (moved.to_numpy() == inspect_alone["person_id"].astype(int).to_numpy()).all()
        assert not set(ours["person_id"]) & set(theirs["person_id"])
        assert (theirs["person_id"].astype(int) > offsets[1]).all()
        # the one-hot features of every study are those its own source gives it
        mixed_features = onehot_features(con, cohort, "pe").features.set_index("study_id")
    finally:
        con.close()
    con, _ = connect_task(alone_inspect, "pe")
    try:
        inspect_features = onehot_features(con, inspect_alone.reset_index(), "pe").features.set_index("study_id")
    finally:
        con.close()
    con, _ = connect_task(alone_internal, "pe")
    try:
        internal_features = onehot_features(con, reference, "pe").features.set_index("study_id")
    finally:
        con.close()
    pd.testing.assert_frame_equal(mixed_features.loc[inspect_features.index], inspect_features)
    pd.testing.assert_frame_equal(mixed_features.loc[internal_features.index], internal_features)
    assert mixed_features.loc[inspect_features.index].to_numpy().any()
    # the MEDS export holds both sources' persons, INSPECT's as external subjects
    splits = pd.read_parquet(built.meds / "metadata" / "subject_splits.parquet")
    assert set(splits.loc[splits["split"] == "external", "subject_id"].astype(str)) == set(theirs["person_id"])
    subjects = set(pd.read_parquet(built.meds / "data").get("subject_id").astype(str))
    assert set(theirs["person_id"]) <= subjects and set(ours["person_id"]) <= subjects
    # INSPECT's label is compared on INSPECT's studies only
    assert built.labels[1]["studies"] == len(theirs)
    assert built.summary["label_agreement"]["agreement"] < 1


def test_inspect_external_keeps_the_splits_the_manifest_names(release, internal, tmp_path):
    from helpers.cohort import make_cohort
    from helpers.manifest import load

    mixed = load(_mixed_manifest(tmp_path, release["release"], internal, splits=["test"]), verify=False)
    built = make_cohort(mixed, "pe", meds=False)
    cohort, exclusions = built.result.cohort, built.result.exclusions
    given = release["split"].iloc[:-2].set_index("impression_id")["split"]  # the splits file's rows
    theirs = cohort[cohort["institution"] == ir.INSTITUTION]
    assert len(theirs) and (given.loc[theirs["study_id"]] == "test").all()
    reasons = exclusions[exclusions["institution"] == ir.INSTITUTION].set_index("study_id")["reason"]
    assert (reasons == "not in INSPECT's splits file").sum() == 2
    # every INSPECT study is in the cohort or excluded once, and a study of another split is
    # excluded as such unless the cohort step excluded it first for a reason of its own
    assert set(theirs["study_id"]) | set(reasons.index) == set(release["impressions"])
    assert not set(theirs["study_id"]) & set(reasons.index)
    not_among = reasons[reasons == "INSPECT split not among data.inspect.splits (test)"]
    assert len(not_among) and (given.loc[not_among.index] != "test").all()
    first = reasons[~reasons.index.isin(not_among.index) & (reasons != "not in INSPECT's splits file")]
    assert set(given[given != "test"].index) == set(not_among.index) | set(first.index[given.reindex(first.index) != "test"])


def test_every_ctpa_is_kept_when_the_manifest_says_so(release, tmp_path):
    from helpers.cohort import make_cohort
    from helpers.manifest import load

    path = _manifest(tmp_path, release["release"])
    text = yaml.safe_load(path.read_text())
    text["data"]["inspect"]["pe_positive_only"] = False
    path.write_text(yaml.safe_dump(text))
    every = make_cohort(load(path, verify=False), "pe", meds=False).result
    positive = make_cohort(load(_manifest(tmp_path / "positive", release["release"]), verify=False), "pe",
                           meds=False).result
    assert set(every.cohort["study_id"]) - set(positive.cohort["study_id"]) == set(release["no_pe"])
    assert "no PE on the CTPA (INSPECT's pe_positive_nlp label)" not in set(every.exclusions["reason"])


def test_a_study_id_in_both_sources_is_named(release, internal, tmp_path):
    from helpers.cohort import CohortError, task_index
    from helpers.manifest import load

    copy = tmp_path / "internal"
    shutil.copytree(internal, copy, ignore=shutil.ignore_patterns("images"))
    index = pd.read_parquet(copy / "imaging_index.parquet")
    index.loc[0, "study_id"] = release["impressions"][0]
    index.to_parquet(copy / "imaging_index.parquet")
    mixed = load(_mixed_manifest(tmp_path / "m", release["release"], copy), verify=False)
    with pytest.raises(CohortError, match=rf"imaging index {copy}/imaging_index.parquet and INSPECT release "
                                          rf"{release['release']}: 1 study_id\(s\) in both, e.g. 'imp-00000'"):
        task_index(mixed, "pe")


def test_the_manifest_places_inspect_where_it_can_be(release, internal, tmp_path):
    from helpers.manifest import ManifestError, load

    path = _mixed_manifest(tmp_path, release["release"], internal)
    text = yaml.safe_load(path.read_text())
    del text["data"]["omop"]["imaging"]["pe"]
    text["data"]["omop"]["imaging"]["mace"] = {"index": str(internal / "imaging_index.parquet"), "root": str(internal)}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ManifestError, match=r"INSPECT is the external cohort of task pe.*data.omop.imaging.pe"):
        load(path, verify=False)
    text["data"] = {"source": "synthetic", "inspect": {"release": str(release["release"]), "omop": "x"}}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ManifestError, match=r"data.inspect: only with data.source 'inspect'.*or 'omop'"):
        load(path, verify=False)
    text["data"] = {"source": "inspect", "inspect": {"release": str(release["release"]), "omop": "x",
                                                     "splits": ["test"]}}
    path.write_text(yaml.safe_dump(text))
    with pytest.raises(ManifestError, match=r"data.inspect.splits: only when INSPECT is the external cohort"):
        load(path, verify=False)
