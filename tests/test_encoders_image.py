"""Image encoders: the common interface, the transformers and MedImageInsight adapters, the
CT MAE (pretraining, checkpoint, frozen encoder, reconstruction) and the encoding of a list
of volumes. Every model is built from a tiny config and saved to ``tmp_path``; nothing is
downloaded."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from helpers.encoders import SlicePreprocess, VolumeDataset, encode_volumes, image_encoder
from helpers.encoders.ct_mae import CTMAEConfig, CTMAEEncoder, pretrain_ct_mae, reconstruct
from helpers.encoders.hf import HFImageEncoder
from helpers.encoders.image import EHR_ENCODERS, IMAGE_ENCODERS, ImageEncoder
from helpers.encoders.medimageinsight import MedImageInsightEncoder
from helpers.imaging import Volume, write_nifti
from helpers.manifest import EncoderSpec, sha256_path

TINY_MAE = CTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=1, num_heads=2, decoder_hidden_size=16,
                       decoder_layers=1, decoder_heads=2, epochs=2, steps_per_epoch=3, batch_size=16, val_slices=16)


def _volumes(tmp_path, n: int, seed: int = 0) -> VolumeDataset:
    """``n`` small NIfTI phantoms (a bright disc of varying radius in soft tissue)."""
    rng = np.random.default_rng(seed)
    folder = tmp_path / "volumes"
    folder.mkdir(exist_ok=True)
    ids, paths = [], []
    yy, xx = np.mgrid[:40, :40]
    for i in range(n):
        hu = rng.normal(40.0, 20.0, size=(12, 40, 40)).astype(np.float32)
        radius = 4 + (i % 5) * 2
        hu[:, (yy - 20) ** 2 + (xx - 20) ** 2 < radius**2] = 300.0
        path = write_nifti(Volume(hu, (5.0, 1.0, 1.0)), folder / f"s{i:03d}.nii.gz")
        ids.append(f"s{i:03d}")
        paths.append(str(path))
    return VolumeDataset(ids, paths, SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=4, size=32))


def _check_frozen_differentiable(encoder: nn.Module, size: int) -> None:
    assert isinstance(encoder, ImageEncoder)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    x = torch.rand(3, 1, size, size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    out = encoder(x)
    assert out.shape == (3, encoder.dim) and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), encoder(x), rtol=0, atol=0)
    json.dumps(encoder.describe())


# ---------------------------------------------------------------- the common interface


def test_names_and_randconv_interface():
    assert IMAGE_ENCODERS == ("randconv", "ct_mae", "hf", "medimageinsight")
    assert EHR_ENCODERS == ("onehot", "clmbr")
    enc = image_encoder("randconv", EncoderSpec(kind="builtin"), seed=3)
    assert enc.input_size == 64 and enc.describe()["seed"] == 3
    _check_frozen_differentiable(enc, 64)


@pytest.mark.parametrize(
    ("name", "spec", "error", "match"),
    [
        ("dino", None, ValueError, r"unknown image encoder 'dino'.*'randconv'"),
        ("x", EncoderSpec(kind="hf"), ValueError, r"encoders\.image\.x\.path: required for an encoder of kind 'hf'"),
        ("x", EncoderSpec(kind="clmbr"), ValueError, r"encoders\.image\.x\.kind: 'clmbr' is not an image encoder kind"),
        ("ct_mae", EncoderSpec(kind="ct_mae"), FileNotFoundError, r"python -m helpers pretrain ct_mae"),
    ],
)
def test_image_encoder_errors_name_the_key(name, spec, error, match):
    with pytest.raises(error, match=match):
        image_encoder(name, spec)


# ---------------------------------------------------------------- transformers backbones


def _save_vit(folder, processor: bool = True):
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(folder)
    if processor:
        ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3).save_pretrained(folder)
    return folder


def _save_dinov2(folder):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=28, patch_size=14, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64)).save_pretrained(folder)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, do_center_crop=True,
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def test_hf_vit_encoder(tmp_path):
    enc = image_encoder("vit", EncoderSpec(kind="hf", path=_save_vit(tmp_path / "vit")))
    assert isinstance(enc, HFImageEncoder)
    assert (enc.dim, enc.input_size) == (32, 32)
    described = enc.describe()
    assert described["pooling"] == "pooler_output"
    assert described["normalisation"]["mean"] == [0.5] * 3
    _check_frozen_differentiable(enc, 32)
    # other slice sizes are resized inside forward
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 32)


def test_hf_dinov2_encoder_and_fallback_without_processor(tmp_path):
    enc = HFImageEncoder(_save_dinov2(tmp_path / "dino"))
    assert (enc.dim, enc.input_size) == (32, 28)
    _check_frozen_differentiable(enc, 28)
    bare = HFImageEncoder(_save_vit(tmp_path / "bare", processor=False))
    assert bare.input_size == 32
    assert bare.describe()["normalisation"]["source"].startswith("fallback")
    assert bare.describe()["normalisation"]["std"] == pytest.approx([0.229, 0.224, 0.225])


def test_hf_vit_mae_is_unmasked_and_deterministic(tmp_path):
    from transformers import ViTMAEConfig, ViTMAEModel

    torch.manual_seed(0)
    ViTMAEModel(ViTMAEConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                             intermediate_size=64, mask_ratio=0.75)).save_pretrained(tmp_path / "mae")
    enc = HFImageEncoder(tmp_path / "mae")
    assert enc.model.config.mask_ratio == 0.0 and enc.describe()["pooling"] == "cls_token"
    x = torch.rand(2, 1, 32, 32)
    state = torch.get_rng_state()
    with torch.no_grad():
        a = enc.model(pixel_values=(x.expand(-1, 3, -1, -1) - enc.mean) / enc.std,
                      noise=torch.arange(16.0).expand(2, -1)).last_hidden_state
        torch.testing.assert_close(enc(x), enc(x), rtol=0, atol=0)
    assert a.shape == (2, 17, 32)
    assert torch.equal(state, torch.get_rng_state()), "the encoder drew from the global generator"


def test_hf_path_without_model_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"parameter 'path': .*empty holds no transformers model"):
        HFImageEncoder(tmp_path / "empty")


# ---------------------------------------------------------------- MedImageInsight


class _StandIn:
    """Same call signature as the official ``MedImageInsight.encode``; records what it got."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def encode(self, images=None, texts=None):
        from PIL import Image

        self.calls.append(list(images))
        decoded = [np.asarray(Image.open(io.BytesIO(base64.b64decode(s)))) for s in images]
        # a deterministic 1024-d "embedding" that identifies the image: its mean, then noise
        out = np.stack([np.r_[3.0 * d.mean() + 1.0, np.full(1023, 0.5)] for d in decoded])
        return {"image_embeddings": out, "text_embeddings": None}


def test_medimageinsight_adapter_with_stand_in(tmp_path):
    from PIL import Image

    stand_in = _StandIn()
    enc = MedImageInsightEncoder(tmp_path, model=stand_in, batch_size=2)
    assert (enc.dim, enc.input_size) == (1024, 480)
    slices = torch.rand(5, 1, 480, 480, generator=torch.Generator().manual_seed(1)) * torch.arange(1, 6).view(5, 1, 1, 1) / 5
    out = enc(slices)
    assert out.shape == (5, 1024) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(5))
    assert [len(c) for c in stand_in.calls] == [2, 2, 1]
    first = np.asarray(Image.open(io.BytesIO(base64.b64decode(stand_in.calls[0][0]))))
    assert first.shape == (480, 480, 3) and first.dtype == np.uint8
    expected = np.clip(np.rint(slices[0, 0].numpy() * 255), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(first[:, :, 0], expected)
    np.testing.assert_array_equal(first[:, :, 2], expected)
    # order preserved across batches: the first coordinate grows with the slice mean
    assert np.all(np.diff(out[:, 0].numpy()) > 0)
    small = np.asarray(Image.open(io.BytesIO(base64.b64decode(MedImageInsightEncoder(tmp_path, model=stand_in)
                                                             ._official.calls[-1][0]))))
    assert small.shape == (480, 480, 3)
    enc(torch.rand(1, 1, 64, 64))
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(stand_in.calls[-1][0])))).shape == (480, 480, 3)
    assert enc.describe()["differentiable"] is False


def test_medimageinsight_without_code_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no medimageinsightmodel\.py.*lion-ai/MedImageInsights"):
        image_encoder("mii", EncoderSpec(kind="medimageinsight", path=tmp_path))


# ---------------------------------------------------------------- CT MAE


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mae")
    dataset = _volumes(tmp, 6)
    return dataset, pretrain_ct_mae(dataset, tmp / "ckpt" / "ct_mae", config=TINY_MAE, val_fraction=0.34)


def test_ct_mae_pretraining_writes_a_checkpoint_with_its_hash_next_to_it(mae_checkpoint, tmp_path):
    dataset, result = mae_checkpoint
    assert result.checkpoint.is_dir() and (result.checkpoint / "ct_mae.json").is_file()
    assert result.sha256 == sha256_path(result.checkpoint)
    record = json.loads(result.checkpoint.with_name("ct_mae.json").read_text())
    assert record["sha256"] == result.sha256
    assert not any(p.name.startswith(".") for p in result.checkpoint.parent.iterdir())
    assert list(result.history.columns) == ["epoch", "split", "loss"]
    assert len(result.history) == 2 * TINY_MAE.epochs and set(result.history["split"]) == {"train", "val"}
    assert np.isfinite(result.history["loss"]).all()
    assert result.summary["n_volumes"] == 6 and result.summary["n_slices"] == 24
    assert result.summary["n_val_volumes"] == 2 and result.summary["parameters"] > 0
    # fixed sin-cos positions really set (transformers 5.24 leaves them at zero from a config)
    mae = CTMAEEncoder(result.checkpoint).model
    assert mae.embeddings.position_embeddings[0, 1:].abs().sum() > 0
    # same data, config and seed: the same bytes; another seed: other weights
    again = pretrain_ct_mae(dataset, tmp_path / "again" / "ct_mae", config=TINY_MAE, val_fraction=0.34)
    assert again.sha256 == result.sha256
    pd.testing.assert_frame_equal(again.history, result.history)
    other = pretrain_ct_mae(dataset, tmp_path / "other" / "ct_mae", config=TINY_MAE.__class__(
        **{**TINY_MAE.__dict__, "seed": 1}), val_fraction=0.34)
    assert other.sha256 != result.sha256


def test_ct_mae_pretraining_leaves_out_an_unreadable_study_and_records_it(mae_checkpoint, tmp_path):
    from helpers.encoders import VolumeDataset

    dataset, result = mae_checkpoint
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "0001.dcm").write_bytes(b"not a DICOM file" * 40)
    with_bad = VolumeDataset(list(dataset.study_ids) + ["bad"], list(dataset.paths) + [str(broken)], dataset.preprocess)
    again = pretrain_ct_mae(with_bad, tmp_path / "ckpt" / "ct_mae", config=TINY_MAE, val_fraction=0.34)
    assert again.sha256 == result.sha256, "the readable studies, and only they, made the checkpoint"
    assert again.summary["n_unreadable_volumes"] == 1 and again.summary["n_volumes"] == 6
    record = json.loads(again.checkpoint.with_name("ct_mae.json").read_text())
    assert [(r["study_id"], r["error"]) for r in record["unreadable"]] == [("bad", "VolumeFormatError")]
    assert record["unreadable"][0]["reason"].endswith("is not a DICOM file")


def test_ct_mae_refuses_a_size_mismatch(tmp_path):
    dataset = _volumes(tmp_path, 1)
    with pytest.raises(ValueError, match=r"SlicePreprocess.size \(32\) must equal config.image_size \(64\)"):
        pretrain_ct_mae(dataset, tmp_path / "x", config=CTMAEConfig())
    with pytest.raises(ValueError, match="image_size 30 is not a multiple of patch_size 8"):
        CTMAEConfig(image_size=30)


def test_ct_mae_encoder_is_frozen_unmasked_and_deterministic(mae_checkpoint):
    _, result = mae_checkpoint
    enc = image_encoder("ct_mae", EncoderSpec(kind="ct_mae"), default_checkpoint=result.checkpoint)
    assert isinstance(enc, CTMAEEncoder)
    assert (enc.dim, enc.input_size) == (32 * 4**2, 32), "grid pooling: 4 x 4 regions x hidden 32"
    assert enc.describe()["checkpoint_sha256"] == result.sha256
    state = torch.get_rng_state()
    _check_frozen_differentiable(enc, 32)
    assert torch.equal(state, torch.get_rng_state()), "the encoder drew from the global generator"
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        tokens = enc.model(pixel_values=(x - enc.mean) / enc.std, noise=torch.arange(16.0).expand(2, -1)).last_hidden_state
        assert tokens.shape == (2, 17, 32)  # every patch kept
        torch.testing.assert_close(CTMAEEncoder(result.checkpoint, pooling="mean")(x), tokens[:, 1:].mean(dim=1))
        torch.testing.assert_close(enc(x).view(2, 32, 16).mean(dim=2), tokens[:, 1:].mean(dim=1))  # 16 equal regions
        torch.testing.assert_close(CTMAEEncoder(result.checkpoint, pooling="cls")(x), tokens[:, 0])
        grid = CTMAEEncoder(result.checkpoint, pooling="grid", grid=2)
        assert grid.dim == 4 * 32
        top_left = tokens[:, 1:].reshape(2, 4, 4, 32)[:, :2, :2].mean(dim=(1, 2))
        torch.testing.assert_close(grid(x).view(2, 32, 4)[:, :, 0], top_left)
    with pytest.raises(ValueError, match="parameter 'pooling': expected one of mean, cls, grid, got 'max'"):
        CTMAEEncoder(result.checkpoint, pooling="max")


def test_ct_mae_reconstruction(mae_checkpoint):
    dataset, result = mae_checkpoint
    slices = dataset[0][1]
    masked, recon = reconstruct(result.checkpoint, slices, seed=0)
    assert masked.shape == recon.shape == (4, 32, 32)
    assert np.isnan(masked).mean() == pytest.approx(TINY_MAE.mask_ratio)
    visible = ~np.isnan(masked)
    np.testing.assert_array_equal(masked[visible], slices[:, 0].numpy()[visible])
    assert np.all((recon >= 0) & (recon <= 1))
    again, _ = reconstruct(result.checkpoint, slices[:, 0].numpy(), seed=0)
    np.testing.assert_array_equal(np.isnan(again), np.isnan(masked))
    with pytest.raises(ValueError, match=r"parameter 'slices': expected shape \(n, 1, 32, 32\)"):
        reconstruct(result.checkpoint, np.zeros((2, 16, 16)))


# ---------------------------------------------------------------- encode_volumes


def test_encode_volumes_gives_tokens_in_dataset_order(tmp_path):
    dataset = _volumes(tmp_path, 7)
    enc = image_encoder("randconv")
    stats: dict = {}
    seen: list[int] = []
    reference, ref_tokens = encode_volumes(enc, dataset, batch_size=2, stats=stats, progress=seen.append)
    assert reference.shape == (7, enc.dim) and all(t.shape == (4, enc.dim) for t in ref_tokens)
    assert reference.dtype == np.float32 and all(t.dtype == np.float32 for t in ref_tokens)
    np.testing.assert_allclose(reference, np.stack([t.mean(axis=0) for t in ref_tokens]))
    assert seen == [2, 4, 6, 7]
    assert stats["computed_volumes"] == 7 and stats["volumes_per_second"] > 0 and stats["slices_per_second"] > 0
    assert stats["model_seconds"] >= 0 and stats["decode_seconds"] >= 0

    # another order of the studies: the same rows, in that order
    order = [0, 1, 3, 2, 4, 5, 6]
    shuffled = VolumeDataset([dataset.study_ids[i] for i in order], [dataset.paths[i] for i in order],
                             dataset.preprocess)
    out, tokens = encode_volumes(enc, shuffled, batch_size=3)
    np.testing.assert_array_equal(out, reference[order])
    for i, t in zip(order, tokens, strict=True):
        np.testing.assert_array_equal(t, ref_tokens[i])

    # another encoder (seed): other numbers
    other, _ = encode_volumes(image_encoder("randconv", seed=1), dataset, batch_size=2)
    assert not np.allclose(other, reference)
    with pytest.raises(ValueError, match="parameter 'dataset': no volumes to encode"):
        encode_volumes(enc, VolumeDataset([], [], dataset.preprocess))


def test_encode_volumes_with_workers_matches_in_process(tmp_path):
    dataset = _volumes(tmp_path, 5)
    enc = image_encoder("randconv")
    expected, _ = encode_volumes(enc, dataset, batch_size=3)
    stats: dict = {}
    got, _ = encode_volumes(enc, dataset, batch_size=2, num_workers=1, stats=stats)
    np.testing.assert_array_equal(got, expected)
    assert stats["computed_volumes"] == 5 and stats["decode_seconds"] >= 0
    with pytest.raises(ValueError, match="parameter 'batch_size': must be >= 1, got 0"):
        encode_volumes(enc, dataset, batch_size=0)


def test_encoding_one_volume_per_call_gives_the_batched_numbers(tmp_path):
    dataset = _volumes(tmp_path, 5)
    enc = image_encoder("randconv")
    _, tokens = encode_volumes(enc, dataset, batch_size=5)
    with torch.no_grad():
        together = enc(torch.cat([dataset[i][1] for i in range(5)])).numpy()
    np.testing.assert_allclose(np.concatenate(tokens), together, rtol=1e-6, atol=1e-7)


def test_dicom_pixels_read_directly_equal_pydicoms(tmp_path, monkeypatch):
    from datetime import date

    from helpers import imaging

    rng = np.random.default_rng(2)
    hu = rng.normal(0.0, 300.0, size=(5, 12, 10)).astype(np.float32)
    hu[0, 0, 0] = -2000.0
    folder = tmp_path / "series"
    imaging.write_dicom_series(Volume(hu, (2.5, 0.7, 0.8), (10.0, -5.0, 3.0)), folder, patient_id="p1",
                               study_uid="1.2.3", series_uid="1.2.3.4", study_datetime=date(2020, 1, 2),
                               institution_name="site")
    fast = imaging.load_volume(folder)
    monkeypatch.setattr(imaging, "_stored_pixels", lambda ds: ds.pixel_array)
    reference = imaging.load_volume(folder)
    assert fast.hu.dtype == reference.hu.dtype and np.array_equal(fast.hu, reference.hu)
    assert (fast.spacing, fast.origin) == (reference.spacing, reference.origin)
