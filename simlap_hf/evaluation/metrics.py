"""Top-1 / top-5 accuracy through the local ``evaluate`` metric modules shipped in ``simlap_hf/metrics``.

The Hub copies of the metrics are not needed: loading works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._arrays import ArrayLike, to_tensor

if TYPE_CHECKING:  # evaluate (and datasets behind it) is imported lazily: it is slow to import
    import evaluate

#: Folder holding the local ``evaluate`` metric modules (one sub-folder ``<name>/<name>.py`` per metric).
METRICS_DIR: Path = Path(__file__).resolve().parent.parent / "metrics"
#: Names accepted by :func:`load_metric`.
AVAILABLE_METRICS: tuple[str, ...] = ("accuracy", "top_k_accuracy")


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
        Ties between scores are broken towards the lower class index in both. Where ``evaluate`` is not installed
        the same numbers are computed here with the same rule.

    Note:
        ``evaluate`` routes the (N, C) scores through Arrow, which costs roughly 0.25 microseconds per score on one
        CPU core (about 2.5 s for 10,000 x 1,000).
    """
    scores = to_tensor(logits).detach().float().cpu()
    targets = to_tensor(labels).detach().long().cpu().reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(scores.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"logits and labels differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    if scores.shape[0] == 0:
        raise ValueError("classification_metrics needs at least one sample")

    if not evaluate_installed():
        return {
            "top1": 100.0 * _top_k_fraction(scores, targets, 1),
            "top5": 100.0 * _top_k_fraction(scores, targets, 5),
        }
    references = targets.numpy()
    top1 = load_metric("accuracy").compute(predictions=scores.argmax(dim=1).numpy(), references=references)
    top5 = load_metric("top_k_accuracy").compute(predictions=scores.numpy(), references=references, k=5)
    return {"top1": 100.0 * top1["accuracy"], "top5": 100.0 * top5["top_k_accuracy"]}


def evaluate_installed() -> bool:
    """Whether the ``evaluate`` library (and ``datasets`` behind it) can be imported."""
    try:
        import evaluate  # noqa: F401
    except ImportError:
        return False
    return True


def _top_k_fraction(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Fraction of rows of ``scores`` (N, C) whose class ``targets`` (N,) ranks among the first ``min(k, C)``, ties
    going to the lower class index: the rule of the shipped metric modules, for where ``evaluate`` is missing."""
    if int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}); got values in [{targets.min()}, {targets.max()}]")
    target_scores = scores.gather(1, targets[:, None])
    lower_index = torch.arange(scores.shape[1])[None, :] < targets[:, None]
    rank = (scores > target_scores).sum(1) + ((scores == target_scores) & lower_index).sum(1)
    return (rank < min(k, scores.shape[1])).double().mean().item()
