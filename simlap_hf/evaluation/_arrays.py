"""Conversions of the tensor-or-array inputs the evaluation functions accept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def to_tensor(x: ArrayLike | Sequence[Any]) -> Tensor:
    """``x`` as a tensor: tensors as they are (same device), anything else through ``np.asarray``."""
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def to_numpy(x: ArrayLike | Sequence[Any], dtype: Any) -> np.ndarray:
    """``x`` as a numpy array of ``dtype`` (tensors are detached and copied to the CPU first)."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)
