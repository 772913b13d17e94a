"""Feature extraction: run a transformers or timm model over a dataloader and collect (N, D) features + labels."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..utils import eval_mode, model_device, unwrap_model
from ._arrays import to_tensor

#: Images per forward pass when features are extracted for evaluation, embedding or analysis.
DEFAULT_EVAL_BATCH_SIZE = 256


def takes_pixel_values(model: nn.Module) -> bool:
    """True when the model's ``forward`` has a ``pixel_values`` parameter (transformers vision models)."""
    try:
        params = inspect.signature(unwrap_model(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "pixel_values" in params


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    """(images (B, ...), labels (B,)) of a ``{"pixel_values", "labels"}`` dict or an ``(images, labels)`` pair."""
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch or "labels" not in batch:
            raise KeyError(f"batches must contain 'pixel_values' and 'labels'; got keys {sorted(batch)}")
        return batch["pixel_values"], to_tensor(batch["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], to_tensor(batch[1])
    raise TypeError(
        f"batches must be dicts with 'pixel_values' and 'labels' (or (images, labels) pairs); got {type(batch)}"
    )


def _select_feature(output: Any, output_key: str) -> Tensor:
    """The feature tensor of a model output: the output itself when it is a tensor, else ``output.<output_key>``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):  # transformers.ModelOutput is an OrderedDict
        feature = output.get(output_key)
        available = [key for key, value in output.items() if value is not None]
    else:
        feature = getattr(output, output_key, None)
        available = [key for key in dir(output) if not key.startswith("_")]
    if not isinstance(feature, Tensor):
        raise KeyError(f"The model output has no tensor {output_key!r}; available: {available}")
    return feature


def _batch_features(
    model: nn.Module, batch: Any, device: torch.device, keyword: bool, output_key: str
) -> tuple[Tensor, Tensor]:
    """One batch through the model: ((B, D) features, (B,) int64 labels), the features flattened to two dims."""
    pixel_values, batch_labels = _split_batch(batch)
    pixel_values = pixel_values.to(device)
    output = model(pixel_values=pixel_values) if keyword else model(pixel_values)
    feature = _select_feature(output, output_key)
    if feature.ndim == 1:
        feature = feature[:, None]
    elif feature.ndim > 2:
        feature = feature.flatten(start_dim=1)
    batch_labels = batch_labels.reshape(-1).long()
    if feature.shape[0] != batch_labels.shape[0]:
        raise ValueError(
            f"The model returned {feature.shape[0]} feature rows for a batch of {batch_labels.shape[0]} labels"
        )
    return feature, batch_labels


def _kept_rows(feature: Tensor, labels: Tensor, shard: bool, rank: int, world: int) -> tuple[Tensor, Tensor]:
    """What a process keeps of a (gathered) batch of n rows: all of it on the CPU, or with ``shard`` its rows
    [r * n // W, (r + 1) * n // W) on the device. (B, D) float32 features and (B,) int64 labels."""
    if not shard:
        return feature.detach().float().cpu(), labels.detach().long().cpu()
    rows = slice(rank * feature.shape[0] // world, (rank + 1) * feature.shape[0] // world)
    # A copy of the slice, so that the gathered batch is freed.
    return feature[rows].detach().float().clone(), labels[rows].detach().long().to(feature.device)


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataloader: Iterable[Any],
    accelerator: Any | None = None,
    output_key: str = "pooler_output",
    show_progress: bool = True,
    shard: bool = False,
) -> tuple[Tensor, Tensor]:
    """Run ``model`` over ``dataloader`` and collect one feature vector and the label of every sample.

    Batches are dicts with ``pixel_values`` (B, 3, H, W) and ``labels`` (B,) (an ``(images, labels)`` pair is
    accepted too). Models whose ``forward`` takes ``pixel_values`` (transformers) are called as
    ``model(pixel_values=...)`` and the feature is ``output.<output_key>`` (default ``pooler_output``); other
    models (e.g. timm) are called positionally, and when they return a plain tensor that tensor is the feature
    (``timm.create_model(name, num_classes=0)`` returns pooled features). Features with more than two dimensions
    (e.g. the (B, D, 1, 1) ``pooler_output`` of transformers ResNets) are flattened to (B, D').

    The model runs under ``torch.no_grad()`` in eval mode (train/eval flags restored afterwards); a tqdm bar is
    shown on the (local) main process when ``show_progress``. Without ``accelerator`` the inputs go to the device of
    the model's parameters. With ``accelerator`` (loader and model passed through ``accelerator.prepare``) each
    batch is gathered with ``accelerator.gather_for_metrics``: every process returns the full feature set, in dataset
    order for an unshuffled loader, without the samples duplicated to pad the last batch.

    Args:
        model: a ``torch.nn.Module`` (transformers ``PreTrainedModel``, timm model, or wrapped by accelerate).
        dataloader: iterable of batches as described above.
        accelerator: an optional ``accelerate.Accelerator``.
        output_key: attribute of the model output holding the features (ignored for tensor outputs).
        show_progress: show a progress bar on the main process.
        shard: keep on each process only its share of the data, on the device: of every gathered (de-duplicated)
            batch of n rows, process r of W keeps rows [r * n // W, (r + 1) * n // W). The shards are disjoint and
            together hold every sample once; no process holds all of them. This is the memory-bank layout
            :func:`knn_classify` and :func:`knn_accuracy` take with ``sharded=True``. With one process (or no
            accelerator) the full set, on the device.

    Returns:
        ``(features, labels)``: float32 tensor of shape (N, D) and int64 tensor of shape (N,), on the CPU (or, with
        ``shard``, this process's rows on the device).
    """
    from tqdm.auto import tqdm

    is_main = accelerator.is_local_main_process if accelerator is not None else True
    device = accelerator.device if accelerator is not None else model_device(model)
    keyword = takes_pixel_values(model)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0

    features: list[Tensor] = []
    labels: list[Tensor] = []
    with eval_mode(model):
        for batch in tqdm(dataloader, desc="Extracting features", disable=not (show_progress and is_main)):
            feature, batch_labels = _batch_features(model, batch, device, keyword, output_key)
            if accelerator is not None:
                feature, batch_labels = accelerator.gather_for_metrics((feature.contiguous(), batch_labels.to(device)))
            feature, batch_labels = _kept_rows(feature, batch_labels, shard, rank, world)
            features.append(feature)
            labels.append(batch_labels)
    if not features:
        raise ValueError("The dataloader yielded no batches")
    return torch.cat(features), torch.cat(labels)
