"""Top-1 / top-5 accuracy: :func:`top_k_hits`, the one rule every accuracy of the package uses, and the local
``evaluate`` metric modules shipped in ``simlap_hf/metrics`` for users of ``evaluate`` (loaded offline, without the
Hub copies).
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


def top_k_hits(scores: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: whether the class ``targets[i]`` ranks among the first ``min(k, C)`` of the row ``scores[i]`` (N, C).

    The rank of the target class r of a row is ``#{c : s_c > s_r} + #{c < r : s_c == s_r}``: ties go to the lower
    class index, as with ``argmax`` (so k=1 is ``argmax == target``). A target outside [0, C) is never a hit. The one
    rule of the package's accuracies; the ``evaluate`` modules in ``simlap_hf/metrics`` state the same rule (they are
    loaded as single files, so they carry their own copy, and a test keeps the two in agreement). Runs on the device
    of ``scores`` without a host synchronisation."""
    num_classes = scores.shape[1]
    targets = targets.to(scores.device).long().reshape(-1)
    valid = (targets >= 0) & (targets < num_classes)
    safe_targets = targets.clamp(0, num_classes - 1)
    target_scores = scores.gather(1, safe_targets[:, None])  # (N, 1)
    lower_index = torch.arange(num_classes, device=scores.device)[None, :] < safe_targets[:, None]  # (N, C)
    rank = (scores > target_scores).sum(1) + ((scores == target_scores) & lower_index).sum(1)
    return valid & (rank < min(int(k), num_classes))


def top_k_accuracy(scores: ArrayLike, targets: ArrayLike, k: int) -> float:
    """Fraction in [0, 1] of the rows of ``scores`` (N, C) whose class ``targets`` (N,) is a :func:`top_k_hits`."""
    hits = top_k_hits(to_tensor(scores).detach(), to_tensor(targets).detach(), k)
    return int(hits.sum()) / hits.numel()


@torch.no_grad()
def classification_metrics(logits: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Top-1 and top-5 accuracy, in percent.

    Args:
        logits: scores of shape (N, C) (logits, probabilities or any score where larger means more likely).
        labels: integer class indices of shape (N,), in [0, C).

    Returns:
        ``{"top1": float, "top5": float}`` in [0, 100], both :func:`top_k_accuracy` (ties go to the lower class
        index; top-5 is clamped to C, so with fewer than 5 classes it is 100).
    """
    scores = to_tensor(logits).detach().float().cpu()
    targets = to_tensor(labels).detach().long().cpu().reshape(-1)
    if scores.ndim != 2:
        raise ValueError(f"logits must have shape (N, C); got {tuple(scores.shape)}")
    if scores.shape[0] != targets.shape[0]:
        raise ValueError(f"logits and labels differ in length: {scores.shape[0]} vs {targets.shape[0]}")
    if scores.shape[0] == 0:
        raise ValueError("classification_metrics needs at least one sample")
    if int(targets.min()) < 0 or int(targets.max()) >= scores.shape[1]:
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}); got values in [{targets.min()}, {targets.max()}]")
    return {"top1": 100.0 * top_k_accuracy(scores, targets, 1), "top5": 100.0 * top_k_accuracy(scores, targets, 5)}
