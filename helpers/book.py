"""The book: the executed notebooks of one run of the workflow, a table of contents of what
ran, the reproducibility chapter with the workflow's rule graph, and the Jupyter Book build.

The Snakefile's last rule calls ``sync_book`` then ``build_book``; nothing here runs a
notebook.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import nbformat
import yaml

from helpers.manifest import Manifest
from helpers.tasks import STRATEGIES, TASKS, UNIMODAL_IMAGE

__all__ = ["page_title", "sync_book", "build_book", "parse_rulegraph", "rulegraph_figure", "PARAMETER_TAG"]

PARAMETER_TAG = "injected-parameters"
_STAGES = {"00_twin": 0, "01_cohort": 1, "02_pretrain": 2, "02_embeddings": 3, "03_train": 4, "04_compare": 5,
           "05_saliency": 6, "06_mechanism": 7, "05_results": 8, "06_imbalance": 9}


def page_title(relative: Path) -> str:
    """The book's title of an executed notebook, from its place under ``notebooks/``.

    >>> page_title(Path("pe/03_train/onehot/concat/seed-1.ipynb"))
    'Training: PE, Concatenation (onehot), seed 1'
    >>> page_title(Path("mace/02_embeddings/image-randconv.ipynb"))
    'Embeddings (image, randconv): MACE'
    >>> page_title(Path("mace/05_saliency/onehot/cross_attention/seed-0.ipynb"))
    'Saliency: MACE, Cross-attention (onehot) against image only'
    >>> page_title(Path("pe/06_mechanism/seed-3.ipynb"))
    'Mechanism study: PE, twin seed 3'
    >>> page_title(Path("results/05_results.ipynb"))
    'Results: Table 1'
    """
    parts = relative.with_suffix("").parts
    if parts[0] == "results":
        return {"05_results": "Results: Table 1", "06_imbalance": "Fusion under modality imbalance"}[parts[1]]
    task, stage, rest = parts[0], parts[1], parts[2:]
    title = TASKS[task].title
    if stage == "00_twin":
        return f"The digital twin: {title}"
    if stage == "01_cohort":
        return f"Cohort: {title}"
    if stage == "02_pretrain":
        return f"Pretraining {rest[0]}: {task.upper()}"
    if stage == "02_embeddings":
        modality, encoder = rest[0].split("-", 1)
        return f"Embeddings ({modality}, {encoder}): {task.upper()}"
    if stage == "03_train":
        ehr_repr, fusion, seed = rest
        label = STRATEGIES[fusion].label + ("" if ehr_repr == UNIMODAL_IMAGE else f" ({ehr_repr})")
        return f"Training: {task.upper()}, {label}, seed {seed.removeprefix('seed-')}"
    if stage == "04_compare":
        return f"Comparison: {title}"
    if stage == "05_saliency":
        ehr_repr, fusion, _ = rest
        return f"Saliency: {task.upper()}, {STRATEGIES[fusion].label} ({ehr_repr}) against image only"
    if stage == "06_mechanism":
        return f"Mechanism study: {task.upper()}, twin seed {rest[0].removeprefix('seed-')}"
    raise ValueError(f"{relative}: not a notebook of the study")


def _order(relative: Path) -> tuple:
    parts = relative.with_suffix("").parts
    task_rank = list(TASKS).index(parts[0]) if parts[0] in TASKS else len(TASKS)
    return (task_rank, _STAGES.get(parts[1], 99), parts[2:])


def _prepare(source: Path, target: Path, title: str) -> None:
    """Copy an executed notebook for the book: its first heading becomes ``title``."""
    nb = nbformat.read(source, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("# "):
            lines = cell.source.lstrip().split("\n")
            lines[0] = f"# {title}"
            cell.source = "\n".join(lines)
            break
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)


def sync_book(root: Path, book: Path, notebooks: Sequence[Path], manifest: Manifest, *,
              rulegraph: str | None = None) -> Path:
    """Write ``book/generated``: the executed ``notebooks`` (all under ``root/notebooks``) with
    titles, an about page, the reproducibility chapter (with the rule graph drawn from
    ``rulegraph``, Snakemake's ``--rulegraph`` output, when given) and ``_toc.yml`` listing
    exactly these pages. Returns the table of contents' path."""
    generated = Path(book) / "generated"
    if generated.exists():
        shutil.rmtree(generated)
    generated.mkdir(parents=True)
    base = Path(root) / "notebooks"
    pages = sorted((Path(p).resolve().relative_to(base.resolve()) for p in notebooks), key=_order)
    for relative in pages:
        _prepare(base / relative, generated / relative, page_title(relative))
    if manifest.data.source == "synthetic":
        s = manifest.synthetic
        data = (f"the digital twin, profile `{s.profile}`, seed {s.seed}, image share {s.image_share:g}, "
                f"interaction {s.interaction:g}")
    else:
        data = f"real data (`{manifest.data.source}`)"
    lines = ["# About this build", "", f"This book was built from {data}.", "", "| part | notebook runs |", "|---|---|"]
    for task in TASKS:
        count = sum(1 for p in pages if p.parts[0] == task)
        if count:
            lines.append(f"| {task} | {count} |")
    lines.append(f"| results | {sum(1 for p in pages if p.parts[0] == 'results')} |")
    lines += ["", "Every page below was executed by papermill from the notebooks in `notebooks/` with the "
              "parameters shown in its injected-parameters cell (paths relative to the repository)."]
    (generated / "about.md").write_text("\n".join(lines) + "\n")
    _reproducibility(generated, rulegraph, len(pages))
    toc = generated / "_toc.yml"
    toc.write_text(yaml.safe_dump(_toc(pages), sort_keys=False))
    return toc


def _toc(pages: list[Path]) -> dict:
    study = [{"file": "generated/about"}, {"file": "generated/reproducibility"}]
    study += [{"file": f"generated/{p.with_suffix('').as_posix()}"} for p in pages if p.parts[0] == "results"]
    parts = [{"caption": "The study", "chapters": study}]
    for task, spec in TASKS.items():
        chapters = [{"file": f"generated/{p.with_suffix('').as_posix()}"} for p in pages if p.parts[0] == task]
        if chapters:
            parts.append({"caption": f"{spec.title} ({task.upper()})", "chapters": chapters})
    return {"format": "jb-book", "root": "intro", "parts": parts}


def _reproducibility(generated: Path, rulegraph: str | None, n_pages: int) -> None:
    lines = [
        "# Reproducibility", "",
        "The study is a Snakemake workflow (`Snakefile`) whose rules are the notebooks: each rule runs one",
        "notebook with papermill, with the parameters shown at the top of its page, so a rule is exactly",
        "the command you would type. Every setting of the digital twin (profile, image share, interaction,",
        "seed) is a folder of its own; the mechanism study runs the same entry points at a grid of",
        "settings, one job per task and twin seed (`helpers.mechanism`).", "",
        "```bash",
        "make study                                   # snakemake --cores all, then this book",
        "make study PROFILE=quick                     # the teaching twin (a few minutes)",
        ".venv/bin/snakemake -n --config profile=quick # what would run, without running it",
        ".venv/bin/snakemake --profile workflow/profiles/slurm   # on a SLURM cluster",
        "```", "",
        "An interrupted run resumes where it stopped: Snakemake reruns a notebook when its output is",
        "missing or older than an input (the notebook, its inputs, the library code). A failure names",
        "the rule, its wildcards and the papermill command, and keeps the executed notebook with the",
        "failing cell next to where its output would have been (`.failed.ipynb`).", "",
        f"This book holds {n_pages} executed notebooks.", "",
    ]
    if rulegraph:
        nodes, edges = parse_rulegraph(rulegraph)
        # every rule reads its setting's manifest and ``all`` only collects: drawn, they hide the rest
        hidden = {k for k, name in nodes.items() if name in ("manifest", "all")}
        nodes = {k: v for k, v in nodes.items() if k not in hidden}
        edges = [(a, b) for a, b in edges if a not in hidden and b not in hidden]
        fig = rulegraph_figure(nodes, edges)
        fig.savefig(generated / "rulegraph.svg", bbox_inches="tight")
        import matplotlib.pyplot as plt

        plt.close(fig)
        lines += ["## The rule graph", "",
                  "The workflow's rules and their dependencies: an arrow points from a rule to one that reads",
                  "its output. Every rule also reads its setting's manifest (rule `manifest`), and rule `all`",
                  "asks for the book. Each notebook run (a task, a training run, a setting) is one job of",
                  "these rules.", "",
                  "![The workflow's rule graph](rulegraph.svg)", ""]
    (generated / "reproducibility.md").write_text("\n".join(lines) + "\n")


def parse_rulegraph(dot: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Nodes (id -> rule name) and edges (from id, to id) of Snakemake's ``--rulegraph`` output.

    >>> parse_rulegraph('digraph { 0[label = "all"]; 1[label = "twin"]; 1 -> 0 }')
    ({'0': 'all', '1': 'twin'}, [('1', '0')])
    """
    nodes = {m.group(1): m.group(2) for m in re.finditer(r"(\d+)\s*\[[^\]]*label\s*=\s*\"([^\"]+)\"", dot)}
    edges = [(m.group(1), m.group(2)) for m in re.finditer(r"(\d+)\s*->\s*(\d+)", dot)]
    return nodes, edges


def rulegraph_figure(nodes: dict[str, str], edges: list[tuple[str, str]]):
    """A layered drawing of the rule graph: each rule at the depth of its longest chain of
    inputs, arrows from producer to consumer. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    parents: dict[str, list[str]] = {n: [] for n in nodes}
    for a, b in edges:
        parents.setdefault(b, []).append(a)
    depth: dict[str, int] = {}

    def level(n: str, seen: tuple = ()) -> int:
        if n not in depth:
            depth[n] = 0 if not parents.get(n) else 1 + max(level(p, seen + (n,)) for p in parents[n] if p not in seen)
        return depth[n]

    for n in nodes:
        level(n)
    layers: dict[int, list[str]] = {}
    for n in sorted(nodes, key=lambda k: (depth[k], nodes[k])):
        layers.setdefault(depth[n], []).append(n)
    width = max(len(v) for v in layers.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 2.2 * width), 1.1 * len(layers) + 0.6))
    pos = {}
    for d, members in layers.items():
        for k, n in enumerate(members):
            pos[n] = ((k + 0.5) * width / len(members), -d)
    for a, b in edges:
        skip = depth[b] - depth[a] > 1  # an edge past a layer bends, so that it is not hidden behind the chain
        ax.annotate("", xy=pos[b], xytext=pos[a],
                    arrowprops={"arrowstyle": "-|>", "color": "0.45", "lw": 1.0, "shrinkA": 12, "shrinkB": 12,
                                "connectionstyle": f"arc3,rad={0.25 + 0.05 * (depth[b] - depth[a]) if skip else 0}"})
    for n, (x, y) in pos.items():
        ax.text(x, y, nodes[n], ha="center", va="center", fontsize=9,
                bbox={"boxstyle": "round,pad=0.4", "fc": "#e8f0fe", "ec": "#3367d6"})
    ax.set_xlim(-0.2, width + 0.2)
    ax.set_ylim(-max(layers) - 0.6, 0.6)
    ax.axis("off")
    return fig


def build_book(book: Path) -> Path:
    """Build the Jupyter Book (1.x) with ``-W -n --keep-going``: any warning fails the build.
    The table of contents is ``generated/_toc.yml``. Returns the built ``index.html``."""
    book = Path(book).resolve()
    exe = Path(sys.executable).parent / "jupyter-book"
    command = [str(exe) if exe.exists() else "jupyter-book", "build", str(book), "--toc",
               str(Path(book) / "generated" / "_toc.yml"), "-W", "-n", "--keep-going", "--quiet"]
    result = subprocess.run(command, capture_output=True, text=True,
                            env={**os.environ, "PYDEVD_DISABLE_FILE_VALIDATION": "1"})
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-30:])
        raise RuntimeError(f"jupyter-book build {book} failed (exit {result.returncode}):\n{tail}")
    return Path(book) / "_build" / "html" / "index.html"
