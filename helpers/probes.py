"""Linear probes: how much of each true factor of the digital twin a frozen embedding shows.

A probe is a linear model fitted on the frozen embedding to predict one factor; its
cross-validated score says whether the encoder exposes that factor linearly (the usual test
of a foundation model's representation). Continuous factors are scored by cross-validated
R^2 of a ridge regression (penalty chosen inside each training fold), binary factors by the
cross-validated AUC of the same ridge score. Folds are split by *person*, so that two studies
of one patient never sit on both sides.

Probes read the twin's ground truth, so they are evaluation only: nothing here feeds a model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from helpers.scaling import fit_scaler

__all__ = ["probe_scores", "probe_factors"]

_ALPHAS = np.logspace(-1, 5, 13)


def _standardise(x: np.ndarray) -> np.ndarray:
    """The models' scaler (``helpers.scaling``) fitted on these rows, dropped columns removed."""
    scaler = fit_scaler(np.asarray(x, dtype=np.float64), name="embedding")
    if not scaler.keep.any():
        raise ValueError("probe: every embedding dimension is constant")
    return scaler.transform(x)[:, scaler.keep]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted one half."""
    from scipy.stats import rankdata

    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _out_of_fold(x: np.ndarray, y: np.ndarray, groups: np.ndarray | None, folds: int, seed: int) -> np.ndarray:
    """Out-of-fold ridge predictions of every column of ``y`` (n, k). One ridge fit per fold
    serves all columns (``alpha_per_target``: each column still gets its own penalty, chosen by
    leave-one-out inside the training fold), so probing k factors costs one decomposition of
    the embedding per fold, not k."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import GroupKFold, KFold

    if groups is not None:
        splits = GroupKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, y, groups)
    else:
        splits = KFold(folds, shuffle=True, random_state=seed).split(x)
    pred = np.empty_like(y)
    for train, test in splits:
        model = RidgeCV(alphas=_ALPHAS, alpha_per_target=True).fit(x[train], y[train])
        pred[test] = model.predict(x[test]).reshape(len(test), -1)
    return pred


def _score(y: np.ndarray, pred: np.ndarray, binary: bool) -> float:
    if binary:
        return _auc(y, pred)
    return float(1.0 - ((y - pred) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def probe_scores(x: np.ndarray, y: np.ndarray, *, groups: np.ndarray | None = None, binary: bool = False,
                 folds: int = 5, seed: int = 0) -> float:
    """Cross-validated probe score of ``y`` from ``x`` (n, d): R^2 (continuous) or AUC
    (``binary``). Out-of-fold predictions from a ridge regression whose penalty is chosen by
    leave-one-out inside each training fold; folds grouped by ``groups`` (e.g. person ids)."""
    x = _standardise(x)
    y = np.asarray(y, dtype=np.float64)
    if len(y) != len(x):
        raise ValueError(f"Dimension mismatch: 'y' has {len(y)} entries but 'x' has {len(x)} rows")
    if binary and len(np.unique(y)) != 2:
        raise ValueError("probe: a binary factor needs both classes present")
    return _score(y, _out_of_fold(x, y[:, None], groups, folds, seed)[:, 0], binary)


def probe_factors(embedding: np.ndarray, study_ids, factors: pd.DataFrame, visibility: dict[str, tuple[str, ...]],
                  *, institution: str | None = None, seed: int = 0) -> pd.DataFrame:
    """Probe every factor of ``factors`` (the twin's ``ground_truth/factors.parquet``, as
    ``helpers.truth.read_truth(twin_dir, task, reader="probes")`` returns it: one row
    per study with ``study_id``, ``person_id``, ``institution`` and the factor columns) from
    ``embedding`` (rows in the order of ``study_ids``).

    ``visibility`` maps each factor to the modalities that show it (``helpers.twin.VISIBILITY``).
    ``institution`` restricts the probe to one site (scanner and coding differ between sites).
    Returns one row per factor: factor, shown_by, metric (``R2`` or ``AUC``), score, n.
    Factors that are constant in these studies (e.g. clot burden outside PE) are left out and
    listed with score NaN and the reason.
    """
    table = factors.set_index("study_id")
    ids = [str(s) for s in study_ids]
    missing = [s for s in ids if s not in table.index]
    if missing:
        raise ValueError(f"probe: {len(missing)} studies of the embedding have no ground-truth factors, e.g. {', '.join(missing[:5])}")
    rows = table.loc[ids]
    x = np.asarray(embedding, dtype=np.float64)
    if institution is not None:
        keep = (rows["institution"] == institution).to_numpy()
        rows, x = rows[keep], x[keep]
    out, probed = [], []
    for factor, shown_by in visibility.items():
        if factor not in rows.columns:
            continue
        y = rows[factor].to_numpy(dtype=np.float64)
        values = np.unique(y[np.isfinite(y)])
        binary = set(values.tolist()) <= {0.0, 1.0}
        base = {"factor": factor, "shown_by": " + ".join(m.upper() for m in shown_by),
                "metric": "AUC" if binary else "R2", "n": len(y)}
        if len(values) < 2 or not np.isfinite(y).all():
            out.append({**base, "score": np.nan, "note": "constant or missing in these studies"})
            continue
        out.append({**base, "score": np.nan, "note": ""})
        probed.append((len(out) - 1, y, binary))
    if probed:
        targets = np.column_stack([y for _, y, _ in probed])
        pred = _out_of_fold(_standardise(x), targets, rows["person_id"].astype(str).to_numpy(), 5, seed)
        for column, (row, y, binary) in enumerate(probed):
            out[row]["score"] = _score(y, pred[:, column], binary)
    return pd.DataFrame(out, columns=["factor", "shown_by", "metric", "score", "n", "note"])
