"""Top-k accuracy from per-class scores, as a local ``evaluate`` metric module.

Load it with ``simlap_hf.evaluation.load_metric("top_k_accuracy")`` (or ``evaluate.load(<path to this folder>)``).
Keep this file self-contained: ``evaluate`` copies it alone into its dynamic-modules cache.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-k accuracy: the fraction of samples whose reference class is among the k highest-scoring classes.

Scores are any per-class numbers where larger means more likely (logits, probabilities, kNN votes).
Ties are broken towards the lower class index, exactly like ``argmax`` (so k=1 equals the accuracy of
``argmax(scores)``): the rank of the reference class r of a sample is
    rank = #{c : s_c > s_r} + #{c < r : s_c == s_r},
and the sample counts as correct when rank < k.

If k is larger than the number of classes C it is clamped to C (then every sample is correct).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `list` of `float`, shape (N, C)): per-class scores of each sample.
    references (`list` of `int`, shape (N,)): ground-truth class indices in [0, C).
    k (`int`, defaults to 5): how many top-scoring classes count as a hit; clamped to C.

Returns:
    top_k_accuracy (`float`): fraction in [0, 1].

Examples:
    >>> metric = load_metric("top_k_accuracy")
    >>> metric.compute(predictions=[[0.1, 0.5, 0.4], [0.7, 0.2, 0.1]], references=[2, 2], k=2)
    {'top_k_accuracy': 0.5}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class TopKAccuracy(evaluate.Metric):
    """Top-k accuracy of per-class score vectors."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, k=5):
        scores = np.asarray(predictions, dtype=np.float32)
        refs = np.asarray(references, dtype=np.int64).reshape(-1)
        if scores.ndim != 2:
            raise ValueError(
                "predictions must be score vectors of one common length (shape (N, C)); "
                f"got an array of shape {scores.shape}"
            )
        num_samples, num_classes = scores.shape
        if refs.shape[0] != num_samples:
            raise ValueError(f"predictions and references differ in length: {num_samples} vs {refs.shape[0]}")
        if num_samples == 0:
            raise ValueError("top_k_accuracy needs at least one prediction")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if refs.min() < 0 or refs.max() >= num_classes:
            raise ValueError(f"references must lie in [0, {num_classes}); got values in [{refs.min()}, {refs.max()}]")
        k = min(int(k), num_classes)

        ref_scores = scores[np.arange(num_samples), refs][:, None]
        higher = np.sum(scores > ref_scores, axis=1)
        lower_index = np.arange(num_classes)[None, :] < refs[:, None]
        tied_before = np.sum((scores == ref_scores) & lower_index, axis=1)
        rank = higher + tied_before
        return {"top_k_accuracy": float(np.mean(rank < k))}
