from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
import yaml
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from helpers import study
from helpers.manifest import load

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def manifest(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "data": {"source": "synthetic", "synthetic": {"profile": "quick"}},
                                    "output_dir": "out"}))
    return load(path)


def test_plan_covers_the_grid_in_dependency_order(manifest):
    nodes = study.plan(manifest, manifest.path)
    keys = [n.key for n in nodes]
    assert len(keys) == len(set(keys))
    position = {k: i for i, k in enumerate(keys)}
    assert all(position[d] < position[n.key] for n in nodes for d in n.deps)
    trains = [n for n in nodes if n.notebook == "03_train.ipynb"]
    assert {(n.params["task"], n.params["fusion"]) for n in trains} == {
        (t, f) for t in ("pe", "mace") for f in study.GRID_FUSIONS}
    assert all(Path(n.params["output_dir"]).is_relative_to(manifest.run_root) for n in trains)


def test_only_restricts_and_keeps_dependencies(manifest):
    nodes = study.plan(manifest, manifest.path, study.parse_only("task=pe,fusion=concat"))
    assert {n.labels.get("task") for n in nodes} <= {"pe", None}
    assert [(n.params["fusion"], n.params["ehr_repr"]) for n in nodes if n.notebook == "03_train.ipynb"] == [
        ("concat", r) for r in study.GRID_EHR_REPRS]
    assert any(n.notebook == "01_cohort.ipynb" for n in nodes)
    with pytest.raises(ValueError, match="--only fusion: unknown value"):
        study.plan(manifest, manifest.path, study.parse_only("fusion=late"))
    with pytest.raises(ValueError, match="--only: unknown key 'model'"):
        study.parse_only("model=x")


def _notebook(path: Path, body: str) -> None:
    nb = new_notebook(cells=[new_markdown_cell("# Title\n\ntext"), new_code_cell("value = 1"), new_code_cell(body)])
    nb.cells[1].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_runner_skips_up_to_date_reports_failures_and_goes_on(tmp_path, monkeypatch):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "ok.ipynb", "from pathlib import Path\nPath(out).write_text(str(value))")
    _notebook(notebooks / "bad.ipynb", "raise ValueError(f'bad value {value}')")
    monkeypatch.setattr(study, "NOTEBOOKS", notebooks)
    out = tmp_path / "o.txt"
    nodes = [
        study.Node("a", "ok.ipynb", {"value": 2, "out": str(out)}, "Run A", outputs=[out]),
        study.Node("b", "bad.ipynb", {"value": 3}, "Run B"),
        study.Node("c", "ok.ipynb", {"value": 4, "out": str(tmp_path / "c.txt")}, "Run C", deps=["b"]),
        study.Node("d", "ok.ipynb", {"value": 5, "out": str(tmp_path / "d.txt")}, "Run D", deps=["a"]),
    ]
    report = study.run_nodes(nodes, tmp_path / "state", progress=False)
    assert report.ran == ["a", "d"] and not report.ok
    assert report.not_run == {"c": "depends on b"}
    message = report.failed["b"]
    assert "notebooks/bad.ipynb (value=3) failed in cell" in message and "ValueError: bad value 3" in message
    assert (tmp_path / "state" / "failed" / "b.ipynb").is_file()
    executed = nbformat.read(tmp_path / "state" / "executed" / "a.ipynb", as_version=4)
    assert executed.cells[0].source.startswith("# Run A")
    again = study.run_nodes(nodes[:1] + nodes[3:], tmp_path / "state", progress=False)
    assert again.skipped_up_to_date == ["a", "d"] and again.ran == []
    nodes[0].params["value"] = 9
    third = study.run_nodes(nodes[:1] + nodes[3:], tmp_path / "state", progress=False)
    assert third.ran == ["a", "d"], "a changed parameter reruns the node and what depends on it"
    out.unlink()
    fourth = study.run_nodes(nodes[:1], tmp_path / "state", progress=False)
    assert fourth.ran == ["a"], "a missing output reruns the node"


def test_toc_lists_only_the_notebooks_that_ran(manifest):
    nodes = study.plan(manifest, manifest.path, study.parse_only("task=mace,fusion=image_only"))
    toc = study._toc(nodes)
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    assert files[0] == "generated/about"
    per_task = [f for f in files if f.startswith("generated/mace/")]
    assert all(f.startswith(("generated/mace/", "generated/results/")) for f in files[1:])
    assert not any(f.startswith("generated/pe/") for f in files)
    assert "generated/mace/03_train/none/image_only/seed-0" in per_task
    assert len(per_task) == sum(1 for n in nodes if n.labels.get("task") == "mace")


def test_seeds_follow_the_profile(manifest):
    quick = [n for n in study.plan(manifest, manifest.path) if n.notebook == "03_train.ipynb"]
    paper = [n for n in study.plan(manifest.with_profile("paper"), manifest.path) if n.notebook == "03_train.ipynb"]
    assert {n.params["seed"] for n in quick} == {0}
    assert {n.params["seed"] for n in paper} == {0, 1, 2} and len(paper) == 3 * len(quick)
