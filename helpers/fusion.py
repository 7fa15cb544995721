"""Fusion strategies: modules from (image embedding, EHR embedding) to a survival output.

Tensors in, tensors out, no file I/O. Every input (pooled embeddings and per-slice tokens, of
every strategy) goes through the same scaler fitted on the training split
(``helpers.scaling``: near-constant columns dropped, standardised values bounded at +-5),
stored as buffers, so a saved model scores new data by itself.

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

import torch
import torch.nn.functional as F
from torch import nn

from helpers.scaling import CLIP, fit_scaler
from helpers.survival import LOSSES, MLPHead, hidden_widths, weibull_risk
from helpers.tasks import FUSIONS, check_choice

__all__ = [
    "IMPLEMENTED",
    "TOKEN_FUSIONS",
    "EHR_TOKENISATIONS",
    "IMAGE_TOKENISATIONS",
    "SurvivalModel",
    "build_model",
    "info_nce",
    "retrieval_accuracy",
    "CrossAttention",
]

IMPLEMENTED: tuple[str, ...] = (
    "image_only",
    "ehr_only",
    "concat",
    "contrastive",
    "cross_attention",
    "coattn_image_guided",
    "coattn_ehr_guided",
)
TOKEN_FUSIONS: tuple[str, ...] = ("cross_attention", "coattn_image_guided", "coattn_ehr_guided")
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
    (n, d) and (n, T, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("keep", torch.ones(dim))
        self.clip = CLIP

    def fit(self, x: torch.Tensor) -> None:
        scaler = fit_scaler(x.detach().cpu().double().numpy())
        self.mean.copy_(torch.as_tensor(scaler.mean))
        self.scale.copy_(torch.as_tensor(scaler.scale))
        self.keep.copy_(torch.as_tensor(scaler.keep))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / self.scale).clamp(-self.clip, self.clip) * self.keep


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (n, T, d) over the tokens where ``mask`` (n, T) is True -> (n, d)."""
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
        check_choice("fusion", fusion, FUSIONS)
        if fusion not in IMPLEMENTED:
            raise ValueError(
                f"parameter 'fusion': {fusion!r} is not available in this version; available: {', '.join(IMPLEMENTED)}"
            )
        check_choice("loss", loss, LOSSES)
        check_choice("ehr_tokens", ehr_tokens, EHR_TOKENISATIONS)
        check_choice("image_tokens", image_tokens, IMAGE_TOKENISATIONS)
        if not 0.0 <= modality_dropout < 0.5:
            raise ValueError(f"parameter 'modality_dropout' must be in [0, 0.5), got {modality_dropout}")
        if not temperature > 0:
            raise ValueError(f"parameter 'temperature' must be > 0, got {temperature}")
        self.fusion = fusion
        self.loss = loss
        self.uses_image = fusion != "ehr_only"
        self.uses_ehr = fusion != "image_only"
        self.uses_tokens = fusion in TOKEN_FUSIONS
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

    @staticmethod
    def _fill(x: torch.Tensor, missing: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (x.ndim - 1)
        return torch.where(missing.view(shape), token.expand_as(x), x)

    def _pooled(self, img, ehr, img_m, ehr_m) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        z_img = self._fill(self.norm_img(img), img_m, self.missing_img) if self.uses_image and img is not None else None
        z_ehr = self._fill(self.norm_ehr(ehr), ehr_m, self.missing_ehr) if self.uses_ehr and ehr is not None else None
        return z_img, z_ehr

    def project(self, img: torch.Tensor, ehr: torch.Tensor, *, img_missing=None, ehr_missing=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Contrastive only: the projected embeddings (n, proj_dim) each, unit length."""
        if self.fusion != "contrastive":
            raise ValueError(f"project() is for the contrastive fusion, not {self.fusion!r}")
        img_m, ehr_m = self._missing(len(img), img_missing, ehr_missing, img.device)
        z_img, z_ehr = self._pooled(img, ehr, img_m, ehr_m)
        return F.normalize(self.proj_img(z_img), dim=1), F.normalize(self.proj_ehr(z_ehr), dim=1)

    def _token_sequences(self, img, ehr, img_tokens, img_token_mask, img_m, ehr_m):
        n = len(ehr)
        if self.needs_image_tokens:
            if img_tokens is None or img_tokens.ndim != 3:
                raise ValueError(
                    f"fusion {self.fusion!r} with image_tokens='slices' needs 'img_tokens' of shape (n, T, d_token)"
                )
            tokens = self._fill(self.norm_tokens(img_tokens), img_m, self.missing_token)
            img_seq = self.embed_img(tokens)
            img_mask = (torch.ones(img_seq.shape[:2], dtype=torch.bool, device=img_seq.device)
                        if img_token_mask is None else img_token_mask.bool() | img_m[:, None])
        else:
            z_img, _ = self._pooled(img, None, img_m, ehr_m)
            img_seq = self.embed_img(z_img)
            img_mask = torch.ones(img_seq.shape[:2], dtype=torch.bool, device=img_seq.device)
        _, z_ehr = self._pooled(None, ehr, img_m, ehr_m)
        ehr_seq = self.embed_ehr(z_ehr)
        ehr_mask = torch.ones((n, ehr_seq.shape[1]), dtype=torch.bool, device=ehr_seq.device)
        return img_seq, img_mask, ehr_seq, ehr_mask

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
        ref = next(t for t in (img, ehr, img_tokens) if t is not None)
        img_m, ehr_m = self._missing(len(ref), img_missing, ehr_missing, ref.device)
        attention: dict[str, torch.Tensor] = {}
        if self.fusion == "contrastive":
            z_img, z_ehr = self._pooled(img, ehr, img_m, ehr_m)
            u_img, u_ehr = F.normalize(self.proj_img(z_img), dim=1), F.normalize(self.proj_ehr(z_ehr), dim=1)
            out = torch.cat([u_img, u_ehr], dim=1) * math.sqrt(self.proj_dim)
        elif self.uses_tokens:
            img_seq, img_mask, ehr_seq, ehr_mask = self._token_sequences(img, ehr, img_tokens, img_token_mask, img_m, ehr_m)
            h_img, h_ehr = _masked_mean(img_seq, img_mask), _masked_mean(ehr_seq, ehr_mask)
            parts = []
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
            out = torch.cat(parts, dim=1)
        else:
            z_img, z_ehr = self._pooled(img, ehr, img_m, ehr_m)
            out = torch.cat([z for z in (z_img, z_ehr) if z is not None], dim=1)
        return (out, attention) if return_attention else out

    def forward(self, img: torch.Tensor | None, ehr: torch.Tensor | None, **inputs) -> torch.Tensor:
        out = self.head(self.fused(img, ehr, **inputs))
        return out + self.weibull_offset if self.loss == "weibull" else out

    def risk(self, output: torch.Tensor) -> torch.Tensor:
        """Risk (n,) from ``forward``'s output: the log-hazard (Cox) or minus the log median
        time (Weibull); higher = earlier event."""
        return weibull_risk(output) if self.loss == "weibull" else output


def build_model(fusion: str, d_img: int, d_ehr: int, **options) -> SurvivalModel:
    """A ``SurvivalModel`` for ``fusion`` (see ``IMPLEMENTED``); ``options`` are the keyword
    arguments of ``SurvivalModel`` (``d_token``, ``dropout``, ``linear``, ``loss``, ``d_model``,
    ``heads``, ``ehr_tokens``, ``ehr_chunks``, ``image_tokens``, ``image_chunks``,
    ``proj_dim``, ``temperature``, ``learn_temperature``, ``modality_dropout``)."""
    return SurvivalModel(fusion, d_img, d_ehr, **options)
