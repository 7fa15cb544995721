"""Encoder entries of the manifest, extraction dispatch, bring-your-own tables, the MEDS export
that the cohort step writes, the pretraining settings per twin profile, and probes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from helpers.embeddings import EmbeddingError, read_embeddings, write_embeddings
from helpers.extract import checkpoint_for, encoder_spec, extract, meds_dir, require_meds
from helpers.manifest import ManifestError, default_checkpoint, load, sha256_path
from helpers.pretrain import QUICK_PRETRAIN, _config, resolve_name
from helpers.probes import probe_factors, probe_scores


def _manifest(tmp_path: Path, encoders: dict | None = None) -> Path:
    payload = {"version": 1, "data": {"source": "synthetic", "synthetic": {"profile": "quick"}}, "output_dir": "out"}
    if encoders is not None:
        payload["encoders"] = encoders
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(payload))
    return path


def _cohort(manifest, n: int = 6) -> pd.DataFrame:
    cohort = pd.DataFrame({
        "study_id": [f"s{i}" for i in range(n)], "person_id": [f"p{i // 2}" for i in range(n)],
        "institution": "site_a", "index_time": pd.Timestamp("2020-01-01"), "time": np.arange(1, n + 1, dtype=float),
        "event": [1, 0] * (n // 2), "split": "train"})
    path = manifest.run_root / "cohorts" / "pe.parquet"
    path.parent.mkdir(parents=True)
    cohort.to_parquet(path, index=False)
    return cohort


def test_default_encoders_and_kind_rules(tmp_path):
    m = load(_manifest(tmp_path))
    assert list(m.encoders.image) == ["randconv", "ct_mae"] and list(m.encoders.ehr) == ["onehot", "clmbr"]
    assert resolve_name(m, "clmbr_mini") == ("ehr", "clmbr") and resolve_name(m, "ct_mae") == ("image", "ct_mae")
    with pytest.raises(ManifestError, match="no single encoder called or of kind 'dino'"):
        resolve_name(m, "dino")
    with pytest.raises(ManifestError, match=r"encoders\.image\.mine\.sha256: given without a path"):
        load(_manifest(tmp_path, {"image": {"mine": {"kind": "ct_mae", "sha256": "0" * 64}}}))
    with pytest.raises(ManifestError, match=r"encoders\.image\.t\.path: required for an encoder of kind 'table'"):
        load(_manifest(tmp_path, {"image": {"t": {"kind": "table"}}}))
    with pytest.raises(ManifestError, match=r"encoders\.image\.r\.python: only an encoder of kind 'clmbr'"):
        load(_manifest(tmp_path, {"image": {"r": {"kind": "builtin", "python": "/usr/bin/python3"}}}))
    with pytest.raises(ManifestError, match=r"parameter 'encoder': 'dino' is not declared under encoders\.image \(declared: randconv, ct_mae\)"):
        encoder_spec(m, "image", "dino")


def test_pretrained_checkpoint_is_found_and_checked(tmp_path):
    m = load(_manifest(tmp_path))
    spec = m.encoders.image["ct_mae"]
    with pytest.raises(FileNotFoundError, match="python -m helpers pretrain ct_mae --task pe"):
        checkpoint_for(m, "pe", "ct_mae", spec)
    folder = default_checkpoint(m, "pe", "ct_mae")
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"abc")
    record = folder.with_name("ct_mae.json")
    record.write_text(json.dumps({"sha256": sha256_path(folder)}))
    assert checkpoint_for(m, "pe", "ct_mae", spec) == (folder, sha256_path(folder))
    (folder / "weights.bin").write_bytes(b"abd")
    with pytest.raises(ManifestError, match="changed or partly written"):
        checkpoint_for(m, "pe", "ct_mae", spec)


def test_a_table_brought_by_the_user_is_checked_and_aligned(tmp_path):
    rng = np.random.default_rng(0)
    own = tmp_path / "mine.parquet"
    ids = [f"s{i}" for i in range(7)][::-1]  # another order, one study more than the cohort
    write_embeddings(own, ids, rng.normal(size=(7, 3)), tokens=[rng.normal(size=(2, 3)) for _ in ids],
                     metadata={"encoder": "their-model"})
    path = _manifest(tmp_path, {"image": {"mine": {"kind": "table", "path": "mine.parquet", "sha256": sha256_path(own)}},
                                "ehr": {"onehot": {"kind": "builtin"}}})
    m = load(path)
    cohort = _cohort(m)
    result = extract(m, "pe", "image", "mine")
    table = read_embeddings(result.path)
    assert list(table.study_ids) == list(cohort["study_id"]) and table.dim == 3 and len(table.tokens) == 6
    assert table.metadata["kind"] == "table" and table.metadata["encoder"] == "mine"
    source = read_embeddings(own).align(cohort["study_id"])
    np.testing.assert_array_equal(table.embedding, source.embedding)
    write_embeddings(own, ["s0", "s1"], np.ones((2, 3)))
    path.write_text(path.read_text().replace(m.encoders.image["mine"].sha256, sha256_path(own)))
    with pytest.raises(EmbeddingError, match="4 of 6 cohort studies have no embedding, e.g. s2, s3"):
        extract(load(path), "pe", "image", "mine")


def test_require_meds_names_the_folder_and_the_cohort_step(tmp_path):
    from helpers.meds import read_meds, write_meds

    m = load(_manifest(tmp_path))
    folder = meds_dir(m, "pe")
    assert folder == m.run_root / "meds" / "pe"
    with pytest.raises(FileNotFoundError, match="does not exist") as missing:
        require_meds(m, "pe")
    message = str(missing.value)
    assert str(folder) in message and "cohort step" in message and "notebooks/01_cohort.ipynb" in message
    assert f"snakemake {m.run_root / 'cohorts' / 'pe.parquet'}" in message
    (folder / "data").mkdir(parents=True)  # a folder without data (an interrupted or foreign one)
    with pytest.raises(FileNotFoundError, match=r"has no data/\*\.parquet"):
        require_meds(m, "pe")
    events = pd.DataFrame({"subject_id": [1, 1], "time": pd.to_datetime([None, "2020-01-01"]),
                           "code": ["Gender/F", "ICD10CM/I10"], "numeric_value": np.array([np.nan, np.nan], "float32")})
    write_meds(events, folder)
    assert require_meds(m, "pe") == folder
    assert len(read_meds(require_meds(m, "pe"))) == 2


@pytest.mark.parametrize(("profile", "short"), [("tiny", True), ("quick", True), ("paper", False)])
def test_the_tiny_and_quick_twins_pretrain_for_fewer_steps(tmp_path, profile, short):
    path = _manifest(tmp_path)
    path.write_text(path.read_text().replace("profile: quick", f"profile: {profile}"))
    m = load(path)
    assert m.synthetic.profile == profile
    for modality, name in (("image", "ct_mae"), ("ehr", "clmbr")):
        entry = encoder_spec(m, modality, name)
        config = _config(m, modality, name, entry)
        for key, value in QUICK_PRETRAIN[entry.kind].items():
            assert (getattr(config, key) == value) is short


def test_probes_recover_a_linear_factor_and_not_noise():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 10))
    y = x[:, 0] - 0.5 * x[:, 1] + 0.1 * rng.normal(size=300)
    assert probe_scores(x, y) > 0.95
    assert probe_scores(rng.normal(size=(300, 10)), y) < 0.05
    labels = (x[:, 2] > 0).astype(float)
    assert probe_scores(x, labels, binary=True) > 0.9
    groups = np.repeat(np.arange(150), 2)
    assert probe_scores(x, y, groups=groups) > 0.95
    factors = pd.DataFrame({"study_id": [f"s{i}" for i in range(300)], "person_id": groups.astype(str),
                            "institution": "site_a", "clot_burden": y, "cancer": labels, "flat": 0.0})
    out = probe_factors(x, factors["study_id"], factors, {"clot_burden": ("ct",), "cancer": ("ehr",), "flat": ("ct",)})
    assert out.set_index("factor").loc["clot_burden", "score"] > 0.95
    assert out.set_index("factor").loc["cancer", "metric"] == "AUC"
    assert np.isnan(out.set_index("factor").loc["flat", "score"])
    with pytest.raises(ValueError, match="1 studies of the embedding have no ground-truth factors, e.g. zz"):
        probe_factors(x[:1], ["zz"], factors, {"clot_burden": ("ct",)})


def test_studies_are_only_for_an_image_encoder_and_must_be_in_the_index(tmp_path):
    """``extract(studies=...)`` (the mechanism study's one encoding of several cohorts) refuses an
    EHR encoder or a table brought by the user, and names a study the imaging index lacks; the
    index is checked before any CT is read."""
    rng = np.random.default_rng(0)
    own = tmp_path / "mine.parquet"
    write_embeddings(own, [f"s{i}" for i in range(6)], rng.normal(size=(6, 3)))
    m = load(_manifest(tmp_path, {"image": {"mine": {"kind": "table", "path": "mine.parquet", "sha256": sha256_path(own)},
                                            "randconv": {"kind": "builtin"}},
                                  "ehr": {"onehot": {"kind": "builtin"}}}))
    _cohort(m)
    with pytest.raises(ValueError, match="parameter 'studies': only for an image encoder that reads CTs, not ehr encoder"):
        extract(m, "pe", "ehr", "onehot", studies=["s0"])
    with pytest.raises(ValueError, match="not image encoder 'mine' of kind 'table'"):
        extract(m, "pe", "image", "mine", studies=["s0"])
    twin = m.twin_dir / "pe"
    twin.mkdir(parents=True)
    (twin / "twin.json").write_text("{}")
    pd.DataFrame({"study_id": [f"s{i}" for i in range(6)], "person_id": [f"p{i // 2}" for i in range(6)],
                  "institution": "site_a", "study_datetime": pd.Timestamp("2020-01-01"),
                  "image_path": [f"images/s{i}.nii.gz" for i in range(6)], "image_format": "nifti"},
                 ).to_parquet(twin / "imaging_index.parquet", index=False)
    with pytest.raises(EmbeddingError, match=r"parameter 'studies': 1 studies are not in imaging index \S*imaging_index.parquet, "
                                             r"e.g. nowhere"):
        extract(m, "pe", "image", "randconv", studies=["s0", "nowhere"])
