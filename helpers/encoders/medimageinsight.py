"""Microsoft's MedImageInsight as a frozen slice encoder, from the user's local copy.

MedImageInsight (Codella et al., 2024) is a medical image-text embedding model (a DaViT image
encoder trained with UniCL on X-ray, CT, MRI and more) whose image embeddings have 1024
dimensions. Its published inference code is a wrapper class, ``MedImageInsight`` in the module
``medimageinsightmodel``, built as ``MedImageInsight(model_dir=..., vision_model_name=...,
language_model_name=...)``, then ``load_model()``, then ``encode(images=[...])`` where each
image is a base64-encoded image file (PNG); it returns ``{"image_embeddings": ndarray (n,
1024), "text_embeddings": None}``. It decodes, converts to RGB and resizes/normalises with its
own transforms.

Install (once, outside the main environment's pins if needed)::

    git lfs install
    git clone https://huggingface.co/lion-ai/MedImageInsights   # code + 2024.09.27/ weights
    # then install the packages its README lists into the study's environment

then in ``data_manifest.yaml``::

    encoders:
      image:
        medimageinsight: {kind: medimageinsight, path: /path/to/MedImageInsights, sha256: ...}

``path`` is the cloned folder (it holds ``medimageinsightmodel.py`` and the model folder
``2024.09.27/`` with ``vision_model/medimageinsigt-v1.0.0.pt``, the file name spelt as
published). The folder is put on ``sys.path`` only when the encoder is built.

This adapter follows the published inference: each windowed slice (values in [0, 1]) is
resized to 480 x 480, quantised to 8 bits, repeated to 3 channels, written as a PNG and
base64-encoded; the embeddings are L2-normalised. Because the official API takes encoded
images, this encoder is *not* differentiable with respect to the slices (saliency through it
is not available); its output is detached float32.
"""

from __future__ import annotations

import base64
import importlib
import io
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

__all__ = ["MedImageInsightEncoder", "slices_to_png_base64", "MEDIMAGEINSIGHT_INSTALL"]

MEDIMAGEINSIGHT_INSTALL = (
    "clone https://huggingface.co/lion-ai/MedImageInsights (git lfs) and install the packages its README lists "
    "into the study's environment, then set encoders.image.<name>.path to the cloned folder (see "
    "helpers/encoders/medimageinsight.py and the README)"
)


def slices_to_png_base64(slices: torch.Tensor, size: int = 480) -> list[str]:
    """Slices (n, 1, H, W) float in [0, 1] -> n base64 PNG strings, 8-bit RGB, ``size`` x
    ``size`` (bilinear resize in float, then rounding to 0..255; the 3 channels are equal)."""
    from PIL import Image

    if slices.ndim != 4 or slices.shape[1] != 1:
        raise ValueError(f"parameter 'slices': expected shape (n, 1, H, W), got {tuple(slices.shape)}")
    x = slices.detach().float().cpu()
    if x.shape[-2:] != (size, size):
        x = nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    pixels = np.clip(np.rint(x[:, 0].numpy() * 255.0), 0, 255).astype(np.uint8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(np.repeat(image[:, :, None], 3, axis=2)).save(buffer, format="PNG")
        encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
    return encoded


def _load_official(path: Path, model_dir: str, vision_model_name: str, language_model_name: str):
    module_file = path / "medimageinsightmodel.py"
    if not module_file.is_file():
        raise FileNotFoundError(f"parameter 'path': {path} has no medimageinsightmodel.py; {MEDIMAGEINSIGHT_INSTALL}")
    weights = path / model_dir / "vision_model" / vision_model_name
    if not weights.is_file():
        raise FileNotFoundError(f"MedImageInsight weights not found at {weights} (parameters 'model_dir', "
                                f"'vision_model_name'; are the git-lfs files pulled?); {MEDIMAGEINSIGHT_INSTALL}")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    try:
        module = importlib.import_module("medimageinsightmodel")
    except ImportError as err:
        raise ImportError(f"cannot import MedImageInsight's code from {path} ({err}); {MEDIMAGEINSIGHT_INSTALL}") from err
    model = module.MedImageInsight(model_dir=str(path / model_dir), vision_model_name=vision_model_name,
                                   language_model_name=language_model_name)
    model.load_model()
    return model


class MedImageInsightEncoder(nn.Module):
    """Frozen MedImageInsight slice encoder (see the module docstring for installation).

    Input slices (n, 1, S, S) float in [0, 1] (best preprocessed at ``input_size`` = 480);
    output (n, 1024) float32, L2-normalised, on the slices' device, in input order.
    ``model``: an object with the official ``encode(images=list_of_base64_png) ->
    {"image_embeddings": ndarray (n, 1024)}`` to use instead of loading from ``path`` (tests,
    or an already loaded model). ``batch_size``: images per ``encode`` call.
    Not differentiable with respect to the slices (the official API takes encoded images).
    """

    dim = 1024

    def __init__(self, path: str | os.PathLike, *, model=None, model_dir: str = "2024.09.27",
                 vision_model_name: str = "medimageinsigt-v1.0.0.pt",
                 language_model_name: str = "language_model.pth", image_size: int = 480,
                 batch_size: int = 32) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"parameter 'batch_size': must be >= 1, got {batch_size}")
        self.path = str(path)
        self.model_dir, self.vision_model_name = model_dir, vision_model_name
        self.input_size, self.batch_size = int(image_size), int(batch_size)
        if model is None:
            model = _load_official(Path(path), model_dir, vision_model_name, language_model_name)
        if not callable(getattr(model, "encode", None)):
            raise TypeError(f"parameter 'model': expected an object with encode(images=...), got {type(model).__name__}")
        inner = getattr(model, "model", None)
        if isinstance(inner, nn.Module):
            inner.requires_grad_(False)
            inner.eval()
        self._official = model
        self.requires_grad_(False)
        self.eval()

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        """(n, 1, H, W) float in [0, 1] -> (n, 1024) float32, unit L2 norm (no gradient)."""
        images = slices_to_png_base64(slices, self.input_size)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start:start + self.batch_size]
            out = self._official.encode(images=batch)
            emb = np.asarray(out["image_embeddings"], dtype=np.float32)
            if emb.shape != (len(batch), self.dim):
                raise ValueError(f"MedImageInsight returned image_embeddings of shape {emb.shape}, expected "
                                 f"({len(batch)}, {self.dim})")
            chunks.append(emb)
        emb = np.concatenate(chunks)
        emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(emb.astype(np.float32)).to(slices.device)

    def describe(self) -> dict:
        return {"kind": "medimageinsight", "checkpoint": self.path, "model_dir": self.model_dir,
                "vision_model_name": self.vision_model_name, "dim": self.dim, "input_size": self.input_size,
                "image_format": f"8-bit RGB PNG {self.input_size}x{self.input_size}, base64 (channels repeated)",
                "normalisation": "the model's own transforms", "pooling": "image embedding, L2-normalised",
                "differentiable": False}
