"""CLMBR-T-base (StanfordShahLab/clmbr-t-base) embeddings through femr, in femr's own environment.

femr cannot share the study's environment (it pins numpy < 2 and an old MEDS), so this file is
a standalone script for the environment of ``environment-clmbr.yml``; it imports only the
standard library, numpy, pandas and pyarrow at module level, and femr / torch / datasets only
inside ``compute_clmbr_embeddings`` and ``make_random_model``. The main environment imports it
by path (tests) to use the pure functions::

    python helpers/encoders/clmbr_femr.py --meds MEDS_DIR --cohort COHORT.parquet \\
        --model LOCAL_MODEL_DIR --out embeddings/<task>/ehr-clmbr.parquet [--device cuda]

Which femr: **femr 0.2.3** (meds 0.1.3 inside). It is the last femr release that can run
CLMBR-T-base: its tokenizer supports the model's flat (non-hierarchical) vocabulary and its
transformer has the model's all-attention layers, with a CPU fallback for attention. femr
0.2.4, the only release on MEDS 0.3, changed the architecture (every other layer is a
recurrent "hawk" block) and accepts only hierarchical tokenizers, so CLMBR-T-base weights do
not load into it. The study's MEDS 0.3 export (``helpers.meds``) is therefore converted here
to the MEDS 0.1 patient records femr 0.2.3 reads: one record per subject, events grouped by
time, ``MEDS_BIRTH`` -> ``SNOMED/184099003`` and ``MEDS_DEATH`` -> ``SNOMED/419620001`` (the
MEDS 0.1 birth and death codes CLMBR-T-base was trained with), static events (null time,
e.g. ``Gender/F``) placed at the birth time.

Representation at the index time: femr's labelled-patient task gives the hidden state at the
last event with ``time <= prediction_time``; the script asks for ``prediction_time =
index_time - 1 microsecond``, so as in ``clmbr_mini`` only events strictly before the index
are read. A study with no event before its index (femr then returns no row for it) gets a
zero vector, counted in the table's metadata (``no_prior_events``).

CLMBR-T-base expects OMOP *standard* concepts (SNOMED conditions, RxNorm drugs, LOINC labs,
CPT4/HCPCS procedures, ``Visit/IP``...). Codes outside its vocabulary are ignored by its
tokenizer; the share of events it knew is reported (``known_event_fraction``). The digital
twin's ICD10CM diagnoses are not standard concepts, so on the twin CLMBR-T-base sees mostly
drugs, labs, procedures, visits, birth and gender.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "ENCODER",
    "FEMR_VERSION",
    "read_meds_events",
    "to_femr_patients",
    "make_labels",
    "join_features",
    "write_embedding_table",
    "sha256_path",
    "compute_clmbr_embeddings",
    "make_random_model",
    "main",
]

ENCODER = "clmbr_t_base"
FEMR_VERSION = "0.2.3"
MEDS01_BIRTH = "SNOMED/184099003"
MEDS01_DEATH = "SNOMED/419620001"
_RENAME = {"MEDS_BIRTH": MEDS01_BIRTH, "MEDS_DEATH": MEDS01_DEATH}
# Must match helpers.embeddings (_META_KEY and the column types of write_embeddings).
_META_KEY = b"helpers"


def read_meds_events(meds_dir: Path, subject_ids: np.ndarray | None = None) -> pd.DataFrame:
    """The events of a MEDS 0.3 folder (``data/**/*.parquet``: subject_id, time, code,
    numeric_value[, unit]), optionally only those of ``subject_ids``, sorted by subject, time
    (null first), code."""
    meds_dir = Path(meds_dir)
    files = sorted((meds_dir / "data").rglob("*.parquet"))
    if not files:
        raise ValueError(f"{meds_dir}: no data/*.parquet files (not a MEDS folder?)")
    frames = []
    for file in files:
        names = pq.read_schema(file).names
        missing = [c for c in ("subject_id", "time", "code", "numeric_value") if c not in names]
        if missing:
            raise ValueError(f"{file}: missing MEDS column(s) {', '.join(missing)}")
        frame = pq.read_table(file, columns=[c for c in ("subject_id", "time", "code", "numeric_value", "unit") if c in names]).to_pandas()
        if subject_ids is not None:
            frame = frame[frame["subject_id"].isin(subject_ids)]
        frames.append(frame)
    events = pd.concat(frames, ignore_index=True)
    events["time"] = pd.to_datetime(events["time"])
    return events.sort_values(["subject_id", "time", "code"], na_position="first", kind="stable").reset_index(drop=True)


def to_femr_patients(events: pd.DataFrame) -> list[dict]:
    """MEDS 0.3 flat events -> MEDS 0.1 patient records for femr 0.2.3: ``{"patient_id",
    "events": [{"time", "measurements": [{"code", "numeric_value", "text_value",
    "datetime_value", "metadata"}]}]}``. Birth and death codes are renamed to the MEDS 0.1
    codes; static events go to the birth time (or the first event's time when there is no
    birth). Subjects without any timed event are left out."""
    patients = []
    for subject, group in events.groupby("subject_id", sort=True):
        codes = group["code"].map(lambda c: _RENAME.get(c, c)).to_numpy()
        times = group["time"].to_numpy()
        values = group["numeric_value"].to_numpy(dtype=np.float64)
        units = group["unit"].to_numpy() if "unit" in group.columns else np.full(len(group), None)
        static = pd.isna(times)
        if static.all():
            continue
        birth = times[~static & (codes == MEDS01_BIRTH)]
        anchor = birth[0] if len(birth) else times[~static][0]
        times = np.where(static, anchor, times).astype("datetime64[us]")
        order = np.lexsort((~static, times))  # by time; static first at the anchor time
        by_time: dict = {}
        for i in order:
            measurement = {
                "code": str(codes[i]),
                "numeric_value": None if np.isnan(values[i]) else float(values[i]),
                "text_value": None,
                "datetime_value": None,
                "metadata": {"unit": None if units[i] is None or pd.isna(units[i]) else str(units[i])},
            }
            by_time.setdefault(times[i], []).append(measurement)
        patients.append({
            "patient_id": int(subject),
            "events": [{"time": pd.Timestamp(t).to_pydatetime(), "measurements": m} for t, m in by_time.items()],
        })
    return patients


def make_labels(subject_ids: np.ndarray, index_times: pd.Series) -> list[dict]:
    """femr labels (MEDS 0.1 ``Label``): one per study, ``prediction_time = min(index_time,
    23:59:59 of the index day) - 1 microsecond``, so that only events strictly before the index
    are read, and a date-only record of the index day (placed at 23:59:59 by the MEDS export)
    is never read, even for a CT in the day's last second (as in ``clmbr_mini``)."""
    index = pd.to_datetime(pd.Series(index_times)).dt.tz_localize(None)
    day_end = index.dt.normalize() + pd.Timedelta(seconds=86399)
    at = index.where(index <= day_end, day_end) - pd.Timedelta(microseconds=1)
    return [
        {"patient_id": int(s), "prediction_time": t.to_pydatetime(), "boolean_value": False}
        for s, t in zip(subject_ids, at, strict=True)
    ]


def join_features(
    patient_ids: np.ndarray,
    feature_times: np.ndarray,
    features: np.ndarray,
    subject_ids: np.ndarray,
    prediction_times: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """For each (subject, prediction time), the feature row of that subject with the latest
    ``feature_time <= prediction_time`` (femr's ``join_labels`` rule). Returns the float32
    matrix (n, dim) and a boolean mask of rows found (rows not found are zeros)."""
    patient_ids = np.asarray(patient_ids, dtype=np.int64)
    feature_times = np.asarray(feature_times).astype("datetime64[us]").astype(np.int64)
    prediction = np.asarray(prediction_times).astype("datetime64[us]").astype(np.int64)
    subject_ids = np.asarray(subject_ids, dtype=np.int64)
    order = np.lexsort((feature_times, patient_ids))
    pid, ftime = patient_ids[order], feature_times[order]
    out = np.zeros((len(subject_ids), features.shape[1] if features.ndim == 2 else 0), np.float32)
    found = np.zeros(len(subject_ids), bool)
    for i, (s, t) in enumerate(zip(subject_ids, prediction, strict=True)):
        lo, hi = np.searchsorted(pid, s, "left"), np.searchsorted(pid, s, "right")
        j = lo + np.searchsorted(ftime[lo:hi], t, "right") - 1
        if j >= lo:
            out[i] = features[order[j]]
            found[i] = True
    return out, found


def sha256_path(path: Path) -> str:
    """sha256 of a file or folder; the same rule as ``helpers.manifest.sha256_path`` (every
    file in sorted relative-path order, hashed as its relative path then its bytes)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def write_embedding_table(path: Path, study_ids: list[str] | np.ndarray, embedding: np.ndarray, metadata: dict) -> Path:
    """Write an embedding table in the project's format, atomically. It must match
    ``helpers.embeddings.write_embeddings``: ``study_id`` string, ``embedding``
    fixed_size_list<float32>[dim], schema metadata ``b"helpers"`` = JSON (with ``dim``)."""
    embedding = np.asarray(embedding, dtype=np.float32)
    if embedding.ndim != 2 or embedding.shape[0] != len(study_ids):
        raise ValueError(f"embedding has shape {embedding.shape} but there are {len(study_ids)} study ids")
    dim = int(embedding.shape[1])
    table = pa.table({
        "study_id": pa.array([str(s) for s in study_ids], pa.string()),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(embedding.reshape(-1), pa.float32()), dim),
    })
    meta = dict(metadata)
    meta.setdefault("dim", dim)
    table = table.replace_schema_metadata({_META_KEY: json.dumps(meta).encode()})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def _cohort_subjects(cohort: pd.DataFrame, source: str) -> np.ndarray:
    for column in ("study_id", "person_id", "index_time"):
        if column not in cohort.columns:
            raise ValueError(f"{source}: cohort lacks column {column!r}")
    values = cohort["person_id"].astype(str)
    ok = values.str.fullmatch(r"-?\d+")
    if not ok.all():
        raise ValueError(f"{source}: person_id must be the integer OMOP person_id (= MEDS subject_id); "
                         f"{int((~ok).sum())} row(s) are not, e.g. {', '.join(values[~ok].unique()[:5])}")
    return values.astype("int64").to_numpy()


def compute_clmbr_embeddings(
    meds_dir: Path,
    cohort: pd.DataFrame,
    model_dir: Path,
    *,
    device: str = "cpu",
    tokens_per_batch: int = 8192,
    num_proc: int = 1,
) -> tuple[np.ndarray, dict]:
    """CLMBR embeddings (float32, (n_studies, hidden)) of ``cohort``'s studies, in cohort
    order, and statistics (studies, no_prior_events, known_event_fraction, seconds), with
    femr 0.2.3's ``compute_features`` on the local model folder ``model_dir`` (config.json,
    model weights, dictionary.msgpack). No hub access: the path must exist."""
    import datasets
    import femr.models.tokenizer
    import femr.models.transformer

    began = time.perf_counter()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file() or not (model_dir / "dictionary.msgpack").is_file():
        raise FileNotFoundError(f"{model_dir}: not a local femr model folder (config.json and dictionary.msgpack needed)")
    subjects = _cohort_subjects(cohort, "cohort")
    events = read_meds_events(meds_dir, np.unique(subjects))
    patients = to_femr_patients(events)
    tokenizer = femr.models.tokenizer.FEMRTokenizer.from_pretrained(str(model_dir))
    known = events["code"].map(lambda c: _RENAME.get(c, c)).isin(set(tokenizer.code_lookup) | set(getattr(tokenizer, "numeric_lookup", {})))
    # femr's LabeledPatientTask stops at a label it cannot place (one before the patient's first
    # event) and then never places that patient's later labels: pass only placeable labels.
    first_time = {p["patient_id"]: p["events"][0]["time"] for p in patients}
    labels = make_labels(subjects, cohort["index_time"])
    usable = [lab for lab in labels
              if lab["patient_id"] in first_time and lab["prediction_time"] >= first_time[lab["patient_id"]]]
    dataset = datasets.Dataset.from_list(patients)
    result = femr.models.transformer.compute_features(
        dataset, str(model_dir), usable, num_proc=num_proc, tokens_per_batch=tokens_per_batch, device=device
    )
    prediction = np.array([lab["prediction_time"] for lab in labels], dtype="datetime64[us]")
    embedding, found = join_features(result["patient_ids"], result["feature_times"], result["features"], subjects, prediction)
    stats = {
        "studies": int(len(subjects)),
        "no_prior_events": int((~found).sum()),
        "known_event_fraction": float(known.mean()) if len(known) else 0.0,
        "seconds": round(time.perf_counter() - began, 2),
    }
    return embedding, stats


def make_random_model(meds_dir: Path, out_dir: Path, *, hidden_size: int = 32, n_layers: int = 2, seed: int = 0) -> Path:
    """A tiny randomly initialised CLMBR model in femr 0.2.3's format (tokenizer trained on the
    MEDS events, flat vocabulary), for tests of the pipeline without CLMBR-T-base."""
    import datasets
    import femr.models.config
    import femr.models.tokenizer
    import femr.models.transformer
    import torch

    torch.manual_seed(seed)
    dataset = datasets.Dataset.from_list(to_femr_patients(read_meds_events(meds_dir)))
    tokenizer = femr.models.tokenizer.train_tokenizer(dataset, vocab_size=512, is_hierarchical=False, num_numeric=20)
    transformer_config = femr.models.config.FEMRTransformerConfig(
        vocab_size=tokenizer.vocab_size, is_hierarchical=False, hidden_size=hidden_size,
        intermediate_size=2 * hidden_size, n_heads=2, n_layers=n_layers, attention_width=64,
    )
    config = femr.models.config.FEMRModelConfig.from_transformer_task_configs(transformer_config, None)
    model = femr.models.transformer.FEMRModel(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    parser = argparse.ArgumentParser(description="CLMBR (femr 0.2.3) embeddings of a cohort at its index times")
    parser.add_argument("--meds", required=True, type=Path, help="MEDS folder (helpers.meds export)")
    parser.add_argument("--cohort", required=True, type=Path, help="cohort parquet (study_id, person_id, index_time)")
    parser.add_argument("--model", required=True, type=Path, help="local CLMBR model folder (e.g. clmbr-t-base)")
    parser.add_argument("--out", required=True, type=Path, help="embedding table to write (.parquet)")
    parser.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    parser.add_argument("--make-random-model", action="store_true",
                        help="first write a tiny random CLMBR model to --model (tests only)")
    args = parser.parse_args(argv)
    if not args.cohort.is_file():
        parser.error(f"--cohort {args.cohort}: file not found")
    if not (args.meds / "data").is_dir():
        parser.error(f"--meds {args.meds}: no data/ folder")
    if args.make_random_model:
        make_random_model(args.meds, args.model)
    if not args.model.is_dir():
        parser.error(f"--model {args.model}: folder not found (a local path; hub downloads are not used)")
    cohort = pd.read_parquet(args.cohort)
    embedding, stats = compute_clmbr_embeddings(args.meds, cohort, args.model, device=args.device,
                                                tokens_per_batch=args.tokens_per_batch)
    import femr  # noqa: F401  (version for the metadata)

    metadata = {
        "encoder": ENCODER,
        "checkpoint": str(args.model),
        "checkpoint_sha256": sha256_path(args.model),
        "femr_version": getattr(sys.modules["femr"], "__version__", FEMR_VERSION),
        "meds": str(args.meds),
        "representation": "femr hidden state at the last event strictly before index_time "
        "(prediction_time = index_time - 1 us); no prior event: zero vector",
        **stats,
    }
    write_embedding_table(args.out, cohort["study_id"].astype(str).to_numpy(), embedding, metadata)
    print(json.dumps({"out": str(args.out), "dim": int(embedding.shape[1]), **stats}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
