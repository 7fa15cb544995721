"""Seconds per training run for each fusion strategy on paper-sized synthetic arrays.

Sizes follow the paper's PE cohort after the twin's splits: 2,620 training and 463 validation
studies, image embeddings of 16 per-slice tokens x 1152 (pooled = their mean), a 29-feature
one-hot EHR vector, and about 7% events (``--events 0.46`` for a MACE-like cohort). The
outcome depends on a few image and EHR coordinates, so early stopping behaves as with real
signal. One torch thread, as in the study. Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/train.py [--fusions concat,cross_attention] [--events 0.07]

Each line gives the wall time of ``helpers.training.fit`` (step 1 included for contrastive),
the epochs run, seconds per epoch and the validation C-index. What limits it: on one CPU thread
the time is the matrix products of each epoch (the 1152-wide first layer of the image and concat
heads, with the Adam step and L2 term on its weight; the per-slice token embedding 16 x 1152 ->
d_model of the attention strategies, on the columns the scaler keeps: every column here, as the
synthetic tokens have no constant ones), times the number of epochs that early stopping lets
run. Every split is standardised once per run, not at every batch.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from helpers.metrics import harrell_c
from helpers.tasks import FUSIONS
from helpers.training import Arrays, TrainConfig, fit, predict

N_TRAIN, N_VAL, N_SLICES, D_TOKEN, D_EHR = 2620, 463, 16, 1152, 29


def synthetic(n: int, event_rate: float, rng: np.random.Generator) -> Arrays:
    """Arrays of the paper's sizes with a known log-hazard; censoring tuned to ``event_rate``."""
    tokens = (rng.normal(size=(n, N_SLICES, D_TOKEN)) * 0.02).astype(np.float32)
    tokens[:, :4, :8] += rng.normal(size=(n, 1, 8)).astype(np.float32) * 0.02
    img = tokens.mean(1)
    ehr = rng.binomial(1, 0.25, size=(n, D_EHR)).astype(np.float32)
    log_hz = img[:, :8].sum(1) / 0.02 * 1.0 + ehr[:, :3] @ np.array([1.2, 0.8, -0.8])
    event_time = rng.exponential(np.exp(-log_hz)) * 365
    horizon = np.quantile(event_time, event_rate)
    event = event_time <= horizon
    time_ = np.where(event, event_time, horizon) + 0.5
    return Arrays(img, ehr, time_, event.astype(int), img_tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fusions", default=",".join(FUSIONS))
    parser.add_argument("--events", type=float, default=0.07, help="event rate (0.07 PE-like, 0.46 MACE-like)")
    parser.add_argument("--loss", default="cox")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    train, val = synthetic(N_TRAIN, args.events, rng), synthetic(N_VAL, args.events, rng)
    config = TrainConfig(loss=args.loss)
    print(f"train {N_TRAIN} / val {N_VAL} studies, image {N_SLICES} x {D_TOKEN} tokens, EHR {D_EHR} features, "
          f"{train.event.mean():.0%} events, loss {args.loss}, torch threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"defaults: batch {config.batch_size}, max_epochs {config.max_epochs}, patience {config.patience}, "
          f"d_model {config.d_model}, heads {config.heads}, proj_dim {config.proj_dim}")
    print(f"{'fusion':22s} {'seconds':>8s} {'epochs':>7s} {'s/epoch':>8s} {'step-1 ep':>9s} {'val C':>6s}")
    for fusion in args.fusions.split(","):
        start = time.perf_counter()
        result = fit(fusion, train, val, config=config, seed=args.seed)
        seconds = time.perf_counter() - start
        epochs = len(result.history)
        align = len(result.alignment) if result.alignment is not None else 0
        c = harrell_c(time=val.time, event=val.event, risk=predict(result.model, val))
        print(f"{fusion:22s} {seconds:8.1f} {epochs:7d} {seconds / max(1, epochs + align):8.2f} {align:9d} {c:6.3f}",
              flush=True)


if __name__ == "__main__":
    main()
