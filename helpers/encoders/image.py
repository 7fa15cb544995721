"""CT volumes to slice tokens and volume embeddings with a frozen 2D encoder.

The paper encodes each selected axial slice with a 2D foundation model and averages the slice
embeddings over z. Here: load the volume in HU (``helpers.imaging.load_volume``), apply the
task's window, pick ``n_slices`` evenly spaced axial slices, resize each to ``size`` x
``size``, encode every slice, keep the per-slice embeddings as ``tokens`` and their mean as
``embedding``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers.imaging import load_volume, window
from helpers.manifest import EncoderSpec

__all__ = [
    "IMAGE_ENCODERS",
    "EHR_ENCODERS",
    "SlicePreprocess",
    "VolumeDataset",
    "encode_volumes",
    "image_encoder",
]

IMAGE_ENCODERS: tuple[str, ...] = ("randconv",)
EHR_ENCODERS: tuple[str, ...] = ("onehot",)


@dataclass(frozen=True)
class SlicePreprocess:
    """Volume preprocessing: HU window ``(lo, hi)``, number of axial slices kept (evenly
    spaced over the volume) and in-plane size in pixels."""

    window_hu: tuple[float, float]
    n_slices: int = 16
    size: int = 64

    def __call__(self, hu: np.ndarray) -> torch.Tensor:
        """(z, y, x) HU array -> float32 tensor (n_slices, 1, size, size) in [0, 1]."""
        if hu.ndim != 3:
            raise ValueError(f"expected a (z, y, x) volume, got shape {hu.shape}")
        z = hu.shape[0]
        picks = np.clip(np.round(np.linspace(0, z - 1, self.n_slices)).astype(int), 0, z - 1)
        slices = torch.from_numpy(np.ascontiguousarray(hu[picks], dtype=np.float32)).unsqueeze(1)
        slices = window(slices, *self.window_hu)
        if slices.shape[-2:] != (self.size, self.size):
            slices = nn.functional.interpolate(slices, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return slices

    def describe(self) -> dict:
        return asdict(self)


class VolumeDataset(Dataset):
    """Items are ``(index, slices)`` with slices from ``preprocess`` of the volume at
    ``paths[index]``. Errors name the study and the file."""

    def __init__(self, study_ids: list[str], paths: list[str], preprocess: SlicePreprocess) -> None:
        if len(study_ids) != len(paths):
            raise ValueError(f"Dimension mismatch: 'paths' has {len(paths)} entries but 'study_ids' has {len(study_ids)}")
        self.study_ids, self.paths, self.preprocess = list(study_ids), list(paths), preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        try:
            volume = load_volume(self.paths[index])
        except Exception as err:
            raise RuntimeError(f"study {self.study_ids[index]}: cannot read {self.paths[index]}: {err}") from err
        return index, self.preprocess(volume.hu)


def _collate(batch: list[tuple[int, torch.Tensor]]) -> tuple[list[int], list[torch.Tensor]]:
    return [b[0] for b in batch], [b[1] for b in batch]


def image_encoder(name: str, spec: EncoderSpec | None = None, *, seed: int = 0) -> nn.Module:
    """Build the frozen image encoder ``name`` (one of ``IMAGE_ENCODERS``)."""
    if name == "randconv":
        from helpers.encoders.randconv import RandomConvEncoder

        return RandomConvEncoder(seed=seed)
    raise ValueError(f"parameter 'encoder': unknown image encoder {name!r}; expected one of {', '.join(IMAGE_ENCODERS)}")


def encode_volumes(
    encoder: nn.Module,
    dataset: VolumeDataset,
    *,
    batch_size: int = 8,
    device: str = "cpu",
    num_workers: int = 0,
    progress: Callable | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Encode every volume of ``dataset``.

    Returns ``(embedding, tokens)``: embedding float32 (n_studies, dim), the mean of the slice
    tokens; tokens a list of float32 arrays (n_slices, dim). ``batch_size`` counts volumes; on
    CUDA the encoder runs under bf16 autocast and the outputs are cast back to float32.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    torch_device = torch.device(device)
    encoder = encoder.to(torch_device)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_collate)
    tokens: list[np.ndarray | None] = [None] * len(dataset)
    iterator = progress(loader) if progress is not None else loader
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if torch_device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        for indices, volumes in iterator:
            sizes = [v.shape[0] for v in volumes]
            out = encoder(torch.cat(volumes).to(torch_device)).float().cpu().numpy()
            for i, chunk in zip(indices, np.split(out, np.cumsum(sizes)[:-1]), strict=True):
                tokens[i] = chunk.astype(np.float32)
    done = [t for t in tokens if t is not None]
    embedding = np.stack([t.mean(axis=0) for t in done]).astype(np.float32)
    return embedding, done
