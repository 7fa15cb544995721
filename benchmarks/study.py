"""Where the time of a study run went, and how big its outputs are.

Reads the stamps that ``python -m helpers study`` writes for every notebook it ran (each
records its wall time) and prints the time per stage and task, and the size on disk of the
twin, embeddings, runs and book. Run after ``make study`` (or ``make study PROFILE=quick``):

    .venv/bin/python benchmarks/study.py --profile paper
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="paper")
    parser.add_argument("--outputs", default=str(PROJECT_ROOT / "outputs"))
    args = parser.parse_args()
    root = Path(args.outputs) / args.profile
    stamps = sorted((root / "study" / "stamps").rglob("*.json"))
    if not stamps:
        raise SystemExit(f"{root}/study/stamps: no stamps; run `make study PROFILE={args.profile}` first")
    by_stage: dict[tuple[str, str], float] = defaultdict(float)
    count: dict[tuple[str, str], int] = defaultdict(int)
    for stamp in stamps:
        key = stamp.relative_to(root / "study" / "stamps").with_suffix("").as_posix()
        task, stage = key.split("/")[:2]
        by_stage[(task, stage)] += json.loads(stamp.read_text())["seconds"]
        count[(task, stage)] += 1
    print(f"profile {args.profile}: wall time per stage (notebook runs, kernel start-up included)")
    total = 0.0
    for (task, stage), seconds in sorted(by_stage.items()):
        total += seconds
        print(f"  {task:5s} {stage:14s} {count[(task, stage)]:3d} run(s) {seconds:8.1f} s")
    print(f"  all notebooks: {total:.1f} s ({total / 60:.1f} min)")
    for task in ("pe", "mace"):
        info = root / "twin" / task / "twin.json"
        if info.is_file():
            twin = json.loads(info.read_text())
            print(f"  twin {task}: generated in {twin['timing_s']['total']:.1f} s (inside 01_cohort)")
    print("size on disk:")
    for name in ("twin", "cohorts", "embeddings", "runs", "comparisons", "study"):
        print(f"  {name:12s} {_bytes(root / name) / 1e6:9.1f} MB")
    print(f"  book/_build  {_bytes(PROJECT_ROOT / 'book' / '_build') / 1e6:9.1f} MB")


if __name__ == "__main__":
    main()
