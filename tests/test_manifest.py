from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers.manifest import ChecksumError, ManifestError, dump, load, sha256_path
from helpers.tasks import Setting

PROJECT_ROOT = Path(__file__).resolve().parent.parent

GOOD = {
    "version": 1,
    "data": {"source": "synthetic", "synthetic": {"profile": "quick", "seed": 3, "image_share": 0.4}},
    "encoders": {"image": {"randconv": {"kind": "builtin"}}, "ehr": {"onehot": {"kind": "builtin"}}},
    "output_dir": "out",
}


def write(tmp_path: Path, payload: dict, name: str = "m.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(payload))
    return path


def test_the_shipped_manifest_loads():
    manifest = load(PROJECT_ROOT / "data_manifest.yaml")
    assert manifest.data.source == "synthetic"
    assert manifest.output_dir == PROJECT_ROOT / "outputs"
    s = manifest.synthetic
    assert manifest.run_root == (PROJECT_ROOT / "outputs" / s.profile
                                 / f"share-{s.image_share:g}_interaction-{s.interaction:g}_seed-{s.seed}")


def test_relative_paths_resolve_against_the_manifest_folder(tmp_path):
    manifest = load(write(tmp_path, GOOD))
    assert manifest.output_dir == tmp_path / "out"
    assert manifest.run_root == tmp_path / "out" / "quick" / "share-0.4_interaction-0.75_seed-3"
    assert manifest.with_profile("paper").run_root == tmp_path / "out" / "paper" / "share-0.4_interaction-0.75_seed-3"
    other = manifest.with_setting(Setting("tiny", 1.0, 0.0, 5))
    assert other.run_root == tmp_path / "out" / "tiny" / "share-1_interaction-0_seed-5"
    assert Setting.from_label(other.root_label) == other.synthetic.setting


def test_dump_round_trips(tmp_path):
    manifest = load(write(tmp_path, GOOD))
    again = load(dump(manifest, tmp_path / "copy" / "manifest.yaml"))
    assert again.model_dump() == manifest.model_dump()


def _mutate(path: tuple, value):
    payload = yaml.safe_load(yaml.safe_dump(GOOD))
    node = payload
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return payload


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("output_dir",), KeyError, r"output_dir: required key is missing"),
        (("data", "synthetic", "profil"), "quick", r"data\.synthetic\.profil: unknown key"),
        (("data", "synthetic", "profile"), "huge", r"data\.synthetic\.profile: .*unknown profile 'huge'; expected one of tiny, quick, paper"),
        (("data", "synthetic", "image_share"), 1.5, r"data\.synthetic\.image_share: .*less than or equal to 1"),
        (("data", "source"), "csv", r"data\.source: .*'synthetic', 'omop' or 'inspect'"),
        (("version",), 2, r"version: "),
        (("encoders", "image", "randconv", "kind"), "magic", r"encoders\.image\.randconv\.kind"),
    ],
    ids=["missing-key", "mistyped-key", "bad-profile", "share-out-of-range", "bad-source", "bad-version", "bad-kind"],
)
def test_bad_manifest_is_named(tmp_path, path, value, match):
    with pytest.raises(ManifestError, match=match):
        load(write(tmp_path, _mutate(path, value)))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ManifestError, match="manifest file not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(ManifestError, match="not valid YAML"):
        load(bad)


def test_omop_paths_must_exist(tmp_path):
    payload = dict(GOOD, data={"source": "omop", "omop": {"tables": "omop", "imaging": {"pe": {"index": "i.parquet", "root": "ct"}}}})
    with pytest.raises(ManifestError, match=r"data\.omop\.tables: .*omop does not exist.*data\.omop\.imaging\.pe\.index"):
        load(write(tmp_path, payload))


def test_omop_unknown_task(tmp_path):
    payload = dict(GOOD, data={"source": "omop", "omop": {"tables": ".", "imaging": {"copd": {"index": "i", "root": "."}}}})
    with pytest.raises(ManifestError, match=r"data\.omop\.imaging: .*unknown task"):
        load(write(tmp_path, payload))


def test_checkpoint_checksum_is_verified(tmp_path):
    ckpt = tmp_path / "weights.bin"
    ckpt.write_bytes(b"frozen weights")
    good_hash = hashlib.sha256(b"frozen weights").hexdigest()
    assert sha256_path(ckpt) == good_hash
    payload = dict(GOOD, encoders={"image": {"mine": {"kind": "hf", "path": "weights.bin", "sha256": good_hash}}})
    assert load(write(tmp_path, payload)).encoders.image["mine"].path == ckpt
    wrong = "0" * 64
    payload["encoders"]["image"]["mine"]["sha256"] = wrong
    with pytest.raises(ChecksumError, match=f"manifest says sha256 {wrong}, file has {good_hash}"):
        load(write(tmp_path, payload))


def test_checkpoint_needs_a_hash_and_an_existing_path(tmp_path):
    payload = dict(GOOD, encoders={"image": {"mine": {"kind": "hf", "path": "missing"}}})
    with pytest.raises(ManifestError, match=r"encoders\.image\.mine\.path: .*missing does not exist"):
        load(write(tmp_path, payload))
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    payload = dict(GOOD, encoders={"image": {"mine": {"kind": "hf", "path": "model"}}})
    with pytest.raises(ManifestError, match=r"encoders\.image\.mine\.sha256: required \(the checkpoint's sha256: [0-9a-f]{64}\)"):
        load(write(tmp_path, payload))


def test_cli_check_prints_a_summary_and_fails_cleanly(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "helpers", "manifest", "check", str(write(tmp_path, GOOD))],
                        capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "profile quick, seed 3, image share 0.4" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "helpers", "manifest", "check", str(write(tmp_path, _mutate(("data", "synthetic", "profil"), 1), "bad.yaml"))],
                         capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert bad.returncode == 2
    assert "data.synthetic.profil: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr
