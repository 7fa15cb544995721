"""Fusion under modality imbalance: the study repeated across the twin's ``image_share`` knob.

The digital twin's true log-hazard is ``beta * (sqrt(s) * image + sqrt(1 - s) * ehr +
interaction)`` with ``s = image_share`` (see ``helpers.twin``). ``imbalance_sweep`` runs the
study's pipeline (twin -> cohort -> frozen embeddings -> every fusion strategy -> Harrell's C
with bootstrap CIs) at several values of ``s`` and returns one row per task, share, model and
evaluation cohort; ``imbalance_figure`` draws C against ``s``, and ``reading`` turns the
numbers into sentences.

Each step calls the same library functions as the study's notebooks (``helpers.cohort``,
``helpers.ehr``, ``helpers.encoders``, ``helpers.training``, ``helpers.compare``), so a point of
the sweep at the manifest's ``image_share`` is the study itself (up to the image embeddings,
see below). Models never see the ground truth; only the oracle row reads it
(``helpers.compare.oracle_risk``).

Images are encoded once per task. The twin draws every factor and renders every CT before,
and independently of, the hazard: for a given ``seed`` the volumes are voxel-for-voxel the
same at every ``image_share`` (``tests/test_sweep.py`` checks it on a small twin). Only the
event times change, and with them the outcome records, the dates of later studies and which
studies carry a planted defect. So the sweep renders and encodes the CTs of one reference twin
(``out_dir/images``) and writes the twin of each share without volumes; each share's cohort is
built from its own records and imaging index, with image paths that point at the reference
volumes.

Layout under ``out_dir``::

    images/<profile>/twin/<task>/             reference twin with volumes
    images/<profile>/embeddings/<task>/image-randconv.parquet   every study of the index
    images/<task>.json                        stamp: parameters and seconds
    <share>/<profile>/{twin,cohorts,embeddings,runs}/...        as in a study run root
    <share>/<task>.csv, <share>/<task>.json   scores of one task and share, and its stamp
    imbalance.csv, imbalance.json             all rows of the last call, its parameters

A (task, share) whose stamp holds the same parameters (and the same ``helpers`` source code)
is read back instead of recomputed, so an interrupted sweep resumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from helpers.tasks import FUSIONS, TASKS, UNIMODAL_IMAGE, ParameterError

__all__ = [
    "DEFAULT_SHARES",
    "REFERENCE_SHARE",
    "RESULT_COLUMNS",
    "parse_shares",
    "imbalance_sweep",
    "sweep_timings",
    "imbalance_figure",
    "summarise",
    "wide_table",
    "reading",
]

DEFAULT_SHARES: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
# image_share of the reference twin whose volumes every share uses (any value gives the same
# volumes; this one is the manifest's default).
REFERENCE_SHARE = 0.5
IMAGE_ENCODER = "randconv"
EHR_REPR = "onehot"
RESULT_COLUMNS: tuple[str, ...] = (
    "task", "image_share", "cohort", "split", "fusion", "ehr_repr", "model", "seed", "n", "events",
    "c_index", "lower", "upper", "se", "n_redrawn",
    "diff_vs_image", "diff_vs_image_lower", "diff_vs_image_upper", "p_vs_image",
    "diff_vs_concat", "diff_vs_concat_lower", "diff_vs_concat_upper", "p_vs_concat", "split_seed",
)
_SPLIT_SEED_TRIES = 50
_FEW_EVENTS = 5  # below this many events a cohort's C-index is flagged as noise in ``reading``
_PROFILES = ("quick", "paper")
_UNIMODAL = ("image_only", "ehr_only")
_HELPERS = Path(__file__).resolve().parent


# ------------------------------------------------------------------------- parameters


def parse_shares(text: str | Iterable[float]) -> tuple[float, ...]:
    """Shares from a comma-separated string (``"0,0.25,0.5"``) or numbers, checked: each in
    [0, 1], no duplicates, at least one; returned sorted.

    >>> parse_shares("1, 0,0.5")
    (0.0, 0.5, 1.0)
    >>> parse_shares("0.3,1.2")
    Traceback (most recent call last):
    ...
    helpers.tasks.ParameterError: parameter 'shares': every image share must be in [0, 1]; got 1.2
    """
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
        values = []
        for item in items:
            try:
                values.append(float(item))
            except ValueError:
                raise ParameterError(f"parameter 'shares': {item!r} is not a number (expected e.g. '0,0.25,0.5')") from None
    else:
        values = [float(v) for v in text]
    if not values:
        raise ParameterError("parameter 'shares': no image share given (expected e.g. '0,0.25,0.5')")
    bad = [v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)]
    if bad:
        raise ParameterError(f"parameter 'shares': every image share must be in [0, 1]; got {', '.join(f'{v:g}' for v in bad)}")
    labels = [_label(v) for v in values]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ParameterError(f"parameter 'shares': duplicated image share(s) {', '.join(dup)}")
    return tuple(sorted(values))


def _label(share: float) -> str:
    """Folder name of a share: ``0.25``, ``1`` (shares are kept to 4 decimals)."""
    return f"{round(float(share), 4):g}"


def _check_names(name: str, values: Iterable[str], allowed: Sequence[str]) -> tuple[str, ...]:
    values = tuple(values)
    if not values:
        raise ParameterError(f"parameter {name!r}: empty; expected some of {', '.join(allowed)}")
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ParameterError(f"parameter {name!r}: unknown value(s) {', '.join(map(repr, unknown))}; expected some of {', '.join(allowed)}")
    if len(set(values)) != len(values):
        raise ParameterError(f"parameter {name!r}: duplicated values in {', '.join(values)}")
    return values


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ParameterError(f"parameter {name!r}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


# The modules whose code makes the numbers; a change to any of them recomputes the sweep.
_PIPELINE_MODULES = (
    "sweep.py", "twin.py", "vocabulary.py", "imaging.py", "cohort.py", "ehr.py", "embeddings.py",
    "encoders/image.py", "encoders/randconv.py", "fusion.py", "survival.py", "training.py", "metrics.py",
    "compare.py", "tasks.py", "manifest.py",
)


def _code_digest() -> str:
    """sha256 of the pipeline's ``helpers`` modules (``_PIPELINE_MODULES``)."""
    digest = hashlib.sha256()
    for path in sorted(_HELPERS / name for name in _PIPELINE_MODULES):
        if not path.is_file():
            continue
        digest.update(path.relative_to(_HELPERS).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------- pipeline pieces


def _manifest(output_dir: Path, profile: str, seed: int, share: float, splits: Any):
    from helpers.manifest import Manifest

    return Manifest.model_validate({
        "version": 1,
        "data": {"source": "synthetic", "synthetic": {"profile": profile, "seed": seed, "image_share": share}},
        "encoders": {"image": {IMAGE_ENCODER: {"kind": "builtin"}}, "ehr": {EHR_REPR: {"kind": "builtin"}}},
        "splits": splits.model_dump(),
        "output_dir": str(output_dir),
    })


def _read_stamp(path: Path, params: dict) -> dict | None:
    if not path.is_file():
        return None
    try:
        stamp = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return stamp if stamp.get("params") == json.loads(json.dumps(params, default=str)) else None


def _write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)


def _reference_images(out: Path, task: str, common: dict, progress: Callable | None) -> tuple[Path, Path, dict]:
    """Render the reference twin of ``task`` and encode every CT of its imaging index once.
    Returns (imaging root, embedding table path, timing in seconds)."""
    from helpers import cohort as hc
    from helpers.embeddings import embedding_path, write_embeddings
    from helpers.encoders import SlicePreprocess, VolumeDataset, encode_volumes, image_encoder
    from helpers.twin import generate

    spec = TASKS[task]
    manifest = _manifest(out / "images", common["profile"], common["seed"], REFERENCE_SHARE, common["splits_obj"])
    _, index_path, root = hc.imaging_source(manifest, task)
    emb_path = embedding_path(manifest.run_root, task, "image", IMAGE_ENCODER)
    model = image_encoder(IMAGE_ENCODER, manifest.encoders.image.get(IMAGE_ENCODER))
    preprocess = SlicePreprocess(window_hu=spec.window_hu, size=int(getattr(model, "input_size", 64)))
    params = {"task": task, "profile": common["profile"], "seed": common["seed"], "n_override": common["n_override"],
              "image_share": REFERENCE_SHARE, "encoder": IMAGE_ENCODER, "preprocessing": preprocess.describe(),
              "code": common["code"]}
    stamp_path = out / "images" / f"{task}.json"
    stamp = _read_stamp(stamp_path, params)
    if stamp is not None and emb_path.is_file() and index_path.is_file():
        return root, emb_path, {"twin_images": 0.0, "encode": 0.0}
    t0 = time.perf_counter()
    generate(manifest.twin_dir, profile=common["profile"], seed=common["seed"], image_share=REFERENCE_SHARE,
             tasks=(task,), n_override=common["n_override"])
    t_twin = time.perf_counter() - t0
    index = hc.read_imaging_index(index_path)
    dataset = VolumeDataset(list(index["study_id"]), [str(root / p) for p in index["image_path"]], preprocess)
    embedding, tokens = encode_volumes(model, dataset, batch_size=16, device="cpu", progress=progress)
    metadata = {"encoder": IMAGE_ENCODER, "modality": "image", "checkpoint_sha256": None,
                "preprocessing": preprocess.describe(), "frozen": True,
                "volumes": f"reference twin (image_share {REFERENCE_SHARE}); identical at every image_share"}
    write_embeddings(emb_path, list(index["study_id"]), embedding, tokens=tokens, metadata=metadata)
    timing = {"twin_images": round(t_twin, 2), "encode": round(time.perf_counter() - t0 - t_twin, 2)}
    _write_json(stamp_path, {"params": params, "seconds": timing})
    return root, emb_path, timing


def _cohort_and_ehr(manifest, task: str, image_root: Path, reference_ids: np.ndarray) -> tuple[pd.DataFrame, Path, int]:
    """The share's cohort (its own records and index, the reference volumes), its one-hot EHR
    embedding table and the split seed used; the same calls as notebooks 01 and 02.

    The outcomes change with the share, so on a small twin the validation split drawn with the
    manifest's split seed can hold no event (the Cox loss that early stopping watches is then
    undefined). The next seeds are tried in order until train, val and test each hold an
    event; the seed used is reported in the results (``split_seed``)."""
    from helpers import cohort as hc
    from helpers.ehr import onehot_features
    from helpers.embeddings import embedding_path, write_embeddings
    from helpers.manifest import sha256_path

    tables, index_path, _ = hc.imaging_source(manifest, task)
    index = hc.read_imaging_index(index_path)
    if not np.array_equal(index["study_id"].to_numpy(dtype=str), reference_ids):
        raise RuntimeError(f"{index_path}: the studies differ from the reference twin's; the volumes cannot be shared")
    con = hc.connect_omop(tables)
    try:
        result = hc.build_cohort(con, index, task, imaging_root=image_root)
        sp = manifest.splits
        for split_seed in range(sp.seed, sp.seed + _SPLIT_SEED_TRIES):
            cohort = hc.assign_splits(result.cohort, test_fraction=sp.test_fraction[task], val_fraction=sp.val_fraction,
                                      external_institutions=sp.external_institutions, seed=split_seed)
            events = cohort.groupby("split")["event"].sum()
            if all(events.get(name, 0) > 0 for name in ("train", "val", "test")):
                break
        else:
            raise RuntimeError(f"{task}: no split seed in {sp.seed}..{split_seed} gives events in train, val and test")
        paths = hc.cohort_paths(manifest, task)
        hc.write_cohort(hc.CohortResult(cohort=cohort, exclusions=result.exclusions), index, image_root, paths)
        onehot = onehot_features(con, cohort, task)
    finally:
        con.close()
    names = [c for c in onehot.features.columns if c != "study_id"]
    ehr_path = embedding_path(manifest.run_root, task, "ehr", EHR_REPR)
    write_embeddings(ehr_path, list(onehot.features["study_id"]), onehot.features[names].to_numpy(),
                     metadata={"encoder": EHR_REPR, "modality": "ehr", "checkpoint_sha256": None, "features": names,
                               "cohort_sha256": sha256_path(paths["cohort"])})
    return hc.read_cohort(paths["cohort"]), ehr_path, split_seed


def _train(manifest, task: str, cohort: pd.DataFrame, img_path: Path, ehr_path: Path, fusions: tuple[str, ...],
           config: Any, train_seed: int, share: float) -> dict[str, float]:
    """Train and write one run per fusion, as notebook 03 does; returns seconds per fusion."""
    from helpers.embeddings import read_embeddings
    from helpers.fusion import TOKEN_FUSIONS
    from helpers.training import (
        fit,
        make_predictions,
        missing_counts,
        run_dir,
        split_arrays,
        write_run,
    )

    horizon = TASKS[task].horizon_days
    img_table = read_embeddings(img_path, tokens=True)
    ehr_table = read_embeddings(ehr_path, tokens=False)
    seconds = {}
    for fusion in fusions:
        t0 = time.perf_counter()
        ehr_repr = UNIMODAL_IMAGE if fusion == "image_only" else EHR_REPR
        needs_tokens = fusion in TOKEN_FUSIONS and config.image_tokens == "slices"
        tokens = {"image": config.image_tokens, "ehr": config.ehr_tokens} if fusion in TOKEN_FUSIONS else None
        splits = split_arrays(cohort, img_table if fusion != "ehr_only" else None,
                              ehr_table if fusion != "image_only" else None, image_tokens=needs_tokens)
        result = fit(fusion, splits["train"][1], splits["val"][1], config=config, seed=train_seed)
        predictions, scores = make_predictions(result.model, splits, horizon)
        metrics = {"task": task, "ehr_repr": ehr_repr, "fusion": fusion, "seed": train_seed, "loss": config.loss,
                   "tokens": tokens, "image_share": share, "best_epoch": result.best_epoch,
                   "epochs": len(result.history), "train_seconds": round(result.seconds, 2), "splits": scores,
                   "missing": missing_counts(splits)}
        params = {"task": task, "ehr_repr": ehr_repr, "fusion": fusion, "seed": train_seed, "loss": config.loss,
                  "tokens": tokens, "image_share": share, "horizon_days": horizon,
                  "image_embeddings": str(img_path) if fusion != "ehr_only" else None,
                  "ehr_embeddings": str(ehr_path) if fusion != "image_only" else None,
                  "image_encoder": img_table.metadata if fusion != "ehr_only" else None,
                  "ehr_encoder": ehr_table.metadata if fusion != "image_only" else None}
        write_run(run_dir(manifest.run_root, task, ehr_repr, fusion, train_seed), result=result,
                  predictions=predictions, metrics=metrics, params=params)
        seconds[fusion] = round(time.perf_counter() - t0, 2)
    return seconds


def _score(manifest, task: str, cohort: pd.DataFrame, fusions: tuple[str, ...], train_seed: int,
           n_boot: int) -> pd.DataFrame:
    """Harrell's C with bootstrap CIs and paired tests (``helpers.compare.score_runs``), the
    oracle included."""
    from helpers.compare import collect_runs, oracle_risk, score_runs

    runs = collect_runs(manifest.run_root / "runs", task)
    runs = runs[runs["fusion"].isin(fusions) & (runs["seed"] == train_seed)]
    return score_runs(runs, cohort, n_boot=n_boot, seed=0, oracle=oracle_risk(manifest, task))


# ------------------------------------------------------------------------- the sweep


def imbalance_sweep(
    out_dir: str | Path,
    *,
    shares: Iterable[float] | str = DEFAULT_SHARES,
    tasks: Iterable[str] = ("pe", "mace"),
    profile: str = "quick",
    seed: int = 20260616,
    fusions: Iterable[str] | None = None,
    train_seed: int = 0,
    n_boot: int = 200,
    splits: Any = None,
    config: Any = None,
    n_override: dict[str, int] | None = None,
    progress: Callable[[Iterable], Iterable] | None = None,
) -> pd.DataFrame:
    """Run the study at each ``image_share`` in ``shares`` and score every model.

    Parameters
    ----------
    out_dir : path
        Where every artefact goes (see the module docstring); created if missing.
    shares : floats in [0, 1] or a comma-separated string
        Values of the twin's ``image_share`` (the CT's share of the variance of the
        non-interaction log-hazard).
    tasks : some of ``pe``, ``mace``.
    profile : ``quick`` or ``paper`` (twin size); ``n_override`` (e.g. ``{"internal": 60,
        "external": 30}``) replaces its sizes, for tests.
    seed : int >= 0
        The twin's seed (the same patients and CTs at every share).
    fusions : names from ``helpers.tasks.FUSIONS`` (default: all of them, in that order).
    train_seed : int >= 0, the training seed of every model.
    n_boot : int >= 1, bootstrap resamples for the CIs and paired tests.
    splits : ``helpers.manifest.Splits`` (default: its defaults, the paper's test shares).
    config : ``helpers.training.TrainConfig`` (default: its defaults, as notebook 03).
    progress : callable wrapping the iterable of ``(task, share)`` jobs, e.g.
        ``lambda jobs: tqdm(jobs)``.

    Returns
    -------
    pandas.DataFrame
        One row per task, share, model (the fusions and ``oracle``, the twin's true
        log-hazard) and evaluation cohort (``Internal`` = internal test split, ``External``):
        ``RESULT_COLUMNS``, with ``c_index`` Harrell's C (higher risk = earlier event),
        ``lower``/``upper`` its 95% percentile bootstrap interval, ``n`` studies and
        ``events``, and paired differences against image only and concatenation. Also written
        to ``out_dir/imbalance.csv``.

    Raises ``ParameterError`` (a ``ValueError``) naming a bad parameter.
    """
    from helpers.manifest import Splits
    from helpers.training import TrainConfig
    from helpers.twin import GENERATOR_VERSION, generate

    shares = parse_shares(shares)
    tasks = _check_names("tasks", tasks, tuple(TASKS))
    fusions = _check_names("fusions", FUSIONS if fusions is None else fusions, FUSIONS)
    if profile not in _PROFILES:
        raise ParameterError(f"parameter 'profile': unknown value {profile!r}; expected one of {', '.join(_PROFILES)}")
    seed = _check_int("seed", seed, 0)
    train_seed = _check_int("train_seed", train_seed, 0)
    n_boot = _check_int("n_boot", n_boot, 1)
    splits = Splits() if splits is None else splits
    config = TrainConfig() if config is None else config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    code = _code_digest()
    common = {"profile": profile, "seed": seed, "n_override": n_override, "code": code, "splits_obj": splits}
    base = {"profile": profile, "seed": seed, "n_override": n_override, "generator_version": GENERATOR_VERSION,
            "fusions": list(fusions), "train_seed": train_seed, "n_boot": n_boot, "splits": splits.model_dump(),
            "config": asdict(config), "image_encoder": IMAGE_ENCODER, "ehr_repr": EHR_REPR,
            "reference_share": REFERENCE_SHARE, "code": code}
    jobs = [(task, share) for task in tasks for share in shares]
    references: dict[str, tuple[Path, Path, np.ndarray]] = {}
    frames = []
    for task, share in progress(jobs) if progress is not None else jobs:
        params = {**base, "task": task, "image_share": share}
        share_dir = out / _label(share)
        stamp_path, csv_path = share_dir / f"{task}.json", share_dir / f"{task}.csv"
        if _read_stamp(stamp_path, params) is not None and csv_path.is_file():
            frames.append(pd.read_csv(csv_path))
            continue
        seconds: dict[str, Any] = {}
        if task not in references:
            root, img_path, seconds_ref = _reference_images(out, task, common, None)
            ids = pd.read_parquet(img_path, columns=["study_id"])["study_id"].to_numpy(dtype=str)
            references[task] = (root, img_path, ids)
            seconds.update(seconds_ref)
        root, img_path, ref_ids = references[task]
        manifest = _manifest(share_dir, profile, seed, share, splits)
        t0 = time.perf_counter()
        generate(manifest.twin_dir, profile=profile, seed=seed, image_share=share, tasks=(task,),
                 n_override=n_override, images=False)
        seconds["twin"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        cohort, ehr_path, split_seed = _cohort_and_ehr(manifest, task, root, ref_ids)
        seconds["cohort_ehr"] = round(time.perf_counter() - t0, 2)
        seconds["train"] = _train(manifest, task, cohort, img_path, ehr_path, fusions, config, train_seed, share)
        t0 = time.perf_counter()
        scores = _score(manifest, task, cohort, fusions, train_seed, n_boot)
        seconds["score"] = round(time.perf_counter() - t0, 2)
        seconds["total"] = round(sum(v if isinstance(v, float) else sum(v.values()) for v in seconds.values()), 2)
        scores.insert(0, "task", task)
        scores.insert(1, "image_share", share)
        scores["split_seed"] = split_seed
        frame = scores.loc[:, list(RESULT_COLUMNS)]
        share_dir.mkdir(parents=True, exist_ok=True)
        tmp = csv_path.with_name(csv_path.name + ".tmp")
        frame.to_csv(tmp, index=False)
        tmp.replace(csv_path)
        _write_json(stamp_path, {"params": params, "seconds": seconds})
        frames.append(pd.read_csv(csv_path))
    results = pd.concat(frames, ignore_index=True)
    tmp = out / "imbalance.csv.tmp"
    results.to_csv(tmp, index=False)
    tmp.replace(out / "imbalance.csv")
    _write_json(out / "imbalance.json", {"params": {**base, "tasks": list(tasks), "shares": list(shares)},
                                         "rows": len(results)})
    return results


def sweep_timings(out_dir: str | Path) -> pd.DataFrame:
    """Seconds per (task, share) of the last computation, read from the stamps: reference
    twin rendering and image encoding (counted on the first share computed for the task),
    the share's twin, cohort and EHR features, training (all fusions), scoring, total."""
    rows = []
    for stamp in sorted(Path(out_dir).glob("*/*.json")):
        if stamp.parent.name == "images":
            continue
        payload = json.loads(stamp.read_text())
        params, seconds = payload.get("params", {}), payload.get("seconds", {})
        if "task" not in params:
            continue
        row = {"task": params["task"], "image_share": params["image_share"]}
        for key, value in seconds.items():
            row[key] = sum(value.values()) if isinstance(value, dict) else value
        rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.sort_values(["task", "image_share"]).reset_index(drop=True) if len(frame) else frame


# ------------------------------------------------------------------------- figure and reading


def _labels(results: pd.DataFrame) -> list[str]:
    from helpers.compare import row_order

    return row_order(list(dict.fromkeys(results["model"])))


def imbalance_figure(results: pd.DataFrame, *, title: str | None = None):
    """Harrell's C against ``image_share``: one panel per task (rows) and cohort (columns),
    one line per model with its 95% bootstrap band, the oracle (true log-hazard) dashed.
    ``results`` is a frame returned by ``imbalance_sweep``. Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt

    from helpers.compare import ORACLE

    missing = [c for c in ("task", "image_share", "cohort", "model", "c_index", "lower", "upper") if c not in results]
    if missing:
        raise ValueError(f"results: missing column(s) {', '.join(missing)}")
    if results.empty:
        raise ValueError("results: no rows to plot")
    tasks = list(dict.fromkeys(results["task"]))
    cohorts = [c for c in ("Internal", "External") if c in set(results["cohort"])]
    cohorts += [c for c in dict.fromkeys(results["cohort"]) if c not in cohorts]
    labels = _labels(results)
    colours = dict(zip([m for m in labels if m != ORACLE], plt.get_cmap("tab10").colors, strict=False))
    fig, axes = plt.subplots(len(tasks), len(cohorts), figsize=(5.2 * len(cohorts), 3.6 * len(tasks)),
                             squeeze=False, sharex=True)
    for i, task in enumerate(tasks):
        for j, cohort in enumerate(cohorts):
            ax = axes[i, j]
            part = results[(results["task"] == task) & (results["cohort"] == cohort)]
            for model in labels:
                line = part[part["model"] == model].sort_values("image_share")
                if line.empty:
                    continue
                x = line["image_share"].to_numpy(float)
                if model == ORACLE:
                    ax.plot(x, line["c_index"], "k--", lw=1.5, label=model)
                    continue
                colour = colours.get(model)
                ax.plot(x, line["c_index"], "-o", ms=3, lw=1.4, color=colour, label=model)
                ax.fill_between(x, line["lower"], line["upper"], color=colour, alpha=0.12, lw=0)
            ax.axhline(0.5, color="0.6", lw=0.8, ls=":")
            n = part["n"].agg(["min", "max"]) if "n" in part and len(part) else None
            events = part["events"].agg(["min", "max"]) if "events" in part and len(part) else None
            extra = ""
            if n is not None and events is not None:
                extra = (f"\nn {_span(n)}, events {_span(events)}")
            ax.set_title(f"{task.upper()}, {cohort.lower()} cohort{extra}", fontsize=9)
            ax.set_xticks(sorted(results["image_share"].unique()))
            if i == len(tasks) - 1:
                ax.set_xlabel("image share s (CT part of the true risk)")
            if j == 0:
                ax.set_ylabel("Harrell's C")
    found: dict[str, Any] = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels(), strict=True):
            found.setdefault(name, handle)
    seen = {name: found[name] for name in labels if name in found}
    fig.legend(list(seen.values()), list(seen.keys()), loc="lower center", ncol=min(4, len(seen)), fontsize=8,
               frameon=False)
    fig.suptitle(title or "Fusion under modality imbalance: C-index against the twin's image share", fontsize=11)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * math.ceil(len(seen) / 4), 1, 1))
    return fig


def _span(values: pd.Series) -> str:
    lo, hi = int(values["min"]), int(values["max"])
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per task, cohort and share: C of image only, EHR only, the best multimodal model (by C
    on that cohort, so optimistic), its gain over the better unimodal model, whether its paired
    95% CI against image only excludes 0, and the oracle's C."""
    from helpers.compare import ORACLE

    rows = []
    for (task, cohort, share), part in results.groupby(["task", "cohort", "image_share"], sort=False):
        by = part.set_index("fusion")["c_index"]
        multi = part[~part["fusion"].isin(_UNIMODAL + ("oracle",)) & (part["model"] != ORACLE)]
        row = {"task": task, "cohort": cohort, "image_share": share,
               "n": int(part["n"].max()), "events": int(part["events"].max()),
               "image_only": _c_of(by, "image_only"), "ehr_only": _c_of(by, "ehr_only")}
        unimodal = np.nanmax([row["image_only"], row["ehr_only"]]) if not (
            np.isnan(row["image_only"]) and np.isnan(row["ehr_only"])) else np.nan
        if len(multi):
            best = multi.loc[multi["c_index"].idxmax()]
            row.update({"best_fusion": best["model"], "best_fusion_c": float(best["c_index"]),
                        "gain_over_unimodal": float(best["c_index"]) - unimodal,
                        "best_fusion_beats_image_ci": bool(best["diff_vs_image_lower"] > 0)
                        if pd.notna(best.get("diff_vs_image_lower")) else None,
                        "fusions_above_both_unimodal": int((multi["c_index"] > unimodal).sum())})
        else:
            row.update({"best_fusion": None, "best_fusion_c": np.nan, "gain_over_unimodal": np.nan,
                        "best_fusion_beats_image_ci": None, "fusions_above_both_unimodal": 0})
        row["oracle"] = _c_of(by, "oracle")
        rows.append(row)
    return pd.DataFrame(rows)


def wide_table(results: pd.DataFrame) -> pd.DataFrame:
    """Harrell's C with its 95% CI as text (``0.712 [0.651, 0.770]``): one row per task,
    cohort and model (in the paper's order, the oracle last), one column per share."""
    labels = _labels(results)
    frame = results.assign(
        cell=[f"{c:.3f} [{lo:.3f}, {hi:.3f}]" for c, lo, hi in results[["c_index", "lower", "upper"]].to_numpy()],
        order=results["model"].map({m: k for k, m in enumerate(labels)}),
    )
    table = frame.pivot_table(index=["task", "cohort", "order", "model"], columns="image_share", values="cell",
                              aggfunc="first")
    table = table.sort_index(level=["task", "cohort", "order"], ascending=[True, False, True])
    table.index = table.index.droplevel("order")
    table.columns = [f"s = {c:g}" for c in table.columns]
    return table


def _c_of(c_by_fusion: pd.Series, fusion: str) -> float:
    return float(c_by_fusion.loc[fusion]) if fusion in c_by_fusion.index else np.nan


def reading(results: pd.DataFrame) -> str:
    """A short reading of ``results`` in Markdown, every statement computed from the numbers:
    how the unimodal models follow the knob, which model is best at each share, where fusion
    gains most, how wide the intervals are, and the gap to the oracle."""
    summary = summarise(results)
    lines = []
    for (task, cohort), part in summary.groupby(["task", "cohort"], sort=False):
        part = part.sort_values("image_share")
        rows = results[(results["task"] == task) & (results["cohort"] == cohort)]
        models = rows[rows["fusion"] != "oracle"]
        first, last = part.iloc[0], part.iloc[-1]
        s0, s1 = f"{first['image_share']:g}", f"{last['image_share']:g}"
        text = [f"**{task.upper()}, {cohort.lower()} cohort** ({_span(part['n'].agg(['min', 'max']))} studies, "
                f"{_span(part['events'].agg(['min', 'max']))} events)."]
        if len(part) > 1:
            text.append(f"From s = {s0} to s = {s1}, image only goes from {first['image_only']:.3f} to "
                        f"{last['image_only']:.3f} and EHR only from {first['ehr_only']:.3f} to {last['ehr_only']:.3f}"
                        f" ({_direction(last['image_only'] - first['image_only'], 'image only')}; "
                        f"{_direction(last['ehr_only'] - first['ehr_only'], 'EHR only')}).")
        best = []
        for share, group in models.groupby("image_share"):
            top = group.loc[group["c_index"].idxmax()]
            best.append(f"s = {share:g}: {top['model']} ({top['c_index']:.3f})")
        text.append("Best model by C at each share: " + "; ".join(best) + ".")
        wins = part[part["gain_over_unimodal"] > 0]
        text.append(f"The best multimodal model is above both unimodal models at {len(wins)} of {len(part)} shares.")
        if part["gain_over_unimodal"].notna().any():
            top = part.loc[part["gain_over_unimodal"].idxmax()]
            sig = top["best_fusion_beats_image_ci"]
            text.append(f"Its largest margin over the better unimodal model is {top['gain_over_unimodal']:+.3f} "
                        f"({top['best_fusion']} at s = {top['image_share']:g})"
                        + ("" if sig is None else
                           f"; its paired 95% CI against image only {'excludes' if sig else 'includes'} 0") + ".")
            inner = part[(part["image_share"] > 0) & (part["image_share"] < 1)]["gain_over_unimodal"]
            outer = part[(part["image_share"] == 0) | (part["image_share"] == 1)]["gain_over_unimodal"]
            if len(inner) and len(outer):
                if inner.mean() <= 0:
                    verdict = ("so the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "is not reproduced here: fusion does not gain on average even at the mixed shares")
                elif inner.mean() > outer.mean():
                    verdict = ("as the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "would predict")
                else:
                    verdict = ("not as the paper's claim (fusion helps most when the modalities contribute comparably) "
                               "would predict")
                text.append(f"The mean margin is {inner.mean():+.3f} at the mixed shares and {outer.mean():+.3f} at the "
                            f"extremes, {verdict}.")
        image_max = part["image_only"].max()
        if np.isfinite(image_max) and image_max < 0.55:
            text.append(f"Image only stays at or near chance at every share (at most {image_max:.3f}): its embeddings "
                        f"carry little signal that transfers to this cohort, so the knob cannot show in them.")
        few = part[part["events"] < _FEW_EVENTS]
        if len(few):
            text.append(f"At s = {', '.join(f'{v:g}' for v in few['image_share'])} this cohort has fewer than "
                        f"{_FEW_EVENTS} events ({', '.join(str(int(v)) for v in few['events'])}): those C-indices are "
                        f"little more than noise.")
        half = ((models["upper"] - models["lower"]) / 2).median()
        text.append(f"The median half-width of a 95% interval is {half:.3f}: differences smaller than that are "
                    f"within test-set sampling noise, and each model was trained with one seed.")
        if part["oracle"].notna().any():
            best_c = models.groupby("image_share")["c_index"].max()
            gap = (part.set_index("image_share")["oracle"] - best_c).dropna()
            text.append(f"The oracle (true log-hazard) is {gap.min():.3f} to {gap.max():.3f} above the best model")
            above = gap[gap < 0]
            text[-1] += ("." if above.empty else
                         f"; at s = {', '.join(f'{v:g}' for v in above.index)} the best model scores above the oracle, "
                         f"which only test-set noise and picking the best model on the test set can explain.")
        lines.append(" ".join(text))
    if "split_seed" in results:
        for task, part in results.groupby("task", sort=False):
            seeds = part.groupby("image_share")["split_seed"].first()
            if seeds.nunique() > 1:
                lines.append(f"**{task.upper()} splits.** The outcomes change with the share, and so does the patient-level "
                             f"split where the first split seed left the validation split without an event; split seed "
                             f"used: {'; '.join(f's = {k:g}: {int(v)}' for k, v in seeds.items())}.")
    return "\n\n".join(lines)


def _direction(delta: float, name: str) -> str:
    if not np.isfinite(delta):
        return f"{name}: not available"
    if abs(delta) < 0.01:
        return f"{name} roughly flat"
    return f"{name} {'rises' if delta > 0 else 'falls'} by {abs(delta):.3f}"
