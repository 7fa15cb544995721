"""CT volumes to slice tokens and volume embeddings with a frozen 2D encoder.

The paper encodes each selected axial slice with a 2D foundation model and averages the slice
embeddings over z. Here: load the volume in HU (``helpers.imaging.load_volume``), apply the
task's window, pick ``n_slices`` evenly spaced axial slices, resize each to ``size`` x
``size`` (the encoder's ``input_size``), encode every slice, keep the per-slice embeddings as
``tokens`` and their mean as ``embedding``.

Every image encoder (``image_encoder(name, spec)``) is a frozen ``nn.Module`` with the same
surface (``ImageEncoder``): ``dim``, ``input_size``, ``describe()`` and ``forward(slices)``
mapping (n, 1, S, S) floats in [0, 1] to (n, dim). Its weights have ``requires_grad`` off, but
its forward is differentiable with respect to the slices, so saliency reaches the voxels.

=================== ======================================================== ==========
name / kind         what                                                     module
=================== ======================================================== ==========
``randconv``        seeded random-feature CNN, no checkpoint                 randconv
``ct_mae``          the study's ViT masked autoencoder, pretrained on twin   ct_mae
``hf``              any local transformers vision backbone (ViT, DINOv2...)  hf
``medimageinsight`` Microsoft's MedImageInsight, user's local copy           medimageinsight
=================== ======================================================== ==========
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers.encoders.randconv import RandomConvEncoder
from helpers.imaging import AIR_HU, Volume, VolumeFormatError, air_offset, load_volume, window
from helpers.manifest import EncoderSpec

__all__ = [
    "IMAGE_ENCODERS",
    "EHR_ENCODERS",
    "ImageEncoder",
    "SlicePreprocess",
    "UnreadableVolumeError",
    "VolumeDataset",
    "encode_volumes",
    "image_encoder",
]

IMAGE_ENCODERS: tuple[str, ...] = ("randconv", "ct_mae", "hf", "medimageinsight")
EHR_ENCODERS: tuple[str, ...] = ("onehot", "clmbr")


@runtime_checkable
class ImageEncoder(Protocol):
    """What every image encoder offers (a frozen ``nn.Module``).

    ``dim``: embedding size per slice. ``input_size``: the in-plane size slices should be
    preprocessed to (``SlicePreprocess(size=encoder.input_size)``). ``describe()``: a JSON-able
    dict (kind, checkpoint, input size, normalisation, pooling). Calling it maps slices
    (n, 1, input_size, input_size) float in [0, 1] to (n, dim) float.
    """

    dim: int
    input_size: int

    def describe(self) -> dict: ...

    def __call__(self, slices: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class SlicePreprocess:
    """Volume preprocessing, the same for every encoder: HU window ``(lo, hi)``, number of
    axial slices kept (evenly spaced over the volume) and in-plane size in pixels.

    Three steps make a scan from another scanner look like the training scans where only the
    scanner differs (together they bring the median scaled length of external CT embeddings
    from 32x / 172x that of internal ones to about 1.4 / 1.2, see ``benchmarks/scaling.py``):

    * ``calibrate_air`` (default on): the scan is shifted so that the air around the patient
      reads -1000 HU (``helpers.imaging.air_offset``). Scanners differ by tens of HU, and in a
      narrow window (MACE: 350 HU wide) a 20 HU offset moves every soft-tissue pixel by 6% of
      the range.
    * ``slab_mm`` (default 5): each selected slice is a slab of about this thickness (see
      ``_axial``), so thin-slice series are not noisier and sharper in z than thick ones.
    * ``fov_mm`` (default 400): each slice is cropped or padded with air, about its centre, to
      a square field of view of this many millimetres before it is resized to ``size``, so a
      pixel is ``fov_mm / size`` mm whatever the scanner's pixel spacing, and every scan is
      resampled with the same antialiasing (400 mm at 64 pixels is coarser than the twin's
      native 5.5 and 6 mm pixels). ``None`` resizes the whole slice, as encoders pretrained on
      whole images expect.

    Calling it takes a ``helpers.imaging.Volume`` (or a (z, y, x) HU array with ``spacing``,
    needed when ``fov_mm`` or ``slab_mm`` is set) and returns float32 (n_slices, 1, size, size) in [0, 1].
    """

    window_hu: tuple[float, float]
    n_slices: int = 16
    size: int = 64
    calibrate_air: bool = True
    fov_mm: float | None = 400.0
    slab_mm: float | None = 5.0

    def __post_init__(self) -> None:
        lo, hi = self.window_hu
        if not hi > lo:
            raise ValueError(f"window_hu must be (lo, hi) with hi > lo, got {self.window_hu}")
        if self.n_slices < 1 or self.size < 1:
            raise ValueError(f"n_slices and size must be >= 1, got n_slices={self.n_slices}, size={self.size}")
        if self.slab_mm is not None and not self.slab_mm > 0:
            raise ValueError(f"slab_mm must be a positive number of millimetres or None, got {self.slab_mm}")
        if self.fov_mm is not None and not self.fov_mm > 0:
            raise ValueError(f"fov_mm must be a positive number of millimetres or None, got {self.fov_mm}")

    def __call__(self, volume: Volume | np.ndarray, spacing: tuple[float, float, float] | None = None) -> torch.Tensor:
        if isinstance(volume, Volume):
            hu, spacing = volume.hu, volume.spacing
        else:
            hu = np.asarray(volume)
        if hu.ndim != 3:
            raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
        # relative to air, so that padding with zeros pads with air
        selected = self._axial(hu, spacing) - np.float32(AIR_HU)
        if self.calibrate_air:
            selected -= np.float32(air_offset(hu))
        if self.fov_mm is not None:
            if spacing is None:
                raise ValueError("SlicePreprocess: fov_mm is set, so the voxel spacing is needed; pass a Volume "
                                 "or spacing=(z, y, x) mm")
            selected = _square_fov(selected, float(spacing[1]), float(spacing[2]), self.fov_mm)
        slices = torch.from_numpy(np.ascontiguousarray(selected)).unsqueeze(1) + AIR_HU
        slices = window(slices, *self.window_hu)
        if slices.shape[-2:] != (self.size, self.size):
            slices = nn.functional.interpolate(slices, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                               antialias=True)
        return slices

    def resample(self, values: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
        """The geometry of ``__call__`` without its intensities: the same slabs, field of view
        and resizing applied to any (z, y, x) array on the volume's grid (padding with 0, no
        window, no air calibration). For a region's 0/1 indicator it gives the fraction of each
        pixel of the encoder's input that lies in the region: float32 (n_slices, size, size).

        >>> prep = SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=2, size=4, fov_mm=None, slab_mm=None)
        >>> prep.resample(np.ones((3, 8, 8)), (5.0, 1.0, 1.0)).shape
        (2, 4, 4)
        """
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 3:
            raise ValueError(f"expected a (z, y, x) array, got shape {values.shape}")
        selected = self._axial(values, spacing)
        if self.fov_mm is not None:
            selected = _square_fov(selected, float(spacing[1]), float(spacing[2]), self.fov_mm)
        out = torch.from_numpy(np.ascontiguousarray(selected)).unsqueeze(1)
        if out.shape[-2:] != (self.size, self.size):
            out = nn.functional.interpolate(out, size=(self.size, self.size), mode="bilinear", align_corners=False,
                                            antialias=True)
        return out[:, 0].numpy()

    def _axial(self, hu: np.ndarray, spacing: tuple[float, float, float] | None) -> np.ndarray:
        """``n_slices`` axial slices at evenly spaced positions from the first to the last
        slice centre. With ``slab_mm`` each is the average of the slices within ``slab_mm`` of
        that position, weighted ``1 - |distance| / slab_mm`` (a slab of about that thickness:
        a 5 mm series gives its own slice, a 3 mm series the slice and 40% of each
        neighbour); without it, the nearest slice."""
        z = hu.shape[0]
        positions = np.linspace(0, z - 1, self.n_slices)
        if self.slab_mm is None or z == 1:
            picks = np.clip(np.round(positions).astype(int), 0, z - 1)
            return np.asarray(hu[picks], dtype=np.float32)
        if spacing is None:
            raise ValueError("SlicePreprocess: slab_mm is set, so the voxel spacing is needed; pass a Volume "
                             "or spacing=(z, y, x) mm")
        distance_mm = np.abs(np.arange(z)[None, :] - positions[:, None]) * float(spacing[0])
        weights = np.clip(1.0 - distance_mm / float(self.slab_mm), 0.0, None)
        weights[np.arange(self.n_slices), np.argmin(distance_mm, axis=1)] += 1e-6  # never an empty slab
        weights /= weights.sum(axis=1, keepdims=True)
        used = np.flatnonzero(weights.sum(axis=0) > 0)
        return np.tensordot(weights[:, used].astype(np.float32), np.asarray(hu[used], dtype=np.float32), axes=(1, 0))

    def describe(self) -> dict:
        return asdict(self)


def _square_fov(slices: np.ndarray, dy: float, dx: float, fov_mm: float) -> np.ndarray:
    """Crop or zero-pad (z, y, x) about the centre to ``fov_mm`` in y and x (whole pixels at
    the native spacing ``dy``, ``dx`` mm), then resample x so both axes have the same number
    of pixels (non-square pixels become square)."""
    out = slices
    for axis, step in ((1, dy), (2, dx)):
        want = max(1, int(round(fov_mm / step)))
        have = out.shape[axis]
        if have > want:
            start = (have - want) // 2
            out = np.take(out, np.arange(start, start + want), axis=axis)
        elif have < want:
            before = (want - have) // 2
            pad = [(0, 0)] * 3
            pad[axis] = (before, want - have - before)
            out = np.pad(out, pad)
    if out.shape[1] != out.shape[2]:
        tensor = torch.from_numpy(np.ascontiguousarray(out)).unsqueeze(1)
        out = nn.functional.interpolate(tensor, size=(out.shape[1], out.shape[1]), mode="bilinear",
                                        align_corners=False, antialias=True)[:, 0].numpy()
    return out


class UnreadableVolumeError(RuntimeError):
    """The volume of one study cannot be read: ``load_volume`` raised ``VolumeFormatError``
    (not a CT series, missing or uneven slices, undecodable pixels) or ``OSError`` (missing
    file or folder). ``study_id``, ``path``, ``error`` (the class name of the original error)
    and ``reason`` (its message) say which and why; ``encode_volumes`` can leave such a
    study out and go on."""

    def __init__(self, study_id: str, path: str, error: str, reason: str) -> None:
        super().__init__(f"study {study_id}: cannot read {path}: {reason}")
        self.study_id, self.path, self.error, self.reason = study_id, path, error, reason

    def __reduce__(self):  # rebuilt from its fields when it crosses from a DataLoader worker
        return type(self), (self.study_id, self.path, self.error, self.reason)


class VolumeDataset(Dataset):
    """Items are ``(index, slices)`` with slices from ``preprocess`` of the volume at
    ``paths[index]``. A volume that cannot be read raises ``UnreadableVolumeError`` (a
    ``RuntimeError``); any other failure a ``RuntimeError``; both name the study and the file.
    Holds only lists, strings and a frozen dataclass, so it pickles into DataLoader workers
    (fork or spawn).
    """

    def __init__(self, study_ids: list[str], paths: list[str], preprocess: SlicePreprocess) -> None:
        if len(study_ids) != len(paths):
            raise ValueError(f"Dimension mismatch: 'paths' has {len(paths)} entries but 'study_ids' has {len(study_ids)}")
        self.study_ids, self.paths, self.preprocess = list(study_ids), list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        try:
            volume = load_volume(self.paths[index])
        except (VolumeFormatError, OSError) as err:
            raise UnreadableVolumeError(self.study_ids[index], str(self.paths[index]), type(err).__name__,
                                        str(err)) from err
        except Exception as err:
            raise RuntimeError(f"study {self.study_ids[index]}: cannot read {self.paths[index]}: {err}") from err
        return index, self.preprocess(volume)


class _Excluding(Dataset):
    """``dataset``'s items as ``(index, slices, None)``, or ``(index, None, error)`` for a
    study whose volume cannot be read (``UnreadableVolumeError``), so one bad study does not
    stop the DataLoader."""

    def __init__(self, dataset: VolumeDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, UnreadableVolumeError | None]:
        try:
            i, slices = self.dataset[index]
        except UnreadableVolumeError as err:
            return index, None, err
        return i, slices, None


def _collate(batch: list[tuple]) -> tuple[list[int], list[torch.Tensor | None], list[UnreadableVolumeError | None]]:
    return [b[0] for b in batch], [b[1] for b in batch], [b[2] if len(b) > 2 else None for b in batch]


class _RandConv(RandomConvEncoder):
    """``RandomConvEncoder`` with the common encoder surface (``input_size`` 64, ``describe``)."""

    input_size = 64

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed=seed)
        self.seed = seed

    def describe(self) -> dict:
        return {"kind": "builtin", "name": "randconv", "seed": self.seed, "dim": self.dim, "input_size": self.input_size,
                "normalisation": "(x - 0.5) / 0.25 for the convolutions, raw [0, 1] for the histograms",
                "pooling": f"convolution maps averaged on a {self.conv_grid}x{self.conv_grid} grid, soft histograms "
                           f"({self.kernel} kernel, after a {self.hist_smooth:g}-pixel Gaussian blur) on a "
                           f"{self.hist_grid}x{self.hist_grid} grid"}


def quiet_transformers() -> None:
    """Turn off transformers' per-call progress bars ("Loading weights", "Writing model
    shards"): a frozen encoder is loaded once per notebook, and the bars would fill the book."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def image_encoder(
    name: str,
    spec: EncoderSpec | None = None,
    *,
    seed: int = 0,
    default_checkpoint: str | os.PathLike | None = None,
) -> nn.Module:
    """Build the frozen image encoder ``name`` described by ``spec`` (an ``EncoderSpec``).

    ``spec`` None or ``spec.kind == "builtin"``: ``name`` must be ``"randconv"`` (seeded by
    ``seed``). ``spec.kind``: ``"hf"`` -> ``HFImageEncoder(spec.path)``; ``"medimageinsight"``
    -> ``MedImageInsightEncoder(spec.path)``; ``"ct_mae"`` -> ``CTMAEEncoder(spec.path or
    default_checkpoint)``. With ``spec`` None, ``name == "ct_mae"`` uses ``default_checkpoint``.
    """
    kind = spec.kind if spec is not None else ("ct_mae" if name == "ct_mae" else "builtin")
    if kind == "builtin":
        if name != "randconv":
            raise ValueError(f"parameter 'encoder': unknown image encoder {name!r}; the built-in image encoder is "
                             f"'randconv' (others need a manifest entry of kind ct_mae, hf or medimageinsight; "
                             f"known: {', '.join(IMAGE_ENCODERS)})")
        return _RandConv(seed=seed)
    path = getattr(spec, "path", None)
    if kind == "ct_mae":
        from helpers.encoders.ct_mae import CTMAEEncoder

        checkpoint = path or default_checkpoint
        if checkpoint is None or not Path(checkpoint).is_dir():
            where = f" (looked for {checkpoint})" if checkpoint is not None else ""
            raise FileNotFoundError(f"image encoder {name!r} (kind ct_mae): no checkpoint{where}; pretrain it first with "
                                    "`python -m helpers pretrain ct_mae`, or set encoders.image."
                                    f"{name}.path in the manifest")
        return CTMAEEncoder(checkpoint)
    if kind in ("hf", "medimageinsight"):
        if path is None:
            raise ValueError(f"encoders.image.{name}.path: required for an encoder of kind {kind!r}")
        if kind == "hf":
            from helpers.encoders.hf import HFImageEncoder

            return HFImageEncoder(path)
        from helpers.encoders.medimageinsight import MedImageInsightEncoder

        return MedImageInsightEncoder(path)
    raise ValueError(f"encoders.image.{name}.kind: {kind!r} is not an image encoder kind; expected one of "
                     "builtin, ct_mae, hf, medimageinsight")


def encode_volumes(
    encoder: nn.Module,
    dataset: VolumeDataset,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    num_workers: int = 0,
    progress: Callable[[int], object] | None = None,
    stats: dict | None = None,
    excluded: list | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Encode every volume of ``dataset`` (items ``(index, slices)``, see ``VolumeDataset``).

    Returns ``(embedding, tokens)``: embedding float32 (n_studies, dim), the mean of the slice
    tokens; tokens a list of float32 arrays (n_slices, dim), in dataset order.

    ``excluded``: None (default), and the first volume that cannot be read stops the encoding
    with its ``UnreadableVolumeError``. A list, and such studies are left out and go on: each
    one's ``UnreadableVolumeError`` (``study_id``, ``path``, ``error``, ``reason``) is appended
    to it in dataset order, and ``embedding`` and ``tokens`` hold the other studies, still in
    dataset order (n_studies - len(excluded) rows). If no volume can be read, a
    ``RuntimeError`` names the count and the first three reasons. ``batch_size``
    counts volumes. Volumes are decoded by a DataLoader with ``num_workers`` worker processes
    (persistent when > 0; pinned memory on CUDA). On CUDA the encoder runs under bf16 autocast
    with non-blocking transfers on whole batches, and the outputs are cast back to float32; on
    the CPU it is called once per volume.

    ``progress(n)`` is called with the number of volumes done so far. ``stats``, if given, is
    filled with ``computed_volumes`` (volumes encoded), ``excluded_volumes`` (left out as
    unreadable), ``volumes_per_second``, ``slices_per_second``, ``decode_seconds`` (waiting for
    the loader) and ``model_seconds``.
    """
    if batch_size < 1:
        raise ValueError(f"parameter 'batch_size': must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"parameter 'num_workers': must be >= 0, got {num_workers}")
    n = len(dataset)
    if n == 0:
        raise ValueError("parameter 'dataset': no volumes to encode")
    torch_device = torch.device(device)
    encoder = encoder.to(torch_device)
    cuda = torch_device.type == "cuda"

    tokens: list[np.ndarray | None] = [None] * n
    unreadable: list[UnreadableVolumeError] = []
    done = 0
    decode_s = model_s = 0.0
    n_slices = 0
    started = time.perf_counter()
    source = _Excluding(dataset) if excluded is not None else dataset
    loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate,
                        pin_memory=cuda, persistent_workers=num_workers > 0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    iterator = iter(loader)
    with torch.inference_mode(), autocast:
        while True:
            t0 = time.perf_counter()
            try:
                indices, volumes, errors = next(iterator)
            except StopIteration:
                break
            t1 = time.perf_counter()
            unreadable += [e for e in errors if e is not None]
            read = [i for i, v in zip(indices, volumes, strict=True) if v is not None]
            volumes = [v for v in volumes if v is not None]
            sizes = [v.shape[0] for v in volumes]
            if not volumes:
                out = np.zeros((0, 0), dtype=np.float32)
            elif cuda:
                out = encoder(torch.cat(volumes).to(torch_device, non_blocking=True)).float().cpu().numpy()
            else:
                # one volume per call: the intermediate maps of 16 slices stay in the cache and
                # in memory the allocator reuses (2.6x faster for randconv, 1.6x for ct_mae than
                # a batch of 16 volumes at once; the same numbers)
                out = torch.cat([encoder(v) for v in volumes]).float().numpy()
            t2 = time.perf_counter()
            decode_s, model_s, n_slices = decode_s + t1 - t0, model_s + t2 - t1, n_slices + sum(sizes)
            for i, chunk in zip(read, np.split(out, np.cumsum(sizes)[:-1]) if volumes else [], strict=True):
                tokens[i] = chunk.astype(np.float32)
            done += len(indices)
            if progress is not None:
                progress(done)
    seconds = time.perf_counter() - started
    if len(unreadable) == n:
        reasons = "; ".join(str(e) for e in unreadable[:3])
        raise RuntimeError(f"parameter 'dataset': none of its {n} volumes could be read, e.g. {reasons}")
    kept = [t for t in tokens if t is not None]
    if stats is not None:
        stats.update(
            computed_volumes=len(kept),
            excluded_volumes=len(unreadable),
            volumes_per_second=len(kept) / seconds if seconds > 0 else float("nan"),
            slices_per_second=n_slices / seconds if seconds > 0 else float("nan"),
            decode_seconds=decode_s,
            model_seconds=model_s,
        )
    if excluded is not None:
        excluded.extend(unreadable)
    embedding = np.stack([t.mean(axis=0) for t in kept]).astype(np.float32)
    return embedding, kept
