"""Gathering the comparison tables of several twin settings (helpers.imbalance)."""

from __future__ import annotations

import pandas as pd
import pytest

from helpers import imbalance
from helpers.compare import ORACLE
from helpers.tasks import DEFAULT_INTERACTION, Setting


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
