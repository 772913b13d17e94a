"""Top-1 accuracy as a local ``evaluate`` metric module.

Shipped inside SimLAP-HF because the Hub copy of ``accuracy`` cannot be reached offline. Load it with
``simlap_hf.evaluation.load_metric("accuracy")`` (or ``evaluate.load(<path to this folder>)``).

Note for maintainers: ``evaluate`` copies this single file into its dynamic-modules cache and checks that every
absolute ``import`` below is importable, so keep the file self-contained (no relative imports).
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = """
Top-1 accuracy: the fraction of samples whose predicted class equals the reference class,
    accuracy = (number of correct predictions) / (number of predictions).
With ``sample_weight`` it is the weighted fraction sum(w_i * [pred_i == ref_i]) / sum(w_i).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `int`, shape (N,)): predicted class indices.
    references (`list` of `int`, shape (N,)): ground-truth class indices.
    normalize (`bool`, defaults to `True`): return the fraction of correct predictions; with `False`
        return the (weighted) number of correct predictions instead.
    sample_weight (`list` of `float`, shape (N,), *optional*): per-sample weights.

Returns:
    accuracy (`float`): in [0, 1] when `normalize=True`, otherwise a count.

Examples:
    >>> metric = load_metric("accuracy")
    >>> metric.compute(predictions=[0, 1, 2, 2], references=[0, 1, 1, 2])
    {'accuracy': 0.75}
"""

_CITATION = ""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Accuracy(evaluate.Metric):
    """Top-1 accuracy of integer class predictions."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("int64"),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, normalize=True, sample_weight=None):
        preds = np.asarray(predictions, dtype=np.int64).reshape(-1)
        refs = np.asarray(references, dtype=np.int64).reshape(-1)
        if preds.shape != refs.shape:
            raise ValueError(f"predictions and references differ in length: {preds.shape[0]} vs {refs.shape[0]}")
        if preds.size == 0:
            raise ValueError("accuracy needs at least one prediction")
        correct = (preds == refs).astype(np.float64)
        if sample_weight is None:
            weights = np.ones_like(correct)
        else:
            weights = np.asarray(sample_weight, dtype=np.float64).reshape(-1)
            if weights.shape != correct.shape:
                raise ValueError("sample_weight must have one weight per prediction")
        hits = float(np.sum(weights * correct))
        if not normalize:
            return {"accuracy": hits}
        return {"accuracy": hits / float(np.sum(weights))}
