# The study's workflow: every rule is one notebook executed by papermill with its parameters,
# exactly the command a user would type (snakemake -p prints it).
#
#   snakemake --cores all                           the study at the manifest's setting, then the book
#   snakemake --cores all --config profile=quick    the quick twin
#   snakemake -n                                    what would run (a dry run)
#   snakemake --profile workflow/profiles/slurm     on a SLURM cluster (see README)
#
# Every output of a setting of the twin lives under <output_dir>/<root>, where <root> is the
# setting's label (helpers.tasks.Setting: <profile>/share-<s>_interaction-<k>_seed-<n>) or
# real/<source> for real data. The mechanism study (helpers.mechanism) writes its settings under
# <output_dir>/<profile>/sweep/, one job per task and twin seed.
#
# Config (--config key=value): manifest (default data_manifest.yaml), profile (tiny, quick,
# paper; default the manifest's), device (cpu or cuda for the encoders), probe_encoders (1 to
# also extract and probe the manifest's other image encoders, 0 not to; default the
# profile's), and to restrict the grid: tasks, ehr_reprs, fusions (comma-separated names of
# helpers.tasks), mechanism (0 to skip the mechanism study), book (0 to skip the book).

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from helpers.cohort import MEDS_KINDS
from helpers.manifest import PRETRAINED_KINDS, dump
from helpers.manifest import load as load_manifest
from helpers.mechanism import result_path, tuning_path
from helpers.tasks import (
    EHR_REPRS,
    FUSIONS,
    PROFILES,
    TASKS,
    UNIMODAL_IMAGE,
    ParameterError,
    Setting,
    get_strategy,
    grid_runs,
)

REPO = Path(workflow.basedir).resolve()
# Shell commands find the tools (papermill, jupyter-book) of the environment Snakemake runs in.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def _names(key, allowed):
    """A comma-separated config value checked against the registry (all of them by default)."""
    value = config.get(key)
    if value in (None, ""):
        return tuple(allowed)
    names = tuple(v.strip() for v in str(value).split(",") if v.strip())
    unknown = [v for v in names if v not in allowed]
    if unknown:
        raise ParameterError(f"--config {key}: unknown value(s) {', '.join(unknown)}; expected some of {', '.join(allowed)}")
    return tuple(n for n in allowed if n in names)


def _rel(path):
    """``path`` relative to the working directory (the repository for ``make study``) when it
    is inside it, so that no page of the book shows a path of the machine that built it."""
    path, here = Path(path).resolve(), Path.cwd().resolve()
    return path.relative_to(here).as_posix() if path.is_relative_to(here) else path.as_posix()


NOTEBOOKS = _rel(REPO / "notebooks")
BOOK_DIR = str(config.get("book_dir", _rel(REPO / "book")))


MANIFEST_FILE = config.get("manifest", "data_manifest.yaml")
BASE = load_manifest(MANIFEST_FILE)
if config.get("profile"):
    BASE = BASE.with_profile(str(config["profile"]))
SYNTHETIC = BASE.data.source == "synthetic"
OUT = _rel(BASE.output_dir)
MAIN = BASE.root_label
PROFILE = PROFILES[BASE.synthetic.profile] if SYNTHETIC else PROFILES["paper"]
DEVICE = str(config.get("device", "cpu"))
# the tasks the data holds: INSPECT is a PE cohort; an OMOP source declares a CT archive per task
DATA_TASKS = ("pe",) if BASE.data.source == "inspect" else \
    tuple(t for t in TASKS if t in BASE.data.omop.imaging) if BASE.data.source == "omop" else tuple(TASKS)
GRID_TASKS = _names("tasks", DATA_TASKS)
GRID_REPRS = _names("ehr_reprs", EHR_REPRS)
GRID_FUSIONS = _names("fusions", FUSIONS)
IMAGE_ENCODERS = tuple(BASE.encoders.image)
if not IMAGE_ENCODERS:
    raise ValueError(f"{BASE.path}: encoders.image: the study needs at least one image encoder")
FUSION_IMAGE = IMAGE_ENCODERS[0]  # the image encoder of the fusion models; the others are probed
absent = [r for r in GRID_REPRS if r not in BASE.encoders.ehr]
if absent:
    raise ValueError(f"{BASE.path}: encoders.ehr: the study grid needs {', '.join(absent)} "
                     f"(declared: {', '.join(BASE.encoders.ehr) or 'none'})")

# The mechanism study (helpers.mechanism): every strategy at a grid of the twin's settings, one
# job per task and twin seed (the manifest's seed and the next ones), each writing one folder per
# setting under <output_dir>/<profile>/sweep/.
MECHANISM_SEEDS = ()
if SYNTHETIC and str(config.get("mechanism", "1")) != "0" and PROFILE.mechanism_twin_seeds:
    MECHANISM_SEEDS = tuple(BASE.synthetic.seed + i for i in range(PROFILE.mechanism_twin_seeds))
# the twin seeds whose tuning-setting models are also scored under the site shifts
SHIFT_SEEDS = MECHANISM_SEEDS[:PROFILE.mechanism_shift_seeds] if PROFILE.mechanism_shifts else ()
MECHANISM_KAPPAS = tuple(dict.fromkeys(m * BASE.synthetic.interaction for m in PROFILE.mechanism_interactions)) \
    if SYNTHETIC else ()


def mechanism_result(task, twin_seed):
    return _rel(result_path(BASE.output_dir, PROFILE.mechanism_profile, task, twin_seed))


def mechanism_tuning(task, twin_seed):
    return _rel(tuning_path(BASE.output_dir, PROFILE.mechanism_profile, task, twin_seed))


def tuned_at(wildcards):
    """The first twin seed chooses each strategy's penalty on its validation split; the
    others keep its choices (helpers.mechanism.MechanismSpec.tuned_at)."""
    first = MECHANISM_SEEDS[0]
    return [] if int(wildcards.twin_seed) == first else [mechanism_tuning(wildcards.task, first)]


def manifest_for(root):
    """The manifest of a root: the study's own, or the study's at another twin setting."""
    if root == MAIN:
        return BASE
    if not SYNTHETIC:
        raise ValueError(f"{root}: only {MAIN} exists for data.source {BASE.data.source!r}")
    return BASE.with_setting(Setting.from_label(root))


def grid(root):
    """(ehr_repr, fusion, seed) of the runs trained at ``root``: the study's grid with its
    profile's seeds."""
    return grid_runs(GRID_REPRS, GRID_FUSIONS, _profile(root).seeds)


def _profile(root):
    """The profile a root was made with (real data: the paper's grid)."""
    if not SYNTHETIC or root == MAIN:
        return PROFILE
    return PROFILES[Setting.from_label(root).profile]


def _probe_encoders(root):
    """Whether ``root`` also extracts the manifest's other image encoders: ``--config
    probe_encoders=1`` (or 0) overrides the profile's setting."""
    value = str(config.get("probe_encoders", "")).strip()
    if value not in ("", "0", "1"):
        raise ParameterError(f"--config probe_encoders: expected 0 or 1, got {value!r}")
    return _profile(root).probe_encoders if value == "" else value == "1"


def image_encoders(root):
    """The image encoders extracted at ``root``: the fusion models' own, and where it probes
    encoders (``_probe_encoders``) the manifest's others."""
    return IMAGE_ENCODERS if _probe_encoders(root) else (FUSION_IMAGE,)


def ehr_encoders(root):
    return tuple(dict.fromkeys(r for r, _, _ in grid(root) if r != UNIMODAL_IMAGE))


# The library code every notebook runs: a change to it reruns the notebooks. The digest file is
# rewritten only when the code changes, so Snakemake sees a new input exactly then.
CODE = f"{OUT}/.code/helpers.sha256"


def _code_digest():
    digest = hashlib.sha256()
    for path in sorted((REPO / "helpers").rglob("*.py")):
        if path.name in ("__main__.py", "book.py"):
            continue  # the command line and the book's assembly do not change what a notebook computes
        digest.update(path.relative_to(REPO).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


_digest = _code_digest()
_code_path = Path(CODE)
if not _code_path.is_file() or _code_path.read_text().strip() != _digest:
    _code_path.parent.mkdir(parents=True, exist_ok=True)
    _code_path.write_text(_digest + "\n")


def papermill(notebook, executed, **parameters):
    """The command that runs ``notebooks/<notebook>`` with ``parameters`` into ``executed``.
    The notebook is written next to its final name while it runs; a failed one stays there
    (``.failed.ipynb``) with the error in its failing cell."""
    args = " ".join(f"-p {k} {v!r}" if isinstance(v, str) else f"-p {k} {v}" for k, v in parameters.items())
    failed = executed.replace(".ipynb", ".failed.ipynb")
    return (f"papermill {NOTEBOOKS}/{notebook} {failed} {args} -k python3 --no-progress-bar --log-level ERROR"
            f" && mv {failed} {executed}"
            f" || {{ echo \"notebook failed: {NOTEBOOKS}/{notebook} ({args}); the executed notebook with the error is {failed}\" >&2; exit 1; }}")


def _write_if_changed(path, text):
    """Write ``text`` to ``path`` unless it already holds it (so that its age changes only
    when its content does)."""
    path = Path(path)
    if path.is_file() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _manifest_text(root):
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        return dump(manifest_for(root), Path(tmp) / "manifest.yaml").read_text()


# The manifest of the study's root is written now, and rewritten only when it changes.
_write_if_changed(f"{OUT}/{MAIN}/manifest.yaml", _manifest_text(MAIN))


R = f"{OUT}/{{root}}"
NB = f"{R}/notebooks"

wildcard_constraints:
    root=r"[^/]+/[^/]+",
    task="|".join(TASKS),
    modality="image|ehr",
    encoder=r"[A-Za-z0-9_]+",
    ehr_repr="|".join(EHR_REPRS + (UNIMODAL_IMAGE,)),
    fusion="|".join(FUSIONS),
    seed=r"\d+",


def main_targets():
    """The executed notebooks of the study's own root, in the book's order."""
    nb = f"{OUT}/{MAIN}/notebooks"
    targets = []
    for task in GRID_TASKS:
        if SYNTHETIC:
            targets.append(f"{nb}/{task}/00_twin.ipynb")
        targets.append(f"{nb}/{task}/01_cohort.ipynb")
        for modality, names in (("image", image_encoders(MAIN)), ("ehr", ehr_encoders(MAIN))):
            for name in names:
                if _pretrained(BASE, modality, name):
                    targets.append(f"{nb}/{task}/02_pretrain/{name}.ipynb")
                targets.append(f"{nb}/{task}/02_embeddings/{modality}-{name}.ipynb")
        targets += [f"{nb}/{task}/03_train/{r}/{f}/seed-{s}.ipynb" for r, f, s in grid(MAIN)]
        targets.append(f"{nb}/{task}/04_compare.ipynb")
        targets += [f"{nb}/{task}/05_saliency/{r}/{f}/seed-{s}.ipynb" for r, f, s in saliency_runs()]
        targets += [f"{nb}/{task}/06_mechanism/seed-{n}.ipynb" for n in MECHANISM_SEEDS]
    targets.append(f"{nb}/results/05_results.ipynb")
    if MECHANISM_SEEDS:
        targets.append(f"{nb}/results/06_imbalance.ipynb")
    return targets


def saliency_runs():
    """(ehr_repr, fusion, seed) of the saliency notebooks: the profile's saliency fusions in the
    grid, each against image-only, for the grid's first EHR representation and seed."""
    if "image_only" not in GRID_FUSIONS:
        return []
    fusions = [f for f in GRID_FUSIONS if f in PROFILE.saliency_fusions]
    return [(GRID_REPRS[0], f, PROFILE.seeds[0]) for f in fusions]


def _pretrained(manifest, modality, name):
    """Whether the study pretrains encoder ``name`` itself (a built-in foundation model whose
    manifest entry names no checkpoint)."""
    entry = getattr(manifest.encoders, modality)[name]
    return entry.kind in PRETRAINED_KINDS and entry.path is None


BOOK = f"{BOOK_DIR}/_build/html/index.html"


rule all:
    input:
        BOOK if str(config.get("book", "1")) != "0" else main_targets(),


rule manifest:
    """The manifest of a root this run did not write at start (another setting of the twin,
    asked for as a target)."""
    output:
        f"{R}/manifest.yaml",
    run:
        _write_if_changed(output[0], _manifest_text(wildcards.root))


rule twin:
    input:
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/00_twin.ipynb",
        code=CODE,
    output:
        twin=f"{R}/twin/{{task}}/twin.json",
        notebook=f"{NB}/{{task}}/00_twin.ipynb",
    params:
        cmd=lambda wc, input, output: papermill("00_twin.ipynb", output.notebook, task=wc.task, manifest=input.manifest),
    shell:
        "{params.cmd}"


def _source(wc):
    return [f"{OUT}/{wc.root}/twin/{wc.task}/twin.json"] if manifest_for(wc.root).data.source == "synthetic" else []


def _needs_meds(root):
    """Whether a root trains on an EHR encoder that reads MEDS timelines (CLMBR)."""
    ehr = manifest_for(root).encoders.ehr
    return any(ehr[name].kind in MEDS_KINDS for name in ehr_encoders(root) if name in ehr)


rule cohort:
    input:
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/01_cohort.ipynb",
        code=CODE,
        source=_source,
    output:
        cohort=f"{R}/cohorts/{{task}}.parquet",
        notebook=f"{NB}/{{task}}/01_cohort.ipynb",
    params:
        cmd=lambda wc, input, output: papermill("01_cohort.ipynb", output.notebook, task=wc.task, manifest=input.manifest,
                                                meds=_needs_meds(wc.root)),
    shell:
        "{params.cmd}"


def _gpu(wc):
    return 1 if DEVICE.startswith("cuda") else 0


rule pretrain:
    input:
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/02_pretrain.ipynb",
        code=CODE,
        cohort=f"{R}/cohorts/{{task}}.parquet",
    output:
        checkpoint=f"{R}/checkpoints/{{task}}/{{encoder}}.json",
        notebook=f"{NB}/{{task}}/02_pretrain/{{encoder}}.ipynb",
    resources:
        gpu=_gpu,
    params:
        cmd=lambda wc, input, output: papermill("02_pretrain.ipynb", output.notebook, task=wc.task, encoder=wc.encoder,
                                                manifest=input.manifest),
    shell:
        "{params.cmd}"


def _checkpoint(wc):
    manifest = manifest_for(wc.root)
    if _pretrained(manifest, wc.modality, wc.encoder):
        return [f"{OUT}/{wc.root}/checkpoints/{wc.task}/{wc.encoder}.json"]
    return []


rule embeddings:
    input:
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/02_embeddings.ipynb",
        code=CODE,
        cohort=f"{R}/cohorts/{{task}}.parquet",
        checkpoint=_checkpoint,
    output:
        table=f"{R}/embeddings/{{task}}/{{modality}}-{{encoder}}.parquet",
        notebook=f"{NB}/{{task}}/02_embeddings/{{modality}}-{{encoder}}.ipynb",
    resources:
        gpu=_gpu,
    params:
        cmd=lambda wc, input, output: papermill("02_embeddings.ipynb", output.notebook, task=wc.task, modality=wc.modality,
                                                encoder=wc.encoder, device=DEVICE, batch_size=16, manifest=input.manifest),
    shell:
        "{params.cmd}"


def _train_inputs(wc):
    strategy = get_strategy(wc.fusion)
    inputs = {}
    if strategy.uses_image:
        inputs["image"] = f"{OUT}/{wc.root}/embeddings/{wc.task}/image-{FUSION_IMAGE}.parquet"
    if strategy.uses_ehr:
        inputs["ehr"] = f"{OUT}/{wc.root}/embeddings/{wc.task}/ehr-{wc.ehr_repr}.parquet"
    return inputs


def _train_command(wc, input, output):
    strategy = get_strategy(wc.fusion)
    return papermill(
        "03_train.ipynb", output.notebook, task=wc.task, ehr_repr=wc.ehr_repr, fusion=wc.fusion, seed=int(wc.seed),
        cohort_path=input.cohort, image_embeddings=input.image if strategy.uses_image else "",
        ehr_embeddings=input.ehr if strategy.uses_ehr else "", output_dir=str(Path(output.metrics).parent),
        manifest=input.manifest)


rule train:
    input:
        unpack(_train_inputs),
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/03_train.ipynb",
        code=CODE,
        cohort=f"{R}/cohorts/{{task}}.parquet",
    output:
        metrics=f"{R}/runs/{{task}}/{{ehr_repr}}/{{fusion}}/seed-{{seed}}/metrics.json",
        notebook=f"{NB}/{{task}}/03_train/{{ehr_repr}}/{{fusion}}/seed-{{seed}}.ipynb",
    params:
        cmd=_train_command,
    shell:
        "{params.cmd}"


def _runs(wc):
    return [f"{OUT}/{wc.root}/runs/{wc.task}/{r}/{f}/seed-{s}/metrics.json" for r, f, s in grid(wc.root)]


rule compare:
    input:
        runs=_runs,
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/04_compare.ipynb",
        code=CODE,
    output:
        cindex=f"{R}/comparisons/{{task}}/cindex.csv",
        notebook=f"{NB}/{{task}}/04_compare.ipynb",
    params:
        cmd=lambda wc, input, output: papermill(
            "04_compare.ipynb", output.notebook, task=wc.task, runs_dir=f"{OUT}/{wc.root}/runs", n_boot=1000,
            manifest=input.manifest),
    shell:
        "{params.cmd}"


rule saliency:
    """Saliency maps of a fusion run against the image-only run of the same seed, and on the
    twin their localisation on the lesion masks."""
    input:
        manifest=f"{R}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/05_saliency.ipynb",
        code=CODE,
        cohort=f"{R}/cohorts/{{task}}.parquet",
        source=_source,
        reference=f"{R}/runs/{{task}}/{UNIMODAL_IMAGE}/image_only/seed-{{seed}}/metrics.json",
        run=f"{R}/runs/{{task}}/{{ehr_repr}}/{{fusion}}/seed-{{seed}}/metrics.json",
    output:
        record=f"{R}/saliency/{{task}}/{{ehr_repr}}/{{fusion}}/seed-{{seed}}/saliency.json",
        notebook=f"{NB}/{{task}}/05_saliency/{{ehr_repr}}/{{fusion}}/seed-{{seed}}.ipynb",
    resources:
        gpu=_gpu,
    params:
        cmd=lambda wc, input, output: papermill(
            "05_saliency.ipynb", output.notebook, task=wc.task, fusion=wc.fusion, ehr_repr=wc.ehr_repr,
            seed=int(wc.seed), n_cases=PROFILE.saliency_cases, method=PROFILE.saliency_method,
            runs_dir=f"{OUT}/{wc.root}/runs", output_dir=str(Path(output.record).parent), device=DEVICE,
            manifest=input.manifest),
    shell:
        "{params.cmd}"


rule results:
    input:
        tables=expand(f"{OUT}/{MAIN}/comparisons/{{task}}/cindex.csv", task=GRID_TASKS),
        saliency=[f"{OUT}/{MAIN}/saliency/{t}/{r}/{f}/seed-{s}/saliency.json" for t in GRID_TASKS
                  for r, f, s in saliency_runs()],
        manifest=f"{OUT}/{MAIN}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/05_results.ipynb",
        code=CODE,
    output:
        table=f"{OUT}/{MAIN}/comparisons/table1.csv",
        notebook=f"{OUT}/{MAIN}/notebooks/results/05_results.ipynb",
    params:
        cmd=lambda wc, input, output: papermill("05_results.ipynb", output.notebook, runs_dir=f"{OUT}/{MAIN}/runs",
                                                saliency_dir=f"{OUT}/{MAIN}/saliency", manifest=input.manifest),
    shell:
        "{params.cmd}"


rule mechanism:
    """The mechanism study for one task and twin seed: every strategy at every setting of the
    grid (helpers.mechanism), into <output_dir>/<profile>/sweep/<setting>/."""
    input:
        manifest=f"{OUT}/{MAIN}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/06_mechanism.ipynb",
        code=CODE,
        tuned_at=tuned_at,
    output:
        record=f"{OUT}/{PROFILE.mechanism_profile}/sweep/mechanism-{{task}}-seed-{{twin_seed}}.csv",
        tuning=f"{OUT}/{PROFILE.mechanism_profile}/sweep/tuning-{{task}}-seed-{{twin_seed}}.csv",
        notebook=f"{OUT}/{MAIN}/notebooks/{{task}}/06_mechanism/seed-{{twin_seed}}.ipynb",
    wildcard_constraints:
        twin_seed=r"\d+",
    params:
        cmd=lambda wc, input, output: papermill(
            "06_mechanism.ipynb", output.notebook, task=wc.task, twin_seed=int(wc.twin_seed),
            profile=PROFILE.mechanism_profile, shares=",".join(f"{s:g}" for s in PROFILE.mechanism_shares),
            interactions=",".join(f"{k:g}" for k in MECHANISM_KAPPAS), fusions=",".join(GRID_FUSIONS),
            shifts=",".join(PROFILE.mechanism_shifts) if int(wc.twin_seed) in SHIFT_SEEDS else "",
            shift_studies=PROFILE.mechanism_shift_studies, tuned_at=input.tuned_at[0] if input.tuned_at else "",
            manifest=input.manifest),
    shell:
        "{params.cmd}"


rule imbalance:
    input:
        records=[mechanism_result(t, n) for t in GRID_TASKS for n in MECHANISM_SEEDS],
        manifest=f"{OUT}/{MAIN}/manifest.yaml",
        notebook=f"{NOTEBOOKS}/06_imbalance.ipynb",
        code=CODE,
    output:
        table=f"{OUT}/{MAIN}/imbalance/mechanism.csv",
        notebook=f"{OUT}/{MAIN}/notebooks/results/06_imbalance.ipynb",
    params:
        cmd=lambda wc, input, output: papermill(
            "06_imbalance.ipynb", output.notebook, manifest=input.manifest, profile=PROFILE.mechanism_profile,
            shares=",".join(f"{s:g}" for s in PROFILE.mechanism_shares),
            interactions=",".join(f"{k:g}" for k in MECHANISM_KAPPAS),
            twin_seeds=",".join(map(str, MECHANISM_SEEDS)), tasks=",".join(GRID_TASKS), fusions=",".join(GRID_FUSIONS),
            shifts=",".join(PROFILE.mechanism_shifts), shift_seeds=",".join(map(str, SHIFT_SEEDS)),
            out_dir=str(Path(output.table).parent)),
    shell:
        "{params.cmd}"


rule book:
    """The book: every executed notebook of the study's own root, in the order of the study,
    with a table of contents of what ran; any Sphinx warning fails it."""
    input:
        notebooks=main_targets(),
        intro=f"{BOOK_DIR}/intro.md",
        config=f"{BOOK_DIR}/_config.yml",
    output:
        BOOK,
    params:
        root=f"{OUT}/{MAIN}",
    run:
        from helpers.book import build_book, sync_book

        overrides = [f"{k}={v}" for k, v in config.items()]
        graph = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(workflow.main_snakefile),
                                "--rulegraph", "--nolock", "all"] + (["--config", *overrides] if overrides else []),
                               capture_output=True, text=True, check=True).stdout
        sync_book(Path(params.root), Path(BOOK_DIR), [Path(p) for p in input.notebooks], BASE, rulegraph=graph)
        build_book(Path(BOOK_DIR))
