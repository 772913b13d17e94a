"""The loss functions of the three jobs, ``(model, batch) -> (loss, {name: scalar tensor to log})``, called by the
training loop on the prepared (possibly wrapped) model with a batch ``{"pixel_values": (B, C, H, W),
"labels": (B,)}``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..losses import classification_loss
from ..utils import unwrap_model
from .state import LossFunction

if TYPE_CHECKING:
    from timm.data import Mixup

StepOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


def simlap_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
    """One forward pass of a :class:`SimLAPModel` with labels: the total loss, and the outputs the model declares in
    its ``logged_outputs`` (loss parts and statistics) to log."""
    out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    return out.loss, {name: getattr(out, name) for name in unwrap_model(model).logged_outputs}


def classification_step(mixup: Mixup | None, label_smoothing: float) -> LossFunction:
    """Cross-entropy of the model's ``logits`` (:func:`simlap_hf.losses.classification_loss`): against mixup/cutmix
    soft targets when ``mixup`` is set, else against the labels smoothed by ``label_smoothing``."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        pixel_values, targets = batch["pixel_values"], batch["labels"]
        if mixup is not None:
            pixel_values, targets = mixup(pixel_values, targets)
        logits = model(pixel_values=pixel_values).logits
        return classification_loss(logits, targets, label_smoothing), {}

    return step


def fuse_step(mixup: Mixup | None) -> LossFunction:
    """SimLAP-Fuse's own loss: ArcGrad cross-entropy (soft targets under mixup, else the labels smoothed by the
    config's ``label_smoothing``) + the SimLAP term."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        soft_labels = None
        if mixup is not None:
            pixel_values, soft_labels = mixup(pixel_values, labels)
        out = model(pixel_values=pixel_values, labels=labels, soft_labels=soft_labels)
        return out.loss, {}

    return step


def with_normalized_inputs(
    compute_loss: LossFunction, normalize: Callable[[torch.Tensor], torch.Tensor]
) -> LossFunction:
    """``compute_loss`` on batches whose uint8 ``pixel_values`` are first normalised on their device."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StepOutput:
        return compute_loss(model, {**batch, "pixel_values": normalize(batch["pixel_values"])})

    return step
