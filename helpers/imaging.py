"""CT volume input and output: NIfTI files and DICOM series, in Hounsfield units.

A :class:`Volume` holds a CT in the patient's LPS frame (DICOM convention): array axes are
``(z, y, x)`` with ``x`` increasing towards the patient's left, ``y`` towards posterior and
``z`` towards superior; ``spacing`` and ``origin`` are in millimetres in that same order.

``load_volume`` reads either format into that frame; ``write_nifti`` and
``write_dicom_series`` write it back (int16 NIfTI with a RAS affine; one uncompressed CT Image
Storage file per slice). From a DICOM folder as archives hold them (several series, a
localizer, slices in any in-plane orientation, compressed pixel data) it reads the primary
axial series, sorted along the slice normal, and refuses a series with a missing slice or
uneven spacing (``SliceSpacingError``) rather than resampling it. ``window`` maps HU to
``[0, 1]`` for numpy arrays and torch tensors; ``air_offset`` estimates a scan's HU
calibration error from the air around the patient.
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
from pydicom.multival import MultiValue
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
    "SliceSpacingError",
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


# DICOM series (see ``load_volume``): a plane is axial when its row and column directions
# are each within this many degrees of the patient's x or y axis; the slices of a series
# share one orientation when their direction cosines differ by at most _ORIENTATION_ATOL.
_AXIAL_TOLERANCE_DEG = 5.0
_ORIENTATION_ATOL = 1e-3
# Steps between slice positions along the normal, in median steps: over _GAP_FACTOR is a
# missing slice, more than _STEP_TOLERANCE away from 1 is non-uniform spacing; positions
# closer than _REPEATED_MM (mm) are the same position.
_GAP_FACTOR = 1.5
_STEP_TOLERANCE = 0.10
_REPEATED_MM = 0.01


class VolumeFormatError(ValueError):
    """A file or folder exists but does not hold a usable CT volume; the message names it."""


class SliceSpacingError(VolumeFormatError):
    """A DICOM series whose slices are not evenly spaced along their normal: a missing slice
    (a step over 1.5 median steps) or a step more than 10% from the median step. Such a study
    is refused with this reason rather than resampled; the message names the folder, the two
    files and positions around the step, and the median step in mm."""


@dataclass(frozen=True)
class Volume:
    """A CT volume in Hounsfield units.

    ``hu``: float32 array, shape ``(z, y, x)``, HU (air about -1000, water 0, bone > 300).
    ``spacing``: voxel size ``(z, y, x)`` in mm, all > 0.
    ``origin``: LPS position ``(z, y, x)`` in mm of the centre of voxel ``[0, 0, 0]``.
    ``notes``: what the reader chose and left out, one sentence each: for a DICOM folder with
    more than the primary axial series, the series read, then each series or group of files
    skipped with the reason (see ``load_volume``); empty when there was nothing to leave out.
    """

    hu: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    notes: tuple[str, ...] = ()

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
        notes = (self.notes,) if isinstance(self.notes, str) else tuple(str(n) for n in self.notes)
        object.__setattr__(self, "notes", notes)

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

    DICOM: every file in the folder is read (hidden files aside). Files without pixel data
    (a DICOMDIR, a dose report) are skipped. When the images belong to several series
    (``SeriesInstanceUID``), the primary axial series is read, by this rule:

    1. images whose ``ImageType`` contains ``LOCALIZER`` are dropped, and so are series that
       are multi-frame or colour, that lack ``ImagePositionPatient``/``ImageOrientationPatient``,
       whose slices differ in orientation (direction cosines more than 0.001 apart), that are
       not axial (row and column directions each within 5 degrees of the patient's x or y
       axis, in any sign or order) or that hold a single slice;
    2. of the rest, the series with the most slices is read; ties go to the lowest
       ``SeriesNumber`` (missing counts as highest), then the lowest ``SeriesInstanceUID``.

    What was skipped is recorded on the returned volume (``Volume.notes``: the series read,
    then every series or group of files left out with its reason), not warned. Slices are
    sorted by their position along the slice normal, ``ImagePositionPatient`` dot
    (row cosine x column cosine), oriented towards superior; rows and columns are flipped or
    swapped into the LPS ``(z, y, x)`` frame. Spacing: ``PixelSpacing`` in plane, the median
    step between slice positions in z. The steps must be even: a step over 1.5 median steps
    is a missing slice, any step more than 10% from the median is non-uniform spacing, and
    both raise :class:`SliceSpacingError` (the study is refused with the reason, never
    resampled); positions closer than 0.01 mm are repeated slices (:class:`VolumeFormatError`).
    Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's
    pixel data plugins (``pylibjpeg`` with ``pylibjpeg-libjpeg`` and ``pylibjpeg-openjpeg``).
    Every slice must carry ``RescaleSlope``, ``RescaleIntercept`` and ``PixelSpacing``.

    Raises ``FileNotFoundError`` if ``path`` does not exist and :class:`VolumeFormatError`
    (naming ``path`` or the file, and what was expected) for an empty folder, a file that is
    not DICOM or cannot be decoded, a folder without a readable axial series (each series
    listed with the reason it was left out), missing tags, repeated or uneven slice
    positions, or an unsupported file extension.
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


@dataclass
class _Series:
    """The images of one ``SeriesInstanceUID`` in a folder: the files and datasets kept,
    the number of localizer images dropped, the plane's axes when it is axial (see
    ``_axial_axes``) and the reason it cannot be read, if any."""

    uid: str
    number: float
    files: list[Path]
    slices: list[Dataset]
    localizers: int = 0
    cosines: np.ndarray | None = None  # ImageOrientationPatient (6,): row then column cosine
    corners: np.ndarray | None = None  # ImagePositionPatient of each slice (n, 3), LPS mm
    axes: tuple[int, int, int, int] | None = None
    reason: str | None = None

    @property
    def label(self) -> str:
        number = "no SeriesNumber" if self.number == float("inf") else f"SeriesNumber {self.number:g}"
        uid = self.uid or "without SeriesInstanceUID"
        return f"series {uid} ({number}, {len(self.files) + self.localizers} image(s))"


def _read_dicom(f: Path, folder: Path) -> Dataset | None:
    """A file of a series folder: its dataset, or None for a file that is not DICOM at all (no
    DICOM preamble: a stray text or image file, skipped and reported); a DICOM file that cannot
    be read is a ``VolumeFormatError`` naming it."""
    try:
        return pydicom.dcmread(f)
    except pydicom.errors.InvalidDicomError:
        return None
    except Exception as exc:  # truncated or malformed files raise several types
        raise VolumeFormatError(
            f"load_volume: cannot read DICOM file {f} in {folder}: {type(exc).__name__}: {exc}"
        ) from exc


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType") or []
    return [str(value).upper()] if isinstance(value, str) else [str(v).upper() for v in value]


def _numbers(value: Any) -> list[float] | None:
    """A DICOM decimal string element's value (one number or several) as floats; None when
    it is absent or not numbers."""
    if value is None:
        return None
    items = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        return [float(v) for v in items]
    except (TypeError, ValueError):
        return None


def _axial_axes(iop: np.ndarray) -> tuple[int, int, int, int] | str:
    """For an axial plane, ``(row_axis, row_sign, col_axis, col_sign)``: the patient axis
    (0 = x, 1 = y) each direction cosine of ``iop`` (6,) lies along and its sign; else why the
    plane cannot be read. Axial: the row and the column direction each within
    ``_AXIAL_TOLERANCE_DEG`` of a different one of the patient's x and y axes."""
    shown = "\\".join(f"{v:g}" for v in iop)
    if iop.shape != (6,):
        return f"ImageOrientationPatient {shown} has {iop.size} values; expected 6"
    row, col = iop[:3], iop[3:]
    if (abs(np.linalg.norm(row) - 1) > 0.01 or abs(np.linalg.norm(col) - 1) > 0.01
            or abs(float(row @ col)) > 0.01):
        return f"ImageOrientationPatient {shown} is not two orthogonal unit vectors"
    row_axis, col_axis = int(np.argmax(np.abs(row))), int(np.argmax(np.abs(col)))
    limit = np.cos(np.deg2rad(_AXIAL_TOLERANCE_DEG))
    if row_axis == 2 or col_axis == 2 or row_axis == col_axis or min(abs(row[row_axis]), abs(col[col_axis])) < limit:
        normal = np.cross(row, col)
        plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]
        tilt = float(np.degrees(np.arccos(min(1.0, abs(normal[2]) / np.linalg.norm(normal)))))
        off = float(np.degrees(np.arccos(min(1.0, abs(row[row_axis]), abs(col[col_axis])))))
        return (
            f"not axial: ImageOrientationPatient {shown} ({plane}) puts the slice normal "
            f"{tilt:.1f} deg from the patient's z axis and the rows or columns {off:.1f} deg from "
            f"the patient's x and y axes; at most {_AXIAL_TOLERANCE_DEG:g} deg is read"
        )
    return row_axis, int(np.sign(row[row_axis])), col_axis, int(np.sign(col[col_axis]))


def _examine(uid: str, members: list[tuple[Path, Dataset]]) -> _Series:
    """One series of a folder, with its localizer images dropped and the reason it cannot be
    the primary axial series (rule 1 of ``load_volume``), if any."""
    number = members[0][1].get("SeriesNumber")
    try:
        series_number = float(number) if number not in (None, "") else float("inf")
    except (TypeError, ValueError):
        series_number = float("inf")
    kept = [(f, ds) for f, ds in members if "LOCALIZER" not in _image_type(ds)]
    series = _Series(uid, series_number, [f for f, _ in kept], [ds for _, ds in kept],
                     localizers=len(members) - len(kept))
    if not kept:
        image_type = "\\".join(_image_type(members[0][1]))
        series.reason = f"localizer (ImageType {image_type})"
        return series
    cosines, corners = [], []
    for f, ds in kept:
        if int(ds.get("NumberOfFrames") or 1) != 1:
            series.reason = f"{f.name} is a multi-frame image ({ds.NumberOfFrames} frames); expected one slice per file"
            return series
        if int(ds.get("SamplesPerPixel") or 1) != 1:
            series.reason = f"{f.name} has {ds.SamplesPerPixel} samples per pixel; expected a grey-scale CT image"
            return series
        for tag, size, into in (("ImageOrientationPatient", 6, cosines), ("ImagePositionPatient", 3, corners)):
            values = _numbers(ds.get(tag))
            if values is None or len(values) != size:
                series.reason = (f"{f.name} lacks the {tag} tag" if tag not in ds
                                 else f"{f.name} has {tag} {ds[tag].value!r}; expected {size} numbers")
                return series
            into.append(values)
    cosines = np.array(cosines, dtype=np.float64)
    series.cosines, series.corners = cosines[0], np.array(corners, dtype=np.float64)
    spread = np.abs(cosines - cosines[0]).max(axis=1)
    if spread.max() > _ORIENTATION_ATOL:
        odd = int(np.argmax(spread))
        series.reason = (f"slices of different orientations ({series.files[0].name} and {series.files[odd].name} "
                         f"differ in ImageOrientationPatient by {spread[odd]:.3g})")
        return series
    axes = _axial_axes(cosines[0])
    if isinstance(axes, str):
        series.reason = axes
        return series
    series.axes = axes
    if len(kept) == 1:
        series.reason = "a single slice, not a volume"
    return series


def _mm(value: float) -> str:
    """A length in mm for a message: up to three decimals, at least one (``10.0``, ``0.625``)."""
    text = f"{round(float(value), 3):.3f}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def _load_dicom_series(folder: Path) -> Volume:
    files = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith("."))
    if not files:
        raise VolumeFormatError(f"load_volume: DICOM folder {folder} holds no files")
    read = [(f, _read_dicom(f, folder)) for f in files]
    foreign = [f.name for f, ds in read if ds is None]
    if len(foreign) == len(files):
        raise VolumeFormatError(f"load_volume: {folder} holds no DICOM file (expected a DICOM series; "
                                f"{len(files)} file(s)): {files[0]} in {folder} is not a DICOM file")
    files = [f for f, ds in read if ds is not None]
    datasets = [ds for _, ds in read if ds is not None]
    others = [f.name for f, ds in zip(files, datasets, strict=True) if "PixelData" not in ds]
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for f, ds in zip(files, datasets, strict=True):
        if "PixelData" in ds:
            groups.setdefault(str(ds.get("SeriesInstanceUID") or ""), []).append((f, ds))
    if not groups:
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} holds no images: none of its {len(files)} DICOM "
            f"file(s) has pixel data (e.g. {others[0]}); expected a CT series"
        )
    examined = [_examine(uid, members) for uid, members in groups.items()]
    candidates = [s for s in examined if s.reason is None]
    if not candidates:
        listed = "; ".join(f"{s.label}: {s.reason}" for s in examined)
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} has no series to read as a CT volume; expected an axial "
            f"series of at least 2 slices with its geometry tags ({listed})"
        )
    chosen = min(candidates, key=lambda s: (-len(s.slices), s.number, s.uid))
    skipped = [f"skipped {s.label}: {s.reason}" for s in examined if s.reason is not None]
    skipped += [
        f"skipped {s.label}: axial, but not the primary series ({len(s.slices)} slices)"
        for s in candidates if s is not chosen
    ]
    skipped += [f"skipped {s.localizers} localizer image(s) of {s.label}" for s in examined
                if s.localizers and s.slices]
    if others:
        skipped.append(f"skipped {len(others)} DICOM file(s) without pixel data, e.g. {others[0]}")
    if foreign:
        skipped.append(f"skipped {len(foreign)} file(s) that are not DICOM, e.g. {foreign[0]}")
    notes = ()
    if skipped:
        notes = (f"DICOM folder {folder}: read {chosen.label}, the primary axial series (rule: the most "
                 "slices, then the lowest SeriesNumber, then SeriesInstanceUID)", *skipped)
    return _assemble(folder, chosen, notes)


def _assemble(folder: Path, series: _Series, notes: tuple[str, ...]) -> Volume:
    """The volume of one axial series: slices sorted along the normal (towards superior),
    steps checked, pixels decoded to HU and the planes turned into the LPS (z, y, x) frame."""
    for f, ds in zip(series.files, series.slices, strict=True):
        for tag in ("RescaleSlope", "RescaleIntercept", "PixelSpacing"):
            if tag not in ds:
                raise VolumeFormatError(f"load_volume: {f} in {folder} lacks the {tag} tag")
    assert series.axes is not None and series.cosines is not None and series.corners is not None
    row_axis, row_sign, _, col_sign = series.axes
    row, col = series.cosines[:3], series.cosines[3:]
    normal = np.cross(row, col)
    normal *= np.sign(normal[2]) / np.linalg.norm(normal)  # towards superior
    corners = series.corners
    order = np.argsort(corners @ normal, kind="stable")
    files = [series.files[i] for i in order]
    slices = [series.slices[i] for i in order]
    corners = corners[order]
    positions = corners @ normal
    step = _slice_step(folder, files, positions)
    pixel = {tuple(_numbers(ds.PixelSpacing) or ()) for ds in slices}
    if len(pixel) != 1 or len(next(iter(pixel))) != 2:
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} has slices of PixelSpacing {sorted(pixel)} mm; expected one pair "
            "(between rows, between columns)"
        )
    d_row, d_col = next(iter(pixel))
    planes = [_slice_hu(f, folder, ds) for f, ds in zip(files, slices, strict=True)]
    shapes = {pl.shape for pl in planes}
    if len(shapes) != 1:
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} has slices of shapes {sorted(shapes)}; expected one (Rows, Columns)"
        )
    hu = np.stack(planes)
    n_rows, n_cols = hu.shape[1:]
    # reverse the rows when the column direction points against its patient axis, the
    # columns when the row direction does
    if col_sign < 0:
        hu = hu[:, ::-1, :]
    if row_sign < 0:
        hu = hu[:, :, ::-1]
    first = corners[0] + (n_rows - 1 if col_sign < 0 else 0) * d_row * col \
        + (n_cols - 1 if row_sign < 0 else 0) * d_col * row
    if row_axis == 0:  # columns along x, rows along y
        spacing_yx = (d_row, d_col)
    else:  # columns along y, rows along x: swap the in-plane axes
        hu = hu.transpose(0, 2, 1)
        spacing_yx = (d_col, d_row)
    return Volume(hu=np.ascontiguousarray(hu, dtype=np.float32), spacing=(step, *spacing_yx),
                  origin=(float(first[2]), float(first[1]), float(first[0])), notes=notes)


def _slice_step(folder: Path, files: list[Path], positions: np.ndarray) -> float:
    """The slice spacing in mm, the median step of the sorted ``positions`` (mm along the
    normal); raises for repeated positions, a missing slice or uneven steps."""
    steps = np.diff(positions)
    where = lambda i: (f"between positions {_mm(positions[i])} and {_mm(positions[i + 1])} mm "  # noqa: E731
                       f"({files[i].name} and {files[i + 1].name})")
    repeated = np.flatnonzero(steps < _REPEATED_MM)
    if repeated.size:
        i = int(repeated[0])
        raise VolumeFormatError(
            f"load_volume: DICOM folder {folder} has repeated slice positions: {files[i].name} and "
            f"{files[i + 1].name} both lie at {_mm(positions[i])} mm along the slice normal "
            f"({repeated.size} repeat(s)); expected one slice per position"
        )
    median = float(np.median(steps))
    largest = int(np.argmax(steps))
    if steps[largest] > _GAP_FACTOR * median:
        gaps = steps > _GAP_FACTOR * median
        raise SliceSpacingError(
            f"load_volume: DICOM folder {folder}: missing slice(s): gap of {_mm(steps[largest])} mm "
            f"{where(largest)} where the median step is {_mm(median)} mm ({int(gaps.sum())} gap(s) over "
            f"{_GAP_FACTOR:g} median steps); expected evenly spaced slices"
        )
    off = np.abs(steps - median)
    worst = int(np.argmax(off))
    if off[worst] > _STEP_TOLERANCE * median:
        raise SliceSpacingError(
            f"load_volume: DICOM folder {folder}: non-uniform slice spacing: step of {_mm(steps[worst])} mm "
            f"{where(worst)} where the median step is {_mm(median)} mm (steps from {_mm(steps.min())} to "
            f"{_mm(steps.max())} mm; at most {_STEP_TOLERANCE:.0%} from the median is read)"
        )
    return median


def _slice_hu(f: Path, folder: Path, ds: Dataset) -> np.ndarray:
    """One slice in HU, float32 (Rows, Columns): stored values x ``RescaleSlope`` +
    ``RescaleIntercept``; a decoding failure names the file and its transfer syntax."""
    try:
        stored = _stored_pixels(ds)
    except Exception as exc:  # pydicom and its plugins raise several types
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        hint = ""
        if syntax is not None and syntax.is_compressed and not _decodable(syntax):
            hint = ("; no decoder for this transfer syntax is installed (pydicom's plugins: pylibjpeg with "
                    "pylibjpeg-libjpeg and pylibjpeg-openjpeg, pinned in pyproject.toml)")
        shown = f"{syntax.name} ({syntax})" if syntax is not None else "unknown"
        raise VolumeFormatError(
            f"load_volume: cannot decode the pixel data of {f} in {folder} (transfer syntax {shown}): "
            f"{type(exc).__name__}: {exc}{hint}"
        ) from exc
    if stored.ndim != 2:
        raise VolumeFormatError(
            f"load_volume: {f} in {folder} holds pixel data of shape {stored.shape}; expected one slice (Rows, Columns)"
        )
    return stored.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def _decodable(syntax: str) -> bool:
    """Whether pydicom has a decoder plugin installed for the transfer syntax ``syntax``."""
    from pydicom.pixels import get_decoder

    try:
        return bool(get_decoder(syntax).is_available)
    except (NotImplementedError, ValueError):  # a syntax pydicom has no decoder for at all
        return False


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
