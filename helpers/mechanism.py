"""The mechanism study: every fusion strategy on the digital twin at a grid of its settings.

The paper's claim is that the best fusion strategy depends on the task and on how much each
modality carries. The twin has both as knobs: ``image_share`` (s, the CT's share of the
exclusive information) and ``interaction`` (kappa, the weight of the cross-modal interaction;
see ``helpers.twin``). ``run_mechanism`` trains every strategy at every (s, kappa) of a grid
for one task and one twin seed, with the same entry points as the study's notebooks
(``helpers.cohort.make_cohort``, ``helpers.extract.extract``, ``helpers.training.train_run``,
``helpers.compare.score_runs``), each setting into its own folder
``<output_dir>/<profile>/sweep/share-<s>_interaction-<k>_seed-<n>`` (``helpers.tasks.Setting``),
so that ``helpers.imbalance.collect`` reads them like any other setting.

The CT volumes do not depend on s, kappa or the outcome model (the generator draws the factors
and renders the volumes before, and independently of, the hazard), so they are rendered once
per task and twin seed, at the grid's first setting; every other setting writes its records
and ground truth only (``generate(images=False)``) and links the volumes, after checking that
its imaging index lists the same studies and files. The CTs of the union of the settings'
cohorts (which differ by a few studies: a planted defect is drawn among censored patients) are
encoded once, and every setting links that table. The records, the cohort and the EHR features
are made anew at each setting, because the outcomes are in them.

Every strategy chooses its L2 penalty from ``L2_GRID`` by its validation C at one setting
(``tuning_setting``: s = 0.5 at the default kappa) of the first twin seed, and keeps it at
every setting and twin seed (``MechanismSpec.tuned_at``): the same tuning budget for every
strategy, none of it on test data (``tuning_path`` records the choices). One choice per task
rather than per setting or twin keeps the budget: a grid of three at every setting would
triple the training time. At the tuning setting, the tuning run of the chosen penalty is the
setting's run (copied, not trained again).

The site shifts (``SHIFTS``, ``helpers.twin.records.SITE_SHIFTS``): at the tuning setting,
the models every strategy trained there score the external site under one shift at a time
(its scanner's HU offset, noise or slice thickness; its records' completeness; its lab units),
under none (the external patients, recorded and scanned as at the internal site) and under
all of them (the external site as it is). Each shift is a twin of its own
(``Setting(shift=...)``, under ``<profile>/sweep/..._shift-<name>``) with ``spec.shift_studies``
external studies and a token internal site (the external site does not depend on it); it
renders and encodes the external volumes only where the shift changes the scanner (the others
link those of ``none``). The patients
and their outcomes are the same under every shift, so each shift's effect is a paired
difference on the same studies: ``shift_path`` records each strategy's external C under each
shift and its change from ``none`` with a patient-bootstrap interval.

Why not one Snakemake job per setting and strategy, as the rest of the study: the grid has 15
settings x 7 strategies per task and twin seed; at about 6 s of kernel start-up per notebook
that alone would take longer than the study's whole budget on 2 cores. A setting's folder holds
the same files the notebooks would have written (cohort, embeddings, runs, comparisons).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from helpers.manifest import Manifest
from helpers.tasks import (
    DEFAULT_INTERACTION,
    FUSIONS,
    PROFILES,
    SHIFTS,
    Setting,
    check_choice,
    get_strategy,
    get_task,
)

__all__ = ["SHARES", "INTERACTIONS", "INTERNAL", "PREDICTIONS", "MechanismSpec", "MechanismResult", "settings",
           "run_mechanism", "result_path", "shift_path", "shift_settings", "collect_shifts", "shift_table", "shift_hurts", "SHIFT_LABELS", "SHIFT_PREDICTIONS", "judge_shifts", "shift_figure", "tuning_setting", "tuning_path", "kept_choices", "L2_GRID", "collect", "collect_tuning", "balance", "setting_table", "rank_first", "judge", "mechanism_figure"]

# The grid of the mechanism study.
SHARES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
INTERACTIONS: tuple[float, ...] = (0.0, DEFAULT_INTERACTION, 2 * DEFAULT_INTERACTION)
# The L2 penalties (helpers.training.TrainConfig.l2) each strategy chooses from on validation.
L2_GRID: tuple[float, ...] = (1e-4, 1e-3, 1e-2)


@dataclass(frozen=True)
class MechanismSpec:
    """One task and twin seed of the mechanism study.

    ``manifest``: the study's manifest (the digital twin; its encoders and splits are used).
    ``profile``: the twin's size (``helpers.tasks.PROFILES``, default ``mechanism``).
    ``fusions``: the strategies trained at every setting, all on ``ehr_repr`` with training
    seed ``seed``; ``n_boot``: bootstrap resamples of each C-index interval; ``options``:
    training hyper-parameters for every strategy. ``l2_grid``: each strategy's L2 penalty is
    chosen from these values by its validation C at the tuning setting (``tuning_setting``)
    and kept at every setting, so that every strategy gets the same tuning budget and none is
    tuned on test data; ``()`` keeps ``options`` as they are. ``tuned_at``: the tuning record
    (``tuning_path``) of another twin seed of the same task whose choices this one keeps instead
    of tuning again (the study tunes at its first twin seed; None: tune here). ``shifts``: the external site's
    shifts (``helpers.tasks.SHIFTS``) its models are scored under, at the tuning setting, each
    on a twin with ``shift_studies`` external studies (``()``: none; the first must be
    ``none``, the reference of every shift's change).
    """

    manifest: Manifest
    task: str
    twin_seed: int
    profile: str = "mechanism"
    shares: tuple[float, ...] = SHARES
    interactions: tuple[float, ...] = INTERACTIONS
    fusions: tuple[str, ...] = FUSIONS
    ehr_repr: str = "onehot"
    seed: int = 0
    n_boot: int = 200
    options: dict = field(default_factory=dict)
    l2_grid: tuple[float, ...] = L2_GRID
    tuned_at: Path | None = None
    shifts: tuple[str, ...] = SHIFTS
    shift_studies: int = 400

    def __post_init__(self) -> None:
        get_task(self.task)
        check_choice("profile", self.profile, tuple(PROFILES))
        for fusion in self.fusions:
            get_strategy(fusion)
        if "image_only" not in self.fusions:
            raise ValueError("parameter 'fusions': the mechanism study compares with image_only; include it")
        if self.manifest.data.source != "synthetic":
            raise ValueError(f"{self.manifest.path}: the mechanism study needs the digital twin (data.source: "
                             f"synthetic), got {self.manifest.data.source!r}")
        if not self.shares or not self.interactions:
            raise ValueError("parameters 'shares' and 'interactions': need at least one value each")
        for shift in self.shifts:
            check_choice("shifts", shift, SHIFTS)
        if self.shifts and self.shifts[0] != "none":
            raise ValueError(f"parameter 'shifts': the first must be 'none' (the reference of every shift's change), "
                             f"got {', '.join(self.shifts)}")
        if len(set(self.shifts)) != len(self.shifts):
            raise ValueError(f"parameter 'shifts': a shift is named twice in {', '.join(self.shifts)}")
        if self.shifts and (isinstance(self.shift_studies, bool) or int(self.shift_studies) != self.shift_studies
                            or self.shift_studies < 20):
            raise ValueError(f"parameter 'shift_studies': expected an integer >= 20 external studies, "
                             f"got {self.shift_studies!r}")


def settings(spec: MechanismSpec) -> list[Setting]:
    """The twin settings of ``spec``, shares varying fastest; the first renders the volumes."""
    return [Setting(spec.profile, s, k, spec.twin_seed, sweep=True) for k in spec.interactions for s in spec.shares]


def tuning_setting(grid: list[Setting]) -> int:
    """The index in ``grid`` of the setting the L2 penalties are chosen at: the one nearest to
    s = 0.5 among the largest interactions below the grid's maximum (the default kappa in the
    study's grid), where both modalities and the interaction carry information."""
    kappas = sorted({g.interaction for g in grid})
    kappa = kappas[-2] if len(kappas) > 1 else kappas[0]
    candidates = [k for k, g in enumerate(grid) if g.interaction == kappa]
    return min(candidates, key=lambda k: (abs(grid[k].image_share - 0.5), grid[k].image_share))


def tuning_path(output_dir: str | Path, profile: str, task: str, twin_seed: int) -> Path:
    """The penalties each strategy chose: ``<output_dir>/<profile>/sweep/tuning-<task>-seed-<n>.csv``."""
    return Path(output_dir) / profile / "sweep" / f"tuning-{task}-seed-{int(twin_seed)}.csv"


def shift_path(output_dir: str | Path, profile: str, task: str, twin_seed: int) -> Path:
    """Each strategy's external C under each site shift and its change from ``none``:
    ``<output_dir>/<profile>/sweep/shift-<task>-seed-<n>.csv``."""
    return Path(output_dir) / profile / "sweep" / f"shift-{task}-seed-{int(twin_seed)}.csv"


def shift_settings(spec: MechanismSpec) -> list[Setting]:
    """The twin of each site shift of ``spec``: the tuning setting with that shift."""
    base = settings(spec)[tuning_setting(settings(spec))]
    return [replace(base, shift=name) for name in spec.shifts]


def result_path(output_dir: str | Path, profile: str, task: str, twin_seed: int) -> Path:
    """Where ``run_mechanism`` records what it ran for one task and twin seed:
    ``<output_dir>/<profile>/sweep/mechanism-<task>-seed-<n>.csv``."""
    return Path(output_dir) / profile / "sweep" / f"mechanism-{task}-seed-{int(twin_seed)}.csv"


@dataclass
class MechanismResult:
    """What ``run_mechanism`` did: one row per setting (``timings``: seconds per step, the
    internal test cohort's size and events) and where it wrote them (``path``); the penalties
    chosen (``tuning``) and the site-shift table (``shifts``, ``shift_path``)."""

    spec: MechanismSpec
    timings: pd.DataFrame
    path: Path
    tuning: pd.DataFrame | None = None
    shifts: pd.DataFrame | None = None


def _link(source: Path, target: Path) -> None:
    """``target`` becomes the same file (a hard link; a copy where links are not possible)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() or target.is_symlink():
        target.unlink()
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _link_volumes(source: Path, target: Path, site: str | None = None) -> None:
    """Point ``target``'s volumes at ``source``'s (twin task folders): its whole ``images``
    folder, or only ``images/<site>``, as a relative symbolic link, after checking that both
    imaging indexes list the same studies and files (of that site)."""
    columns = ["study_id", "institution", "image_path"]
    a, b = (pd.read_parquet(folder / "imaging_index.parquet", columns=columns) for folder in (source, target))
    if site is not None:
        a, b = (x[x["institution"] == site].reset_index(drop=True) for x in (a, b))
    if not a.equals(b):
        raise RuntimeError(f"{target / 'imaging_index.parquet'}: lists other {site + ' ' if site else ''}studies or "
                           f"files than {source / 'imaging_index.parquet'}; the volumes cannot be shared")
    relative = Path("images") / site if site else Path("images")
    link = target / relative
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        shutil.rmtree(link)
    link.symlink_to(os.path.relpath(source / relative, link.parent), target_is_directory=True)


_SCANNER = ("hu_offset", "noise_sd", "slice_mm", "n_slices", "pixel_mm", "matrix")


_SHIFT_INTERNAL = 20  # internal studies of a shift twin (a token: only its external site is scored)


def kept_choices(spec: MechanismSpec) -> dict[str, float]:
    """The L2 penalty each strategy of ``spec`` chose in the tuning record ``spec.tuned_at``
    (another twin seed's); a record of another task, without a choice for one of the
    strategies, or with a penalty outside ``spec.l2_grid`` is an error naming the file."""
    path = Path(spec.tuned_at)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no tuning record (parameter 'tuned_at'); run the twin seed that tunes first")
    record = pd.read_csv(path)
    missing = [c for c in ("task", "fusion", "l2", "chosen") if c not in record.columns]
    if missing:
        raise ValueError(f"{path}: a tuning record lacks column(s) {', '.join(missing)}")
    if set(record["task"]) != {spec.task}:
        raise ValueError(f"{path}: a tuning record of task(s) {', '.join(map(str, sorted(set(record['task']))))}, "
                         f"not {spec.task!r}")
    picked = record[record["chosen"].astype(bool)].set_index("fusion")["l2"]
    absent = [f for f in spec.fusions if f not in picked.index]
    if absent or picked.index.duplicated().any():
        raise ValueError(f"{path}: expected one chosen penalty per strategy; none for {', '.join(absent)}"
                         if absent else f"{path}: a strategy has two chosen penalties")
    outside = sorted({float(v) for v in picked} - {float(v) for v in spec.l2_grid}) if spec.l2_grid else []
    if outside:
        raise ValueError(f"{path}: chosen penalties {outside} are not in the study's grid {list(spec.l2_grid)}")
    return {f: float(picked[f]) for f in spec.fusions}


def _adopt(result, output_dir: Path):
    """The run ``result`` (a ``helpers.training.RunResult``) copied into ``output_dir``, as the
    same result there."""
    import dataclasses
    import shutil

    output_dir = Path(output_dir)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    # metrics.json marks a finished run (helpers.runs), so it is copied last
    files = sorted(Path(result.output_dir).iterdir(), key=lambda f: f.name == "metrics.json")
    output_dir.mkdir()
    for file in files:
        shutil.copy2(file, output_dir / file.name)
    return dataclasses.replace(result, output_dir=output_dir,
                               spec=dataclasses.replace(result.spec, output_dir=output_dir))


def _run_shifts(spec: MechanismSpec, models: dict, image_encoder: str) -> tuple[pd.DataFrame, list[dict]]:
    """Score ``models`` (the tuning setting's runs, by strategy) on the external site under
    each shift of ``spec``; returns the paired table (``shift_path``) and the timings."""
    import numpy as np

    from helpers.cohort import make_cohort
    from helpers.compare import oracle_risk, score_runs, table1, write_outputs
    from helpers.embeddings import embedding_path
    from helpers.extract import extract
    from helpers.metrics import bootstrap_ci, paired_bootstrap_test
    from helpers.runs import collect_runs, read_predictions, run_dir
    from helpers.training import rescore_run
    from helpers.twin import INSTITUTIONS, generate
    from helpers.twin.records import SITE_SHIFTS

    task = spec.task
    external_site = INSTITUTIONS["external"][0]
    # the external site's patients, records and volumes do not depend on the internal site's
    # size (tests/test_twin.py), so a shift twin holds a token internal site
    sizes = {"internal": _SHIFT_INTERNAL, "external": int(spec.shift_studies)}
    renders: dict[tuple[str, ...], Manifest] = {}  # the scanner traits a shift takes -> the twin that rendered them
    timings, predictions, cohorts = [], {}, {}
    for setting in shift_settings(spec):
        started = time.perf_counter()
        manifest = spec.manifest.with_setting(setting)
        scanner = tuple(f for f in SITE_SHIFTS[setting.shift] if f in _SCANNER)
        leader = renders.get(scanner)
        generate(manifest.twin_dir, profile=setting.profile, seed=setting.seed, image_share=setting.image_share,
                 interaction=setting.interaction, tasks=(task,), n_override=sizes,
                 images=True if leader is None else ("internal",), site_shift=setting.shift)
        if leader is not None:
            _link_volumes(leader.twin_dir / task, manifest.twin_dir / task, external_site)
        twin_done = time.perf_counter()
        build = make_cohort(manifest, task, meds=False)
        cohort = build.result.cohort
        external_ids = cohort.loc[cohort["split"] == "external", "study_id"].astype(str).tolist()
        cohort_done = time.perf_counter()
        table = embedding_path(manifest.run_root, task, "image", image_encoder)
        if leader is None:
            extract(manifest, task, "image", image_encoder, studies=external_ids)
            renders[scanner] = manifest
        else:
            source = embedding_path(leader.run_root, task, "image", image_encoder)
            for file in source.parent.glob(f"{source.stem}.*"):
                _link(file, table.with_name(file.name))
        ehr = extract(manifest, task, "ehr", spec.ehr_repr).path
        encode_done = time.perf_counter()
        for fusion, result in models.items():
            strategy = get_strategy(fusion)
            rescore_run(result, cohort_path=build.paths["cohort"],
                        image_embeddings=table if strategy.uses_image else None,
                        ehr_embeddings=ehr if strategy.uses_ehr else None,
                        output_dir=run_dir(manifest.run_root, task, result.spec.ehr_repr, fusion, result.spec.seed))
        runs = collect_runs(manifest.run_root / "runs", task)
        runs = runs[runs["fusion"].isin(list(models)) & (runs["seed"] == spec.seed)]
        external = cohort[cohort["split"] == "external"]
        scores = score_runs(runs, external, n_boot=spec.n_boot, oracle=oracle_risk(manifest, task))
        write_outputs(scores, table1(scores), manifest.run_root / "comparisons" / task)
        predictions[setting.shift] = {key[1]: frame["risk"] for key, frame in read_predictions(runs).items()}
        predictions[setting.shift]["oracle"] = oracle_risk(manifest, task)
        cohorts[setting.shift] = external.set_index("study_id")
        timings.append({"task": task, "twin_seed": spec.twin_seed, "shift": setting.shift,
                        "setting": setting.label, "external_studies": len(external),
                        "external_events": int(external["event"].sum()),
                        "twin_seconds": round(twin_done - started, 2),
                        "cohort_seconds": round(cohort_done - twin_done, 2),
                        "encode_seconds": round(encode_done - cohort_done, 2),
                        "score_seconds": round(time.perf_counter() - encode_done, 2)})
    reference = cohorts["none"]
    rows = []
    for k, (shift, preds) in enumerate(predictions.items()):
        outcome = cohorts[shift]
        if not (outcome.index.equals(reference.index) and outcome[["time", "event"]].equals(reference[["time", "event"]])):
            raise RuntimeError(f"shift {shift!r}: the external cohort's studies or outcomes differ from those under "
                               f"'none'; a shift must change the site only")
        ids = reference.index
        time_, event = reference["time"].to_numpy(), reference["event"].to_numpy()
        groups = reference["person_id"].to_numpy()
        for m, (strategy, risk) in enumerate(preds.items()):
            risk = risk.loc[ids].to_numpy()
            ci = bootstrap_ci(time=time_, event=event, risk=risk, n_boot=spec.n_boot,
                              rng=np.random.default_rng([spec.twin_seed, k, m]), groups=groups)
            row = {"task": task, "twin_seed": spec.twin_seed, "shift": shift, "strategy": strategy, "n": len(ids),
                   "events": int(event.sum()), "c_index": ci.estimate, "lower": ci.lower, "upper": ci.upper,
                   "change": 0.0, "change_lower": 0.0, "change_upper": 0.0, "p": np.nan}
            if shift != "none" and strategy != "oracle":
                test = paired_bootstrap_test(time=time_, event=event, risk_a=risk,
                                             risk_b=predictions["none"][strategy].loc[ids].to_numpy(),
                                             n_boot=spec.n_boot, groups=groups,
                                             rng=np.random.default_rng([spec.twin_seed, k, m, 1]))
                row.update(change=test.difference, change_lower=test.lower, change_upper=test.upper, p=test.p_value)
            rows.append(row)
    return pd.DataFrame(rows), timings


def run_mechanism(spec: MechanismSpec, *, progress: bool = False) -> MechanismResult:
    """Run ``spec``: at each setting, the twin, the cohort, the one-hot EHR features, every
    strategy of ``spec.fusions`` and the C-index table (``comparisons/<task>/cindex.csv`` with
    the oracle and patient-bootstrap intervals). Returns the timings, also written to
    ``result_path`` (last, so that its presence means the whole grid ran)."""
    from helpers.cohort import make_cohort
    from helpers.compare import oracle_risk, score_runs, table1, write_outputs
    from helpers.embeddings import embedding_path
    from helpers.extract import extract
    from helpers.runs import RunSpec, collect_runs, run_dir
    from helpers.training import train_run
    from helpers.twin import generate

    task = spec.task
    image_encoder = next(iter(spec.manifest.encoders.image))
    grid = settings(spec)
    manifests = [spec.manifest.with_setting(setting) for setting in grid]
    first = manifests[0]
    image_table = embedding_path(first.run_root, task, "image", image_encoder)
    rows, builds = [], []
    # the twin and the cohort of every setting first: which studies a cohort keeps depends on
    # the outcomes (a planted defect is drawn among censored patients), so the CTs of every
    # setting's cohort are encoded once, at the first setting
    for k, (setting, manifest) in enumerate(zip(grid, manifests, strict=True)):
        started = time.perf_counter()
        generate(manifest.twin_dir, profile=setting.profile, seed=setting.seed, image_share=setting.image_share,
                 interaction=setting.interaction, tasks=(task,), images=k == 0)
        if k > 0:
            _link_volumes(first.twin_dir / task, manifest.twin_dir / task)
        twin_done = time.perf_counter()
        builds.append(make_cohort(manifest, task, meds=False))
        rows.append({"task": task, "twin_seed": setting.seed, "image_share": setting.image_share,
                     "interaction": setting.interaction, "setting": setting.label,
                     "twin_seconds": round(twin_done - started, 2),
                     "cohort_seconds": round(time.perf_counter() - twin_done, 2)})
    started = time.perf_counter()
    studies = list(dict.fromkeys(s for build in builds for s in build.result.cohort["study_id"]))
    extract(first, task, "image", image_encoder, studies=studies)
    encoded_seconds = time.perf_counter() - started

    def train(manifest: Manifest, build, ehr: Path, fusion: str, options: dict, output_dir: Path | None = None):
        strategy = get_strategy(fusion)
        ehr_repr = spec.ehr_repr if strategy.uses_ehr else "none"
        return train_run(RunSpec(
            task=task, ehr_repr=ehr_repr, fusion=fusion, seed=spec.seed, cohort_path=build.paths["cohort"],
            image_embeddings=embedding_path(manifest.run_root, task, "image", image_encoder)
            if strategy.uses_image else None,
            ehr_embeddings=ehr if strategy.uses_ehr else None,
            output_dir=output_dir or run_dir(manifest.run_root, task, ehr_repr, fusion, spec.seed), options=options))

    for manifest in manifests[1:]:
        here = embedding_path(manifest.run_root, task, "image", image_encoder)
        for source in image_table.parent.glob(f"{image_table.stem}.*"):
            _link(source, here.with_name(source.name))
    started = time.perf_counter()
    chosen: dict[str, dict] = {fusion: dict(spec.options) for fusion in spec.fusions}
    tuned: dict[str, object] = {}  # the chosen tuning run of each strategy (RunResult)
    tuning = []
    ehr_tables: dict[int, Path] = {}  # the one-hot table of each setting, made once
    t = tuning_setting(grid)
    if spec.tuned_at is not None:
        for fusion, l2 in kept_choices(spec).items():
            chosen[fusion] = {**spec.options, "l2": l2}
        tuning = pd.read_csv(spec.tuned_at).assign(twin_seed=spec.twin_seed).to_dict("records")
    elif spec.l2_grid:
        ehr_tables[t] = extract(manifests[t], task, "ehr", spec.ehr_repr).path
        for fusion in spec.fusions:
            val_c = {}
            for l2 in spec.l2_grid:
                folder = manifests[t].run_root / "tuning" / task / fusion / f"l2-{l2:g}"
                result = train(manifests[t], builds[t], ehr_tables[t], fusion, {**spec.options, "l2": l2}, folder)
                val_c[l2] = result.scores["val"]["c_index"]
                tuning.append({"task": task, "twin_seed": spec.twin_seed, "setting": grid[t].label, "fusion": fusion,
                               "l2": l2, "val_c_index": round(val_c[l2], 4)})
                # keep only the best run so far (ties: the smaller penalty)
                held = tuned[fusion].spec.options["l2"] if fusion in tuned else None
                if held is None or (val_c[l2], -l2) > (val_c[held], -held):
                    tuned[fusion] = result
            best = tuned[fusion].spec.options["l2"]
            chosen[fusion] = {**spec.options, "l2": best}
            for row in tuning[-len(spec.l2_grid):]:
                row["chosen"] = row["l2"] == best
    tuned_seconds = time.perf_counter() - started
    models: dict = {}
    for k, (setting, manifest, build) in enumerate(zip(grid, manifests, builds, strict=True)):
        clock = {"started": time.perf_counter()}
        ehr = ehr_tables.get(k) or extract(manifest, task, "ehr", spec.ehr_repr).path
        clock["embeddings"] = time.perf_counter()
        runs_dir = manifest.run_root / "runs"
        for fusion in spec.fusions:
            if k == t and fusion in tuned:
                # the tuning run with the chosen penalty is this run (same inputs, options and
                # seed; training is deterministic), so it is copied rather than trained again
                trained = _adopt(tuned[fusion], run_dir(manifest.run_root, task, tuned[fusion].spec.ehr_repr,
                                                        fusion, spec.seed))
            else:
                trained = train(manifest, build, ehr, fusion, chosen[fusion])
            if k == t:
                models[fusion] = trained  # scored under the site shifts
        clock["train"] = time.perf_counter()
        runs = collect_runs(runs_dir, task)
        runs = runs[runs["fusion"].isin(spec.fusions) & (runs["seed"] == spec.seed)]
        scores = score_runs(runs, build.result.cohort, n_boot=spec.n_boot, oracle=oracle_risk(manifest, task))
        write_outputs(scores, table1(scores), manifest.run_root / "comparisons" / task)
        clock["score"] = time.perf_counter()
        test = build.result.cohort[build.result.cohort["split"] == "test"]
        rows[k].update({
            "test_studies": len(test), "test_events": int(test["event"].sum()),
            "encode_seconds": round(encoded_seconds, 2) if k == 0 else 0.0,
            "tune_seconds": round(tuned_seconds, 2) if k == 0 else 0.0,
            "ehr_seconds": round(clock["embeddings"] - clock["started"], 2),
            "train_seconds": round(clock["train"] - clock["embeddings"], 2),
            "score_seconds": round(clock["score"] - clock["train"], 2)})
        if progress:
            print(f"{setting.label}: {rows[k]['test_events']} internal test events, "
                  f"{clock['score'] - clock['started']:.1f} s", flush=True)
    timings = pd.DataFrame(rows)
    shifted = None
    if spec.shifts:
        started = time.perf_counter()
        table, shift_timings = _run_shifts(spec, models, image_encoder)
        shifted = shift_path(spec.manifest.output_dir, spec.profile, task, spec.twin_seed)
        table.to_csv(shifted, index=False)
        shift_timings = pd.DataFrame(shift_timings)
        shift_timings.to_csv(shifted.with_name(f"shift-timings-{task}-seed-{int(spec.twin_seed)}.csv"), index=False)
        timings["shift_seconds"] = 0.0
        timings.loc[t, "shift_seconds"] = round(time.perf_counter() - started, 2)
        if progress:
            print(f"site shifts: {time.perf_counter() - started:.1f} s", flush=True)
    tuned = tuning_path(spec.manifest.output_dir, spec.profile, task, spec.twin_seed)
    tuned.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(tuning, columns=["task", "twin_seed", "setting", "fusion", "l2", "val_c_index", "chosen"]).to_csv(
        tuned, index=False)
    path = result_path(spec.manifest.output_dir, spec.profile, task, spec.twin_seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    timings.to_csv(tmp, index=False)
    tmp.replace(path)
    return MechanismResult(spec=spec, timings=timings, path=path, tuning=pd.read_csv(tuned),
                           shifts=pd.read_csv(shifted) if shifted is not None else None)


# ------------------------------------------------------------------------------ the analysis

INTERNAL = "Internal"  # the cohort the mechanism study is powered for (helpers.compare.EVAL_SPLITS)


def collect(output_dir: str | Path, grid: list[Setting], tasks: tuple[str, ...], *, ehr_repr: str = "onehot",
            seed: int = 0) -> pd.DataFrame:
    """The C-index tables of every setting of ``grid`` and task (``helpers.imbalance.collect``),
    with ``strategy``: the fusion's name, or ``oracle``."""
    from helpers.compare import ORACLE
    from helpers.imbalance import collect as collect_settings

    results = collect_settings(output_dir, grid, tasks, ehr_reprs=(ehr_repr,), seed=seed)
    return results.assign(strategy=results["fusion"].where(results["model"] != ORACLE, "oracle"))


def _read_records(where, what: str, output_dir: str | Path, profile: str, tasks: tuple[str, ...],
                  twin_seeds: tuple[int, ...]) -> pd.DataFrame:
    """The CSV ``where(output_dir, profile, task, seed)`` of every task and twin seed, one
    frame; a missing one is an error naming the file and ``what`` it should hold."""
    frames = []
    for task in tasks:
        for seed in twin_seeds:
            path = where(output_dir, profile, task, seed)
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no {what} for task {task!r}, twin seed {seed}; "
                                        f"run the mechanism study (notebooks/06_mechanism.ipynb) first")
            frames.append(pd.read_csv(path))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def collect_tuning(output_dir: str | Path, profile: str, tasks: tuple[str, ...], twin_seeds: tuple[int, ...]) -> pd.DataFrame:
    """The penalty choices of every task and twin seed (``tuning_path``), one frame; a missing
    record is an error naming the file."""
    return _read_records(tuning_path, "tuning record", output_dir, profile, tasks, twin_seeds)


def balance(output_dir: str | Path, grid: list[Setting], tasks: tuple[str, ...]) -> pd.DataFrame:
    """What each group of factors explains of the true log-hazard of the internal studies at
    each setting of ``grid`` (``helpers.twin.information_balance``, read from each setting's
    ground truth): one row per task, kappa and s; the first twin seed of ``grid`` only."""
    from helpers.truth import read_truth
    from helpers.twin import INSTITUTIONS, information_balance

    seed = grid[0].seed
    rows = []
    for setting in (g for g in grid if g.seed == seed):
        for task in tasks:
            factors = read_truth(Path(output_dir) / setting.label / "twin", task, reader="mechanism")
            r2 = information_balance(factors[factors["institution"] == INSTITUTIONS["internal"][0]], task)
            rows.append({"task": task, "kappa": setting.interaction, "s": setting.image_share,
                         **{k: r2[k] for k in ("ct_exclusive", "ehr_exclusive", "non_additive")}})
    return pd.DataFrame(rows).set_index(["task", "kappa", "s"]).sort_index()


def setting_table(results: pd.DataFrame, cohort: str = INTERNAL) -> pd.DataFrame:
    """Per task, interaction and image share (rows) and strategy (columns, the oracle last): the
    mean Harrell's C over the twin seeds on ``cohort``."""
    part = results[results["cohort"] == cohort]
    table = part.pivot_table(index=["task", "interaction", "image_share"], columns="strategy", values="c_index",
                             aggfunc="mean")
    order = [f for f in FUSIONS if f in table.columns] + ["oracle"]
    return table[[c for c in order if c in table.columns]]


def rank_first(results: pd.DataFrame, cohort: str = INTERNAL) -> pd.DataFrame:
    """Per task, interaction and image share: in how many twin seeds each strategy had the
    highest C on ``cohort`` (ties share the count), and the number of seeds."""
    part = results[(results["cohort"] == cohort) & (results["strategy"] != "oracle")]
    rows = []
    for (task, kappa, share), group in part.groupby(["task", "interaction", "image_share"]):
        counts = dict.fromkeys(group["strategy"].unique(), 0)
        for _, seed_rows in group.groupby("twin_seed"):
            best = seed_rows["c_index"].max()
            for strategy in seed_rows.loc[seed_rows["c_index"] == best, "strategy"]:
                counts[strategy] += 1
        rows.append({"task": task, "interaction": kappa, "image_share": share,
                     "seeds": group["twin_seed"].nunique(), **counts})
    table = pd.DataFrame(rows).set_index(["task", "interaction", "image_share"])
    order = ["seeds"] + [f for f in FUSIONS if f in table.columns]
    return table[order]


def _gain(table: pd.DataFrame) -> pd.DataFrame:
    """Per row of ``setting_table``: the better unimodal C, the best multimodal C and its gain,
    and concatenation's and the best attention strategy's C."""
    from helpers.tasks import MULTIMODAL, TOKEN_FUSIONS

    unimodal = table[[c for c in ("image_only", "ehr_only") if c in table.columns]].max(axis=1)
    multi = [c for c in MULTIMODAL if c in table.columns]
    attention = [c for c in TOKEN_FUSIONS if c in table.columns]
    return pd.DataFrame({
        "unimodal": unimodal,
        "multimodal": table[multi].max(axis=1) if multi else float("nan"),
        "gain": (table[multi].max(axis=1) - unimodal) if multi else float("nan"),
        "concat": table["concat"] if "concat" in table.columns else float("nan"),
        "attention": table[attention].max(axis=1) if attention else float("nan"),
    })


# The predictions of the chapter, written before the study was run (see the chapter's text); each
# with the criterion that decides it on the internal test cohorts, means over twin seeds.
PREDICTIONS: dict[str, str] = {
    "P1": "image only rises and EHR only falls as the image share grows, at every interaction",
    "P2": "without an interaction (kappa = 0), no attention strategy beats concatenation by more than 0.01",
    "P3": "without an interaction, at s = 0 and s = 1 the best fusion is within 0.01 of the better unimodal model",
    "P4": "the best fusion's gain over the better unimodal model grows with kappa, at every image share",
    "P5": "no strategy beats the oracle",
}


def judge(results: pd.DataFrame) -> pd.DataFrame:
    """Each prediction of ``PREDICTIONS`` per task: ``held`` (True, False, or None where the grid
    lacks what it needs) and the numbers that decide it."""
    table = setting_table(results)
    gains = _gain(table)
    rows = []
    for task in table.index.get_level_values("task").unique():
        t = table.loc[task]
        g = gains.loc[task]
        kappas = sorted(t.index.get_level_values("interaction").unique())
        verdicts: dict[str, tuple[bool | None, str]] = {}
        unimodal = {"image_only", "ehr_only"} <= set(t.columns)
        lacking = (None, "the grid lacks a unimodal model (image only and EHR only are both needed)")
        # P1
        ok, worst = True, []
        for kappa in kappas:
            rows_k = t.loc[kappa].sort_index()
            if len(rows_k) < 2 or not unimodal:
                ok, worst = None, ["the grid needs two shares and both unimodal models"]
                break
            img, ehr = rows_k["image_only"].to_numpy(), rows_k["ehr_only"].to_numpy()
            up = bool((img[1:] > img[:-1]).all())
            down = bool((ehr[1:] < ehr[:-1]).all())
            ok = ok and up and down
            worst.append(f"kappa {kappa:g}: image only {' → '.join(f'{v:.3f}' for v in img)}, "
                         f"EHR only {' → '.join(f'{v:.3f}' for v in ehr)}")
        verdicts["P1"] = (ok, "; ".join(worst))
        # P2, P3: kappa = 0
        if 0.0 in kappas:
            zero = g.loc[0.0]
            excess = (zero["attention"] - zero["concat"]).dropna()
            verdicts["P2"] = ((bool((excess <= 0.01).all()) if len(excess) else None),
                              "best attention minus concatenation: " + ", ".join(
                                  f"s {s:g}: {v:+.3f}" for s, v in excess.items()))
            ends = zero.loc[[s for s in zero.index if s in (0.0, 1.0)]]
            if not unimodal:
                verdicts["P3"] = lacking
            elif len(ends):
                gap = ends["multimodal"] - ends["unimodal"]
                verdicts["P3"] = (bool((gap.abs() <= 0.01).all()),
                                  "best fusion minus better unimodal: " + ", ".join(
                                      f"s {s:g}: {v:+.3f}" for s, v in gap.items()))
            else:
                verdicts["P3"] = (None, "the grid has no share 0 or 1")
        else:
            verdicts["P2"] = verdicts["P3"] = (None, "the grid has no kappa = 0")
        # P4
        if not unimodal:
            verdicts["P4"] = lacking
        elif len(kappas) >= 2:
            by_share = g["gain"].unstack("interaction")[kappas]
            grows = (by_share.diff(axis=1).iloc[:, 1:] > 0).all(axis=1)
            verdicts["P4"] = (bool(grows.all()), "; ".join(
                f"s {s:g}: " + " → ".join(f"{v:+.3f}" for v in row) for s, row in by_share.iterrows()))
        else:
            verdicts["P4"] = (None, "the grid has one kappa")
        # P5
        if "oracle" in t.columns:
            models = t.drop(columns="oracle")
            above = (models.max(axis=1) - t["oracle"])
            verdicts["P5"] = (bool((above <= 0).all()), f"largest excess over the oracle: {above.max():+.3f}")
        else:
            verdicts["P5"] = (None, "no oracle row")
        rows += _verdict_rows(task, PREDICTIONS, verdicts)
    return pd.DataFrame(rows)


def _verdict_rows(task: str, predictions: dict[str, str], verdicts: dict[str, tuple[bool | None, str]]) -> list[dict]:
    """One row per prediction: its statement, whether it held and the numbers that decide it."""
    return [{"task": task, "prediction": key, "statement": text, "held": verdicts[key][0], "numbers": verdicts[key][1]}
            for key, text in predictions.items()]


def mechanism_figure(results: pd.DataFrame, cohort: str = INTERNAL):
    """Harrell's C against the image share: one panel per task (rows) and interaction
    (columns), one line per strategy (mean over twin seeds, each seed a faint point), the
    oracle dashed. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    from helpers.tasks import STRATEGIES

    part = results[results["cohort"] == cohort]
    tasks = list(dict.fromkeys(part["task"]))
    kappas = sorted(part["interaction"].unique())
    fig, axes = plt.subplots(len(tasks), len(kappas), figsize=(3.6 * len(kappas), 3.0 * len(tasks)),
                             squeeze=False, sharey="row")
    strategies = [f for f in FUSIONS if f in set(part["strategy"])] + ["oracle"]
    colours = {s: plt.cm.tab10(k) for k, s in enumerate(strategies)}
    for i, task in enumerate(tasks):
        for j, kappa in enumerate(kappas):
            ax = axes[i][j]
            cell = part[(part["task"] == task) & (part["interaction"] == kappa)]
            for strategy in strategies:
                rows = cell[cell["strategy"] == strategy]
                if rows.empty:
                    continue
                mean = rows.groupby("image_share")["c_index"].mean()
                label = "oracle" if strategy == "oracle" else STRATEGIES[strategy].label
                ax.plot(mean.index, mean.to_numpy(), "--" if strategy == "oracle" else "-", color=colours[strategy],
                        label=label, marker="o", ms=3)
                ax.scatter(rows["image_share"], rows["c_index"], color=colours[strategy], s=6, alpha=0.3)
            ax.set_title(f"{task.upper()}, kappa {kappa:g}", fontsize=9)
            ax.set_xlabel("image share s")
            if j == 0:
                ax.set_ylabel(f"Harrell's C ({cohort.lower()})")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


# ------------------------------------------------------------------------------ the site shifts

SHIFT_LABELS: dict[str, str] = {
    "none": "none (the external patients, internal site)", "hu_offset": "HU offset (+20 HU)",
    "noise": "image noise (15 → 30 HU)", "slice_thickness": "slice thickness (5 → 3 mm) and pixel size",
    "ehr_completeness": "record completeness", "lab_units": "lab units", "all": "all (the external site as it is)"}


def collect_shifts(output_dir: str | Path, profile: str, tasks: tuple[str, ...], twin_seeds: tuple[int, ...]) -> pd.DataFrame:
    """The site-shift tables of every task and twin seed (``shift_path``), one frame; a
    missing table is an error naming the file."""
    return _read_records(shift_path, "site-shift table", output_dir, profile, tasks, twin_seeds)


def shift_table(shifts: pd.DataFrame, value: str = "change") -> pd.DataFrame:
    """Per task and strategy (rows) and shift (columns, in ``SHIFTS`` order): the mean over
    twin seeds of ``value`` (``change``: external C under the shift minus under ``none``, on
    the same studies; or ``c_index``)."""
    table = shifts.pivot_table(index=["task", "strategy"], columns="shift", values=value, aggfunc="mean")
    columns = [s for s in SHIFTS if s in table.columns and (value != "change" or s != "none")]
    order = [f for f in FUSIONS if f in table.index.get_level_values("strategy")] + ["oracle"]
    rows = [(t, f) for t in table.index.get_level_values("task").unique() for f in order if (t, f) in table.index]
    return table.loc[rows, columns]


def shift_hurts(shifts: pd.DataFrame) -> pd.DataFrame:
    """Per task, strategy and shift: in how many twin seeds the 95% interval of the change
    lies below 0 (``hurt``) or above 0 (``helped``), of ``seeds``."""
    part = shifts[(shifts["shift"] != "none") & (shifts["strategy"] != "oracle")]
    return part.groupby(["task", "strategy", "shift"], sort=False).agg(
        seeds=("twin_seed", "nunique"), hurt=("change_upper", lambda v: int((v < 0).sum())),
        helped=("change_lower", lambda v: int((v > 0).sum())))


# The predictions about the site shifts, written before the shift settings were first run (see
# the chapter's text); decided on the mean change over twin seeds, per task.
SHIFT_PREDICTIONS: dict[str, str] = {
    "S1": "lab units change nothing: the cohort step converts every lab to one unit, so no strategy's "
          "external C moves by more than 0.005 under lab_units",
    "S2": "incomplete records hurt the EHR: EHR only loses more than 0.01 of external C under ehr_completeness",
    "S3": "fusion cushions a shift of one modality: wherever a single shift costs a unimodal model more than "
          "0.01, concatenation loses less than that model",
    "S4": "of the three scanner shifts, image noise costs image only the most",
}


def judge_shifts(shifts: pd.DataFrame) -> pd.DataFrame:
    """Each prediction of ``SHIFT_PREDICTIONS`` per task: ``held`` (True, False, or None where
    the shifts run lack what it needs) and the numbers that decide it."""
    table = shift_table(shifts)
    single = [s for s in table.columns if s not in ("none", "all")]
    scanner = [s for s in ("hu_offset", "noise", "slice_thickness") if s in table.columns]
    rows = []
    for task in table.index.get_level_values("task").unique():
        t = table.loc[task]
        verdicts: dict[str, tuple[bool | None, str]] = {}
        if "lab_units" in t.columns:
            moved = t["lab_units"].drop("oracle", errors="ignore").abs()
            verdicts["S1"] = (bool((moved <= 0.005).all()), f"largest change: {moved.max():.4f} ({moved.idxmax()})")
        else:
            verdicts["S1"] = (None, "lab_units was not run")
        if "ehr_completeness" in t.columns and "ehr_only" in t.index:
            v = t.loc["ehr_only", "ehr_completeness"]
            verdicts["S2"] = (bool(v < -0.01), f"EHR only: {v:+.3f}")
        else:
            verdicts["S2"] = (None, "ehr_completeness or EHR only was not run")
        if "concat" in t.index and {"image_only", "ehr_only"} <= set(t.index) and single:
            cases = []
            for shift in single:
                for unimodal in ("image_only", "ehr_only"):
                    cost = t.loc[unimodal, shift]
                    if cost < -0.01:
                        cases.append((shift, unimodal, cost, t.loc["concat", shift]))
            verdicts["S3"] = ((all(c > u for _, _, u, c in cases) if cases else None),
                              "; ".join(f"{s}: {m} {u:+.3f}, concatenation {c:+.3f}" for s, m, u, c in cases)
                              or "no single shift cost a unimodal model more than 0.01")
        else:
            verdicts["S3"] = (None, "the shifts run lack a unimodal model, concatenation or a single shift")
        if len(scanner) >= 2 and "noise" in scanner and "image_only" in t.index:
            costs = t.loc["image_only", scanner]
            verdicts["S4"] = (bool(costs.idxmin() == "noise"), ", ".join(f"{s} {v:+.3f}" for s, v in costs.items()))
        else:
            verdicts["S4"] = (None, "the shifts run lack noise and another scanner shift, or image only")
        rows += _verdict_rows(task, SHIFT_PREDICTIONS, verdicts)
    return pd.DataFrame(rows)


def shift_figure(shifts: pd.DataFrame):
    """A heat map per task: each strategy's mean change of external C under each shift (red:
    a loss), with the number of twin seeds whose interval lies below 0."""
    import matplotlib.pyplot as plt
    import numpy as np

    table = shift_table(shifts)
    hurts = shift_hurts(shifts)["hurt"]
    tasks = list(table.index.get_level_values("task").unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.2 * len(tasks), 3.8), squeeze=False)
    limit = max(0.02, float(np.nanmax(np.abs(table.to_numpy()))))
    for ax, task in zip(axes[0], tasks, strict=True):
        t = table.loc[task].drop("oracle", errors="ignore")
        image = ax.imshow(t.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        ax.set_xticks(range(len(t.columns)), [c.replace("_", " ") for c in t.columns], rotation=35, ha="right")
        ax.set_yticks(range(len(t.index)), [s.replace("_", " ") for s in t.index])
        for i, strategy in enumerate(t.index):
            for j, shift in enumerate(t.columns):
                n = hurts.get((task, strategy, shift), 0)
                ax.text(j, i, f"{t.iloc[i, j]:+.3f}" + ("*" * int(n)), ha="center", va="center", fontsize=7)
        ax.set_title(f"{task}: change of external C from 'none'")
    fig.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="change of Harrell's C")
    return fig
