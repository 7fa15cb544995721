"""The survival training loop and the files a training run writes.

``fit`` trains a ``SurvivalModel`` with the Cox partial likelihood (Efron) or the Weibull
negative log-likelihood plus an explicit L2 penalty on the trainable weights (the paper's
objective ``-sum log p + lambda ||theta||^2``), on event-stratified mini-batches, with early
stopping on the validation loss. For ``contrastive`` it first aligns the projection heads with
the symmetric InfoNCE (step 1), then trains the head with the projections frozen (default) or
fine-tuned (step 2). The embeddings are inputs: gradients reach only the fusion modules and the
head. It is deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import json
import time as _time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.fusion import Prepared, SurvivalModel, build_model, info_nce, retrieval_accuracy
from helpers.metrics import harrell_c
from helpers.runs import RunSpec, run_dir, survival_column
from helpers.survival import (
    Adam,
    BreslowBaseline,
    cox_loss,
    event_stratified_batches,
    weibull_loss,
    weibull_survival,
)

__all__ = [
    "TrainConfig",
    "FitResult",
    "Arrays",
    "fit",
    "predict",
    "predict_output",
    "alignment_report",
    "missing_counts",
    "split_arrays",
    "write_run",
    "run_dir",
]


@dataclass(frozen=True)
class TrainConfig:
    """Training hyper-parameters. ``l2`` is lambda in the objective; ``stop_on`` is the
    early-stopping criterion on the validation split (``"loss"``: the survival loss, or
    ``"c_index"``: Harrell's C); ``patience`` counts epochs
    without a better validation loss before stopping; ``loss`` is ``"cox"`` or ``"weibull"``.

    Fusion options (see ``helpers.fusion``): ``d_model`` (token width = d_k with one head),
    ``heads``, ``ehr_tokens`` (``"feature"``/``"chunk"``) and ``ehr_chunks``, ``image_tokens``
    (``"slices"``/``"chunk"``) and ``image_chunks``, ``modality_dropout`` (probability that a
    bimodal training study loses its image, and the same for its EHR).

    Contrastive: ``proj_dim``, ``temperature`` (initial tau), ``learn_temperature`` (CLIP-style
    learnable log 1/tau, tau >= 0.01), ``align_epochs`` (step-1 epoch limit, early-stopped on
    the validation InfoNCE with ``patience``), ``finetune_projection`` (step 2 also trains the
    projections; default frozen).
    """

    lr: float = 1e-3
    l2: float = 1e-4
    stop_on: str = "loss"
    batch_size: int = 256
    max_epochs: int = 100
    patience: int = 10
    dropout: float = 0.1
    linear: bool = False
    loss: str = "cox"
    d_model: int = 64
    heads: int = 1
    ehr_tokens: str = "feature"
    ehr_chunks: int = 8
    image_tokens: str = "slices"
    image_chunks: int = 16
    modality_dropout: float = 0.1
    proj_dim: int = 128
    temperature: float = 0.07
    learn_temperature: bool = True
    align_epochs: int = 100
    finetune_projection: bool = False

    def model_options(self) -> dict:
        """The ``build_model`` keyword arguments this configuration sets."""
        keys = ("dropout", "linear", "loss", "d_model", "heads", "ehr_tokens", "ehr_chunks", "image_tokens",
                "image_chunks", "proj_dim", "temperature", "learn_temperature", "modality_dropout")
        return {k: getattr(self, k) for k in keys}


@dataclass
class Arrays:
    """One split's inputs: ``img`` (n, d_img) / ``ehr`` (n, d_ehr) float32 pooled embeddings or
    None, ``time`` (n,) days, ``event`` (n,) 0/1; optional ``img_tokens`` (n, T, d_token)
    float32 per-slice tokens with ``img_token_mask`` (n, T) bool (True = real token, for
    studies with fewer slices), and ``img_missing`` / ``ehr_missing`` (n,) bool for studies
    without a CT or without EHR history (their rows of ``img`` / ``ehr`` are ignored)."""

    img: np.ndarray | None
    ehr: np.ndarray | None
    time: np.ndarray
    event: np.ndarray
    img_tokens: np.ndarray | None = None
    img_token_mask: np.ndarray | None = None
    img_missing: np.ndarray | None = None
    ehr_missing: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.time)

    def inputs(self) -> dict[str, torch.Tensor | None]:
        """The model's inputs as tensors (shared memory where possible)."""
        as_f = lambda a: None if a is None else torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
        as_b = lambda a: None if a is None else torch.as_tensor(np.asarray(a, dtype=bool))  # noqa: E731
        return {"img": as_f(self.img), "ehr": as_f(self.ehr), "img_tokens": as_f(self.img_tokens),
                "img_token_mask": as_b(self.img_token_mask), "img_missing": as_b(self.img_missing),
                "ehr_missing": as_b(self.ehr_missing)}

    def outcome(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``time`` float64 (n,) and ``event`` bool (n,)."""
        return torch.as_tensor(self.time, dtype=torch.float64), torch.as_tensor(np.asarray(self.event)).bool()


@dataclass
class FitResult:
    model: SurvivalModel
    history: pd.DataFrame
    best_epoch: int
    seconds: float
    config: TrainConfig = field(default_factory=TrainConfig)
    alignment: pd.DataFrame | None = None


def _l2(params) -> torch.Tensor:
    return sum((p**2).sum() for name, p in params if p.requires_grad and name.endswith("weight"))


def _rows(inputs: dict, idx: torch.Tensor) -> dict:
    return {k: None if v is None else v[idx] for k, v in inputs.items()}


def _call(model: SurvivalModel, inputs: dict | Prepared) -> torch.Tensor:
    if isinstance(inputs, Prepared):
        return model.forward_prepared(inputs)
    return model(inputs["img"], inputs["ehr"], **{k: v for k, v in inputs.items() if k not in ("img", "ehr")})


def _loss(model: SurvivalModel, output: torch.Tensor, event: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    return weibull_loss(output, event, time) if model.loss == "weibull" else cox_loss(output, event, time)


def _present(inputs: dict, n: int) -> torch.Tensor:
    both = torch.ones(n, dtype=torch.bool)
    for key in ("img_missing", "ehr_missing"):
        if inputs[key] is not None:
            both &= ~inputs[key]
    return both


def _check(name: str, data: Arrays, model: SurvivalModel) -> None:
    if model.uses_image and data.img is None:
        raise ValueError(f"fusion {model.fusion!r} needs image embeddings; the {name} split has none")
    if model.uses_ehr and data.ehr is None:
        raise ValueError(f"fusion {model.fusion!r} needs EHR embeddings; the {name} split has none")
    if model.needs_image_tokens and data.img_tokens is None:
        raise ValueError(
            f"fusion {model.fusion!r} with image_tokens='slices' needs per-slice image tokens; the {name} split has none "
            "(read the embedding table with tokens=True, or use image_tokens='chunk')"
        )


def _align(model: SurvivalModel, train: Prepared, val: Prepared, config: TrainConfig,
           rng: np.random.Generator) -> pd.DataFrame:
    """Step 1 of ``contrastive``: fit the projection heads (and tau) with the symmetric
    InfoNCE on random batches of training studies with both modalities; keep the epoch with
    the lowest validation InfoNCE. ``train`` and ``val`` are the splits as ``model.prepare``
    gives them (standardised once). The model stays in eval mode (no modality dropout)."""
    params = model.projection_parameters()
    named = [(n, p) for n, p in model.named_parameters() if n.startswith(("proj_img", "proj_ehr"))]
    optimiser = Adam(params, lr=config.lr)
    both = lambda p: _present({"img_missing": p.img_missing, "ehr_missing": p.ehr_missing}, len(p))  # noqa: E731
    keep = torch.nonzero(both(train)).squeeze(1).numpy()
    v_keep = torch.nonzero(both(val)).squeeze(1)
    if len(keep) < 2 or len(v_keep) < 2:
        raise ValueError(f"contrastive alignment needs >= 2 studies with both modalities in train and val, got {len(keep)} and {len(v_keep)}")
    val_rows = val.rows(v_keep)
    project = lambda p: model._project(p, *model._masks(p))  # noqa: E731  (rows with both modalities)
    model.eval()
    state = lambda: {k: v.detach().clone() for k, v in model.state_dict().items()}  # noqa: E731
    best, rows = (np.inf, 0, state()), []
    for epoch in range(1, config.align_epochs + 1):
        order = rng.permutation(keep)
        losses = []
        for start in range(0, len(order), config.batch_size):
            batch = order[start:start + config.batch_size]
            if len(batch) < 2:
                continue
            u_img, u_ehr = project(train.rows(torch.as_tensor(batch.astype(np.int64))))
            loss = info_nce(u_img, u_ehr, model.temperature) + config.l2 * _l2(named)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        with torch.no_grad():
            v_img, v_ehr = project(val_rows)
            v_loss = float(info_nce(v_img, v_ehr, model.temperature))
            v_acc = retrieval_accuracy(v_img, v_ehr)
        rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": v_loss,
                     "val_top1": v_acc, "temperature": float(model.temperature.detach())})
        if v_loss < best[0] - 1e-6:
            best = (v_loss, epoch, state())
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    optimiser.zero_grad(set_to_none=True)
    return pd.DataFrame(rows)


def fit(fusion: str, train: Arrays, val: Arrays, *, config: TrainConfig, seed: int) -> FitResult:
    """Train ``fusion`` on ``train`` with early stopping on ``val``; returns the best model."""
    if config.stop_on not in ("loss", "c_index"):
        raise ValueError(f"parameter 'stop_on': unknown value {config.stop_on!r}; expected one of loss, c_index")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    d_img = train.img.shape[1] if train.img is not None else 0
    d_ehr = train.ehr.shape[1] if train.ehr is not None else 0
    d_token = train.img_tokens.shape[2] if train.img_tokens is not None else None
    model = build_model(fusion, d_img, d_ehr, d_token=d_token, **config.model_options())
    for name, data in (("train", train), ("val", val)):
        _check(name, data, model)
    t_in, v_in = train.inputs(), val.inputs()
    t_time, t_event = train.outcome()
    v_time, v_event = val.outcome()
    present_img = ~t_in["img_missing"] if t_in["img_missing"] is not None else slice(None)
    present_ehr = ~t_in["ehr_missing"] if t_in["ehr_missing"] is not None else slice(None)
    model.fit_standardisation(
        t_in["img"][present_img] if t_in["img"] is not None else None,
        t_in["ehr"][present_ehr] if t_in["ehr"] is not None else None,
        t_in["img_tokens"][present_img] if model.needs_image_tokens else None,
        t_in["img_token_mask"][present_img] if model.needs_image_tokens and t_in["img_token_mask"] is not None else None,
    )
    model.fit_time_scale(t_time, t_event)
    start = _time.perf_counter()
    # every split is standardised once (kept columns only), not at every batch
    with torch.no_grad():
        t_prep, v_prep = _prepare(model, t_in), _prepare(model, v_in)
    del t_in, v_in
    alignment = None
    if fusion == "contrastive":
        alignment = _align(model, t_prep, v_prep, config, rng)
        if not config.finetune_projection:
            for p in model.projection_parameters():
                p.requires_grad_(False)
    # the same arithmetic as torch.optim.Adam, without its one-off import of torch._dynamo
    optimiser = Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    best = (np.inf, 0, {k: v.clone() for k, v in model.state_dict().items()})
    rows = []
    shuffled = None
    for epoch in range(1, config.max_epochs + 1):
        model.train()
        losses = []
        batches = event_stratified_batches(train.event, config.batch_size, rng)
        # the epoch's studies in batch order, copied into one buffer: each batch is a slice
        order = torch.as_tensor(np.concatenate(batches).astype(np.int64))
        shuffled = t_prep.gather(order, out=shuffled)
        ends = np.cumsum([len(b) for b in batches]).tolist()
        for a, b in zip([0] + ends[:-1], ends, strict=True):
            idx = order[a:b]
            output = model.forward_prepared(shuffled.rows(slice(a, b)))
            loss = _loss(model, output, t_event[idx], t_time[idx]) + config.l2 * _l2(model.named_parameters())
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        v_out = predict_output(model, val, inputs=v_prep)
        v_loss = float(_loss(model, v_out, v_event, v_time))
        v_c = harrell_c(time=val.time, event=val.event, risk=model.risk(v_out).double().numpy())
        rows.append({"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": v_loss, "val_c_index": v_c})
        # lower is better for both criteria
        criterion = v_loss if config.stop_on == "loss" else -v_c
        if criterion < best[0] - 1e-6:
            best = (criterion, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return FitResult(model, pd.DataFrame(rows), best[1], _time.perf_counter() - start, config, alignment)


def _prepare(model: SurvivalModel, inputs: dict) -> Prepared:
    return model.prepare(inputs["img"], inputs["ehr"], **{k: v for k, v in inputs.items() if k not in ("img", "ehr")})


def predict_output(model: SurvivalModel, data: Arrays, *, inputs: dict | Prepared | None = None,
                   chunk: int = 1024) -> torch.Tensor:
    """The model's raw output in eval mode, without gradients: log-hazard (n,) for Cox, log
    scale and log shape (n, 2) for Weibull. Scored ``chunk`` studies at a time (``inputs``:
    ``data.inputs()`` or the model's ``prepare`` of them, by default the former)."""
    inputs = data.inputs() if inputs is None else inputs
    model.eval()
    n = len(data)
    with torch.no_grad():
        if isinstance(inputs, Prepared):
            parts = [model.forward_prepared(inputs.rows(slice(a, min(n, a + chunk)))) for a in range(0, n, chunk)]
        else:
            parts = [_call(model, {k: None if v is None else v[a:a + chunk] for k, v in inputs.items()})
                     for a in range(0, n, chunk)]
    return torch.cat(parts)


def predict(model: SurvivalModel, data: Arrays) -> np.ndarray:
    """Risk for each sample, float64 (n,); higher = earlier event (the log-hazard for Cox,
    minus the log median time for Weibull)."""
    return model.risk(predict_output(model, data)).double().numpy()


def alignment_report(model: SurvivalModel, data: Arrays) -> dict:
    """Contrastive only: top-1 image-to-EHR retrieval accuracy among the studies of ``data``
    that have both modalities (``n``, ``top1``, and ``chance`` = 1 / n)."""
    inputs = data.inputs()
    keep = _present(inputs, len(data))
    model.eval()
    with torch.no_grad():
        u_img, u_ehr = model.project(inputs["img"][keep], inputs["ehr"][keep])
    n = int(keep.sum())
    return {"n": n, "top1": retrieval_accuracy(u_img, u_ehr), "chance": 1.0 / n}


def missing_counts(splits: dict[str, tuple[np.ndarray, Arrays]]) -> dict:
    """``{split: {"n", "no_image", "no_ehr"}}``: how many studies lacked each modality."""
    count = lambda m: 0 if m is None else int(np.sum(m))  # noqa: E731
    return {name: {"n": len(data), "no_image": count(data.img_missing), "no_ehr": count(data.ehr_missing)}
            for name, (_, data) in splits.items()}


def _lookup(table, study_ids: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    position = {sid: i for i, sid in enumerate(table.study_ids)}
    rows = np.array([position.get(str(s), -1) for s in study_ids], dtype=np.int64)
    if len(rows) and (rows < 0).all():
        raise ValueError(f"{source}: none of the {len(rows)} cohort studies has an embedding (wrong file?)")
    return rows, rows < 0


def split_arrays(cohort: pd.DataFrame, img_table=None, ehr_table=None, *, image_tokens: bool = False,
                 splits: tuple[str, ...] = ("train", "val", "test", "external")) -> dict[str, tuple[np.ndarray, Arrays]]:
    """``{split: (study_ids, Arrays)}`` from a cohort table and embedding tables
    (``helpers.embeddings.EmbeddingTable`` or None). A cohort study absent from a table is
    marked missing for that modality (its values are zeros and the model uses its learned
    missing token). ``image_tokens`` stacks the per-slice tokens to (n, T, d), padding studies
    with fewer slices and setting ``img_token_mask``."""
    ids = cohort["study_id"].astype(str).to_numpy()
    img_rows, img_missing = _lookup(img_table, ids, "image embeddings") if img_table is not None else (None, None)
    ehr_rows, ehr_missing = _lookup(ehr_table, ids, "EHR embeddings") if ehr_table is not None else (None, None)

    def take(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
        out = matrix[np.maximum(rows, 0)].astype(np.float32, copy=False)  # a new array: the index copies
        out[rows < 0] = 0.0
        return out

    block = tokens = mask = None
    if image_tokens:
        if img_table is None or img_table.tokens is None:
            raise ValueError("image embeddings: the table has no 'tokens' column (per-slice tokens)")
        # every study with the same number of tokens: one (n, T, d) array, each split takes its rows
        block = img_table.token_array() if hasattr(img_table, "token_array") else None
        if block is None:
            lengths = np.array([len(img_table.tokens[r]) if r >= 0 else 0 for r in img_rows])
            t_max, dim = int(lengths.max()), int(img_table.tokens[int(img_rows[img_rows >= 0][0])].shape[1])
            tokens = np.zeros((len(ids), t_max, dim), dtype=np.float32)
            for i, r in enumerate(img_rows):
                if r >= 0:
                    tokens[i, : lengths[i]] = img_table.tokens[r]
            lengths[img_missing] = t_max
            mask = None if (lengths == t_max).all() else np.arange(t_max)[None, :] < lengths[:, None]
    out = {}
    for name in splits:
        m = (cohort["split"] == name).to_numpy()
        if not m.any():
            continue
        split_tokens = take(block, img_rows[m]) if block is not None else tokens[m] if tokens is not None else None
        out[name] = (ids[m], Arrays(
            img=take(img_table.embedding, img_rows[m]) if img_table is not None else None,
            ehr=take(ehr_table.embedding, ehr_rows[m]) if ehr_table is not None else None,
            time=cohort["time"].to_numpy()[m], event=cohort["event"].to_numpy()[m],
            img_tokens=split_tokens,
            img_token_mask=mask[m] if mask is not None else None,
            img_missing=img_missing[m] if img_missing is not None and img_missing.any() else None,
            ehr_missing=ehr_missing[m] if ehr_missing is not None and ehr_missing.any() else None))
    return out


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


def make_predictions(
    model: SurvivalModel, splits: dict[str, tuple[np.ndarray, Arrays]], horizon_days: int
) -> tuple[pd.DataFrame, dict]:
    """Predictions for every split and Harrell's C per split.

    ``splits`` maps a split name to ``(study_ids, Arrays)`` and must hold ``train`` (for the
    Breslow baseline hazard of a Cox model; a Weibull model gives S(horizon) itself). Returns the predictions table (``study_id``, ``split``,
    ``risk``, ``survival_<horizon>d``) and ``{split: {"n", "events", "c_index"}}``.
    """
    train_ids, train = splits["train"]
    baseline = BreslowBaseline(predict(model, train), train.time, train.event) if model.loss == "cox" else None
    frames, scores = [], {}
    for name, (ids, data) in splits.items():
        output = predict_output(model, data)
        risk = model.risk(output).double().numpy()
        survival = (baseline.survival(risk, horizon_days) if baseline is not None
                    else weibull_survival(output.double(), horizon_days).numpy())
        frames.append(
            pd.DataFrame(
                {
                    "study_id": ids,
                    "split": name,
                    "risk": risk,
                    survival_column(horizon_days): survival,
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


__all__ += ["survival_column", "make_predictions", "RunResult", "train_config", "train_run"]


# ---------------------------------------------------------------------------------------------
# One training run, end to end (what notebooks/03_train.ipynb calls)

_CHOICES = {"loss": ("cox", "weibull"), "stop_on": ("loss", "c_index"), "ehr_tokens": ("feature", "chunk"),
            "image_tokens": ("slices", "chunk")}


def train_config(options: dict | None = None, *, ehr_repr: str | None = None) -> TrainConfig:
    """A ``TrainConfig`` from hyper-parameter ``options`` (field names of ``TrainConfig``; the
    others keep their defaults, which are declared there only). Without an ``ehr_tokens``
    option, attention strategies cut the EHR into the tokens its representation declares
    (``helpers.tasks.EHR_REPRESENTATIONS``). Unknown names and values outside a field's
    choices raise ``ParameterError`` naming them."""
    from dataclasses import fields

    from helpers.tasks import EHR_REPRESENTATIONS, ParameterError, check_choice

    options = dict(options or {})
    known = {f.name: f for f in fields(TrainConfig)}
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ParameterError(f"training option(s) {', '.join(map(repr, unknown))} unknown; expected some of "
                             f"{', '.join(known)}")
    for name, allowed in _CHOICES.items():
        if name in options:
            check_choice(name, options[name], allowed)
    for name, value in options.items():
        default = getattr(TrainConfig, name)
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ParameterError(f"parameter {name!r}: expected true or false, got {value!r}")
        elif isinstance(default, int | float) and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ParameterError(f"parameter {name!r}: expected a number, got {value!r}")
        elif isinstance(default, int) and not isinstance(default, bool) and int(value) != value:
            raise ParameterError(f"parameter {name!r}: expected an integer, got {value!r}")
    if "ehr_tokens" not in options and ehr_repr in EHR_REPRESENTATIONS:
        options["ehr_tokens"] = EHR_REPRESENTATIONS[ehr_repr].ehr_tokens
    return TrainConfig(**{k: (int(v) if isinstance(getattr(TrainConfig, k), int)
                              and not isinstance(getattr(TrainConfig, k), bool) else v)
                          for k, v in options.items()})


@dataclass
class RunResult:
    """What ``train_run`` made: the fit, the inputs per split, the predictions and scores, the
    contrastive alignment report (empty for other strategies) and the run folder."""

    spec: RunSpec
    fit: FitResult
    splits: dict
    missing: dict
    predictions: pd.DataFrame
    scores: dict
    alignment: dict
    tokens: dict | None
    output_dir: Path


def _read_inputs(strategy, config: TrainConfig, cohort_path: Path, image_embeddings: Path | None,
                 ehr_embeddings: Path | None):
    """The cohort and the embedding tables a run of ``strategy`` reads (per-slice tokens when
    its configuration asks for them): ``(cohort, image_table, ehr_table, needs_tokens)``."""
    from helpers import cohort as hc
    from helpers.embeddings import read_embeddings

    cohort = hc.read_cohort(cohort_path)
    needs_tokens = strategy.tokens and config.image_tokens == "slices"
    img_table = read_embeddings(image_embeddings, tokens=needs_tokens) if strategy.uses_image else None
    ehr_table = read_embeddings(ehr_embeddings, tokens=False) if strategy.uses_ehr else None
    return cohort, img_table, ehr_table, needs_tokens


def _run_record(spec: RunSpec, result: FitResult, tokens: dict | None, scores: dict, missing: dict, cohort_path: Path,
                image_embeddings: Path | None, ehr_embeddings: Path | None, img_table, ehr_table, *,
                train_seconds: float, alignment: dict | None, **extra) -> tuple[dict, dict]:
    """``metrics.json`` and ``params.json`` of a run (``extra`` goes into both)."""
    from helpers.manifest import sha256_path
    from helpers.tasks import get_strategy, get_task

    strategy = get_strategy(spec.fusion)
    config = result.config
    metrics = {"task": spec.task, "ehr_repr": spec.ehr_repr, "fusion": spec.fusion, "seed": spec.seed,
               "loss": config.loss, "tokens": tokens, "best_epoch": result.best_epoch, "epochs": len(result.history),
               "train_seconds": train_seconds, "splits": scores, "missing": missing, "alignment": alignment, **extra}
    inputs = [cohort_path] + ([image_embeddings] if strategy.uses_image else []) \
        + ([ehr_embeddings] if strategy.uses_ehr else [])
    params = {"task": spec.task, "ehr_repr": spec.ehr_repr, "fusion": spec.fusion, "seed": spec.seed,
              "loss": config.loss, "tokens": tokens, "options": spec.options, "cohort_path": str(cohort_path),
              "image_embeddings": str(image_embeddings) if strategy.uses_image else None,
              "ehr_embeddings": str(ehr_embeddings) if strategy.uses_ehr else None,
              "image_encoder": img_table.metadata if img_table else None,
              "ehr_encoder": ehr_table.metadata if ehr_table else None,
              "horizon_days": get_task(spec.task).horizon_days, **extra,
              "inputs_sha256": {str(p): sha256_path(p) for p in inputs}}
    return metrics, params


def train_run(spec: RunSpec, *, progress: bool = False) -> RunResult:
    """Train the run ``spec`` names and write it (``helpers.runs`` format): read the cohort and
    embedding tables, fit with early stopping on validation, predict every split, write
    ``params.json`` (names, inputs and their sha256, encoders, configuration),
    ``predictions.parquet``, ``model.pt`` and, last, ``metrics.json``."""
    from helpers.tasks import get_strategy, get_task

    task = get_task(spec.task)
    strategy = get_strategy(spec.fusion)
    config = train_config(spec.options, ehr_repr=spec.ehr_repr)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    cohort, img_table, ehr_table, needs_tokens = _read_inputs(strategy, config, spec.cohort_path,
                                                              spec.image_embeddings, spec.ehr_embeddings)
    splits = split_arrays(cohort, img_table, ehr_table, image_tokens=needs_tokens)
    missing = missing_counts(splits)
    result = fit(spec.fusion, splits["train"][1], splits["val"][1], config=config, seed=spec.seed)
    alignment = ({s: alignment_report(result.model, splits[s][1]) for s in ("val", "test") if s in splits}
                 if spec.fusion == "contrastive" else {})
    predictions, scores = make_predictions(result.model, splits, task.horizon_days)
    tokens = {"image": config.image_tokens, "ehr": config.ehr_tokens} if strategy.tokens else None
    metrics, params = _run_record(spec, result, tokens, scores, missing, spec.cohort_path, spec.image_embeddings,
                                  spec.ehr_embeddings, img_table, ehr_table, train_seconds=round(result.seconds, 2),
                                  alignment=alignment or None)
    write_run(spec.output_dir, result=result, predictions=predictions, metrics=metrics, params=params)
    return RunResult(spec=spec, fit=result, splits=splits, missing=missing, predictions=predictions, scores=scores,
                     alignment=alignment, tokens=tokens, output_dir=Path(spec.output_dir))


def rescore_run(result: RunResult, *, cohort_path: Path, image_embeddings: Path | None,
                ehr_embeddings: Path | None, output_dir: Path, splits: tuple[str, ...] = ("external",)) -> RunResult:
    """Score the model ``result`` trained on other data: the cohort ``cohort_path``'s studies of
    ``splits`` with the embedding tables given, written as a run into ``output_dir``
    (``helpers.runs`` format: its predictions hold those splits only; ``params.json`` names
    the run the model was trained in, ``trained_in``). The Cox baseline hazard stays the
    training run's. The mechanism study scores the models of one twin setting on the external
    site under each site shift this way (``helpers.mechanism``)."""
    from helpers.tasks import get_strategy, get_task

    spec, config = result.spec, result.fit.config
    strategy = get_strategy(spec.fusion)
    if strategy.uses_image and image_embeddings is None:
        raise ValueError(f"parameter 'image_embeddings': run {spec.fusion} uses the image; give its table")
    if strategy.uses_ehr and ehr_embeddings is None:
        raise ValueError(f"parameter 'ehr_embeddings': run {spec.fusion} uses the EHR; give its table")
    cohort, img_table, ehr_table, needs_tokens = _read_inputs(strategy, config, cohort_path, image_embeddings,
                                                              ehr_embeddings)
    for path, new, old in ((image_embeddings, img_table, result.splits["train"][1].img),
                           (ehr_embeddings, ehr_table, result.splits["train"][1].ehr)):
        if new is not None and new.embedding.shape[1] != old.shape[1]:
            raise ValueError(f"{path}: embeddings of width {new.embedding.shape[1]}; the model was trained on "
                             f"width {old.shape[1]}")
    new = split_arrays(cohort, img_table, ehr_table, image_tokens=needs_tokens, splits=splits)
    if not new:
        raise ValueError(f"{cohort_path}: no study in split(s) {', '.join(splits)}")
    predictions, scores = make_predictions(result.fit.model, {"train": result.splits["train"], **new},
                                           get_task(spec.task).horizon_days)
    predictions = predictions[predictions["split"] != "train"].reset_index(drop=True)
    scores.pop("train")
    metrics, params = _run_record(spec, result.fit, result.tokens, scores, missing_counts(new), cohort_path,
                                  image_embeddings, ehr_embeddings, img_table, ehr_table, train_seconds=0.0,
                                  alignment=None, trained_in=str(result.output_dir))
    write_run(output_dir, result=result.fit, predictions=predictions, metrics=metrics, params=params)
    return RunResult(spec=spec, fit=result.fit, splits=new, missing=metrics["missing"], predictions=predictions,
                     scores=scores, alignment={}, tokens=result.tokens, output_dir=Path(output_dir))


__all__ += ["rescore_run"]
