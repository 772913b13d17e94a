"""Measures of dimensional / complete collapse of (N, K) embeddings: singular value spectrum, effective rank,
dimensions holding a share of the variance, spread on the unit sphere."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ._arrays import ArrayLike, to_tensor


def _embeddings(z: ArrayLike) -> Tensor:
    z = to_tensor(z).detach().to(torch.float64)
    if z.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, K); got {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError("embeddings must contain at least one sample")
    return z


def singular_values(z: ArrayLike) -> Tensor:
    """Singular values of the centred embeddings ``z - z.mean(0)``.

    Args:
        z: (N, K) embeddings (tensor or array, any device).

    Returns:
        float64 CPU tensor of shape (min(N, K),), in descending order. Their squares divided by N - 1 are the
        eigenvalues of the covariance matrix (the principal-component variances).
    """
    z = _embeddings(z).cpu()
    return torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))


def _effective_rank_from_spectrum(s: Tensor) -> float:
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(z: ArrayLike) -> float:
    """Effective rank of the embeddings (Roy & Vetterli, 2007).

    ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` the normalised singular values of the centred (N, K) embeddings
    and H the Shannon entropy (natural log). It lies in [1, min(N, K)]: 1 for rank-one data, about K for isotropic
    data with N >> K. Embeddings without any variance (complete collapse to a point) return 0.
    """
    return _effective_rank_from_spectrum(singular_values(z))


def _dims_from_spectrum(s: Tensor, fraction: float) -> int:
    variance = s.square()
    total = variance.sum()
    if not total > 0:
        return 0
    cumulative = variance.cumsum(dim=0) / total
    reached = cumulative >= fraction - 1e-12  # tolerance so that fraction=1 is reached despite rounding
    return int(torch.nonzero(reached)[0].item()) + 1


def dims_for_variance(z: ArrayLike, fraction: float = 0.99) -> int:
    """Smallest number of principal components of the (N, K) embeddings explaining ``fraction`` of the variance.

    Component i explains ``s_i**2 / sum_j s_j**2`` of the variance (s: :func:`singular_values`). Returns 0 when the
    embeddings have no variance. ``fraction`` must lie in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    return _dims_from_spectrum(singular_values(z), fraction)


def normalized_embedding_std(z: ArrayLike) -> float:
    """Mean over the K dimensions of the standard deviation of the L2-normalised (N, K) embeddings.

    About 0 for collapsed embeddings (all samples on one direction), about ``1 / sqrt(K)`` for embeddings spread
    uniformly on the unit sphere (SimSiam, Chen & He 2021). Needs N >= 2 (unbiased standard deviation).
    """
    z = F.normalize(_embeddings(z), dim=1)
    if z.shape[0] < 2:
        raise ValueError("normalized_embedding_std needs at least two samples")
    return float(z.std(dim=0).mean())


def collapse_report(z: ArrayLike, fraction: float = 0.99) -> dict[str, Any]:
    """All collapse measures of the (N, K) embeddings ``z`` in one JSON-serialisable dict.

    Returns:
        ``num_samples`` (N), ``dim`` (K), ``effective_rank``, ``dims_for_variance`` (for ``fraction``),
        ``variance_fraction``, ``normalized_embedding_std``, ``uniform_std`` (1 / sqrt(K), the reference value for
        embeddings uniform on the sphere) and ``singular_values`` (list of min(N, K) floats, descending).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    z = _embeddings(z)
    spectrum = singular_values(z)
    return {
        "num_samples": int(z.shape[0]),
        "dim": int(z.shape[1]),
        "effective_rank": _effective_rank_from_spectrum(spectrum),
        "dims_for_variance": _dims_from_spectrum(spectrum, fraction),
        "variance_fraction": float(fraction),
        "normalized_embedding_std": normalized_embedding_std(z) if z.shape[0] > 1 else math.nan,
        "uniform_std": 1.0 / math.sqrt(z.shape[1]),
        "singular_values": spectrum.tolist(),
    }
