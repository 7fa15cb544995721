"""Saliency: where a trained model looks on the CT, and, on the twin, whether it looks at the
lesions.

The paper explains its models with gradient saliency maps on the CT and reads them as
evidence that fusion moves the image model's attention to task-relevant anatomy (embolic burden
for PE; pulmonary-artery dilation and cardiac structures for MACE). This module computes such
maps for any trained run of the study and, where the truth is known (the digital twin's lesion
masks and anatomy), measures them.

What is attributed. A run's model scores pooled (and per-slice) embeddings; ``CTRisk`` puts the
frozen image encoder back in front of it, so that the predicted risk is a differentiable
function of the encoder's input: the ``n_slices`` selected axial slices of the CT, in the
task's window, at the encoder's in-plane size (``helpers.encoders.SlicePreprocess``), the
voxels the model sees. The EHR input is held at the patient's own embedding. Attributions
have the shape of that input, ``(n_slices, size, size)``; the twin's masks are carried to the
same grid by the same slabs, field of view and resizing (``SlicePreprocess.resample``), each
pixel weighted by the fraction of it that lies in the region. Gradients flow through the
encoder, whose weights stay frozen (``weights_digest`` is checked before and after).

Methods (``METHODS``, with captum):

* ``gradient``: the magnitude of the gradient of the risk (vanilla saliency);
* ``smoothgrad``: its mean over ``n_samples`` copies of the input with Gaussian noise of
  ``noise`` (in window units, where 1 is the window's width);
* ``integrated_gradients``: the path integral from a baseline of air (-1000 HU, which is
  ``window(-1000)`` in the task's window: 0.23 for PE, 0 for MACE) with ``n_steps``
  Gauss-Legendre points; its completeness gap (sum of attributions minus the change in risk)
  is reported;
* ``occlusion``: the drop in risk when a ``patch`` x ``patch`` square of one slice is set to
  air; the only method for an encoder that is not differentiable (MedImageInsight's published
  API takes PNG bytes), for which the others are refused with that reason.

Localisation is measured on the absolute attributions, per case: the share of attribution
mass inside a region, the region's share of the input's area (what a uniform map would
score), their ratio (enrichment) and a pointing-game hit (the pixel of largest attribution
lies in the region). Regions (``REGIONS``): the task's lesion (emboli for PE, coronary calcium
for MACE) and the heart and pulmonary arteries without it (where the CT's shared factors show:
RV strain, pulmonary-artery dilation, cardiac dysfunction). Means over cases get percentile
bootstrap intervals over patients, and the fusion minus image-only difference a paired
bootstrap (``helpers.metrics``).

The sanity check of Adebayo et al. (2018): the same attributions for a copy of each model
whose head and fusion weights are redrawn (same shapes and spread, scaler statistics kept)
should differ from the trained model's; the Spearman rank correlation between the two maps
is reported per case. Attention strategies also give their attention weights over slice
tokens (EHR queries over image keys), set next to the lesion's extent per slice.

``run_saliency(SaliencySpec)`` does all of it for one task, one fusion run and its image-only
reference and writes the results (``saliency_dir``); ``notebooks/05_saliency.ipynb`` calls it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from helpers.tasks import (
    FUSIONS,
    UNIMODAL_IMAGE,
    ParameterError,
    check_choice,
    get_strategy,
    get_task,
)

__all__ = [
    "METHODS",
    "GRADIENT_METHODS",
    "SALIENCY_FUSIONS",
    "REGIONS",
    "REFERENCE",
    "SaliencySpec",
    "SaliencyResult",
    "CTRisk",
    "air_baseline",
    "attribute",
    "check_parameters",
    "load_model",
    "load_image_encoder",
    "localisation",
    "randomised_copy",
    "rank_correlation",
    "region_occupancy",
    "run_saliency",
    "saliency_dir",
    "select_cases",
    "summarise",
    "weights_digest",
]

METHODS: tuple[str, ...] = ("gradient", "smoothgrad", "integrated_gradients", "occlusion")
GRADIENT_METHODS: tuple[str, ...] = ("gradient", "smoothgrad", "integrated_gradients")
# The strategies a saliency notebook compares with image-only: every fusion that sees the CT.
SALIENCY_FUSIONS: tuple[str, ...] = tuple(f for f in FUSIONS
                                          if get_strategy(f).uses_image and not get_strategy(f).unimodal)
REFERENCE = "image_only"
# Per task: region name -> its label in tables. ``lesion`` is the task's lesion mask;
# ``cardiac_pa`` the heart (with its ventricles) and the pulmonary arteries, lesion excluded.
# ``body`` (the patient, from the CT itself, so also on real data) is measured for every model.
REGIONS: dict[str, dict[str, str]] = {
    "pe": {"lesion": "emboli", "cardiac_pa": "heart and pulmonary arteries", "body": "body"},
    "mace": {"lesion": "coronary calcium", "cardiac_pa": "heart and pulmonary arteries", "body": "body"},
}
BODY_HU = -500.0  # tissue denser than this, with the lungs it encloses, is the body
_LESION_LABEL = {"pe": 1, "mace": 2}  # helpers.truth.read_mask: 1 embolus, 2 calcium


def check_parameters(fusion: str, method: str, n_cases: object) -> None:
    """The notebook's parameters, checked before anything is read: ``fusion`` must be a
    strategy that sees the CT besides image-only (``SALIENCY_FUSIONS``), ``method`` one of
    ``METHODS``, ``n_cases`` an integer >= 1. ``ParameterError`` names the parameter and the
    allowed values.

    >>> check_parameters("ehr_only", "gradient", 4)
    Traceback (most recent call last):
    ...
    helpers.tasks.ParameterError: parameter 'fusion': 'ehr_only' has no image input, so it has no saliency on the CT; expected one of concat, contrastive, cross_attention, coattn_image_guided, coattn_ehr_guided
    """
    strategy = get_strategy(fusion)
    if fusion not in SALIENCY_FUSIONS:
        why = "has no image input, so it has no saliency on the CT" if not strategy.uses_image else \
            "is the reference every fusion is compared with"
        raise ParameterError(f"parameter 'fusion': {fusion!r} {why}; expected one of {', '.join(SALIENCY_FUSIONS)}")
    check_choice("method", method, METHODS)
    if isinstance(n_cases, bool) or not isinstance(n_cases, int | np.integer) or n_cases < 1:
        raise ParameterError(f"parameter 'n_cases': expected an integer >= 1, got {n_cases!r}")


def saliency_dir(run_root: str | Path, task: str, ehr_repr: str, fusion: str, seed: int) -> Path:
    """``<run_root>/saliency/<task>/<ehr_repr>/<fusion>/seed-<seed>``.

    >>> saliency_dir("out", "pe", "onehot", "concat", 0).as_posix()
    'out/saliency/pe/onehot/concat/seed-0'
    """
    return Path(run_root) / "saliency" / task / ehr_repr / fusion / f"seed-{int(seed)}"


# ---------------------------------------------------------------------------------------------
# The models


def weights_digest(module: nn.Module) -> str:
    """sha256 of every parameter and buffer of ``module`` (names and bytes), to check that
    attribution left a frozen model unchanged."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_model(run_folder: str | Path):
    """The trained ``SurvivalModel`` of a run folder (``helpers.runs`` format: ``params.json``
    and ``model.pt``) in eval mode with its weights frozen, and the run's parameters."""
    from helpers.fusion import build_model
    from helpers.training import TrainConfig

    run_folder = Path(run_folder)
    for name in ("params.json", "model.pt"):
        if not (run_folder / name).is_file():
            raise FileNotFoundError(f"{run_folder / name}: not found; train the run first (notebooks/03_train.ipynb, "
                                    f"or `snakemake {run_folder / 'metrics.json'}`)")
    params = json.loads((run_folder / "params.json").read_text())
    state = torch.load(run_folder / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    config = TrainConfig(**params["config"])
    dim = lambda key: int(state[key].shape[0]) if key in state else 0  # noqa: E731
    model = build_model(params["fusion"], dim("norm_img.mean"), dim("norm_ehr.mean"),
                        d_token=dim("norm_tokens.mean") or None, **config.model_options())
    model.load_state_dict(state)
    model.eval()
    model.requires_grad_(False)
    return model, params


def load_image_encoder(manifest, task: str, metadata: dict):
    """The frozen image encoder and the slice preprocessing that made a run's image embeddings,
    from the embedding table's ``metadata`` (a run's ``params["image_encoder"]``). A checkpoint
    whose sha256 differs from the one recorded there is refused."""
    from helpers.encoders import SlicePreprocess, image_encoder
    from helpers.extract import checkpoint_for, encoder_spec

    name = metadata["encoder"]
    spec = encoder_spec(manifest, "image", name)
    checkpoint, sha = checkpoint_for(manifest, task, name, spec)
    recorded = metadata.get("checkpoint_sha256")
    if recorded and sha and recorded != sha:
        raise ValueError(f"image encoder {name!r}: checkpoint {checkpoint} has sha256 {sha}, but the embeddings the "
                         f"models were trained on were made with {recorded}; extract the embeddings again")
    encoder = image_encoder(name, spec, seed=int((metadata.get("model") or {}).get("seed", 0)),
                            default_checkpoint=checkpoint)
    encoder.eval()
    encoder.requires_grad_(False)
    prep = dict(metadata["preprocessing"])
    prep["window_hu"] = tuple(prep["window_hu"])
    return encoder, SlicePreprocess(**prep)


def _differentiable(encoder: nn.Module) -> bool:
    describe = getattr(encoder, "describe", None)
    return bool((describe() if callable(describe) else {}).get("differentiable", True))


class CTRisk(nn.Module):
    """The predicted risk as a function of the CT slices: ``forward(slices (B, T, 1, S, S),
    ehr (B, d_ehr) or None)`` -> risk (B,), through the frozen ``encoder`` (slice tokens, their
    mean the pooled embedding, as ``helpers.encoders.encode_volumes`` makes them) and the
    trained ``model`` (a ``SurvivalModel`` that uses the image). Neither is changed."""

    def __init__(self, encoder: nn.Module, model: nn.Module) -> None:
        super().__init__()
        if not model.uses_image:
            raise ParameterError(f"fusion {model.fusion!r} has no image input: it has no saliency on the CT")
        self.encoder, self.model = encoder, model

    def tokens(self, slices: torch.Tensor) -> torch.Tensor:
        if slices.ndim != 5:
            raise ValueError(f"expected slices of shape (B, T, 1, S, S), got {tuple(slices.shape)}")
        if slices.is_cuda:
            b, t = slices.shape[:2]
            return self.encoder(slices.reshape(b * t, *slices.shape[2:])).reshape(b, t, -1).float()
        # on the CPU one volume per encoder call: its maps stay in the cache (about 2x faster
        # forward and backward with randconv than one call on all volumes; the same numbers)
        return torch.stack([self.encoder(volume) for volume in slices]).float()

    def inputs(self, slices: torch.Tensor, ehr: torch.Tensor | None) -> dict:
        tokens = self.tokens(slices)
        return {"img": tokens.mean(1), "ehr": ehr if self.model.uses_ehr else None,
                "img_tokens": tokens if self.model.needs_image_tokens else None}

    def forward(self, slices: torch.Tensor, ehr: torch.Tensor | None = None) -> torch.Tensor:
        inputs = self.inputs(slices, ehr)
        return self.model.risk(self.model(inputs.pop("img"), inputs.pop("ehr"), **inputs))

    def slice_attention(self, slices: torch.Tensor, ehr: torch.Tensor | None) -> np.ndarray | None:
        """Attention of the EHR queries over the slice tokens, averaged over heads and
        queries: (B, T), each row summing to 1; None for a model without it (only
        ``cross_attention`` and ``coattn_ehr_guided`` with per-slice tokens have it)."""
        if not (self.model.needs_image_tokens and self.model.attn_ehr is not None):
            return None
        with torch.no_grad():
            inputs = self.inputs(slices, ehr)
            _, attention = self.model.fused(inputs.pop("img"), inputs.pop("ehr"), return_attention=True, **inputs)
        return attention["ehr<-img"].mean(dim=(1, 2)).double().numpy()


def randomised_copy(model: nn.Module, seed: int = 0) -> nn.Module:
    """A copy of a ``SurvivalModel`` whose learned weights (fusion modules and head) are redrawn
    from a normal distribution with each tensor's own mean and standard deviation; the scaler's
    statistics (buffers) and single numbers (the contrastive temperature) are kept. The model
    randomisation test of Adebayo et al. (2018) compares its saliency with the trained one's."""
    clone = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(clone.named_parameters()):
            if p.numel() < 2:
                continue
            draw = torch.randn(p.shape, generator=generator, dtype=p.dtype)
            p.copy_(p.mean() + p.std() * draw)
    return clone


# ---------------------------------------------------------------------------------------------
# Attribution


def air_baseline(window_hu: tuple[float, float]) -> float:
    """Air (-1000 HU) in the task's window, the baseline of integrated gradients and occlusion.

    >>> round(air_baseline((-1350.0, 150.0)), 4), air_baseline((-125.0, 225.0))
    (0.2333, 0.0)
    """
    from helpers.imaging import AIR_HU, window

    return float(window(np.array([AIR_HU]), *window_hu)[0])


def attribute(risk_model: CTRisk, slices: torch.Tensor, ehr: torch.Tensor | None = None, *, method: str,
              baseline: float, n_steps: int = 24, n_samples: int = 12, noise: float = 0.1, patch: int = 8,
              batch_size: int = 16, stats: dict | None = None) -> torch.Tensor:
    """Attributions of ``risk_model``'s risk to ``slices`` (B, T, 1, S, S) with ``method``
    (``METHODS``), the EHR held at ``ehr`` (B, d) -> float32 (B, T, S, S). ``gradient`` and
    ``smoothgrad`` give magnitudes; ``integrated_gradients`` and ``occlusion`` are signed
    (positive: the region raises the risk). ``batch_size`` bounds how many volumes (noisy
    copies, path points, occluded copies) one forward pass holds. ``stats``, when given, gets
    ``completeness_gap`` (integrated gradients: max over cases of |sum of attributions -
    (risk(x) - risk(baseline))|) and ``seconds``."""
    from captum.attr import IntegratedGradients, NoiseTunnel, Occlusion, Saliency

    check_choice("method", method, METHODS)
    if method in GRADIENT_METHODS and not _differentiable(risk_model.encoder):
        raise ParameterError(f"parameter 'method': {method!r} needs gradients through the image encoder, and "
                             f"{type(risk_model.encoder).__name__} is not differentiable; use 'occlusion'")
    start = time.perf_counter()
    args = (ehr,) if risk_model.model.uses_ehr else None
    # captum asks for gradients of the inputs itself, with a warning; they are asked for here
    slices = slices.detach().float().requires_grad_(method != "occlusion")
    n = len(slices)
    if method == "gradient":
        out = Saliency(risk_model).attribute(slices, additional_forward_args=args, abs=True)
    elif method == "smoothgrad":
        out = NoiseTunnel(Saliency(risk_model)).attribute(
            slices, nt_type="smoothgrad", nt_samples=n_samples, nt_samples_batch_size=max(1, batch_size // n), stdevs=noise,
            additional_forward_args=args, abs=True)
    elif method == "integrated_gradients":
        out, delta = IntegratedGradients(risk_model).attribute(
            slices, baselines=baseline, additional_forward_args=args, n_steps=n_steps,
            internal_batch_size=batch_size, return_convergence_delta=True)
        if stats is not None:
            stats["completeness_gap"] = float(delta.abs().max())
    else:
        window = (1, 1, patch, patch)
        with torch.no_grad():
            out = Occlusion(risk_model).attribute(slices, sliding_window_shapes=window, strides=window,
                                                  baselines=baseline, additional_forward_args=args,
                                                  perturbations_per_eval=max(1, batch_size // n))
    if stats is not None:
        stats["seconds"] = time.perf_counter() - start
    return out.detach()[:, :, 0].float()


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of the absolute values of two attribution maps (any equal
    shapes), ties given their mean rank."""
    from scipy.stats import spearmanr

    a, b = np.abs(np.asarray(a, dtype=np.float64)).ravel(), np.abs(np.asarray(b, dtype=np.float64)).ravel()
    if a.shape != b.shape:
        raise ValueError(f"Dimension mismatch: maps of {a.size} and {b.size} values")
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------------------------------------
# Localisation


def region_occupancy(region: np.ndarray, spacing: tuple[float, float, float], preprocess) -> np.ndarray:
    """A region's 0/1 indicator on a volume's (z, y, x) grid carried to the encoder's input
    grid: float32 (n_slices, size, size), the fraction of each input pixel inside the region
    (the same slabs, field of view and resizing as the slices, ``SlicePreprocess.resample``)."""
    occupancy = preprocess.resample(np.asarray(region, dtype=np.float32), spacing)
    return np.clip(occupancy, 0.0, 1.0)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The patient's body on each axial slice of a (z, y, x) HU volume: voxels denser than
    ``BODY_HU`` with every hole they enclose filled (the lungs, the airways), bool."""
    from scipy.ndimage import binary_fill_holes

    dense = np.asarray(hu) > BODY_HU
    return np.stack([binary_fill_holes(plane) for plane in dense])


def localisation(attribution: np.ndarray, occupancy: np.ndarray) -> dict:
    """How much of one attribution map falls in a region given as per-pixel occupancy (both
    (T, S, S)): ``mass`` (share of the absolute attribution inside, each pixel counted by its
    occupancy), ``area`` (the region's share of the input: what a uniform map scores),
    ``enrichment`` (mass / area) and ``hit`` (the pointing game: the pixel of largest absolute
    attribution overlaps the region). All NaN for an empty region or an all-zero map.

    >>> attr = np.zeros((1, 4, 4)); attr[0, 0, 0] = 3.0; attr[0, 3, 3] = 1.0
    >>> region = np.zeros((1, 4, 4)); region[0, 0, 0] = 1.0
    >>> {k: round(v, 3) for k, v in localisation(attr, region).items()}
    {'mass': 0.75, 'area': 0.062, 'enrichment': 12.0, 'hit': 1.0}
    """
    a = np.abs(np.asarray(attribution, dtype=np.float64))
    occ = np.asarray(occupancy, dtype=np.float64)
    if a.shape != occ.shape:
        raise ValueError(f"Dimension mismatch: attribution {a.shape}, region {occ.shape}")
    total, area = a.sum(), occ.mean()
    if not (total > 0 and area > 0):
        return {"mass": float("nan"), "area": float("nan"), "enrichment": float("nan"), "hit": float("nan")}
    mass = float((a * occ).sum() / total)
    return {"mass": mass, "area": float(area), "enrichment": mass / float(area),
            "hit": float(occ.ravel()[int(np.argmax(a))] > 0)}


def select_cases(cohort: pd.DataFrame, risks: dict[str, pd.Series], *, n_cases: int, split: str = "test",
                 ehr_present: pd.Index | None = None,
                 image_present: pd.Index | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The cases shown and measured: studies of ``split`` that had the event, ranked by the
    mean of their risk percentiles under every model of ``risks`` (model -> risk by study_id),
    the ``n_cases`` highest. Studies without an EHR embedding (``ehr_present``: the ids that
    have one) are left out, and so are studies without an image embedding (``image_present``:
    the extraction left out their CT as unreadable). Returns the cases (``study_id``, ``time``,
    ``event``, ``risk_<model>``, ``percentile_<model>``, ``rank_score``) and the count of every
    step, with the reason for each exclusion."""
    part = cohort[cohort["split"] == split].set_index("study_id")
    if part.empty:
        raise ValueError(f"the cohort has no study in split {split!r}")
    steps = [("studies in split", len(part), "")]
    events = part[part["event"].astype(bool)]
    steps.append(("had the event", len(events), "censored or event-free studies are not cases"))
    if image_present is not None:
        events = events[events.index.isin(image_present)]
        steps.append(("with a readable CT", len(events), "a CT the extraction could not read has nothing to attribute"))
    if ehr_present is not None:
        events = events[events.index.isin(ehr_present)]
        steps.append(("with an EHR embedding", len(events), "the fusion needs the patient's own EHR"))
    out = events[["time", "event"]].copy()
    percentiles = []
    for name, risk in risks.items():
        missing = out.index.difference(risk.index)
        if len(missing):
            raise ValueError(f"model {name!r}: no prediction for {len(missing)} case(s), e.g. {missing[0]}")
        out[f"risk_{name}"] = risk.reindex(out.index).to_numpy()
        pct = risk.reindex(part.index).rank(pct=True)
        out[f"percentile_{name}"] = pct.reindex(out.index).to_numpy()
        percentiles.append(out[f"percentile_{name}"])
    out["rank_score"] = np.mean(percentiles, axis=0)
    out = out.sort_values("rank_score", ascending=False, kind="mergesort").head(int(n_cases))
    steps.append(("selected (highest mean risk percentile)", len(out), f"at most n_cases = {n_cases}"))
    counts = pd.DataFrame(steps, columns=["step", "studies", "note"])
    return out.reset_index(), counts


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def summarise(per_case: pd.DataFrame, *, fusion: str, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Means over cases with 95% percentile bootstrap intervals over patients, per model and
    region (``mass``, ``area``, ``enrichment``, ``hit``), and the paired fusion minus image-only
    differences of ``mass`` and ``hit`` (paired bootstrap on the cases both maps cover).
    ``per_case`` has ``case``, ``model``, ``region`` and those columns; NaN rows (empty
    region) are left out and counted."""
    from helpers.metrics import bootstrap_metric, paired_bootstrap_metric

    rows, diffs = [], []
    for (model, region), part in per_case.groupby(["model", "region"], sort=False):
        valid = part.dropna(subset=["mass"])
        row = {"model": model, "region": region, "cases": len(valid), "no region": len(part) - len(valid)}
        for key in ("mass", "hit"):
            if len(valid):
                res = bootstrap_metric(lambda values: _mean(values), {"values": valid[key].to_numpy()},
                                       n_boot=n_boot, rng=seed)
                row.update({key: res.estimate, f"{key}_lower": res.lower, f"{key}_upper": res.upper})
            else:
                row.update({key: np.nan, f"{key}_lower": np.nan, f"{key}_upper": np.nan})
        row["area"] = float(valid["area"].mean()) if len(valid) else np.nan
        row["enrichment"] = float(valid["enrichment"].mean()) if len(valid) else np.nan
        rows.append(row)
    for region, part in per_case.groupby("region", sort=False):
        wide = part.pivot_table(index="case", columns="model", values=["mass", "hit"])
        if REFERENCE not in wide["mass"] or fusion not in wide["mass"]:
            continue
        both = wide.dropna()
        if len(both) < 2:
            continue
        for key in ("mass", "hit"):
            res = paired_bootstrap_metric(lambda case, values: _mean(values), {"case": both.index.to_numpy()},
                                          a={"values": both[(key, fusion)].to_numpy()},
                                          b={"values": both[(key, REFERENCE)].to_numpy()}, n_boot=n_boot, rng=seed)
            diffs.append({"region": region, "measure": key, "cases": len(both), "fusion": res.c_a,
                          "image_only": res.c_b, "difference": res.difference, "lower": res.lower,
                          "upper": res.upper, "p_value": res.p_value})
    return pd.DataFrame(rows), pd.DataFrame(diffs)


# ---------------------------------------------------------------------------------------------
# One saliency run, end to end (what notebooks/05_saliency.ipynb calls)


@dataclass
class SaliencySpec:
    """One saliency run: ``fusion`` (and its ``ehr_repr`` and ``seed``) against the image-only
    run of the same seed, for ``task``; ``n_cases`` cases of ``split``; ``method`` and its
    settings; ``runs_dir`` holds the runs (``<runs_dir>/<task>/<ehr_repr>/<fusion>/seed-<n>``),
    ``output_dir`` receives the results. ``randomisation``: also run the model randomisation
    check (on every case)."""

    task: str
    fusion: str
    ehr_repr: str
    seed: int
    n_cases: int
    method: str
    manifest: object
    runs_dir: Path
    output_dir: Path
    split: str = "test"
    n_boot: int = 1000
    device: str = "cpu"
    randomisation: bool = True
    batch_size: int = 16
    options: dict = field(default_factory=dict)  # n_steps, n_samples, noise, patch


@dataclass
class SaliencyResult:
    """What ``run_saliency`` made. ``maps[model]`` float32 (n_cases, T, S, S); ``slices``
    the encoder inputs (n_cases, T, S, S) in [0, 1]; ``regions[name]`` the occupancy maps
    (``body`` always; ``lesion`` and ``cardiac_pa`` on the twin); ``per_case`` one row per
    case, model and region; ``summary`` and
    ``paired`` from ``summarise``; ``randomisation`` one row per case and model; ``attention``
    (n_cases, T) or None; ``timing`` seconds per model; ``checks`` the weight digests and the
    recomputed-risk agreement."""

    spec: SaliencySpec
    cases: pd.DataFrame
    counts: pd.DataFrame
    slices: np.ndarray
    maps: dict[str, np.ndarray]
    regions: dict[str, np.ndarray]
    per_case: pd.DataFrame
    summary: pd.DataFrame
    paired: pd.DataFrame
    randomisation: pd.DataFrame | None
    attention: np.ndarray | None
    probability: dict[str, np.ndarray]
    timing: dict[str, float]
    checks: dict
    method_note: str


def _run(runs_dir: Path, task: str, ehr_repr: str, fusion: str, seed: int) -> Path:
    folder = Path(runs_dir) / task / ehr_repr / fusion / f"seed-{int(seed)}"
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"{folder}: no finished run (metrics.json) of {fusion!r} ({ehr_repr}, seed {seed}) "
                                f"for task {task!r}; train it first (notebooks/03_train.ipynb)")
    return folder


def _volumes(paths: list[str], preprocess) -> tuple[torch.Tensor, list]:
    from helpers.imaging import load_volume

    slices, volumes = [], []
    for path in paths:
        volume = load_volume(path)
        volumes.append(volume)
        slices.append(preprocess(volume))
    return torch.stack(slices), volumes


def run_saliency(spec: SaliencySpec) -> SaliencyResult:
    """Attribute, measure and write one saliency run (see the module's docstring). Writes to
    ``spec.output_dir``: ``cases.csv`` (with study ids: not for the book), ``localisation.csv``
    (per case), ``summary.csv``, ``paired.csv``, ``randomisation.csv``, ``attributions.npz``
    (float16 maps) and, last, ``saliency.json`` (settings, timing, checks)."""
    from helpers import cohort as hc
    from helpers.embeddings import read_embeddings
    from helpers.runs import survival_column

    check_parameters(spec.fusion, spec.method, spec.n_cases)
    task = get_task(spec.task)
    torch.set_num_threads(1) if spec.device == "cpu" else None
    torch.manual_seed(spec.seed)
    folders = {REFERENCE: _run(spec.runs_dir, spec.task, UNIMODAL_IMAGE, REFERENCE, spec.seed),
               spec.fusion: _run(spec.runs_dir, spec.task, spec.ehr_repr, spec.fusion, spec.seed)}
    models, params = {}, {}
    for name, folder in folders.items():
        models[name], params[name] = load_model(folder)
    image_meta = params[spec.fusion]["image_encoder"]
    if params[REFERENCE]["image_encoder"] != image_meta:
        raise ValueError(f"{folders[REFERENCE]} and {folders[spec.fusion]} were trained on different image "
                         "embeddings; saliency compares models of the same image encoder")
    encoder, preprocess = load_image_encoder(spec.manifest, spec.task, image_meta)
    differentiable = _differentiable(encoder)
    method = spec.method
    note = ""
    if method in GRADIENT_METHODS and not differentiable:
        note = (f"The image encoder {image_meta['encoder']!r} is not differentiable (it takes encoded PNG images), so "
                f"{method!r} cannot reach the voxels: occlusion is used instead.")
        method = "occlusion"
    paths = hc.cohort_paths(spec.manifest, spec.task)
    cohort = hc.read_cohort(paths["cohort"])
    ehr_table = read_embeddings(Path(params[spec.fusion]["ehr_embeddings"]), tokens=False)
    ehr_index = pd.Index([str(s) for s in ehr_table.study_ids])
    predictions = {name: pd.read_parquet(folder / "predictions.parquet").set_index("study_id")
                   for name, folder in folders.items()}
    image_index = pd.Index([str(s) for s in read_embeddings(Path(params[REFERENCE]["image_embeddings"]),
                                                            tokens=False).study_ids])
    cases, counts = select_cases(cohort, {n: p["risk"] for n, p in predictions.items()}, n_cases=spec.n_cases,
                                 split=spec.split, ehr_present=ehr_index, image_present=image_index)
    if cases.empty:
        raise ValueError(f"task {spec.task!r}: no study of split {spec.split!r} had the event; no case to explain")
    ids = cases["study_id"].astype(str).tolist()
    imaging = pd.read_parquet(paths["imaging"]).set_index("study_id")
    slices, volumes = _volumes([str(imaging.loc[s, "image_path"]) for s in ids], preprocess)
    position = {s: i for i, s in enumerate(ehr_index)}
    ehr = torch.as_tensor(np.stack([ehr_table.embedding[position[s]] for s in ids]), dtype=torch.float32)
    device = torch.device(spec.device)
    slices, ehr = slices.to(device), ehr.to(device)
    horizon = survival_column(task.horizon_days)
    probability = {n: 1.0 - p.loc[ids, horizon].to_numpy(dtype=float) for n, p in predictions.items()}
    settings = {k: v for k, v in spec.options.items() if k in ("n_steps", "n_samples", "noise", "patch")}
    baseline = air_baseline(preprocess.window_hu)

    maps, timing, checks, random_maps, attention = {}, {}, {"risk_agreement": {}, "weights_unchanged": {}}, {}, None
    encoder_digest = weights_digest(encoder)
    for name, model in models.items():
        model.to(device)
        risk_model = CTRisk(encoder.to(device), model).eval()
        digest = weights_digest(model)
        with torch.no_grad():
            recomputed = risk_model(slices, ehr).double().cpu().numpy()
        stored = predictions[name].loc[ids, "risk"].to_numpy(dtype=float)
        checks["risk_agreement"][name] = float(np.max(np.abs(recomputed - stored)))
        stats: dict = {}
        maps[name] = attribute(risk_model, slices, ehr, method=method, baseline=baseline,
                               batch_size=spec.batch_size, stats=stats, **settings).cpu().numpy()
        timing[name] = stats["seconds"]
        if "completeness_gap" in stats:
            checks.setdefault("completeness_gap", {})[name] = stats["completeness_gap"]
        checks["weights_unchanged"][name] = weights_digest(model) == digest
        if spec.randomisation:
            random_model = CTRisk(encoder, randomised_copy(model, seed=spec.seed).to(device)).eval()
            random_maps[name] = attribute(random_model, slices, ehr, method=method, baseline=baseline,
                                          batch_size=spec.batch_size, **settings).cpu().numpy()
        if name == spec.fusion:
            attention = risk_model.slice_attention(slices, ehr)
    checks["weights_unchanged"]["image_encoder"] = weights_digest(encoder) == encoder_digest
    worst = max(checks["risk_agreement"].values())
    if worst > 1e-3:
        raise ValueError(f"the risk recomputed from the CT differs from the run's predictions by up to {worst:.2g}: "
                         "the encoder or its preprocessing is not the one the embeddings were made with")

    regions = _twin_regions(spec, ids, volumes, preprocess) if spec.manifest.data.source == "synthetic" else {}
    regions["body"] = np.stack([region_occupancy(body_mask(v.hu), v.spacing, preprocess) for v in volumes])
    rows = []
    for name, m in maps.items():
        for region, occ in regions.items():
            for i in range(len(ids)):
                rows.append({"case": i + 1, "model": name, "region": region, **localisation(m[i], occ[i])})
    per_case = pd.DataFrame(rows)
    summary, paired = summarise(per_case, fusion=spec.fusion, n_boot=spec.n_boot, seed=spec.seed)
    randomisation = None
    if spec.randomisation:
        randomisation = pd.DataFrame([{"case": i + 1, "model": name, "spearman": rank_correlation(maps[name][i], r[i])}
                                      for name, r in random_maps.items() for i in range(len(ids))])
    result = SaliencyResult(spec=spec, cases=cases, counts=counts, slices=slices[:, :, 0].cpu().numpy(), maps=maps,
                            regions=regions, per_case=per_case, summary=summary, paired=paired,
                            randomisation=randomisation, attention=attention, probability=probability,
                            timing=timing, checks=checks, method_note=note)
    _write(result, method, settings, baseline)
    return result


def _twin_regions(spec: SaliencySpec, ids: list[str], volumes: list, preprocess) -> dict[str, np.ndarray]:
    from helpers.truth import ANATOMY, read_anatomy, read_mask

    twin_dir = spec.manifest.twin_dir
    lesion, shared = [], []
    for study_id, volume in zip(ids, volumes, strict=True):
        mask = read_mask(twin_dir, spec.task, study_id, reader="saliency")
        anatomy = read_anatomy(twin_dir, spec.task, study_id, reader="saliency")
        if mask.shape != volume.hu.shape:
            raise ValueError(f"study {study_id}: mask shape {mask.shape} differs from its volume's {volume.hu.shape}")
        is_lesion = mask == _LESION_LABEL[spec.task]
        structures = np.isin(anatomy, [ANATOMY["heart"], ANATOMY["pulmonary_arteries"]]) & ~is_lesion
        lesion.append(region_occupancy(is_lesion, volume.spacing, preprocess))
        shared.append(region_occupancy(structures, volume.spacing, preprocess))
    return {"lesion": np.stack(lesion), "cardiac_pa": np.stack(shared)}


def _write(result: SaliencyResult, method: str, settings: dict, baseline: float) -> None:
    out = Path(result.spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "saliency.json").unlink(missing_ok=True)
    result.cases.assign(case=np.arange(1, len(result.cases) + 1)).to_csv(out / "cases.csv", index=False)
    for name in ("per_case", "summary", "paired", "randomisation"):
        frame = getattr(result, name)  # only randomisation may be None
        target = out / ("localisation.csv" if name == "per_case" else f"{name}.csv")
        if frame is not None:
            frame.to_csv(target, index=False)
        else:
            target.unlink(missing_ok=True)
    np.savez_compressed(out / "attributions.npz", **{k: v.astype(np.float16) for k, v in result.maps.items()})
    spec = {f.name: getattr(result.spec, f.name) for f in fields(result.spec) if f.name != "manifest"}
    record = {"spec": spec, "method_used": method, "settings": settings, "baseline": baseline,
              "timing_seconds": result.timing, "checks": result.checks, "note": result.method_note}
    (out / "saliency.json").write_text(json.dumps(record, indent=2, default=str))


# ---------------------------------------------------------------------------------------------
# Figures, tables and the reading (the notebook's display; no identifiers: cases are numbered)

_METHOD_LABEL = {"gradient": "gradient", "smoothgrad": "SmoothGrad", "integrated_gradients": "integrated gradients",
                 "occlusion": "occlusion"}


def _shown_slice(result: SaliencyResult, i: int) -> int:
    """The slice of case ``i`` to show: the one with most of the task's lesion, else the one
    where the fusion's attribution is largest."""
    if "lesion" in result.regions and result.regions["lesion"][i].sum() > 0:
        return int(result.regions["lesion"][i].sum(axis=(1, 2)).argmax())
    return int(np.abs(result.maps[result.spec.fusion][i]).sum(axis=(1, 2)).argmax())


def saliency_figure(result: SaliencyResult, *, n_show: int = 4, method: str | None = None):
    """The paper's Figure 2 for this run: for the ``n_show`` highest-risk cases, one slice in
    the task's window, then the image-only and the fusion map over it (absolute attribution,
    each map scaled to its own 99.5th percentile), titled with each model's predicted
    probability P of the event by the horizon. On the twin the lesion is outlined (red) and
    the heart and pulmonary arteries (cyan). Returns (figure, alt text)."""
    import matplotlib.pyplot as plt

    spec = result.spec
    task = get_task(spec.task)
    label = get_strategy(spec.fusion).label
    models = [(REFERENCE, "Image only"), (spec.fusion, label)]
    n = min(n_show, len(result.cases))
    fig, axes = plt.subplots(n, 3, figsize=(7.2, 2.5 * n), squeeze=False)
    for i in range(n):
        k = _shown_slice(result, i)
        ct = result.slices[i, k]
        axes[i, 0].imshow(ct, cmap="gray", vmin=0, vmax=1)
        axes[i, 0].set_title(f"case {i + 1}, slice {k + 1} of {result.slices.shape[1]}", fontsize=8)
        for j, (name, title) in enumerate(models, start=1):
            m = np.abs(result.maps[name][i, k])
            scale = float(np.quantile(np.abs(result.maps[name][i]), 0.995)) or 1.0
            axes[i, j].imshow(ct, cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(np.ma.masked_less(m / scale, 0.15), cmap="inferno", vmin=0, vmax=1, alpha=0.75)
            axes[i, j].set_title(f"{title}: P = {result.probability[name][i]:.2f}", fontsize=8)
        if "lesion" in result.regions:
            for ax in axes[i]:
                for region, colour in (("cardiac_pa", "cyan"), ("lesion", "red")):
                    if result.regions[region][i, k].max() > 0.25:
                        ax.contour(result.regions[region][i, k], levels=[0.25], colors=colour, linewidths=0.6)
        for ax in axes[i]:
            ax.axis("off")
    method = _METHOD_LABEL[method or spec.method]
    outline = (f"; outlined: {REGIONS[spec.task]['lesion']} (red), heart and pulmonary arteries (cyan)"
               if "lesion" in result.regions else "")
    fig.suptitle(f"{spec.task.upper()}: {method} saliency, image only vs {label}\n"
                 f"P: predicted probability of the event within {task.horizon_days} days{outline}", fontsize=9)
    fig.tight_layout()
    risks = lambda name: ", ".join(f"{p:.2f}" for p in result.probability[name][:n])  # noqa: E731
    alt = (f"{n} rows, one per high-risk {spec.task.upper()} patient who had the event: an axial CT slice in the "
           f"task's window, then the {method} saliency map of the image-only model and of the {label} model "
           f"over it. Predicted event probabilities, image only: {risks(REFERENCE)}; {label}: {risks(spec.fusion)}.")
    if "lesion" in result.regions:
        mass = result.per_case[result.per_case["region"] == "lesion"].groupby("model", sort=False)["mass"].mean()
        alt += (f" Mean share of the map on the {REGIONS[spec.task]['lesion']} over all {len(result.cases)} cases: "
                f"image only {mass.get(REFERENCE, np.nan):.1%}, {label} {mass.get(spec.fusion, np.nan):.1%}.")
    return fig, alt


def attention_figure(result: SaliencyResult, *, n_show: int = 4):
    """Attention strategies with EHR queries over slice tokens: the attention weight of each
    slice (bars) next to the share of the task's lesion on that slice (line, on the twin), for
    the first ``n_show`` cases. None for a strategy without such attention. Returns (figure,
    alt text) or None."""
    import matplotlib.pyplot as plt

    if result.attention is None:
        return None
    n = min(n_show, len(result.cases))
    t = result.attention.shape[1]
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.4), squeeze=False, sharey=True)
    lesion_label = REGIONS[result.spec.task]["lesion"]
    for i in range(n):
        ax = axes[0, i]
        ax.bar(np.arange(1, t + 1), result.attention[i], color="#3367d6", label="attention")
        ax.axhline(1.0 / t, color="0.5", lw=0.8, ls="--", label="uniform")
        if "lesion" in result.regions:
            per_slice = result.regions["lesion"][i].sum(axis=(1, 2))
            if per_slice.sum() > 0:
                ax.plot(np.arange(1, t + 1), per_slice / per_slice.sum(), color="red", lw=1.2,
                        label=f"share of {lesion_label}")
        ax.set_title(f"case {i + 1}", fontsize=8)
        ax.set_xlabel("slice", fontsize=8)
    axes[0, 0].set_ylabel("weight", fontsize=8)
    axes[0, -1].legend(fontsize=7)
    fig.suptitle(f"{get_strategy(result.spec.fusion).label}: EHR queries' attention over the CT's slices", fontsize=9)
    fig.tight_layout()
    alt = (f"Bar charts for {n} cases: the attention weight the EHR tokens give each of the {t} slice tokens, "
           f"against a uniform 1/{t}" + (f", with the share of the {lesion_label} on each slice as a line."
                                          if "lesion" in result.regions else "."))
    return fig, alt


def attention_table(result: SaliencyResult) -> pd.DataFrame | None:
    """Per case: the attention mass on the slices that hold the task's lesion, the share of
    slices that do (what uniform attention gives), and the rank correlation between a slice's
    attention and its amount of lesion. None without slice attention or without truth."""
    from scipy.stats import spearmanr

    if result.attention is None or "lesion" not in result.regions:
        return None
    rows = []
    for i in range(len(result.cases)):
        lesion = result.regions["lesion"][i].sum(axis=(1, 2))
        has = lesion > 0
        if not has.any():
            rows.append({"case": i + 1, "attention on lesion slices": np.nan, "share of slices": 0.0,
                         "spearman": np.nan})
            continue
        rho = spearmanr(result.attention[i], lesion).statistic if has.sum() < len(has) or np.ptp(lesion) > 0 else np.nan
        rows.append({"case": i + 1, "attention on lesion slices": float(result.attention[i][has].sum()),
                     "share of slices": float(has.mean()), "spearman": float(rho)})
    return pd.DataFrame(rows)


def summary_table(result: SaliencyResult) -> pd.DataFrame:
    """The localisation summary for display: per model and region, the cases measured, the
    mean mass share and pointing-game hit rate with 95% CIs, the region's area share and the
    enrichment."""
    labels = {REFERENCE: "Image only", result.spec.fusion: get_strategy(result.spec.fusion).label}
    regions = REGIONS[result.spec.task]
    pct = lambda r, k: f"{r[k]:.1%} [{r[k + '_lower']:.1%}, {r[k + '_upper']:.1%}]"  # noqa: E731
    return pd.DataFrame([{"model": labels[r["model"]], "region": regions[r["region"]], "cases": int(r["cases"]),
                          "mass inside (95% CI)": pct(r, "mass"), "area share": f"{r['area']:.1%}",
                          "enrichment": f"{r['enrichment']:.1f}x", "pointing game (95% CI)": pct(r, "hit")}
                         for _, r in result.summary.iterrows()])


def reading(result: SaliencyResult) -> str:
    """What the measured localisation says, in a sentence per region, whichever way it goes."""
    if result.paired.empty:
        return "No localisation was measured (fewer than two cases)."
    label = get_strategy(result.spec.fusion).label
    lines = [] if "lesion" in result.regions else ["No lesion masks (real data): only the share inside the body."]
    for _, r in result.paired[result.paired["measure"] == "mass"].iterrows():
        region = REGIONS[result.spec.task][r["region"]]
        region = "body" if r["region"] == "body" else region
        if r["lower"] > 0:
            verdict = f"{label} puts more of its attribution on the {region} than image-only"
        elif r["upper"] < 0:
            verdict = f"{label} puts less of its attribution on the {region} than image-only"
        else:
            verdict = f"no difference between {label} and image-only on the {region} is shown"
        lines.append(f"- **{region}**: {r['fusion']:.1%} of the {label} map against {r['image_only']:.1%} of "
                     f"the image-only map (difference {r['difference']:+.1%}, 95% CI [{r['lower']:+.1%}, "
                     f"{r['upper']:+.1%}], paired bootstrap p = {r['p_value']:.3f}, {int(r['cases'])} cases): "
                     f"{verdict}.")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Across runs (the results chapter)


def collect(saliency_root: str | Path) -> pd.DataFrame:
    """Every finished saliency run under ``saliency_root`` (``<task>/<ehr_repr>/<fusion>/
    seed-<n>/``, finished = ``saliency.json`` written): one row per run, region and model
    pair with the mass share of image-only and of the fusion with their 95% CIs, the paired
    difference with its CI and p-value, the pointing-game rates and the method used."""
    rows = []
    for record in sorted(Path(saliency_root).glob("*/*/*/seed-*/saliency.json")):
        folder = record.parent
        task, ehr_repr, fusion = folder.parts[-4:-1]
        meta = json.loads(record.read_text())
        summary = pd.read_csv(folder / "summary.csv").set_index(["model", "region"])
        paired = pd.read_csv(folder / "paired.csv").set_index(["region", "measure"])
        for region in summary.index.get_level_values("region").unique():
            if (region, "mass") not in paired.index:
                continue
            mass, hit = paired.loc[(region, "mass")], paired.loc[(region, "hit")]
            ref, fus = summary.loc[(REFERENCE, region)], summary.loc[(fusion, region)]
            rows.append({"task": task, "ehr_repr": ehr_repr, "fusion": fusion, "seed": int(folder.name[5:]),
                         "method": meta["method_used"], "region": region, "cases": int(mass["cases"]),
                         "image_only": ref["mass"], "image_only_lower": ref["mass_lower"],
                         "image_only_upper": ref["mass_upper"], "fusion_mass": fus["mass"],
                         "fusion_lower": fus["mass_lower"], "fusion_upper": fus["mass_upper"],
                         "difference": mass["difference"], "lower": mass["lower"], "upper": mass["upper"],
                         "p_value": mass["p_value"], "area": fus["area"], "hit_image_only": hit["image_only"],
                         "hit_fusion": hit["fusion"]})
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    from helpers.tasks import TASKS

    order = (frame["task"].map(list(TASKS).index) * 10_000 + frame["fusion"].map(FUSIONS.index) * 100
             + frame.apply(lambda r: list(REGIONS[r["task"]]).index(r["region"]), axis=1))
    return frame.iloc[np.argsort(order.to_numpy(), kind="stable")].reset_index(drop=True)


def localisation_table(collected: pd.DataFrame) -> pd.DataFrame:
    """``collect``'s rows for display: per task, strategy and region, the share of attribution
    mass inside for image-only and the fusion (95% CI), the paired difference (95% CI, p) and
    the region's area share (what a uniform map scores)."""
    if collected.empty:
        return pd.DataFrame()
    pct = lambda v, lo, hi: f"{v:.2%} [{lo:.2%}, {hi:.2%}]"  # noqa: E731
    return pd.DataFrame([{
        "task": r["task"].upper(), "strategy": f"{get_strategy(r['fusion']).label} ({r['ehr_repr']})",
        "region": REGIONS[r["task"]][r["region"]], "cases": r["cases"], "area share": f"{r['area']:.2%}",
        "image only": pct(r["image_only"], r["image_only_lower"], r["image_only_upper"]),
        "fusion": pct(r["fusion_mass"], r["fusion_lower"], r["fusion_upper"]),
        "fusion - image only": f"{r['difference']:+.2%} [{r['lower']:+.2%}, {r['upper']:+.2%}]",
        "p": f"{r['p_value']:.3f}"} for _, r in collected.iterrows()])


def localisation_reading(collected: pd.DataFrame) -> str:
    """One sentence per task and region over ``collect``'s rows: in how many strategies the
    fusion puts more of its attribution mass inside than image-only (95% CI above 0), less
    (below 0), or no difference is shown. Counts only, whichever way they go."""
    if collected.empty:
        return "No saliency run was found."
    from helpers.tasks import TASKS

    lines = []
    for (task, region), part in collected.groupby(["task", "region"], sort=False):
        more = part.loc[part["lower"] > 0, "fusion"].map(lambda f: get_strategy(f).label).tolist()
        less = part.loc[part["upper"] < 0, "fusion"].map(lambda f: get_strategy(f).label).tolist()
        same = len(part) - len(more) - len(less)
        listed = lambda names: f" ({', '.join(names)})" if names else ""  # noqa: E731
        lines.append(f"- **{TASKS[task].name.upper()}, {REGIONS[task][region]}**: of {len(part)} strategies, "
                     f"{len(more)} put more of their map there than image-only{listed(more)}, {len(less)} less"
                     f"{listed(less)}, and {same} {'shows' if same == 1 else 'show'} no difference.")
    return "\n".join(lines)
