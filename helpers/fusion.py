"""Fusion strategies: modules from (image embedding, EHR embedding) to a survival output.

Tensors in, tensors out, no file I/O. Every input (pooled embeddings and per-slice tokens, of
every strategy) goes through the same scaler fitted on the training split
(``helpers.scaling``: near-constant columns dropped, standardised values bounded at +-5),
stored as buffers, so a saved model scores new data by itself: ``forward`` takes raw
embeddings and is differentiable from them to the risk.

Training standardises each split once: ``SurvivalModel.prepare`` turns raw inputs into a
``Prepared`` set (standardised; the per-slice tokens only in the columns the scaler keeps),
and ``forward_prepared`` runs the model on rows of it; ``forward(raw)`` is
``forward_prepared(prepare(raw))``. A dropped column is zero after scaling, so the per-slice
token embedding (16 tokens of every study through one linear layer, the largest product of the
attention strategies) multiplies only the kept columns of its weight. The weight keeps the full
width (the same parameters, initialisation, L2 penalty and saved state as before), and a study
without a CT gets the layer applied to the whole missing token, as before. The pooled
embeddings keep every column: their first layer sees one row per study, and picking columns
would cost its gradient more than the narrower product saves.

The seven strategies of the study (DESIGN.md, paper section 2.2):

* ``image_only`` / ``ehr_only``: the MLP survival head on one pooled embedding.
* ``concat``: the head on the concatenation of both pooled embeddings.
* ``contrastive``: two steps. Projection heads map each pooled embedding to a shared space of
  ``proj_dim`` dimensions and are aligned with the paper's symmetric InfoNCE (``info_nce``);
  then the head is trained on ``concat(u_img, u_ehr) * sqrt(proj_dim)``, the unit vectors the
  InfoNCE compares, scaled to about unit variance per coordinate.
* ``cross_attention``: EHR tokens attend over image tokens (``W^(e)``) and image tokens over
  EHR tokens (``W^(i)``); fused = concat(h_ehr, A_ehr<-img, h_img, A_img<-ehr).
* ``coattn_ehr_guided``: EHR queries over image tokens; fused = concat(h_img, A).
* ``coattn_image_guided``: image queries over EHR tokens; fused = concat(h_ehr, A).

Attention runs over token sequences of each study, never across studies and never over a
single vector (softmax over one key is 1, so such a layer is a linear map; it is refused).
Image tokens are the per-slice embeddings (``image_tokens="slices"``, (n, T, d_token)) or
``image_chunks`` chunks of the pooled vector (``"chunk"``). EHR tokens are one token per
feature (``ehr_tokens="feature"``: feature j with standardised value x_j gives
``x_j * e_j + b_j``) or ``ehr_chunks`` chunks of the standardised vector, each with its own
linear embedding (``"chunk"``). Tokens live in ``d_model`` dimensions; ``h_*`` is the mean of a
modality's tokens and ``A`` the mean over queries of the attention output.

A missing modality (``img_missing`` / ``ehr_missing``, bool (n,)) is replaced by a learned
missing token; during training ``modality_dropout`` marks a random fraction of one modality of
each bimodal study as missing so that the token learns something. A missing CT with per-slice
tokens is one learned token repeated over the slices; since ``coattn_ehr_guided`` lets the EHR
reach the output only through attention weights over image tokens, it gives every study without
a CT the same score (the other strategies still score such a study from its EHR).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from helpers.scaling import CLIP, fit_scaler
from helpers.survival import LOSSES, MLPHead, hidden_widths, weibull_risk
from helpers.tasks import TOKEN_FUSIONS, check_choice, get_strategy

__all__ = [
    "TOKEN_FUSIONS",
    "EHR_TOKENISATIONS",
    "IMAGE_TOKENISATIONS",
    "Prepared",
    "SurvivalModel",
    "build_model",
    "info_nce",
    "retrieval_accuracy",
    "CrossAttention",
]

EHR_TOKENISATIONS: tuple[str, ...] = ("feature", "chunk")
IMAGE_TOKENISATIONS: tuple[str, ...] = ("slices", "chunk")
# CLIP clamps its logit scale 1 / tau at 100.
_MIN_TEMPERATURE = 0.01


def info_nce(h_img: torch.Tensor, h_ehr: torch.Tensor, temperature: float | torch.Tensor) -> torch.Tensor:
    """The paper's symmetric InfoNCE: ``S_ij = cos(h_img_i, h_ehr_j) / tau`` and

    ``L = -(1/N) sum_i [log softmax_j(S_i.)_i + log softmax_j(S_.i)_i]``

    (image-to-EHR plus EHR-to-image cross-entropy, not halved as in CLIP). Row i of both
    inputs is the same study (the positive pair); every other row of the batch is a negative.
    ``h_img`` (N, d) and ``h_ehr`` (N, d) need not be normalised. Returns a scalar.
    """
    if h_img.ndim != 2 or h_img.shape != h_ehr.shape:
        raise ValueError(f"Dimension mismatch: 'h_img' {tuple(h_img.shape)}, 'h_ehr' {tuple(h_ehr.shape)}")
    if len(h_img) < 2:
        raise ValueError(f"InfoNCE needs at least 2 pairs (negatives), got {len(h_img)}")
    s = F.normalize(h_img, dim=1) @ F.normalize(h_ehr, dim=1).T / temperature
    target = torch.arange(len(s), device=s.device)
    return F.cross_entropy(s, target) + F.cross_entropy(s.T, target)


def retrieval_accuracy(h_img: torch.Tensor, h_ehr: torch.Tensor) -> float:
    """Top-1 image-to-EHR retrieval accuracy: the fraction of studies i whose own EHR embedding
    is the most cosine-similar to image i among all N EHR embeddings (chance: 1 / N). Ties
    (identical EHR embeddings) go to the lowest index."""
    if h_img.ndim != 2 or h_img.shape != h_ehr.shape or len(h_img) == 0:
        raise ValueError(f"Dimension mismatch: 'h_img' {tuple(h_img.shape)}, 'h_ehr' {tuple(h_ehr.shape)}")
    with torch.no_grad():
        s = F.normalize(h_img, dim=1) @ F.normalize(h_ehr, dim=1).T
        return float((s.argmax(dim=1) == torch.arange(len(s))).double().mean())


class _Standardise(nn.Module):
    """The training split's scaler (``helpers.scaling.fit_scaler``: near-constant columns
    dropped, values bounded at +-5 standard deviations) over the last dimension; works on
    (n, d) and (n, T, d). ``forward`` gives all columns (the dropped ones 0), ``reduce`` only
    the kept ones (``kept``), the same values without computing the others."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("keep", torch.ones(dim))
        self.clip = CLIP

    def fit(self, x: torch.Tensor) -> None:
        # fit_scaler accumulates in float64 block by block: no float64 copy of all rows
        scaler = fit_scaler(x.detach().cpu().numpy())
        self.mean.copy_(torch.as_tensor(scaler.mean))
        self.scale.copy_(torch.as_tensor(scaler.scale))
        self.keep.copy_(torch.as_tensor(scaler.keep))

    @property
    def kept(self) -> torch.Tensor:
        """Indices of the kept columns, int64 (k,)."""
        return torch.nonzero(self.keep).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale).clamp(-self.clip, self.clip) * self.keep

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)[..., kept]``. In place on the selected copy unless ``x`` needs a gradient."""
        kept = self.kept
        z = x[..., kept]  # advanced indexing: several times faster than index_select on the last axis
        mean, scale = self.mean[kept], self.scale[kept]
        if torch.is_grad_enabled() and x.requires_grad:
            return ((z - mean) / scale).clamp(-self.clip, self.clip)
        return z.sub_(mean).div_(scale).clamp_(-self.clip, self.clip)


def _standardised(norm: _Standardise, x: torch.Tensor, missing: torch.Tensor | None, reduce: bool) -> torch.Tensor:
    """``norm`` applied to ``x`` (kept columns only with ``reduce``); the rows of a missing
    modality are set to 0 (their values are never used, and a NaN there must not reach a
    gradient through the layer that the missing token replaces)."""
    z = norm.reduce(x) if reduce else norm(x)
    if missing is not None:
        rows = missing.view((-1,) + (1,) * (z.ndim - 1))
        z = z.masked_fill(rows, 0.0) if z.requires_grad else z.masked_fill_(rows, 0.0)
    return z


def _kept_linear(linear: nn.Linear, z: torch.Tensor, kept: torch.Tensor, missing: torch.Tensor,
                 token: torch.Tensor) -> torch.Tensor:
    """``linear`` of the full-width standardised input, from its kept columns ``z`` (n, T, k)
    (``kept``: their k indices): the dropped columns are 0 and add nothing. A study in
    ``missing`` (n,) bool gets ``linear(token)`` instead, every column of ``token`` included,
    as when the token replaced its input. The weight keeps all columns."""
    y = F.linear(z, linear.weight[:, kept])
    y = torch.where(missing.view((-1,) + (1,) * (y.ndim - 1)), F.linear(token, linear.weight), y)
    return y + linear.bias if linear.bias is not None else y


@dataclass
class Prepared:
    """A split's inputs as ``SurvivalModel.prepare`` returns them: standardised by the model's
    scaler (per-slice tokens: only the kept columns; the pooled embedding is None when the
    model reads tokens instead), the rows of a missing modality zeroed, masks as bool.
    ``rows(index)`` takes a batch: a slice gives views, an index tensor copies. Only the model
    that prepared them may run on them (``forward_prepared``)."""

    img: torch.Tensor | None
    ehr: torch.Tensor | None
    img_tokens: torch.Tensor | None
    img_token_mask: torch.Tensor | None
    img_missing: torch.Tensor | None
    ehr_missing: torch.Tensor | None
    n: int

    def __len__(self) -> int:
        return self.n

    def _fields(self) -> tuple:
        return self.img, self.ehr, self.img_tokens, self.img_token_mask, self.img_missing, self.ehr_missing

    def rows(self, index: slice | torch.Tensor) -> Prepared:
        take = lambda t: None if t is None else t[index]  # noqa: E731
        n = len(range(*index.indices(self.n))) if isinstance(index, slice) else len(index)
        return Prepared(*(take(t) for t in self._fields()), n)

    def gather(self, index: torch.Tensor, out: Prepared | None = None) -> Prepared:
        """The rows ``index`` (int64), written into ``out``'s tensors when given (a buffer of
        the same shapes, reused from epoch to epoch instead of fresh memory for every batch)."""
        outs = out._fields() if out is not None else (None,) * 6
        taken = [None if t is None else torch.index_select(t, 0, index, out=o) if o is not None else t.index_select(0, index)
                 for t, o in zip(self._fields(), outs, strict=True)]
        return Prepared(*taken, len(index))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` (n, T, d) over the tokens where ``mask`` (n, T) is True (None: all) -> (n, d)."""
    if mask is None:  # the same numbers as an all-True mask (x * 1 is x), without the product
        return x.sum(1) / float(x.shape[1])
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)


class CrossAttention(nn.Module):
    """Scaled dot-product cross-attention of one study's query tokens over its own key/value
    tokens: ``A = softmax(Q K^T / sqrt(d_k)) V`` with ``Q = W_Q q``, ``K = W_K kv``,
    ``V = W_V kv`` (``W`` in R^{d_model x d_model}, no bias, as in the paper). With ``heads``
    > 1 the ``d_model`` dimensions are split into heads of ``d_k = d_model / heads`` whose
    outputs are concatenated.

    ``forward(q (n, Tq, d_model), kv (n, Tk, d_model), kv_mask (n, Tk) bool or None)`` returns
    the outputs (n, Tq, d_model) and the weights (n, heads, Tq, Tk), which sum to 1 over the
    valid keys. All products are batched per study (``batch_first``): no study attends to
    another. ``Tk == 1`` is refused: the softmax over one key is 1 and the layer would be a
    linear map of that vector.
    """

    def __init__(self, d_model: int, heads: int = 1) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.heads = heads
        self.d_k = d_model // heads
        self.w_q = nn.Linear(d_model, d_model, bias=False)
        self.w_k = nn.Linear(d_model, d_model, bias=False)
        self.w_v = nn.Linear(d_model, d_model, bias=False)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        return x.view(n, t, self.heads, self.d_k).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, kv_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if q.ndim != 3 or kv.ndim != 3 or q.shape[0] != kv.shape[0]:
            raise ValueError(f"expected (n, T, d) queries and keys, got {tuple(q.shape)} and {tuple(kv.shape)}")
        if kv.shape[1] < 2:
            raise ValueError(
                f"attention over {kv.shape[1]} key token(s) is degenerate (softmax over one key is 1); "
                "use a token sequence (per-slice image tokens, per-feature or chunked EHR tokens)"
            )
        queries, keys, values = self._split(self.w_q(q)), self._split(self.w_k(kv)), self._split(self.w_v(kv))
        scores = queries @ keys.transpose(-2, -1) / math.sqrt(self.d_k)
        if kv_mask is not None:
            scores = scores.masked_fill(~kv_mask[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        out = (weights @ values).transpose(1, 2).reshape(q.shape[0], q.shape[1], -1)
        return out, weights


class _ChunkTokens(nn.Module):
    """A vector (n, d_in) split into ``k`` contiguous chunks (zero-padded to equal size), each
    embedded by its own linear map -> (n, k, d_model)."""

    def __init__(self, d_in: int, k: int, d_model: int) -> None:
        super().__init__()
        if not 2 <= k <= d_in:
            raise ValueError(f"number of chunks must be between 2 and the input dimension {d_in}, got {k}")
        self.k = k
        self.size = math.ceil(d_in / k)
        self.pad = self.size * k - d_in
        self.weight = nn.Parameter(torch.randn(k, self.size, d_model) / math.sqrt(self.size))
        self.bias = nn.Parameter(torch.zeros(k, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = F.pad(x, (0, self.pad)).view(len(x), self.k, self.size)
        return torch.einsum("nkc,kcd->nkd", chunks, self.weight) + self.bias


class _FeatureTokens(nn.Module):
    """One token per feature: feature j with value x_j gives ``x_j * e_j + b_j`` ->
    (n, d_in, d_model)."""

    def __init__(self, d_in: int, d_model: int) -> None:
        super().__init__()
        if d_in < 2:
            raise ValueError(f"per-feature tokens need at least 2 features, got {d_in}")
        self.weight = nn.Parameter(torch.randn(d_in, d_model))
        self.bias = nn.Parameter(torch.zeros(d_in, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(-1) * self.weight + self.bias


def _projection(d_in: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))


class SurvivalModel(nn.Module):
    """``forward(img, ehr, *, img_tokens=None, img_token_mask=None, img_missing=None,
    ehr_missing=None)`` with ``img`` (n, d_img) and ``ehr`` (n, d_ehr) float32 pooled
    embeddings (the unused modality of a unimodal model may be ``None``), ``img_tokens``
    (n, T, d_token) float32 per-slice tokens (needed by attention strategies with
    ``image_tokens="slices"``), ``img_token_mask`` (n, T) bool (True = real token; None = all),
    ``img_missing`` / ``ehr_missing`` (n,) bool (None = all present).

    Output: for ``loss="cox"`` the log-hazard (n,); for ``loss="weibull"`` the log scale (days)
    and log shape (n, 2). ``risk(output)`` turns either into a risk (n,), higher = earlier
    event.
    """

    def __init__(
        self,
        fusion: str,
        d_img: int,
        d_ehr: int,
        *,
        d_token: int | None = None,
        dropout: float = 0.1,
        linear: bool = False,
        loss: str = "cox",
        d_model: int = 64,
        heads: int = 1,
        ehr_tokens: str = "feature",
        ehr_chunks: int = 8,
        image_tokens: str = "slices",
        image_chunks: int = 16,
        proj_dim: int = 128,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        modality_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        strategy = get_strategy(fusion)
        check_choice("loss", loss, LOSSES)
        check_choice("ehr_tokens", ehr_tokens, EHR_TOKENISATIONS)
        check_choice("image_tokens", image_tokens, IMAGE_TOKENISATIONS)
        if not 0.0 <= modality_dropout < 0.5:
            raise ValueError(f"parameter 'modality_dropout' must be in [0, 0.5), got {modality_dropout}")
        if not temperature > 0:
            raise ValueError(f"parameter 'temperature' must be > 0, got {temperature}")
        self.fusion = fusion
        self.loss = loss
        self.uses_image = strategy.uses_image
        self.uses_ehr = strategy.uses_ehr
        self.uses_tokens = strategy.tokens
        self.needs_image_tokens = self.uses_tokens and image_tokens == "slices"
        self.ehr_tokens = ehr_tokens if self.uses_tokens else None
        self.image_tokens = image_tokens if self.uses_tokens else None
        self.modality_dropout = float(modality_dropout) if (self.uses_image and self.uses_ehr) else 0.0
        self.norm_img = _Standardise(d_img) if self.uses_image else None
        self.norm_ehr = _Standardise(d_ehr) if self.uses_ehr else None
        self.missing_img = nn.Parameter(torch.zeros(d_img)) if self.uses_image else None
        self.missing_ehr = nn.Parameter(torch.zeros(d_ehr)) if self.uses_ehr else None
        self.norm_tokens = self.missing_token = self.embed_tokens = None
        self.proj_img = self.proj_ehr = None
        self.attn_ehr = self.attn_img = None
        self.register_buffer("weibull_offset", torch.zeros(2))
        if fusion == "contrastive":
            self.proj_dim = proj_dim
            self.proj_img = _projection(d_img, proj_dim)
            self.proj_ehr = _projection(d_ehr, proj_dim)
            log_scale = torch.tensor(math.log(1.0 / temperature))
            if learn_temperature:
                self.logit_scale = nn.Parameter(log_scale)
            else:
                self.register_buffer("logit_scale", log_scale)
            d_in = 2 * proj_dim
        elif self.uses_tokens:
            if self.needs_image_tokens:
                if not d_token:
                    raise ValueError("parameter 'd_token': attention strategies with image_tokens='slices' need the token dimension")
                self.norm_tokens = _Standardise(d_token)
                self.missing_token = nn.Parameter(torch.zeros(d_token))
                self.embed_img = nn.Linear(d_token, d_model)
            else:
                self.embed_img = _ChunkTokens(d_img, image_chunks, d_model)
            self.embed_ehr = (_FeatureTokens(d_ehr, d_model) if ehr_tokens == "feature"
                              else _ChunkTokens(d_ehr, ehr_chunks, d_model))
            if fusion in ("cross_attention", "coattn_ehr_guided"):
                self.attn_ehr = CrossAttention(d_model, heads)  # W^(e): EHR queries, image keys/values
            if fusion in ("cross_attention", "coattn_image_guided"):
                self.attn_img = CrossAttention(d_model, heads)  # W^(i): image queries, EHR keys/values
            d_in = (4 if fusion == "cross_attention" else 2) * d_model
        else:
            d_in = (d_img if self.uses_image else 0) + (d_ehr if self.uses_ehr else 0)
        self.d_in = d_in
        self.head = MLPHead(d_in, [] if linear else hidden_widths(d_in), dropout=dropout,
                            n_out=2 if loss == "weibull" else 1)

    # ---- statistics of the training split -------------------------------------------------

    def fit_standardisation(
        self,
        img: torch.Tensor | None,
        ehr: torch.Tensor | None,
        img_tokens: torch.Tensor | None = None,
        img_token_mask: torch.Tensor | None = None,
    ) -> None:
        """Store the mean and spread of the training inputs (rows that are present)."""
        if self.norm_img is not None:
            self.norm_img.fit(img)
        if self.norm_ehr is not None:
            self.norm_ehr.fit(ehr)
        if self.norm_tokens is not None:
            if img_tokens is None:
                raise ValueError(f"fusion {self.fusion!r} with image_tokens='slices' needs 'img_tokens'")
            flat = img_tokens.reshape(-1, img_tokens.shape[-1])
            if img_token_mask is not None:
                flat = flat[img_token_mask.reshape(-1)]
            self.norm_tokens.fit(flat)

    def fit_time_scale(self, time: torch.Tensor, event: torch.Tensor) -> None:
        """Weibull models: start from the exponential fit of the training data (log scale =
        log(total time / events), log shape 0), so the head only learns deviations."""
        scale = float(time.double().sum()) / max(1.0, float(event.double().sum()))
        self.weibull_offset.copy_(torch.tensor([math.log(scale), 0.0]))

    # ---- inputs ---------------------------------------------------------------------------

    def prepare(
        self,
        img: torch.Tensor | None,
        ehr: torch.Tensor | None,
        *,
        img_tokens: torch.Tensor | None = None,
        img_token_mask: torch.Tensor | None = None,
        img_missing: torch.Tensor | None = None,
        ehr_missing: torch.Tensor | None = None,
    ) -> Prepared:
        """The inputs of ``forward`` (same arguments) standardised by this model's scaler, for
        ``forward_prepared`` (per-slice tokens: the kept columns only). Differentiable; ``fit``
        and ``predict_output`` call it once per split under ``torch.no_grad()``, so no batch
        scales its inputs again."""
        ref = next((t for t in (img, ehr, img_tokens) if t is not None), None)
        if ref is None:
            raise ValueError("no inputs: 'img', 'ehr' and 'img_tokens' are all None")
        img_m = None if img_missing is None else img_missing.bool()
        ehr_m = None if ehr_missing is None else ehr_missing.bool()
        z_img = z_ehr = z_tokens = mask = None
        if self.needs_image_tokens:
            if img_tokens is None or img_tokens.ndim != 3:
                raise ValueError(
                    f"fusion {self.fusion!r} with image_tokens='slices' needs 'img_tokens' of shape (n, T, d_token)"
                )
            z_tokens = _standardised(self.norm_tokens, img_tokens, img_m, reduce=True)
            mask = None if img_token_mask is None else img_token_mask.bool()
        elif self.uses_image and img is not None:
            z_img = _standardised(self.norm_img, img, img_m, reduce=False)
        if self.uses_ehr and ehr is not None:
            z_ehr = _standardised(self.norm_ehr, ehr, ehr_m, reduce=False)
        return Prepared(z_img, z_ehr, z_tokens, mask, img_m, ehr_m, len(ref))

    # ---- pieces ---------------------------------------------------------------------------

    @property
    def temperature(self) -> torch.Tensor:
        """tau = 1 / exp(logit_scale), at least 0.01 (contrastive only)."""
        return 1.0 / self.logit_scale.clamp(max=math.log(1.0 / _MIN_TEMPERATURE)).exp()

    def projection_parameters(self) -> list[nn.Parameter]:
        """Step-1 (alignment) parameters of ``contrastive``: both projection heads and, when
        learnable, the log-temperature."""
        if self.fusion != "contrastive":
            return []
        params = list(self.proj_img.parameters()) + list(self.proj_ehr.parameters())
        return params + ([self.logit_scale] if isinstance(self.logit_scale, nn.Parameter) else [])

    def _missing(
        self, n: int, img_missing: torch.Tensor | None, ehr_missing: torch.Tensor | None, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        img_m = torch.zeros(n, dtype=torch.bool, device=device) if img_missing is None else img_missing.bool()
        ehr_m = torch.zeros(n, dtype=torch.bool, device=device) if ehr_missing is None else ehr_missing.bool()
        if self.training and self.modality_dropout > 0:
            both = ~img_m & ~ehr_m
            draw = torch.rand(n, device=device)
            img_m = img_m | (both & (draw < self.modality_dropout))
            ehr_m = ehr_m | (both & (draw >= 1 - self.modality_dropout))
        return img_m, ehr_m

    def _masks(self, p: Prepared) -> tuple[torch.Tensor, torch.Tensor]:
        ref = next((t for t in (p.img, p.ehr, p.img_tokens) if t is not None), None)
        return self._missing(p.n, p.img_missing, p.ehr_missing, ref.device if ref is not None else torch.device("cpu"))

    @staticmethod
    def _fill(x: torch.Tensor, missing: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        return torch.where(missing.view(shape), token.expand_as(x), x)

    def _pooled(self, p: Prepared, img_m: torch.Tensor, ehr_m: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z_img = self._fill(p.img, img_m, self.missing_img) if self.uses_image and p.img is not None else None
        z_ehr = self._fill(p.ehr, ehr_m, self.missing_ehr) if self.uses_ehr and p.ehr is not None else None
        return z_img, z_ehr

    def _project(self, p: Prepared, img_m: torch.Tensor, ehr_m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_img, z_ehr = self._pooled(p, img_m, ehr_m)
        return F.normalize(self.proj_img(z_img), dim=1), F.normalize(self.proj_ehr(z_ehr), dim=1)

    def project(self, img: torch.Tensor, ehr: torch.Tensor, *, img_missing=None, ehr_missing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive only: the projected embeddings (n, proj_dim) each, unit length."""
        if self.fusion != "contrastive":
            raise ValueError(f"project() is for the contrastive fusion, not {self.fusion!r}")
        p = self.prepare(img, ehr, img_missing=img_missing, ehr_missing=ehr_missing)
        return self._project(p, *self._masks(p))

    def _token_sequences(self, p: Prepared, img_m: torch.Tensor, ehr_m: torch.Tensor):
        if p.ehr is None:
            raise ValueError(f"fusion {self.fusion!r} needs the EHR embedding")
        if self.needs_image_tokens:
            img_seq = _kept_linear(self.embed_img, p.img_tokens, self.norm_tokens.kept, img_m, self.missing_token)
            img_mask = None if p.img_token_mask is None else p.img_token_mask | img_m[:, None]
        else:
            if p.img is None:
                raise ValueError(f"fusion {self.fusion!r} with image_tokens='chunk' needs the pooled image embedding")
            img_seq = self.embed_img(self._fill(p.img, img_m, self.missing_img))
            img_mask = None
        ehr_seq = self.embed_ehr(self._fill(p.ehr, ehr_m, self.missing_ehr))
        # None: every token is real (the attention and the means then skip the mask)
        return img_seq, img_mask, ehr_seq, None

    def _attention_fused(self, p: Prepared, img_m: torch.Tensor, ehr_m: torch.Tensor):
        img_seq, img_mask, ehr_seq, ehr_mask = self._token_sequences(p, img_m, ehr_m)
        h_img, h_ehr = _masked_mean(img_seq, img_mask), _masked_mean(ehr_seq, ehr_mask)
        attention: dict[str, torch.Tensor] = {}
        if self.attn_ehr is not None:
            a, w = self.attn_ehr(ehr_seq, img_seq, img_mask)
            attention["ehr<-img"] = w
            a_ehr = _masked_mean(a, ehr_mask)
        if self.attn_img is not None:
            a, w = self.attn_img(img_seq, ehr_seq, ehr_mask)
            attention["img<-ehr"] = w
            a_img = _masked_mean(a, img_mask)
        if self.fusion == "cross_attention":
            parts = [h_ehr, a_ehr, h_img, a_img]
        elif self.fusion == "coattn_ehr_guided":
            parts = [h_img, a_ehr]
        else:
            parts = [h_ehr, a_img]
        return torch.cat(parts, dim=1), attention

    def _contrastive_fused(self, p: Prepared, img_m: torch.Tensor, ehr_m: torch.Tensor) -> torch.Tensor:
        u_img, u_ehr = self._project(p, img_m, ehr_m)
        return torch.cat([u_img, u_ehr], dim=1) * math.sqrt(self.proj_dim)

    def fused(
        self,
        img: torch.Tensor | None,
        ehr: torch.Tensor | None,
        *,
        img_tokens: torch.Tensor | None = None,
        img_token_mask: torch.Tensor | None = None,
        img_missing: torch.Tensor | None = None,
        ehr_missing: torch.Tensor | None = None,
        return_attention: bool = False,
    ):
        """The representation the head sees, (n, d_in); with ``return_attention`` also a dict
        of attention weights ``{"ehr<-img": (n, heads, T_ehr, T_img), "img<-ehr": ...}``."""
        p = self.prepare(img, ehr, img_tokens=img_tokens, img_token_mask=img_token_mask,
                         img_missing=img_missing, ehr_missing=ehr_missing)
        out, attention = self._fused(p)
        return (out, attention) if return_attention else out

    def _fused(self, p: Prepared) -> tuple[torch.Tensor, dict]:
        img_m, ehr_m = self._masks(p)
        if self.fusion == "contrastive":
            return self._contrastive_fused(p, img_m, ehr_m), {}
        if self.uses_tokens:
            return self._attention_fused(p, img_m, ehr_m)
        return torch.cat([z for z in self._pooled(p, img_m, ehr_m) if z is not None], dim=1), {}

    def forward_prepared(self, p: Prepared) -> torch.Tensor:
        """``forward`` on inputs from ``prepare`` (the same output)."""
        out = self.head(self._fused(p)[0])
        return out + self.weibull_offset if self.loss == "weibull" else out

    def forward(self, img: torch.Tensor | None, ehr: torch.Tensor | None, **inputs) -> torch.Tensor:
        return self.forward_prepared(self.prepare(img, ehr, **inputs))

    def risk(self, output: torch.Tensor) -> torch.Tensor:
        """Risk (n,) from ``forward``'s output: the log-hazard (Cox) or minus the log median
        time (Weibull); higher = earlier event."""
        return weibull_risk(output) if self.loss == "weibull" else output


def build_model(fusion: str, d_img: int, d_ehr: int, **options) -> SurvivalModel:
    """A ``SurvivalModel`` for ``fusion`` (``helpers.tasks.STRATEGIES``); ``options`` are the keyword
    arguments of ``SurvivalModel`` (``d_token``, ``dropout``, ``linear``, ``loss``, ``d_model``,
    ``heads``, ``ehr_tokens``, ``ehr_chunks``, ``image_tokens``, ``image_chunks``,
    ``proj_dim``, ``temperature``, ``learn_temperature``, ``modality_dropout``)."""
    return SurvivalModel(fusion, d_img, d_ehr, **options)
