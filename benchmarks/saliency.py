"""Seconds of saliency for 16 cases per model with the randconv encoder, per method.

The target (issue: saliency) is 16 cases per task and model in under 2 minutes on 2 CPU cores.
Here each model is attributed on one torch thread, as in the workflow (where two notebooks
share the two cores). Inputs are 16 volumes of 16 slices of 64 x 64 pixels (the twin's
encoder input), the models an image-only MLP head and a cross-attention fusion over per-slice
tokens and 29 one-hot EHR features, with scalers fitted on random embeddings of those volumes:
the arithmetic of a trained run (the weights do not change the cost). Run:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/saliency.py [--methods gradient,smoothgrad] [--cases 16]

Each line gives the method's settings, seconds per model for the cases, and the ratio to the
2-minute target (below 1 meets it). With ``--root <study folder> --task pe --fusion
cross_attention`` it also times ``helpers.saliency.run_saliency`` end to end on a finished
study (the workflow's settings: SmoothGrad and the randomisation check).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from helpers import saliency as S
from helpers.encoders.randconv import RandomConvEncoder
from helpers.fusion import build_model

TARGET_SECONDS = 120.0
SETTINGS = {"gradient": {}, "smoothgrad": {"n_samples": 12, "noise": 0.1},
            "integrated_gradients": {"n_steps": 24}, "occlusion": {"patch": 8}}


def _models(encoder: RandomConvEncoder, slices: torch.Tensor, d_ehr: int, rng: np.random.Generator) -> dict:
    with torch.no_grad():
        tokens = torch.stack([encoder(v) for v in slices])
    ehr = torch.as_tensor(rng.binomial(1, 0.3, size=(len(slices), d_ehr)), dtype=torch.float32)
    models = {}
    for fusion in ("image_only", "cross_attention"):
        model = build_model(fusion, encoder.dim, d_ehr, d_token=encoder.dim)
        model.fit_standardisation(tokens.mean(1), ehr, tokens)
        models[fusion] = S.CTRisk(encoder, model.eval().requires_grad_(False)).eval()
    return models, ehr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="gradient,smoothgrad,integrated_gradients")
    parser.add_argument("--cases", type=int, default=16)
    parser.add_argument("--root", help="a finished study folder, to time run_saliency end to end")
    parser.add_argument("--task", default="pe")
    parser.add_argument("--fusion", default="cross_attention")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    encoder = RandomConvEncoder(seed=0)
    slices = torch.as_tensor(rng.uniform(0, 1, size=(args.cases, 16, 1, 64, 64)), dtype=torch.float32)
    models, ehr = _models(encoder, slices, 29, rng)
    print(f"{args.cases} cases x 16 slices of 64 x 64, randconv, one thread; target {TARGET_SECONDS:.0f} s per model")
    for method in args.methods.split(","):
        settings = SETTINGS[method]
        for name, risk in models.items():
            start = time.perf_counter()
            S.attribute(risk, slices, ehr if risk.model.uses_ehr else None, method=method, baseline=0.0, **settings)
            seconds = time.perf_counter() - start
            print(f"{method:22s} {str(settings):32s} {name:16s} {seconds:7.1f} s   ratio {seconds / TARGET_SECONDS:.2f}")
    if args.root:
        from helpers.manifest import load

        root = Path(args.root)
        spec = S.SaliencySpec(task=args.task, fusion=args.fusion, ehr_repr="onehot", seed=0, n_cases=args.cases,
                              method="smoothgrad", manifest=load(root / "manifest.yaml"), runs_dir=root / "runs",
                              output_dir=Path("/tmp/saliency-benchmark"), n_boot=1000)
        start = time.perf_counter()
        result = S.run_saliency(spec)
        total = time.perf_counter() - start
        print(f"run_saliency {args.task} {args.fusion} vs image_only, {len(result.cases)} cases: {total:.1f} s in all "
              f"(attribution {', '.join(f'{k} {v:.1f} s' for k, v in result.timing.items())}; the rest is the "
              "randomisation check, reading the volumes and the bootstrap)")


if __name__ == "__main__":
    main()
