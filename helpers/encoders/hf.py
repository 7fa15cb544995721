"""Any local transformers vision backbone as a frozen slice encoder (ViT, DINOv2, ViT-MAE...).

The folder is what ``save_pretrained`` writes (``config.json`` and weights), ideally with the
model's image processor config (``preprocessor_config.json``) next to it. Nothing is fetched
from a hub: loading uses ``local_files_only=True``.

Preprocessing is done with torch ops inside ``forward`` (so gradients reach the slices):
the windowed slice in [0, 1] is repeated to the model's number of channels, resized
bilinearly to the processor's size and normalised with the processor's mean and std (the
model config's ``image_size`` and the ImageNet mean/std when the folder has no processor
config; ``describe()`` says which). The slice embedding is the model's ``pooler_output`` when
it has one, else the CLS token of ``last_hidden_state``.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import torch
from torch import nn

__all__ = ["HFImageEncoder", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _as_size(size) -> int:
    """A processor's ``size`` (int, {"height", "width"}, {"shortest_edge"}) -> square side."""
    if isinstance(size, int):
        return size
    if isinstance(size, dict):
        if "height" in size and "width" in size:
            if size["height"] != size["width"]:
                raise ValueError(f"image processor size {size} is not square; slices are square")
            return int(size["height"])
        if "shortest_edge" in size:
            return int(size["shortest_edge"])
    for attr in ("height", "shortest_edge"):
        if getattr(size, attr, None):
            return int(getattr(size, attr))
    raise ValueError(f"cannot read a square input size from the image processor's size {size!r}")


def _per_channel(values, channels: int, name: str) -> torch.Tensor:
    values = [float(v) for v in (values if isinstance(values, list | tuple) else [values])]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"image processor {name} has {len(values)} values but the model takes {channels} channels")
    return torch.tensor(values, dtype=torch.float32).view(1, channels, 1, 1)


class HFImageEncoder(nn.Module):
    """Frozen transformers vision model from the local folder ``path``.

    Input slices (n, 1, S, S) float in [0, 1]; output (n, dim) float, ``dim`` the model's
    hidden size. ``input_size`` is the processor's size, so slices are best preprocessed to it
    (other sizes are resized in ``forward``). For ViT-MAE models masking is switched off
    (``mask_ratio`` 0 and an identity token order), so every patch is seen and calls are
    deterministic.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        from helpers.encoders.image import quiet_transformers

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"parameter 'path': {path} holds no transformers model (no config.json); expected "
                                    "a folder written by save_pretrained")
        quiet_transformers()
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        if getattr(config, "model_type", None) == "vit_mae":
            config.mask_ratio = 0.0
        try:
            self.model = AutoModel.from_pretrained(path, config=config, local_files_only=True)
        except (OSError, ValueError) as err:
            raise FileNotFoundError(f"parameter 'path': cannot load a transformers model from {path}: {err}") from err
        self.model.requires_grad_(False)
        self.model.eval()
        config = self.model.config
        vision = getattr(config, "vision_config", config)
        self.channels = int(getattr(vision, "num_channels", 3))
        if (path / "preprocessor_config.json").is_file():
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
            crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
            self.input_size = _as_size(crop or processor.size)
            mean, std = processor.image_mean, processor.image_std
            if not getattr(processor, "do_normalize", True):
                mean, std = [0.0], [1.0]
            source = f"image processor {type(processor).__name__}"
        else:
            image_size = getattr(vision, "image_size", None)
            if image_size is None:
                raise ValueError(f"parameter 'path': {path} has no preprocessor_config.json and its model config has "
                                 "no image_size")
            self.input_size = int(image_size if isinstance(image_size, int) else image_size[0])
            mean, std = IMAGENET_MEAN, IMAGENET_STD
            source = "fallback: model config image_size, ImageNet mean/std (no preprocessor_config.json)"
        self.register_buffer("mean", _per_channel(mean, self.channels, "image_mean"), persistent=False)
        self.register_buffer("std", _per_channel(std, self.channels, "image_std"), persistent=False)
        self.path = str(path)
        self.model_type = str(getattr(config, "model_type", "unknown"))
        self._noise = "noise" in inspect.signature(self.model.forward).parameters
        with torch.no_grad():
            probe = self._run(torch.zeros(1, self.channels, self.input_size, self.input_size))
        self.pooling = "pooler_output" if getattr(probe, "pooler_output", None) is not None else "cls_token"
        self.dim = int(self._pool(probe).shape[-1])
        self._normalisation = {"source": source, "mean": self.mean.flatten().tolist(), "std": self.std.flatten().tolist()}
        self.requires_grad_(False)
        self.eval()

    def _run(self, pixels: torch.Tensor):
        """The model on normalised pixels (n, channels, input_size, input_size)."""
        kwargs = {}
        if self._noise:
            # ViT-MAE shuffles patches by argsort(noise) even at mask_ratio 0: an increasing
            # noise keeps the identity order and draws nothing from the global generator
            n_patches = self.model.embeddings.patch_embeddings.num_patches
            kwargs["noise"] = torch.arange(n_patches, device=pixels.device, dtype=pixels.dtype).expand(len(pixels), -1)
        return self.model(pixel_values=pixels, **kwargs)

    def _pool(self, output) -> torch.Tensor:
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.flatten(1)
        return output.last_hidden_state[:, 0]

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, 1, H, W) float in [0, 1] -> (n, dim) float."""
        if slices.ndim != 4 or slices.shape[1] != 1:
            raise ValueError(f"parameter 'slices': expected shape (n, 1, H, W), got {tuple(slices.shape)}")
        x = slices.to(self.mean.dtype)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = (x.expand(-1, self.channels, -1, -1) - self.mean) / self.std
        return self._pool(self._run(x))

    def describe(self) -> dict:
        return {"kind": "hf", "checkpoint": self.path, "model_type": self.model_type, "dim": self.dim,
                "input_size": self.input_size, "channels": f"1 -> {self.channels} by repetition",
                "resize": "bilinear (torch)", "normalisation": self._normalisation, "pooling": self.pooling,
                "mask_ratio": 0.0 if self.model_type == "vit_mae" else None}
