"""Survival objective pieces: Cox and Weibull losses, event-stratified batches, MLP head,
Breslow baseline.

Risk convention: a Cox model outputs a log-hazard (``log_hz``); higher means an earlier event.
A Weibull model outputs two log-parameters per study (log scale, log shape, in days); its risk
is the negative log median time (``weibull_risk``), again higher = earlier event.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from helpers.metrics import BreslowBaseline  # numpy only, so that scoring needs no torch


def _torchsurv_package() -> None:
    """Register the ``torchsurv`` package without running its ``__init__``, which imports its
    metrics and through them torchmetrics and transformers (2.5 s of the 4 s it takes to
    import ``helpers.training``, paid by every training notebook). Only the loss modules are
    used here, and they import nothing from the package's top level. Someone who imported
    ``torchsurv`` before keeps the full package."""
    import importlib.util
    import sys

    if "torchsurv" not in sys.modules:
        spec = importlib.util.find_spec("torchsurv")
        if spec is None:
            raise ImportError("torchsurv is not installed (pip install torchsurv==0.2.0)")
        sys.modules["torchsurv"] = importlib.util.module_from_spec(spec)


_torchsurv_package()
from torchsurv.loss.cox import neg_partial_log_likelihood  # noqa: E402
from torchsurv.loss.weibull import neg_log_likelihood_weibull, survival_function_weibull  # noqa: E402

__all__ = [
    "NoEventsError",
    "LOSSES",
    "cox_loss",
    "weibull_loss",
    "weibull_risk",
    "weibull_survival",
    "event_stratified_batches",
    "hidden_widths",
    "MLPHead",
    "BreslowBaseline",
    "Adam",
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


LOSSES: tuple[str, ...] = ("cox", "weibull")


def _check_weibull(log_params: torch.Tensor, event: torch.Tensor | None = None, time: torch.Tensor | None = None) -> None:
    if log_params.ndim != 2 or log_params.shape[1] != 2:
        raise ValueError(f"'log_params' must have shape (n, 2) (log scale, log shape), got {tuple(log_params.shape)}")
    if event is not None and (event.shape != (len(log_params),) or time.shape != event.shape):
        raise ValueError(
            f"Dimension mismatch: 'log_params' {tuple(log_params.shape)}, 'event' {tuple(event.shape)}, 'time' {tuple(time.shape)}"
        )


def weibull_loss(log_params: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Weibull negative log-likelihood (torchsurv's accelerated-failure-time parametrisation,
    ``H(t) = (t / scale) ** shape``), summed over the batch and divided by the number of events
    (at least 1), so that the L2 weight has the same meaning as with ``cox_loss``.

    ``log_params`` (n, 2): log scale (days) and log shape; ``event`` (bool) and ``time``
    (days) have shape (n,). Unlike the Cox partial likelihood, the Weibull likelihood is
    defined on a batch without events (only censoring terms).

    Exponential example (shape 1): an event at 100 d gives ``5 + 100 / e**5``, a censoring at
    200 d gives ``200 / e**6``, 6.1695 in all over one event.

    >>> lp = torch.tensor([[5.0, 0.0], [6.0, 0.0]])
    >>> round(float(weibull_loss(lp, torch.tensor([True, False]), torch.tensor([100.0, 200.0]))), 4)
    6.1695
    """
    _check_weibull(log_params, event, time)
    total = neg_log_likelihood_weibull(log_params, event.bool(), time, reduction="sum")
    return total / event.sum().clamp_min(1)


def weibull_risk(log_params: torch.Tensor) -> torch.Tensor:
    """Risk of a Weibull model, (n,): minus the log of the median time to event,
    ``-(log scale + log(log 2) / shape)``; higher = earlier event."""
    _check_weibull(log_params)
    log_scale, log_shape = log_params.unbind(1)
    return -(log_scale + np.log(np.log(2.0)) * torch.exp(-log_shape))


def weibull_survival(log_params: torch.Tensor, t: float) -> torch.Tensor:
    """S(t | x) = exp(-(t / scale) ** shape) for each study, (n,) in [0, 1] (torchsurv's
    ``survival_function_weibull``); ``t`` in days."""
    _check_weibull(log_params)
    return survival_function_weibull(log_params, torch.tensor([float(t)], dtype=log_params.dtype))[:, 0]


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
    """MLP survival head: (n, d_in) -> log-hazard (n,), or (n, n_out) when ``n_out > 1`` (the
    two Weibull log-parameters). ``widths=[]`` gives a linear model."""

    def __init__(self, d_in: int, widths: list[int], dropout: float = 0.1, n_out: int = 1) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = d_in
        for width in widths:
            layers += [nn.Linear(previous, width), nn.GELU(), nn.Dropout(dropout)]
            previous = width
        layers.append(nn.Linear(previous, n_out))
        self.n_out = n_out
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.squeeze(-1) if self.n_out == 1 else out


class Adam:
    """Adam (Kingma and Ba) with torch's defaults, the same arithmetic as
    ``torch.optim.Adam(params, lr)`` on the CPU (its single-tensor path: no weight decay,
    no amsgrad), so training gives the same weights. It exists because the first
    ``torch.optim`` optimiser of a process imports ``torch._dynamo`` (1.5 to 2.5 s on one
    core), paid by every training notebook. Parameters without a gradient are skipped;
    ``zero_grad`` sets gradients to None (as torch's does by default).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params]
        self.lr, self.betas, self.eps = float(lr), betas, float(eps)
        self.state: dict[int, dict] = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for p in self.params:
            if p.grad is None:
                continue
            state = self.state.get(id(p))
            if state is None:
                state = self.state[id(p)] = {"step": torch.tensor(0.0),
                                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
            state["step"] += 1
            grad, exp_avg, exp_avg_sq = p.grad, state["exp_avg"], state["exp_avg_sq"]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = state["step"].item()
            step_size = self.lr / (1 - beta1**step)
            denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)
