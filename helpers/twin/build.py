"""Writing the twin: ``generate`` and, per task, ``_generate_task``.

``generate`` checks its arguments, takes the numbers of CT studies from the profile
(``helpers.tasks.PROFILES[profile].sizes``, or ``n_override``) and writes each task into
``<out_dir>/<task>.tmp`` before renaming it: the OMOP tables (``records``), the imaging
index, the ground truth, the volumes and masks (``phantom``, rendered by ``_run_jobs``, in a
process pool when there are many) and ``twin.json`` (parameters, counts, target and observed
event rates, oracle C-index, timing and size).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydicom.uid import generate_uid

from helpers.imaging import IMAGING_INDEX_COLUMNS
from helpers.tasks import DEFAULT_INTERACTION, PROFILES, TASKS
from helpers.twin.factors import _SPECS, FACTOR_COLUMNS, _check_interaction, _standardiser
from helpers.twin.outcomes import (
    _Cohort,
    _oracle_c,
    _recorded_outcomes,
    _simulate_cohort,
    _target_rates,
)
from helpers.twin.phantom import _image_path, _render_and_write
from helpers.twin.records import (
    INSTITUTIONS,
    SITE_SHIFTS,
    _build_ehr,
    _i64,
    _omop_tables,
    _person_ids,
    _site,
    _study_ids,
    _ts,
)

__all__ = ["GENERATOR_VERSION", "generate"]

# 1.3.0: sizes from helpers.tasks.PROFILES (new ``tiny``; ``quick`` larger), a profile's floor
# on the event rates, the ``interaction`` parameter. The ``paper`` profile's files are those
# of 1.2.0.
# 1.4.0: each mask file also holds the anatomy map (heart, pulmonary arteries) for saliency.
# 1.6.0: records as a CDM export writes them: conditions as SNOMED CT concepts (ICD-10-CM in
# condition_source_concept_id; two codes without a standard mapping), drugs as RxNorm clinical
# drugs, lab units as UCUM concepts; concept_ancestor and concept_relationship written. The
# external site's shifts (``site_shift``).
GENERATOR_VERSION = "1.6.0"


def _image_jobs(
    task: str,
    task_index: int,
    seed: int,
    root: Path,
    parts: list[tuple[str, _Cohort, dict[str, Any], list[str]]],
    shift: str = "all",
    institutions: tuple[str, ...] = tuple(INSTITUTIONS),
) -> list[dict[str, Any]]:
    spec = _SPECS[task]
    jobs = []
    k = 0
    for inst, c, ehr, study_ids in parts:
        site = _site(inst, shift)
        name, _, fmt = INSTITUTIONS[inst]
        rng = np.random.default_rng([seed, task_index, 0 if inst == "internal" else 1, 3])
        body = np.clip(1.0 + 0.08 * rng.standard_normal(c.n_patients), 0.8, 1.25)
        pids = _person_ids(inst, c.n_patients)
        f = c.factors
        # pleural effusion: heart failure, or an unrelated cause (never an EHR-only factor)
        other = (rng.random(len(c.study_patient)) < 0.12) * rng.random(len(c.study_patient))
        effusion = np.clip(0.07 * (f["cardiac_dysfunction"] - 0.8) + 0.12 * other, 0.0, 0.35)
        if inst not in institutions:
            k += len(c.study_patient)  # each study keeps its index (and so its noise stream)
            continue
        for s in range(len(c.study_patient)):
            p = c.study_patient[s]
            sid = study_ids[s]
            when = ehr["studies"]["time"][s].astype("datetime64[s]").astype(object)
            jobs.append(
                {
                    "seed": seed,
                    "task_index": task_index,
                    "study_index": k,
                    "study_id": sid,
                    "root": str(root),
                    "format": fmt,
                    "image_path": _image_path(name, sid, fmt),
                    "patient_id": str(pids[p]),
                    "study_uid": generate_uid(entropy_srcs=["twin", str(seed), task, sid, "study"]),
                    "series_uid": generate_uid(
                        entropy_srcs=["twin", str(seed), task, sid, "series"]
                    ),
                    "study_datetime": when,
                    "institution_name": name,
                    "contrast": spec.contrast,
                    "clot_burden": float(f["clot_burden"][s]),
                    "rv_strain": float(f["rv_strain"][s]),
                    "pa_dilation": float(f["pa_dilation"][s]),
                    "coronary_calcium": float(f["coronary_calcium"][s]),
                    "cardiac_dysfunction": float(f["cardiac_dysfunction"][s]),
                    "effusion": float(effusion[s]),
                    "body_scale": float(body[p]),
                    "noise_sd": site.noise_sd,
                    "hu_offset": site.hu_offset,
                    "slice_mm": site.slice_mm,
                    "n_slices": site.n_slices,
                    "pixel_mm": site.pixel_mm,
                    "matrix": site.matrix,
                }
            )
            k += 1
    return jobs


def _run_jobs(
    jobs: list[dict[str, Any]], workers: int, progress: bool, label: str
) -> list[tuple[int, int, int]]:
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(jobs), desc=label, unit="study")
    results = []
    if workers <= 1 or len(jobs) < 64:
        for job in jobs:
            results.append(_render_and_write(job))
            if bar is not None:
                bar.update(1)
    else:
        # fork: workers need nothing from the caller's __main__ (spawn would re-import it)
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            for res in pool.map(_render_and_write, jobs, chunksize=32):
                results.append(res)
                if bar is not None:
                    bar.update(1)
    if bar is not None:
        bar.close()
    return sorted(results)



# ---------------------------------------------------------------- public entry point


def _check_sizes(profile: str, n_override: dict[str, int] | None) -> dict[str, dict[str, int]]:
    if profile not in PROFILES:
        raise ValueError(f"generate: profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    sizes = {t: dict(v) for t, v in PROFILES[profile].sizes.items()}
    if n_override is not None:
        unknown = set(n_override) - set(INSTITUTIONS)
        if unknown:
            raise ValueError(
                f"generate: n_override keys must be among internal, external; got {sorted(unknown)}"
            )
        for inst, n in n_override.items():
            if not isinstance(n, int | np.integer) or n < 5:
                raise ValueError(
                    f"generate: n_override[{inst!r}] must be an integer >= 5 studies, got {n!r}"
                )
            for t in sizes:
                sizes[t][inst] = int(n)
    return sizes


def _dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


def generate(
    out_dir: str | os.PathLike[str],
    *,
    profile: str = "quick",
    seed: int = 0,
    image_share: float = 0.5,
    tasks: tuple[str, ...] | list[str] = ("pe", "mace"),
    n_override: dict[str, int] | None = None,
    progress: bool = False,
    images: bool | tuple[str, ...] = True,
    workers: int | None = None,
    interaction: float = DEFAULT_INTERACTION,
    site_shift: str = "all",
) -> dict[str, Any]:
    """Write the digital twin under ``out_dir/<task>/`` and return its summary.

    ``profile``: ``"tiny"``, ``"quick"`` or ``"paper"`` (``helpers.tasks.PROFILES``): the
    numbers of CT studies per institution (``sizes``) and a floor on the event rates
    (``min_event_rate``): each institution's target event fraction within the horizon is the
    paper's, raised to the floor where the profile sets one (``tiny`` and ``quick``, teaching
    twins whose small cohorts need enough events; ``paper`` keeps the paper's rates).
    ``n_override`` (e.g. ``{"internal": 40, "external": 20}``) replaces the sizes for every
    task (the floor stays). ``seed``: int >= 0; equal arguments give identical parquet files.
    ``image_share`` in [0, 1] (``data.synthetic.image_share`` in the manifest): the CT's share of
    the exclusive information. The log-hazard is ``beta * (sqrt(s) * ct + sqrt(1 - s) * ehr +
    gamma * shared + kappa * interaction)`` (see the package docstring), each part standardised
    (mean 0, sd 1 in the internal reference population): at ``s = 0`` the CT-exclusive part is
    0, at ``s = 1`` the EHR-exclusive part is; the shared part and the cross-modal interaction
    stay, so fusion can help at any ``s``. ``interaction`` (kappa, a finite number >= 0;
    default ``helpers.tasks.DEFAULT_INTERACTION``, ``data.synthetic.interaction`` in the
    manifest): the interaction's weight; 0 removes it (the negative control). ``images=False``
    writes everything but the volumes and masks (the imaging index then points at files that
    do not exist); a tuple of institution keys (``("external",)``) renders only theirs.
    ``site_shift`` (a key of ``helpers.twin.records.SITE_SHIFTS``; default ``"all"``, the
    external site as it is): which of the external site's traits (its scanner's HU offset,
    noise, slice thickness; its record keeping's completeness; its lab units) it keeps, the
    rest being the internal site's. The patients, their factors and outcomes and the internal
    site do not depend on it. ``workers``: processes rendering volumes (default: up to 2); results do not
    depend on it.

    Each task is written to ``out_dir/<task>.tmp`` and renamed at the end, replacing an older
    twin. The summary, also written to ``out_dir/<task>/twin.json``, maps ``tasks`` ->
    task -> parameters (with ``interaction`` and ``min_event_rate``), counts, event rates (the
    target event fraction within the task horizon, the paper's, and the observed one, from the
    records), oracle C-index of ``true_log_hazard`` (``helpers.metrics.harrell_c`` on the
    studies a cohort builder keeps), defects and wall time.
    """
    t_all = time.perf_counter()
    sizes = _check_sizes(profile, n_override)
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"generate: seed must be an integer >= 0, got {seed!r}")
    image_share = float(image_share)
    if not 0.0 <= image_share <= 1.0:
        raise ValueError(f"generate: image_share must be in [0, 1], got {image_share}")
    interaction = _check_interaction(interaction, "generate")
    if site_shift not in SITE_SHIFTS:
        raise ValueError(f"generate: site_shift must be one of {', '.join(SITE_SHIFTS)}, got {site_shift!r}")
    if isinstance(images, bool):
        rendered = tuple(INSTITUTIONS) if images else ()
    else:
        rendered = tuple(images)
        if not set(rendered) <= set(INSTITUTIONS):
            raise ValueError(f"generate: images must be True, False or some of {', '.join(INSTITUTIONS)}, "
                             f"got {images!r}")
    tasks = tuple(tasks)
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"generate: unknown task {t!r}; expected some of {', '.join(TASKS)}")
    n_workers = min(2, os.cpu_count() or 1) if workers is None else int(workers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "generator_version": GENERATOR_VERSION,
        "out_dir": str(out),
        "tasks": {},
    }
    for t in tasks:
        task_index = list(TASKS).index(t)
        summary["tasks"][t] = _generate_task(
            out,
            t,
            task_index,
            int(seed),
            image_share,
            interaction,
            profile,
            sizes[t],
            rendered,
            n_workers,
            progress,
            site_shift,
        )
    summary["wall_time_s"] = round(time.perf_counter() - t_all, 3)
    return summary


def _generate_task(
    out: Path,
    task: str,
    task_index: int,
    seed: int,
    image_share: float,
    interaction: float,
    profile: str,
    sizes: dict[str, int],
    images: tuple[str, ...],
    workers: int,
    progress: bool,
    shift: str = "all",
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = _SPECS[task]
    tmp = out / f"{task}.tmp"
    final = out / task
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "omop").mkdir(parents=True)
    (tmp / "ground_truth" / "masks").mkdir(parents=True)
    std = _standardiser(task, spec, seed, task_index)
    min_event_rate = PROFILES[profile].min_event_rate
    targets = _target_rates(task, min_event_rate)

    parts = []
    for inst in INSTITUTIONS:
        c = _simulate_cohort(
            task, task_index, inst, sizes[inst], seed, image_share, std, interaction, targets[inst]
        )
        ehr = _build_ehr(task, inst, c, seed, task_index, shift)
        parts.append((inst, c, ehr, _study_ids(task, inst, len(c.study_patient))))
    t_sim = time.perf_counter() - t0

    tables = _omop_tables(task, [(i, c, e) for i, c, e, _ in parts], shift)
    for name, table in tables.items():
        pq.write_table(table, tmp / "omop" / f"{name}.parquet")

    index_cols: dict[str, list[Any]] = {k: [] for k in IMAGING_INDEX_COLUMNS}
    gt: dict[str, list[Any]] = {}
    rates: dict[str, Any] = {}
    counts: dict[str, Any] = {}
    for inst, c, ehr, sids in parts:
        name, _, fmt = INSTITUTIONS[inst]
        pids = _person_ids(inst, c.n_patients)[c.study_patient]
        index_cols["study_id"] += sids
        index_cols["person_id"].append(pids)
        index_cols["institution"] += [name] * len(sids)
        index_cols["study_datetime"].append(ehr["studies"]["time"])
        index_cols["image_path"] += [_image_path(name, s, fmt) for s in sids]
        index_cols["image_format"] += [fmt] * len(sids)
        rec = _recorded_outcomes(task, c, ehr)
        valid = rec["valid"]
        true_time = c.event_time[c.study_patient] - c.study_offset
        cols = {
            "study_id": np.array(sids, dtype=object),
            "person_id": pids,
            "institution": np.array([name] * len(sids), dtype=object),
            **{k: c.factors[k] for k in FACTOR_COLUMNS},
            **c.hazard,
            "true_event_time_days": true_time,
            "first_event_is_death": c.fatal[c.study_patient],
            "recorded_time_days": rec["time"],
            "recorded_event": rec["event"],
            "defect": c.defect,
        }
        for k, v in cols.items():
            gt.setdefault(k, []).append(np.asarray(v))
        rates[name] = {
            "target_event_fraction": targets[inst],
            "paper_event_fraction": spec.target_rate[inst],
            "observed_event_fraction": round(float(rec["event"][valid].mean()), 4),
            "oracle_c_index": round(
                _oracle_c(
                    rec["time"][valid], rec["event"][valid], c.hazard["true_log_hazard"][valid]
                ),
                4,
            ),
            "baseline_log_hazard": round(c.baseline, 6),
        }
        counts[name] = {
            "studies": int(len(sids)),
            "patients": int(c.n_patients),
            "events": int(rec["event"][valid].sum()),
            "defects": {
                d: int((c.defect == d).sum()) for d in ("zero_follow_up", "death_before_index")
            },
        }

    index_table = pa.table(
        {
            "study_id": pa.array(index_cols["study_id"], type=pa.string()),
            "person_id": _i64(np.concatenate(index_cols["person_id"])),
            "institution": pa.array(index_cols["institution"], type=pa.string()),
            "study_datetime": _ts(np.concatenate(index_cols["study_datetime"])),
            "image_path": pa.array(index_cols["image_path"], type=pa.string()),
            "image_format": pa.array(index_cols["image_format"], type=pa.string()),
        }
    )
    pq.write_table(index_table, tmp / "imaging_index.parquet")
    gt_cat = {k: np.concatenate(v) for k, v in gt.items()}
    gt_table = pa.table(
        {
            k: (pa.array(v.tolist(), type=pa.string()) if v.dtype == object else pa.array(v))
            for k, v in gt_cat.items()
        }
    )
    pq.write_table(gt_table, tmp / "ground_truth" / "factors.parquet")

    t_img = time.perf_counter()
    if images:
        for inst in images:
            (tmp / "images" / INSTITUTIONS[inst][0]).mkdir(parents=True)
        jobs = _image_jobs(task, task_index, seed, tmp, parts, shift, images)
        res = _run_jobs(jobs, workers, progress, f"{task} CT")
        by_index = {job["study_index"]: job for job in jobs}
        pq.write_table(
            pa.table(
                {
                    "study_id": pa.array(
                        [by_index[i]["study_id"] for i, _, _ in res], type=pa.string()
                    ),
                    "embolus_voxels": _i64([r[1] for r in res]),
                    "calcification_voxels": _i64([r[2] for r in res]),
                }
            ),
            tmp / "ground_truth" / "lesions.parquet",
        )
    t_img = time.perf_counter() - t_img

    info = {
        "generator_version": GENERATOR_VERSION,
        "task": task,
        "parameters": {
            "profile": profile,
            "seed": seed,
            "image_share": image_share,
            "interaction": interaction,
            "min_event_rate": min_event_rate,
            "sizes": sizes,
            "images": len(images) == len(INSTITUTIONS) or (list(images) if images else False),
            "site_shift": shift,
        },
        "counts": counts,
        "event_rates": rates,
        "omop_rows": {k: int(v.num_rows) for k, v in tables.items()},
        "timing_s": {
            "simulate": round(t_sim, 3),
            "images": round(t_img, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    info["disk_bytes"] = _dir_bytes(tmp)
    (tmp / "twin.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return info
