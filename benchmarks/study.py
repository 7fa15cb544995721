"""Where the time of a workflow run went, and how big its outputs are.

Reads every executed notebook under an output folder (papermill records each notebook's
duration, kernel start-up excluded) and prints, per setting of the twin, the seconds per rule
and task, the sum over notebooks, the span from the first notebook's start to the last one's
end (the wall time of the run, when it ran in one go) and their ratio (how many cores were
busy on average), and the size on disk of each folder, and, when the mechanism study ran, the seconds per job and step
from its records. Run after ``make study``:

    .venv/bin/python benchmarks/study.py outputs/quick
    .venv/bin/python benchmarks/study.py outputs/paper --top 10

To time a whole run including kernel start-ups and Snakemake itself, time the command:
``/usr/bin/time make study PROFILE=quick CORES=2 SNAKEFLAGS=--forceall``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from datetime import datetime
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def _record(path: Path) -> dict | None:
    meta = json.loads(path.read_text()).get("metadata", {}).get("papermill", {})
    if not meta.get("start_time") or meta.get("duration") is None:
        return None
    start = datetime.fromisoformat(meta["start_time"])
    return {"start": start.timestamp(), "seconds": float(meta["duration"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="?", default=str(PROJECT_ROOT / "outputs" / "quick"),
                        help="an output folder: outputs/<profile> or one setting's folder under it")
    parser.add_argument("--top", type=int, default=5, help="list the slowest notebooks")
    args = parser.parse_args()
    base = Path(args.outputs)
    notebooks = [p for p in base.rglob("notebooks/**/*.ipynb") if not p.name.endswith(".failed.ipynb")]
    if not notebooks:
        raise SystemExit(f"{base}: no executed notebook; run `make study` first")
    by_rule: dict[tuple[str, str], float] = defaultdict(float)
    count: dict[tuple[str, str], int] = defaultdict(int)
    records = []
    for path in notebooks:
        record = _record(path)
        if record is None:
            continue
        relative = path.relative_to(path.parents[len(path.relative_to(base).parts) - 1])
        parts = path.as_posix().split("/notebooks/", 1)[1].split("/")
        task, stage = parts[0], parts[1].removesuffix(".ipynb") if parts[0] != "results" else parts[1].removesuffix(".ipynb")
        by_rule[(task, stage)] += record["seconds"]
        count[(task, stage)] += 1
        records.append({**record, "path": relative})
    total = sum(r["seconds"] for r in records)
    span = max(r["start"] + r["seconds"] for r in records) - min(r["start"] for r in records)
    settings = sorted({p.as_posix().split("/notebooks/", 1)[0] for p in notebooks})
    print(f"{base}: {len(records)} executed notebooks in {len(settings)} setting folder(s)")
    print("seconds per task and rule (notebook execution, kernel start-up excluded):")
    for (task, stage), seconds in sorted(by_rule.items()):
        print(f"  {task:7s} {stage:14s} {count[(task, stage)]:4d} run(s) {seconds:8.1f} s")
    print(f"sum over notebooks: {total:.0f} s ({total / 60:.1f} min)")
    print(f"first start to last end: {span:.0f} s ({span / 60:.1f} min); sum / span = {total / span:.2f} "
          "(cores busy on average, if the run went in one go)")
    print(f"slowest {args.top}:")
    for r in sorted(records, key=lambda r: -r["seconds"])[: args.top]:
        print(f"  {r['seconds']:7.1f} s  {r['path']}")
    print("size on disk:")
    for folder in sorted({Path(s) for s in settings}):
        for name in ("twin", "cohorts", "embeddings", "runs", "comparisons"):
            size = _bytes(folder / name)
            if size:
                print(f"  {folder.relative_to(base.parent) if folder.is_relative_to(base.parent) else folder}/{name:12s} "
                      f"{size / 1e6:9.1f} MB")
    print(f"  book/_build {_bytes(PROJECT_ROOT / 'book' / '_build') / 1e6:9.1f} MB")
    _mechanism(base)


def _mechanism(base: Path) -> None:
    """Where the mechanism study's time went, from each job's record
    (``<output_dir>/<profile>/sweep/mechanism-<task>-seed-<n>.csv``, ``helpers.mechanism``)."""
    import pandas as pd

    records = sorted(base.parent.glob("*/sweep/mechanism-*-seed-*.csv")) + sorted(base.glob("*/sweep/mechanism-*.csv"))
    if not records:
        return
    frame = pd.concat([pd.read_csv(p) for p in records], ignore_index=True)
    steps = [c for c in frame.columns if c.endswith("_seconds")]
    per_job = frame.groupby(["task", "twin_seed"])[steps].sum()
    print(f"mechanism study: {len(per_job)} job(s), {len(frame)} settings; internal test events "
          f"{frame['test_events'].min()} to {frame['test_events'].max()}")
    print("  seconds per job and step: " + ", ".join(
        f"{c.removesuffix('_seconds')} {per_job[c].mean():.0f}" for c in steps)
        + f"; total {per_job.sum(axis=1).mean():.0f} s per job (mean), {per_job.to_numpy().sum():.0f} s in all")
    print(f"  training per setting: {frame['train_seconds'].median():.1f} s (median), "
          f"{frame['train_seconds'].max():.1f} s (max)")


if __name__ == "__main__":
    main()
