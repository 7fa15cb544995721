"""Frozen encoders: CT volumes and EHR records to embedding tables.

Image encoders (``image_encoder(name, spec)``, dispatched on the manifest entry's ``kind``):

* ``randconv`` (``builtin``): a seeded random-feature CNN with regional soft intensity
  histograms (``helpers.encoders.randconv``). No checkpoint, no pretraining.
* ``ct_mae``: a small ViT masked autoencoder pretrained by the study on the cohort's slices
  (``helpers.encoders.ct_mae``; ``python -m helpers pretrain ct_mae``).
* ``hf``: any transformers vision model in a local folder (``helpers.encoders.hf``).
* ``medimageinsight``: Microsoft's MedImageInsight from its local code and weights
  (``helpers.encoders.medimageinsight``).

EHR encoders: ``onehot`` (curated features, ``helpers.ehr``), ``clmbr_mini`` (a small
CLMBR-style causal transformer pretrained by the study on MEDS timelines,
``helpers.encoders.clmbr_mini``) and CLMBR-T-base through femr in its own environment
(``helpers/encoders/clmbr_femr.py``). ``helpers.extract`` runs any of them on a cohort.
"""

from __future__ import annotations

from helpers.encoders.image import (
    EHR_ENCODERS,
    IMAGE_ENCODERS,
    ImageEncoder,
    SlicePreprocess,
    UnreadableVolumeError,
    VolumeDataset,
    encode_volumes,
    image_encoder,
)

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
