"""How far the external site's embeddings sit from the internal ones, as the models see them.

For each task and embedding table of a finished study run (``outputs/<profile>``), fits the
models' scaler (``helpers.scaling``) on the internal ``train`` split and prints the median
length of the scaled embeddings of the external cohort over that of the internal ``test``
split (acceptance of the scaling fix: <= 1.5 for the CT embedding), next to the same ratio
under the old rule (spread floored at 1e-6, nothing dropped, nothing bounded), and how many
columns the scaler dropped.

    python benchmarks/scaling.py [--run-root outputs/paper]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helpers.cohort import read_cohort  # noqa: E402
from helpers.embeddings import read_embeddings  # noqa: E402
from helpers.scaling import Scaler, fit_scaler, length_ratio  # noqa: E402


def _old_rule(train: np.ndarray) -> Scaler:
    """The scaler before the fix: spread floored at 1e-6, every column kept, no bound."""
    return Scaler(mean=train.mean(0), scale=np.maximum(train.std(0), 1e-6), keep=np.ones(train.shape[1], bool), clip=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-root", type=Path, default=ROOT / "outputs" / "paper")
    args = parser.parse_args(argv)
    tables = sorted((args.run_root / "embeddings").glob("*/*.parquet"))
    if not tables:
        print(f"no embedding tables under {args.run_root / 'embeddings'}; run the study first (make study)")
        return 1
    print(f"{'task':5} {'table':22} {'dim':>5} {'dropped':>7} {'ratio':>6} {'old rule':>9}   (median scaled length, external / internal test)")
    for path in tables:
        task = path.parent.name
        cohort = read_cohort(args.run_root / "cohorts" / f"{task}.parquet").set_index("study_id")
        table = read_embeddings(path, tokens=False)
        split = cohort.reindex(table.study_ids)["split"].to_numpy()
        x = table.embedding.astype(np.float64)
        train, test, external = (x[split == s] for s in ("train", "test", "external"))
        if not len(external):
            continue
        scaler = fit_scaler(train)
        new = length_ratio(train, test, external, scaler=scaler)
        old = length_ratio(train, test, external, scaler=_old_rule(train))
        print(f"{task:5} {path.stem:22} {x.shape[1]:5d} {scaler.n_dropped:7d} {new:6.2f} {old:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
