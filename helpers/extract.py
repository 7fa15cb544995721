"""Embedding extraction for one task, modality and encoder named in the manifest.

``extract(manifest, task, modality, name)`` is what ``02_embeddings.ipynb`` and
``benchmarks/embeddings.py`` run: it reads the cohort, builds the frozen encoder that
``manifest.encoders.<modality>.<name>`` declares (its ``kind`` says which), encodes every
study and writes ``embeddings/<task>/<modality>-<name>.parquet`` (DESIGN.md format) with the
encoder, its checkpoint hash and its preprocessing in the table's metadata. A ``table`` entry
(bring your own embeddings) is checked against the cohort and copied in.

An image encoder leaves out a study whose CT cannot be read (``load_volume`` refuses it, or the
file is gone) and goes on: the study is absent from the table, listed with its reason in
``<modality>-<name>.exclusions.csv`` next to it (``helpers.embeddings.exclusions_path``;
identifiers, so not for the book), and counted by error class in the table's metadata
(``excluded``). Training then treats its image as missing. If no study can be read, the
extraction stops with the first reasons.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from helpers import cohort as hc
from helpers.embeddings import (
    EmbeddingError,
    embedding_path,
    exclusions_path,
    read_embeddings,
    write_embeddings,
    write_exclusions,
)
from helpers.manifest import (
    PRETRAINED_KINDS,
    EncoderSpec,
    Manifest,
    ManifestError,
    default_checkpoint,
    sha256_path,
)
from helpers.tasks import check_choice, get_task

__all__ = ["Extraction", "encoder_spec", "checkpoint_for", "extract", "meds_dir", "require_meds"]

MODALITIES = ("image", "ehr")


@dataclass
class Extraction:
    """What ``extract`` did: the table path, the encoder's description, counts and timings.

    ``n_studies``: studies in the table. ``excluded``: the studies an image encoder left out
    because their CT could not be read, one dict each with the keys
    ``helpers.embeddings.EXCLUSION_COLUMNS`` (also written to ``exclusions``, the CSV next to
    the table; None for encoders that read no images)."""

    path: Path
    modality: str
    name: str
    kind: str
    n_studies: int
    dim: int
    seconds: float
    metadata: dict = field(default_factory=dict)
    stats: dict = field(default_factory=dict)
    excluded: list[dict] = field(default_factory=list)
    exclusions: Path | None = None


def encoder_spec(manifest: Manifest, modality: str, name: str) -> EncoderSpec:
    """The manifest's entry ``encoders.<modality>.<name>``; a clear error lists the declared
    ones when it is missing."""
    check_choice("modality", modality, MODALITIES)
    specs = getattr(manifest.encoders, modality)
    if name not in specs:
        declared = ", ".join(specs) or "none"
        raise ManifestError(
            f"{manifest.path}: parameter 'encoder': {name!r} is not declared under encoders.{modality} "
            f"(declared: {declared})"
        )
    return specs[name]


def checkpoint_for(manifest: Manifest, task: str, name: str, spec: EncoderSpec) -> tuple[Path | None, str | None]:
    """The checkpoint of encoder ``name`` and its sha256: the manifest's ``path`` (verified by
    ``manifest.load``), or for the study's own models the one ``python -m helpers pretrain``
    wrote, checked against the hash recorded when it was written."""
    if spec.kind == "builtin":
        return None, None
    if spec.path is not None:
        return spec.path, spec.sha256
    if spec.kind not in PRETRAINED_KINDS:
        raise ManifestError(f"{manifest.path}: encoders.*.{name}.path: required for kind {spec.kind!r}")
    path = default_checkpoint(manifest, task, name)
    record = path.with_name(f"{path.name}.json")
    if not path.is_dir() or not record.is_file():
        raise FileNotFoundError(
            f"encoder {name!r} ({spec.kind}) for task {task!r}: no checkpoint at {path}; pretrain it first with "
            f"`python -m helpers pretrain {name} --task {task}` (or run notebooks/02_pretrain.ipynb)"
        )
    expected = json.loads(record.read_text())["sha256"]
    actual = sha256_path(path)
    if actual != expected:
        raise ManifestError(
            f"encoder {name!r} for task {task!r}: checkpoint {path} has sha256 {actual}, but {record.name} recorded "
            f"{expected} when it was written (changed or partly written; pretrain it again)"
        )
    return path, actual


def meds_dir(manifest: Manifest, task: str) -> Path:
    """Where the task's OMOP records are exported in MEDS: ``<run_root>/meds/<task>``."""
    return manifest.run_root / "meds" / task


def require_meds(manifest: Manifest, task: str) -> Path:
    """The task's MEDS export (``meds_dir``), written by the cohort step when the manifest has
    an EHR encoder that reads MEDS (``helpers.cohort.MEDS_KINDS``). A folder without
    ``data/*.parquet`` (what ``helpers.meds.read_meds`` reads) is refused with an error that
    names it and says how to write it."""
    folder = meds_dir(manifest, task)
    if not any((folder / "data").rglob("*.parquet")):
        cohort = hc.cohort_paths(manifest, task)["cohort"]
        state = "has no data/*.parquet" if folder.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"task {task!r}: no MEDS export at {folder} (the folder {state}); it is written by the cohort step "
            f"when the manifest declares an EHR encoder of kind clmbr_mini or clmbr: run notebooks/01_cohort.ipynb "
            f"for this task, or `snakemake {cohort}`"
        )
    return folder


def _imaging_of(manifest: Manifest, task: str, studies: list[str]) -> pd.DataFrame:
    """The CT files of ``studies`` from the imaging index itself (not the cohort's imaging
    table), indexed by study id, with absolute paths."""
    imaging = hc.imaging_files(hc.task_index(manifest, task), Path("/"), studies).set_index("study_id")
    unknown = [s for s in studies if s not in imaging.index]
    if unknown:
        where = " or ".join(part.label for part in hc.task_parts(manifest, task))
        raise EmbeddingError(f"parameter 'studies': {len(unknown)} studies are not in {where}, "
                             f"e.g. {', '.join(unknown[:5])}")
    return imaging.loc[studies]


def _image(manifest: Manifest, task: str, name: str, spec: EncoderSpec, cohort: pd.DataFrame, imaging: pd.DataFrame,
           source: Path, *, device: str, batch_size: int, num_workers: int, progress: Callable | None,
           excluded: list[dict]) -> tuple:
    """Encode the cohort's CTs (their files in ``imaging``, read from ``source``); a study whose
    CT cannot be read is left out of the returned ids and rows, and appended to ``excluded``
    (dicts with ``EXCLUSION_COLUMNS``)."""
    from helpers.encoders import SlicePreprocess, VolumeDataset, encode_volumes, image_encoder

    checkpoint, sha = checkpoint_for(manifest, task, name, spec)
    model = image_encoder(name, spec, default_checkpoint=checkpoint)
    missing = [s for s in cohort["study_id"] if s not in imaging.index]
    if missing:
        raise EmbeddingError(f"{source}: {len(missing)} cohort studies have no image, e.g. {', '.join(missing[:5])}")
    imaging = imaging.loc[cohort["study_id"]]
    preprocess = SlicePreprocess(window_hu=get_task(task).window_hu, size=model.input_size)
    dataset = VolumeDataset(list(cohort["study_id"]), list(imaging["image_path"]), preprocess)
    stats: dict = {}
    unreadable: list = []
    embedding, tokens = encode_volumes(model, dataset, batch_size=batch_size, device=device, num_workers=num_workers,
                                       progress=progress, stats=stats, excluded=unreadable)
    left_out = {err.study_id for err in unreadable}
    excluded.extend({"study_id": err.study_id, "image_path": err.path, "error": err.error, "reason": err.reason}
                    for err in unreadable)
    table = embedding_path(manifest.run_root, task, "image", name)
    metadata = {"encoder": name, "kind": spec.kind, "modality": "image", "checkpoint": str(checkpoint) if checkpoint else None,
                "checkpoint_sha256": sha, "model": model.describe(), "preprocessing": preprocess.describe(), "frozen": True,
                "excluded": {"studies": len(unreadable), "by_error": dict(Counter(err.error for err in unreadable)),
                             "file": exclusions_path(table).name}}
    return [s for s in cohort["study_id"] if s not in left_out], embedding, tokens, metadata, stats


def _ehr(manifest: Manifest, task: str, name: str, spec: EncoderSpec, cohort: pd.DataFrame, *, device: str,
         progress: Callable | None) -> tuple:
    if spec.kind == "builtin":
        if name != "onehot":
            raise ManifestError(f"{manifest.path}: encoders.ehr.{name}: the built-in EHR encoder is 'onehot'")
        from helpers.ehr import onehot_features

        con, _ = hc.connect_task(manifest, task)
        try:
            onehot = onehot_features(con, cohort, task)
        finally:
            con.close()
        names = [c for c in onehot.features.columns if c != "study_id"]
        metadata = {"encoder": name, "kind": "builtin", "modality": "ehr", "checkpoint_sha256": None, "features": names,
                    "unusable_measurements": int(onehot.unusable_measurements["rows"].sum())
                    if len(onehot.unusable_measurements) else 0}
        return list(onehot.features["study_id"]), onehot.features[names].to_numpy(), None, metadata, {}
    if spec.kind not in hc.MEDS_KINDS:
        raise ManifestError(f"{manifest.path}: encoders.ehr.{name}: kind {spec.kind!r} is not an EHR encoder "
                            "(expected builtin, clmbr_mini, clmbr or table)")
    checkpoint, sha = checkpoint_for(manifest, task, name, spec)
    folder = require_meds(manifest, task)
    if spec.kind == "clmbr_mini":
        from helpers.encoders.clmbr_mini import ClmbrMiniEncoder
        from helpers.meds import read_meds

        encoder = ClmbrMiniEncoder(checkpoint)
        embedding = encoder.embed(read_meds(folder), cohort)
        stats = dict(encoder.last_stats)
        metadata = {"encoder": name, "kind": spec.kind, "modality": "ehr", "checkpoint": str(checkpoint),
                    "checkpoint_sha256": sha, "model": encoder.describe(), "frozen": True}
        return list(cohort["study_id"]), embedding, None, metadata, stats
    return _clmbr_femr(manifest, task, name, spec, cohort, folder, checkpoint, sha, device=device)


def _clmbr_femr(manifest: Manifest, task: str, name: str, spec: EncoderSpec, cohort: pd.DataFrame, folder: Path,
                checkpoint: Path, sha: str, *, device: str) -> tuple:
    """CLMBR-T-base runs in the femr environment (``spec.python``): the cohort goes to a
    temporary parquet, the script writes the table, which is read back and checked here."""
    if spec.python is None:
        raise ManifestError(f"{manifest.path}: encoders.ehr.{name}.python: required for kind 'clmbr' "
                            "(the python of the environment built from environment-clmbr.yml)")
    out = embedding_path(manifest.run_root, task, "ehr", name).with_suffix(".femr.parquet")
    cohort_file = out.with_suffix(".cohort.parquet")
    cohort[["study_id", "person_id", "index_time"]].to_parquet(cohort_file, index=False)
    script = Path(__file__).resolve().parent / "encoders" / "clmbr_femr.py"
    command = [str(spec.python), str(script), "--meds", str(folder), "--cohort", str(cohort_file),
               "--model", str(checkpoint), "--out", str(out), "--device", device]
    result = subprocess.run(command, capture_output=True, text=True)
    cohort_file.unlink(missing_ok=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-20:])
        raise RuntimeError(f"CLMBR (femr) failed (exit {result.returncode}): {' '.join(command)}\n{tail}")
    table = read_embeddings(out, tokens=False).align(cohort["study_id"], source=str(out))
    out.unlink()
    metadata = {**table.metadata, "encoder": name, "kind": "clmbr", "modality": "ehr", "checkpoint": str(checkpoint),
                "checkpoint_sha256": sha, "frozen": True}
    return list(table.study_ids), table.embedding, None, metadata, {}


def _table(manifest: Manifest, modality: str, name: str, spec: EncoderSpec, cohort: pd.DataFrame) -> tuple:
    """Bring your own embeddings: the table is read with every check of ``read_embeddings``
    (columns, dimension, NaN, duplicates) and must cover every cohort study."""
    assert spec.path is not None
    table = read_embeddings(spec.path).align(cohort["study_id"], source=f"encoders.{modality}.{name} ({spec.path})")
    metadata = {**table.metadata, "encoder": name, "kind": "table", "modality": modality, "source_table": str(spec.path),
                "checkpoint_sha256": spec.sha256}
    return list(table.study_ids), table.embedding, table.tokens, metadata, {}


def extract(manifest: Manifest, task: str, modality: str, name: str, *, device: str = "cpu", batch_size: int = 16,
            num_workers: int = 0, progress: Callable | None = None, studies: list[str] | None = None) -> Extraction:
    """Encode every study of ``task``'s cohort with encoder ``name`` of ``modality`` and write
    the embedding table. Returns an ``Extraction`` (path, description, counts, timings).
    ``studies`` (image encoders that read CTs only): encode these study ids of the imaging
    index instead of the cohort's (the mechanism study encodes the studies of all its settings'
    cohorts once; ``helpers.mechanism``).

    An image encoder (not ``kind: table``) leaves out the studies whose CT cannot be read and
    writes them with their reasons to the exclusions CSV next to the table (a header only when
    none was left out), before the table; ``Extraction.excluded`` lists them."""
    get_task(task)
    check_choice("device", device.split(":")[0], ("cpu", "cuda"))
    if batch_size < 1:
        raise ValueError(f"parameter 'batch_size': must be >= 1, got {batch_size}")
    spec = encoder_spec(manifest, modality, name)
    paths = hc.cohort_paths(manifest, task)
    cohort = hc.read_cohort(paths["cohort"])
    started = time.perf_counter()
    excluded: list[dict] = []
    reads_images = modality == "image" and spec.kind != "table"
    if studies is not None and not reads_images:
        raise ValueError(f"parameter 'studies': only for an image encoder that reads CTs, not {modality} encoder "
                         f"{name!r} of kind {spec.kind!r}")
    if spec.kind == "table":
        ids, embedding, tokens, metadata, stats = _table(manifest, modality, name, spec, cohort)
    elif modality == "image":
        if studies is None:
            imaging, source = pd.read_parquet(paths["imaging"]).set_index("study_id"), paths["imaging"]
        else:
            studies = list(dict.fromkeys(map(str, studies)))
            cohort = pd.DataFrame({"study_id": studies})
            imaging, source = _imaging_of(manifest, task, studies), hc.task_parts(manifest, task)[0].index
        ids, embedding, tokens, metadata, stats = _image(manifest, task, name, spec, cohort, imaging, source,
                                                          device=device, batch_size=batch_size,
                                                          num_workers=num_workers, progress=progress,
                                                          excluded=excluded)
    else:
        ids, embedding, tokens, metadata, stats = _ehr(manifest, task, name, spec, cohort, device=device,
                                                        progress=progress)
    seconds = time.perf_counter() - started
    metadata["cohort_sha256"] = sha256_path(paths["cohort"])
    table = embedding_path(manifest.run_root, task, modality, name)
    exclusions = write_exclusions(table, excluded) if reads_images else None
    if not reads_images:
        exclusions_path(table).unlink(missing_ok=True)  # left by an earlier encoder of that name
    out = write_embeddings(table, ids, np.asarray(embedding), tokens=tokens, metadata=metadata)
    return Extraction(out, modality, name, spec.kind, len(ids), int(np.asarray(embedding).shape[1]), seconds,
                      metadata, stats, excluded, exclusions)
