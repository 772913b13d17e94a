"""BatchNorm with batch statistics shared across processes, for any device and backend (CPU processes on gloo too).

``torch.nn.SyncBatchNorm`` only runs on GPUs, and torch's converter drops the activation of timm's fused
``BatchNormAct2d`` layers. :class:`DistributedBatchNorm` computes, in training, the mean and variance of the
*global* batch (every process's samples) and normalises with them, differentiably:

* each process computes, per channel, its sample count n_p, mean m_p and sum of squared deviations
  M2_p = sum (x - m_p)^2 over its samples (in float32, or float64 for float64 inputs);
* one all-gather (with gradient: the backward reduce-scatters, see :func:`simlap_hf.distributed.gather_with_grad`)
  brings every process's (m_p, M2_p, n_p) to every process;
* they are combined exactly as one pass over the whole batch would give them: n = sum n_p,
  mean = sum n_p m_p / n, M2 = sum (M2_p + n_p (m_p - mean)^2), biased variance M2 / n (for normalising) and
  unbiased M2 / (n - 1) (for the running variance), as ``torch.nn.BatchNorm`` does.

Gradients flow through the gathered statistics to every process's samples, so N processes with batch B compute the
forward and the gradients of one process with batch N x B (up to float rounding). Outside training, with one
process, or without an initialised process group, the layer is the ordinary BatchNorm (``F.batch_norm``). The
statistics cost one all-gather of 2C + 1 numbers per layer and forward (and one reduce-scatter backward), and no
host synchronisation.
:class:`DistributedBatchNormAct` adds timm's drop + activation after it, and :func:`convert_distributed_batchnorm`
replaces the BatchNorm layers of a model (torch ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, timm ``BatchNormAct2d``)
by these, sharing their parameters and buffers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .distributed import gather_with_grad

__all__ = ["DistributedBatchNorm", "DistributedBatchNormAct", "convert_distributed_batchnorm"]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class DistributedBatchNorm(_BatchNorm):
    """BatchNorm over (N, C, ...) inputs whose training statistics are those of every process's batch together."""

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of at least 2 dimensions (N, C, ...), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        self._check_input_dim(input)
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if not batch_statistics or _world_size() == 1:
            return super().forward(input)  # the ordinary BatchNorm, running-statistics updates included
        return self._global_batch_norm(input)

    def _global_batch_norm(self, input: Tensor) -> Tensor:
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = (1, channels) + (1,) * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))  # float32 at least (float64 stays)
        count = input.numel() // channels
        local_mean = x.sum(dim=dims) / max(count, 1)
        local_m2 = ((x - local_mean.view(shape)) ** 2).sum(dim=dims)
        local = torch.cat([local_mean, local_m2, local_mean.new_full((1,), float(count))])
        gathered = gather_with_grad(local[None])  # (world, 2C + 1): equal sizes on every process
        counts = gathered[:, -1:].detach()  # (world, 1)
        total = counts.sum()
        means, m2s = gathered[:, :channels], gathered[:, channels : 2 * channels]
        mean = (counts * means).sum(dim=0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(dim=0)
        variance = m2 / total

        if self.training and self.track_running_stats:
            factor = self._average_factor()
            if self.running_mean is not None:
                with torch.no_grad():
                    self.running_mean.mul_(1 - factor).add_(mean.detach().to(self.running_mean.dtype), alpha=factor)
                    unbiased = (m2.detach() / (total - 1).clamp_min(1)).to(self.running_var.dtype)
                    self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)

        output = (x - mean.view(shape)) * torch.rsqrt(variance.view(shape) + self.eps)
        if self.affine:
            output = output * self.weight.to(x.dtype).view(shape) + self.bias.to(x.dtype).view(shape)
        return output.to(input.dtype)

    def _average_factor(self) -> float:
        """The running-statistics factor of ``torch.nn.BatchNorm`` (advancing ``num_batches_tracked``)."""
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked)
        return factor


class DistributedBatchNormAct(DistributedBatchNorm):
    """:class:`DistributedBatchNorm` followed by the ``drop`` and ``act`` modules of a timm ``BatchNormAct2d``."""

    def __init__(self, *args, act: nn.Module | None = None, drop: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, input: Tensor) -> Tensor:  # noqa: D102
        return self.act(self.drop(super().forward(input)))


def _is_timm_batchnorm_act(module: nn.Module) -> bool:
    try:
        from timm.layers import BatchNormAct2d
    except ImportError:  # timm missing: no fused layers to keep
        return False
    return isinstance(module, BatchNormAct2d)


def convert_distributed_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm layer of ``module`` (itself included) by a :class:`DistributedBatchNorm`.

    torch ``BatchNorm1d/2d/3d`` and ``SyncBatchNorm`` become :class:`DistributedBatchNorm`; timm ``BatchNormAct2d``
    (BatchNorm fused with an activation, used by EfficientNets, ResNets with ``BatchNormAct`` and others) becomes
    :class:`DistributedBatchNormAct` with the same ``act`` and ``drop`` modules. The new layers share the original
    parameters and buffers (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``) and
    its train/eval mode, so state dicts keep their keys and outputs outside training are unchanged. Returns the
    converted module (a new object only when ``module`` itself is a BatchNorm layer).
    """
    converted = module
    if isinstance(module, _BatchNorm) and not isinstance(module, DistributedBatchNorm):
        arguments = (module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        if _is_timm_batchnorm_act(module):
            converted = DistributedBatchNormAct(*arguments, act=module.act, drop=module.drop)
        else:
            converted = DistributedBatchNorm(*arguments)
        # Share, not copy: optimisers and checkpoints see the same tensors.
        converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
    for name, child in list(converted.named_children()):
        new_child = convert_distributed_batchnorm(child)
        if new_child is not child:
            converted.add_module(name, new_child)
    return converted
