"""Command line: ``python -m helpers {manifest check,twin,pretrain}``. The study itself is the
Snakemake workflow (``Snakefile``; ``make study``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from helpers.tasks import PROFILES

__all__ = ["main"]


def _manifest_check(args: argparse.Namespace) -> int:
    from helpers.manifest import load, summary

    manifest = load(args.path)
    print(summary(manifest))
    if manifest.data.source in ("omop", "inspect"):
        # open what the study will read: every OMOP table (cast to the CDM types) and imaging index
        from helpers.cohort import read_imaging_index
        from helpers.omop import connect, describe, source_label

        data = manifest.data
        sources = ([data.omop.tables] if data.source == "omop" else []) + ([data.inspect.omop] if data.inspect else [])
        for tables in sources:
            con = connect(tables)
            print(f"OMOP CDM source {source_label(tables)}:")
            for row in describe(con):
                absent = row["absent_cdm_columns"]
                print(f"  {row['table']}: {row['rows']:,} rows, {row['columns']} columns"
                      + (f" (without optional {', '.join(absent)})" if absent else ""))
            con.close()
        if data.source == "omop":
            for task, src in data.omop.imaging.items():
                index = read_imaging_index(src.index)
                print(f"imaging index of {task}: {len(index):,} studies of {index['person_id'].nunique():,} persons "
                      f"({src.index})")
        if data.inspect is not None:
            from helpers import inspect_release

            index = inspect_release.imaging_index(data.inspect.release)
            given = inspect_release.splits(data.inspect.release).value_counts()
            labels = inspect_release.labels(data.inspect.release).value_counts()
            role = "the external cohort of pe" if data.source == "omop" else "the study's data"
            pe = (f"; a PE on {int(inspect_release.pe_positive(data.inspect.release).sum()):,} CTPAs (the cohort "
                  f"keeps those)" if data.inspect.pe_positive_only else "")
            print(f"INSPECT release {data.inspect.release} ({role}): {len(index):,} studies of "
                  f"{index['person_id'].nunique():,} persons; splits "
                  + ", ".join(f"{k} {v:,}" for k, v in given.items())
                  + "; 12-month mortality labels " + ", ".join(f"{k} {v:,}" for k, v in labels.items()) + pe)
    print("manifest OK")
    return 0


def _twin(args: argparse.Namespace) -> int:
    from helpers.twin import generate

    started = time.perf_counter()
    summary = generate(Path(args.out), profile=args.profile, seed=args.seed, image_share=args.image_share,
                       interaction=args.interaction, tasks=tuple(args.tasks), progress=True,
                       site_shift=args.site_shift)
    print(f"digital twin ({args.profile}, seed {args.seed}, interaction {args.interaction}) written to {args.out} "
          f"in {time.perf_counter() - started:.1f} s")
    for task, info in summary["tasks"].items():
        for site, counts in info["counts"].items():
            r = info["event_rates"][site]
            print(f"  {task} {site}: {counts['studies']} studies, event fraction {r['observed_event_fraction']:.3f} "
                  f"(target {r['target_event_fraction']:.2f}), oracle C {r['oracle_c_index']:.3f}")
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from helpers.cohort import cohort_paths
    from helpers.manifest import load
    from helpers.pretrain import pretrain

    manifest = load(args.manifest)
    if args.profile is not None:
        manifest = manifest.with_profile(args.profile)
    for task in args.tasks:
        if not cohort_paths(manifest, task)["cohort"].is_file():
            raise ValueError(f"task {task!r}: no cohort at {cohort_paths(manifest, task)['cohort']}; build it first "
                             f"(snakemake {cohort_paths(manifest, task)['cohort']}, or notebooks/01_cohort.ipynb)")
        result = pretrain(manifest, task, args.encoder, progress=lambda it, **kw: tqdm(it, **kw))
        last = result.history.groupby("split")["loss"].last().to_dict()
        print(f"{task}: {args.encoder} pretrained in {result.seconds:.0f} s, final loss "
              + ", ".join(f"{k} {v:.4f}" for k, v in sorted(last.items())))
        print(f"  checkpoint {result.checkpoint}\n  to pin it in the manifest: path: {result.checkpoint}, "
              f"sha256: {result.sha256}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    manifest = sub.add_parser("manifest", help="manifest commands")
    msub = manifest.add_subparsers(dest="manifest_command", required=True)
    check = msub.add_parser("check", help="validate the manifest, verify checksums, print a summary")
    check.add_argument("path", nargs="?", default="data_manifest.yaml")
    check.set_defaults(func=_manifest_check)

    from helpers.tasks import DEFAULT_INTERACTION
    from helpers.twin.records import SITE_SHIFTS

    twin = sub.add_parser("twin", help="write the digital twin")
    twin.add_argument("--profile", choices=list(PROFILES), default="quick")
    twin.add_argument("--seed", type=int, default=0)
    twin.add_argument("--image-share", type=float, default=0.5)
    twin.add_argument("--interaction", type=float, default=DEFAULT_INTERACTION,
                      help=f"weight (kappa) of the cross-modal interaction, >= 0 (default {DEFAULT_INTERACTION})")
    twin.add_argument("--tasks", nargs="+", default=["pe", "mace"], choices=["pe", "mace"])
    twin.add_argument("--site-shift", default="all", choices=list(SITE_SHIFTS),
                      help="which of the external site's traits it keeps, the rest being the internal site's "
                           "(default all: the external site as it is)")
    twin.add_argument("--out", required=True)
    twin.set_defaults(func=_twin)

    pre = sub.add_parser("pretrain", help="pretrain a built-in foundation model (ct_mae, clmbr_mini) on the cohort")
    pre.add_argument("encoder", help="the manifest's name of the encoder (an entry of kind ct_mae or clmbr_mini)")
    pre.add_argument("--task", dest="tasks", action="append", choices=["pe", "mace"],
                     help="task(s) to pretrain for (repeat; default both)")
    pre.add_argument("--manifest", default="data_manifest.yaml")
    pre.add_argument("--profile", choices=list(PROFILES), default=None, help="digital-twin size (default: the manifest's)")
    pre.set_defaults(func=_pretrain, tasks=None)

    args = parser.parse_args(argv)
    if getattr(args, "func", None) is _pretrain and not args.tasks:
        args.tasks = ["pe", "mace"]
    try:
        return args.func(args)
    except ValueError as err:  # ManifestError, ParameterError, CohortError, ... : one clear line
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
