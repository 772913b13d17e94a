"""Cosine-weighted kNN classifier of the self-supervised literature, in query chunks of bounded memory, optionally
with the train set (the memory bank) sharded across processes.

Shapes: N train samples, M queries, C classes, D feature dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..distributed import all_gather_equal
from ._arrays import ArrayLike, to_tensor
from .metrics import top_k_hits

#: Default number of neighbours of the kNN evaluation (``--knn_k``).
DEFAULT_KNN_K = 20
#: Default temperature of the cosine-weighted kNN vote (``--knn_temperature``).
DEFAULT_KNN_TEMPERATURE = 0.07
# Smallest kNN temperature for which exp(sim / T) (sim <= 1) stays finite in float32 (exp(88.7) ~ 3.4e38).
_MIN_KNN_TEMPERATURE = 1.0 / 88.0
#: Default bound on the elements of one (queries x train) similarity block of the kNN: 2**26 float32 = 256 MiB
#: (671 queries against 100,000 train features): large enough that the CPU matmuls are not short-shaped.
KNN_BLOCK_ELEMENTS = 1 << 26


def _checked_inputs(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    knn_k: int,
    knn_temperature: float,
    batch_size: int | None,
    max_block_elements: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """(N, D) float32 train features, (N,) int64 labels and (M, D) float32 queries on the train features' device."""
    train = to_tensor(train_features)
    device = train.device
    train = train.float()
    targets = to_tensor(train_labels).to(device=device, dtype=torch.long).reshape(-1)
    queries = to_tensor(query_features).to(device=device, dtype=torch.float32)
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(
            f"train and query features must be (N, D) and (M, D); got {tuple(train.shape)} and {tuple(queries.shape)}"
        )
    if targets.shape[0] != train.shape[0]:
        raise ValueError(f"train features and labels differ in length: {train.shape[0]} vs {targets.shape[0]}")
    if (batch_size is not None and batch_size < 1) or knn_k < 1 or max_block_elements < 1:
        raise ValueError("knn_k, batch_size and max_block_elements must be >= 1")
    if not knn_temperature >= _MIN_KNN_TEMPERATURE:
        raise ValueError(
            f"knn_temperature must be >= {_MIN_KNN_TEMPERATURE:.4f} (exp(1/T) overflows float32); got {knn_temperature}"
        )
    return train, targets, queries


def _knn_group(sharded: bool) -> tuple[int, int]:
    """(world size, rank) of the default process group for a sharded kNN; (1, 0) otherwise."""
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _exchange_sizes(
    train: Tensor, queries: Tensor, targets: Tensor, num_classes: int, world: int
) -> tuple[list[int], list[int]]:
    """Every process's (train rows, query rows), after checking every process's labels: one exchange, so that all
    processes then take the same decisions (and raise the same errors)."""
    local_bad = int(targets.numel() > 0 and bool(targets.min() < 0 or targets.max() >= num_classes))
    info = torch.tensor([[train.shape[0], queries.shape[0], local_bad]], dtype=torch.int64, device=train.device)
    if world > 1:
        info = all_gather_equal(info)
    train_sizes, query_sizes, bad = info[:, 0].tolist(), info[:, 1].tolist(), info[:, 2].tolist()
    if any(bad):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}) (violated on process(es) "
            f"{[index for index, flag in enumerate(bad) if flag]})"
        )
    return train_sizes, query_sizes


def _topk_lowest_index(similarity: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest entries of each row of (b, n) ``similarity`` (values, column indices), ties at the k-th
    value resolved towards the lower column (``topk`` leaves that choice open). A row is ambiguous only when its
    (k+1)-th largest value equals its k-th (found by asking ``topk`` for one more); such rows are rare (duplicate
    features) and only they are fixed, one by one."""
    if k >= similarity.shape[1]:
        return similarity.topk(k, dim=1)
    values, indices = similarity.topk(k + 1, dim=1)
    ambiguous = (values[:, k] == values[:, k - 1]).nonzero().flatten().tolist()
    values, indices = values[:, :k], indices[:, :k]
    for row in ambiguous:
        kth = values[row, k - 1]
        above = (similarity[row] > kth).nonzero().flatten()
        tied = (similarity[row] == kth).nonzero().flatten()[: k - above.numel()]
        chosen = torch.cat([above, tied])
        indices[row] = chosen
        values[row] = similarity[row, chosen]
    return values, indices


def _best_candidates(values: Tensor, labels: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` best of (m, c) neighbour candidates per row, ordered by score (largest first) then global index
    (lowest first): (values, labels), each (m, k)."""
    by_index = indices.argsort(dim=1, stable=True)
    values, labels = values.gather(1, by_index), labels.gather(1, by_index)
    by_value = values.argsort(dim=1, descending=True, stable=True)[:, :k]
    return values.gather(1, by_value), labels.gather(1, by_value)


@dataclass
class _MemoryBank:
    """This process's shard of the train set and what a query chunk needs to search it.

    ``train`` (n, D) is neither copied nor normalised: its inverse norms (n,) scale each similarity block. Global
    train indices are rank-major: this shard's first row is ``offset``. ``chunk`` is the number of queries per
    process and block; ``k`` the (clamped) number of neighbours, ``local_k`` how many this shard can offer."""

    train: Tensor
    targets: Tensor
    inverse_norms: Tensor
    offset: int
    num_train: int
    k: int
    local_k: int
    chunk: int
    world: int
    rank: int

    def local_candidates(self, block: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """This shard's top ``local_k`` of every (b, D) normalised query: (values, labels, global indices), each
        (b, k), padded with (-inf, 0, num_train) where the shard has fewer than ``k`` rows."""
        device, k = self.train.device, self.k
        values = torch.full((block.shape[0], k), -math.inf, device=device)
        labels = torch.zeros((block.shape[0], k), dtype=torch.long, device=device)
        indices = torch.full((block.shape[0], k), self.num_train, dtype=torch.long, device=device)
        if self.local_k > 0:
            similarity = block @ self.train.T
            similarity.mul_(self.inverse_norms)
            top_values, top_indices = _topk_lowest_index(similarity, self.local_k)
            del similarity
            values[:, : self.local_k] = top_values
            labels[:, : self.local_k] = self.targets[top_indices]
            indices[:, : self.local_k] = top_indices + self.offset
        return values, labels, indices

    def neighbours(self, block: Tensor) -> tuple[Tensor, Tensor]:
        """The ``k`` nearest train samples over every shard of this process's (rows, D) normalised query chunk:
        (similarities, labels), each (rows, k), best first (ties: lower global index)."""
        rows, world, chunk, k = block.shape[0], self.world, self.chunk, self.k
        if world > 1:  # every process's chunk, padded to the same size
            padded = block.new_zeros((chunk, block.shape[1]))
            padded[:rows] = block
            block = all_gather_equal(padded)  # (world * chunk, D)
        values, labels, indices = self.local_candidates(block)
        if world > 1:  # float64 holds the float32 scores and the integer labels and indices exactly
            packed = torch.stack([values.double(), labels.double(), indices.double()], dim=2)  # (world*chunk, k, 3)
            gathered = all_gather_equal(packed).view(world, world * chunk, k, 3)
            mine = gathered[:, self.rank * chunk : self.rank * chunk + rows].transpose(0, 1).reshape(rows, world * k, 3)
            values, labels, indices = mine[..., 0].float(), mine[..., 1].long(), mine[..., 2].long()
        return _best_candidates(values, labels, indices, k)


def _memory_bank(
    train: Tensor,
    targets: Tensor,
    k: int,
    train_sizes: list[int],
    query_sizes: list[int],
    batch_size: int | None,
    max_block_elements: int,
    world: int,
    rank: int,
) -> _MemoryBank:
    """The search plan of this process: clamped k, chunk size (bounded by ``max_block_elements``), offsets."""
    num_train = sum(train_sizes)
    if num_train == 0:
        raise ValueError("knn_classify needs at least one train sample")
    k = min(int(k), num_train)
    chunk = batch_size or max(1, max_block_elements // (world * max(max(train_sizes), 1)))
    chunk = min(chunk, max(max(query_sizes), 1))
    inverse_norms = 1.0 / torch.linalg.vector_norm(train, dim=1).clamp_min(1e-12)  # as F.normalize
    return _MemoryBank(
        train,
        targets,
        inverse_norms,
        offset=sum(train_sizes[:rank]),
        num_train=num_train,
        k=k,
        local_k=min(k, train.shape[0]),
        chunk=chunk,
        world=world,
        rank=rank,
    )


@torch.no_grad()
def knn_classify(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    num_classes: int,
    knn_k: int = DEFAULT_KNN_K,
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE,
    batch_size: int | None = None,
    *,
    sharded: bool = False,
    max_block_elements: int = KNN_BLOCK_ELEMENTS,
) -> Tensor:
    """Weighted kNN class scores (Wu et al. 2018; used by DINO and most self-supervised papers).

    Features are L2-normalised; each query takes its ``knn_k`` most cosine-similar train samples, neighbour j gets the
    weight ``exp(sim_j / knn_temperature)``, and the score of class c is the sum of the weights of the neighbours
    labelled c. Ties at the k-th similarity go to the train samples of lower index, and the weights are summed in
    a fixed order (largest similarity first, then lower index), so the result does not depend on the chunking or
    on how the train set is split across processes (up to the rounding of the similarities themselves).

    Memory is bounded: queries go in chunks of ``batch_size`` (default: as many as keep one queries x train
    similarity block within ``max_block_elements``); the train features are neither copied nor normalised in place
    and no (M, N) matrix is ever built. The computation runs on the device of ``train_features``.

    ``sharded=True`` (every process of the initialised ``torch.distributed`` group calls it together): the train
    set is the union of the processes' ``train_features`` (global index order is rank-major) and each process
    classifies its own ``query_features``. Each query chunk is all-gathered, every process finds its local top-k of
    every gathered query, the (score, label, index) candidates are all-gathered and each process merges those of
    its own queries. Sizes may differ between processes. Without a process group it is the single-process case.

    Args:
        train_features: (N, D) reference features (this process's shard when ``sharded``).
        train_labels: (N,) integer labels in [0, num_classes).
        query_features: (M, D) features to classify.
        num_classes: C.
        knn_k: number of neighbours k; clamped to the (global) number of train samples when larger.
        knn_temperature: T > 0; must be at least 1/88 so that exp(1 / T) is finite in float32.
        batch_size: queries per chunk (per process when ``sharded``); ``None`` chooses it from
            ``max_block_elements``.
        sharded: the train set is split across the processes of the default group (see above).
        max_block_elements: bound on the elements of one similarity block when ``batch_size`` is ``None``
            (default 2**26: 256 MiB in float32).

    Returns:
        (M, C) float32 class scores (on the device of ``train_features``); ``argmax`` gives the prediction.
    """
    train, targets, queries = _checked_inputs(
        train_features, train_labels, query_features, knn_k, knn_temperature, batch_size, max_block_elements
    )
    world, rank = _knn_group(sharded)
    train_sizes, query_sizes = _exchange_sizes(train, queries, targets, num_classes, world)
    bank = _memory_bank(train, targets, knn_k, train_sizes, query_sizes, batch_size, max_block_elements, world, rank)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=train.device)
    for start in range(0, max(query_sizes), bank.chunk):
        block = F.normalize(queries[start : start + bank.chunk], dim=1)
        values, labels = bank.neighbours(block)
        scores[start : start + block.shape[0]].scatter_add_(1, labels, (values / knn_temperature).exp())
    return scores


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    query_labels: ArrayLike,
    num_classes: int,
    knn_k: int = DEFAULT_KNN_K,
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE,
    **options: Any,
) -> float:
    """Top-1 accuracy (percent, 0-100) of :func:`knn_classify` on ``query_features`` (M, D) / ``query_labels`` (M,).

    The other arguments, and ``options`` (``batch_size``, ``sharded``, ``max_block_elements``), are those of
    :func:`knn_classify`. Ties in the class scores go to the lower class index. With ``sharded=True`` every process
    passes its shards (train and queries) and receives the accuracy over all processes' queries: the counts are
    reduced once, at the end.
    """
    scores = knn_classify(train_features, train_labels, query_features, num_classes, knn_k, knn_temperature, **options)
    targets = to_tensor(query_labels).to(scores.device).long().reshape(-1)
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"query features and labels differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    hits = top_k_hits(scores, targets, 1).sum()
    counts = torch.stack([hits, torch.tensor(targets.numel(), device=scores.device)])
    world, _ = _knn_group(options.get("sharded", False))
    if world > 1:
        torch.distributed.all_reduce(counts)
    correct, total = counts.tolist()
    if total == 0:
        raise ValueError("knn_accuracy needs at least one query")
    return 100.0 * correct / total
