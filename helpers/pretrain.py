"""Self-supervised pretraining of the study's own foundation models on one task's data.

``pretrain(manifest, task, name)`` is what ``python -m helpers pretrain`` and
``02_pretrain.ipynb`` run. Which data each model sees:

* ``ct_mae`` (image, masked autoencoder): the windowed axial slices of the *internal train and
  validation* studies of the cohort;
* ``clmbr_mini`` (EHR, next-code prediction): the whole MEDS timelines of the *internal train
  and validation* patients.

Test and external patients are never seen in pretraining, so the evaluation stays honest
(a foundation model trained at another hospital would not have seen them either). The
checkpoint goes to ``<run_root>/checkpoints/<task>/<name>`` with its sha256 recorded next to
it; to pin it, copy the printed ``path`` and ``sha256`` into the manifest.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from helpers import cohort as hc
from helpers.extract import encoder_spec, require_meds
from helpers.manifest import PRETRAINED_KINDS, Manifest, ManifestError, default_checkpoint
from helpers.tasks import PROFILES, get_task

__all__ = ["PRETRAIN_SPLITS", "QUICK_PRETRAIN", "pretrain", "pretraining_studies", "resolve_name"]

PRETRAIN_SPLITS = ("train", "val")


def pretraining_studies(manifest: Manifest, task: str) -> pd.DataFrame:
    """The cohort rows whose data pretraining may see (internal train and validation)."""
    cohort = hc.read_cohort(hc.cohort_paths(manifest, task)["cohort"])
    return cohort[cohort["split"].isin(PRETRAIN_SPLITS)].reset_index(drop=True)


def resolve_name(manifest: Manifest, name: str) -> tuple[str, str]:
    """``(modality, name)`` of the manifest entry called ``name``, or else of the one entry
    whose kind is ``name`` (so ``pretrain clmbr_mini`` finds ``encoders.ehr.clmbr: {kind:
    clmbr_mini}``)."""
    for modality in ("image", "ehr"):
        if name in getattr(manifest.encoders, modality):
            return modality, name
    matches = [(modality, key) for modality in ("image", "ehr")
               for key, entry in getattr(manifest.encoders, modality).items() if entry.kind == name]
    if len(matches) == 1:
        return matches[0]
    declared = [f"{m}.{k} ({e.kind})" for m in ("image", "ehr") for k, e in getattr(manifest.encoders, m).items()]
    raise ManifestError(f"{manifest.path}: no single encoder called or of kind {name!r} under encoders "
                        f"(declared: {', '.join(declared) or 'none'})")


# Shorter pretraining on the tiny and quick twins (tests, workshops): a quarter to a third of the
# optimiser steps of the defaults, which take 2 to 3 minutes per task on one core. Settings in
# the manifest entry's ``pretrain`` replace these.
QUICK_PRETRAIN: dict[str, dict] = {"ct_mae": {"epochs": 2}, "clmbr_mini": {"target_steps": 50}}


def _config(manifest: Manifest, modality: str, name: str, entry):
    """The model's pretraining configuration: its defaults (``QUICK_PRETRAIN`` on the tiny and
    quick twins), updated by the manifest entry's ``pretrain`` settings (an unknown setting is
    named in the error)."""
    import dataclasses

    if entry.kind == "ct_mae":
        from helpers.encoders.ct_mae import CTMAEConfig as config_class
    else:
        from helpers.encoders.clmbr_mini import ClmbrMiniConfig as config_class
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(entry.pretrain) - known)
    if unknown:
        raise ManifestError(f"{manifest.path}: encoders.{modality}.{name}.pretrain: unknown setting(s) {', '.join(unknown)}; "
                            f"expected some of {', '.join(sorted(known))}")
    quick = manifest.data.source == "synthetic" and PROFILES[manifest.synthetic.profile].short_pretraining
    settings = {**(QUICK_PRETRAIN[entry.kind] if quick else {}), **entry.pretrain}
    try:
        return config_class(**settings)
    except (TypeError, ValueError) as err:
        raise ManifestError(f"{manifest.path}: encoders.{modality}.{name}.pretrain: {err}") from None


def pretrain(manifest: Manifest, task: str, name: str, *, config=None, progress: Callable | None = None):
    """Pretrain encoder ``name`` (an entry of ``encoders.image`` or ``encoders.ehr`` of kind
    ``ct_mae`` or ``clmbr_mini``) on ``task``'s internal train and validation data. Returns the
    model's ``PretrainResult`` (checkpoint, sha256, loss history, seconds, summary)."""
    spec = get_task(task)
    modality, name = resolve_name(manifest, name)
    entry = encoder_spec(manifest, modality, name)
    if entry.kind not in PRETRAINED_KINDS:
        raise ManifestError(f"{manifest.path}: encoders.{modality}.{name} has kind {entry.kind!r}; only "
                            f"{' and '.join(PRETRAINED_KINDS)} are pretrained by the study")
    if entry.path is not None:
        raise ManifestError(f"{manifest.path}: encoders.{modality}.{name} names a checkpoint ({entry.path}); remove "
                            "its path and sha256 to pretrain the study's own")
    if config is None:
        config = _config(manifest, modality, name, entry)
    out = default_checkpoint(manifest, task, name)
    studies = pretraining_studies(manifest, task)
    if entry.kind == "ct_mae":
        from helpers.encoders import SlicePreprocess, VolumeDataset
        from helpers.encoders.ct_mae import pretrain_ct_mae

        paths = hc.cohort_paths(manifest, task)
        imaging = pd.read_parquet(paths["imaging"]).set_index("study_id").loc[studies["study_id"]]
        preprocess = SlicePreprocess(window_hu=spec.window_hu, n_slices=16, size=config.image_size)
        dataset = VolumeDataset(list(studies["study_id"]), list(imaging["image_path"]), preprocess)
        return pretrain_ct_mae(dataset, out, config=config, progress=progress)
    from helpers.encoders.clmbr_mini import pretrain_clmbr_mini
    from helpers.meds import cohort_subject_ids, read_meds

    events = read_meds(require_meds(manifest, task))
    persons = studies.drop_duplicates("person_id")
    train = cohort_subject_ids(persons[persons["split"] == "train"])
    val = cohort_subject_ids(persons[persons["split"] == "val"])
    return pretrain_clmbr_mini(events, train, val, out, config=config, progress=progress)
