from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from helpers.fusion import (
    TOKEN_FUSIONS,
    CrossAttention,
    build_model,
    info_nce,
    retrieval_accuracy,
)
from helpers.survival import weibull_loss, weibull_survival
from helpers.tasks import FUSIONS
from helpers.training import (
    Arrays,
    TrainConfig,
    alignment_report,
    fit,
    make_predictions,
    missing_counts,
    predict,
)

D_IMG, D_EHR, T, D_TOK = 12, 7, 5, 12


def _inputs(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(n, T, D_TOK, generator=g)
    return {"img": tokens.mean(1), "ehr": torch.bernoulli(torch.full((n, D_EHR), 0.3), generator=g),
            "img_tokens": tokens}


def _model(fusion: str, **options):
    torch.manual_seed(0)
    model = build_model(fusion, D_IMG, D_EHR, d_token=D_TOK, d_model=16, heads=2, proj_dim=8, **options)
    x = _inputs(64, 99)
    model.fit_standardisation(x["img"], x["ehr"], x["img_tokens"])
    return model.eval()


def _call(model, x: dict) -> torch.Tensor:
    return model(x["img"], x["ehr"], **{k: v for k, v in x.items() if k not in ("img", "ehr")})


def _toy(n: int, seed: int, *, shared: bool = False) -> Arrays:
    rng = np.random.default_rng(seed)
    tokens = rng.normal(size=(n, T, D_TOK)).astype(np.float32)
    img = tokens.mean(1)
    if shared:  # EHR is a linear map of the image embedding
        ehr = (img @ _MAP).astype(np.float32)
    else:
        ehr = rng.binomial(1, 0.3, size=(n, D_EHR)).astype(np.float32)
    log_hz = 2 * img[:, 0] + ehr[:, 0]
    time = rng.exponential(np.exp(-log_hz)) * 100 + 0.5
    censor = rng.exponential(150, size=n)
    return Arrays(img, ehr, np.minimum(time, censor), (time <= censor).astype(int), img_tokens=tokens)


_MAP = np.random.default_rng(123).normal(size=(D_TOK, D_EHR)).astype(np.float32)
_FAST = TrainConfig(max_epochs=4, batch_size=64, align_epochs=4, d_model=16, proj_dim=8)


@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("loss", ["cox", "weibull"])
def test_output_shapes(fusion, loss):
    model = _model(fusion, loss=loss)
    x = _inputs(9, 1)
    out = _call(model, x)
    assert out.shape == ((9,) if loss == "cox" else (9, 2))
    assert model.risk(out).shape == (9,) and torch.isfinite(out).all()
    expected = {"image_only": D_IMG, "ehr_only": D_EHR, "concat": D_IMG + D_EHR, "contrastive": 16,
                "cross_attention": 64, "coattn_image_guided": 32, "coattn_ehr_guided": 32}[fusion]
    assert model.fused(x["img"], x["ehr"], img_tokens=x["img_tokens"]).shape == (9, expected)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_a_study_does_not_see_the_rest_of_its_batch(fusion):
    model = _model(fusion)
    a, b = _inputs(8, 1), _inputs(8, 2)
    mixed = {k: torch.cat([a[k][:1], b[k][1:]]) for k in a}
    assert torch.equal(_call(model, a)[0], _call(model, mixed)[0])
    alone = {k: v[:1] for k, v in a.items()}
    torch.testing.assert_close(_call(model, alone)[0], _call(model, a)[0])


@pytest.mark.parametrize("ehr_tokens", ["feature", "chunk"])
@pytest.mark.parametrize("image_tokens", ["slices", "chunk"])
def test_attention_weights_are_distributions_over_each_studys_tokens(ehr_tokens, image_tokens):
    model = _model("cross_attention", ehr_tokens=ehr_tokens, ehr_chunks=3, image_tokens=image_tokens, image_chunks=4)
    x = _inputs(6, 3)
    _, weights = model.fused(x["img"], x["ehr"], img_tokens=x["img_tokens"], return_attention=True)
    n_img = T if image_tokens == "slices" else 4
    n_ehr = D_EHR if ehr_tokens == "feature" else 3
    assert weights["ehr<-img"].shape == (6, 2, n_ehr, n_img)
    assert weights["img<-ehr"].shape == (6, 2, n_img, n_ehr)
    for w in weights.values():
        torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))


def test_padded_tokens_get_no_attention_and_single_tokens_are_refused():
    attn = CrossAttention(8, heads=1)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    out, w = attn(q, kv, mask)
    assert torch.all(w[0, :, :, 2:] == 0) and out.shape == (2, 3, 8)
    # the output equals the same attention computed over the valid keys only
    torch.testing.assert_close(attn(q[:1], kv[:1, :2])[0], out[:1])
    # scaling by sqrt(d_k): one head, identity projections
    for layer in (attn.w_q, attn.w_k, attn.w_v):
        torch.nn.init.eye_(layer.weight)
    _, w = attn(q, kv)
    torch.testing.assert_close(w[:, 0], torch.softmax(q @ kv.transpose(1, 2) / math.sqrt(8), dim=-1))
    with pytest.raises(ValueError, match="attention over 1 key token"):
        attn(q, kv[:, :1])
    with pytest.raises(ValueError, match="number of chunks must be between 2"):
        build_model("cross_attention", D_IMG, D_EHR, d_token=D_TOK, ehr_tokens="chunk", ehr_chunks=1)


def test_info_nce_matches_a_hand_computation_and_is_symmetric():
    h_img = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    h_ehr = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    tau = 0.5
    unit = lambda v: np.asarray(v) / np.linalg.norm(v)  # noqa: E731
    s = np.array([[unit(a) @ unit(b) / tau for b in h_ehr.numpy()] for a in h_img.numpy()])
    rows = [s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(3)]
    cols = [s[i, i] - np.log(np.exp(s[:, i]).sum()) for i in range(3)]
    expected = -(sum(rows) + sum(cols)) / 3
    assert float(info_nce(h_img, h_ehr, tau)) == pytest.approx(expected, rel=1e-6)
    assert float(info_nce(h_ehr, h_img, tau)) == pytest.approx(expected, rel=1e-6)
    assert float(info_nce(2 * h_img, h_ehr, tau)) == pytest.approx(expected, rel=1e-6)


def test_contrastive_alignment_retrieves_the_right_ehr():
    """EHR = a fixed linear map of the image embedding: after step 1 each held-out image
    finds its own EHR among 100 (chance 1%)."""
    train, val, test = _toy(600, 1, shared=True), _toy(100, 2, shared=True), _toy(100, 3, shared=True)
    config = TrainConfig(max_epochs=2, batch_size=128, align_epochs=60, patience=60, proj_dim=16, l2=0.0)
    result = fit("contrastive", train, val, config=config, seed=0)
    report = alignment_report(result.model, test)
    assert report["n"] == 100 and report["chance"] == 0.01
    assert report["top1"] > 0.9, report
    assert result.alignment["val_top1"].iloc[-1] > 0.9
    assert float(result.model.temperature) != pytest.approx(0.07)  # learnable by default
    fixed = fit("contrastive", train, val, config=TrainConfig(**{**config.__dict__, "learn_temperature": False,
                                                                 "align_epochs": 3}), seed=0)
    assert float(fixed.model.temperature) == pytest.approx(0.07)


@pytest.mark.parametrize("finetune", [False, True])
def test_gradients_reach_only_the_fusion_and_head(finetune):
    train, val = _toy(200, 4), _toy(100, 5)
    config = TrainConfig(**{**_FAST.__dict__, "finetune_projection": finetune})
    model = fit("contrastive", train, val, config=config, seed=0).model
    x = {k: v.requires_grad_(False) for k, v in _inputs(16, 6).items()}
    model.train()
    _call(model, x).sum().backward()
    for k in ("img", "ehr", "img_tokens"):
        assert x[k].grad is None
    projections = {id(p) for p in model.projection_parameters()}
    for name, p in model.named_parameters():
        if id(p) in projections:
            # tau is not part of the survival objective: no gradient in step 2 either way
            assert (p.grad is not None) == (finetune and name != "logit_scale"), name
            assert p.requires_grad == finetune
        elif name.startswith("head."):
            assert p.grad is not None, name
    assert not any(b.requires_grad for b in model.buffers())


@pytest.mark.parametrize("fusion", FUSIONS)
def test_same_seed_gives_identical_predictions(fusion):
    train, val = _toy(160, 7), _toy(60, 8)
    a = fit(fusion, train, val, config=_FAST, seed=3)
    b = fit(fusion, train, val, config=_FAST, seed=3)
    assert np.array_equal(predict(a.model, val), predict(b.model, val))


@pytest.mark.parametrize("fusion", ["concat", "cross_attention"])
def test_weibull_gives_finite_risk_and_survival_in_the_unit_interval(fusion):
    train, val = _toy(200, 9), _toy(80, 10)
    result = fit(fusion, train, val, config=TrainConfig(**{**_FAST.__dict__, "loss": "weibull"}), seed=0)
    ids = {"train": np.arange(200).astype(str), "val": np.arange(80).astype(str)}
    preds, scores = make_predictions(result.model, {"train": (ids["train"], train), "val": (ids["val"], val)}, 100)
    assert np.isfinite(preds["risk"]).all() and preds["survival_100d"].between(0, 1).all()
    # higher risk (shorter median time) goes with lower survival at the horizon
    assert np.corrcoef(preds["risk"], preds["survival_100d"])[0, 1] < 0
    assert scores["val"]["c_index"] is not None


def test_weibull_pieces_match_the_closed_form():
    log_params = torch.tensor([[5.0, 0.0], [6.0, math.log(2.0)]], dtype=torch.float64)
    time = torch.tensor([100.0, 200.0], dtype=torch.float64)
    event = torch.tensor([True, False])
    # event: -log h(t) + H(t) with h = 1/e^5 (exponential); censored: H(t) = (200/e^6)^2
    expected = 5 + 100 / math.exp(5) + (200 / math.exp(6)) ** 2
    assert float(weibull_loss(log_params, event, time)) == pytest.approx(expected)
    np.testing.assert_allclose(weibull_survival(log_params, 100.0).numpy(),
                               [math.exp(-100 / math.exp(5)), math.exp(-((100 / math.exp(6)) ** 2))])


@pytest.mark.parametrize("fusion", ["concat", "contrastive", "coattn_ehr_guided", "ehr_only"])
def test_studies_without_a_modality_are_scored_and_counted(fusion):
    train, val = _toy(200, 11), _toy(80, 12)
    rng = np.random.default_rng(0)
    for data in (train, val):
        data.img_missing = rng.random(len(data)) < 0.2
        data.ehr_missing = ~data.img_missing & (rng.random(len(data)) < 0.2)
        data.img[data.img_missing] = np.nan  # the values of a missing modality are never used
        data.img_tokens[data.img_missing] = np.nan
        data.ehr[data.ehr_missing] = np.nan
    result = fit(fusion, train, val, config=_FAST, seed=0)
    risk = predict(result.model, val)
    assert np.isfinite(risk).all()
    varies = lambda mask: len(np.unique(risk[mask])) > 1  # noqa: E731
    if fusion in ("concat", "contrastive"):
        assert varies(val.img_missing) and varies(val.ehr_missing)  # each scored from the other modality
    if fusion == "coattn_ehr_guided":
        # fused = concat(h_img, A): the EHR only steers attention over image tokens, so a study
        # without a CT gets one constant score, while one without EHR is scored from its CT
        assert not varies(val.img_missing) and varies(val.ehr_missing)
    counts = missing_counts({"train": (None, train), "val": (None, val)})
    assert counts["val"] == {"n": 80, "no_image": int(val.img_missing.sum()), "no_ehr": int(val.ehr_missing.sum())}


def test_modality_dropout_only_in_training_and_only_for_bimodal_models():
    model = _model("concat", modality_dropout=0.3)
    x = _inputs(400, 13)
    model.train()
    torch.manual_seed(0)
    img_m, ehr_m = model._missing(400, None, None, torch.device("cpu"))
    assert 0.2 < float(img_m.double().mean()) < 0.4 and 0.2 < float(ehr_m.double().mean()) < 0.4
    assert not (img_m & ehr_m).any()
    model.eval()
    assert not any(m.any() for m in model._missing(400, None, None, torch.device("cpu")))
    assert _model("image_only", modality_dropout=0.3).modality_dropout == 0.0
    assert torch.isfinite(_call(model, x)).all()


def test_attention_strategies_need_tokens_and_name_the_options():
    assert set(TOKEN_FUSIONS) <= set(FUSIONS)
    with pytest.raises(ValueError, match="parameter 'ehr_tokens': unknown value 'words'"):
        build_model("cross_attention", D_IMG, D_EHR, d_token=D_TOK, ehr_tokens="words")
    with pytest.raises(ValueError, match="parameter 'loss': unknown value 'aft'"):
        build_model("concat", D_IMG, D_EHR, loss="aft")
    train, val = _toy(100, 14), _toy(50, 15)
    val.img_tokens = None
    with pytest.raises(ValueError, match="needs per-slice image tokens; the val split has none"):
        fit("coattn_image_guided", train, val, config=_FAST, seed=0)
    assert retrieval_accuracy(torch.eye(3), torch.eye(3)) == 1.0


def test_token_columns_the_scaler_drops_are_skipped_with_the_same_risk_and_gradients():
    """Per-slice tokens are standardised once and only the kept columns reach the token
    embedding; the risk equals the full-width computation, a saved model scores raw tokens by
    itself, and the gradient reaches the raw tokens (zero on the dropped columns)."""
    from helpers.fusion import _kept_linear

    g = torch.Generator().manual_seed(5)
    x = _inputs(64, 21)
    x["img_tokens"][..., :4] = 0.25  # constant columns: dropped by the scaler
    x["img"] = x["img_tokens"].mean(1)
    model = _model("cross_attention")
    model.fit_standardisation(x["img"], x["ehr"], x["img_tokens"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))  # a non-zero missing token
    kept = model.norm_tokens.kept
    assert len(kept) == D_TOK - 4
    missing = torch.tensor([i % 5 == 0 for i in range(9)])
    raw = {k: v[:9].clone() for k, v in x.items()}
    prepared = model.prepare(raw["img"], raw["ehr"], img_tokens=raw["img_tokens"], img_missing=missing)
    assert prepared.img_tokens.shape == (9, T, D_TOK - 4) and prepared.img is None
    risk = model(raw["img"], raw["ehr"], img_tokens=raw["img_tokens"], img_missing=missing)
    assert torch.equal(risk, model.forward_prepared(prepared))
    full = model.embed_img(model._fill(model.norm_tokens(raw["img_tokens"]), missing, model.missing_token))
    torch.testing.assert_close(_kept_linear(model.embed_img, prepared.img_tokens, kept, missing, model.missing_token), full)
    # a saved model scores raw inputs by itself
    fresh = build_model("cross_attention", D_IMG, D_EHR, d_token=D_TOK, d_model=16, heads=2, proj_dim=8).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(raw["img"], raw["ehr"], img_tokens=raw["img_tokens"], img_missing=missing), risk)
    # saliency: from the risk back to the raw tokens
    tokens = raw["img_tokens"].clone().requires_grad_(True)
    model.risk(model(raw["img"], raw["ehr"], img_tokens=tokens, img_missing=missing)).sum().backward()
    grad = tokens.grad
    assert torch.isfinite(grad).all() and grad[~missing][..., 4:].abs().sum() > 0
    assert not grad[..., :4].any() and not grad[missing].any()


def test_prepared_rows_and_gather_into_a_buffer():
    model = _model("coattn_ehr_guided")
    x = _inputs(10, 4)
    p = model.prepare(x["img"], x["ehr"], img_tokens=x["img_tokens"])
    order = torch.tensor([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
    first = p.gather(order)
    again = p.gather(order.flip(0), out=first)
    assert again.img_tokens.data_ptr() == first.img_tokens.data_ptr() and len(again) == 10
    assert torch.equal(again.img_tokens, p.img_tokens[order.flip(0)]) and torch.equal(again.ehr, p.ehr[order.flip(0)])
    assert torch.equal(p.rows(slice(2, 5)).img_tokens, p.img_tokens[2:5]) and len(p.rows(slice(2, 5))) == 3


def test_blockwise_scaler_matches_a_float64_reference(monkeypatch):
    import helpers.scaling as scaling

    rng = np.random.default_rng(3)
    x = (rng.normal(size=(1001, 7)) * [1, 1e-9, 2, 0, 3, 1, 1e3] + 5).astype(np.float32)
    reference = x.astype(np.float64)
    for block in (1 << 20, 50):  # one block, and blocks that do not divide the rows
        monkeypatch.setattr(scaling, "_BLOCK_VALUES", block)
        s = scaling.fit_scaler(x)
        np.testing.assert_allclose(s.mean, reference.mean(0), rtol=1e-12)
        std = reference.std(0)
        np.testing.assert_allclose(np.where(s.keep, s.scale, std), std, rtol=1e-9)
        assert s.keep.tolist() == [True, False, True, False, True, True, True]
    bad = x.copy()
    bad[700, 2] = np.nan
    with pytest.raises(ValueError, match="holds NaN or infinite values"):
        scaling.fit_scaler(bad)
