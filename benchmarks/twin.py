"""Time and size of the digital twin for each profile.

Generates the ``quick`` and ``paper`` profiles (or those of ``helpers.tasks.PROFILES`` named
on the command line) into a temporary folder, then prints wall time, disk size (bytes of file
contents and, in brackets, the space ``du`` would report), studies, event rates (observed and
target) and oracle C-index per task and institution. Usage::

    OMP_NUM_THREADS=1 python benchmarks/twin.py [tiny] [quick] [paper] [--seed N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from helpers.tasks import PROFILES
from helpers.twin import generate


def _sizes(path: Path) -> tuple[int, int]:
    """(sum of file sizes, allocated bytes) under ``path``."""
    content = allocated = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            st = os.stat(os.path.join(dirpath, name))
            content += st.st_size
            allocated += st.st_blocks * 512
    return content, allocated


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _run(profile: str, seed: int, root: Path) -> None:
    out = root / profile
    t0 = time.perf_counter()
    summary = generate(out, profile=profile, seed=seed)
    wall = time.perf_counter() - t0
    content, allocated = _sizes(out)
    print(f"\n== profile {profile}: {wall:.1f} s, {_mb(content)} ({_mb(allocated)} on disk)")
    for task, info in summary["tasks"].items():
        c, a = _sizes(out / task)
        t = info["timing_s"]
        print(
            f"  {task}: {t['total']:.1f} s (records {t['simulate']:.1f} s, images {t['images']:.1f} s), "
            f"{_mb(c)} ({_mb(a)} on disk)"
        )
        for site, counts in info["counts"].items():
            r = info["event_rates"][site]
            print(
                f"    {site}: {counts['studies']} studies, {counts['patients']} patients, "
                f"events {r['observed_event_fraction']:.3f} (target {r['target_event_fraction']:.2f}), "
                f"oracle C {r['oracle_c_index']:.3f}, defects {sum(counts['defects'].values())}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("profiles", nargs="*", default=["quick", "paper"], choices=list(PROFILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="write here and keep the twin")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="twin-bench-"))
    try:
        for profile in args.profiles:
            _run(profile, args.seed, root)
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
