"""Concept sets (helpers.concepts) on records coded as a CDM export codes them: standard concepts
and their descendants, the source-code fallback, clinical drugs found from their ingredients,
lab units by UCUM concept; and the report that names a set matching nothing."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from helpers import cohort as hc
from helpers import vocabulary as voc
from helpers.concepts import CONCEPT_SETS, concept_set, report
from helpers.ehr import onehot_features
from helpers.omop import connect
from helpers.twin import generate


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    out = tmp_path_factory.mktemp("concepts-twin")
    generate(out, profile="tiny", seed=8, tasks=("pe", "mace"), images=False)
    return out


def _features(folder, twin_task) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    con = connect(folder)
    index = hc.read_imaging_index(twin_task / "imaging_index.parquet")
    result = hc.build_cohort(con, index, twin_task.name, imaging_root=twin_task, check_files=False)
    cohort = result.cohort.sort_values("study_id").reset_index(drop=True)
    onehot = onehot_features(con, cohort, twin_task.name)
    sets = hc.concept_set_report(con, twin_task.name)
    con.close()
    return cohort, onehot.features.sort_values("study_id").reset_index(drop=True), sets


def test_the_twin_is_coded_as_an_export_and_every_set_matches(twin):
    omop = twin / "pe" / "omop"
    conditions = pd.read_parquet(omop / "condition_occurrence.parquet")
    concept = pd.read_parquet(omop / "concept.parquet").set_index("concept_id")
    vocab = concept.reindex(conditions["condition_concept_id"])["vocabulary_id"]
    assert set(vocab.dropna()) == {"SNOMED"} and (conditions["condition_concept_id"] == 0).any()
    assert set(concept.reindex(conditions["condition_source_concept_id"])["vocabulary_id"]) == {"ICD10CM"}
    drugs = pd.read_parquet(omop / "drug_exposure.parquet")
    assert set(concept.reindex(drugs["drug_concept_id"])["concept_class_id"]) == {"Clinical Drug"}
    labs = pd.read_parquet(omop / "measurement.parquet")
    assert set(concept.reindex(labs["unit_concept_id"])["vocabulary_id"]) == {"UCUM"}
    _, features, sets = _features(omop, twin / "pe")
    assert sets["matched"].all(), sets[~sets["matched"]]
    routes = sets.set_index("concept_set")
    # personal history of PE has no standard mapping: found by its ICD-10-CM source code only
    assert routes.loc["prior_vte", "records_standard"] == 0 and routes.loc["prior_vte", "records_source"] > 0
    assert routes.loc["frailty", "records_standard"] > 0 and routes.loc["frailty", "records_source"] > 0
    assert routes.loc["anticoagulant", "records_standard"] > 0 and routes.loc["anticoagulant", "standard_concepts"] == 8
    assert (features.drop(columns="study_id").sum() > 0).sum() >= 0.8 * (features.shape[1] - 1)


def test_without_concept_ancestor_the_drug_sets_match_nothing_and_are_named(twin, tmp_path):
    folder = tmp_path / "omop"
    shutil.copytree(twin / "pe" / "omop", folder)
    (folder / "concept_ancestor.parquet").unlink()
    _, features, sets = _features(folder, twin / "pe")
    unmatched = set(sets.loc[~sets["matched"], "concept_set"])
    assert unmatched == {s for s in sets["concept_set"] if concept_set(s).domain == "Drug"}
    assert (features[[c for c in features.columns if c.startswith("rx_")]] == 0).all().all()


def test_source_concepts_in_the_concept_column_give_the_same_features(twin, tmp_path):
    """An export that writes the ICD-10-CM concept into condition_concept_id (not the CDM's
    layout) and ingredients instead of clinical drugs is read through the source route and the
    ancestor table: the same cohort and features as the export's layout."""
    reference = _features(twin / "mace" / "omop", twin / "mace")
    folder = tmp_path / "omop"
    shutil.copytree(twin / "mace" / "omop", folder)
    conditions = pd.read_parquet(folder / "condition_occurrence.parquet")
    conditions["condition_concept_id"] = conditions.pop("condition_source_concept_id")
    conditions.to_parquet(folder / "condition_occurrence.parquet")
    ingredient = {voc.standard_concept_id(c): c.concept_id for c in voc.CONCEPTS if c.domain_id == "Drug"}
    drugs = pd.read_parquet(folder / "drug_exposure.parquet")
    drugs["drug_concept_id"] = drugs["drug_concept_id"].map(ingredient)
    drugs.to_parquet(folder / "drug_exposure.parquet")
    got = _features(folder, twin / "mace")
    pd.testing.assert_frame_equal(got[0], reference[0])  # the MACE outcome is a concept set too
    pd.testing.assert_frame_equal(got[1], reference[1])
    routes = got[2].set_index("concept_set")
    assert routes.loc["mi", "records_source"] > 0 and routes.loc["mi", "records_standard"] == 0


def test_lab_units_by_ucum_concept_or_by_text(twin, tmp_path):
    reference = _features(twin / "pe" / "omop", twin / "pe")[1]
    folder = tmp_path / "omop"
    shutil.copytree(twin / "pe" / "omop", folder)
    labs = pd.read_parquet(folder / "measurement.parquet")
    half = labs.index % 2 == 0
    labs.loc[half, "unit_source_value"] = None  # the UCUM concept alone
    labs.loc[~half, "unit_concept_id"] = 0      # the text alone, in capitals
    labs.loc[~half, "unit_source_value"] = labs.loc[~half, "unit_source_value"].str.upper()
    labs.to_parquet(folder / "measurement.parquet")
    pd.testing.assert_frame_equal(_features(folder, twin / "pe")[1], reference)


def test_every_feature_and_outcome_group_has_a_declared_set():
    from helpers.ehr import FEATURES
    from helpers.tasks import TASKS

    for task, features in FEATURES.items():
        for f in features:
            if f.group:
                assert f.group in CONCEPT_SETS
        assert all(g in CONCEPT_SETS for g in TASKS[task].outcome_groups)
    assert concept_set("mi").standard == (("SNOMED", "57054005"),)  # acute MI, not old MI
    with pytest.raises(KeyError, match="no concept set 'gout'"):
        concept_set("gout")


def test_the_report_counts_each_record_once(twin):
    con = connect(twin / "pe" / "omop")
    sets = report(con, ["heart_failure"])
    conditions = pd.read_parquet(twin / "pe" / "omop" / "condition_occurrence.parquet")
    hf = {c.concept_id for c in voc.concepts_in_group("heart_failure")}
    assert sets.loc[0, "records"] == conditions["condition_source_concept_id"].isin(hf).sum()
