from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from lifelines import CoxPHFitter
from sksurv.datasets import load_gbsg2

from helpers.fusion import build_model
from helpers.metrics import harrell_c
from helpers.training import Arrays, TrainConfig, fit, make_predictions, predict


def _toy(n: int, seed: int) -> Arrays:
    rng = np.random.default_rng(seed)
    img = rng.normal(size=(n, 6)).astype(np.float32)
    ehr = rng.binomial(1, 0.3, size=(n, 5)).astype(np.float32)
    log_hz = img[:, 0] + ehr[:, 0] - 0.5 * img[:, 1]
    time = rng.exponential(np.exp(-log_hz)) * 100 + 0.5
    censor = rng.exponential(150, size=n)
    return Arrays(img, ehr, np.minimum(time, censor), (time <= censor).astype(int))


def test_same_seed_gives_identical_predictions():
    train, val = _toy(300, 0), _toy(100, 1)
    config = TrainConfig(max_epochs=8, batch_size=64)
    a = fit("concat", train, val, config=config, seed=7)
    b = fit("concat", train, val, config=config, seed=7)
    assert np.array_equal(predict(a.model, val), predict(b.model, val))
    c = fit("concat", train, val, config=config, seed=8)
    assert not np.array_equal(predict(a.model, val), predict(c.model, val))


def test_training_learns_the_signal_and_uses_only_its_modality():
    train, val = _toy(600, 2), _toy(300, 3)
    result = fit("image_only", train, val, config=TrainConfig(max_epochs=40, batch_size=128), seed=0)
    c = harrell_c(time=val.time, event=val.event, risk=predict(result.model, val))
    assert c > 0.65
    blind = Arrays(val.img, None, val.time, val.event)
    assert np.array_equal(predict(result.model, blind), predict(result.model, val))
    assert result.best_epoch >= 1 and len(result.history) >= result.best_epoch


def test_make_predictions_covers_every_split():
    train, val = _toy(200, 4), _toy(80, 5)
    result = fit("ehr_only", train, val, config=TrainConfig(max_epochs=3), seed=0)
    ids = {"train": np.array([f"t{i}" for i in range(200)]), "val": np.array([f"v{i}" for i in range(80)])}
    preds, scores = make_predictions(result.model, {"train": (ids["train"], train), "val": (ids["val"], val)}, 365)
    assert list(preds.columns) == ["study_id", "split", "risk", "survival_365d"]
    assert len(preds) == 280 and preds["survival_365d"].between(0, 1).all()
    assert set(scores) == {"train", "val"} and 0 < scores["val"]["c_index"] < 1


def test_unknown_or_unavailable_fusion_is_named():
    with pytest.raises(ValueError, match="parameter 'fusion': unknown value 'late'"):
        build_model("late", 4, 4)
    with pytest.raises(ValueError, match="parameter 'd_token': attention strategies with image_tokens='slices'"):
        build_model("cross_attention", 4, 4)


def test_linear_cox_matches_lifelines_on_gbsg2():
    """Reference check (lifelines 0.30.3, scikit-survival 0.28.0's GBSG2 data): a linear Cox
    head without hidden layer trained with torchsurv's loss reaches lifelines' CoxPHFitter
    test C-index within 0.01. Both are fitted on the same 70% of patients."""
    x, y = load_gbsg2()
    x = pd.get_dummies(x, drop_first=True, dtype=float)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(x))
    train_idx, test_idx = order[: int(0.7 * len(x))], order[int(0.7 * len(x)):]
    time = y["time"].astype(float)
    event = y["cens"].astype(int)
    mean, std = x.iloc[train_idx].mean(), x.iloc[train_idx].std()
    z = ((x - mean) / std).to_numpy(np.float32)
    df = pd.DataFrame(z, columns=x.columns).assign(T=time, E=event)
    cph = CoxPHFitter().fit(df.iloc[train_idx], "T", "E")
    c_ref = harrell_c(time=time[test_idx], event=event[test_idx], risk=cph.predict_log_partial_hazard(df.iloc[test_idx]).to_numpy())
    train = Arrays(None, z[train_idx], time[train_idx], event[train_idx])
    test = Arrays(None, z[test_idx], time[test_idx], event[test_idx])
    config = TrainConfig(lr=0.02, l2=0.0, batch_size=len(train_idx), max_epochs=300, patience=300, dropout=0.0, linear=True)
    torch.manual_seed(0)
    result = fit("ehr_only", train, train, config=config, seed=0)
    c_ours = harrell_c(time=test.time, event=test.event, risk=predict(result.model, test))
    assert abs(c_ours - c_ref) < 0.01, (c_ours, c_ref)


def test_early_stopping_on_the_validation_c_index():
    train, val = _toy(300, 10), _toy(120, 11)
    result = fit("concat", train, val, config=TrainConfig(max_epochs=12, patience=3, stop_on="c_index"), seed=0)
    history = result.history
    assert result.best_epoch == int(history.loc[history["val_c_index"].idxmax(), "epoch"])
    with pytest.raises(ValueError, match="parameter 'stop_on': unknown value 'auc'"):
        fit("concat", train, val, config=TrainConfig(stop_on="auc"), seed=0)


def test_train_config_takes_options_and_keeps_the_declared_defaults():
    from helpers.tasks import ParameterError
    from helpers.training import TrainConfig, train_config

    config = train_config({"lr": 0.003, "max_epochs": 5}, ehr_repr="clmbr")
    assert config.lr == 0.003 and config.max_epochs == 5 and config.l2 == TrainConfig.l2
    assert config.ehr_tokens == "chunk", "CLMBR vectors are cut in chunks (helpers.tasks.EHR_REPRESENTATIONS)"
    assert train_config({}, ehr_repr="onehot").ehr_tokens == "feature"
    assert train_config({"ehr_tokens": "feature"}, ehr_repr="clmbr").ehr_tokens == "feature"
    with pytest.raises(ParameterError, match="training option\\(s\\) 'learning_rate' unknown"):
        train_config({"learning_rate": 0.1})
    with pytest.raises(ParameterError, match="parameter 'loss': unknown value 'hinge'"):
        train_config({"loss": "hinge"})
    with pytest.raises(ParameterError, match="parameter 'max_epochs': expected an integer"):
        train_config({"max_epochs": 2.5})
