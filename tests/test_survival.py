from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import CoxPHFitter

from helpers.survival import (
    BreslowBaseline,
    MLPHead,
    NoEventsError,
    cox_loss,
    event_stratified_batches,
    hidden_widths,
)


def test_cox_loss_refuses_a_batch_without_events():
    with pytest.raises(NoEventsError, match="no event"):
        cox_loss(torch.zeros(4), torch.zeros(4, dtype=torch.bool), torch.arange(1.0, 5.0))


def test_cox_loss_checks_shapes():
    with pytest.raises(ValueError, match="Dimension mismatch"):
        cox_loss(torch.zeros(4), torch.ones(3, dtype=torch.bool), torch.arange(1.0, 5.0))


def test_cox_loss_matches_lifelines_log_likelihood():
    """At lifelines' fitted coefficients, torchsurv's Efron partial likelihood (times n, as it
    reports the mean) equals lifelines' log-likelihood (lifelines 0.30.3, Efron ties)."""
    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=(n, 2))
    time = np.round(rng.exponential(scale=np.exp(-x @ [0.7, -0.4])) * 20) + 1  # integer days: ties
    event = rng.random(n) < 0.7
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "T": time, "E": event.astype(int)})
    cph = CoxPHFitter().fit(df, "T", "E")
    log_hz = torch.as_tensor(x @ cph.params_.to_numpy(), dtype=torch.float64)
    ours = -float(cox_loss(log_hz, torch.as_tensor(event), torch.as_tensor(time))) * event.sum()
    assert ours == pytest.approx(cph.log_likelihood_, rel=1e-6)


@settings(deadline=None, max_examples=60)
@given(
    events=st.lists(st.booleans(), min_size=2, max_size=300).filter(any),
    batch_size=st.integers(2, 64),
    seed=st.integers(0, 2**16),
)
def test_event_stratified_batches_partition_and_hold_events(events, batch_size, seed):
    event = np.array(events)
    batches = event_stratified_batches(event, batch_size, np.random.default_rng(seed))
    together = np.sort(np.concatenate(batches))
    assert together.tolist() == list(range(len(event)))
    assert all(event[b].any() for b in batches)


def test_event_stratified_batches_refuse_no_events():
    with pytest.raises(NoEventsError):
        event_stratified_batches(np.zeros(10), 4, np.random.default_rng(0))


def test_hidden_widths_scale_with_the_input():
    assert hidden_widths(1024) == [512, 256]
    assert hidden_widths(1792) == [512, 448]
    assert hidden_widths(8) == [16, 16]
    assert isinstance(MLPHead(10, []).net[0], torch.nn.Linear)


def test_breslow_survival_matches_lifelines():
    """lifelines' baseline (Breslow, on centred covariates) gives the same S(t | x)."""
    rng = np.random.default_rng(1)
    n = 400
    x = rng.normal(size=(n, 2))
    time = np.round(rng.exponential(scale=np.exp(-x @ [0.5, 0.3])) * 100) + 1
    event = rng.random(n) < 0.6
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "T": time, "E": event.astype(int)})
    cph = CoxPHFitter().fit(df, "T", "E")
    log_hz = (x - x.mean(0)) @ cph.params_.to_numpy()
    baseline = BreslowBaseline(log_hz, time, event)
    for t in (5.0, 50.0, 120.0):
        expected = cph.predict_survival_function(df[["a", "b"]], times=[t]).to_numpy().ravel()
        np.testing.assert_allclose(baseline.survival(log_hz, t), expected, rtol=1e-6, atol=1e-9)
    assert baseline.survival(log_hz, 0.0).min() == 1.0


def test_adam_takes_the_same_steps_as_torch_adam():
    from helpers.survival import Adam

    torch.manual_seed(0)
    ours, ref = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    ref.load_state_dict(ours.state_dict())
    frozen = torch.nn.Parameter(torch.ones(2))  # never gets a gradient: skipped by both
    a, b = Adam(list(ours.parameters()) + [frozen], lr=0.01), torch.optim.Adam(list(ref.parameters()) + [frozen], lr=0.01)
    x = torch.randn(16, 5)
    for step in range(30):
        for model, opt in ((ours, a), (ref, b)):
            opt.zero_grad()
            out = model(x * (1 + step % 3))
            (out.square().mean() + (0.0 if step % 4 else 1e-3 * out.sum())).backward()
            opt.step()
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q), step
    assert torch.equal(frozen, torch.ones(2))
