"""The grid runner: every notebook of the study, run with papermill, then the book.

The grid (tasks x EHR representations x fusions x seeds) is declared here and nowhere else.
Each run is a node with its notebook, parameters and upstream nodes. A node is skipped when
its *digest* (notebook source, parameters, the ``helpers`` source code, the digests of its
upstream nodes, and for real data the size and modification time of the source files) matches
the stamp of its last successful run and its outputs are present; so a rerun after an
interruption resumes where it stopped. A failing node is reported with the notebook, the
parameters and the failing cell; the nodes that depend on it are skipped, the others run, and
the runner exits non-zero at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import papermill
import yaml
from papermill.exceptions import PapermillExecutionError
from tqdm.auto import tqdm

from helpers.manifest import PRETRAINED_KINDS, Manifest, ManifestError, default_checkpoint, dump
from helpers.manifest import load as load_manifest
from helpers.tasks import TASKS, UNIMODAL_IMAGE

__all__ = [
    "PROJECT_ROOT",
    "Node",
    "StudyReport",
    "GRID_EHR_REPRS",
    "GRID_FUSIONS",
    "GRID_SEEDS",
    "SWEEP_SHARES",
    "grid_seeds",
    "parse_only",
    "plan",
    "run_nodes",
    "build_book",
    "run_study",
]

PROJECT_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = PROJECT_ROOT / "notebooks"
BOOK = PROJECT_ROOT / "book"

# The grid of this version of the study.
# EHR representations: each must be an entry of the manifest's ``encoders.ehr``. The image
# encoder of the fusion models is the manifest's first ``encoders.image`` entry; every other
# image encoder listed there is extracted (and probed in the book) for comparison.
GRID_EHR_REPRS: tuple[str, ...] = ("onehot", "clmbr")
GRID_FUSIONS: tuple[str, ...] = (
    "image_only", "ehr_only", "concat", "contrastive", "cross_attention", "coattn_image_guided", "coattn_ehr_guided",
)
# Training seeds per twin profile: several on the paper-sized twin, so that seed-to-seed
# variation can be shown apart from test-set sampling variation; one on the quick twin (tests,
# workshops). Real data (no profile) uses the paper-sized grid.
GRID_SEEDS: dict[str, tuple[int, ...]] = {"quick": (0,), "paper": (0, 1, 2)}


def grid_seeds(manifest: Manifest) -> tuple[int, ...]:
    """The training seeds of the grid for this manifest."""
    if manifest.data.source == "synthetic":
        return GRID_SEEDS[manifest.synthetic.profile]
    return GRID_SEEDS["paper"]
_ONLY_KEYS = ("task", "ehr_repr", "fusion", "seed")


@dataclass
class Node:
    """One notebook run. ``key`` names it (and its executed notebook); ``labels`` are the grid
    coordinates used by ``--only``; ``outputs`` must exist for the node to count as done."""

    key: str
    notebook: str
    params: dict
    title: str
    deps: list[str] = field(default_factory=list)
    labels: dict = field(default_factory=dict)
    outputs: list[Path] = field(default_factory=list)
    watch: list[Path] = field(default_factory=list)


@dataclass
class StudyReport:
    ran: list[str] = field(default_factory=list)
    skipped_up_to_date: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    not_run: dict[str, str] = field(default_factory=dict)
    book: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.failed and not self.not_run


def parse_only(text: str | None) -> dict[str, set[str]]:
    """Parse ``--only`` (``task=pe,fusion=concat``; repeat a key for several values:
    ``fusion=concat,fusion=image_only``).

    >>> parse_only("task=pe,fusion=concat,fusion=image_only") == {"task": {"pe"}, "fusion": {"concat", "image_only"}}
    True
    """
    if not text:
        return {}
    out: dict[str, set[str]] = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"--only: expected key=value items separated by commas, got {part!r}")
        key, value = (s.strip() for s in part.split("=", 1))
        if key not in _ONLY_KEYS:
            raise ValueError(f"--only: unknown key {key!r}; expected one of {', '.join(_ONLY_KEYS)}")
        out.setdefault(key, set()).add(value)
    return out


def _source_watch(manifest: Manifest, task: str) -> list[Path]:
    if manifest.data.source != "omop":
        return []
    omop = manifest.data.omop
    assert omop is not None
    files = [omop.tables] if omop.tables.is_file() else sorted(omop.tables.glob("*.parquet"))
    if task in omop.imaging:
        files.append(omop.imaging[task].index)
    return files


# The imbalance sweep (06_imbalance): the twin's image_share values, on the quick-sized twin
# whatever the study's profile (a paper-sized sweep is 5 x 2 x 7 paper-sized trainings).
SWEEP_SHARES = "0,0.25,0.5,0.75,1"
SWEEP_PROFILE = "quick"


def plan(manifest: Manifest, manifest_path: Path, only: dict[str, set[str]] | None = None, *,
         sweep_shares: str | None = SWEEP_SHARES) -> list[Node]:
    """The nodes of the study grid, in an order where every node follows its dependencies.
    The imbalance sweep runs on the digital twin for the whole grid (no ``only``), unless
    ``sweep_shares`` is None."""
    only = only or {}
    for key, values in only.items():
        allowed = {"task": set(TASKS), "fusion": set(GRID_FUSIONS), "ehr_repr": set(GRID_EHR_REPRS) | {UNIMODAL_IMAGE},
                   "seed": {str(s) for s in grid_seeds(manifest)}}[key]
        unknown = values - allowed
        if unknown:
            raise ValueError(f"--only {key}: unknown value(s) {', '.join(sorted(unknown))}; this grid has {', '.join(sorted(allowed))}")
    image_encoders = list(manifest.encoders.image)
    if not image_encoders:
        raise ManifestError(f"{manifest.path}: encoders.image: the study needs at least one image encoder")
    image_encoder = image_encoders[0]
    absent = [r for r in GRID_EHR_REPRS if r not in manifest.encoders.ehr]
    if absent:
        raise ManifestError(f"{manifest.path}: encoders.ehr: the study grid needs {', '.join(absent)} "
                            f"(declared: {', '.join(manifest.encoders.ehr) or 'none'})")
    root = manifest.run_root
    mpath = str(manifest_path)
    nodes: list[Node] = []
    for task in TASKS:
        if "task" in only and task not in only["task"]:
            continue
        cohort = root / "cohorts" / f"{task}.parquet"
        cohort_deps = []
        if manifest.data.source == "synthetic":
            nodes.append(Node(f"{task}/00_twin", "00_twin.ipynb", {"task": task, "manifest": mpath},
                              f"The digital twin: {TASKS[task].title}", labels={"task": task},
                              outputs=[manifest.twin_dir / task / "twin.json"]))
            cohort_deps.append(f"{task}/00_twin")
        nodes.append(Node(f"{task}/01_cohort", "01_cohort.ipynb", {"task": task, "manifest": mpath},
                          f"Cohort: {TASKS[task].title}", deps=cohort_deps, labels={"task": task},
                          outputs=[cohort], watch=_source_watch(manifest, task)))
        emb = {}
        for modality, encoder in [("image", e) for e in image_encoders] + [("ehr", e) for e in GRID_EHR_REPRS]:
            deps = [f"{task}/01_cohort"]
            entry = getattr(manifest.encoders, modality)[encoder]
            if entry.kind in PRETRAINED_KINDS and entry.path is None:
                checkpoint = default_checkpoint(manifest, task, encoder)
                key = f"{task}/02_pretrain/{encoder}"
                nodes.append(Node(key, "02_pretrain.ipynb", {"task": task, "encoder": encoder, "manifest": mpath},
                                  f"Pretraining {encoder} ({entry.kind}): {task.upper()}", deps=[f"{task}/01_cohort"],
                                  labels={"task": task}, outputs=[checkpoint, checkpoint.with_name(f"{encoder}.json")]))
                deps.append(key)
            key = f"{task}/02_embeddings/{modality}-{encoder}"
            emb[(modality, encoder)] = root / "embeddings" / task / f"{modality}-{encoder}.parquet"
            nodes.append(Node(key, "02_embeddings.ipynb",
                              {"task": task, "modality": modality, "encoder": encoder, "device": "cpu",
                               "batch_size": 16, "manifest": mpath},
                              f"Embeddings ({modality}, {encoder}): {task.upper()}", deps=deps,
                              labels={"task": task}, outputs=[emb[(modality, encoder)]]))
        trains = []
        for fusion in GRID_FUSIONS:
            reprs = [UNIMODAL_IMAGE] if fusion == "image_only" else list(GRID_EHR_REPRS)
            for ehr_repr in reprs:
                for seed in grid_seeds(manifest):
                    labels = {"task": task, "ehr_repr": ehr_repr, "fusion": fusion, "seed": str(seed)}
                    if any(k in labels and labels[k] not in v for k, v in only.items()):
                        continue
                    out = root / "runs" / task / ehr_repr / fusion / f"seed-{seed}"
                    ehr_key = GRID_EHR_REPRS[0] if ehr_repr == UNIMODAL_IMAGE else ehr_repr
                    deps = [f"{task}/02_embeddings/image-{image_encoder}", f"{task}/02_embeddings/ehr-{ehr_key}"]
                    extra = {} if ehr_key == "onehot" else {"ehr_tokens": "chunk"}
                    key = f"{task}/03_train/{ehr_repr}/{fusion}/seed-{seed}"
                    nodes.append(Node(key, "03_train.ipynb",
                                      {"task": task, "ehr_repr": ehr_repr, "fusion": fusion, "seed": seed,
                                       "cohort_path": str(cohort),
                                       "image_embeddings": str(emb[("image", image_encoder)]),
                                       "ehr_embeddings": str(emb[("ehr", ehr_key)]),
                                       "output_dir": str(out), "manifest": mpath, **extra},
                                      f"Training: {task.upper()}, {fusion}" + ("" if ehr_repr == UNIMODAL_IMAGE else f" ({ehr_repr})") + f", seed {seed}",
                                      deps=deps, labels=labels, outputs=[out / "metrics.json"]))
                    trains.append(key)
        if trains:
            nodes.append(Node(f"{task}/04_compare", "04_compare.ipynb",
                              {"task": task, "runs_dir": str(root / "runs"), "n_boot": 1000, "manifest": mpath},
                              f"Comparison: {TASKS[task].title}", deps=trains, labels={"task": task},
                              outputs=[root / "comparisons" / task / "table1.csv"]))
    compares = [n.key for n in nodes if n.notebook == "04_compare.ipynb"]
    if compares:
        nodes.append(Node("results/05_results", "05_results.ipynb",
                          {"runs_dir": str(root / "runs"), "manifest": mpath}, "Results: Table 1",
                          deps=compares, labels={}, outputs=[root / "comparisons" / "table1.csv"]))
    if not only and sweep_shares and manifest.data.source == "synthetic":
        sweep_dir = manifest.with_profile(SWEEP_PROFILE).run_root / "sweep"
        nodes.append(Node("results/06_imbalance", "06_imbalance.ipynb",
                          {"manifest": mpath, "shares": sweep_shares, "profile": SWEEP_PROFILE, "train_seed": 0,
                           "n_boot": 200, "out_dir": str(sweep_dir)},
                          "Fusion under modality imbalance", labels={}, outputs=[sweep_dir / "imbalance.csv"]))
    return nodes


def _hash_bytes(*chunks: bytes) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def _code_digest() -> str:
    """Hash of the library code the notebooks run (the runner and the command line excluded:
    they do not change what a notebook computes)."""
    runner = {Path(__file__).resolve(), (PROJECT_ROOT / "helpers" / "__main__.py").resolve()}
    files = sorted(f for f in (PROJECT_ROOT / "helpers").rglob("*.py") if f.resolve() not in runner)
    return _hash_bytes(*[f.relative_to(PROJECT_ROOT).as_posix().encode() + f.read_bytes() for f in files])


def _digest(node: Node, dep_digests: list[str], code: str) -> str:
    source = (NOTEBOOKS / node.notebook).read_bytes()
    watched = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.exists() else f"{p}:missing" for p in node.watch]
    payload = json.dumps({"params": node.params, "deps": dep_digests, "code": code, "watch": watched}, sort_keys=True)
    return _hash_bytes(source, payload.encode())


def _retitle(path: Path, title: str) -> None:
    """Give the executed notebook a title that names its parameters (the book's page title)."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            lines = cell.source.lstrip().split("\n")
            lines[0] = f"# {title}"
            cell.source = "\n".join(lines)
            break
    nbformat.write(nb, path)


def _failure_message(node: Node, err: Exception) -> str:
    params = ", ".join(f"{k}={v!r}" for k, v in node.params.items() if k != "manifest")
    if isinstance(err, PapermillExecutionError):
        first_line = str(err.evalue).strip().splitlines()[0] if str(err.evalue).strip() else ""
        return (f"notebooks/{node.notebook} ({params}) failed in cell {err.exec_count} "
                f"(cell index {err.cell_index}): {err.ename}: {first_line}")
    return f"notebooks/{node.notebook} ({params}) failed before running: {type(err).__name__}: {err}"


def run_nodes(nodes: list[Node], state_dir: Path, *, force: bool = False, progress: bool = True) -> StudyReport:
    """Run ``nodes`` in order with papermill. Executed notebooks land in
    ``state_dir/executed/<key>.ipynb``, stamps in ``state_dir/stamps/<key>.json``, failed
    notebooks in ``state_dir/failed/<key>.ipynb``."""
    report = StudyReport()
    code = _code_digest()
    digests: dict[str, str] = {}
    status: dict[str, str] = {}
    bar = tqdm(nodes, desc="study", unit="notebook", disable=not progress, file=sys.stderr)
    for node in bar:
        bar.set_postfix_str(node.key)
        blocked = [d for d in node.deps if status.get(d) not in ("ok", None)]
        missing_dep = [d for d in node.deps if d not in status]
        if blocked:
            report.not_run[node.key] = f"depends on {', '.join(blocked)}"
            status[node.key] = "blocked"
            continue
        digest = _digest(node, [digests[d] for d in node.deps if d in digests], code)
        digests[node.key] = digest
        executed = state_dir / "executed" / f"{node.key}.ipynb"
        stamp = state_dir / "stamps" / f"{node.key}.json"
        if (not force and not missing_dep and stamp.is_file() and executed.is_file()
                and all(p.exists() for p in node.outputs)
                and json.loads(stamp.read_text()).get("digest") == digest):
            report.skipped_up_to_date.append(node.key)
            status[node.key] = "ok"
            continue
        stamp.unlink(missing_ok=True)
        tmp = state_dir / "executing" / f"{node.key}.ipynb"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(NOTEBOOKS / node.notebook), str(tmp), parameters=node.params, kernel_name="python3",
                cwd=str(NOTEBOOKS), progress_bar=False, log_output=False,
                # the kernel's own start-up chatter (a warning that its local TCP sockets are
                # unencrypted) is not the study's business; its errors still show
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
        except Exception as err:  # report and go on with the nodes that do not depend on it
            message = _failure_message(node, err)
            failed = state_dir / "failed" / f"{node.key}.ipynb"
            if tmp.exists():
                failed.parent.mkdir(parents=True, exist_ok=True)
                tmp.replace(failed)
                message += f" (executed notebook: {failed})"
            report.failed[node.key] = message
            status[node.key] = "failed"
            tqdm.write(f"FAILED {message}", file=sys.stderr)
            continue
        _retitle(tmp, node.title)
        executed.parent.mkdir(parents=True, exist_ok=True)
        tmp.replace(executed)
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(json.dumps({"digest": digest, "seconds": round(time.perf_counter() - started, 2),
                                     "params": node.params}, indent=2))
        report.ran.append(node.key)
        status[node.key] = "ok"
    return report


def _sync_book(nodes: list[Node], state_dir: Path, manifest: Manifest, book: Path) -> None:
    generated = book / "generated"
    if generated.exists():
        shutil.rmtree(generated)
    for node in nodes:
        target = generated / f"{node.key}.ipynb"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(state_dir / "executed" / f"{node.key}.ipynb", target)
    source = manifest.data.source
    data = (f"the digital twin, profile `{manifest.synthetic.profile}`, seed {manifest.synthetic.seed}, "
            f"image share {manifest.synthetic.image_share:g}") if source == "synthetic" else "a real OMOP CDM database"
    lines = ["# About this build", "", f"This book was built from {data}.", "",
             "| task | notebook runs |", "|---|---|"]
    for task in TASKS:
        count = sum(1 for n in nodes if n.labels.get("task") == task)
        lines.append(f"| {task} | {count} |")
    lines += ["", "Every page below was executed by papermill from the notebooks in `notebooks/` with the "
              "parameters shown in its injected-parameters cell."]
    (generated / "about.md").write_text("\n".join(lines) + "\n")
    (generated / "_toc.yml").write_text(yaml.safe_dump(_toc(nodes), sort_keys=False))


def _toc(nodes: list[Node]) -> dict:
    """The book's table of contents for the notebooks that ran: written at each build, so a
    book of part of the grid (``--only``) has no dangling entries."""
    parts = [{"caption": "The study", "chapters": [{"file": "generated/about"}]
              + [{"file": f"generated/{n.key}"} for n in nodes if "task" not in n.labels]}]
    for task, spec in TASKS.items():
        chapters = [{"file": f"generated/{n.key}"} for n in nodes if n.labels.get("task") == task]
        if chapters:
            parts.append({"caption": f"{spec.title} ({task.upper()})", "chapters": chapters})
    return {"format": "jb-book", "root": "intro", "parts": parts}


def build_book(book: Path = BOOK) -> Path:
    """Build the Jupyter Book (1.x) with ``-W -n --keep-going``: any warning fails the build.
    The table of contents is ``generated/_toc.yml``, written by the runner. Returns the path
    of the built ``index.html``."""
    exe = Path(sys.executable).parent / "jupyter-book"
    command = [str(exe) if exe.exists() else "jupyter-book", "build", str(book), "--toc", str(book / "generated" / "_toc.yml"),
               "-W", "-n", "--keep-going", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"jupyter-book build {book} failed (exit {result.returncode}):\n{tail}")
    return book / "_build" / "html" / "index.html"


def run_study(manifest_path: Path, *, profile: str | None = None, only: str | None = None,
              force: bool = False, progress: bool = True, book: Path = BOOK, build: bool = True,
              sweep_shares: str | None = SWEEP_SHARES) -> StudyReport:
    """Run the whole study (``python -m helpers study``)."""
    manifest = load_manifest(manifest_path)
    if profile is not None:
        manifest = manifest.with_profile(profile)
    effective = dump(manifest, manifest.run_root / "manifest.yaml")
    nodes = plan(manifest, effective, parse_only(only), sweep_shares=sweep_shares)
    state_dir = manifest.run_root / "study"
    report = run_nodes(nodes, state_dir, force=force, progress=progress)
    if report.ok and build:
        _sync_book(nodes, state_dir, manifest, book)
        report.book = build_book(book)
    return report
