"""The survival training loop and the files a training run writes.

``fit`` trains a ``SurvivalModel`` with the Cox partial likelihood plus an explicit L2
penalty on the trainable weights (the paper's objective ``-sum log p + lambda ||theta||^2``),
on event-stratified mini-batches, with early stopping on the validation loss. It is
deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import json
import time as _time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.fusion import SurvivalModel, build_model
from helpers.metrics import harrell_c
from helpers.survival import BreslowBaseline, cox_loss, event_stratified_batches

__all__ = ["TrainConfig", "FitResult", "Arrays", "fit", "predict", "write_run", "run_dir"]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``l2`` is lambda in the objective; ``patience`` counts epochs
    without a better validation loss before stopping."""

    lr: float = 1e-3
    l2: float = 1e-4
    batch_size: int = 256
    max_epochs: int = 200
    patience: int = 15
    dropout: float = 0.1
    linear: bool = False


@dataclass
class Arrays:
    """One split's inputs: ``img`` (n, d_img) / ``ehr`` (n, d_ehr) float32 or None, ``time``
    (n,) days, ``event`` (n,) 0/1."""

    img: np.ndarray | None
    ehr: np.ndarray | None
    time: np.ndarray
    event: np.ndarray

    def tensors(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        as_t = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        return as_t(self.img), as_t(self.ehr), torch.as_tensor(self.time, dtype=torch.float64), torch.as_tensor(self.event).bool()


@dataclass
class FitResult:
    model: SurvivalModel
    history: pd.DataFrame
    best_epoch: int
    seconds: float
    config: TrainConfig = field(default_factory=TrainConfig)


def _l2(model: torch.nn.Module) -> torch.Tensor:
    return sum((p**2).sum() for name, p in model.named_parameters() if p.requires_grad and name.endswith("weight"))


def _subset(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t[idx]


def fit(fusion: str, train: Arrays, val: Arrays, *, config: TrainConfig, seed: int) -> FitResult:
    """Train ``fusion`` on ``train`` with early stopping on ``val``; returns the best model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    d_img = train.img.shape[1] if train.img is not None else 0
    d_ehr = train.ehr.shape[1] if train.ehr is not None else 0
    model = build_model(fusion, d_img, d_ehr, dropout=config.dropout, linear=config.linear)
    t_img, t_ehr, t_time, t_event = train.tensors()
    v_img, v_ehr, v_time, v_event = val.tensors()
    model.fit_standardisation(t_img, t_ehr)
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    best = (np.inf, 0, {k: v.clone() for k, v in model.state_dict().items()})
    rows = []
    start = _time.perf_counter()
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        losses = []
        for batch in event_stratified_batches(train.event, config.batch_size, rng):
            idx = torch.as_tensor(batch.astype(np.int64))
            log_hz = model(_subset(t_img, idx), _subset(t_ehr, idx))
            loss = cox_loss(log_hz, t_event[idx], t_time[idx]) + config.l2 * _l2(model)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        model.eval()
        with torch.no_grad():
            v_log_hz = model(v_img, v_ehr)
            v_loss = float(cox_loss(v_log_hz, v_event, v_time))
        v_c = harrell_c(time=val.time, event=val.event, risk=v_log_hz.numpy())
        rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": v_loss, "val_c_index": v_c})
        if v_loss < best[0] - 1e-6:
            best = (v_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, pd.DataFrame(rows), best[1], _time.perf_counter() - start, config)


def predict(model: SurvivalModel, data: Arrays) -> np.ndarray:
    """Log-hazard for each sample, float64 (n,); higher = earlier event."""
    img, ehr, _, _ = data.tensors()
    model.eval()
    with torch.no_grad():
        return model(img, ehr).double().numpy()


def run_dir(run_root: Path, task: str, ehr_repr: str, fusion: str, seed: int) -> Path:
    """``<run_root>/runs/<task>/<ehr_repr>/<fusion>/seed-<seed>``."""
    return Path(run_root) / "runs" / task / ehr_repr / fusion / f"seed-{seed}"


def write_run(
    output_dir: Path,
    *,
    result: FitResult,
    predictions: pd.DataFrame,
    metrics: dict,
    params: dict,
) -> None:
    """Write ``model.pt``, ``predictions.parquet``, ``params.json`` and, last,
    ``metrics.json`` (its presence marks a complete run). Each file is written to a temporary
    name and renamed."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.json").unlink(missing_ok=True)

    def atomic(name: str, write) -> None:
        tmp = output_dir / f".{name}.tmp"
        write(tmp)
        tmp.replace(output_dir / name)

    atomic("model.pt", lambda p: torch.save({"state_dict": result.model.state_dict(), "params": params}, p))
    atomic("predictions.parquet", lambda p: predictions.to_parquet(p, index=False))
    atomic("params.json", lambda p: p.write_text(json.dumps({**params, "config": asdict(result.config)}, indent=2, default=str)))
    atomic("metrics.json", lambda p: p.write_text(json.dumps(metrics, indent=2, default=float)))


def survival_column(horizon_days: int) -> str:
    """Name of the predictions column with S(horizon | x): ``survival_<horizon>d``."""
    return f"survival_{horizon_days}d"


def make_predictions(
    model: SurvivalModel, splits: dict[str, tuple[np.ndarray, Arrays]], horizon_days: int
) -> tuple[pd.DataFrame, dict]:
    """Predictions for every split and Harrell's C per split.

    ``splits`` maps a split name to ``(study_ids, Arrays)`` and must hold ``train`` (for the
    Breslow baseline hazard). Returns the predictions table (``study_id``, ``split``,
    ``risk``, ``survival_<horizon>d``) and ``{split: {"n", "events", "c_index"}}``.
    """
    train_ids, train = splits["train"]
    baseline = BreslowBaseline(predict(model, train), train.time, train.event)
    frames, scores = [], {}
    for name, (ids, data) in splits.items():
        risk = predict(model, data)
        frames.append(
            pd.DataFrame(
                {
                    "study_id": ids,
                    "split": name,
                    "risk": risk,
                    survival_column(horizon_days): baseline.survival(risk, horizon_days),
                }
            )
        )
        n_events = int(np.sum(data.event))
        scores[name] = {
            "n": int(len(ids)),
            "events": n_events,
            "c_index": harrell_c(time=data.time, event=data.event, risk=risk) if n_events else None,
        }
    return pd.concat(frames, ignore_index=True), scores


__all__ += ["survival_column", "make_predictions"]
