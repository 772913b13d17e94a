"""One evaluation of a pretraining model's representation: online linear head top-1 / top-5 on the validation
split and kNN top-1 of the backbone features against the training images."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..utils import unwrap_model
from .features import extract_features
from .knn import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE, knn_accuracy
from .metrics import classification_metrics


def evaluate_representation(
    model: nn.Module,
    validation_loader: Iterable[Any],
    train_eval_loader: Iterable[Any],
    accelerator: Any | None,
    num_classes: int,
    knn_k: int = DEFAULT_KNN_K,
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE,
) -> dict[str, float]:
    """``eval_top1`` / ``eval_top5`` of the model's online head and ``eval_knn_top1`` of its backbone features.

    The validation features (V, D) (``pooler_output``) are gathered on every process; the (N, D) features of the
    unaugmented training images, the kNN memory bank, stay split across the processes, on their devices
    (``extract_features(..., shard=True)``). Each process classifies its slice ``[rank::world]`` of the validation
    queries against every shard (``knn_accuracy(..., sharded=world > 1)``) and the counts are reduced once, so all
    processes return the same numbers. The online head maps the validation features to (V, C) logits.

    Args:
        model: a model with an ``online_head`` (a SimLAPModel), possibly wrapped by ``accelerator.prepare``.
        validation_loader: loader of the validation images (queries); batches ``{"pixel_values", "labels"}`` or
            ``(images, labels)``.
        train_eval_loader: unshuffled loader of the training images under the evaluation transform.
        accelerator: the ``accelerate.Accelerator`` the loaders were prepared with, or ``None`` (one process).
        num_classes: C.
        knn_k, knn_temperature: neighbours and temperature of the kNN vote (:func:`knn_classify`).

    Returns:
        ``{"eval_top1", "eval_top5", "eval_knn_top1"}`` in percent.
    """
    val_features, val_labels = extract_features(model, validation_loader, accelerator)
    # The kNN memory bank stays split across the processes, on their devices; each process classifies its own
    # slice of the validation queries against every shard, and the counts are reduced once.
    train_features, train_labels = extract_features(model, train_eval_loader, accelerator, shard=True)
    unwrapped = accelerator.unwrap_model(model) if accelerator is not None else unwrap_model(model)
    head = unwrapped.online_head
    with torch.no_grad():
        logits = head(val_features.to(head.weight.device)).float().cpu()
    metrics = classification_metrics(logits, val_labels)
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    knn = knn_accuracy(
        train_features,
        train_labels,
        val_features[rank::world].to(train_features.device),
        val_labels[rank::world],
        num_classes,
        knn_k=knn_k,
        knn_temperature=knn_temperature,
        sharded=world > 1,
    )
    return {"eval_top1": metrics["top1"], "eval_top5": metrics["top5"], "eval_knn_top1": knn}
