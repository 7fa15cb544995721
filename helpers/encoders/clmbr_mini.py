"""``clmbr_mini``: a small CLMBR-style autoregressive EHR model, pretrained here on MEDS timelines.

CLMBR (Steinberg et al., 2021; CLMBR-T-base in femr) reads a patient's coded events in time
order and is pretrained to predict the next code; the hidden state after the last event is the
patient representation. This module is the same idea at laptop scale:

* **Tokens** (``vocabulary.json``): one token per MEDS code seen at least ``min_count`` times
  in the *training* subjects, plus ``[PAD]``, ``[UNK]`` (rarer or unseen codes) and ``[BOS]``.
  A code that carries a ``numeric_value`` in most of its training rows (labs and vitals) is
  split into ``n_bins`` tokens ``CODE#k`` by the training-set quantiles of its values (a value
  is in bin ``k`` when exactly ``k`` of the edges are <= it); its rows without a value keep
  the bare code. Units are not converted: a site reporting another unit lands in other bins,
  as it would for CLMBR-T-base.
* **Sequence** of a subject: ``[BOS]``, the static events (time null, e.g. ``Gender/F``), then
  the timed events in MEDS order (time, then code). Longer timelines keep the prefix and the
  last ``max_len - len(prefix)`` timed events.
* **Time features** added to each token embedding through a linear layer: age at the event
  (years / 100; 0 without ``MEDS_BIRTH``), log1p(days since the previous timed event) / 5, and
  1 for prefix tokens (BOS and static), 0 otherwise.
* **Model**: a ``transformers`` ``LlamaForCausalLM`` (rotary positions, causal attention;
  hidden 128, 2 layers by default) fed through ``inputs_embeds``; loss: next-token cross
  entropy. Training windows are random ``max_len`` crops of each training subject's timeline
  (seeded); validation uses each validation subject's last window.
* **Representation at the index time** (``ClmbrMiniEncoder.embed``): the final hidden state
  (after the last layer norm) at the last event *strictly before* the study's ``index_time``.
  Events at or after the index, including those of the same minute, are never read, so
  anything recorded at the CT or later cannot leak into the embedding. With the MEDS export
  (``helpers.meds``) this is the index rule of ``helpers.ehr``: an OMOP record with a datetime
  is read iff ``datetime < index_time``; a date-only record sits at 23:59:59 of its day, so it
  is read iff its date is before the index date. (For a CT in the last second of a day, after
  23:59:59, the cut is at 23:59:59: MEDS cannot tell a date-only record of that day from one
  timed at 23:59:59, and neither is read.) A subject with no timed
  event before the index (or absent from the events) gets the state after ``[BOS]`` and its
  static codes (and ``MEDS_BIRTH`` with its age when present: a learned state); studies with
  no clinical event (other than birth and static codes) before the index are counted in
  ``ClmbrMiniEncoder.last_stats["no_prior_events"]``.

Training is deterministic for a seed on CPU (seeded torch and numpy generators; the same
number of threads gives bit-identical weights).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

__all__ = [
    "ClmbrMiniConfig",
    "PretrainResult",
    "ClmbrMiniEncoder",
    "ClmbrMiniError",
    "pretrain_clmbr_mini",
]

FORMAT_VERSION = 1
PAD, UNK, BOS = 0, 1, 2
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]")
N_TIME_FEATURES = 3
_BIRTH = "MEDS_BIRTH"
_US_PER_DAY = 86_400_000_000
_LAST_SECOND_US = 86_399_000_000  # 23:59:59, where helpers.meds places a date-only record
_US_PER_YEAR = 365.25 * _US_PER_DAY


class ClmbrMiniError(ValueError):
    """Bad input to clmbr_mini pretraining or embedding, or a malformed checkpoint."""


@dataclass(frozen=True)
class ClmbrMiniConfig:
    """Tokenizer, model and training settings. ``hidden_size`` is the embedding dimension.
    ``epochs=None`` trains for ``ceil(target_steps / steps_per_epoch)`` epochs, so small and
    large cohorts get about the same number of optimizer steps (240 steps of 32 windows of
    256 tokens: about 3.5 minutes on one CPU core)."""

    hidden_size: int = 128
    n_layers: int = 2
    n_heads: int = 4
    intermediate_size: int = 256
    max_len: int = 256
    min_count: int = 5
    n_bins: int = 10
    numeric_fraction: float = 0.5
    epochs: int | None = None
    target_steps: int = 240
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    dropout: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "hidden_size": self.hidden_size > 0 and self.hidden_size % self.n_heads == 0,
            "n_layers": self.n_layers > 0,
            "max_len": self.max_len >= 8,
            "min_count": self.min_count >= 1,
            "n_bins": self.n_bins >= 1,
            "epochs": self.epochs is None or self.epochs >= 1,
            "target_steps": self.target_steps >= 1,
            "batch_size": self.batch_size >= 1,
            "lr": self.lr > 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ClmbrMiniError(f"ClmbrMiniConfig: invalid value(s) for {', '.join(bad)}: {self}")


@dataclass
class PretrainResult:
    """``checkpoint``: the model folder; ``sha256``: its hash (``helpers.manifest.sha256_path``);
    ``history``: columns epoch, split (``train``/``val``), loss (mean next-token cross entropy,
    nats); ``seconds``: wall time; ``summary``: vocabulary size, subjects, tokens, parameters,
    config, validation top-1/top-5 next-token accuracy."""

    checkpoint: Path
    sha256: str
    history: pd.DataFrame
    seconds: float
    summary: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- tokenizer


@dataclass
class _Tokenizer:
    tokens: list[str]
    edges: dict[str, list[float]]  # numeric code -> sorted quantile edges

    @property
    def size(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, events: pd.DataFrame, config: ClmbrMiniConfig) -> _Tokenizer:
        codes = events["code"].to_numpy()
        values = events["numeric_value"].to_numpy(dtype=np.float64)
        has_value = ~np.isnan(values)
        frame = pd.DataFrame({"code": codes, "has": has_value})
        fraction = frame.groupby("code")["has"].mean()
        numeric = sorted(fraction.index[fraction >= config.numeric_fraction])
        edges: dict[str, list[float]] = {}
        for code in numeric:
            v = values[(codes == code) & has_value]
            q = np.quantile(v, np.linspace(0, 1, config.n_bins + 1)[1:-1]) if config.n_bins > 1 else np.array([])
            edges[code] = [float(x) for x in np.unique(q)]
        tmp = cls(list(SPECIAL_TOKENS), edges)
        keys = tmp._keys(codes, values)
        counts = pd.Series(keys).value_counts()
        kept = sorted(k for k, n in counts.items() if n >= config.min_count)
        return cls(list(SPECIAL_TOKENS) + kept, edges)

    def _keys(self, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Token strings of events (``CODE`` or ``CODE#bin``)."""
        keys = codes.astype(object).copy()
        for code, e in self.edges.items():
            rows = np.flatnonzero((codes == code) & ~np.isnan(values))
            if len(rows):
                bins = np.searchsorted(np.asarray(e), values[rows], side="right")
                keys[rows] = [f"{code}#{b}" for b in bins]
        return keys

    def encode(self, codes: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Token ids (int64) of events; ``UNK`` for tokens outside the vocabulary."""
        index = {t: i for i, t in enumerate(self.tokens)}
        keys = self._keys(np.asarray(codes, dtype=object), np.asarray(values, dtype=np.float64))
        return pd.Series(keys).map(index).fillna(UNK).to_numpy(dtype=np.int64)

    def to_json(self) -> dict:
        return {"tokens": self.tokens, "numeric_edges": self.edges, "special": list(SPECIAL_TOKENS)}

    @classmethod
    def from_json(cls, data: dict) -> _Tokenizer:
        return cls(list(data["tokens"]), {k: list(v) for k, v in data["numeric_edges"].items()})


# ----------------------------------------------------------------------------- timelines


@dataclass
class _Timelines:
    """Token ids and time features of each subject, in MEDS order, as flat arrays."""

    subjects: np.ndarray  # unique subject ids, sorted
    start: np.ndarray  # first row of each subject
    n_static: np.ndarray  # static events at the start of each subject's rows
    stop: np.ndarray
    time_us: np.ndarray  # int64 microseconds (static rows: min int)
    tokens: np.ndarray
    feats: np.ndarray  # float32 (n_rows, N_TIME_FEATURES)
    is_birth: np.ndarray  # bool, MEDS_BIRTH rows

    @classmethod
    def build(cls, events: pd.DataFrame, tokenizer: _Tokenizer) -> _Timelines:
        _check_events(events)
        frame = events.loc[:, ["subject_id", "time", "code", "numeric_value"]]
        frame = frame.sort_values(["subject_id", "time", "code"], na_position="first", kind="stable")
        subject = frame["subject_id"].to_numpy(dtype=np.int64)
        t = pd.to_datetime(frame["time"]).astype("datetime64[us]")
        static = t.isna().to_numpy()
        time_us = np.where(static, np.iinfo(np.int64).min, t.to_numpy().astype("datetime64[us]").astype(np.int64))
        codes = frame["code"].to_numpy(dtype=object)
        tokens = tokenizer.encode(codes, frame["numeric_value"].to_numpy(dtype=np.float64))
        subjects, start = np.unique(subject, return_index=True)
        stop = np.append(start[1:], len(subject))
        n_static = np.add.reduceat(static.astype(np.int64), start) if len(start) else np.zeros(0, np.int64)
        # birth time per subject (first MEDS_BIRTH row)
        birth_rows = np.flatnonzero(codes == _BIRTH)
        birth = np.full(len(subjects), np.nan)
        if len(birth_rows):
            pos = np.searchsorted(subjects, subject[birth_rows])
            first = ~pd.Series(pos).duplicated().to_numpy()
            birth[pos[first]] = time_us[birth_rows[first]]
        row_subject = np.repeat(np.arange(len(subjects)), stop - start)
        feats = np.zeros((len(subject), N_TIME_FEATURES), dtype=np.float32)
        b = birth[row_subject]
        age = np.where(static | np.isnan(b), 0.0, (time_us - np.nan_to_num(b)) / _US_PER_YEAR)
        feats[:, 0] = age / 100.0
        prev = np.empty_like(time_us)
        prev[1:] = time_us[:-1]
        first_timed = np.ones(len(subject), dtype=bool)
        first_timed[1:] = (row_subject[1:] != row_subject[:-1]) | static[:-1]
        gap = np.where(first_timed | static, 0.0, (time_us - prev) / _US_PER_DAY)
        feats[:, 1] = np.log1p(np.maximum(gap, 0.0)) / 5.0
        feats[:, 2] = static.astype(np.float32)
        return cls(subjects, start, n_static, stop, time_us, tokens, feats, codes == _BIRTH)

    def locate(self, subject_ids: np.ndarray) -> np.ndarray:
        """Index of each subject in ``subjects`` (-1 when absent)."""
        pos = np.searchsorted(self.subjects, subject_ids)
        pos = np.clip(pos, 0, max(len(self.subjects) - 1, 0))
        found = (len(self.subjects) > 0) & (self.subjects[pos] == subject_ids) if len(self.subjects) else np.zeros(len(subject_ids), bool)
        return np.where(found, pos, -1)

    def window(self, k: int, end: int | None, max_len: int, begin: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and features of subject ``k`` (-1: none): ``[BOS]`` + static + timed rows
        ``[begin, end)`` (absolute rows; default: the last ones that fit before ``end``)."""
        if k < 0:
            return np.array([BOS], np.int64), np.array([[0.0, 0.0, 1.0]], np.float32)
        s, ns = self.start[k], self.n_static[k]
        static_rows = np.arange(s, s + ns)[: max_len - 1]
        room = max_len - 1 - len(static_rows)
        end = self.stop[k] if end is None else end
        lo = s + ns
        if begin is None:
            begin = max(lo, end - room)
        rows = np.concatenate([static_rows, np.arange(begin, min(end, begin + room))])
        tokens = np.concatenate([[BOS], self.tokens[rows]])
        feats = np.concatenate([np.array([[0.0, 0.0, 1.0]], np.float32), self.feats[rows]])
        return tokens, feats


def _check_events(events: pd.DataFrame) -> None:
    missing = [c for c in ("subject_id", "time", "code", "numeric_value") if c not in events.columns]
    if missing:
        raise ClmbrMiniError(f"events: missing MEDS column(s) {', '.join(missing)}")


def _batch(windows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, feats, attention_mask)`` tensors."""
    length = max(len(w[0]) for w in windows)
    ids = np.full((len(windows), length), PAD, np.int64)
    feats = np.zeros((len(windows), length, N_TIME_FEATURES), np.float32)
    mask = np.zeros((len(windows), length), np.int64)
    for i, (tok, f) in enumerate(windows):
        ids[i, : len(tok)] = tok
        feats[i, : len(tok)] = f
        mask[i, : len(tok)] = 1
    return torch.from_numpy(ids), torch.from_numpy(feats), torch.from_numpy(mask)


# ----------------------------------------------------------------------------- model


class _ClmbrMiniModule(nn.Module):
    """LlamaForCausalLM fed with token embeddings + a linear map of the time features."""

    def __init__(self, config: ClmbrMiniConfig, vocab_size: int) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM

        lm_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.n_layers,
            num_attention_heads=config.n_heads,
            num_key_value_heads=config.n_heads,
            max_position_embeddings=config.max_len,
            attention_dropout=config.dropout,
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=None,
            tie_word_embeddings=False,
            use_cache=False,
        )
        lm_config._attn_implementation = "sdpa"
        self.lm = LlamaForCausalLM(lm_config)
        self.time_proj = nn.Linear(N_TIME_FEATURES, config.hidden_size)

    def _embeds(self, ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids) + self.time_proj(feats)

    def logits(self, ids: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lm(inputs_embeds=self._embeds(ids, feats), attention_mask=mask).logits

    def hidden(self, ids: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last-layer hidden states (after the final norm), shape (batch, length, hidden)."""
        return self.lm.model(inputs_embeds=self._embeds(ids, feats), attention_mask=mask).last_hidden_state


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    target = ids[:, 1:]
    valid = mask[:, 1:].bool()
    loss = nn.functional.cross_entropy(logits[:, :-1][valid], target[valid], reduction="sum")
    return loss, int(valid.sum())


# ----------------------------------------------------------------------------- pretraining


def _split_events(events: pd.DataFrame, subjects: np.ndarray, name: str) -> pd.DataFrame:
    subjects = np.unique(np.asarray(subjects, dtype=np.int64))
    if len(subjects) == 0:
        raise ClmbrMiniError(f"{name}: no subjects given")
    part = events[events["subject_id"].isin(subjects)]
    if part.empty:
        raise ClmbrMiniError(f"{name}: none of the {len(subjects)} subjects has events")
    return part


def pretrain_clmbr_mini(
    events: pd.DataFrame,
    train_subjects: np.ndarray | list[int],
    val_subjects: np.ndarray | list[int],
    out_dir: Path,
    *,
    config: ClmbrMiniConfig | None = None,
    progress: Callable[[dict], None] | None = None,
) -> PretrainResult:
    """Pretrain clmbr_mini by next-token prediction on the MEDS ``events`` of
    ``train_subjects`` (int64 MEDS subject ids); ``val_subjects`` give the validation loss and
    next-token accuracy (their events never build the vocabulary nor train the weights).

    Writes ``out_dir`` (``config.json``, ``vocabulary.json``, ``model.safetensors``,
    ``history.csv``) atomically and ``<out_dir>.json`` next to it with the folder's sha256,
    the summary and the wall time. ``progress`` is called after each epoch with a dict
    (epoch, epochs, train_loss, val_loss, seconds). Deterministic for ``config.seed`` on CPU.
    """
    from safetensors.torch import save_file

    from helpers.manifest import sha256_path

    config = config or ClmbrMiniConfig()
    began = time.perf_counter()
    out_dir = Path(out_dir)
    train_ids = np.unique(np.asarray(train_subjects, dtype=np.int64))
    val_ids = np.unique(np.asarray(val_subjects, dtype=np.int64))
    overlap = np.intersect1d(train_ids, val_ids)
    if len(overlap):
        raise ClmbrMiniError(
            f"train_subjects and val_subjects share {len(overlap)} subject(s), e.g. {', '.join(map(str, overlap[:5]))}"
        )
    train_events = _split_events(events, train_ids, "train_subjects")
    val_events = _split_events(events, val_ids, "val_subjects")
    tokenizer = _Tokenizer.build(train_events, config)
    train = _Timelines.build(train_events, tokenizer)
    val = _Timelines.build(val_events, tokenizer)

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = _ClmbrMiniModule(config, tokenizer.size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(train.subjects) / config.batch_size)
    n_epochs = config.epochs or max(1, math.ceil(config.target_steps / steps_per_epoch))
    total = steps_per_epoch * n_epochs
    warmup = max(1, int(config.warmup_fraction * total))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    history = []
    val_windows = [val.window(k, None, config.max_len) for k in range(len(val.subjects))]
    n_train_tokens = int(sum(stop - start + 1 for start, stop in zip(train.start, train.stop, strict=True)))
    for epoch in range(1, n_epochs + 1):
        model.train()
        order = rng.permutation(len(train.subjects))
        total_loss, total_n = 0.0, 0
        for b in range(0, len(order), config.batch_size):
            windows = []
            for k in order[b : b + config.batch_size]:
                lo = train.start[k] + train.n_static[k]
                room = config.max_len - 1 - min(train.n_static[k], config.max_len - 1)
                n_timed = train.stop[k] - lo
                begin = lo + (int(rng.integers(0, n_timed - room + 1)) if n_timed > room else 0)
                windows.append(train.window(int(k), None, config.max_len, begin=begin))
            ids, feats, mask = _batch(windows)
            loss_sum, n = _next_token_loss(model.logits(ids, feats, mask), ids, mask)
            optimizer.zero_grad(set_to_none=True)
            (loss_sum / max(n, 1)).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total_loss += float(loss_sum.detach())
            total_n += n
        train_loss = total_loss / max(total_n, 1)
        val_loss, top1, top5 = _evaluate(model, val_windows, config.batch_size * 2)
        history += [{"epoch": epoch, "split": "train", "loss": train_loss}, {"epoch": epoch, "split": "val", "loss": val_loss}]
        if progress is not None:
            progress({"epoch": epoch, "epochs": n_epochs, "train_loss": train_loss, "val_loss": val_loss,
                      "seconds": time.perf_counter() - began})

    history_frame = pd.DataFrame(history, columns=["epoch", "split", "loss"])
    n_parameters = int(sum(p.numel() for p in model.parameters()))
    model_config = {"format_version": FORMAT_VERSION, "encoder": "clmbr_mini", "config": asdict(config),
                    "vocab_size": tokenizer.size, "n_time_features": N_TIME_FEATURES}
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(model_config, indent=2, sort_keys=True) + "\n")
    (tmp / "vocabulary.json").write_text(json.dumps(tokenizer.to_json(), indent=1, sort_keys=True) + "\n")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    history_frame.to_csv(tmp / "history.csv", index=False, float_format="%.6f")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    sha = sha256_path(out_dir)
    seconds = time.perf_counter() - began
    summary = {
        "vocab_size": tokenizer.size,
        "n_numeric_codes": len(tokenizer.edges),
        "n_subjects": {"train": int(len(train.subjects)), "val": int(len(val.subjects))},
        "n_tokens": {"train": n_train_tokens, "val": int(sum(len(w[0]) for w in val_windows))},
        "unk_fraction_val": float(np.mean(val.tokens == UNK)) if len(val.tokens) else 0.0,
        "parameters": n_parameters,
        "epochs": n_epochs,
        "steps": total,
        "config": asdict(config),
        "val_loss": float(history_frame.iloc[-1]["loss"]),
        "val_top1": top1,
        "val_top5": top5,
        "torch_threads": torch.get_num_threads(),
    }
    record = {"checkpoint": out_dir.name, "sha256": sha, "seconds": round(seconds, 2), "summary": summary}
    (out_dir.parent / f"{out_dir.name}.json").write_text(json.dumps(record, indent=2) + "\n")
    return PretrainResult(checkpoint=out_dir, sha256=sha, history=history_frame, seconds=seconds, summary=summary)


@torch.no_grad()
def _evaluate(model: _ClmbrMiniModule, windows: list, batch_size: int) -> tuple[float, float, float]:
    """Mean next-token loss and top-1/top-5 accuracy over ``windows``."""
    model.eval()
    loss_sum, n, hit1, hit5 = 0.0, 0, 0, 0
    for b in range(0, len(windows), batch_size):
        ids, feats, mask = _batch(windows[b : b + batch_size])
        logits = model.logits(ids, feats, mask)
        loss, count = _next_token_loss(logits, ids, mask)
        valid = mask[:, 1:].bool()
        target = ids[:, 1:][valid]
        top = logits[:, :-1][valid].topk(5, dim=-1).indices
        hit1 += int((top[:, 0] == target).sum())
        hit5 += int((top == target[:, None]).any(dim=1).sum())
        loss_sum += float(loss)
        n += count
    n = max(n, 1)
    return loss_sum / n, hit1 / n, hit5 / n


# ----------------------------------------------------------------------------- encoder


class ClmbrMiniEncoder:
    """A pretrained clmbr_mini checkpoint (folder written by ``pretrain_clmbr_mini``), frozen.

    ``embed(events, cohort)`` gives one float32 vector of size ``dim`` per cohort study: the
    final hidden state after the last event strictly before ``index_time`` (module docstring).
    """

    name = "clmbr_mini"

    def __init__(self, path: Path, *, batch_size: int = 64) -> None:
        from safetensors.torch import load_file

        from helpers.manifest import sha256_path

        self.path = Path(path)
        for file in ("config.json", "vocabulary.json", "model.safetensors"):
            if not (self.path / file).is_file():
                raise ClmbrMiniError(f"{self.path}: not a clmbr_mini checkpoint ({file} missing)")
        meta = json.loads((self.path / "config.json").read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ClmbrMiniError(f"{self.path / 'config.json'}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        self.config = ClmbrMiniConfig(**meta["config"])
        self.tokenizer = _Tokenizer.from_json(json.loads((self.path / "vocabulary.json").read_text()))
        self.model = _ClmbrMiniModule(self.config, self.tokenizer.size)
        self.model.load_state_dict(load_file(str(self.path / "model.safetensors")))
        self.model.eval()
        self.model.requires_grad_(False)
        self.batch_size = batch_size
        self.sha256 = sha256_path(self.path)
        self.last_stats: dict = {}

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    def describe(self) -> dict:
        """Encoder name, checkpoint path and sha256, dimension, config and the rule that
        places the representation (for the embedding table's metadata)."""
        return {
            "encoder": self.name,
            "checkpoint": str(self.path),
            "checkpoint_sha256": self.sha256,
            "dim": self.dim,
            "vocab_size": self.tokenizer.size,
            "config": asdict(self.config),
            "representation": "final hidden state after the last MEDS event strictly before index_time "
            "(before 23:59:59 of the index day for a CT in the day's last second); "
            "no prior timed event: state after [BOS] + static codes",
            "last_stats": self.last_stats,
        }

    def embed(self, events: pd.DataFrame, cohort: pd.DataFrame) -> np.ndarray:
        """Embeddings of ``cohort``'s studies (rows in cohort order), float32, shape
        (n_studies, dim). ``events``: MEDS events (``helpers.meds``); ``cohort``: ``person_id``
        (string of the MEDS ``subject_id``) and ``index_time``. Only events with ``time <
        min(index_time, index day 23:59:59)`` are read. Sets ``last_stats``."""
        from helpers.meds import cohort_subject_ids

        for column in ("person_id", "index_time"):
            if column not in cohort.columns:
                raise ClmbrMiniError(f"cohort lacks column {column!r}")
        subject_ids = cohort_subject_ids(cohort)
        index_us = pd.to_datetime(cohort["index_time"]).astype("datetime64[us]").to_numpy().astype(np.int64)
        # A date-only OMOP record is placed at 23:59:59 of its day (helpers.meds): never read it
        # for a CT of that day, even one in the day's last second (cut at 23:59:59 then).
        index_us = np.minimum(index_us, index_us // _US_PER_DAY * _US_PER_DAY + _LAST_SECOND_US)
        wanted = events[events["subject_id"].isin(np.unique(subject_ids))]
        lines = _Timelines.build(wanted, self.tokenizer)
        ks = lines.locate(subject_ids)
        windows, no_prior, truncated = [], 0, 0
        for k, at in zip(ks, index_us, strict=True):
            if k < 0:
                windows.append(lines.window(-1, None, self.config.max_len))
                no_prior += 1
                continue
            lo = lines.start[k] + lines.n_static[k]
            end = lo + int(np.searchsorted(lines.time_us[lo : lines.stop[k]], at, side="left"))
            no_prior += int(not (~lines.is_birth[lo:end]).any())
            room = self.config.max_len - 1 - min(lines.n_static[k], self.config.max_len - 1)
            truncated += int(end - lo > room)
            windows.append(lines.window(int(k), end, self.config.max_len))
        out = np.zeros((len(windows), self.dim), np.float32)
        order = np.argsort([len(w[0]) for w in windows], kind="stable")
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                rows = order[b : b + self.batch_size]
                ids, feats, mask = _batch([windows[i] for i in rows])
                hidden = self.model.hidden(ids, feats, mask)
                last = mask.sum(dim=1) - 1
                out[rows] = hidden[torch.arange(len(rows)), last].numpy()
        self.last_stats = {
            "n_studies": len(windows),
            "no_prior_events": no_prior,
            "subjects_absent": int((ks < 0).sum()),
            "truncated_to_max_len": truncated,
        }
        return out
