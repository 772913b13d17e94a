"""Representation quality of one model: backbone features and embeddings in one pass, kNN / linear-probe top-1,
collapse of the embeddings, and (for SimLAP models) the class-pair gates.

Shapes: N samples, D backbone features, K embedding dimensions, C classes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..evaluation import collapse_report, extract_features, knn_accuracy, linear_probe
from ..evaluation.features import takes_pixel_values
from ..evaluation.knn import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE
from ..relations import DEFAULT_THRESHOLD, gate_kind
from ..utils import unwrap_model
from .gates import DEFAULT_NEAR_BINARY_MARGIN, analyze_gates
from .report import to_jsonable


def _output_tensor(output: Any, key: str) -> Tensor | None:
    if isinstance(output, Tensor):
        return output if key == "pooler_output" else None
    value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
    return value if isinstance(value, Tensor) else None


class _FeatureTap(nn.Module):
    """Runs the wrapped model once per batch and returns ``[pooler_output | embeddings]`` as one (B, D [+ K]) tensor,
    so that :func:`~simlap_hf.evaluation.extract_features` collects both in one pass (with its accelerate gathering,
    eval mode and progress bar)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.keyword = takes_pixel_values(model)
        self.feature_dim: int | None = None
        self.has_embeddings = False

    def forward(self, pixel_values: Tensor) -> Tensor:
        output = self.model(pixel_values=pixel_values) if self.keyword else self.model(pixel_values)
        pooled = _output_tensor(output, "pooler_output")
        if pooled is None:
            raise KeyError(
                f"{type(unwrap_model(self.model)).__name__} returned no 'pooler_output' (nor a plain feature tensor); "
                f"analysis needs pooled backbone features (timm models: create them with num_classes=0)."
            )
        pooled = pooled.flatten(start_dim=1).float()
        embeddings = _output_tensor(output, "embeddings")
        self.feature_dim = pooled.shape[1]
        self.has_embeddings = embeddings is not None
        if embeddings is None:
            return pooled
        return torch.cat([pooled, embeddings.flatten(start_dim=1).float()], dim=1)


def extract_representations(
    model: nn.Module, dataloader: Iterable[Any], accelerator: Any | None = None, show_progress: bool = True
) -> tuple[Tensor, Tensor | None, Tensor]:
    """Backbone features, embeddings and labels of every sample of ``dataloader``, in one pass.

    Returns:
        ``(features, embeddings, labels)``: (N, D) ``pooler_output``, (N, K) ``embeddings`` (``None`` when the model
        has none: classifiers, plain timm models) and (N,) int64 labels, all on the CPU. Models run in eval mode
        under ``no_grad``; with ``accelerator`` the loader should be prepared and every process gets all samples.
    """
    tap = _FeatureTap(model)
    stacked, labels = extract_features(tap, dataloader, accelerator=accelerator, show_progress=show_progress)
    if not tap.has_embeddings:
        return stacked, None, labels
    return stacked[:, : tap.feature_dim], stacked[:, tap.feature_dim :], labels


def probe_features(
    train_features: Tensor,
    train_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    num_classes: int,
    knn_k: int = DEFAULT_KNN_K,
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE,
    run_linear_probe: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN top-1 and linear-probe top-1 (percent) of frozen features.

    Returns ``{"knn_top1", "linear_probe_top1", "linear_probe_C", "num_train", "num_query", "knn_k"}``; when the
    probe cannot be fitted (e.g. too few samples) ``linear_probe_top1`` is ``None`` and ``linear_probe_error`` says
    why.
    """
    result: dict[str, Any] = {
        "knn_top1": knn_accuracy(
            train_features,
            train_labels,
            query_features,
            query_labels,
            num_classes,
            knn_k=knn_k,
            knn_temperature=knn_temperature,
        ),
        "knn_k": int(knn_k),
        "linear_probe_top1": None,
        "linear_probe_C": None,
        "num_train": int(train_features.shape[0]),
        "num_query": int(query_features.shape[0]),
    }
    if run_linear_probe:
        try:
            probe = linear_probe(train_features, train_labels, query_features, query_labels, seed=seed)
        except ValueError as error:
            result["linear_probe_error"] = str(error)
        else:
            result["linear_probe_top1"] = probe["top1"]
            result["linear_probe_C"] = probe["C"]
    return result


def analyze_model(
    model: nn.Module,
    train_eval_loader: Iterable[Any],
    validation_loader: Iterable[Any],
    label_names: Sequence[str],
    accelerator: Any | None = None,
    knn_k: int = DEFAULT_KNN_K,
    *,
    knn_temperature: float = DEFAULT_KNN_TEMPERATURE,
    run_linear_probe: bool = True,
    gate_threshold: float = DEFAULT_THRESHOLD,
    near_binary_margin: float = DEFAULT_NEAR_BINARY_MARGIN,
    top_k_pairs: int = 5,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Analyse one model: representation quality, collapse and (for SimLAP) the class-pair gates.

    Args:
        model: a SimLAPModel, a classifier whose output has ``pooler_output``, a transformers vision model, or a timm
            model created with ``num_classes=0`` (plain feature tensor); may be wrapped by ``accelerator.prepare``.
        train_eval_loader: unshuffled, *unaugmented* loader over the training images (kNN memory bank and probe
            training set); batches ``{"pixel_values", "labels"}``.
        validation_loader: loader over the validation images (queries).
        label_names: the C class names of the data set.
        accelerator: optional ``accelerate.Accelerator`` (loaders prepared by it); every process returns the same dict.
        knn_k, knn_temperature, run_linear_probe, gate_threshold, near_binary_margin, top_k_pairs, show_progress:
            see :func:`probe_features` and :func:`analyze_gates`.

    Returns:
        A JSON-friendly dict: ``model_class``; ``label_names``; ``feature_dim`` (D of ``pooler_output``);
        ``validation``: :func:`probe_features` of backbone features (train_eval -> validation); ``embedding_source``
        (``"embeddings"`` for SimLAPModel, else ``"pooler_output"``) and ``collapse``: its
        :func:`~simlap_hf.evaluation.collapse_report` on the validation samples; ``gates``: :func:`analyze_gates` for
        models with class-pair gates, else ``None``; ``warnings``: list of strings. NaN values are ``None``, so the
        dict can go to ``json.dumps`` as it is.
    """
    inner = unwrap_model(accelerator.unwrap_model(model) if accelerator is not None else model)
    is_main = accelerator.is_local_main_process if accelerator is not None else True
    label_names = [str(name) for name in label_names]
    train = extract_representations(model, train_eval_loader, accelerator, show_progress)
    validation = extract_representations(model, validation_loader, accelerator, show_progress)
    report: dict[str, Any] = {
        "model_class": type(inner).__name__,
        "label_names": label_names,
        **_representation_quality(train, validation, len(label_names), knn_k, knn_temperature, run_linear_probe),
    }
    gate_options = {"threshold": gate_threshold, "near_binary_margin": near_binary_margin, "top_k": top_k_pairs}
    report["gates"], report["warnings"] = _gate_report(inner, label_names, gate_options, show_progress and is_main)
    return to_jsonable(report)


Representations = tuple[Tensor, Tensor | None, Tensor]


def _representation_quality(
    train: Representations,
    validation: Representations,
    num_classes: int,
    knn_k: int,
    knn_temperature: float,
    run_linear_probe: bool,
) -> dict[str, Any]:
    """The ``feature_dim``, ``validation`` (:func:`probe_features`), ``embedding_source`` and ``collapse`` entries of
    :func:`analyze_model` from the (features, embeddings, labels) of the two splits."""
    train_features, _, train_labels = train
    features, embeddings, labels = validation
    return {
        "feature_dim": int(features.shape[1]),
        "validation": probe_features(
            train_features,
            train_labels,
            features,
            labels,
            num_classes,
            knn_k=knn_k,
            knn_temperature=knn_temperature,
            run_linear_probe=run_linear_probe,
        ),
        "embedding_source": "embeddings" if embeddings is not None else "pooler_output",
        "collapse": collapse_report(embeddings if embeddings is not None else features),
    }


def _gate_report(
    inner: nn.Module, label_names: list[str], options: dict[str, Any], show_progress: bool
) -> tuple[dict[str, Any] | None, list[str]]:
    """(:func:`analyze_gates` of a model with class-pair gates, else None; warnings about it)."""
    if gate_kind(inner) is None:
        return None, []
    gates = analyze_gates(inner, label_names, **options, show_progress=show_progress)
    if gates["label_names"] == label_names:
        return gates, []
    warning = (
        f"the model's classes {gates['label_names']} differ from the data set's {label_names}; the gate analysis "
        f"names the model's classes"
    )
    return gates, [warning]
