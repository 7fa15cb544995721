"""DICOM folders as archives hold them: several series and a localizer in one folder, slices in
any in-plane orientation and file order, missing or unevenly spaced slices, compressed pixel
data, and an extraction that goes on past a study it cannot read.

The series are written by ``helpers.imaging.write_dicom_series`` and then edited with pydicom
(orientation, positions, tags, transfer syntax). The JPEG-LS case decodes the lossless
JPEG-LS file that ships with pydicom 3.0.2 (``MR_small_jpeg_ls_lossless.dcm``) against its
uncompressed twin (``MR_small.dcm``): no JPEG-LS encoder installs offline (pydicom's needs
pyjpegls), while JPEG 2000 is encoded here by pylibjpeg-openjpeg 2.6.0.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, generate_uid

from helpers.embeddings import (
    EXCLUSION_COLUMNS,
    EmbeddingError,
    exclusions_path,
    read_embeddings,
    write_exclusions,
)
from helpers.encoders import (
    SlicePreprocess,
    UnreadableVolumeError,
    VolumeDataset,
    encode_volumes,
    image_encoder,
)
from helpers.extract import extract
from helpers.imaging import (
    SliceSpacingError,
    Volume,
    VolumeFormatError,
    load_volume,
    write_dicom_series,
)
from helpers.manifest import load

STUDY_UID = "1.2.826.0.1.3680043.8.498.7"
SERIES_UID = "1.2.826.0.1.3680043.8.498.7.1"


def _volume(seed: int, shape: tuple[int, int, int] = (7, 12, 10)) -> Volume:
    """Integer HU (what a DICOM round trip keeps) on an anisotropic grid with an offset origin."""
    hu = np.random.default_rng(seed).integers(-1000, 1500, size=shape).astype(np.float32)
    return Volume(hu=hu, spacing=(3.0, 0.75, 0.8), origin=(-40.0, -120.5, -100.25))


def _write(vol: Volume, folder: Path, series_uid: str = SERIES_UID) -> list[Path]:
    return write_dicom_series(vol, folder, patient_id="P007", study_uid=STUDY_UID, series_uid=series_uid,
                              study_datetime=datetime(2021, 3, 4, 9, 30), institution_name="site_a")


def _edit(path: Path, **tags) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    ds.save_as(path)


def _check_equal(back: Volume, vol: Volume) -> None:
    np.testing.assert_array_equal(back.hu, vol.hu)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-3)


# ---------------------------------------------------------------- several series in a folder


def test_a_localizer_and_a_dose_report_are_skipped_and_recorded(tmp_path):
    vol = _volume(1)
    folder = tmp_path / "study"
    paths = _write(vol, folder)
    # an AP and a lateral localizer in their own series, as scanners write them
    for k, iop in enumerate((["1", "0", "0", "0", "0", "-1"], ["0", "1", "0", "0", "0", "-1"])):
        ds = pydicom.dcmread(paths[0])
        ds.SeriesInstanceUID, ds.SeriesNumber = f"{SERIES_UID}.9", 0
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["localizer", str(k)])
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.ImageOrientationPatient = iop
        ds.save_as(folder / f"loc{k}.dcm")
    report = pydicom.dcmread(paths[0])  # a dose report: a DICOM object without pixel data
    del report.PixelData
    report.SeriesInstanceUID = f"{SERIES_UID}.99"
    report.save_as(folder / "dose.dcm")

    back = load_volume(folder)
    _check_equal(back, vol)
    assert len(back.notes) == 3
    assert back.notes[0].startswith(f"DICOM folder {folder}: read series {SERIES_UID} (SeriesNumber 1, 7 image(s))")
    assert "the most slices, then the lowest SeriesNumber" in back.notes[0]
    assert back.notes[1] == (f"skipped series {SERIES_UID}.9 (SeriesNumber 0, 2 image(s)): localizer "
                             "(ImageType ORIGINAL\\PRIMARY\\LOCALIZER)")
    assert back.notes[2] == "skipped 1 DICOM file(s) without pixel data, e.g. dose.dcm"
    assert load_volume(tmp_path / "study").notes == back.notes  # the same record every time
    assert _volume(1).notes == () and load_volume(_write(vol, tmp_path / "plain")[0].parent).notes == ()


def test_a_localizer_inside_the_axial_series_is_dropped(tmp_path):
    vol = _volume(2)
    folder = tmp_path / "study"
    paths = _write(vol, folder)
    ds = pydicom.dcmread(paths[0])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["localizer in series"])
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
    ds.save_as(folder / "scout.dcm")
    back = load_volume(folder)
    _check_equal(back, vol)
    assert back.notes[1] == f"skipped 1 localizer image(s) of series {SERIES_UID} (SeriesNumber 1, 8 image(s))"


def test_the_series_with_most_slices_then_lowest_series_number_is_read(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    thin, other, thick = _volume(3), _volume(4), _volume(5, shape=(3, 12, 10))
    for vol, uid, number in ((thin, f"{SERIES_UID}.3", 5), (other, f"{SERIES_UID}.2", 2), (thick, f"{SERIES_UID}.1", 1)):
        for path in _write(vol, tmp_path / uid, series_uid=uid):
            _edit(path, SeriesNumber=number)
            path.rename(folder / f"{uid}-{path.name}")
    back = load_volume(folder)
    # 7 slices beat 3; of the two 7-slice series, SeriesNumber 2 beats 5
    _check_equal(back, other)
    assert back.notes[0].startswith(f"DICOM folder {folder}: read series {SERIES_UID}.2 (SeriesNumber 2, 7 image(s))")
    assert sorted(back.notes[1:]) == [
        f"skipped series {SERIES_UID}.1 (SeriesNumber 1, 3 image(s)): axial, but not the primary series (3 slices)",
        f"skipped series {SERIES_UID}.3 (SeriesNumber 5, 7 image(s)): axial, but not the primary series (7 slices)",
    ]


def test_a_folder_without_an_axial_volume_lists_every_series_and_why(tmp_path):
    vol = _volume(6)
    folder = tmp_path / "coronal"
    for path in _write(vol, folder):
        _edit(path, ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"])
    one = _write(vol, tmp_path / "one", series_uid=f"{SERIES_UID}.5")[0]
    one.rename(folder / "single.dcm")
    with pytest.raises(VolumeFormatError, match="has no series to read as a CT volume; expected an axial series of at least 2 slices") as caught:
        load_volume(folder)
    message = str(caught.value)
    assert str(folder) in message
    assert (f"series {SERIES_UID} (SeriesNumber 1, 7 image(s)): not axial: ImageOrientationPatient "
            "1\\0\\0\\0\\0\\-1 (coronal) puts the slice normal 90.0 deg from the patient's z axis") in message
    assert "at most 5 deg is read" in message
    assert f"series {SERIES_UID}.5 (SeriesNumber 1, 1 image(s)): a single slice, not a volume" in message


def test_a_folder_without_images_says_so(tmp_path):
    folder = tmp_path / "reports"
    path = _write(_volume(7), folder)[0]
    for extra in folder.iterdir():
        if extra != path:
            extra.unlink()
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(VolumeFormatError, match=r"reports holds no images: none of its 1 DICOM file\(s\) has pixel data"):
        load_volume(folder)


# ---------------------------------------------------------------- orientation and order


def _reoriented(vol: Volume, folder: Path, iop: list[str], plane, corner: tuple[int, int], swap: bool) -> None:
    """Rewrite the series of ``vol`` in ``folder`` with ``ImageOrientationPatient`` ``iop``:
    each file's pixels become ``plane(stored pixels)`` and its position the LPS centre of
    voxel (y, x) = ``corner`` of that slice, which is where the new first pixel lies. ``swap``:
    the rows run along x (PixelSpacing becomes (x, y))."""
    sz, sy, sx = vol.spacing
    oz, oy, ox = vol.origin
    for k, path in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(path)
        pixels = np.ascontiguousarray(plane(ds.pixel_array))
        ds.PixelData, ds.Rows, ds.Columns = pixels.tobytes(), pixels.shape[0], pixels.shape[1]
        ds.ImageOrientationPatient = iop
        ds.ImagePositionPatient = [f"{ox + corner[1] * sx:g}", f"{oy + corner[0] * sy:g}", f"{oz + k * sz:g}"]
        if swap:
            ds.PixelSpacing = [f"{sx:g}", f"{sy:g}"]
        ds.save_as(path)


@pytest.mark.parametrize(("iop", "plane", "corner", "swap"), [
    # rows towards the patient's right: columns reversed, the first pixel at the largest x
    (["-1", "0", "0", "0", "1", "0"], lambda p: p[:, ::-1], (0, 9), False),
    # columns towards anterior: rows reversed
    (["1", "0", "0", "0", "-1", "0"], lambda p: p[::-1, :], (11, 0), False),
    # rows along y and columns along x (the plane transposed)
    (["0", "1", "0", "1", "0", "0"], lambda p: p.T, (0, 0), True),
    # transposed, both reversed: feet-first prone
    (["0", "-1", "0", "-1", "0", "0"], lambda p: p.T[::-1, ::-1], (11, 9), True),
], ids=["row-right", "column-anterior", "transposed", "transposed-reversed"])
def test_any_axial_orientation_and_file_order_reads_the_same_volume(tmp_path, iop, plane, corner, swap):
    vol = _volume(8)
    folder = tmp_path / "series"
    _write(vol, folder)
    _reoriented(vol, folder, iop, plane, corner, swap)
    rng = np.random.default_rng(0)
    files = sorted(folder.iterdir())
    for path, new in zip(files, rng.permutation(len(files)), strict=True):  # file names no longer in slice order
        path.rename(folder / f"tmp{new}")
    for path in folder.iterdir():
        path.rename(folder / f"IM{int(path.name[3:]):04d}")
    back = load_volume(folder)
    _check_equal(back, vol)
    assert back.notes == ()


def test_a_slightly_oblique_series_is_read_and_a_tilted_one_refused(tmp_path):
    vol = _volume(9)
    folder = tmp_path / "series"
    paths = _write(vol, folder)
    angle = np.deg2rad(2.0)
    for path in paths:
        _edit(path, ImageOrientationPatient=["1", "0", "0", "0", f"{np.cos(angle):.6f}", f"{np.sin(angle):.6f}"])
    back = load_volume(folder)
    np.testing.assert_array_equal(back.hu, vol.hu)
    # the steps are measured along the tilted normal: 3 mm x cos(2 deg)
    assert back.spacing[0] == pytest.approx(3.0 * np.cos(angle), rel=1e-5)
    assert back.spacing[1:] == vol.spacing[1:]
    angle = np.deg2rad(20.0)
    for path in paths:
        _edit(path, ImageOrientationPatient=["1", "0", "0", "0", f"{np.cos(angle):.6f}", f"{np.sin(angle):.6f}"])
    with pytest.raises(VolumeFormatError, match=r"\(axial\) puts the slice normal 20\.0 deg from the patient's z axis"):
        load_volume(folder)


def test_slices_of_different_orientations_are_refused(tmp_path):
    paths = _write(_volume(10), tmp_path / "s")
    _edit(paths[3], ImageOrientationPatient=["-1", "0", "0", "0", "1", "0"])
    with pytest.raises(VolumeFormatError, match=r"slices of different orientations \(0001\.dcm and 0004\.dcm differ"):
        load_volume(tmp_path / "s")


def _drop(keyword: str):
    def edit(ds: pydicom.Dataset) -> None:
        delattr(ds, keyword)
    return edit


@pytest.mark.parametrize(("edit", "match"), [
    (_drop("ImagePositionPatient"), r"no series to read as a CT volume; .*: 0003\.dcm lacks the ImagePositionPatient tag\)"),
    (lambda ds: setattr(ds, "ImagePositionPatient", ["1", "2"]),
     r"0003\.dcm has ImagePositionPatient \[1(\.0)?, 2(\.0)?\]; expected 3 numbers"),
    (lambda ds: setattr(ds, "SamplesPerPixel", 3), r"0003\.dcm has 3 samples per pixel; expected a grey-scale CT image"),
    (_drop("RescaleIntercept"), r"0003\.dcm in .*series lacks the RescaleIntercept tag"),
    (lambda ds: setattr(ds, "PixelSpacing", ["0.7", "0.8"]),
     r"series has slices of PixelSpacing \[\(0\.7, 0\.8\), \(0\.75, 0\.8\)\] mm; expected one"),
], ids=["no-position", "short-position", "colour", "no-intercept", "pixel-spacing"])
def test_a_bad_slice_is_refused_with_its_file_and_what_was_expected(tmp_path, edit, match):
    paths = _write(_volume(14), tmp_path / "series")
    ds = pydicom.dcmread(paths[2])
    edit(ds)
    ds.save_as(paths[2])
    with pytest.raises(VolumeFormatError, match=match):
        load_volume(tmp_path / "series")


# ---------------------------------------------------------------- spacing


def test_a_missing_slice_is_refused_with_the_gap(tmp_path):
    paths = _write(_volume(11), tmp_path / "s")
    paths[3].unlink()  # the slice at -31 mm
    with pytest.raises(SliceSpacingError) as caught:
        load_volume(tmp_path / "s")
    assert str(caught.value) == (
        f"load_volume: DICOM folder {tmp_path / 's'}: missing slice(s): gap of 6.0 mm between positions -34.0 and "
        "-28.0 mm (0003.dcm and 0005.dcm) where the median step is 3.0 mm (1 gap(s) over 1.5 median steps); "
        "expected evenly spaced slices"
    )
    assert isinstance(caught.value, VolumeFormatError)


def test_uneven_steps_and_repeated_positions_are_refused(tmp_path):
    paths = _write(_volume(12), tmp_path / "s")
    _edit(paths[2], ImagePositionPatient=["-100.25", "-120.5", "-33.4"])  # 0.6 mm (20%) off
    with pytest.raises(SliceSpacingError, match=r"non-uniform slice spacing: step of 3\.6 mm between positions -37\.0 and "
                                                r"-33\.4 mm \(0002\.dcm and 0003\.dcm\) where the median step is 3\.0 mm "
                                                r"\(steps from 2\.4 to 3\.6 mm; at most 10% from the median is read\)"):
        load_volume(tmp_path / "s")
    _edit(paths[2], ImagePositionPatient=["-100.25", "-120.5", "-34.2"])  # 0.2 mm (7%) off: read
    assert load_volume(tmp_path / "s").spacing[0] == pytest.approx(3.0)
    _edit(paths[2], ImagePositionPatient=["-100.25", "-120.5", "-37"])
    with pytest.raises(VolumeFormatError, match=r"repeated slice positions: 0002\.dcm and 0003\.dcm both lie at -37\.0 mm"):
        load_volume(tmp_path / "s")


# ---------------------------------------------------------------- compressed pixel data


def test_a_jpeg2000_lossless_series_reads_back_the_same_hu(tmp_path):
    vol = _volume(13, shape=(4, 40, 36))  # openjpeg needs planes of at least 32 pixels a side
    paths = _write(vol, tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == JPEG2000Lossless
    _check_equal(load_volume(tmp_path / "s"), vol)

    original = paths[2].read_bytes()
    ds = pydicom.dcmread(paths[2])  # a transfer syntax no installed plugin decodes
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(paths[2])
    with pytest.raises(VolumeFormatError, match=r"0003\.dcm in .* \(transfer syntax MPEG2 Main Profile / Main Level "
                                                r"\(1\.2\.840\.10008\.1\.2\.4\.100\)\): NotImplementedError: .*; no decoder "
                                                r"for this transfer syntax is installed"):
        load_volume(tmp_path / "s")
    paths[2].write_bytes(original)
    ds = pydicom.dcmread(paths[1])  # one slice's codestream cut after its main header
    ds.PixelData = encapsulate([next(generate_frames(ds.PixelData, number_of_frames=1))[:80]])
    ds.save_as(paths[1])
    with pytest.raises(VolumeFormatError, match=r"cannot decode the pixel data of .*0002\.dcm in .* \(transfer syntax "
                                                r"JPEG 2000 Image Compression \(Lossless Only\)"):
        load_volume(tmp_path / "s")


def test_a_jpeg_ls_lossless_series_decodes(tmp_path):
    """Three slices carrying pydicom's JPEG-LS lossless test image (64 x 64, signed 16 bit),
    read back equal to its uncompressed copy rescaled to HU."""
    compressed = pydicom.dcmread(get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    reference = pydicom.dcmread(get_testdata_file("MR_small.dcm")).pixel_array
    folder = tmp_path / "jls"
    folder.mkdir()
    for k in range(3):
        ds = compressed.copy()
        ds.SeriesInstanceUID, ds.SOPInstanceUID = SERIES_UID, generate_uid(entropy_srcs=["jls", str(k)])
        ds.ImagePositionPatient = ["-10", "-10", f"{2.5 * k:g}"]
        ds.RescaleSlope, ds.RescaleIntercept = "2", "-1000"
        ds.save_as(folder / f"{k}.dcm")
    back = load_volume(folder)
    assert back.hu.shape == (3, 64, 64) and back.spacing == (2.5, 0.3125, 0.3125)
    for k in range(3):
        np.testing.assert_array_equal(back.hu[k], reference * 2.0 - 1000.0)


# ---------------------------------------------------------------- extraction past a bad study


def _three_studies(tmp_path: Path) -> tuple[list[str], list[str]]:
    """Studies a and c are good DICOM series; b's folder holds a file that is not DICOM."""
    ids, paths = ["a", "b", "c"], []
    for i, sid in enumerate(ids):
        folder = tmp_path / "images" / sid
        if sid == "b":
            folder.mkdir(parents=True)
            (folder / "0001.dcm").write_bytes(b"not a DICOM file" * 40)
        else:
            _write(_volume(20 + i, shape=(6, 40, 40)), folder, series_uid=f"{SERIES_UID}.{i}")
        paths.append(str(folder))
    return ids, paths


def test_encode_volumes_leaves_out_an_unreadable_study_and_goes_on(tmp_path):
    ids, paths = _three_studies(tmp_path)
    dataset = VolumeDataset(ids, paths, SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=4, size=32))
    enc = image_encoder("randconv")
    with pytest.raises(UnreadableVolumeError, match=r"study b: cannot read .*images/b: load_volume: .*0001\.dcm in .* is "
                                                    r"not a DICOM file"):
        encode_volumes(enc, dataset, batch_size=2)
    excluded: list = []
    stats: dict = {}
    embedding, tokens = encode_volumes(enc, dataset, batch_size=2, excluded=excluded, stats=stats)
    assert embedding.shape == (2, enc.dim) and len(tokens) == 2
    assert [(e.study_id, e.path, e.error) for e in excluded] == [("b", paths[1], "VolumeFormatError")]
    assert stats["computed_volumes"] == 2 and stats["excluded_volumes"] == 1
    alone, _ = encode_volumes(enc, VolumeDataset(["a", "c"], [paths[0], paths[2]], dataset.preprocess))
    np.testing.assert_array_equal(embedding, alone)
    with_workers: list = []
    again, _ = encode_volumes(enc, dataset, batch_size=1, num_workers=1, excluded=with_workers)
    np.testing.assert_array_equal(again, embedding)
    assert [(e.study_id, e.reason) for e in with_workers] == [(e.study_id, e.reason) for e in excluded]

    gone = VolumeDataset(["b", "x"], [paths[1], str(tmp_path / "nowhere")], dataset.preprocess)
    with pytest.raises(RuntimeError, match=r"none of its 2 volumes could be read, e\.g\. study b: .*not a DICOM file; "
                                           r"study x: cannot read .*nowhere: load_volume: no such file or folder"):
        encode_volumes(enc, gone, excluded=[])


def test_extract_writes_two_embeddings_and_records_the_third_study(tmp_path):
    ids, paths = _three_studies(tmp_path)
    manifest_path = tmp_path / "m.yaml"
    manifest_path.write_text(yaml.safe_dump({"version": 1, "data": {"source": "synthetic", "synthetic": {"profile": "quick"}},
                                             "output_dir": "out"}))
    manifest = load(manifest_path)
    cohorts = manifest.run_root / "cohorts"
    cohorts.mkdir(parents=True)
    pd.DataFrame({"study_id": ids, "person_id": ["p1", "p2", "p3"], "institution": "site_a",
                  "index_time": pd.Timestamp("2020-01-01"), "time": [10.0, 20.0, 30.0], "event": [1, 0, 1],
                  "split": "train"}).to_parquet(cohorts / "pe.parquet", index=False)
    pd.DataFrame({"study_id": ids, "image_path": paths, "image_format": "dicom"}).to_parquet(
        cohorts / "pe_imaging.parquet", index=False)

    result = extract(manifest, "pe", "image", "randconv")
    table = read_embeddings(result.path)
    assert list(table.study_ids) == ["a", "c"] and result.n_studies == 2 and len(table.tokens) == 2
    assert table.metadata["excluded"] == {"studies": 1, "by_error": {"VolumeFormatError": 1},
                                          "file": "image-randconv.exclusions.csv"}
    assert "images/b" not in json.dumps(table.metadata)  # ids and paths stay in the exclusions file
    assert result.exclusions == exclusions_path(result.path)
    recorded = pd.read_csv(result.exclusions)
    assert tuple(recorded.columns) == EXCLUSION_COLUMNS
    assert recorded[["study_id", "image_path", "error"]].values.tolist() == [["b", paths[1], "VolumeFormatError"]]
    assert recorded["reason"].iloc[0].endswith("0001.dcm in " + paths[1] + " is not a DICOM file")
    assert result.excluded == recorded.to_dict(orient="records")
    with pytest.raises(EmbeddingError, match=r"'rows'\[0\]: expected the keys study_id, image_path, error, reason, got study_id"):
        write_exclusions(result.path, [{"study_id": "b"}])

    # the results chapter's flow from the index to the analysis counts it, by the kind of error
    from helpers.cohort import exclusion_flow

    pd.DataFrame({"study_id": ["z"], "institution": ["site_a"], "reason": ["duplicate study_id in the imaging index"]}
                 ).to_parquet(cohorts / "pe_exclusions.parquet", index=False)
    flow = exclusion_flow(manifest, "pe", "randconv")
    assert flow.values.tolist() == [
        ["cohort: excluded", "duplicate study_id in the imaging index", "site_a", 1],
        ["image encoder randconv: CT unreadable, image missing", "VolumeFormatError", "site_a", 1],
        ["cohort: analysed", "", "site_a", 3]]
    assert "images/" not in flow.to_csv()  # no path of a file

    # training sees study b without its image
    from helpers.training import split_arrays

    cohort = pd.read_parquet(cohorts / "pe.parquet")
    _, arrays = split_arrays(cohort, table)["train"]
    assert arrays.img_missing.tolist() == [False, True, False]

    # the folder repaired: every study is read and the exclusions file keeps only its header
    _write(_volume(21, shape=(6, 40, 40)), Path(paths[1]), series_uid=f"{SERIES_UID}.1")  # 0001.dcm overwritten
    fixed = extract(manifest, "pe", "image", "randconv")
    assert fixed.n_studies == 3 and fixed.excluded == [] and read_embeddings(fixed.path).metadata["excluded"]["studies"] == 0
    assert pd.read_csv(fixed.exclusions).empty
