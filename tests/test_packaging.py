"""The pins in pyproject.toml and environment.yml must agree."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _pins(requirements: list[str]) -> dict[str, str]:
    out = {}
    for req in requirements:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", req.strip())
        assert match, f"not pinned with ==: {req!r}"
        out[match.group(1).lower().replace("_", "-")] = match.group(2)
    return out


def test_pyproject_and_environment_pins_agree():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    py = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda = _pins(pip_section)
    assert py == conda
    assert py["torch"] == "2.13.0"
    assert py["jupyter-book"].startswith("1."), "Jupyter Book 2.x cannot build offline"
    assert "python=3.11" in env["dependencies"]


def test_ci_calls_the_readme_test_command():
    readme = (PROJECT_ROOT / "README.md").read_text()
    ci = (PROJECT_ROOT / ".ci" / "run").read_text()
    assert "make test" in readme and "make study" in readme
    assert readme.index("make study") < readme.index("papermill")
    assert "make test" in ci and "HF_HUB_OFFLINE=1" in ci


def test_notebook_sources_carry_no_outputs():
    import nbformat

    for path in sorted((PROJECT_ROOT / "notebooks").glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} carries outputs"
        tags = [c.metadata.get("tags", []) for c in nb.cells if c.cell_type == "code"]
        assert sum("parameters" in t for t in tags) == 1, f"{path.name} needs exactly one parameters cell"


def test_ruff_is_clean():
    """The lint the project's reviewers run first (ruff, configured in pyproject.toml)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ruff", "check", "helpers", "tests", "benchmarks", "notebooks"],
                            capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
