"""Analysis of learned representations: the class-pair gates of SimLAP, collapse, kNN / linear-probe quality, figures.

The paper's three claims, checkable on a user's own models:

* **gates reveal which classes share features**: :func:`gate_matrix` computes the gate vector g(y1, y2) of every
  class pair (C x C x K); :func:`analyze_gates` turns it into C x C class-relationship matrices (mean gate activation
  of a pair, fraction of its open dimensions, Jaccard overlap of the open dimensions of the two classes), the most
  and least related class pairs by name, and gate entropy statistics;
* **resistance to dimensional collapse**: the singular value spectrum and effective rank of the embeddings
  (:func:`simlap_hf.evaluation.collapse_report`);
* **transferability**: kNN and linear-probe top-1 of frozen backbone features (:func:`probe_features`).

:func:`analyze_model` bundles all of it for one model and two dataloaders (the training script calls it after
training); :func:`summary_markdown` renders its result as a short model-card section. The figures
(:func:`plot_singular_values`, :func:`plot_gate_heatmap`, :func:`plot_gate_histogram`) are drawn with matplotlib's
object-oriented API on an Agg canvas, so they never touch the user's pyplot state or need a display.

Shapes: C classes, K gate / embedding dimensions, D backbone features, N samples.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .evaluation import collapse_report, extract_features, knn_accuracy, linear_probe

__all__ = [
    "gate_matrix",
    "analyze_gates",
    "extract_representations",
    "probe_features",
    "analyze_model",
    "summary_markdown",
    "plot_singular_values",
    "plot_gate_heatmap",
    "plot_gate_histogram",
    "to_jsonable",
]

#: Gate values at or above this count as an "open" dimension.
DEFAULT_THRESHOLD = 0.5
#: Gate values within this distance of 0 or 1 count as near-binary.
DEFAULT_NEAR_BINARY_MARGIN = 0.05
OPEN_GATE_NOTE = (
    "open gate: the model has no feature filter (g = 1 for every class pair), so its gates carry no information "
    "about class relationships"
)
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")


# ----------------------------------------------------------------------------------------------------------------
# Gates of class pairs
# ----------------------------------------------------------------------------------------------------------------


def _unwrap(model: nn.Module) -> nn.Module:
    """The user's model behind DDP / DataParallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    for _ in range(8):
        inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "module", None)
            if not (isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel")):
                break
        model = inner
    return model


def gate_kind(model: nn.Module) -> str | None:
    """``"fused"``, ``"product"`` or ``"open"`` for a SimLAP pretraining model, ``"fuse"`` for SimLAP-Fuse (gates from
    the signs of the class weights), ``None`` for a model without class-pair gates."""
    model = _unwrap(model)
    if callable(getattr(model, "gate", None)) and hasattr(getattr(model, "config", None), "gate"):
        return str(model.config.gate)
    if callable(getattr(model, "class_gate", None)):
        return "fuse"
    return None


def _gate_function(model: nn.Module):
    model = _unwrap(model)
    kind = gate_kind(model)
    if kind is None:
        raise ValueError(
            f"{type(model).__name__} has no class-pair gates: gate analysis needs a SimLAPModel (model.gate) or a "
            f"SimLAPFuseForImageClassification (model.class_gate)."
        )
    function = model.gate if kind != "fuse" else model.class_gate
    return model, kind, function, int(model.config.num_labels)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def _iter_gate_rows(model: nn.Module, batch_size: int = 65536, show_progress: bool = False) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, gates)`` blocks of the C x C x K gate tensor: gates (R, C, K) float32 on the CPU hold
    g(y1, y2) for y1 in [first_row, first_row + R) and every y2. Eval mode, no gradient, at most about
    ``batch_size`` pairs per forward pass; the train/eval flags of the model are restored afterwards."""
    from tqdm.auto import tqdm

    inner, _, function, num_classes = _gate_function(model)
    device = _model_device(inner)
    rows = max(1, int(batch_size) // max(num_classes, 1))
    modes = [(module, module.training) for module in inner.modules()]
    inner.eval()
    try:
        partners = torch.arange(num_classes, device=device)
        starts = range(0, num_classes, rows)
        for start in tqdm(starts, desc="Class-pair gates", disable=not show_progress or len(starts) < 2):
            stop = min(start + rows, num_classes)
            first = torch.arange(start, stop, device=device).repeat_interleave(num_classes)  # (R*C,)
            second = partners.repeat(stop - start)  # (R*C,)
            gates = function(first, second).float().cpu()  # (R*C, K)
            yield start, gates.reshape(stop - start, num_classes, -1)
    finally:
        for module, training in modes:
            module.training = training


def gate_matrix(model: nn.Module, batch_size: int = 65536, show_progress: bool = False) -> Tensor:
    """Gate vector of every ordered class pair: ``G[i, j] = g(i, j)``, a (C, C, K) float32 CPU tensor.

    Computed in eval mode (the BatchNorm layers of the feature filter use their running statistics, so every pair's
    gate is independent of the others) without gradient, ``batch_size`` pairs at a time; the model's train/eval flags
    are restored. The diagonal ``G[y, y]`` holds the single-class gates g(y, y). Memory: C * C * K * 4 bytes (use
    :func:`analyze_gates`, which streams, for very many classes). For the ``open`` gate every value is 1.

    Works for a :class:`~simlap_hf.SimLAPModel` (``model.gate``) and for SimLAP-Fuse (``model.class_gate``, binary
    gates from the signs of the class weights); wrappers of DDP, DataParallel and ``torch.compile`` are looked through.
    """
    blocks = [gates for _, gates in _iter_gate_rows(model, batch_size, show_progress)]
    return torch.cat(blocks)


def _bernoulli_entropy(g: Tensor, eps: float = 1e-7) -> Tensor:
    """Elementwise entropy in nats of Bernoulli(g): 0 at g in {0, 1}, log 2 at g = 0.5."""
    g = g.double().clamp(eps, 1.0 - eps)
    return -(g * g.log() + (1.0 - g) * (1.0 - g).log())


def _class_names(model: nn.Module, num_classes: int, label_names: Sequence[str] | None) -> list[str]:
    """Class names for the gate indices: the model's own ``id2label`` when it holds real names (the gates are indexed
    by the model's classes), else ``label_names`` when they fit, else ``class i``."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_classes)]
    if all(name and not _DEFAULT_LABEL.match(name) for name in names):
        return names
    if label_names is not None and len(label_names) == num_classes:
        return [str(name) for name in label_names]
    return [f"class {i}" for i in range(num_classes)]


def _pair_entry(i: int, j: int, names: Sequence[str], activation: np.ndarray, open_fraction: np.ndarray,
                jaccard: np.ndarray, dim: int, relatedness: np.ndarray, entropy: np.ndarray) -> dict[str, Any]:
    return {
        "classes": [names[i], names[j]],
        "indices": [i, j],
        "relatedness": float(relatedness[i, j]),
        "mean_activation": float(activation[i, j]),
        "entropy": float((entropy[i, j] + entropy[j, i]) / 2),
        "open_dims": float(open_fraction[i, j] * dim),
        "jaccard": float(jaccard[i, j]),
    }


def analyze_gates(
    model: nn.Module,
    label_names: Sequence[str] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    near_binary_margin: float = DEFAULT_NEAR_BINARY_MARGIN,
    top_k: int = 5,
    bins: int = 50,
    batch_size: int = 65536,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Class relationships and statistics of the gates of every class pair.

    The C x C x K gates are streamed row block by row block (see :func:`gate_matrix`), so memory stays O(C^2).

    Args:
        model: a SimLAPModel (or SimLAP-Fuse classifier), possibly wrapped.
        label_names: class names, used when the model's ``id2label`` holds only default names.
        threshold: a gate value ``>= threshold`` is an open dimension.
        near_binary_margin: gate values within this distance of 0 or 1 count as near-binary.
        top_k: number of most / least related class pairs to list.
        bins: number of histogram bins over [0, 1].
        batch_size: pairs per forward pass of the feature filter.
        show_progress: show a progress bar over the row blocks.

    Returns:
        A JSON-friendly dict. Always: ``gate`` (kind), ``has_filter``, ``num_classes`` (C), ``dim`` (K),
        ``label_names``. For the ``open`` gate also ``note`` and nothing else (there is no filter). Otherwise:

        * ``matrices``: C x C lists ``mean_activation`` (mean over K of g(i, j)), ``open_fraction`` (share of the
          K dimensions with g(i, j) >= threshold), ``jaccard`` (|O_i & O_j| / |O_i | O_j| with O_y the open dimensions
          of the single-class gate g(y, y); 0 when both are empty) and ``entropy`` (mean Bernoulli entropy of g(i, j));
        * ``single_class_gates``: the C x K gates g(y, y);
        * ``relation_measure``: how pairs are ranked (:mod:`simlap_hf.relations`): for a SimLAP filter the gate
          entropy (most undecided gates first), which names related classes on Fashion-MNIST (precision 0.9-1.0 of
          the top 5 against the garment groups) where the largest mean activation names unrelated ones (0.0); for
          SimLAP-Fuse's binary sign gates the share of agreeing dimensions (high_activation);
        * ``most_related`` / ``least_related``: the ``top_k`` off-diagonal unordered pairs with the largest / smallest
          relatedness under that measure (symmetrised), each ``{"classes": [name_i, name_j], "indices",
          "relatedness", "mean_activation", "entropy", "open_dims", "jaccard"}``;
        * ``stats``: ``mean_entropy_nats`` (mean Bernoulli entropy of all C*C*K gate values), ``mean_entropy_bits``
          (the same in bits, 0..1), ``near_binary_fraction``, ``mean_activation``, ``mean_open_dims``,
          ``same_class_mean_activation`` (diagonal), ``cross_class_mean_activation`` (off-diagonal),
          ``is_symmetric``;
        * ``histogram``: ``bin_edges`` and ``same_class_counts`` / ``cross_class_counts`` of the gate values.
    """
    inner, kind, _, num_classes = _gate_function(model)
    names = _class_names(inner, num_classes, label_names)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1); got {threshold}")
    if not 0.0 <= near_binary_margin < 0.5:
        raise ValueError(f"near_binary_margin must lie in [0, 0.5); got {near_binary_margin}")
    report: dict[str, Any] = {"gate": kind, "has_filter": kind != "open", "num_classes": num_classes,
                              "label_names": names, "threshold": threshold, "near_binary_margin": near_binary_margin}
    if kind == "open":
        report["dim"] = int(inner.config.out_dim)
        report["note"] = OPEN_GATE_NOTE
        return report

    C = num_classes
    activation = torch.zeros(C, C, dtype=torch.float64)
    open_fraction = torch.zeros(C, C, dtype=torch.float64)
    entropy = torch.zeros(C, C, dtype=torch.float64)
    same_counts = torch.zeros(bins, dtype=torch.float64)
    cross_counts = torch.zeros(bins, dtype=torch.float64)
    single = None
    near_binary = 0
    total = 0
    dim = 0
    for start, gates in _iter_gate_rows(inner, batch_size, show_progress):  # gates (R, C, K)
        rows, _, dim = gates.shape
        index = torch.arange(start, start + rows)
        activation[index] = gates.double().mean(dim=2)
        open_fraction[index] = (gates >= threshold).double().mean(dim=2)
        entropy[index] = _bernoulli_entropy(gates).mean(dim=2)
        near_binary += int(((gates <= near_binary_margin) | (gates >= 1.0 - near_binary_margin)).sum())
        total += gates.numel()
        diagonal = gates[torch.arange(rows), index]  # (R, K): g(y, y)
        single = diagonal if single is None else torch.cat([single, diagonal])
        is_diagonal = torch.zeros(rows, C, dtype=torch.bool)
        is_diagonal[torch.arange(rows), index] = True
        same_counts += torch.histc(gates[is_diagonal].double(), bins=bins, min=0.0, max=1.0)
        cross_counts += torch.histc(gates[~is_diagonal].double(), bins=bins, min=0.0, max=1.0)

    open_sets = (single >= threshold).double()  # (C, K)
    intersection = open_sets @ open_sets.T
    union = open_sets.sum(1, keepdim=True) + open_sets.sum(1)[None, :] - intersection
    jaccard = torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))

    act, opn, jac = activation.numpy(), open_fraction.numpy(), jaccard.numpy()
    symmetric = (act + act.T) / 2
    off_diagonal = ~np.eye(C, dtype=bool)
    pairs = [(i, j) for i in range(C) for j in range(i + 1, C)]
    from .relations import DEFAULT_MEASURE, MEASURES, ranked_pairs, relatedness_from

    measure = "high_activation" if kind == "fuse" else DEFAULT_MEASURE
    ent = entropy.numpy()
    relatedness = relatedness_from({"mean_activation": act, "open_fraction": opn, "entropy": ent}, measure)
    ranked = ranked_pairs(relatedness)
    k = min(int(top_k), max(1, len(pairs) // 2))  # the two lists do not overlap when there are enough pairs
    report.update(
        dim=int(dim),
        matrices={
            "mean_activation": act.tolist(),
            "open_fraction": opn.tolist(),
            "jaccard": jac.tolist(),
            "entropy": entropy.numpy().tolist(),
        },
        single_class_gates=single.tolist(),
        relation_measure={"name": measure, "description": MEASURES[measure][2]},
        most_related=[_pair_entry(i, j, names, symmetric, opn, jac, dim, relatedness, ent) for i, j in ranked[:k]],
        least_related=[_pair_entry(i, j, names, symmetric, opn, jac, dim, relatedness, ent)
                       for i, j in ranked[::-1][:k]],
        stats={
            "mean_entropy_nats": float(entropy.mean()),
            "mean_entropy_bits": float(entropy.mean()) / math.log(2.0),
            "near_binary_fraction": near_binary / max(total, 1),
            "mean_activation": float(activation.mean()),
            "mean_open_dims": float(open_fraction.mean()) * dim,
            "same_class_mean_activation": float(np.diag(act).mean()),
            "cross_class_mean_activation": float(act[off_diagonal].mean()) if C > 1 else math.nan,
            "is_symmetric": bool(np.allclose(act, act.T, atol=1e-6)),
        },
        histogram={
            "bin_edges": np.linspace(0.0, 1.0, bins + 1).tolist(),
            "same_class_counts": same_counts.tolist(),
            "cross_class_counts": cross_counts.tolist(),
        },
    )
    return report


# ----------------------------------------------------------------------------------------------------------------
# Features, embeddings and probes
# ----------------------------------------------------------------------------------------------------------------


def _takes_pixel_values(model: nn.Module) -> bool:
    try:
        return "pixel_values" in inspect.signature(_unwrap(model).forward).parameters
    except (TypeError, ValueError):
        return False


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
        self.keyword = _takes_pixel_values(model)
        self.feature_dim: int | None = None
        self.has_embeddings = False

    def forward(self, pixel_values: Tensor) -> Tensor:
        output = self.model(pixel_values=pixel_values) if self.keyword else self.model(pixel_values)
        pooled = _output_tensor(output, "pooler_output")
        if pooled is None:
            raise KeyError(
                f"{type(_unwrap(self.model)).__name__} returned no 'pooler_output' (nor a plain feature tensor); "
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
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    run_linear_probe: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """kNN top-1 and linear-probe top-1 (percent) of frozen features.

    Returns ``{"knn_top1", "linear_probe_top1", "linear_probe_C", "num_train", "num_query", "knn_k"}``; when the
    probe cannot be fitted (e.g. too few samples) ``linear_probe_top1`` is ``None`` and ``linear_probe_error`` says
    why.
    """
    result: dict[str, Any] = {
        "knn_top1": knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes,
                                 k=knn_k, temperature=knn_temperature),
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
    knn_k: int = 20,
    *,
    knn_temperature: float = 0.07,
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
        knn_k: neighbours of the kNN classifier.
        knn_temperature, run_linear_probe, gate_threshold, near_binary_margin, top_k_pairs, show_progress: see
            :func:`probe_features` and :func:`analyze_gates`.

    Returns:
        A JSON-friendly dict: ``model_class``; ``label_names``; ``feature_dim`` (D of ``pooler_output``);
        ``validation``: :func:`probe_features` of backbone features (train_eval -> validation); ``embedding_source``
        (``"embeddings"`` for SimLAPModel, else ``"pooler_output"``) and ``collapse``: its
        :func:`~simlap_hf.evaluation.collapse_report` on the validation samples; ``gates``: :func:`analyze_gates` for
        models with class-pair gates, else ``None``; ``warnings``: list of strings. NaN values are ``None``, so the
        dict can go to ``json.dumps`` as it is.
    """
    inner = _unwrap(accelerator.unwrap_model(model) if accelerator is not None else model)
    is_main = accelerator.is_local_main_process if accelerator is not None else True
    label_names = [str(name) for name in label_names]
    train_features, _, train_labels = extract_representations(model, train_eval_loader, accelerator, show_progress)
    val_features, val_embeddings, val_labels = extract_representations(
        model, validation_loader, accelerator, show_progress
    )
    has_embeddings = val_embeddings is not None
    collapse_input = val_embeddings if has_embeddings else val_features
    report: dict[str, Any] = {
        "model_class": type(inner).__name__,
        "label_names": label_names,
        "feature_dim": int(val_features.shape[1]),
        "validation": probe_features(train_features, train_labels, val_features, val_labels, len(label_names),
                                     knn_k=knn_k, knn_temperature=knn_temperature,
                                     run_linear_probe=run_linear_probe),
        "embedding_source": "embeddings" if has_embeddings else "pooler_output",
        "collapse": collapse_report(collapse_input),
        "gates": None,
        "warnings": [],
    }
    if gate_kind(inner) is not None:
        gates = analyze_gates(inner, label_names, threshold=gate_threshold, near_binary_margin=near_binary_margin,
                              top_k=top_k_pairs, show_progress=show_progress and is_main)
        if gates["label_names"] != label_names:
            report["warnings"].append(
                f"the model's classes {gates['label_names']} differ from the data set's {label_names}; the gate "
                f"analysis names the model's classes"
            )
        report["gates"] = gates
    return to_jsonable(report)


# ----------------------------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------------------------


def _percent(value: Any) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}%"


def _number(value: Any, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _pair_text(pair: Mapping[str, Any]) -> str:
    first, second = pair["classes"]
    return f"**{first} / {second}** ({pair.get('relatedness', pair['mean_activation']):.3f})"


def _model_markdown(report: Mapping[str, Any]) -> str:
    collapse = report.get("collapse") or {}
    validation = report.get("validation") or {}
    source = report.get("embedding_source", "embeddings")
    dim = collapse.get("dim")
    rows = [
        ("kNN top-1 (k={}, validation)".format(validation.get("knn_k", "?")), _percent(validation.get("knn_top1"))),
        ("Linear-probe top-1 (validation)", _percent(validation.get("linear_probe_top1"))),
        (f"Effective rank of `{source}`", f"{_number(collapse.get('effective_rank'))} of {dim}"),
        ("Dimensions for {:.0%} of the variance".format(collapse.get("variance_fraction", 0.99)),
         f"{collapse.get('dims_for_variance', 'n/a')} of {dim}"),
    ]
    transfer = report.get("transfer")
    if transfer:
        name = transfer.get("dataset", "transfer data set")
        rows.append((f"Transfer kNN top-1 ({name})", _percent(transfer.get("knn_top1"))))
        rows.append((f"Transfer linear-probe top-1 ({name})", _percent(transfer.get("linear_probe_top1"))))
    gates = report.get("gates")
    if gates and gates.get("has_filter"):
        stats = gates["stats"]
        rows.append(("Mean gate entropy", f"{stats['mean_entropy_bits']:.3f} bits"))
        rows.append(("Near-binary gates", f"{100 * stats['near_binary_fraction']:.1f}%"))
    lines = ["| measure | value |", "|---|---|"] + [f"| {name} | {value} |" for name, value in rows]
    if gates and gates.get("has_filter"):
        if gates.get("most_related"):
            measure = (gates.get("relation_measure") or {}).get("description", "mean gate activation")
            lines += ["", f"Most related class pairs (by {measure}): "
                      + ", ".join(_pair_text(pair) for pair in gates["most_related"]) + "."]
            lines += ["", "Least related class pairs: "
                      + ", ".join(_pair_text(pair) for pair in gates["least_related"]) + "."]
    elif gates:
        lines += ["", f"Gates: {gates.get('note', OPEN_GATE_NOTE)}."]
    return "\n".join(lines)


def summary_markdown(report: Mapping[str, Any], *, heading: str | None = None) -> str:
    """A short markdown section for a model card from an :func:`analyze_model` result (or from a report of the
    ``python -m simlap_hf.analyze`` command, with one sub-section per model).

    It lists kNN / linear-probe top-1, the effective rank and the number of dimensions for 99% of the variance of the
    embeddings, and, for SimLAP models, gate statistics and the most / least related class pairs by name.
    Without ``heading`` the text starts with the table (as ``extra_sections`` of the model card wants it); pass e.g.
    ``heading="## Representation analysis"`` for a self-contained section.
    """
    if "models" in report:
        parts = [f"### {model.get('name', f'model {i + 1}')}\n\n{_model_markdown(model)}"
                 for i, model in enumerate(report["models"])]
        body = "\n\n".join(parts)
    else:
        body = _model_markdown(report)
    return f"{heading}\n\n{body}\n" if heading else body + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Figures
# ----------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", facecolor="white")
    return path


def plot_singular_values(
    spectra: Mapping[str, Sequence[float]],
    path: str | Path,
    dims: Mapping[str, int] | None = None,
    variance_fraction: float = 0.99,
    title: str = "Singular value spectrum of the embeddings",
) -> Path:
    """Overlay the singular value spectra of several models (log scale) with their cumulative explained variance.

    Args:
        spectra: model name -> singular values (descending) of its centred embeddings (e.g. the ``singular_values``
            of :func:`~simlap_hf.evaluation.collapse_report`).
        path: PNG file to write.
        dims: model name -> embedding dimension, shown in the legend (default: the number of singular values).
        variance_fraction: the level marked on the cumulative-variance panel.
        title: the figure title.

    Left panel: ``s_i / s_1`` on a log axis against the component index (a collapsed representation drops off a cliff
    early; values below 1e-7 s_1 are numerically zero and not drawn). Right panel: cumulative share of the variance
    against the number of components, with the count reaching ``variance_fraction`` marked. One legend below both
    panels gives each model's effective rank and that count.
    """
    dims = dict(dims or {})
    figure = _new_figure(13.0, 5.8)
    left, right = figure.subplots(1, 2)
    handles = []
    lowest = 1.0
    for index, (name, values) in enumerate(spectra.items()):
        s = np.asarray(values, dtype=np.float64)
        colour = f"C{index % 10}"
        dim = int(dims.get(name, s.size))
        if s.size == 0 or not s[0] > 0:
            (line,) = left.plot([], [], color=colour, linewidth=2.5,
                                label=f"{name}: no variance (complete collapse), {dim} dims")
            handles.append(line)
            continue
        p = s / s.sum()
        p = p[p > 0]
        erank = math.exp(float(-(p * np.log(p)).sum()))
        relative = s / s[0]
        shown = relative >= 1e-7
        ranks = np.arange(1, s.size + 1)
        lowest = min(lowest, float(relative[shown].min()))
        cumulative = np.cumsum(s**2) / np.sum(s**2)
        reach = int(np.searchsorted(cumulative, variance_fraction - 1e-12) + 1)
        (line,) = left.plot(ranks[shown], relative[shown], color=colour, linewidth=2.5,
                            label=f"{name}: effective rank {erank:.1f} of {dim} dims, {reach} dims for "
                            f"{variance_fraction:.0%} of the variance")
        handles.append(line)
        right.plot(ranks, cumulative, color=colour, linewidth=2.5)
        right.plot([reach], [cumulative[reach - 1]], "o", color=colour, markersize=8, markeredgecolor="white")
    left.set_yscale("log")
    left.set_ylim(bottom=max(lowest / 2, 1e-7))
    left.set_xlabel("component index i (largest first)", fontsize=11)
    left.set_ylabel("normalised singular value  s_i / s_1  (log scale)", fontsize=11)
    left.set_title("Spectrum: a flatter curve = less dimensional collapse", fontsize=12)
    left.grid(True, which="both", alpha=0.3)
    right.axhline(variance_fraction, color="gray", linestyle="--", linewidth=1)
    right.text(0.02, variance_fraction - 0.015, f"{variance_fraction:.0%} of the variance",
               transform=right.get_yaxis_transform(), ha="left", va="top", fontsize=9.5, color="dimgray")
    right.set_xscale("log")
    right.set_ylim(0, 1.02)
    right.set_xlabel("number of principal components (log scale)", fontsize=11)
    right.set_ylabel("cumulative share of the variance", fontsize=11)
    right.set_title(f"Components needed for {variance_fraction:.0%} of the variance (dots)", fontsize=12)
    right.grid(True, which="both", alpha=0.3)
    figure.legend(handles=handles, loc="outside lower center", ncol=1, fontsize=10, frameon=False)
    figure.suptitle(title, fontsize=14, fontweight="bold")
    return _save(figure, path)


def _tick_step(count: int, most: int = 36) -> int:
    return max(1, math.ceil(count / most))


def _heatmap_panel(figure, axes, matrix: np.ndarray, names: Sequence[str], title: str, colorbar_label: str,
                   vmin: float, vmax: float, cmap: str) -> None:
    count = len(names)
    image = axes.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    step = _tick_step(count)
    ticks = np.arange(0, count, step)
    font = 11 if count <= 12 else 9 if count <= 30 else 7.5
    axes.set_xticks(ticks, [names[i] for i in ticks], rotation=45 if count > 4 else 0, ha="right" if count > 4 else "center",
                    fontsize=font)
    axes.set_yticks(ticks, [names[i] for i in ticks], fontsize=font)
    axes.set_xlabel("class y2", fontsize=11)
    axes.set_ylabel("class y1", fontsize=11)
    axes.set_title(title, fontsize=12)
    bar = figure.colorbar(image, ax=axes, shrink=0.85)
    bar.set_label(colorbar_label, fontsize=10)
    if count <= 15:
        middle = (vmin + vmax) / 2
        for i in range(count):
            for j in range(count):
                value = matrix[i, j]
                colour = "white" if value < middle else "black"
                axes.text(j, i, f"{value:.2f}", ha="center", va="center", color=colour,
                          fontsize=11 if count <= 6 else 9 if count <= 10 else 7)


def plot_gate_heatmap(gates: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Class-pair heatmaps of an :func:`analyze_gates` result: the mean gate activation of g(y1, y2) and the Jaccard
    overlap of the open dimensions of the two classes, with class names on both axes and annotated colorbars."""
    if not gates.get("has_filter"):
        raise ValueError("The open gate has no feature filter: there is no class-pair heatmap to draw.")
    names = list(gates["label_names"])
    count = len(names)
    activation = np.asarray(gates["matrices"]["mean_activation"])
    jaccard = np.asarray(gates["matrices"]["jaccard"])
    side = float(np.clip(0.42 * count + 3.0, 5.5, 12.0))
    figure = _new_figure(2 * side + 1.5, side)
    left, right = figure.subplots(1, 2)
    low, high = float(activation.min()), float(activation.max())
    if high - low < 1e-6:
        low, high = low - 0.05, high + 0.05
    _heatmap_panel(figure, left, activation, names, "Mean gate activation of the pair",
                   "mean over the K dims of g(y1, y2)  (0 = closed, 1 = open)", low, high, "viridis")
    _heatmap_panel(figure, right, jaccard, names, f"Shared open dimensions (Jaccard, g >= {gates['threshold']:g})",
                   "|open(y1) ∩ open(y2)| / |open(y1) ∪ open(y2)|", 0.0, 1.0, "magma")
    figure.suptitle(title or f"Class relationships from the {gates['gate']} gate (K = {gates['dim']})", fontsize=14,
                    fontweight="bold")
    return _save(figure, path)


def plot_gate_histogram(gates: Mapping[str, Any], path: str | Path, title: str | None = None) -> Path:
    """Histogram of the gate values of an :func:`analyze_gates` result: same-class pairs g(y, y) and different-class
    pairs g(y1, y2) separately (share of values, log scale), with the open threshold and near-binary zones marked."""
    if not gates.get("has_filter"):
        raise ValueError("The open gate has no feature filter: every gate value is 1, there is no histogram to draw.")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    histogram = gates["histogram"]
    edges = np.asarray(histogram["bin_edges"])
    figure = _new_figure(9.5, 6.0)
    axes = figure.subplots()
    margin = gates["near_binary_margin"]
    axes.axvspan(0.0, margin, color="0.85", zorder=0, label=f"near-binary zones (within {margin:g} of 0 or 1)")
    axes.axvspan(1.0 - margin, 1.0, color="0.85", zorder=0)
    series = (("different-class pairs g(y1, y2), y1 \u2260 y2", histogram["cross_class_counts"], "C0", True),
              ("same-class pairs g(y, y)", histogram["same_class_counts"], "C3", False))
    for label, counts, colour, filled in series:
        counts = np.asarray(counts, dtype=np.float64)
        if counts.sum() == 0:
            continue
        share = counts / counts.sum()
        if filled:
            axes.stairs(share, edges, fill=True, color=colour, alpha=0.45, label=label, zorder=2)
        else:
            axes.stairs(share, edges, color=colour, linewidth=2.2, label=label, zorder=3)
    axes.axvline(gates["threshold"], color="black", linestyle="--", linewidth=1.2, zorder=4,
                 label=f"open threshold g = {gates['threshold']:g}")
    axes.set_yscale("log")
    percent = FuncFormatter(lambda value, _: f"{100 * value:.3g}%")
    axes.yaxis.set_major_locator(LogLocator(base=10.0, subs=(1.0, 2.0, 5.0)))
    axes.yaxis.set_major_formatter(percent)
    axes.yaxis.set_minor_formatter(NullFormatter())
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("gate value g  (0 = dimension switched off, 1 = switched on)", fontsize=11)
    axes.set_ylabel("share of gate values (log scale)", fontsize=11)
    axes.grid(True, axis="y", which="both", alpha=0.3)
    axes.legend(fontsize=9.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    stats = gates["stats"]
    axes.set_title(
        f"mean entropy {stats['mean_entropy_bits']:.3f} bits  \u2022  near-binary {100 * stats['near_binary_fraction']:.1f}%"
        f"  \u2022  open dims per pair {stats['mean_open_dims']:.1f} of {gates['dim']}",
        fontsize=10.5,
    )
    figure.suptitle(title or f"Gate values of all {gates['num_classes']}\u00d7{gates['num_classes']} class pairs "
                    f"({gates['gate']} gate)", fontsize=13, fontweight="bold")
    return _save(figure, path)


# ----------------------------------------------------------------------------------------------------------------
# JSON
# ----------------------------------------------------------------------------------------------------------------


def embedding_map(vectors: Tensor, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """2-D map of (N, d) vectors for plotting: t-SNE of scikit-learn on the cosine geometry (L2-normalised
    vectors), or UMAP when ``method="umap"`` (or ``"auto"`` and ``umap-learn`` is installed). Returns the (N, 2)
    points and the method used."""
    if method not in ("auto", "tsne", "umap"):
        raise ValueError(f"--map_method must be auto, tsne or umap, got {method!r}.")
    data = torch.nn.functional.normalize(vectors.double(), dim=1).numpy()
    if len(data) < 5:
        raise ValueError(f"an embedding map needs at least 5 points, got {len(data)}.")
    if method in ("auto", "umap"):
        try:
            import umap  # type: ignore[import-not-found]
        except ImportError:
            if method == "umap":
                raise ImportError("--map_method umap needs umap-learn: pip install umap-learn (or use tsne).") from None
        else:
            reducer = umap.UMAP(n_components=2, metric="cosine", random_state=seed)
            return np.asarray(reducer.fit_transform(data)), "umap"
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, (len(data) - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine")
    return tsne.fit_transform(data), "tsne"


def plot_embedding_map(
    points: np.ndarray, labels: Sequence[int], names: Sequence[str], path: str | Path, title: str | None = None,
) -> Path:
    """Scatter plot of a 2-D embedding map coloured by class, with the class names in a legend (up to 20 classes)
    and written at each class's median point."""
    import matplotlib

    points = np.asarray(points)
    labels = np.asarray(labels)
    classes = sorted(set(labels.tolist()))
    colormap = matplotlib.colormaps["tab10" if len(names) <= 10 else "tab20" if len(names) <= 20 else "turbo"]
    figure = _new_figure(8.0, 7.0)
    axes = figure.add_subplot(1, 1, 1)
    for c in classes:
        colour = colormap(c % 20 if len(names) <= 20 else c / max(len(names) - 1, 1))
        member = labels == c
        name = names[c] if 0 <= c < len(names) else str(c)
        axes.scatter(points[member, 0], points[member, 1], s=6, color=colour, alpha=0.7, label=name, linewidths=0)
        if len(classes) <= 50:
            x, y = np.median(points[member], axis=0)
            axes.annotate(name, (x, y), fontsize=8, ha="center", va="center", weight="bold",
                          bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    if len(classes) <= 20:
        axes.legend(markerscale=3, fontsize=8, loc="best", frameon=True)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title or "2-D map of the embeddings", fontsize=10)
    return _save(figure, path)


def to_jsonable(value: Any) -> Any:
    """Recursively convert tensors, numpy values and paths to plain JSON types; NaN and infinities become ``None``."""
    if isinstance(value, Mapping):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(item) for item in value]
    if isinstance(value, Tensor):
        return to_jsonable(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        return to_jsonable(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value
