"""Cohort build time from each kind of OMOP source, on the paper-sized twin.

Writes the paper profile's PE and MACE records (no volumes) into a temporary folder, then builds
each task's cohort and its one-hot features from the same tables as parquet files, a DuckDB
file, CSV files and a scratch PostgreSQL server (``helpers.omop.scratch_postgres``; skipped
when PostgreSQL's server tools are not on the PATH), and prints the seconds of each step and
the ratio to parquet. Every source must give the parquet cohort row for row; the script stops
if one does not. Usage::

    OMP_NUM_THREADS=1 python benchmarks/cohort_sources.py [--tasks pe mace] [--seed N]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import duckdb
import pandas as pd

from helpers import cohort as hc
from helpers.ehr import onehot_features
from helpers.omop import connect, load_into_postgres, scratch_postgres
from helpers.twin import generate


def _build(source, twin: Path, task: str) -> tuple[dict[str, float], pd.DataFrame]:
    clock = [time.perf_counter()]
    con = connect(source)
    clock.append(time.perf_counter())
    index = hc.read_imaging_index(twin / "imaging_index.parquet")
    cohort = hc.build_cohort(con, index, task, imaging_root=twin, check_files=False).cohort
    clock.append(time.perf_counter())
    onehot_features(con, cohort, task)
    clock.append(time.perf_counter())
    con.close()
    steps = dict(zip(("open", "cohort", "features"), (b - a for a, b in zip(clock, clock[1:], strict=False)), strict=True))
    return steps, cohort.sort_values("study_id").reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["pe", "mace"])
    parser.add_argument("--seed", type=int, default=20260616)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cohort-sources-"))
    try:
        generate(root / "twin", profile="paper", seed=args.seed, tasks=tuple(args.tasks), images=False)
        postgres = scratch_postgres() if shutil.which("initdb") and shutil.which("pg_ctl") else None
        url = postgres.__enter__() if postgres else None
        try:
            for task in args.tasks:
                twin = root / "twin" / task
                parquet = twin / "omop"
                database = root / f"{task}.duckdb"
                csv = root / f"{task}-csv"
                csv.mkdir()
                con = duckdb.connect(str(database))
                for path in sorted(parquet.glob("*.parquet")):
                    con.execute(f"CREATE TABLE {path.stem} AS SELECT * FROM read_parquet('{path}')")
                    con.execute(f"COPY {path.stem} TO '{csv / (path.stem + '.csv')}' (HEADER)")
                con.close()
                sources = {"parquet": parquet, "duckdb": database, "csv": csv}
                if url:
                    load_into_postgres(url, parquet, schema=task)
                    sources["postgresql"] = f"{url}&options=-csearch_path%3D{task}"
                rows = pd.read_parquet(parquet / "person.parquet").shape[0]
                print(f"{task}: {len(pd.read_parquet(twin / 'imaging_index.parquet')):,} studies, {rows:,} persons")
                reference, base = None, None
                for name, source in sources.items():
                    steps, cohort = _build(source, twin, task)
                    if reference is None:
                        reference, base = cohort, sum(steps.values())
                    else:
                        pd.testing.assert_frame_equal(cohort, reference)
                    total = sum(steps.values())
                    print(f"  {name:<10} open {steps['open']:6.2f} s  cohort {steps['cohort']:6.2f} s  features "
                          f"{steps['features']:6.2f} s  total {total:6.2f} s  ({total / base:4.1f} x parquet)")
            if not url:
                print("PostgreSQL: skipped (initdb and pg_ctl are not on the PATH)")
        finally:
            if postgres:
                postgres.__exit__(None, None, None)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
