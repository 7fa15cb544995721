"""Frozen encoders: CT volumes and EHR records to embedding tables.

Image encoders (``image_encoder(name, spec)``):

* ``randconv``: a seeded random-feature CNN with a soft intensity histogram
  (``helpers.encoders.randconv``). It needs no checkpoint and no pretraining, so the study runs
  anywhere; it is the first image encoder of the study and the floor the pretrained ones must
  beat.

EHR encoders: ``onehot`` (curated features, ``helpers.ehr``).
"""

from __future__ import annotations

from helpers.encoders.image import (
    EHR_ENCODERS,
    IMAGE_ENCODERS,
    SlicePreprocess,
    VolumeDataset,
    encode_volumes,
    image_encoder,
)

__all__ = [
    "IMAGE_ENCODERS",
    "EHR_ENCODERS",
    "SlicePreprocess",
    "VolumeDataset",
    "encode_volumes",
    "image_encoder",
]
