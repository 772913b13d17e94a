"""The SimLAP loss as plain functions, usable without the models.

Notation: B anchors (the local batch), N keys (the local batch, or the batch gathered from every process), K
embedding dimensions, C classes. ``labels`` are the anchors' classes y1, ``pair_labels`` the partner classes y2.

The gated cosine between anchor b and key n is computed in the B x N form

    cos(g_b * z_b, g_b * z_n) = ((z * g^2) @ z^T)[b, n] / (||g_b * z_b|| * sqrt(((g^2) @ (z^2)^T)[b, n]))

so no B x N x K tensor is ever built, and always in float32 at least (also under autocast; float64 inputs stay
float64).

The authors' later form (``form="dot"``, SPEC section 3b) is the gated dot product of the unit-normalised
embeddings, ``<z_b * g_b * g_b, z_n>`` = ``((z * g^2) @ z^T)[b, n]`` without renormalisation after gating: B x N too.
Options of both forms: a logit scale tensor (a learnable temperature), the ``alpha`` term
``logit -= alpha * s * <z_b, z_n>`` and the per-anchor mean of the InfoNCE terms (``positive_normalization``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .utils import bernoulli_entropy

PAIR_MODES = ("arbitrary", "identical", "distinct")
POSITIVE_RULES = ("partner", "pair")
LOSS_FORMS = ("cosine", "dot")
POSITIVE_NORMALIZATIONS = ("batch", "anchor")
#: Default temperature of the SimLAP logits (the reference value).
DEFAULT_TEMPERATURE = 0.1
_NORM_EPS = 1e-8
# Added to each anchor's positive count in the per-anchor mean (the authors' value): an anchor without positives
# contributes 0 instead of 0 / 0.
_ANCHOR_COUNT_EPS = 1e-6


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32, or float64 when it is float64 (half precision inputs are upcast)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def sample_pair_labels(
    labels: Tensor, pair_mode: str, num_classes: int, generator: torch.Generator | None = None
) -> Tensor:
    """Draw the partner class y2 of every anchor.

    Args:
        labels: (B,) int64 anchor classes y1.
        pair_mode: ``"arbitrary"``: labels of a random permutation of the batch (every y2 occurs in the batch);
            ``"identical"``: y2 = y1; ``"distinct"``: (y1 + randint(1, C)) mod C, a different class that may be
            absent from the batch.
        num_classes: C.
        generator: optional torch generator (defaults to the global RNG of ``labels``' device).

    Returns:
        (B,) int64 partner classes.
    """
    if pair_mode == "identical":
        return labels.clone()
    if pair_mode == "arbitrary":
        order = torch.randperm(labels.shape[0], device=labels.device, generator=generator)
        return labels[order]
    if pair_mode == "distinct":
        if num_classes < 2:
            raise ValueError(f"pair_mode='distinct' needs at least 2 classes, got num_classes={num_classes}.")
        shift = torch.randint(1, num_classes, labels.shape, device=labels.device, generator=generator)
        return (labels + shift) % num_classes
    raise ValueError(f"pair_mode={pair_mode!r} is not valid; choose one of {', '.join(PAIR_MODES)}.")


def gated_cosine(queries: Tensor, keys: Tensor, gates: Tensor) -> Tensor:
    """Cosine similarity of gated anchors and keys, each anchor with its own gate, in float32.

    Args:
        queries: (B, K) anchor embeddings z_b.
        keys: (N, K) key embeddings z_n.
        gates: (B, K) gate of each anchor, values in [0, 1].

    Returns:
        (B, N) float32 (float64 for float64 inputs) ``cos(g_b * z_b, g_b * z_n)``; 0 where a gated vector is zero.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries, keys, gates = at_least_float32(queries), at_least_float32(keys), at_least_float32(gates)
        gates_sq = gates * gates
        dots = (queries * gates_sq) @ keys.T  # (B, N)
        query_norm_sq = (gates_sq * queries * queries).sum(dim=1, keepdim=True)  # (B, 1)
        key_norm_sq = gates_sq @ (keys * keys).T  # (B, N)
        # Clamping inside the square root keeps the gradient finite when a gated vector is all zeros.
        denominator = (query_norm_sq.clamp_min(_NORM_EPS**2) * key_norm_sq.clamp_min(_NORM_EPS**2)).sqrt()
        return dots / denominator


def gated_dot(queries: Tensor, keys: Tensor, gates: Tensor) -> Tensor:
    """The authors' later similarity: dot product of the unit-normalised anchor, gated twice, and the unit-normalised
    key, ``<z_b / ||z_b|| * g_b * g_b, z_n / ||z_n||>``, without renormalisation after gating.

    Args:
        queries: (B, K) anchor embeddings. keys: (N, K) key embeddings. gates: (B, K) gate of each anchor.

    Returns:
        (B, N) float32 (float64 for float64 inputs), in [-1, 1] for gates in [0, 1].
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        gates = at_least_float32(gates)
        return weighted_unit_dot(queries, keys, gates * gates)


def weighted_unit_dot(queries: Tensor, keys: Tensor, weights: Tensor) -> Tensor:
    """``<z_b / ||z_b|| * w_b, z_n / ||z_n||>``: (B, K), (N, K), (B, K) -> (B, N), one matrix product, float32 at
    least (also under autocast)."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries = F.normalize(at_least_float32(queries), dim=1)
        keys = F.normalize(at_least_float32(keys), dim=1)
        return (queries * at_least_float32(weights)) @ keys.T


def plain_cosine(queries: Tensor, keys: Tensor) -> Tensor:
    """(B, K), (N, K) -> (B, N) cosine of the ungated embeddings, float32 at least (the ``alpha`` term)."""
    with torch.autocast(device_type=queries.device.type, enabled=False):
        queries = F.normalize(at_least_float32(queries), dim=1)
        return queries @ F.normalize(at_least_float32(keys), dim=1).T


def contrastive_masks(
    labels: Tensor, pair_labels: Tensor, key_labels: Tensor, positives: str = "partner"
) -> tuple[Tensor, Tensor]:
    """Positive and negative masks of the anchors against the keys.

    Args:
        labels: (B,) anchor classes y1; pair_labels: (B,) partner classes y2; key_labels: (N,) key classes.
        positives: ``"partner"`` (SimLAP): positives are keys of class y2, negatives are keys of neither y1 nor y2,
            so the anchor's own class is neither unless y2 == y1. ``"pair"`` (SimLAP-Fuse): positives are keys of
            class y1 or y2, negatives the rest.

    Returns:
        (positive, negative): two (B, N) bool masks.
    """
    partner = key_labels[None, :] == pair_labels[:, None]
    own = key_labels[None, :] == labels[:, None]
    if positives == "partner":
        return partner, ~(partner | own)
    if positives == "pair":
        positive = partner | own
        return positive, ~positive
    raise ValueError(f"positives={positives!r} is not valid; choose one of {', '.join(POSITIVE_RULES)}.")


def multi_positive_infonce(
    logits: Tensor, positive: Tensor, negative: Tensor, normalization: str = "batch"
) -> tuple[Tensor, Tensor]:
    """Sum and count of the multi-positive InfoNCE terms.

    For every positive (b, p): ``l_bp = log(exp(logit_bp) + sum_{n in neg(b)} exp(logit_bn)) - logit_bp``,
    with a stable log-sum-exp. Anchors without positives contribute nothing; anchors without negatives give 0.

    Args:
        logits: (B, N) float32 logits. positive, negative: (B, N) bool masks.
        normalization: ``"batch"``: the terms of all positive pairs are summed and counted (the loss is their mean,
            one global mean); ``"anchor"``: each anchor's terms are divided by its positive count + 1e-6, and the
            anchors are counted (the loss is the mean over anchors, an anchor without positives counting as 0).

    Returns:
        (sum, count), both scalars of the logits' dtype; the loss is sum / count.
    """
    # A finite fill (not -inf) keeps the log-sum-exp and its gradient finite for rows without negatives.
    very_negative = torch.finfo(logits.dtype).min
    negative_lse = torch.logsumexp(logits.masked_fill(~negative, very_negative), dim=1, keepdim=True)  # (B, 1)
    pair_terms = torch.logaddexp(logits, negative_lse) - logits  # (B, N)
    positive = positive.to(logits.dtype)
    if normalization == "batch":
        return (pair_terms * positive).sum(), positive.sum()
    if normalization == "anchor":
        per_anchor = (pair_terms * positive).sum(dim=1) / (positive.sum(dim=1) + _ANCHOR_COUNT_EPS)  # (B,)
        return per_anchor.sum(), logits.new_full((), float(logits.shape[0]))
    raise ValueError(
        f"normalization={normalization!r} is not valid; choose one of {', '.join(POSITIVE_NORMALIZATIONS)}."
    )


@dataclass
class ContrastiveTerms:
    """What :func:`simlap_contrastive_terms` returns.

    Attributes:
        loss_sum: scalar, sum of the InfoNCE terms of all positive pairs of the local anchors (with the per-anchor
            normalisation: sum over the local anchors of their mean terms).
        num_positives: scalar float32, number of those pairs (per-anchor normalisation: number of local anchors);
            the loss is ``loss_sum / num_positives``.
        cosine: (B, N) float32 gated similarities before scaling (for statistics): the gated cosine, or the gated
            dot product of the ``"dot"`` form.
        positive, negative: (B, N) bool masks.
    """

    loss_sum: Tensor
    num_positives: Tensor
    cosine: Tensor
    positive: Tensor
    negative: Tensor


def simlap_contrastive_terms(
    embeddings: Tensor,
    labels: Tensor,
    pair_labels: Tensor,
    gates: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    keys: Tensor | None = None,
    key_labels: Tensor | None = None,
    positives: str = "partner",
    form: str = "cosine",
    logit_scale: Tensor | None = None,
    alpha: Tensor | float | None = None,
    positive_normalization: str = "batch",
) -> ContrastiveTerms:
    """Unreduced SimLAP contrastive loss: the pieces needed for a global mean across processes.

    Args:
        embeddings: (B, K) anchor embeddings. labels, pair_labels: (B,) int64. gates: (B, K) in [0, 1].
        temperature: logits are ``similarity / temperature`` (when ``logit_scale`` is None).
        keys: (N, K) key embeddings; defaults to ``embeddings``. key_labels: (N,); defaults to ``labels``.
        positives: see :func:`contrastive_masks`.
        form: ``"cosine"`` (reference: :func:`gated_cosine`) or ``"dot"`` (the authors' later form:
            :func:`gated_dot`).
        logit_scale: scalar tensor s (a learnable temperature, ``exp`` of a parameter); logits are
            ``s * similarity``. None: ``1 / temperature``.
        alpha: scalar (tensor or float) or None; when given, ``alpha * s * <z_b, z_n>`` (the plain cosine of the
            ungated embeddings) is subtracted from the logits.
        positive_normalization: ``"batch"`` (one mean over all positive pairs) or ``"anchor"`` (mean per anchor,
            then over anchors): see :func:`multi_positive_infonce`.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature!r} is not valid; it must be > 0.")
    if form not in LOSS_FORMS:
        raise ValueError(f"form={form!r} is not valid; choose one of {', '.join(LOSS_FORMS)}.")
    if keys is None:
        keys, key_labels = embeddings, labels
    elif key_labels is None:
        raise ValueError("key_labels must be given together with keys.")
    positive, negative = contrastive_masks(labels, pair_labels, key_labels, positives)
    if form == "dot" and alpha is not None:
        # s * <z g^2, z'> - alpha * s * <z, z'> = s * <z (g^2 - alpha), z'> (unit z, z'): one B x N product; the gated
        # similarity itself is only a statistic here, computed without gradient.
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            weights = at_least_float32(gates) ** 2 - alpha
            combined = weighted_unit_dot(embeddings, keys, weights)
            logits = combined / temperature if logit_scale is None else combined * logit_scale.to(combined.dtype)
        with torch.no_grad():
            similarity = gated_dot(embeddings, keys, gates)
    else:
        similarity = gated_cosine(embeddings, keys, gates) if form == "cosine" else gated_dot(embeddings, keys, gates)
        if logit_scale is None and alpha is None:
            logits = similarity / temperature  # the reference form, unchanged
        else:
            with torch.autocast(device_type=similarity.device.type, enabled=False):
                scale = 1.0 / temperature if logit_scale is None else logit_scale.to(similarity.dtype)
                logits = similarity * scale
                if alpha is not None:
                    logits = logits - (alpha * scale) * plain_cosine(embeddings, keys)
    loss_sum, num_positives = multi_positive_infonce(logits, positive, negative, positive_normalization)
    return ContrastiveTerms(loss_sum, num_positives, similarity, positive, negative)


def simlap_loss(
    embeddings: Tensor,
    labels: Tensor,
    pair_labels: Tensor,
    gates: Tensor,
    temperature: float = DEFAULT_TEMPERATURE,
    **options: Any,
) -> Tensor:
    """SimLAP multi-positive InfoNCE: the mean over all positive pairs of the batch (0 when there are none), or the
    mean over anchors of their per-anchor means (``positive_normalization="anchor"``).

    Shapes and ``options`` (``keys``, ``key_labels``, ``positives``, ``form``, ``logit_scale``, ``alpha``,
    ``positive_normalization``) as in :func:`simlap_contrastive_terms`. Returns a float32 scalar (float64 for
    float64 inputs).
    """
    terms = simlap_contrastive_terms(embeddings, labels, pair_labels, gates, temperature, **options)
    return terms.loss_sum / terms.num_positives.clamp_min(1.0)


def gate_entropy(gates: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean Bernoulli entropy (nats) of gate values, in float32: (B, K) -> scalar. 0 for hard gates, log 2 for
    g = 0.5."""
    return bernoulli_entropy(gates.float(), eps).mean()


@torch.no_grad()
def pair_statistics(
    terms: ContrastiveTerms, labels: Tensor, key_labels: Tensor, embeddings: Tensor, anchor_offset: int = 0
) -> dict[str, Tensor]:
    """Monitoring statistics of one batch (no gradient).

    Args:
        terms: output of :func:`simlap_contrastive_terms` for these anchors and keys.
        labels: (B,) anchor classes. key_labels: (N,) key classes. embeddings: (B, K) anchor embeddings.
        anchor_offset: index of the first anchor among the keys (its rank's slice when keys are gathered).

    Returns:
        ``cos_own`` (same class as the anchor, the anchor itself excluded), ``cos_partner`` (positive pairs),
        ``cos_negative`` (negative pairs) as mean gated cosines (NaN-free: 0 when a set is empty), and
        ``embedding_std``: mean over dimensions of the std of the L2-normalised embeddings.
    """
    own = key_labels[None, :] == labels[:, None]
    anchors = torch.arange(labels.shape[0], device=labels.device)
    own[anchors, anchors + anchor_offset] = False

    def masked_mean(mask: Tensor) -> Tensor:
        return (terms.cosine * mask).sum() / mask.sum().clamp_min(1)

    normalised = F.normalize(embeddings.detach().float(), dim=1)
    std = normalised.std(dim=0).mean() if normalised.shape[0] > 1 else normalised.new_zeros(())
    return {
        "cos_own": masked_mean(own),
        "cos_partner": masked_mean(terms.positive),
        "cos_negative": masked_mean(terms.negative),
        "embedding_std": std,
    }


def classification_loss(logits: Tensor, targets: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """The cross-entropy of every classifier of the package, in float32 (also under autocast).

    ``label_smoothing`` s is one rule everywhere: the target of class y becomes (1 - s) * onehot(y) + s / C.

    Args:
        logits: (B, C) scores.
        targets: (B,) int64 class indices, smoothed by ``label_smoothing``; or (B, C) soft targets (timm's mixup /
            cutmix), used as given: timm's ``Mixup(label_smoothing=s)`` builds them with the same rule, so
            ``label_smoothing`` is not applied to them a second time.
        label_smoothing: s in [0, 1).

    Returns:
        float32 scalar, the mean over the batch.
    """
    if targets.dim() == 2:
        return torch.sum(-targets.float() * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)


def arcgrad_logits(cosine: Tensor, scale: float, eps: float = 1e-6) -> Tensor:
    """ArcGrad logits ``scale * (pi - arccos(cos))`` computed in float32 with a clamp safe for the gradient.

    The clamp to ``1 - eps`` is applied in float32: in float16 a clamp to ``1 - 1e-7`` (the paper's code) rounds to 1
    and the gradient of arccos becomes infinite. (B, C) -> (B, C) float32.
    """
    with torch.autocast(device_type=cosine.device.type, enabled=False):
        clamped = cosine.float().clamp(-1.0 + eps, 1.0 - eps)
        return scale * (math.pi - torch.arccos(clamped))
