"""The full quick grid through Snakemake, papermill and the book (``make test-e2e``, minutes):
the teaching twin must mean something (every internal test cohort holds 40 events or more),
Table 1 has both tasks and cohorts, no model passes the oracle, and the book lists every
notebook that ran."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from helpers.compare import ORACLE
from helpers.manifest import load
from helpers.tasks import PROFILES, TASKS, grid_runs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    folder = tmp_path_factory.mktemp("quick")
    shipped = yaml.safe_load((PROJECT_ROOT / "data_manifest.yaml").read_text())
    shipped["output_dir"] = "outputs"
    (folder / "data_manifest.yaml").write_text(yaml.safe_dump(shipped, sort_keys=False))
    (folder / "book").mkdir()
    for name in ("_config.yml", "intro.md"):
        shutil.copy(PROJECT_ROOT / "book" / name, folder / "book" / name)
    run = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT_ROOT / "Snakefile"),
                          "--directory", str(folder), "--cores", "2", "--config", "profile=quick", "book_dir=book"],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    return {"folder": folder, "manifest": load(folder / "data_manifest.yaml").with_profile("quick")}


def test_every_internal_test_cohort_of_the_teaching_twin_has_40_events(quick):
    for task in TASKS:
        cohort = pd.read_parquet(quick["manifest"].run_root / "cohorts" / f"{task}.parquet")
        assert cohort.loc[cohort["split"] == "test", "event"].sum() >= 40, task


def test_table1_covers_the_grid_and_no_model_passes_the_oracle(quick):
    root = quick["manifest"].run_root
    table = pd.read_csv(root / "comparisons" / "table1.csv", index_col=0)
    assert list(table.columns) == ["Internal PE", "Internal MACE", "External PE", "External MACE"]
    for task in TASKS:
        scores = pd.read_csv(root / "comparisons" / task / "cindex.csv")
        models = scores[scores["model"] != ORACLE]
        assert len(models) == 2 * len(grid_runs(seeds=PROFILES["quick"].seeds))
        oracle = scores[scores["model"] == ORACLE].set_index("cohort")["c_index"]
        assert (models["c_index"].to_numpy() < oracle.loc[models["cohort"]].to_numpy()).all()
    # the quick study has no mechanism study (the paper study runs it)
    assert not PROFILES["quick"].mechanism_twin_seeds and not (root / "imbalance").exists()


def test_the_book_lists_every_notebook_that_ran(quick):
    executed = list((quick["manifest"].run_root / "notebooks").rglob("*.ipynb"))
    toc = yaml.safe_load((quick["folder"] / "book" / "generated" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert len([f for f in files if f.count("/") >= 2]) == len(executed)
    html = quick["folder"] / "book" / "_build" / "html"
    assert all((html / f"{f}.html").is_file() for f in files)
