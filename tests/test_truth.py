"""The ground truth's one reader: ``helpers.truth``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers import truth
from helpers.twin import FACTOR_COLUMNS, generate


@pytest.fixture(scope="module")
def tiny_twin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny PE twin with volumes and masks."""
    out = tmp_path_factory.mktemp("truth_twin")
    generate(out, profile="tiny", seed=1, tasks=("pe",), n_override={"internal": 30, "external": 10},
             workers=1)
    return out


def test_readers_are_named() -> None:
    assert truth.READERS == ("twin_chapter", "oracle", "probes", "saliency", "mechanism")


@pytest.mark.parametrize("reader", ["training", "", "Oracle"])
def test_unknown_reader_refused(tiny_twin: Path, reader: str) -> None:
    with pytest.raises(ValueError, match=f"unknown reader {reader!r}"):
        truth.read_truth(tiny_twin, "pe", reader=reader)
    with pytest.raises(ValueError, match="unknown reader"):
        truth.read_lesions(tiny_twin, "pe", reader=reader)
    with pytest.raises(ValueError, match="unknown reader"):
        truth.mask_path(tiny_twin, "pe", "pe-a-000000", reader=reader)


def test_reader_is_keyword_only(tiny_twin: Path) -> None:
    with pytest.raises(TypeError):
        truth.read_truth(tiny_twin, "pe", "oracle")  # type: ignore[misc]


def test_unknown_task_refused(tiny_twin: Path) -> None:
    with pytest.raises(ValueError, match="unknown value 'stroke'"):
        truth.read_truth(tiny_twin, "stroke", reader="oracle")


def test_missing_file_names_the_path(tmp_path: Path, tiny_twin: Path) -> None:
    path = tmp_path / "mace" / "ground_truth" / "factors.parquet"
    with pytest.raises(FileNotFoundError) as err:
        truth.read_truth(tmp_path, "mace", reader="oracle")
    assert str(path) in str(err.value)
    # a twin written without the task
    with pytest.raises(FileNotFoundError, match="ground truth is missing"):
        truth.read_truth(tiny_twin, "mace", reader="twin_chapter")
    with pytest.raises(FileNotFoundError, match="lesions.parquet"):
        truth.read_lesions(tmp_path, "pe", reader="saliency")
    with pytest.raises(FileNotFoundError, match="no-such-study.npz"):
        truth.read_mask(tiny_twin, "pe", "no-such-study", reader="saliency")


def test_read_truth(tiny_twin: Path) -> None:
    factors = truth.read_truth(tiny_twin, "pe", reader="probes")
    index = pd.read_parquet(tiny_twin / "pe" / "imaging_index.parquet")
    assert list(factors["study_id"]) == list(index["study_id"])
    assert len(factors) == 40
    assert set(FACTOR_COLUMNS) <= set(factors.columns)
    assert {"true_log_hazard", "defect", "recorded_event"} <= set(factors.columns)
    pd.testing.assert_frame_equal(
        factors, pd.read_parquet(tiny_twin / "pe" / "ground_truth" / "factors.parquet")
    )
    # a twin folder given as a str works too; columns restrict what is read
    some = truth.read_truth(str(tiny_twin), "pe", reader="oracle", columns=["study_id", "true_log_hazard"])
    assert list(some.columns) == ["study_id", "true_log_hazard"]
    pd.testing.assert_series_equal(some["true_log_hazard"], factors["true_log_hazard"])
    with pytest.raises(ValueError, match="no column"):
        truth.read_truth(tiny_twin, "pe", reader="oracle", columns=["study_id", "secret"])


def test_read_lesions_and_masks(tiny_twin: Path) -> None:
    lesions = truth.read_lesions(tiny_twin, "pe", reader="twin_chapter")
    assert list(lesions.columns) == ["study_id", "embolus_voxels", "calcification_voxels"]
    row = lesions.sort_values("embolus_voxels").iloc[-1]
    path = truth.mask_path(tiny_twin, "pe", row["study_id"], reader="saliency")
    assert path == tiny_twin / "pe" / "ground_truth" / "masks" / f"{row['study_id']}.npz"
    mask = truth.read_mask(tiny_twin, "pe", row["study_id"], reader="saliency")
    assert mask.dtype == np.uint8
    assert int((mask == 1).sum()) == row["embolus_voxels"] > 0
    assert int((mask == 2).sum()) == row["calcification_voxels"]
    # the anatomy map: same grid, the emboli inside the pulmonary arteries, a heart present
    anatomy = truth.read_anatomy(tiny_twin, "pe", row["study_id"], reader="saliency")
    assert anatomy.shape == mask.shape and anatomy.dtype == np.uint8
    assert (anatomy[mask == 1] == truth.ANATOMY["pulmonary_arteries"]).all()
    assert (anatomy == truth.ANATOMY["heart"]).sum() > 1000


def test_a_mask_file_without_the_anatomy_map_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "pe" / "ground_truth" / "masks"
    folder.mkdir(parents=True)
    np.savez_compressed(folder / "s1.npz", mask=np.zeros((2, 3, 3), np.uint8))
    assert truth.read_mask(tmp_path, "pe", "s1", reader="saliency").shape == (2, 3, 3)
    with pytest.raises(ValueError, match=r"s1\.npz: no 'anatomy' array \(a twin written by an older generator\)"):
        truth.read_anatomy(tmp_path, "pe", "s1", reader="saliency")
