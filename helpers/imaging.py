"""CT volume input and output: NIfTI files and DICOM series, in Hounsfield units.

A :class:`Volume` holds a CT in the patient's LPS frame (DICOM convention): array axes are
``(z, y, x)`` with ``x`` increasing towards the patient's left, ``y`` towards posterior and
``z`` towards superior; ``spacing`` and ``origin`` are in millimetres in that same order.

``load_volume`` reads either format into that frame; ``write_nifti`` and
``write_dicom_series`` write it back (int16 NIfTI with a RAS affine; one uncompressed CT Image
Storage file per slice). ``window`` maps HU to ``[0, 1]`` for numpy arrays and torch tensors; ``air_offset`` estimates a
scan's HU calibration error from the air around the patient.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "AIR_HU",
    "IMAGING_INDEX_COLUMNS",
    "Volume",
    "VolumeFormatError",
    "air_offset",
    "load_volume",
    "window",
    "write_nifti",
    "write_dicom_series",
]

# The imaging index: one row per CT study, the link between the records and the volumes
# (``image_path`` relative to the imaging root; ``image_format`` ``nifti`` or ``dicom``).
IMAGING_INDEX_COLUMNS = (
    "study_id",
    "person_id",
    "institution",
    "study_datetime",
    "image_path",
    "image_format",
)

_INT16_MIN, _INT16_MAX = -32768, 32767
# DICOM pixels are stored unsigned as HU + 1024, the usual CT convention.
_DICOM_INTERCEPT = -1024.0


# Air is -1000 HU by the definition of the Hounsfield scale.
AIR_HU = -1000.0
# Border voxels below this count as air (lung parenchyma is above it only in part, fat and
# soft tissue never are); the estimate needs this share of the border to be air.
_AIR_THRESHOLD_HU = -900.0
_AIR_MIN_SHARE = 0.25


class VolumeFormatError(ValueError):
    """A file or folder exists but does not hold a usable CT volume; the message names it."""


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units.

    ``hu``: float32 array, shape ``(z, y, x)``, HU (air about -1000, water 0, bone > 300).
    ``spacing``: voxel size ``(z, y, x)`` in mm, all > 0.
    ``origin``: LPS position ``(z, y, x)`` in mm of the centre of voxel ``[0, 0, 0]``.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def __post_init__(self) -> None:
        hu = np.asarray(self.hu)
        if hu.ndim != 3:
            raise ValueError(f"Volume.hu: expected a 3-d array (z, y, x), got shape {hu.shape}")
        if hu.dtype != np.float32:
            hu = hu.astype(np.float32)
        object.__setattr__(self, "hu", hu)
        spacing = tuple(float(s) for s in self.spacing)
        if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
            raise ValueError(
                f"Volume.spacing: expected three positive mm values (z, y, x), got {self.spacing}"
            )
        origin = tuple(float(o) for o in self.origin)
        if len(origin) != 3:
            raise ValueError(
                f"Volume.origin: expected three mm values (z, y, x), got {self.origin}"
            )
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(int(n) for n in self.hu.shape)  # type: ignore[return-value]


def window(hu: Any, lo: float, hi: float) -> Any:
    """Clip ``hu`` to ``[lo, hi]`` HU and map it linearly to ``[0, 1]`` (``lo`` -> 0, ``hi`` -> 1).

    Works on numpy arrays (returns float32 for integer or float32 input, float64 for float64)
    and on torch tensors (differentiable inside the window; same dtype and device).

    >>> window(np.array([-2000.0, -600.0, 150.0, 900.0]), -1350, 150).round(3).tolist()
    [0.0, 0.5, 1.0, 1.0]
    """
    lo, hi = float(lo), float(hi)
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"window: expected finite lo < hi (HU), got lo={lo}, hi={hi}")
    if isinstance(hu, np.ndarray) or np.isscalar(hu):
        arr = np.asarray(hu)
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        return (arr.clip(lo, hi) - lo) / (hi - lo)
    if not hasattr(hu, "clip"):
        raise TypeError(f"window: expected a numpy array or torch tensor, got {type(hu).__name__}")
    return (hu.clip(lo, hi) - lo) / (hi - lo)


def air_offset(hu: np.ndarray, *, border: int = 2, max_offset: float = 150.0) -> float:
    """How far a scan's air reads from -1000 HU: the median of the air voxels on the in-plane
    border of the volume (the ``border`` outermost rows and columns of every slice, the voxels
    below -900 HU) minus -1000. Subtracting it calibrates the scan (``hu - air_offset(hu)``).

    The median is robust to noise and to vendors that clip at -1024 HU, as long as fewer than
    half of the air voxels are clipped. Returns 0.0 when under a quarter of the border is air
    (e.g. a field of view cropped to the body) or when the estimate is beyond ``max_offset``
    HU, so a scan without air in view is left as it is.

    >>> hu = np.full((2, 8, 8), -980.0, np.float32); hu[:, 3:5, 3:5] = 40.0
    >>> air_offset(hu)
    20.0
    """
    arr = np.asarray(hu)
    if arr.ndim != 3:
        raise ValueError(f"air_offset: expected a (z, y, x) volume, got shape {arr.shape}")
    b = int(border)
    if b < 1 or 2 * b >= min(arr.shape[1:]):
        raise ValueError(f"air_offset: 'border' must be >= 1 and leave an interior, got {border} for shape {arr.shape}")
    ring = np.concatenate([arr[:, :b, :].ravel(), arr[:, -b:, :].ravel(),
                           arr[:, b:-b, :b].ravel(), arr[:, b:-b, -b:].ravel()])
    air = ring[ring < _AIR_THRESHOLD_HU]
    if air.size < _AIR_MIN_SHARE * ring.size:
        return 0.0
    offset = float(np.median(air)) - AIR_HU
    return offset if abs(offset) <= max_offset else 0.0


def load_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a CT volume in HU from a NIfTI file (``.nii``/``.nii.gz``) or a DICOM series folder.

    NIfTI: the image is reoriented to the closest canonical axes, then returned in the LPS
    frame; ``scl_slope``/``scl_inter`` are applied; spacing comes from the affine.
    DICOM: every file in the folder is read; they must share one ``SeriesInstanceUID`` and carry
    ``RescaleSlope``/``RescaleIntercept``; slices are sorted by ``ImagePositionPatient[2]``
    (ascending, inferior to superior); spacing comes from ``PixelSpacing`` and the slice
    positions.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`VolumeFormatError`
    (naming ``path``) for an empty folder, a mixed series, missing rescale tags or an
    unsupported file extension.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"load_volume: no such file or folder: {p}")
    if p.is_dir():
        return _load_dicom_series(p)
    name = p.name.lower()
    if name.endswith(".nii") or name.endswith(".nii.gz"):
        return _load_nifti(p)
    raise VolumeFormatError(
        f"load_volume: unsupported file {p}; expected a .nii or .nii.gz file or a DICOM series folder"
    )


def _load_nifti(path: Path) -> Volume:
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise VolumeFormatError(f"load_volume: cannot read NIfTI file {path}: {exc}") from exc
    if len(img.shape) != 3:
        raise VolumeFormatError(f"load_volume: NIfTI file {path} is not 3-d (shape {img.shape})")
    img = nib.as_closest_canonical(img)  # array axes now point to R, A, S
    data = np.asarray(img.get_fdata(dtype=np.float32))
    # RAS+ index order -> LPS+ index order: flip the first two axes.
    lps = data[::-1, ::-1, :]
    hu = np.ascontiguousarray(lps.transpose(2, 1, 0), dtype=np.float32)
    sx, sy, sz = (float(v) for v in img.header.get_zooms()[:3])
    nx, ny, _ = data.shape
    first_ras = img.affine @ np.array([nx - 1, ny - 1, 0, 1.0])
    origin_lps = (-first_ras[0], -first_ras[1], first_ras[2])
    return Volume(hu=hu, spacing=(sz, sy, sx), origin=(origin_lps[2], origin_lps[1], origin_lps[0]))


def _load_dicom_series(folder: Path) -> Volume:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise VolumeFormatError(f"load_volume: DICOM folder {folder} holds no files")
    slices = []
    for f in files:
        try:
            slices.append(pydicom.dcmread(f))
        except pydicom.errors.InvalidDicomError as exc:
            raise VolumeFormatError(f"load_volume: {f} in {folder} is not a DICOM file") from exc
    series = {str(ds.get("SeriesInstanceUID", "")) for ds in slices}
    if len(series) != 1:
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} mixes {len(series)} series "
            f"(SeriesInstanceUID values: {', '.join(sorted(series))}); expected one"
        )
    for f, ds in zip(files, slices, strict=True):
        for tag in ("RescaleSlope", "RescaleIntercept", "ImagePositionPatient", "PixelSpacing"):
            if tag not in ds:
                raise VolumeFormatError(f"load_volume: {f} in {folder} lacks the {tag} tag")
    order = np.argsort([float(ds.ImagePositionPatient[2]) for ds in slices], kind="stable")
    slices = [slices[i] for i in order]
    planes = [
        _stored_pixels(ds).astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        for ds in slices
    ]
    shapes = {pl.shape for pl in planes}
    if len(shapes) != 1:
        raise VolumeFormatError(f"load_volume: DICOM folder {folder} has slices of shapes {shapes}")
    hu = np.stack(planes).astype(np.float32)
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    if len(z) > 1:
        steps = np.diff(z)
        if np.any(steps <= 0):
            raise VolumeFormatError(
                f"load_volume: DICOM folder {folder} has repeated slice positions"
            )
        sz = float(np.median(steps))
    else:
        sz = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    row_sp, col_sp = (float(v) for v in slices[0].PixelSpacing)
    x0, y0, z0 = (float(v) for v in slices[0].ImagePositionPatient)
    return Volume(hu=hu, spacing=(sz, row_sp, col_sp), origin=(z0, y0, x0))


def _stored_pixels(ds: Dataset) -> np.ndarray:
    """A slice's stored values, what ``ds.pixel_array`` returns. Uncompressed little-endian
    single-frame 16-bit data (``BitsStored`` 16, e.g. the twin's series) are read straight from
    ``PixelData``, which costs a tenth of pydicom's pixel handlers (about 40% of reading a
    series); anything else goes through ``pixel_array``."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if (syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) and "PixelData" in ds
            and ds.get("SamplesPerPixel", 1) == 1 and int(ds.get("NumberOfFrames") or 1) == 1
            and ds.get("BitsAllocated") == 16 and ds.get("BitsStored") == 16
            and ds.get("PixelRepresentation") in (0, 1)):
        rows, columns = int(ds.Rows), int(ds.Columns)
        data = ds.PixelData
        if len(data) >= 2 * rows * columns:
            dtype = "<u2" if ds.PixelRepresentation == 0 else "<i2"
            return np.frombuffer(data, dtype=dtype, count=rows * columns).reshape(rows, columns)
    return ds.pixel_array


def _to_int16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), _INT16_MIN, _INT16_MAX).astype(np.int16)


def write_nifti(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` as an int16 NIfTI-1 file (HU rounded to integers; no intensity scaling).

    The affine maps voxel indices to RAS mm (qform and sform code 1, scanner frame). A name
    ending in ``.nii.gz`` is gzip-compressed with a zero timestamp, so equal volumes give
    equal bytes. Returns the path written.
    """
    p = Path(path)
    name = p.name.lower()
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"write_nifti: path must end in .nii or .nii.gz, got {p}")
    data = _to_int16(volume.hu).transpose(2, 1, 0)  # (x, y, z), LPS index order
    sz, sy, sx = volume.spacing
    oz, oy, ox = volume.origin
    # LPS index order with a RAS affine: x and y columns are negated.
    affine = np.array(
        [[-sx, 0, 0, -ox], [0, -sy, 0, -oy], [0, 0, sz, oz], [0, 0, 0, 1.0]], dtype=np.float64
    )
    img = nib.Nifti1Image(np.ascontiguousarray(data), affine)
    img.header.set_data_dtype(np.int16)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = img.to_bytes()
    p.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".gz"):
        raw = gzip.compress(raw, compresslevel=1, mtime=0)
    p.write_bytes(raw)
    return p


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.6g}"
    return text if len(text) <= 16 else f"{value:.4e}"


def _encode(ds: Dataset) -> bytes:
    """``ds``'s elements encoded as Explicit VR Little Endian (no preamble, no file meta)."""
    fp = DicomBytesIO()
    fp.is_little_endian = True
    fp.is_implicit_VR = False
    write_dataset(fp, ds)
    return fp.getvalue()


_LONG_VRS = {"OB", "OW", "OF", "OD", "OL", "OV", "SQ", "UC", "UN", "UR", "UT"}


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element; ``value`` is padded to an even length (UI
    and OB with a zero byte, text with a space)."""
    if len(value) % 2:
        value += b"\x00" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def write_dicom_series(
    volume: Volume,
    folder: str | os.PathLike[str],
    *,
    patient_id: str,
    study_uid: str,
    series_uid: str,
    study_datetime: datetime | date,
    institution_name: str,
    manufacturer: str = "TWIN",
    series_description: str = "CT CHEST",
    window_center: float = 40.0,
    window_width: float = 400.0,
) -> list[Path]:
    """Write ``volume`` as a DICOM CT series: one CT Image Storage file per slice.

    Files are ``<folder>/<nnnn>.dcm`` (``nnnn`` = 1-based ``InstanceNumber``, inferior slice
    first), Explicit VR Little Endian, 16-bit unsigned pixels holding ``HU + 1024``
    (``RescaleIntercept`` -1024, ``RescaleSlope`` 1; HU below -1024 is clipped to -1024).
    ``SOPInstanceUID`` values derive from ``series_uid`` and the slice number, so rewriting the
    same series gives the same files. ``study_uid``/``series_uid`` must be valid DICOM UIDs
    (digits and dots, at most 64 characters). Returns the file paths, in slice order.
    """
    for arg, uid in (("study_uid", study_uid), ("series_uid", series_uid)):
        if not uid or len(uid) > 64 or not all(ch.isdigit() or ch == "." for ch in uid):
            raise ValueError(f"write_dicom_series: {arg} must be a DICOM UID, got {uid!r}")
    if window_width <= 0:
        raise ValueError(f"write_dicom_series: window_width must be > 0 HU, got {window_width}")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    hu = np.clip(np.rint(volume.hu), _DICOM_INTERCEPT, 65535 + _DICOM_INTERCEPT)
    stored = (hu - _DICOM_INTERCEPT).astype("<u2")
    nz, ny, nx = stored.shape
    sz, sy, sx = volume.spacing
    oz, oy, ox = volume.origin
    when = (
        study_datetime
        if isinstance(study_datetime, datetime)
        else datetime(study_datetime.year, study_datetime.month, study_datetime.day)
    )

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = when.strftime("%Y%m%d")
    ds.SeriesDate = ds.StudyDate
    ds.StudyTime = when.strftime("%H%M%S")
    ds.SeriesTime = ds.StudyTime
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = manufacturer
    ds.InstitutionName = institution_name
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.SliceThickness = _ds(sz)
    ds.SpacingBetweenSlices = _ds(sz)
    ds.KVP = "120"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=[series_uid, "frame-of-reference"])
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ny
    ds.Columns = nx
    ds.PixelSpacing = [_ds(sy), _ds(sx)]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(window_center)
    ds.WindowWidth = _ds(window_width)
    ds.RescaleIntercept = _ds(_DICOM_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"

    # The fixed elements are encoded once by pydicom; each file joins them with its own file
    # meta, slice elements and pixel data, encoded here (the bytes ``Dataset.save_as`` would
    # write, many times faster; tests/test_imaging.py checks the files under strict
    # validation).
    per_slice = {
        Tag("SOPInstanceUID"),
        Tag("InstanceNumber"),
        Tag("ImagePositionPatient"),
        Tag("SliceLocation"),
        Tag("PixelData"),
    }
    ds.SOPInstanceUID = ""
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [_ds(ox), _ds(oy), _ds(oz)]
    ds.SliceLocation = _ds(oz)
    ds.PixelData = b""
    ds["PixelData"].VR = "OW"
    chunks: list[bytes | int] = []  # encoded runs of fixed elements, or a per-slice tag
    run = Dataset()
    for elem in ds:  # ascending tag order, as a DICOM file requires
        if elem.tag in per_slice:
            if len(run):
                chunks.append(_encode(run))
                run = Dataset()
            chunks.append(int(elem.tag))
        else:
            run.add(elem)
    if len(run):
        chunks.append(_encode(run))
    meta_fixed = (
        _element(0x00020001, "OB", b"\x00\x01"),
        _element(0x00020002, "UI", CTImageStorage.encode()),
        _element(0x00020010, "UI", ExplicitVRLittleEndian.encode())
        + _element(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode())
        + _element(0x00020013, "SH", f"PYDICOM {pydicom.__version__}".encode()),
    )
    paths = []
    for k in range(nz):
        sop = generate_uid(entropy_srcs=[series_uid, str(k)]).encode()
        z = oz + k * sz
        values = {
            int(Tag("SOPInstanceUID")): _element(0x00080018, "UI", sop),
            int(Tag("InstanceNumber")): _element(0x00200013, "IS", str(k + 1).encode()),
            int(Tag("ImagePositionPatient")): _element(
                0x00200032, "DS", "\\".join((_ds(ox), _ds(oy), _ds(z))).encode()
            ),
            int(Tag("SliceLocation")): _element(0x00201041, "DS", _ds(z).encode()),
            int(Tag("PixelData")): _element(0x7FE00010, "OW", stored[k].tobytes()),
        }
        meta_group = meta_fixed[0] + meta_fixed[1] + _element(0x00020003, "UI", sop) + meta_fixed[2]
        parts = [
            b"\x00" * 128 + b"DICM",
            _element(0x00020000, "UL", struct.pack("<I", len(meta_group))),
            meta_group,
        ]
        parts += [values[c] if isinstance(c, int) else c for c in chunks]
        target = out / f"{k + 1:04d}.dcm"
        target.write_bytes(b"".join(parts))
        paths.append(target)
    return paths
