"""Embedding extraction throughput: slices per second for each built-in encoder, decoding
apart from the model, and (on a GPU) a MedImageInsight-sized vision model in bf16.

CPU part (always): ``--studies`` studies of an existing twin (``outputs/paper`` if present,
else the quick twin's; run ``make study`` first) are encoded by ``randconv`` and ``ct_mae``
(the study's pretrained checkpoint when there is one; else a briefly trained one, which has
the same cost per slice). Each line gives slices/s over the whole run, the seconds spent
waiting for decoding (reading DICOM/NIfTI, windowing, resampling) and in the model, and the
projected time for all studies of the paper-sized twin (PE 4,632 + MACE 4,470 studies of 16
slices; the target is under 5 minutes per task). ``clmbr_mini`` and ``onehot`` give studies/s.

GPU part (when ``torch.cuda.is_available()``): a ViT-B/16 at 480 x 480 (86 M parameters,
about the size of MedImageInsight's DaViT-base image encoder at its 480 x 480 input) with
random weights, run under bf16 autocast on synthetic slices (the model's rate) and then fed
by the DataLoader from the twin's volumes with ``--workers`` workers (the end-to-end rate).
Extraction is bound by decoding when the second is well below the first.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/embeddings.py [--studies 200] [--workers 0]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from helpers.encoders import SlicePreprocess, VolumeDataset, encode_volumes, image_encoder
from helpers.manifest import EncoderSpec
from helpers.tasks import get_task

ROOT = Path(__file__).resolve().parent.parent
PAPER_STUDIES = {"pe": 4632, "mace": 4470}
N_SLICES = 16


def _twin_root() -> Path:
    for profile in ("paper", "quick", "tiny"):
        for root in sorted((ROOT / "outputs" / profile).glob("share-*")):  # a setting's folder
            if (root / "cohorts" / "pe.parquet").is_file():
                return root
    raise SystemExit("no study outputs: run `make study PROFILE=quick` (or `make study`) first")


def _dataset(root: Path, task: str, n: int, size: int) -> VolumeDataset:
    cohort = pd.read_parquet(root / "cohorts" / f"{task}.parquet").head(n)
    imaging = pd.read_parquet(root / "cohorts" / f"{task}_imaging.parquet").set_index("study_id").loc[cohort["study_id"]]
    prep = SlicePreprocess(window_hu=get_task(task).window_hu, n_slices=N_SLICES, size=size)
    return VolumeDataset(list(cohort["study_id"]), list(imaging["image_path"]), prep)


def _ct_mae_checkpoint(root: Path, task: str, scratch: Path) -> tuple[Path, str]:
    study = root / "checkpoints" / task / "ct_mae"
    if study.is_dir():
        return study, "the study's checkpoint"
    from helpers.encoders.ct_mae import CTMAEConfig, pretrain_ct_mae

    config = CTMAEConfig(epochs=1, steps_per_epoch=2, batch_size=64, val_slices=64)
    result = pretrain_ct_mae(_dataset(root, task, 16, config.image_size), scratch / "ct_mae", config=config)
    return result.checkpoint, "a 2-step checkpoint (same cost per slice)"


def _line(name: str, stats: dict, seconds: float, n_studies: int) -> None:
    rate = n_studies * N_SLICES / seconds
    paper = {t: PAPER_STUDIES[t] * N_SLICES / rate for t in PAPER_STUDIES}
    print(f"{name:<22} {rate:8.0f} slices/s  decode {stats.get('decode_seconds', float('nan')):6.1f} s  "
          f"model {stats.get('model_seconds', float('nan')):6.1f} s  -> paper twin: "
          + ", ".join(f"{t} {s / 60:.1f} min" for t, s in paper.items()))


def cpu(root: Path, task: str, n: int, workers: int, batch_size: int) -> None:
    print(f"CPU, {torch.get_num_threads()} torch thread(s), {workers} loader worker(s), {n} {task.upper()} studies of {root.name} "
          f"x {N_SLICES} slices")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint, which = _ct_mae_checkpoint(root, task, Path(tmp))
        for name, spec in (("randconv", None), ("ct_mae", EncoderSpec(kind="ct_mae"))):
            model = image_encoder(name, spec, default_checkpoint=checkpoint)
            dataset = _dataset(root, task, n, model.input_size)
            stats: dict = {}
            started = time.perf_counter()
            encode_volumes(model, dataset, batch_size=batch_size, num_workers=workers, stats=stats)
            _line(name + (f" ({which})" if name == "ct_mae" else ""), stats, time.perf_counter() - started, n)
        clmbr = root / "checkpoints" / task / "clmbr"
        meds = root / "meds" / task
        if clmbr.is_dir() and meds.is_dir():
            from helpers.encoders.clmbr_mini import ClmbrMiniEncoder
            from helpers.meds import read_meds

            cohort = pd.read_parquet(root / "cohorts" / f"{task}.parquet")
            events = read_meds(meds)
            encoder = ClmbrMiniEncoder(clmbr)
            started = time.perf_counter()
            encoder.embed(events, cohort)
            seconds = time.perf_counter() - started
            print(f"{'clmbr_mini':<22} {len(cohort) / seconds:8.0f} studies/s ({len(cohort)} studies in {seconds:.1f} s, "
                  f"{len(events):,} MEDS events)")
        else:
            print(f"{'clmbr_mini':<22} not measured: no pretrained checkpoint under {clmbr.parent}")


def gpu(root: Path, task: str, n: int, workers: int, batch_size: int) -> None:
    from transformers import ViTConfig, ViTModel

    device = torch.device("cuda")
    config = ViTConfig(image_size=480, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                       intermediate_size=3072, num_channels=3)
    model = ViTModel(config, add_pooling_layer=False).to(device).eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    x = torch.rand(batch_size * N_SLICES // 4, 3, 480, 480, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            model(pixel_values=x)
        torch.cuda.synchronize()
        started = time.perf_counter()
        repeats = 10
        for _ in range(repeats):
            model(pixel_values=x)
        torch.cuda.synchronize()
    model_rate = repeats * len(x) / (time.perf_counter() - started)
    print(f"GPU {torch.cuda.get_device_name()}: ViT-B/16 at 480x480 ({params:.0f} M parameters), bf16: "
          f"{model_rate:,.0f} slices/s (model alone, batch {len(x)})")

    class Wrapped(torch.nn.Module):
        dim, input_size = 768, 480

        def __init__(self) -> None:
            super().__init__()
            self.vit = model

        def describe(self) -> dict:
            return {"kind": "benchmark ViT-B/16 480"}

        def forward(self, slices: torch.Tensor) -> torch.Tensor:
            return self.vit(pixel_values=slices.expand(-1, 3, -1, -1)).last_hidden_state[:, 0]

    dataset = _dataset(root, task, n, 480)
    stats: dict = {}
    started = time.perf_counter()
    encode_volumes(Wrapped(), dataset, batch_size=batch_size, device="cuda", num_workers=workers, stats=stats)
    seconds = time.perf_counter() - started
    rate = n * N_SLICES / seconds
    print(f"end to end from the twin's volumes, {workers} worker(s): {rate:,.0f} slices/s (decode wait "
          f"{stats.get('decode_seconds', float('nan')):.1f} s, model {stats.get('model_seconds', float('nan')):.1f} s): "
          f"{'bound by decoding' if rate < 0.5 * model_rate else 'bound by the model'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="pe", choices=["pe", "mace"])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16, help="volumes per batch")
    args = parser.parse_args()
    root = _twin_root()
    cpu(root, args.task, args.studies, args.workers, args.batch_size)
    if torch.cuda.is_available():
        gpu(root, args.task, min(args.studies * 4, 2000), max(args.workers, 8), args.batch_size)
    else:
        print("GPU: none here (the MedImageInsight-sized bf16 measurement runs where torch.cuda.is_available())")


if __name__ == "__main__":
    main()
