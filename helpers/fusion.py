"""Fusion strategies: modules from (image embedding, EHR embedding) to a log-hazard.

Tensors in, tensors out, no file I/O. Inputs are standardised with statistics of the training
split that the module stores as buffers, so a saved model scores new data by itself.

Implemented here: ``image_only``, ``ehr_only`` and ``concat`` (the unimodal references and
the cross-modal reference of the paper).
"""

from __future__ import annotations

import torch
from torch import nn

from helpers.survival import MLPHead, hidden_widths
from helpers.tasks import FUSIONS, check_choice

__all__ = ["IMPLEMENTED", "SurvivalModel", "build_model"]

IMPLEMENTED: tuple[str, ...] = ("image_only", "ehr_only", "concat")


class _Standardise(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def fit(self, x: torch.Tensor) -> None:
        self.mean.copy_(x.mean(0))
        self.scale.copy_(x.std(0).clamp_min(1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.scale


class SurvivalModel(nn.Module):
    """``forward(img, ehr) -> log_hz`` with ``img`` (n, d_img) and ``ehr`` (n, d_ehr) float32;
    the unused modality of a unimodal model may be ``None``. Output shape (n,), higher =
    earlier event."""

    def __init__(self, fusion: str, d_img: int, d_ehr: int, *, dropout: float = 0.1, linear: bool = False) -> None:
        super().__init__()
        check_choice("fusion", fusion, FUSIONS)
        if fusion not in IMPLEMENTED:
            raise ValueError(
                f"parameter 'fusion': {fusion!r} is not available in this version; available: {', '.join(IMPLEMENTED)}"
            )
        self.fusion = fusion
        self.uses_image = fusion in ("image_only", "concat")
        self.uses_ehr = fusion in ("ehr_only", "concat")
        self.norm_img = _Standardise(d_img) if self.uses_image else None
        self.norm_ehr = _Standardise(d_ehr) if self.uses_ehr else None
        d_in = (d_img if self.uses_image else 0) + (d_ehr if self.uses_ehr else 0)
        self.d_in = d_in
        self.head = MLPHead(d_in, [] if linear else hidden_widths(d_in), dropout=dropout)

    def fit_standardisation(self, img: torch.Tensor | None, ehr: torch.Tensor | None) -> None:
        """Store the mean and spread of the training inputs."""
        if self.norm_img is not None:
            self.norm_img.fit(img)
        if self.norm_ehr is not None:
            self.norm_ehr.fit(ehr)

    def fused(self, img: torch.Tensor | None, ehr: torch.Tensor | None) -> torch.Tensor:
        """The representation the head sees, (n, d_in)."""
        parts = []
        if self.norm_img is not None:
            parts.append(self.norm_img(img))
        if self.norm_ehr is not None:
            parts.append(self.norm_ehr(ehr))
        return torch.cat(parts, dim=1)

    def forward(self, img: torch.Tensor | None, ehr: torch.Tensor | None) -> torch.Tensor:
        return self.head(self.fused(img, ehr))


def build_model(fusion: str, d_img: int, d_ehr: int, *, dropout: float = 0.1, linear: bool = False) -> SurvivalModel:
    """A ``SurvivalModel`` for ``fusion`` (see ``IMPLEMENTED``)."""
    return SurvivalModel(fusion, d_img, d_ehr, dropout=dropout, linear=linear)
