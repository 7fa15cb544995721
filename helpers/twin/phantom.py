"""The twin's CT volumes: phantoms rendered from a study's factors, and their lesion masks.

``_render`` draws one chest CT (body, lungs, heart and ventricles, aorta, spine, pulmonary
arteries) whose CT-visible factors have visible correlates: emboli (``_emboli``) are filling
defects in the pulmonary arteries (``_pulmonary_arteries``), calcified plaques sit on the
heart's surface, and the right ventricle, arteries and heart widen with RV strain, PA
dilation and cardiac dysfunction. ``_render_and_write`` (the worker that ``build`` submits to
its process pool, so it stays a module-level function) writes the volume as NIfTI or a DICOM
series and its mask (1 embolus, 2 calcium) with an anatomy map (``ANATOMY``: heart and
ventricles, pulmonary arteries) under ``ground_truth/masks``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from helpers.imaging import Volume, write_dicom_series, write_nifti
from helpers.truth import ANATOMY

__all__: list[str] = []

# ---------------------------------------------------------------- images


def _render(
    rng: np.random.Generator, job: dict[str, Any]
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float], tuple[float, float, float]]:
    """Render one CT: (hu float32 (z, y, x), mask uint8 (1 embolus, 2 calcium), anatomy uint8
    (``ANATOMY``: 1 heart with its ventricles, 2 pulmonary arteries), spacing mm, origin mm)."""
    nz, n = job["n_slices"], job["matrix"]
    sz, sp = job["slice_mm"], job["pixel_mm"]
    origin = (-(nz - 1) * sz / 2.0, -(n - 1) * sp / 2.0, -(n - 1) * sp / 2.0)
    z = (origin[0] + sz * np.arange(nz)).astype(np.float32)
    y = (origin[1] + sp * np.arange(n)).astype(np.float32)[:, None]
    x = (origin[2] + sp * np.arange(n)).astype(np.float32)[None, :]
    Z = z[:, None, None]
    contrast = job["contrast"]
    clot = job["clot_burden"]
    rv = float(np.clip(job["rv_strain"], -2.5, 3.5))
    pa_d = float(np.clip(job["pa_dilation"], -2.5, 3.5))
    cal = float(job["coronary_calcium"])
    card = float(np.clip(job["cardiac_dysfunction"], -2.5, 3.5))
    bs = job["body_scale"]

    def ell(cx: float, cy: float, ax: float, ay: float) -> np.ndarray:
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0

    def zr(lo: float, hi: float) -> np.ndarray:
        return ((z >= lo) & (z <= hi))[:, None, None]

    hu = np.full((nz, n, n), -1000.0, np.float32)
    mask = np.zeros((nz, n, n), np.uint8)
    anatomy = np.zeros((nz, n, n), np.uint8)
    ax, ay = 150.0 * bs, 105.0 * bs
    fat = 8.0 + 12.0 * max(bs - 0.85, 0.0)
    hu[:, ell(0, 0, ax, ay)] = -100.0
    hu[:, ell(0, 0, ax - fat, ay - fat)] = 40.0
    # lungs with low-frequency texture, smaller towards the apex and base
    g = max(n // 8, 1)
    coarse = rng.normal(0.0, 35.0, (nz, g + 1, g + 1)).astype(np.float32)
    iy = (np.arange(n) * g) // n
    texture = coarse[:, iy][:, :, iy]
    lung_scale = np.sqrt(np.clip(1.0 - (z / 140.0) ** 2, 0.2, 1.0))
    lung = np.zeros((nz, n, n), bool)
    for side in (-1.0, 1.0):
        cx, cy = side * 68.0 * bs, 5.0
        for k in range(nz):
            lung[k] |= ell(cx, cy, 50.0 * bs * lung_scale[k], 72.0 * bs * lung_scale[k])
    hu[lung] = (-850.0 + texture)[lung]
    eff = job["effusion"]
    if eff > 0:
        effusion = lung & (y[None] > 5.0 + 72.0 * bs * (1.0 - 2.0 * eff))
        hu[effusion] = 15.0
    # heart and ventricles (lower half of the range)
    heart_z = zr(-60.0, 22.0)
    hs = 1.0 + 0.1 * max(card, 0.0)
    heart = heart_z & ell(18.0, -28.0, 52.0 * hs, 42.0 * hs)[None]
    hu[heart] = 45.0
    r_lv = 17.0 * (1.0 + 0.12 * card)
    r_rv = 14.0 * (1.0 + 0.28 * rv)
    lv = heart_z & ell(34.0, -22.0, r_lv, r_lv * 0.9)[None]
    rvm = heart_z & ell(2.0, -46.0, r_rv * 1.1, r_rv * 0.8)[None]
    hu[lv] = 190.0 if contrast else 40.0
    hu[rvm] = 310.0 if contrast else 40.0
    # aorta (ascending, descending)
    aorta_hu = 230.0 if contrast else 40.0
    ascending = zr(-5.0, 60.0) & ell(28.0, -12.0, 14.0, 14.0)[None]
    aorta = ascending | ell(28.0, 45.0, 12.0, 12.0)[None]
    hu[aorta] = aorta_hu
    # pulmonary arteries: trunk, main branches, lobar branches (upper, middle, lower per side)
    segments = _pulmonary_arteries(bs, pa_d)
    artery = np.zeros((nz, n, n), bool)
    X3, Y3 = x[None], y[None]
    for a, b, r in segments.values():
        artery |= _capsule(X3, Y3, Z, a, b, r)
    artery &= ~aorta
    hu[artery] = 320.0 if contrast else 40.0
    anatomy[heart | lv | rvm] = ANATOMY["heart"]
    anatomy[artery] = ANATOMY["pulmonary_arteries"]
    # spine
    hu[:, ell(0.0, 72.0 * bs, 19.0, 17.0)] = 800.0
    hu[:, ell(0.0, 72.0 * bs, 15.0, 13.0)] = 620.0
    hu[:, ell(0.0, 72.0 * bs + 24.0, 20.0, 7.0)] = 650.0
    hu[:, ell(0.0, 72.0 * bs + 20.0, 6.0, 6.0)] = 20.0
    # emboli: filling defects in the contrast-filled lumen
    if contrast and np.isfinite(clot):
        for a, b, r, clot_hu in _emboli(rng, float(clot), segments):
            emb = _capsule(X3, Y3, Z, a, b, r + 0.35 * sp) & artery
            hu[emb] = clot_hu
            mask[emb] = 1
    # coronary calcifications on the heart's surface
    lam = 8.0 / (1.0 + math.exp(-1.5 * (cal - 0.5)))
    n_cal = int(rng.poisson(lam))
    for _ in range(min(n_cal, 20)):
        ang = rng.uniform(-2.6, 0.2)
        cx = 18.0 + 52.0 * hs * 0.85 * math.cos(ang)
        cy = -28.0 + 42.0 * hs * 0.85 * math.sin(ang)
        cz = rng.uniform(-45.0, 15.0)
        rc = 2.5 + 1.5 * rng.random() + 0.8 * max(cal, 0.0)
        reach = max(rc, 0.55 * max(sp, sz))
        d2 = (X3 - cx) ** 2 + (Y3 - cy) ** 2 + ((Z - cz) * (reach / max(reach, 0.55 * sz))) ** 2
        spot = (d2 <= reach * reach) & (mask == 0)
        hu[spot] = 400.0 + 600.0 * rng.random()
        mask[spot] = 2
    hu += job["hu_offset"]
    hu += rng.standard_normal(hu.shape, dtype=np.float32) * job["noise_sd"]
    np.clip(hu, -1024.0, 3071.0, out=hu)
    return hu, mask, anatomy, (sz, sp, sp), origin


_Point = tuple[float, float, float]


def _pulmonary_arteries(bs: float, pa_d: float) -> dict[str, tuple[_Point, _Point, float]]:
    """Centre lines and radii of the pulmonary arteries: name -> (start, end, radius), mm.

    Points are LPS ``(x, y, z)``; ``bs`` scales the chest width, ``pa_d`` (pulmonary-artery
    dilation, unitless) widens every vessel. The trunk leaves the right ventricle and divides
    at ``z = 28`` mm; each main branch ends at its hilum, where the upper, middle (right) /
    lingular (left) and lower lobar arteries start."""
    r_pa = 12.5 * (1.0 + 0.15 * pa_d)
    r_lobar = 6.5 * (1.0 + 0.1 * pa_d)
    bif = (5.0, -40.0, 28.0)
    out: dict[str, tuple[_Point, _Point, float]] = {
        "trunk": ((5.0, -45.0, 8.0), (5.0, -40.0, 48.0), r_pa)
    }
    for side, name in ((-1.0, "right"), (1.0, "left")):
        hilum = (side * 55.0 * bs, -5.0, 24.0)
        out[f"{name}_main"] = (bif, hilum, 0.75 * r_pa)
        out[f"{name}_upper"] = (hilum, (side * 80.0 * bs, -20.0, 45.0), r_lobar)
        out[f"{name}_middle"] = (hilum, (side * 85.0 * bs, -35.0, 0.0), 0.9 * r_lobar)
        out[f"{name}_lower"] = (hilum, (side * 70.0 * bs, 20.0, -45.0), r_lobar)
    return out


def _emboli(
    rng: np.random.Generator, clot: float, segments: dict[str, tuple[_Point, _Point, float]]
) -> list[tuple[_Point, _Point, float, float]]:
    """Filling defects for a study with clot burden ``clot`` (unitless severity; standard
    normal in the internal population): a list of (start, end, radius mm, HU) capsules, to be
    intersected with the arterial lumen.

    The burden's percentile ``q`` sets how many lobar arteries hold a clot (every one near
    ``q = 1``; always at least one), how long each clot is and how much of the lumen it fills
    (from about half to occlusive); central clots in the main branches become likely above the
    median, and a saddle embolus astride the bifurcation above about +1 sd."""
    q = 0.5 * math.erfc(-clot / math.sqrt(2.0))
    lobar = [k for k in segments if k.endswith(("_upper", "_middle", "_lower"))]
    involved = [k for k in lobar if rng.random() < 0.08 + 0.9 * q]
    if not involved:
        involved = [lobar[int(rng.integers(0, len(lobar)))]]
    involved += [k for k in ("right_main", "left_main") if rng.random() < 1.1 * q**2]
    out = []
    for k in involved:
        a, b, r = segments[k]
        length = float(np.clip(0.3 + 0.6 * q + 0.1 * rng.standard_normal(), 0.2, 1.0))
        t0 = rng.uniform(0.0, 1.0 - length)
        fill = float(np.clip(0.5 + 0.45 * q + 0.08 * rng.standard_normal(), 0.4, 1.0))
        p0 = tuple(a[i] + t0 * (b[i] - a[i]) for i in range(3))
        p1 = tuple(a[i] + (t0 + length) * (b[i] - a[i]) for i in range(3))
        out.append((p0, p1, fill * r, float(rng.uniform(25.0, 65.0))))
    if rng.random() < 1.0 / (1.0 + math.exp(-3.0 * (clot - 1.2))):
        # saddle embolus: astride the bifurcation, reaching into both main branches
        a, _, _ = segments["right_main"]
        r = segments["right_main"][2]
        for k in ("right_main", "left_main"):
            _, b, _ = segments[k]
            end = tuple(a[i] + 0.45 * (b[i] - a[i]) for i in range(3))
            out.append((a, end, 0.85 * r, float(rng.uniform(25.0, 65.0))))
    return out


def _capsule(
    X: np.ndarray,
    Y: np.ndarray,
    Z: np.ndarray,
    a: tuple[float, float, float],
    b: tuple[float, float, float],
    r: float,
) -> np.ndarray:
    """Boolean (z, y, x) mask of points within ``r`` mm of the segment a-b (x, y, z in mm).

    ``X`` (1, 1, nx), ``Y`` (1, ny, 1), ``Z`` (nz, 1, 1): voxel-centre coordinates (float32,
    ascending); only the segment's bounding box is evaluated."""
    out = np.zeros((Z.shape[0], Y.shape[1], X.shape[2]), bool)
    box = []
    for axis, coords in ((0, X.ravel()), (1, Y.ravel()), (2, Z.ravel())):
        lo, hi = min(a[axis], b[axis]) - r, max(a[axis], b[axis]) + r
        box.append(
            slice(int(np.searchsorted(coords, lo)), int(np.searchsorted(coords, hi, "right")))
        )
    sx, sy, sz = box
    if sx.start >= sx.stop or sy.start >= sy.stop or sz.start >= sz.stop:
        return out
    x, y, z = X[:, :, sx], Y[:, sy, :], Z[sz]
    ax, ay, az = (float(v) for v in a)
    dx, dy, dz = (float(b[i]) - float(a[i]) for i in range(3))
    dd = dx * dx + dy * dy + dz * dz
    px, py, pz = x - ax, y - ay, z - az
    t = np.clip((px * dx + py * dy + pz * dz) / dd, 0.0, 1.0)
    out[sz, sy, sx] = (px - t * dx) ** 2 + (py - t * dy) ** 2 + (pz - t * dz) ** 2 <= float(r * r)
    return out


def _render_and_write(job: dict[str, Any]) -> tuple[int, int, int]:
    """Worker: render one study, write the volume and its mask; (study index, voxels 1, 2)."""
    rng = np.random.default_rng([job["seed"], job["task_index"], job["study_index"]])
    hu, mask, anatomy, spacing, origin = _render(rng, job)
    vol = Volume(hu=hu, spacing=spacing, origin=origin)
    root = Path(job["root"])
    if job["format"] == "nifti":
        write_nifti(vol, root / job["image_path"])
    else:
        write_dicom_series(
            vol,
            root / job["image_path"],
            patient_id=job["patient_id"],
            study_uid=job["study_uid"],
            series_uid=job["series_uid"],
            study_datetime=job["study_datetime"],
            institution_name=job["institution_name"],
            series_description="CTA CHEST PE" if job["contrast"] else "CT CHEST WO",
        )
    np.savez_compressed(root / "ground_truth" / "masks" / f"{job['study_id']}.npz", mask=mask, anatomy=anatomy)
    return job["study_index"], int((mask == 1).sum()), int((mask == 2).sum())


def _image_path(site_name: str, study_id: str, fmt: str) -> str:
    if fmt == "nifti":
        return f"images/{site_name}/{study_id}.nii.gz"
    return f"images/{site_name}/{study_id}"
