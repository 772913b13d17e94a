"""Evaluation of learned representations: classification metrics, feature extraction, kNN, linear probe, collapse.

Everything here is a plain function on tensors (or arrays) so it can be used from a training loop, a script or a
notebook alike:

* :func:`classification_metrics` / :func:`top_k_accuracy` / :func:`top_k_hits` -- top-1 / top-5 accuracy (one rule:
  ties go to the lower class index), and :func:`load_metric`, the same accuracies as the local ``evaluate`` metric
  modules shipped in ``simlap_hf/metrics`` (the Hub copies are not needed, loading works offline);
* :func:`extract_features` -- run a transformers or timm backbone over a dataloader (optionally under
  ``accelerate``) and collect ``(N, D)`` features with their labels;
* :func:`knn_classify` / :func:`knn_accuracy` -- cosine-weighted kNN classifier of the self-supervised literature,
  in query chunks of bounded memory, optionally with the train set sharded across processes (``sharded=True``);
* :func:`linear_probe` -- multinomial logistic regression on frozen, standardised features;
* :func:`singular_values`, :func:`effective_rank`, :func:`dims_for_variance`, :func:`normalized_embedding_std`,
  :func:`collapse_report` -- measures of dimensional / complete collapse of embeddings;
* :func:`evaluate_representation` -- the evaluation of a pretraining run: online-head top-1 / top-5 and kNN top-1.

Shapes use N (train / dataset samples), M (query samples), C (classes), D or K (feature dimension).
"""

from .collapse import collapse_report, dims_for_variance, effective_rank, normalized_embedding_std, singular_values
from .features import extract_features
from .knn import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE, KNN_BLOCK_ELEMENTS, knn_accuracy, knn_classify
from .metrics import (
    AVAILABLE_METRICS,
    METRICS_DIR,
    classification_metrics,
    load_metric,
    metric_path,
    top_k_accuracy,
    top_k_hits,
)
from .probe import linear_probe
from .representation import evaluate_representation

__all__ = [
    "METRICS_DIR",
    "AVAILABLE_METRICS",
    "KNN_BLOCK_ELEMENTS",
    "DEFAULT_KNN_K",
    "DEFAULT_KNN_TEMPERATURE",
    "metric_path",
    "load_metric",
    "classification_metrics",
    "top_k_accuracy",
    "top_k_hits",
    "extract_features",
    "knn_classify",
    "knn_accuracy",
    "linear_probe",
    "singular_values",
    "effective_rank",
    "dims_for_variance",
    "normalized_embedding_std",
    "collapse_report",
    "evaluate_representation",
]
