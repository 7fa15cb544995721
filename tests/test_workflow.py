"""The workflow on a tiny twin: every notebook runs at least once through Snakemake and
papermill, the book builds, nothing that identifies a patient or the build machine reaches it,
a rerun has nothing to do, and a failing notebook is reported with its parameters and cell.

The grid is cut to what covers every notebook (one task, three strategies, the one-hot EHR, an
mechanism study of four settings); the full quick grid is ``make test-e2e``."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import papermill
import pytest
import yaml
from papermill.exceptions import PapermillExecutionError

from helpers.compare import ORACLE
from helpers.manifest import load
from helpers.saliency import SALIENCY_FUSIONS
from helpers.tasks import EHR_REPRS, FUSIONS

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(PROJECT_ROOT / "Snakefile")]
GRID = ["tasks=pe", "fusions=image_only,concat,cross_attention", "ehr_reprs=onehot", "book_dir=book"]
NOTEBOOKS = sorted(p.name for p in (PROJECT_ROOT / "notebooks").glob("*.ipynb"))


def tiny_manifest(folder: Path) -> Path:
    path = folder / "data_manifest.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1,
        "data": {"source": "synthetic", "synthetic": {"profile": "tiny", "seed": 11, "image_share": 0.5}},
        "encoders": {
            "image": {"randconv": {"kind": "builtin"},
                      "ct_mae": {"kind": "ct_mae", "pretrain": {"epochs": 2, "steps_per_epoch": 10, "batch_size": 128}}},
            "ehr": {"onehot": {"kind": "builtin"}, "clmbr": {"kind": "clmbr_mini", "pretrain": {"target_steps": 30}}},
        },
        "output_dir": "outputs",
    }, sort_keys=False))  # the first image encoder is the one the fusion models use
    return path


def snakemake(folder: Path, *args: str, config: list[str] = GRID) -> subprocess.CompletedProcess:
    return subprocess.run([*SNAKEMAKE, "--directory", str(folder), "--cores", "2", *args, "--config", *config],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    folder = tmp_path_factory.mktemp("study")
    manifest = tiny_manifest(folder)
    (folder / "book").mkdir()
    for name in ("_config.yml", "intro.md"):
        shutil.copy(PROJECT_ROOT / "book" / name, folder / "book" / name)
    run = snakemake(folder)
    assert run.returncode == 0, run.stderr[-4000:]
    cfg = load(manifest)
    return {"folder": folder, "manifest": cfg, "root": cfg.run_root, "log": run.stderr}


def test_every_notebook_ran_and_the_book_lists_what_ran(study):
    executed = [p for p in (study["root"] / "notebooks").rglob("*.ipynb")]
    assert not [p for p in executed if p.name.endswith(".failed.ipynb")]
    sources = {p.name for p in executed} | {p.parent.name + ".ipynb" for p in executed}
    sources |= {p.parent.parent.name + ".ipynb" for p in executed} | {p.parent.parent.parent.name + ".ipynb" for p in executed}
    assert set(NOTEBOOKS) <= sources, set(NOTEBOOKS) - sources
    toc = yaml.safe_load((study["folder"] / "book" / "generated" / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    pages = [f for f in files if f.startswith("generated/pe/") or f.startswith("generated/results/")]
    assert len(pages) == len(executed), "the table of contents lists exactly the notebooks that ran"
    html = study["folder"] / "book" / "_build" / "html"
    assert all((html / f"{f}.html").is_file() for f in files)
    assert "rulegraph.svg" in (html / "generated" / "reproducibility.html").read_text()


def test_results_are_numbers_with_the_oracle_as_a_reference_row(study):
    root = study["root"]
    scores = pd.read_csv(root / "comparisons" / "pe" / "cindex.csv")
    assert scores["c_index"].between(0, 1, inclusive="neither").all()
    oracle = scores[scores["model"] == ORACLE]
    assert len(oracle) == 2 and oracle["fusion"].isna().all() and oracle["seed"].isna().all()
    assert {"Image only", "Concatenation (one-hot)", "Cross-attention (one-hot)"} <= set(scores["model"])
    table = pd.read_csv(root / "comparisons" / "table1.csv", index_col=0)
    assert list(table.columns) == ["Internal PE", "External PE"] and table.index[-1] == ORACLE
    # the mechanism study: the tiny profile's grid (shares 0 and 1, kappa 0 and the default), one twin seed
    mechanism = pd.read_csv(root / "imbalance" / "mechanism.csv")
    assert set(mechanism["image_share"]) == {0.0, 1.0} and set(mechanism["interaction"]) == {0.0, 0.75}
    assert set(mechanism["strategy"]) == {"image_only", "concat", "cross_attention", "oracle"}
    assert set(mechanism["twin_seed"]) == {11}
    verdicts = pd.read_csv(root / "imbalance" / "predictions.csv")
    assert list(verdicts["prediction"]) == ["P1", "P2", "P3", "P4", "P5"]
    assert (study["root"].parent / "sweep" / "share-1_interaction-0.75_seed-11" / "runs").is_dir()
    params = json.loads((root / "runs" / "pe" / "onehot" / "concat" / "seed-0" / "params.json").read_text())
    assert params["fusion"] == "concat" and len(params["inputs_sha256"]) == 3
    assert params["image_embeddings"].endswith("image-randconv.parquet"), "the manifest's first image encoder"
    assert not Path(params["cohort_path"]).is_absolute(), "the workflow passes paths relative to its folder"


def test_saliency_ran_for_each_fusion_against_image_only(study):
    root = study["root"]
    for fusion in ("concat", "cross_attention"):
        folder = root / "saliency" / "pe" / "onehot" / fusion / "seed-0"
        record = json.loads((folder / "saliency.json").read_text())
        assert record["method_used"] == "smoothgrad" and record["spec"]["n_cases"] == 6
        assert all(record["checks"]["weights_unchanged"].values())
        assert max(record["checks"]["risk_agreement"].values()) < 1e-4, "the risk from the CT is the run's risk"
        summary = pd.read_csv(folder / "summary.csv")
        assert set(summary["model"]) == {"image_only", fusion}
        assert set(summary["region"]) == {"lesion", "cardiac_pa", "body"}
        assert summary["mass"].between(0, 1).all() and (summary["mass_lower"] <= summary["mass_upper"]).all()
        paired = pd.read_csv(folder / "paired.csv")
        assert set(paired["measure"]) == {"mass", "hit"} and paired["p_value"].between(0, 1).all()
        assert pd.read_csv(folder / "randomisation.csv")["spearman"].between(-1, 1).all()
        with np.load(folder / "attributions.npz") as maps:
            assert maps[fusion].shape == (6, 16, 64, 64)
        assert (folder / "saliency.png").stat().st_size > 10_000
    assert (root / "saliency" / "pe" / "onehot" / "cross_attention" / "seed-0" / "attention.png").is_file()
    # the results chapter gathers them: one row per strategy and region
    localised = pd.read_csv(root / "comparisons" / "localisation.csv")
    assert sorted(set(localised["fusion"])) == ["concat", "cross_attention"] and len(localised) == 6
    assert (localised["lower"] <= localised["difference"]).all() and (localised["difference"] <= localised["upper"]).all()
    page = (study["folder"] / "book" / "_build" / "html" / "generated" / "pe" / "05_saliency" / "onehot"
            / "cross_attention" / "seed-0.html").read_text()
    assert '<img src="data:image/png;base64,' in page and 'alt="4 rows, one per high-risk PE patient' in page


def test_saliency_stops_in_its_first_cell_on_a_bad_method(study, tmp_path):
    with pytest.raises(PapermillExecutionError, match=r"parameter 'method': unknown value 'lime'; expected one of "
                                                      r"gradient, smoothgrad, integrated_gradients, occlusion"):
        papermill.execute_notebook(
            str(PROJECT_ROOT / "notebooks" / "05_saliency.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"task": "pe", "fusion": "concat", "method": "lime", "manifest": "nowhere.yaml"},
            kernel_name="python3", progress_bar=False, cwd=str(tmp_path),
        )


def test_no_identifier_date_or_build_path_reaches_the_book(study):
    html = "\n".join(p.read_text(errors="replace")
                     for p in (study["folder"] / "book" / "_build" / "html").rglob("*.html"))
    twins = sorted((study["folder"] / "outputs").rglob("twin.json"))
    assert len(twins) == 1 + 4 + 3, "the study's twin, the mechanism study's four settings and its three site shifts"
    for root in {t.parent.parent for t in twins}:
        index = pd.read_parquet(root / "pe" / "imaging_index.parquet")
        person = pd.read_parquet(root / "pe" / "omop" / "person.parquet")
        assert not [s for s in index["study_id"] if s in html]
        assert not [v for v in person["person_source_value"].astype(str) if v in html]
        dates = set(index["study_datetime"].dt.strftime("%Y-%m-%d")) | set(
            pd.to_datetime(person["birth_datetime"]).dt.strftime("%Y-%m-%d"))
        found = sorted(d for d in dates if d in html)
        assert not found, f"dates of patients in the book: {found[:5]}"
    assert not re.search(r"\bperson_id\s*=\s*['\"]?\d", html)
    for machine_path in {str(study["folder"]), str(study["folder"].resolve()), str(PROJECT_ROOT)}:
        assert machine_path not in html, f"the book shows a path of the machine that built it: {machine_path}"


def test_a_rerun_has_nothing_to_do(study):
    dry = snakemake(study["folder"], "-n")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "Nothing to be done" in dry.stdout + dry.stderr


def test_the_slurm_profile_plans_the_study_with_gpu_encoders(tmp_path):
    tiny_manifest(tmp_path)
    dry = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "--profile", str(PROJECT_ROOT / "workflow" / "profiles" / "slurm"),
                          "-n", "--config", *GRID, "device=cuda", "book=0"], capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    assert re.search(r"rule embeddings:(?:.|\n)*?resources:.*gpu=1", out)
    assert re.search(r"train\s+\d+", out)


def test_unknown_fusion_fails_in_the_first_cell_and_writes_nothing(study, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PapermillExecutionError, match=r"parameter 'fusion': unknown value 'late'; expected one of image_only"):
        papermill.execute_notebook(
            str(PROJECT_ROOT / "notebooks" / "03_train.ipynb"), str(tmp_path / "out.ipynb"),
            parameters={"task": "pe", "ehr_repr": "onehot", "fusion": "late",
                        "manifest": str(study["root"] / "manifest.yaml"), "output_dir": str(out)},
            kernel_name="python3", progress_bar=False, cwd=str(study["folder"]),
        )
    assert not out.exists()


def test_a_failing_notebook_is_named_with_its_parameters_and_cell(study):
    """Last in this module: it breaks the study's EHR table."""
    table = study["root"] / "embeddings" / "pe" / "ehr-onehot.parquet"
    table.write_bytes(b"not a parquet file")
    target = study["root"] / "runs" / "pe" / "onehot" / "concat" / "seed-0" / "metrics.json"
    run = snakemake(study["folder"], str(target.relative_to(study["folder"])), "--force", "--allowed-rules", "train",
                    config=[*GRID, "book=0"])
    assert run.returncode != 0
    log = run.stdout + run.stderr
    assert re.search(r"notebook failed: \S*notebooks/03_train\.ipynb \(-p task 'pe' -p ehr_repr 'onehot' -p fusion 'concat'", log)
    assert re.search(r'Exception encountered at "In \[\d+\]"', log) and "ehr-onehot.parquet" in log
    failed = study["root"] / "notebooks" / "pe" / "03_train" / "onehot" / "concat" / "seed-0.failed.ipynb"
    assert failed.is_file()


def test_the_dry_run_plans_the_grid_from_the_registry(tmp_path):
    """The whole tiny grid, planned without running: one job per notebook and setting; the study
    pretrains its own encoders; every model trains on the manifest's first image encoder."""
    tiny_manifest(tmp_path)
    dry = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p", "--config", "tasks=pe", "book=0"],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr[-3000:]
    out = dry.stdout + dry.stderr
    stats = dict(re.findall(r"^(\w+)\s+(\d+)$", out[out.index("Job stats"):], flags=re.M))
    runs = len(FUSIONS) * len(EHR_REPRS) - (len(EHR_REPRS) - 1)  # image_only once, without EHR
    expected = {"twin": 1, "cohort": 1, "pretrain": 2, "embeddings": 4, "train": runs, "compare": 1,
                "saliency": len(SALIENCY_FUSIONS), "mechanism": 1, "results": 1, "imbalance": 1, "all": 1}
    assert {k: int(v) for k, v in stats.items()} == {**expected, "total": sum(expected.values())}
    trains = [line for line in out.splitlines() if line.startswith("Shell command: papermill") and "notebooks/03_train.ipynb" in line]
    assert len(trains) == runs
    assert all("image-ct_mae" not in line for line in trains)
    assert sum("-p ehr_repr 'clmbr'" in line for line in trains) == len(FUSIONS) - 1
    mechanism = [line for line in out.splitlines() if "notebooks/06_mechanism.ipynb" in line and line.startswith("Shell command")]
    assert len(mechanism) == 1 and "-p shares '0,1' -p interactions '0,0.75'" in mechanism[0]


def test_probing_other_image_encoders_follows_the_profile_or_the_config(tmp_path):
    """The tiny profile probes ct_mae (pretrained and extracted, no model trains on it); the
    paper profile does not unless ``probe_encoders=1``; a value other than 0 or 1 is refused."""
    tiny_manifest(tmp_path)

    def planned(*config):
        dry = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "-p", "--config", "tasks=pe", "book=0",
                              "mechanism=0", *config], capture_output=True, text=True)
        assert dry.returncode == 0, dry.stderr[-3000:]
        return dry.stdout + dry.stderr

    assert "image-ct_mae.parquet" in planned()
    assert "image-ct_mae.parquet" not in planned("probe_encoders=0")
    assert "image-ct_mae.parquet" not in planned("profile=paper")
    paper = planned("profile=paper", "probe_encoders=1")
    assert "image-ct_mae.parquet" in paper and "02_pretrain/ct_mae.ipynb" in paper
    bad = subprocess.run([*SNAKEMAKE, "--directory", str(tmp_path), "-n", "--config", "probe_encoders=yes"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--config probe_encoders: expected 0 or 1, got 'yes'" in bad.stdout + bad.stderr
