"""Evaluation of learned representations: classification metrics, feature extraction, kNN, linear probe, collapse.

Everything here is a plain function on tensors (or arrays) so it can be used from a training loop, a script or a
notebook alike:

* :func:`load_metric` / :func:`classification_metrics` -- top-1 / top-5 accuracy through the local ``evaluate``
  metric modules shipped in ``simlap_hf/metrics`` (the Hub copies are not needed, loading works offline);
* :func:`extract_features` -- run a transformers or timm backbone over a dataloader (optionally under
  ``accelerate``) and collect ``(N, D)`` features with their labels;
* :func:`knn_classify` / :func:`knn_accuracy` -- cosine-weighted kNN classifier of the self-supervised literature,
  in query chunks of bounded memory, optionally with the train set sharded across processes (``sharded=True``);
* :func:`linear_probe` -- multinomial logistic regression on frozen, standardised features;
* :func:`singular_values`, :func:`effective_rank`, :func:`dims_for_variance`, :func:`normalized_embedding_std`,
  :func:`collapse_report` -- measures of dimensional / complete collapse of embeddings.

Shapes use N (train / dataset samples), M (query samples), C (classes), D or K (feature dimension).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .losses import all_gather_equal

if TYPE_CHECKING:  # evaluate (and datasets behind it) is imported lazily: it is slow to import
    import evaluate

__all__ = [
    "METRICS_DIR",
    "AVAILABLE_METRICS",
    "metric_path",
    "load_metric",
    "classification_metrics",
    "extract_features",
    "knn_classify",
    "knn_accuracy",
    "linear_probe",
    "singular_values",
    "effective_rank",
    "dims_for_variance",
    "normalized_embedding_std",
    "collapse_report",
]

ArrayLike = Tensor | np.ndarray

#: Folder holding the local ``evaluate`` metric modules (one sub-folder ``<name>/<name>.py`` per metric).
METRICS_DIR: Path = Path(__file__).resolve().parent / "metrics"
#: Names accepted by :func:`load_metric`.
AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "top_k_accuracy")

# Smallest kNN temperature for which exp(sim / T) (sim <= 1) stays finite in float32 (exp(88.7) ~ 3.4e38).
_MIN_KNN_TEMPERATURE = 1.0 / 88.0
#: Default bound on the elements of one (queries x train) similarity block of the kNN: 2**26 float32 = 256 MiB
#: (671 queries against 100,000 train features; with 335 the CPU matmuls were 10-25% slower per query, measured).
KNN_BLOCK_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------------------------
# Metric modules
# ----------------------------------------------------------------------------------------------------------------


def metric_path(name: str) -> Path:
    """Return the folder of the local metric module ``name`` (``METRICS_DIR / name``, containing ``name.py``)."""
    if name not in AVAILABLE_METRICS:
        raise ValueError(f"Unknown metric {name!r}; the local metric modules are: {', '.join(AVAILABLE_METRICS)}.")
    folder = METRICS_DIR / name
    if not (folder / f"{name}.py").is_file():
        raise FileNotFoundError(f"The metric script {folder / (name + '.py')} is missing from the installation.")
    return folder


def load_metric(name: str, **load_kwargs: Any) -> evaluate.EvaluationModule:
    """Load one of the metric modules shipped with SimLAP-HF, from its local folder.

    ``evaluate.load`` is given the *absolute* path of the folder ``simlap_hf/metrics/<name>``; for an existing
    absolute path ``evaluate`` 0.4.x loads ``<folder>/<name>.py`` directly and never falls back to the Hub, so this
    works without network access and under ``HF_HUB_OFFLINE=1`` / ``HF_EVALUATE_OFFLINE=1``. (As with every
    script-based module, ``evaluate`` copies the script into its modules cache, ``$HF_MODULES_CACHE``, by default
    ``~/.cache/huggingface/modules``, keyed by a hash of its content.)

    Args:
        name: ``"accuracy"`` (integer predictions, references) or ``"top_k_accuracy"`` (score vectors of shape
            (C,) as predictions, integer references; ``compute(..., k=5)``).
        **load_kwargs: forwarded to ``evaluate.load`` (e.g. ``num_process``, ``process_id``, ``experiment_id``).
            ``keep_in_memory`` defaults to ``True`` for a single process (no Arrow cache files are written).

    Returns:
        The ``evaluate.EvaluationModule`` (a ``evaluate.Metric``).
    """
    import evaluate

    folder = metric_path(name)
    if int(load_kwargs.get("num_process", 1)) == 1:
        load_kwargs.setdefault("keep_in_memory", True)
    return evaluate.load(str(folder), **load_kwargs)


@torch.no_grad()
def classification_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Top-1 and top-5 accuracy, in percent, computed through the local metric modules.

    Args:
        logits: scores of shape (N, C) (logits, probabilities or any score where larger means more likely).
        labels: integer class indices of shape (N,).

    Returns:
        ``{"top1": float, "top5": float}`` in [0, 100]. Top-1 is the ``accuracy`` module on ``argmax(logits)``;
        top-5 is the ``top_k_accuracy`` module with ``k=5`` (clamped to C, so with fewer than 5 classes it is 100).
        Ties between scores are broken towards the lower class index in both.

    Note:
        ``evaluate`` routes the (N, C) scores through Arrow, which costs roughly 0.25 microseconds per score on one
        CPU core (about 2.5 s for 10,000 x 1,000).
    """
    scores = _to_tensor(logits).detach().float().cpu()
    targets = _to_tensor(labels).detach().long().cpu().reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(scores.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"logits and labels differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    if scores.shape[0] == 0:
        raise ValueError("classification_metrics needs at least one sample")

    references = targets.numpy()
    top1 = load_metric("accuracy").compute(predictions=scores.argmax(dim=1).numpy(), references=references)
    top5 = load_metric("top_k_accuracy").compute(predictions=scores.numpy(), references=references, k=5)
    return {"top1": 100.0 * top1["accuracy"], "top5": 100.0 * top5["top_k_accuracy"]}


# ----------------------------------------------------------------------------------------------------------------
# Feature extraction
# ----------------------------------------------------------------------------------------------------------------


def _to_tensor(x: ArrayLike | Sequence[Any]) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return torch.as_tensor(np.asarray(x))


def _innermost_module(model: nn.Module) -> nn.Module:
    """Peel wrappers (DDP / DataParallel ``.module``, ``torch.compile`` ``._orig_mod``) to reach the user's model."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module):
            model = inner
            continue
        inner = getattr(model, "module", None)
        if isinstance(inner, nn.Module) and type(model).__name__ in ("DistributedDataParallel", "DataParallel"):
            model = inner
            continue
        break
    return model


def _takes_pixel_values_keyword(model: nn.Module) -> bool:
    """True when the model's ``forward`` has a ``pixel_values`` parameter (transformers vision models)."""
    try:
        params = inspect.signature(_innermost_module(model).forward).parameters
    except (TypeError, ValueError):
        return False
    return "pixel_values" in params


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _split_batch(batch: Any) -> tuple[Tensor, Tensor]:
    if isinstance(batch, Mapping):
        if "pixel_values" not in batch or "labels" not in batch:
            raise KeyError(f"batches must contain 'pixel_values' and 'labels'; got keys {sorted(batch)}")
        return batch["pixel_values"], _to_tensor(batch["labels"])
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], _to_tensor(batch[1])
    raise TypeError(
        f"batches must be dicts with 'pixel_values' and 'labels' (or (images, labels) pairs); got {type(batch)}"
    )


def _select_feature(output: Any, output_key: str) -> Tensor:
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

    The model runs under ``torch.no_grad()`` in eval mode; the train/eval flag of every submodule is restored
    afterwards. A tqdm bar is shown on the (local) main process when ``show_progress``.

    Without ``accelerator`` the inputs are moved to the device of the model's parameters. With ``accelerator`` the
    dataloader (and model) should have been passed through ``accelerator.prepare``: each batch is gathered with
    ``accelerator.gather_for_metrics``, so every process returns the full feature set, in dataset order for an
    unshuffled loader, without the samples duplicated to pad the last batch.

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
    device = accelerator.device if accelerator is not None else _model_device(model)
    keyword = _takes_pixel_values_keyword(model)
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0

    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    features: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for batch in tqdm(dataloader, desc="Extracting features", disable=not (show_progress and is_main)):
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
            if accelerator is not None:
                feature, batch_labels = accelerator.gather_for_metrics((feature.contiguous(), batch_labels.to(device)))
            if shard:
                rows = slice(rank * feature.shape[0] // world, (rank + 1) * feature.shape[0] // world)
                # A copy of the slice, so that the gathered batch is freed.
                features.append(feature[rows].detach().float().clone())
                labels.append(batch_labels[rows].detach().long().to(feature.device))
            else:
                features.append(feature.detach().float().cpu())
                labels.append(batch_labels.detach().long().cpu())
    finally:
        for module, training in modes:
            module.training = training
    if not features:
        raise ValueError("The dataloader yielded no batches")
    return torch.cat(features), torch.cat(labels)


# ----------------------------------------------------------------------------------------------------------------
# kNN classifier
# ----------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def knn_classify(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int | None = None,
    *,
    sharded: bool = False,
    max_block_elements: int = KNN_BLOCK_ELEMENTS,
) -> Tensor:
    """Weighted kNN class scores (Wu et al. 2018; used by DINO and most self-supervised papers).

    Features are L2-normalised; each query takes its ``k`` most cosine-similar train samples, neighbour j gets the
    weight ``exp(sim_j / temperature)``, and the score of class c is the sum of the weights of the neighbours
    labelled c. Ties at the k-th similarity go to the train samples of lower index, and the weights are summed in
    a fixed order (largest similarity first, then lower index), so the result does not depend on the chunking or
    on how the train set is split across processes (up to the rounding of the similarities themselves).

    Memory is bounded: queries are processed in chunks of ``batch_size`` (default: as many as keep one
    queries x train similarity block within ``max_block_elements``), the train features are neither copied nor
    normalised in place (their inverse norms scale the block), and no (M, N) matrix is ever built. The
    computation runs on the device of ``train_features``.

    ``sharded=True`` (every process of the initialised ``torch.distributed`` group calls it together): the train
    set is the union of the processes' ``train_features`` (each process holds only its shard; global index order
    is rank-major) and each process classifies its own ``query_features``. Each query chunk is all-gathered, every
    process finds its local top-k of every gathered query, the (score, label, index) candidates are all-gathered
    and each process merges those of its own queries. Sizes may differ between processes (one size exchange at
    the start). Without a process group (or with one process) it is the single-process computation.

    Args:
        train_features: (N, D) reference features (this process's shard when ``sharded``).
        train_labels: (N,) integer labels in [0, num_classes).
        query_features: (M, D) features to classify.
        num_classes: C.
        k: number of neighbours; clamped to the (global) number of train samples when larger.
        temperature: T > 0; must be at least 1/88 so that exp(1 / T) is finite in float32.
        batch_size: queries per chunk (per process when ``sharded``); ``None`` chooses it from
            ``max_block_elements``.
        sharded: the train set is split across the processes of the default group (see above).
        max_block_elements: bound on the elements of one similarity block when ``batch_size`` is ``None``
            (default 2**26: 256 MiB in float32).

    Returns:
        (M, C) float32 class scores (on the device of ``train_features``); ``argmax`` gives the prediction.
    """
    train = _to_tensor(train_features)
    device = train.device
    train = train.float()
    targets = _to_tensor(train_labels).to(device=device, dtype=torch.long).reshape(-1)
    queries = _to_tensor(query_features).to(device=device, dtype=torch.float32)
    if train.ndim != 2 or queries.ndim != 2 or train.shape[1] != queries.shape[1]:
        raise ValueError(
            f"train and query features must be (N, D) and (M, D); got {tuple(train.shape)} and {tuple(queries.shape)}"
        )
    if targets.shape[0] != train.shape[0]:
        raise ValueError(f"train features and labels differ in length: {train.shape[0]} vs {targets.shape[0]}")
    if (batch_size is not None and batch_size < 1) or k < 1 or max_block_elements < 1:
        raise ValueError("k, batch_size and max_block_elements must be >= 1")
    if not temperature >= _MIN_KNN_TEMPERATURE:
        raise ValueError(
            f"temperature must be >= {_MIN_KNN_TEMPERATURE:.4f} (exp(1/T) overflows float32); got {temperature}"
        )
    world, rank = _knn_group(sharded)
    local_bad = int(targets.numel() > 0 and bool(targets.min() < 0 or targets.max() >= num_classes))
    # One exchange of (train rows, query rows, bad labels) per process: every process then takes the same decisions.
    info = torch.tensor([[train.shape[0], queries.shape[0], local_bad]], dtype=torch.int64, device=device)
    if world > 1:
        info = all_gather_equal(info)
    train_sizes, query_sizes, bad = info[:, 0].tolist(), info[:, 1].tolist(), info[:, 2].tolist()
    if any(bad):
        raise ValueError(
            f"train_labels must lie in [0, {num_classes}) (violated on process(es) "
            f"{[index for index, flag in enumerate(bad) if flag]})"
        )
    num_train = sum(train_sizes)
    if num_train == 0:
        raise ValueError("knn_classify needs at least one train sample")
    k = min(int(k), num_train)
    chunk = batch_size or max(1, max_block_elements // (world * max(max(train_sizes), 1)))
    chunk = min(chunk, max(max(query_sizes), 1))
    offset = sum(train_sizes[:rank])  # global index of this process's first train row
    local_k = min(k, train.shape[0])
    inverse_norms = 1.0 / torch.linalg.vector_norm(train, dim=1).clamp_min(1e-12)  # as F.normalize

    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, max(query_sizes), chunk):
        block = F.normalize(queries[start : start + chunk], dim=1)
        rows = block.shape[0]
        if world > 1:  # every process's chunk, padded to the same size
            padded = block.new_zeros((chunk, block.shape[1]))
            padded[:rows] = block
            block = all_gather_equal(padded)  # (world * chunk, D)
        values = torch.full((block.shape[0], k), -math.inf, device=device)
        labels = torch.zeros((block.shape[0], k), dtype=torch.long, device=device)
        indices = torch.full((block.shape[0], k), num_train, dtype=torch.long, device=device)
        if local_k > 0:
            similarity = block @ train.T
            similarity.mul_(inverse_norms)
            top_values, top_indices = _topk_lowest_index(similarity, local_k)
            del similarity
            values[:, :local_k] = top_values
            labels[:, :local_k] = targets[top_indices]
            indices[:, :local_k] = top_indices + offset
        if world > 1:  # float64 holds the float32 scores and the integer labels and indices exactly
            packed = torch.stack([values.double(), labels.double(), indices.double()], dim=2)  # (world*chunk, k, 3)
            gathered = all_gather_equal(packed).view(world, world * chunk, k, 3)
            mine = gathered[:, rank * chunk : rank * chunk + rows].transpose(0, 1).reshape(rows, world * k, 3)
            values, labels, indices = mine[..., 0].float(), mine[..., 1].long(), mine[..., 2].long()
        values, labels = _best_candidates(values, labels, indices, k)
        scores[start : start + rows].scatter_add_(1, labels, (values / temperature).exp())
    return scores


def _knn_group(sharded: bool) -> tuple[int, int]:
    """(world size, rank) of the default process group for a sharded kNN; (1, 0) otherwise."""
    if sharded and torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


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


def knn_accuracy(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    query_features: ArrayLike,
    query_labels: ArrayLike,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    batch_size: int | None = None,
    *,
    sharded: bool = False,
    max_block_elements: int = KNN_BLOCK_ELEMENTS,
) -> float:
    """Top-1 accuracy (percent, 0-100) of :func:`knn_classify` on ``query_features`` (M, D) / ``query_labels`` (M,).

    The other arguments are those of :func:`knn_classify`. Ties in the class scores go to the lower class index.
    With ``sharded=True`` every process passes its shards (train and queries) and receives the accuracy over all
    processes' queries: the counts are reduced once, at the end.
    """
    scores = knn_classify(
        train_features,
        train_labels,
        query_features,
        num_classes,
        k,
        temperature,
        batch_size,
        sharded=sharded,
        max_block_elements=max_block_elements,
    )
    targets = _to_tensor(query_labels).to(scores.device).long().reshape(-1)
    if targets.shape[0] != scores.shape[0]:
        raise ValueError(f"query features and labels differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    counts = torch.stack([(scores.argmax(dim=1) == targets).sum(), torch.tensor(targets.numel(), device=scores.device)])
    world, _ = _knn_group(sharded)
    if world > 1:
        torch.distributed.all_reduce(counts)
    correct, total = counts.tolist()
    if total == 0:
        raise ValueError("knn_accuracy needs at least one query")
    return 100.0 * correct / total


# ----------------------------------------------------------------------------------------------------------------
# Linear probe
# ----------------------------------------------------------------------------------------------------------------


def _to_numpy(x: ArrayLike | Sequence[Any], dtype: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def _validation_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation index split, stratified by label when every class can appear in both parts."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    try:
        return train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single sample, or fewer validation samples than classes
        return train_test_split(indices, test_size=val_fraction, random_state=seed)


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    # lbfgs fits the multinomial (softmax) model whenever there are more than two classes.
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed).fit(x, y)


def linear_probe(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0),
    val_fraction: float = 0.2,
    seed: int = 0,
    max_iter: int = 1000,
) -> dict[str, float]:
    """Linear-probe accuracy: multinomial logistic regression (scikit-learn, lbfgs) on standardised features.

    The inverse regularisation strength C is selected among ``Cs`` by the accuracy on a held-out, seeded split of
    the train set (``val_fraction`` of it, stratified by label when possible; scaler fitted on the remaining part).
    The classifier is then refit with the chosen C on all train features (scaler refitted on all of train) and
    evaluated on the test features. With a single C (or ``val_fraction=0``) no selection is done and ``val_top1``
    is NaN.

    Args:
        train_features: (N, D) features; train_labels: (N,) integer labels.
        test_features: (M, D) features; test_labels: (M,) integer labels.
        Cs: candidate values of C (largest accuracy wins; ties go to the smaller C, i.e. stronger regularisation).
        val_fraction: fraction of the train set held out for choosing C, in [0, 1).
        seed: seed of the split and of the solver.
        max_iter: lbfgs iteration limit.

    Returns:
        ``{"top1": test accuracy in %, "C": chosen C, "val_top1": validation accuracy in % of the chosen C}``.
    """
    from sklearn.preprocessing import StandardScaler

    x_train = _to_numpy(train_features, np.float32)
    y_train = _to_numpy(train_labels, np.int64).reshape(-1)
    x_test = _to_numpy(test_features, np.float32)
    y_test = _to_numpy(test_labels, np.int64).reshape(-1)
    if x_train.ndim != 2 or x_test.ndim != 2 or x_train.shape[1] != x_test.shape[1]:
        raise ValueError(f"features must be (N, D) and (M, D); got {x_train.shape} and {x_test.shape}")
    if x_train.shape[0] != y_train.shape[0] or x_test.shape[0] != y_test.shape[0]:
        raise ValueError("features and labels differ in length")
    if x_test.shape[0] == 0:
        raise ValueError("linear_probe needs at least one test sample")
    candidates = sorted(float(c) for c in Cs)
    if not candidates or min(candidates) <= 0:
        raise ValueError(f"Cs must be a non-empty sequence of positive numbers; got {Cs}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1); got {val_fraction}")
    if np.unique(y_train).shape[0] < 2:
        raise ValueError("linear_probe needs at least two classes in the train labels")

    chosen_C, val_top1 = candidates[0], math.nan
    if len(candidates) > 1 and val_fraction > 0:
        fit_idx, val_idx = _validation_split(y_train, val_fraction, seed)
        if np.unique(y_train[fit_idx]).shape[0] < 2 or val_idx.shape[0] == 0:
            raise ValueError("The validation split leaves fewer than two classes to fit; use more train samples")
        scaler = StandardScaler().fit(x_train[fit_idx])
        x_fit, x_val = scaler.transform(x_train[fit_idx]), scaler.transform(x_train[val_idx])
        best = -1.0
        for C in candidates:
            clf = _fit_logistic(x_fit, y_train[fit_idx], C, max_iter, seed)
            accuracy = 100.0 * float(np.mean(clf.predict(x_val) == y_train[val_idx]))
            if accuracy > best:
                best, chosen_C = accuracy, C
        val_top1 = best

    scaler = StandardScaler().fit(x_train)
    clf = _fit_logistic(scaler.transform(x_train), y_train, chosen_C, max_iter, seed)
    top1 = 100.0 * float(np.mean(clf.predict(scaler.transform(x_test)) == y_test))
    return {"top1": top1, "C": chosen_C, "val_top1": val_top1}


# ----------------------------------------------------------------------------------------------------------------
# Collapse measures
# ----------------------------------------------------------------------------------------------------------------


def _embeddings(z: ArrayLike) -> Tensor:
    z = _to_tensor(z).detach().to(torch.float64)
    if z.ndim != 2:
        raise ValueError(f"embeddings must have shape (N, K); got {tuple(z.shape)}")
    if z.shape[0] == 0:
        raise ValueError("embeddings must contain at least one sample")
    return z


def singular_values(z: ArrayLike) -> Tensor:
    """Singular values of the centred embeddings ``z - z.mean(0)``.

    Args:
        z: (N, K) embeddings (tensor or array, any device).

    Returns:
        float64 CPU tensor of shape (min(N, K),), in descending order. Their squares divided by N - 1 are the
        eigenvalues of the covariance matrix (the principal-component variances).
    """
    z = _embeddings(z).cpu()
    return torch.linalg.svdvals(z - z.mean(dim=0, keepdim=True))


def _effective_rank_from_spectrum(s: Tensor) -> float:
    total = s.sum()
    if not total > 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(float(-(p * p.log()).sum()))


def effective_rank(z: ArrayLike) -> float:
    """Effective rank of the embeddings (Roy & Vetterli, 2007).

    ``exp(H(p))`` with ``p_i = s_i / sum_j s_j`` the normalised singular values of the centred (N, K) embeddings
    and H the Shannon entropy (natural log). It lies in [1, min(N, K)]: 1 for rank-one data, about K for isotropic
    data with N >> K. Embeddings without any variance (complete collapse to a point) return 0.
    """
    return _effective_rank_from_spectrum(singular_values(z))


def _dims_from_spectrum(s: Tensor, fraction: float) -> int:
    variance = s.square()
    total = variance.sum()
    if not total > 0:
        return 0
    cumulative = variance.cumsum(dim=0) / total
    reached = cumulative >= fraction - 1e-12  # tolerance so that fraction=1 is reached despite rounding
    return int(torch.nonzero(reached)[0].item()) + 1


def dims_for_variance(z: ArrayLike, fraction: float = 0.99) -> int:
    """Smallest number of principal components of the (N, K) embeddings explaining ``fraction`` of the variance.

    Component i explains ``s_i**2 / sum_j s_j**2`` of the variance (s: :func:`singular_values`). Returns 0 when the
    embeddings have no variance. ``fraction`` must lie in (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    return _dims_from_spectrum(singular_values(z), fraction)


def normalized_embedding_std(z: ArrayLike) -> float:
    """Mean over the K dimensions of the standard deviation of the L2-normalised (N, K) embeddings.

    About 0 for collapsed embeddings (all samples on one direction), about ``1 / sqrt(K)`` for embeddings spread
    uniformly on the unit sphere (SimSiam, Chen & He 2021). Needs N >= 2 (unbiased standard deviation).
    """
    z = F.normalize(_embeddings(z), dim=1)
    if z.shape[0] < 2:
        raise ValueError("normalized_embedding_std needs at least two samples")
    return float(z.std(dim=0).mean())


def collapse_report(z: ArrayLike, fraction: float = 0.99) -> dict[str, Any]:
    """All collapse measures of the (N, K) embeddings ``z`` in one JSON-serialisable dict.

    Returns:
        ``num_samples`` (N), ``dim`` (K), ``effective_rank``, ``dims_for_variance`` (for ``fraction``),
        ``variance_fraction``, ``normalized_embedding_std``, ``uniform_std`` (1 / sqrt(K), the reference value for
        embeddings uniform on the sphere) and ``singular_values`` (list of min(N, K) floats, descending).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1]; got {fraction}")
    z = _embeddings(z)
    spectrum = singular_values(z)
    return {
        "num_samples": int(z.shape[0]),
        "dim": int(z.shape[1]),
        "effective_rank": _effective_rank_from_spectrum(spectrum),
        "dims_for_variance": _dims_from_spectrum(spectrum, fraction),
        "variance_fraction": float(fraction),
        "normalized_embedding_std": normalized_embedding_std(z) if z.shape[0] > 1 else math.nan,
        "uniform_std": 1.0 / math.sqrt(z.shape[1]),
        "singular_values": spectrum.tolist(),
    }
