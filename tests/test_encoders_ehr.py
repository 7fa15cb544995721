"""EHR foundation-model encoders: clmbr_mini (pretrained here) and the femr CLMBR script."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.embeddings import read_embeddings
from helpers.encoders.clmbr_mini import (
    UNK,
    ClmbrMiniConfig,
    ClmbrMiniEncoder,
    ClmbrMiniError,
    _Tokenizer,
    pretrain_clmbr_mini,
)
from helpers.manifest import sha256_path
from helpers.meds import write_meds

ROOT = Path(__file__).resolve().parent.parent
FEMR_SCRIPT = ROOT / "helpers" / "encoders" / "clmbr_femr.py"
TINY = ClmbrMiniConfig(hidden_size=16, n_layers=1, n_heads=2, intermediate_size=32, max_len=24,
                       min_count=2, n_bins=4, epochs=2, batch_size=8, seed=3)


def _events(n_subjects: int = 30, seed: int = 0) -> pd.DataFrame:
    """Synthetic MEDS timelines: static gender, birth, then visits with diagnoses, drugs and a
    lab with values; subject ids 100..."""
    rng = np.random.default_rng(seed)
    codes = ["ICD10CM/I10", "ICD10CM/E11.9", "RxNorm/83367", "CPT4/71275", "Visit/OP"]
    rows = []
    for s in range(100, 100 + n_subjects):
        rows.append((s, pd.NaT, "Gender/F" if s % 2 else "Gender/M", np.nan))
        birth = pd.Timestamp("1950-01-01") + pd.Timedelta(days=int(rng.integers(0, 10_000)))
        rows.append((s, birth, "MEDS_BIRTH", np.nan))
        t = pd.Timestamp("2015-01-01") + pd.Timedelta(days=int(rng.integers(0, 300)))
        for _ in range(int(rng.integers(5, 25))):
            t = t + pd.Timedelta(hours=int(rng.integers(1, 2000)))
            rows.append((s, t, str(rng.choice(codes)), np.nan))
            rows.append((s, t, "LOINC/2160-0", float(rng.normal(1.0 + (s % 3), 0.3))))
    frame = pd.DataFrame(rows, columns=["subject_id", "time", "code", "numeric_value"])
    frame["time"] = frame["time"].astype("datetime64[us]")
    frame["numeric_value"] = frame["numeric_value"].astype("float32")
    frame["unit"] = None
    return frame.sort_values(["subject_id", "time", "code"], na_position="first", kind="stable").reset_index(drop=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory):
    events = _events()
    out = tmp_path_factory.mktemp("clmbr") / "clmbr_mini"
    result = pretrain_clmbr_mini(events, np.arange(100, 124), np.arange(124, 130), out, config=TINY)
    return events, result


def test_pretrain_writes_checkpoint_record_and_history(pretrained) -> None:
    _, result = pretrained
    assert sorted(p.name for p in result.checkpoint.iterdir()) == [
        "config.json", "history.csv", "model.safetensors", "vocabulary.json"
    ]
    assert result.sha256 == sha256_path(result.checkpoint)
    record = json.loads((result.checkpoint.parent / "clmbr_mini.json").read_text())
    assert record["sha256"] == result.sha256
    assert list(result.history.columns) == ["epoch", "split", "loss"]
    assert len(result.history) == 2 * TINY.epochs and set(result.history.split) == {"train", "val"}
    assert np.isfinite(result.history.loss).all()
    summary = result.summary
    assert summary["n_subjects"] == {"train": 24, "val": 6}
    assert 0.0 <= summary["val_top1"] <= summary["val_top5"] <= 1.0
    assert summary["parameters"] > 0 and summary["vocab_size"] > 3


def test_pretraining_is_deterministic_for_a_seed(pretrained, tmp_path: Path) -> None:
    events, result = pretrained
    again = pretrain_clmbr_mini(events, np.arange(100, 124), np.arange(124, 130), tmp_path / "again", config=TINY)
    assert again.sha256 == result.sha256
    other = pretrain_clmbr_mini(events, np.arange(100, 124), np.arange(124, 130), tmp_path / "other",
                                config=replace(TINY, seed=4))
    assert other.sha256 != result.sha256


def test_train_and_val_subjects_must_not_overlap(tmp_path: Path) -> None:
    with pytest.raises(ClmbrMiniError, match="share 1 subject"):
        pretrain_clmbr_mini(_events(), [100, 101], [101, 102], tmp_path / "x", config=TINY)


def test_tokenizer_bins_labs_by_training_quantiles_and_maps_rare_codes_to_unk() -> None:
    events = pd.DataFrame({
        "code": ["LOINC/x"] * 8 + ["A"] * 3 + ["B"],
        "numeric_value": [1, 2, 3, 4, 5, 6, 7, 8] + [np.nan] * 4,
    })
    tok = _Tokenizer.build(events, replace(TINY, n_bins=2, min_count=2))
    assert tok.edges == {"LOINC/x": [4.5]}
    assert {"LOINC/x#0", "LOINC/x#1", "A"} <= set(tok.tokens) and "B" not in tok.tokens
    ids = tok.encode(np.array(["LOINC/x", "LOINC/x", "B", "never-seen"], dtype=object), np.array([0.0, 99.0, np.nan, np.nan]))
    assert [tok.tokens[i] for i in ids[:2]] == ["LOINC/x#0", "LOINC/x#1"]
    assert ids[2] == UNK and ids[3] == UNK


def test_embedding_reads_only_events_strictly_before_the_index(pretrained) -> None:
    events, result = pretrained
    encoder = ClmbrMiniEncoder(result.checkpoint)
    index = pd.Timestamp("2016-01-01")
    cohort = pd.DataFrame({"study_id": [f"s{i}" for i in range(100, 130)], "person_id": [str(i) for i in range(100, 130)],
                           "index_time": index})
    base = encoder.embed(events, cohort)
    assert base.shape == (30, encoder.dim) and base.dtype == np.float32
    # events at or after the index (same time included) never change the embedding
    extra = pd.DataFrame({"subject_id": [100, 100, 101], "time": [index, index + pd.Timedelta(days=3), index],
                          "code": ["ICD10CM/I10", "RxNorm/83367", "LOINC/2160-0"], "numeric_value": [np.nan, np.nan, 9.0]})
    extra["time"] = extra["time"].astype("datetime64[us]")
    later = events[events.time.isna() | (events.time < index)]
    for variant in (pd.concat([events, extra], ignore_index=True), later):
        np.testing.assert_allclose(encoder.embed(variant, cohort), base, atol=1e-5)
    # an event before the index does change it
    before = extra.assign(time=(index - pd.Timedelta(minutes=1)).to_datetime64().astype("datetime64[us]"))
    changed = encoder.embed(pd.concat([events, before], ignore_index=True), cohort)
    assert np.abs(changed[:2] - base[:2]).max() > 1e-4
    np.testing.assert_allclose(changed[2:], base[2:], atol=1e-5)


def test_studies_without_prior_events_get_the_counted_fallback(pretrained) -> None:
    events, result = pretrained
    encoder = ClmbrMiniEncoder(result.checkpoint)
    cohort = pd.DataFrame({"study_id": ["early", "absent", "normal"], "person_id": ["100", "999", "101"],
                           "index_time": pd.to_datetime(["1900-01-01", "2016-01-01", "2030-01-01"])})
    emb = encoder.embed(events, cohort)
    assert np.isfinite(emb).all()
    stats = encoder.last_stats
    assert (stats["n_studies"], stats["no_prior_events"], stats["subjects_absent"]) == (3, 2, 1)
    n_timed = int(events[(events.subject_id == 101) & events.time.notna()].shape[0])
    assert stats["truncated_to_max_len"] == int(n_timed > TINY.max_len - 2)
    assert encoder.describe()["checkpoint_sha256"] == result.sha256


def test_encoder_rejects_a_folder_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(ClmbrMiniError, match="config.json missing"):
        ClmbrMiniEncoder(tmp_path)


# ----------------------------------------------------------------------------- femr script


def _load_femr_script():
    spec = importlib.util.spec_from_file_location("clmbr_femr_script", FEMR_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_femr_script_imports_without_femr_or_helpers() -> None:
    before = set(sys.modules)
    module = _load_femr_script()
    new = set(sys.modules) - before
    assert not any(name == "femr" or name.startswith(("femr.", "helpers")) for name in new)
    assert module.FEMR_VERSION == "0.2.3"


def test_femr_script_table_is_read_by_helpers_embeddings(tmp_path: Path) -> None:
    module = _load_femr_script()
    emb = np.random.default_rng(0).normal(size=(3, 5)).astype(np.float32)
    path = module.write_embedding_table(tmp_path / "ehr-clmbr.parquet", ["a", "b", "c"], emb,
                                        {"encoder": "clmbr_t_base", "checkpoint_sha256": "x" * 64})
    table = read_embeddings(path)
    assert table.study_ids.tolist() == ["a", "b", "c"]
    np.testing.assert_array_equal(table.embedding, emb)
    assert table.metadata == {"encoder": "clmbr_t_base", "checkpoint_sha256": "x" * 64, "dim": 5}
    assert module.sha256_path(tmp_path) == sha256_path(tmp_path)


def test_femr_script_join_takes_the_last_feature_not_after_the_prediction_time() -> None:
    module = _load_femr_script()
    t = np.array(["2020-01-01T10:00", "2020-01-02T10:00", "2020-01-01T10:00"], dtype="datetime64[s]")
    features = np.array([[1.0], [2.0], [3.0]], np.float32)
    labels = module.make_labels(np.array([7, 7, 7, 8]), pd.to_datetime(
        ["2020-01-02T10:00:00", "2020-01-02T10:00:01", "2020-01-01T09:00:00", "2020-01-03T00:00:00"]))
    pred = np.array([lab["prediction_time"] for lab in labels], dtype="datetime64[us]")
    out, found = module.join_features(np.array([7, 7, 8]), t, features, np.array([7, 7, 7, 8]), pred)
    # an event exactly at the index is not used (prediction_time = index - 1 us)
    assert out[:, 0].tolist() == [1.0, 2.0, 0.0, 3.0]
    assert found.tolist() == [True, True, False, True]
    # a CT in the day's last second does not read that day's date-only records (at 23:59:59)
    late = module.make_labels(np.array([9]), pd.to_datetime(["2020-01-05T23:59:59.500"]))
    day_only = np.array(["2020-01-05T23:59:59"], dtype="datetime64[s]")
    _, seen = module.join_features(np.array([9]), day_only, np.ones((1, 1), np.float32), np.array([9]),
                                   np.array([late[0]["prediction_time"]], dtype="datetime64[us]"))
    assert not seen[0]


def test_femr_script_patients_use_meds01_birth_and_static_at_birth() -> None:
    module = _load_femr_script()
    events = _events(2)
    patients = module.to_femr_patients(events)
    assert [p["patient_id"] for p in patients] == [100, 101]
    first = patients[0]["events"][0]
    assert [m["code"] for m in first["measurements"]] == ["Gender/M", module.MEDS01_BIRTH]
    times = [e["time"] for e in patients[0]["events"]]
    assert times == sorted(times)
    n_measurements = sum(len(e["measurements"]) for p in patients for e in p["events"])
    assert n_measurements == len(events)


@pytest.mark.skipif(not os.environ.get("CLMBR_PYTHON"), reason="CLMBR_PYTHON (python of environment-clmbr.yml) not set")
def test_femr_script_end_to_end_in_the_clmbr_environment(tmp_path: Path) -> None:
    python = Path(os.environ["CLMBR_PYTHON"])
    if not python.is_file():
        pytest.skip(f"CLMBR_PYTHON={python} does not exist")
    events = _events(12)
    meds = write_meds(events, tmp_path / "meds")
    cohort = pd.DataFrame({"study_id": [f"s{i}" for i in range(100, 112)] + ["early"],
                           "person_id": [str(i) for i in range(100, 112)] + ["100"],
                           "index_time": pd.to_datetime(["2016-01-01"] * 12 + ["1900-01-01"])})
    cohort.to_parquet(tmp_path / "cohort.parquet")
    out = tmp_path / "ehr-clmbr.parquet"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [str(python), str(FEMR_SCRIPT), "--meds", str(meds), "--cohort", str(tmp_path / "cohort.parquet"),
         "--model", str(tmp_path / "model"), "--out", str(out), "--make-random-model"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    table = read_embeddings(out)
    assert table.study_ids.tolist() == cohort.study_id.tolist()
    assert table.dim == 32
    timed = events[events.time.notna() & (events.code != "MEDS_BIRTH")]
    first = timed.groupby("subject_id").time.min()
    expected = int((first >= pd.Timestamp("2016-01-01")).sum()) + 1  # + the study indexed in 1900
    assert table.metadata["encoder"] == "clmbr_t_base" and table.metadata["no_prior_events"] == expected
    has_prior = (first < pd.Timestamp("2016-01-01")).reindex(range(100, 112)).to_numpy()
    assert (np.abs(table.embedding[:12]).sum(axis=1) > 0).tolist() == has_prior.tolist()
