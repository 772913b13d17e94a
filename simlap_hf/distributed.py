"""Collectives of the distributed loss and evaluation: gathers with and without gradient and the global mean.

Keys of the contrastive loss are gathered from every process *with* gradient (the backward returns each process the
gradient of its own rows), and their labels without, so that masks are built from the same rows as the logits. All
functions are no-ops on one process, use the single-tensor collectives where the backend has them, and accept
unequal batch sizes (``equal_sizes=False``) at the cost of one extra exchange of the sizes. This file ships in saved
model folders with the modeling code, so it imports only torch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "is_distributed",
    "all_gather_equal",
    "reduce_scatter_equal",
    "gather_with_grad",
    "gather_labels",
    "distributed_mean",
]


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# Backends that use the list / all-reduce forms instead of the single-tensor collectives: gloo (CPU; its
# single-tensor forms are not the path the tests exercise) and any backend found without them.
_NO_GATHER_INTO_TENSOR: set[str] = {"gloo"}
_NO_REDUCE_SCATTER_TENSOR: set[str] = {"gloo"}


def _backend(group: dist.ProcessGroup | None) -> str:
    return str(dist.get_backend(group))


def _unsupported(error: BaseException) -> bool:
    """True for the error a backend raises for a collective it does not implement (not for a failed exchange)."""
    return isinstance(error, NotImplementedError) or "support" in str(error).lower()


def all_gather_equal(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Concatenate ``tensor`` (n, ...) of every process along dim 0, rank-major, into a new (W * n, ...) tensor.

    Every process must pass the same shape: no sizes are exchanged (a mismatch aborts the collective). One
    ``all_gather_single`` (``all_gather_into_tensor`` before torch 2.14) writing straight into the output (gloo on CPU
    supports it in torch 2.14, checked); a backend that raises for it falls back to ``all_gather`` into views of
    the output.
    No gradient: see :func:`gather_with_grad`.
    """
    world = dist.get_world_size(group)
    tensor = tensor.contiguous()
    output = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
    backend = _backend(group)
    if backend not in _NO_GATHER_INTO_TENSOR:
        collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        try:
            collective(output, tensor, group=group)
            return output
        except (RuntimeError, NotImplementedError) as error:  # raised locally, before any communication
            if not _unsupported(error):
                raise
            _NO_GATHER_INTO_TENSOR.add(backend)
    dist.all_gather(list(output.chunk(world)), tensor, group=group)
    return output


def reduce_scatter_equal(tensor: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum (W * n, ...) tensors over processes and return this process's slice (n, ...) of the sum.

    One ``reduce_scatter_single`` (``reduce_scatter_tensor`` before torch 2.14): each process receives only its n
    rows (gloo on CPU supports it in torch 2.14, checked). A backend that raises for it falls back to an
    ``all_reduce`` of the whole tensor and a slice (W times the traffic).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if tensor.shape[0] % world:
        raise ValueError(f"reduce_scatter_equal needs a first dimension divisible by {world}; got {tensor.shape[0]}")
    rows = tensor.shape[0] // world
    tensor = tensor.contiguous()
    backend = _backend(group)
    if backend not in _NO_REDUCE_SCATTER_TENSOR:
        output = tensor.new_empty((rows, *tensor.shape[1:]))
        collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
        try:
            collective(output, tensor, op=dist.ReduceOp.SUM, group=group)
            return output
        except (RuntimeError, NotImplementedError) as error:
            if not _unsupported(error):
                raise
            _NO_REDUCE_SCATTER_TENSOR.add(backend)
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total[rank * rows : (rank + 1) * rows]


class _GatherEqualWithGradient(torch.autograd.Function):
    """All-gather of equal-size tensors along dim 0; the backward reduce-scatters the gradient, so each process
    receives the gradient of its own rows summed over every process's loss (its keys get all processes' anchors)."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: D102
        return all_gather_equal(tensor)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # noqa: D102
        return reduce_scatter_equal(grad_output)


class _GatherWithGradient(torch.autograd.Function):
    """All-gather of tensors whose first dimension may differ between processes (one size exchange, padding);
    the backward all-reduces the gradient and keeps this process's rows."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # noqa: D102
        world_size = dist.get_world_size()
        local_size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.int64)
        sizes = all_gather_equal(local_size).tolist()
        largest = max(sizes)
        padded = tensor.new_zeros((largest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = all_gather_equal(padded).view(world_size, largest, *tensor.shape[1:])
        ctx.sizes = sizes
        ctx.rank = dist.get_rank()
        return torch.cat([part[:size] for part, size in zip(gathered, sizes)], dim=0)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:  # noqa: D102
        grad = grad_output.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def gather_with_grad(tensor: Tensor, equal_sizes: bool = True) -> Tensor:
    """Concatenate ``tensor`` (n_p, ...) of every process along dim 0 (rank-major), keeping gradients.

    A no-op outside distributed training. Gradients flowing into the result are summed over processes and each
    process receives its own slice, which is what data-parallel averaging expects when every process's loss is
    scaled as in :func:`distributed_mean`.

    ``equal_sizes=True`` (default; training batches are equal on every process: the samplers drop the incomplete
    last batch): one ``all_gather_single`` forward and one ``reduce_scatter_single`` backward, no size exchange and
    no host synchronisation. Every process must then pass the same shape (a mismatch aborts the collective).
    ``equal_sizes=False``: sizes may differ; they are exchanged first (a host synchronisation), and the backward
    all-reduces the whole gradient.
    """
    if not is_distributed():
        return tensor
    if equal_sizes:
        return _GatherEqualWithGradient.apply(tensor)
    return _GatherWithGradient.apply(tensor)


def gather_labels(labels: Tensor, equal_sizes: bool = True) -> Tensor:
    """Concatenate (n_p,) label tensors of every process (no gradient); a no-op outside distributed training.
    ``equal_sizes`` as in :func:`gather_with_grad`."""
    if not is_distributed():
        return labels
    with torch.no_grad():
        return all_gather_equal(labels) if equal_sizes else _GatherWithGradient.apply(labels)


def distributed_mean(loss_sum: Tensor, count: Tensor, gathered: bool = True) -> Tensor:
    """Per-process loss whose average over processes is ``global sum / global count``.

    With W processes and keys gathered from all of them, returns ``W * loss_sum / all_reduce(count)``: data-parallel
    training averages gradients over processes, so the parameters receive exactly the gradient of the global mean
    over all positive pairs. Otherwise (one process, or keys not gathered) the local mean ``loss_sum / count``.
    """
    if not (gathered and is_distributed()):
        return loss_sum / count.clamp_min(1.0)
    total = count.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return loss_sum * dist.get_world_size() / total.clamp_min(1.0)
