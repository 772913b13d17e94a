"""Small model helpers shared by the package: unwrapping, device lookup, eval mode, weights-file lookup,
gate entropy.

This module imports only torch and the standard library: the modeling code imports it, and the modeling code is
copied into saved model folders, where only torch, timm and transformers can be counted on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = ["unwrap_model", "model_device", "eval_mode", "find_weights_file", "describe_weights", "bernoulli_entropy"]

#: Wrapper classes whose ``.module`` is the user's model.
_PARALLEL_WRAPPERS = ("DistributedDataParallel", "DataParallel")
#: Weights files of a ``save_pretrained`` folder, in the order ``from_pretrained`` prefers them.
PRETRAINED_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model behind DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in _PARALLEL_WRAPPERS:
            model = inner
            continue
        break
    return model


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (else of its first buffer; the CPU for a model without tensors)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def find_weights_file(folder: str | os.PathLike, names: Sequence[str] = PRETRAINED_WEIGHT_FILES) -> str | None:
    """Path of the first of ``names`` that is a file inside ``folder``; ``None`` when there is none (or ``folder``
    is not a directory)."""
    text = os.fspath(folder)
    if not os.path.isdir(text):
        return None
    for name in names:
        candidate = os.path.join(text, name)
        if os.path.isfile(candidate):
            return candidate
    return None


def describe_weights(source: object) -> str:
    """Name the weights of a ``from_pretrained`` source for messages (quoted): the weights file of a local folder,
    else the source itself."""
    text = os.fspath(source) if isinstance(source, (str, os.PathLike)) else repr(source)
    found = find_weights_file(text)
    return repr(found if found is not None else text)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the ``with`` block; afterwards every submodule gets back its own train/eval
    flag (a plain ``model.train(previous)`` would not restore submodules that were in another mode)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def bernoulli_entropy(gates: Tensor, eps: float = 1e-6) -> Tensor:
    """Elementwise entropy in nats of Bernoulli(g) for gate values g of any shape, in the dtype of ``gates``: 0 for
    g in {0, 1}, log 2 at g = 0.5. Values are clamped to [eps, 1 - eps] first so that the logarithms stay finite."""
    g = gates.clamp(eps, 1.0 - eps)
    return -(g * g.log() + (1.0 - g) * (1.0 - g).log())
