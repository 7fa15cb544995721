"""Survival objective pieces: Cox loss, event-stratified batches, MLP head, Breslow baseline.

Risk convention: the model outputs a log-hazard (``log_hz``); higher means an earlier event.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn
from torchsurv.loss.cox import neg_partial_log_likelihood

__all__ = [
    "NoEventsError",
    "cox_loss",
    "event_stratified_batches",
    "hidden_widths",
    "MLPHead",
    "BreslowBaseline",
]


class NoEventsError(ValueError):
    """A batch or data set has no observed event, so the Cox partial likelihood is undefined."""


def cox_loss(log_hz: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Negative Cox partial log-likelihood with Efron's ties (torchsurv), divided by the
    number of events (torchsurv's own ``"mean"`` divides by the number of distinct event
    times, which makes the scale depend on ties).

    ``log_hz``, ``event`` (bool) and ``time`` (days) have shape (n,). Raises ``NoEventsError``
    on a batch without events rather than returning a silent zero.
    """
    if log_hz.ndim != 1 or log_hz.shape != event.shape or event.shape != time.shape:
        raise ValueError(
            f"Dimension mismatch: 'log_hz' {tuple(log_hz.shape)}, 'event' {tuple(event.shape)}, 'time' {tuple(time.shape)}"
        )
    if not bool(event.any()):
        raise NoEventsError(f"a batch of {len(event)} samples has no event; batches must be event-stratified")
    with warnings.catch_warnings():
        # torchsurv announces on every call with tied times that it uses the method we asked for
        warnings.filterwarnings("ignore", message="Ties in `time` detected", category=UserWarning)
        total = neg_partial_log_likelihood(log_hz, event.bool(), time, ties_method="efron", reduction="sum")
    return total / event.sum()


def event_stratified_batches(event: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``range(len(event))`` into shuffled batches of about ``batch_size`` that each hold
    at least one event, with events spread evenly over the batches.

    >>> ev = np.array([1, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    >>> batches = event_stratified_batches(ev, 4, np.random.default_rng(0))
    >>> [int(ev[b].sum()) for b in batches], sorted(np.concatenate(batches).tolist()) == list(range(10))
    ([1, 1], True)
    """
    event = np.asarray(event).astype(bool)
    n_events = int(event.sum())
    if n_events == 0:
        raise NoEventsError(f"no event among {len(event)} training samples")
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2, got {batch_size}")
    n_batches = max(1, min(n_events, int(np.ceil(len(event) / batch_size))))
    events = rng.permutation(np.flatnonzero(event))
    others = rng.permutation(np.flatnonzero(~event))
    batches = [
        np.concatenate([events[k::n_batches], others[k::n_batches]]) for k in range(n_batches)
    ]
    return [rng.permutation(batches[k]) for k in rng.permutation(n_batches)]


def hidden_widths(d_in: int, ratios: tuple[float, ...] = (0.5, 0.25), *, minimum: int = 16, maximum: int = 512) -> list[int]:
    """Hidden-layer widths proportional to the input dimension (the paper scales the MLP head
    with the embedding size), clipped to ``[minimum, maximum]``.

    >>> hidden_widths(1024), hidden_widths(40)
    ([512, 256], [20, 16])
    """
    return [int(min(maximum, max(minimum, round(d_in * r)))) for r in ratios]


class MLPHead(nn.Module):
    """MLP survival head: (n, d_in) -> log-hazard (n,). ``widths=[]`` gives a linear Cox model."""

    def __init__(self, d_in: int, widths: list[int], dropout: float = 0.1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = d_in
        for width in widths:
            layers += [nn.Linear(previous, width), nn.GELU(), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class BreslowBaseline:
    """Breslow estimate of the cumulative baseline hazard from training data, giving
    survival probabilities ``S(t | x) = exp(-H0(t) * exp(log_hz))``.

    ``log_hz``, ``time`` (days) and ``event`` are arrays of shape (n,).
    """

    def __init__(self, log_hz: np.ndarray, time: np.ndarray, event: np.ndarray) -> None:
        log_hz = np.asarray(log_hz, dtype=np.float64)
        time = np.asarray(time, dtype=np.float64)
        event = np.asarray(event).astype(bool)
        self.shift = float(log_hz.max())
        risk = np.exp(log_hz - self.shift)
        order = np.argsort(time, kind="stable")
        time, risk, event = time[order], risk[order], event[order]
        at_risk = np.cumsum(risk[::-1])[::-1]
        unique_times, first = np.unique(time, return_index=True)
        deaths = np.add.reduceat(event.astype(np.float64), first)
        self.times = unique_times
        self.cumhaz = np.cumsum(deaths / at_risk[first])

    def cumulative_hazard(self, t: float) -> float:
        """H0(t), on the scale of ``exp(log_hz - shift)``."""
        k = np.searchsorted(self.times, t, side="right")
        return float(self.cumhaz[k - 1]) if k > 0 else 0.0

    def survival(self, log_hz: np.ndarray, t: float) -> np.ndarray:
        """S(t | x) for each log-hazard, float64 array (n,) in [0, 1]."""
        return np.exp(-self.cumulative_hazard(t) * np.exp(np.asarray(log_hz, dtype=np.float64) - self.shift))
