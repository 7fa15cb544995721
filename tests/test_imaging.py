"""CT volume I/O: NIfTI and DICOM round trips, windowing, and the errors at the entry points."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from helpers.imaging import (
    Volume,
    VolumeFormatError,
    load_volume,
    window,
    write_dicom_series,
    write_nifti,
)

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"


def _volume(rng: np.random.Generator) -> Volume:
    """A non-cubic volume (z, y, x) = (7, 12, 10) with anisotropic spacing and an offset origin."""
    hu = rng.uniform(-1000.0, 1500.0, size=(7, 12, 10)).astype(np.float32)
    return Volume(hu=hu, spacing=(3.0, 0.75, 0.8), origin=(-40.0, -120.5, -100.25))


def _write_dicom(vol: Volume, folder: Path, series_uid: str = SERIES_UID) -> list[Path]:
    return write_dicom_series(
        vol,
        folder,
        patient_id="P001",
        study_uid=STUDY_UID,
        series_uid=series_uid,
        study_datetime=datetime(2020, 5, 17, 13, 45, 10),
        institution_name="site_b",
    )


@pytest.mark.parametrize("name", ["ct.nii.gz", "ct.nii"])
def test_nifti_round_trip(tmp_path: Path, name: str) -> None:
    vol = _volume(np.random.default_rng(1))
    write_nifti(vol, tmp_path / name)
    back = load_volume(tmp_path / name)
    assert back.hu.dtype == np.float32
    assert back.hu.shape == vol.hu.shape
    np.testing.assert_allclose(back.hu, vol.hu, atol=0.5)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)


def test_nifti_is_int16_and_reproducible(tmp_path: Path) -> None:
    import nibabel as nib

    vol = _volume(np.random.default_rng(2))
    write_nifti(vol, tmp_path / "a.nii.gz")
    write_nifti(vol, tmp_path / "b.nii.gz")
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    img = nib.load(tmp_path / "a.nii.gz")
    assert img.get_data_dtype() == np.int16
    np.testing.assert_allclose(img.header.get_zooms(), (0.8, 0.75, 3.0), rtol=1e-6)


def test_dicom_round_trip_and_tags(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(3))
    paths = _write_dicom(vol, tmp_path / "series")
    assert len(paths) == vol.hu.shape[0]
    back = load_volume(tmp_path / "series")
    np.testing.assert_allclose(back.hu, vol.hu, atol=0.5)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-3)

    sops = set()
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT"
        assert ds.StudyInstanceUID == STUDY_UID and ds.SeriesInstanceUID == SERIES_UID
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert (ds.Rows, ds.Columns) == (12, 10)
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
        assert ds.RescaleType == "HU" and ds.PhotometricInterpretation == "MONOCHROME2"
        assert ds.PatientID == "P001" and ds.StudyDate == "20200517"
        assert ds.InstitutionName == "site_b"
        assert float(ds.ImagePositionPatient[2]) == pytest.approx(-40.0 + 3.0 * k)
        sops.add(ds.SOPInstanceUID)
    assert len(sops) == len(paths)


# The attributes of the modules a CT Image Storage object must hold (DICOM PS3.3 A.3.3):
# type 1 (present, not empty) and type 2 (present, may be empty).
_CT_TYPE1 = {
    "General Study": ["StudyInstanceUID"],
    "General Series": ["Modality", "SeriesInstanceUID"],
    "Frame of Reference": ["FrameOfReferenceUID"],
    "Image Plane": ["PixelSpacing", "ImageOrientationPatient", "ImagePositionPatient"],
    "Image Pixel": [
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "PixelData",
    ],
    "CT Image": ["ImageType", "RescaleIntercept", "RescaleSlope"],
    "SOP Common": ["SOPClassUID", "SOPInstanceUID"],
}
_CT_TYPE2 = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "SeriesNumber",
    "PositionReferenceIndicator",
    "Manufacturer",
    "InstanceNumber",
    "SliceThickness",
    "KVP",
    "AcquisitionNumber",
]


def test_dicom_files_are_valid_ct_images(tmp_path: Path) -> None:
    """Every file reads back under pydicom's strict validation, has a valid file meta, the
    CT Image IOD's type 1 and type 2 attributes, and a geometry consistent across the series:
    one orientation, equal pixel spacing, positions one slice thickness apart along the
    normal, instance numbers in position order."""
    from pydicom import config
    from pydicom.dataset import validate_file_meta

    vol = _volume(np.random.default_rng(6))
    paths = _write_dicom(vol, tmp_path / "series")
    modes = (config.settings.reading_validation_mode, config.settings.writing_validation_mode)
    config.settings.reading_validation_mode = config.RAISE
    config.settings.writing_validation_mode = config.RAISE
    try:
        datasets = []
        for path in paths:
            with path.open("rb") as fh:
                assert fh.read(132)[128:] == b"DICM"
            ds = pydicom.dcmread(path)
            validate_file_meta(ds.file_meta, enforce_standard=True)
            for elem in ds.iterall():  # converting every value validates it
                _ = elem.value
            ds.save_as(tmp_path / "resaved.dcm", enforce_file_format=True)
            for module, keywords in _CT_TYPE1.items():
                for keyword in keywords:
                    assert keyword in ds, (module, keyword)
                    assert ds[keyword].value not in (None, "", b""), (module, keyword)
            for keyword in _CT_TYPE2:
                assert keyword in ds, keyword
            assert ds.SamplesPerPixel == 1 and ds.BitsAllocated == 16
            assert list(ds.ImageType[:2]) == ["ORIGINAL", "PRIMARY"]
            datasets.append(ds)
    finally:
        config.settings.reading_validation_mode, config.settings.writing_validation_mode = modes
    orientation = {tuple(float(v) for v in ds.ImageOrientationPatient) for ds in datasets}
    assert len(orientation) == 1
    row, col = np.array(next(iter(orientation))).reshape(2, 3)
    normal = np.cross(row, col)
    spacing = {tuple(float(v) for v in ds.PixelSpacing) for ds in datasets}
    assert spacing == {(0.75, 0.8)}
    positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
    np.testing.assert_allclose(
        np.diff(positions @ normal), float(datasets[0].SliceThickness), rtol=1e-6
    )
    np.testing.assert_allclose(positions[:, :2], [[-100.25, -120.5]] * len(paths), atol=1e-6)
    assert [ds.InstanceNumber for ds in datasets] == list(range(1, len(paths) + 1))
    assert len({ds.FrameOfReferenceUID for ds in datasets}) == 1
    for k, ds in enumerate(datasets):  # each file's pixels are that slice of the volume
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_allclose(hu, np.rint(vol.hu[k]), atol=0.5)


def test_dicom_uids_are_reproducible(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(4))
    a = _write_dicom(vol, tmp_path / "a")
    b = _write_dicom(vol, tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_dicom_slices_sorted_by_position_not_name(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(5))
    paths = _write_dicom(vol, tmp_path / "s")
    # reverse the file names: loading must still order slices by their position along the
    # normal (other orientations: tests/test_dicom_archives.py)
    for p in paths:
        p.rename(p.with_name("x" + p.name))
    for i, p in enumerate(sorted(paths, reverse=True)):
        p.with_name("x" + p.name).rename(tmp_path / "s" / f"{i:04d}.dcm")
    back = load_volume(tmp_path / "s")
    np.testing.assert_allclose(back.hu, vol.hu, atol=0.5)


def test_window_numpy() -> None:
    hu = np.array([-2000, -1350, -600, 150, 900], dtype=np.int16)
    out = window(hu, -1350, 150)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0])


def test_window_torch_is_differentiable() -> None:
    torch = pytest.importorskip("torch")
    hu = torch.tensor([-200.0, 50.0, 300.0], requires_grad=True)
    out = window(hu, -125.0, 225.0)
    out.sum().backward()
    np.testing.assert_allclose(out.detach().numpy(), [0.0, 175 / 350, 1.0], rtol=1e-6)
    np.testing.assert_allclose(hu.grad.numpy(), [0.0, 1 / 350, 0.0], rtol=1e-6)


@pytest.mark.parametrize(("lo", "hi"), [(150.0, -1350.0), (10.0, 10.0), (float("nan"), 1.0)])
def test_window_rejects_bad_bounds(lo: float, hi: float) -> None:
    with pytest.raises(ValueError, match="expected finite lo < hi"):
        window(np.zeros(3), lo, hi)


def test_volume_validates_shape_and_spacing() -> None:
    with pytest.raises(ValueError, match=r"Volume.hu: expected a 3-d array"):
        Volume(hu=np.zeros((4, 4)), spacing=(1, 1, 1))
    with pytest.raises(ValueError, match=r"Volume.spacing: expected three positive"):
        Volume(hu=np.zeros((2, 2, 2)), spacing=(1, 0, 1))


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    with pytest.raises(FileNotFoundError, match="no such file or folder.*nope.nii.gz"):
        load_volume(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VolumeFormatError, match="empty holds no files"):
        load_volume(empty)

    bad = tmp_path / "scan.mha"
    bad.write_bytes(b"0")
    with pytest.raises(VolumeFormatError, match=r"unsupported file .*scan.mha"):
        load_volume(bad)


def test_load_refuses_a_folder_of_single_slices_from_two_series(tmp_path: Path) -> None:
    """Two series of one slice each: neither is a volume (the choice among several series is
    tested in tests/test_dicom_archives.py)."""
    vol = _volume(np.random.default_rng(6))
    a = _write_dicom(vol, tmp_path / "a")
    b = _write_dicom(vol, tmp_path / "b", series_uid="1.2.826.0.1.3680043.8.498.1.2")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "1.dcm").write_bytes(a[0].read_bytes())
    (mixed / "2.dcm").write_bytes(b[1].read_bytes())
    with pytest.raises(VolumeFormatError, match=(
        r"mixed has no series to read as a CT volume; expected an axial series of at least 2 slices with its "
        r"geometry tags \(series 1\.2\.826\.0\.1\.3680043\.8\.498\.1\.1 "
        r"\(SeriesNumber 1, 1 image\(s\)\): a single slice, not a volume; series .*\.1\.2 .*: a single slice")):
        load_volume(mixed)


def test_a_stray_file_that_is_not_dicom_is_skipped_and_noted(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(9))
    _write_dicom(vol, tmp_path / "s")
    (tmp_path / "s" / "notes.txt").write_text("scanned at night")
    loaded = load_volume(tmp_path / "s")
    np.testing.assert_allclose(loaded.hu, load_volume(tmp_path / "s").hu)
    assert loaded.hu.shape == vol.hu.shape
    assert any("skipped 1 file(s) that are not DICOM, e.g. notes.txt" in note for note in loaded.notes)
    # a folder of nothing but such files is no series
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "notes.txt").write_text("scanned at night")
    with pytest.raises(VolumeFormatError, match=r"t holds no DICOM file .*notes\.txt in .*t is not a DICOM file"):
        load_volume(tmp_path / "t")


def test_load_rejects_missing_rescale(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(7))
    paths = _write_dicom(vol, tmp_path / "s")
    ds = pydicom.dcmread(paths[2])
    del ds.RescaleSlope
    ds.save_as(paths[2])
    with pytest.raises(VolumeFormatError, match="0003.dcm in .* lacks the RescaleSlope tag"):
        load_volume(tmp_path / "s")


def test_write_dicom_rejects_bad_uid(tmp_path: Path) -> None:
    vol = _volume(np.random.default_rng(8))
    with pytest.raises(ValueError, match="series_uid must be a DICOM UID"):
        _write_dicom(vol, tmp_path / "s", series_uid="not-a-uid")
