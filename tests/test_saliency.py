"""Saliency: attribution shapes, gradients through the frozen encoder, a planted model, the
randomisation check, localisation and the parameter checks (helpers.saliency)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import saliency as S
from helpers.encoders import SlicePreprocess
from helpers.encoders.randconv import RandomConvEncoder
from helpers.fusion import build_model
from helpers.tasks import ParameterError

torch.set_num_threads(1)

# randconv's default layout: 4 * 8 * 2**2 convolution features, then 16 bins x 8 x 8 cells
_CONV = 4 * 8 * 2**2
_BINS, _GRID, _SIZE = 16, 8, 64
_CELL = (2, 5)  # the planted model's cell (row, column) of the 8 x 8 histogram grid


def _slices(n: int = 2, t: int = 3, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand((n, t, 1, _SIZE, _SIZE), generator=gen)


def _planted() -> S.CTRisk:
    """image_only with a linear head that reads only the histogram of one cell of the grid:
    its risk depends on the pixels of that cell (and, through the histograms' 1-pixel blur,
    on a 3-pixel margin around it) and on nothing else."""
    encoder = RandomConvEncoder(seed=0)
    model = build_model("image_only", encoder.dim, 0, linear=True, dropout=0.0)
    weight = torch.zeros(encoder.dim)
    r, c = _CELL
    for b in range(_BINS):
        weight[_CONV + b * _GRID * _GRID + r * _GRID + c] = (b - _BINS / 2) / _BINS  # brighter cell: higher risk
    with torch.no_grad():
        model.head.net[-1].weight.copy_(weight[None])
        model.head.net[-1].bias.zero_()
    model.eval()
    model.requires_grad_(False)
    return S.CTRisk(encoder, model).eval()


def _cell_region(margin: int) -> np.ndarray:
    size = _SIZE // _GRID
    r, c = _CELL
    region = np.zeros((_SIZE, _SIZE), np.float32)
    region[max(0, r * size - margin):(r + 1) * size + margin, max(0, c * size - margin):(c + 1) * size + margin] = 1
    return region


@pytest.mark.parametrize("method", S.METHODS)
def test_attributions_have_the_shape_of_the_input(method: str) -> None:
    risk = _planted()
    slices = _slices()
    out = S.attribute(risk, slices, method=method, baseline=0.0, n_steps=4, n_samples=2, patch=16)
    assert out.shape == (2, 3, _SIZE, _SIZE) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.abs().sum() > 0


def test_gradients_reach_the_voxels_through_the_frozen_encoder_and_change_no_weight() -> None:
    encoder = RandomConvEncoder(seed=3)
    model = build_model("cross_attention", encoder.dim, 5, d_token=encoder.dim, d_model=8)
    gen = torch.Generator().manual_seed(0)
    tokens, ehr = torch.randn(6, 3, encoder.dim, generator=gen), torch.randn(6, 5, generator=gen)
    model.fit_standardisation(tokens.mean(1), ehr, tokens)
    model.eval()
    risk = S.CTRisk(encoder, model.requires_grad_(False))
    before = (S.weights_digest(encoder), S.weights_digest(model))
    slices = _slices(2, 3)
    grad = S.attribute(risk, slices, ehr[:2], method="gradient", baseline=0.0)
    assert grad.shape == (2, 3, _SIZE, _SIZE)
    assert (grad.flatten(1) > 0).sum(1).min() > 100  # many voxels of every case get a gradient
    assert (S.weights_digest(encoder), S.weights_digest(model)) == before
    assert all(p.grad is None for p in list(encoder.parameters()) + list(model.parameters()))
    # the EHR is an input of the fusion: another patient's EHR changes the map
    other = S.attribute(risk, slices, ehr[2:4], method="gradient", baseline=0.0)
    assert not torch.allclose(grad, other)
    # the risk from the CT equals the model's risk on the encoder's tokens (what training saw)
    with torch.no_grad():
        toks = torch.stack([encoder(v) for v in slices])
        direct = model.risk(model(toks.mean(1), ehr[:2], img_tokens=toks))
        assert torch.allclose(risk(slices, ehr[:2]), direct, atol=1e-6)


@pytest.mark.parametrize("method", S.GRADIENT_METHODS)
def test_a_planted_model_puts_its_attribution_on_its_region(method: str) -> None:
    risk = _planted()
    slices = _slices(3, 2, seed=1)
    maps = S.attribute(risk, slices, method=method, baseline=0.0, n_steps=32, n_samples=8, noise=0.05).numpy()
    region = np.broadcast_to(_cell_region(margin=3), maps.shape[1:])
    inner = np.broadcast_to(_cell_region(margin=0), maps.shape[1:])
    for case in maps:
        measured = S.localisation(case, region)
        # the cell is 1.6% of the input (3.5% with its margin), and holds nearly all the mass
        assert measured["mass"] > 0.99, measured
        assert measured["hit"] == 1.0
        assert S.localisation(case, inner)["mass"] > 0.6
    # integrated gradients is complete: its sum is the change of risk from the baseline
    if method == "integrated_gradients":
        with torch.no_grad():
            change = risk(slices) - risk(torch.zeros_like(slices))
        assert np.allclose(maps.sum(axis=(1, 2, 3)), change.numpy(), atol=0.02 * float(change.abs().max()))


def test_randomising_head_and_fusion_weights_changes_the_map() -> None:
    risk = _planted()
    random_model = S.randomised_copy(risk.model, seed=1)
    assert S.weights_digest(random_model) != S.weights_digest(risk.model)
    for name, buffer in risk.model.named_buffers():  # the scaler's statistics are kept
        assert torch.equal(buffer, dict(random_model.named_buffers())[name])
    slices = _slices(2, 2)
    trained = S.attribute(risk, slices, method="gradient", baseline=0.0).numpy()
    randomised = S.attribute(S.CTRisk(risk.encoder, random_model), slices, method="gradient", baseline=0.0).numpy()
    assert S.rank_correlation(trained[0], trained[0]) == pytest.approx(1.0)
    assert S.rank_correlation(trained[0], randomised[0]) < 0.5
    # the randomised model no longer looks at the planted cell
    region = np.broadcast_to(_cell_region(margin=3), trained.shape[1:])
    assert S.localisation(randomised[0], region)["mass"] < 0.5


def test_localisation_against_a_reference_computation() -> None:
    gen = np.random.default_rng(0)
    attribution = gen.normal(size=(2, 8, 8))
    occupancy = np.clip(gen.normal(size=(2, 8, 8)), 0, 1)
    got = S.localisation(attribution, occupancy)
    a = np.abs(attribution)
    assert got["mass"] == pytest.approx(float(np.sum(a * occupancy) / np.sum(a)))
    assert got["area"] == pytest.approx(float(occupancy.mean()))
    assert got["enrichment"] == pytest.approx(got["mass"] / got["area"])
    assert got["hit"] == float(occupancy.ravel()[np.argmax(a)] > 0)
    # an empty region is not a zero: it is no measurement
    assert np.isnan(S.localisation(attribution, np.zeros_like(occupancy))["mass"])
    with pytest.raises(ValueError, match="Dimension mismatch"):
        S.localisation(attribution, occupancy[:1])


def test_region_occupancy_follows_the_slices_geometry() -> None:
    prep = SlicePreprocess(window_hu=(-125.0, 225.0), n_slices=4, size=32, fov_mm=400.0, slab_mm=5.0)
    region = np.zeros((10, 64, 64), bool)
    region[:, 16:48, 16:48] = True  # 32 x 32 voxels of 6 mm: 192 mm square, centred
    occupancy = S.region_occupancy(region, (5.0, 6.0, 6.0), prep)
    assert occupancy.shape == (4, 32, 32) and occupancy.min() >= 0 and occupancy.max() <= 1
    # area preserved: the 400 mm field of view at 32 pixels is 12.5 mm a pixel
    area_mm2 = occupancy[0].sum() * 12.5**2
    assert area_mm2 == pytest.approx(192.0**2, rel=0.03)
    # a slab through the region's edge in z is partly occupied
    region[5:] = False
    partial = S.region_occupancy(region, (5.0, 6.0, 6.0), prep)
    assert partial[0].max() == pytest.approx(1.0) and partial[-1].max() == pytest.approx(0.0)


def test_air_baseline_in_each_task_window() -> None:
    assert S.air_baseline((-1350.0, 150.0)) == pytest.approx(350 / 1500)
    assert S.air_baseline((-125.0, 225.0)) == 0.0


def test_parameter_checks_name_the_allowed_values() -> None:
    with pytest.raises(ParameterError, match="parameter 'method': unknown value 'lime'; expected one of gradient, "
                                             "smoothgrad, integrated_gradients, occlusion"):
        S.check_parameters("concat", "lime", 4)
    with pytest.raises(ParameterError, match="'ehr_only' has no image input"):
        S.check_parameters("ehr_only", "gradient", 4)
    with pytest.raises(ParameterError, match="'image_only' is the reference"):
        S.check_parameters("image_only", "gradient", 4)
    with pytest.raises(ParameterError, match="parameter 'fusion': unknown value 'late'"):
        S.check_parameters("late", "gradient", 4)
    with pytest.raises(ParameterError, match="n_cases"):
        S.check_parameters("concat", "gradient", 0)
    with pytest.raises(ParameterError, match="no image input"):
        S.CTRisk(RandomConvEncoder(seed=0), build_model("ehr_only", 0, 5))


def test_a_non_differentiable_encoder_is_refused_for_gradients() -> None:
    class PNGEncoder(RandomConvEncoder):
        def describe(self) -> dict:
            return {"differentiable": False}

    risk = _planted()
    risk.encoder = PNGEncoder(seed=0)
    with pytest.raises(ParameterError, match="not differentiable; use 'occlusion'"):
        S.attribute(risk, _slices(1, 1), method="smoothgrad", baseline=0.0)
    out = S.attribute(risk, _slices(1, 1), method="occlusion", baseline=0.0, patch=16)
    assert out.shape == (1, 1, _SIZE, _SIZE)


def test_a_saved_run_loads_back_to_the_same_model(tmp_path) -> None:
    from dataclasses import asdict

    from helpers.training import TrainConfig

    config = TrainConfig(d_model=8)
    model = build_model("coattn_ehr_guided", 20, 6, d_token=20, **config.model_options())
    gen = torch.Generator().manual_seed(0)
    tokens, ehr = torch.randn(5, 4, 20, generator=gen), torch.randn(5, 6, generator=gen)
    model.fit_standardisation(tokens.mean(1), ehr, tokens)
    params = {"fusion": "coattn_ehr_guided", "config": asdict(config)}
    torch.save({"state_dict": model.state_dict(), "params": params}, tmp_path / "model.pt")
    (tmp_path / "params.json").write_text(json.dumps(params))
    loaded, got = S.load_model(tmp_path)
    model.eval()
    assert got["fusion"] == "coattn_ehr_guided"
    assert not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        assert torch.equal(model(tokens.mean(1), ehr, img_tokens=tokens), loaded(tokens.mean(1), ehr, img_tokens=tokens))
    with pytest.raises(FileNotFoundError, match="train the run first"):
        S.load_model(tmp_path / "nothing")


def test_select_cases_counts_every_step() -> None:
    import pandas as pd

    cohort = pd.DataFrame({"study_id": [f"s{i}" for i in range(8)], "split": ["test"] * 6 + ["train"] * 2,
                           "time": np.arange(1.0, 9.0), "event": [1, 1, 0, 1, 1, 0, 1, 1]})
    risk_a = pd.Series(np.arange(8.0), index=cohort["study_id"])
    risk_b = pd.Series(np.arange(8.0)[::-1].copy(), index=cohort["study_id"])
    cases, counts = S.select_cases(cohort, {"a": risk_a, "b": risk_a * 2}, n_cases=2,
                                   ehr_present=pd.Index(["s0", "s1", "s3"]))
    assert cases["study_id"].tolist() == ["s3", "s1"]  # highest risk among the test events with EHR
    assert counts["studies"].tolist() == [6, 4, 3, 2]
    cases, _ = S.select_cases(cohort, {"a": risk_a, "b": risk_b}, n_cases=10)
    assert len(cases) == 4 and set(cases["study_id"]) == {"s0", "s1", "s3", "s4"}
    # a study whose CT the extraction left out is no case
    cases, counts = S.select_cases(cohort, {"a": risk_a}, n_cases=10, ehr_present=pd.Index(["s0", "s1", "s3"]),
                                   image_present=pd.Index(["s0", "s1", "s4"]))
    assert cases["study_id"].tolist() == ["s1", "s0"]
    assert counts["step"].tolist()[2:4] == ["with a readable CT", "with an EHR embedding"]
    assert counts["studies"].tolist() == [6, 4, 3, 2, 2]


def test_summaries_match_a_direct_bootstrap() -> None:
    import pandas as pd

    gen = np.random.default_rng(1)
    rows = []
    for model, shift in (("image_only", 0.0), ("concat", 0.2)):
        for case in range(1, 13):
            mass = float(np.clip(0.2 + shift + gen.normal(0, 0.05), 0, 1))
            rows.append({"case": case, "model": model, "region": "lesion", "mass": mass, "area": 0.05,
                         "enrichment": mass / 0.05, "hit": float(mass > 0.3)})
    rows.append({"case": 13, "model": "concat", "region": "lesion", "mass": np.nan, "area": np.nan,
                 "enrichment": np.nan, "hit": np.nan})
    summary, paired = S.summarise(pd.DataFrame(rows), fusion="concat", n_boot=300, seed=0)
    concat = summary.set_index("model").loc["concat"]
    assert concat["cases"] == 12 and concat["no region"] == 1
    assert concat["mass"] == pytest.approx(np.mean([r["mass"] for r in rows[12:24]]))
    assert concat["mass_lower"] < concat["mass"] < concat["mass_upper"]
    mass = paired.set_index("measure").loc["mass"]
    assert mass["difference"] == pytest.approx(0.2, abs=0.05) and mass["lower"] > 0 and mass["p_value"] < 0.05


def test_saliency_reaches_the_voxels_through_a_transformers_backbone(tmp_path) -> None:
    """The same path through an ``hf`` encoder (a tiny local ViT): attributions of the input's
    shape, the encoder unchanged."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    from helpers.encoders import image_encoder
    from helpers.manifest import EncoderSpec

    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64)).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3,
                      image_std=[0.25] * 3).save_pretrained(tmp_path / "vit")
    encoder = image_encoder("vit", EncoderSpec(kind="hf", path=tmp_path / "vit"))
    model = build_model("concat", encoder.dim, 4)
    slices = torch.rand((2, 3, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled = torch.stack([encoder(v) for v in slices]).mean(1)
    ehr = torch.randn(2, 4, generator=torch.Generator().manual_seed(1))
    model.fit_standardisation(pooled, ehr)
    risk = S.CTRisk(encoder, model.eval().requires_grad_(False))
    before = S.weights_digest(encoder)
    maps = S.attribute(risk, slices, ehr, method="integrated_gradients", baseline=0.0, n_steps=8)
    assert maps.shape == (2, 3, 32, 32) and maps.abs().sum() > 0
    assert S.weights_digest(encoder) == before


def test_the_reading_across_strategies_counts_each_way() -> None:
    import pandas as pd

    rows = [{"task": "pe", "region": "lesion", "fusion": f, "lower": lo, "upper": hi}
            for f, lo, hi in (("concat", -0.1, -0.01), ("cross_attention", -0.02, 0.03), ("contrastive", 0.01, 0.2))]
    text = S.localisation_reading(pd.DataFrame(rows))
    assert text == ("- **PE, emboli**: of 3 strategies, 1 put more of their map there than image-only (Contrastive "
                    "learning), 1 less (Concatenation), and 1 shows no difference.")
    assert S.localisation_reading(pd.DataFrame()) == "No saliency run was found."
