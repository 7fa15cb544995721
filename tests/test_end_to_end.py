"""The quick profile through papermill end to end, then the book (the slowest test: ~4 min)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import papermill
import pytest
import yaml
from papermill.exceptions import PapermillExecutionError

from helpers import study
from helpers.manifest import load

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SWEEP = "0,1"  # two image shares keep the imbalance sweep to about a minute


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    manifest = tmp / "data_manifest.yaml"
    # the study's encoders (ct_mae and randconv, onehot and clmbr_mini), with short pretraining
    manifest.write_text(yaml.safe_dump({
        "version": 1,
        "data": {"source": "synthetic", "synthetic": {"profile": "quick", "seed": 11, "image_share": 0.5}},
        "encoders": {
            "image": {"ct_mae": {"kind": "ct_mae", "pretrain": {"epochs": 2, "steps_per_epoch": 10, "batch_size": 128}},
                      "randconv": {"kind": "builtin"}},
            "ehr": {"onehot": {"kind": "builtin"}, "clmbr": {"kind": "clmbr_mini", "pretrain": {"target_steps": 30}}},
        },
        "output_dir": "outputs",
    }))
    book = tmp / "book"
    book.mkdir()
    for name in ("_config.yml", "intro.md"):
        shutil.copy(PROJECT_ROOT / "book" / name, book / name)
    report = study.run_study(manifest, progress=False, book=book, sweep_shares=SWEEP)
    return {"report": report, "manifest": load(manifest), "book": book, "path": manifest}


@pytest.mark.slow
def test_the_study_runs_and_the_book_builds(finished):
    report = finished["report"]
    assert report.ok, (report.failed, report.not_run)
    assert report.book is not None and report.book.is_file()
    root = finished["manifest"].run_root
    sweep = pd.read_csv(finished["manifest"].with_profile("quick").run_root / "sweep" / "imbalance.csv")
    assert set(sweep["image_share"]) == {0.0, 1.0} and set(sweep["task"]) == {"pe", "mace"}
    assert sweep["c_index"].between(0, 1).all()
    combined = pd.read_csv(root / "comparisons" / "table1.csv", index_col=0)
    assert combined.shape[1] == 4, "Table 1 has PE and MACE, internal and external"
    for task in ("pe", "mace"):
        table = pd.read_csv(root / "comparisons" / task / "table1.csv", index_col=0)
        assert {"Image only", "EHR only (one-hot)", "EHR only (CLMBR)", "Concatenation (one-hot)",
                "Concatenation (CLMBR)", "Oracle (true risk)"} <= set(table.index)
        values = table.stack().str.extract(r"^(\d\.\d+)")[0].astype(float)
        assert values.between(0, 1, inclusive="neither").all() and len(values) == 2 * len(table)
        scores = pd.read_csv(root / "comparisons" / task / "cindex.csv")
        assert scores["c_index"].between(0, 1, inclusive="neither").all()
        pages = list((finished["book"] / "_build" / "html" / "generated" / task).rglob("*.html"))
        planned = [n for n in study.plan(finished["manifest"], finished["path"], sweep_shares=SWEEP) if n.labels.get("task") == task]
        assert len(pages) == len(planned), sorted(p.name for p in pages)
        oracle = scores[scores["model"] == "Oracle (true risk)"].set_index("cohort")["c_index"]
        models = scores[scores["model"] != "Oracle (true risk)"]
        # the twin's true risk is the ceiling (on the quick twin's small test sets a model could
        # pass it only by a chance larger than anything seen in development runs)
        assert (models["c_index"].to_numpy() < oracle.loc[models["cohort"]].to_numpy()).all()


@pytest.mark.slow
def test_no_identifier_or_date_reaches_the_book(finished):
    root = finished["manifest"].twin_dir
    html = "\n".join(p.read_text(errors="replace") for p in (finished["book"] / "_build" / "html").rglob("*.html"))
    for task in ("pe", "mace"):
        index = pd.read_parquet(root / task / "imaging_index.parquet")
        person = pd.read_parquet(root / task / "omop" / "person.parquet")
        for study_id in index["study_id"]:
            assert study_id not in html
        for value in person["person_source_value"].astype(str):
            assert value not in html
        dates = set(index["study_datetime"].dt.strftime("%Y-%m-%d")) | set(pd.to_datetime(person["birth_datetime"]).dt.strftime("%Y-%m-%d"))
        found = sorted(d for d in dates if d in html)
        assert not found, f"dates of patients in the book: {found[:5]}"
    assert not re.search(r"\bperson_id\s*=\s*['\"]?\d", html)


@pytest.mark.slow
def test_a_rerun_skips_everything_up_to_date(finished):
    again = study.run_study(finished["path"], progress=False, build=False, sweep_shares=SWEEP)
    assert again.ran == [] and len(again.skipped_up_to_date) == len(study.plan(finished["manifest"], finished["path"], sweep_shares=SWEEP))


@pytest.mark.slow
def test_unknown_fusion_fails_in_the_first_cell_and_writes_nothing(finished, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PapermillExecutionError, match=r"parameter 'fusion': unknown value 'late'; expected one of image_only"):
        papermill.execute_notebook(
            str(PROJECT_ROOT / "notebooks" / "03_train.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"task": "pe", "ehr_repr": "onehot", "fusion": "late", "manifest": str(finished["path"]),
                        "output_dir": str(out)},
            kernel_name="python3", progress_bar=False, cwd=str(PROJECT_ROOT / "notebooks"),
        )
    assert not out.exists()
