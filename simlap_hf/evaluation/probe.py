"""Linear probe: multinomial logistic regression on frozen, standardised features (scikit-learn)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ._arrays import ArrayLike, to_numpy


def _validation_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train / validation index split, stratified by label when every class can appear in both parts."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(labels.shape[0])
    try:
        return train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=labels)
    except ValueError:  # a class with a single sample, or fewer validation samples than classes
        return train_test_split(indices, test_size=val_fraction, random_state=seed)


def _fit_logistic(x: np.ndarray, y: np.ndarray, C: float, max_iter: int, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression

    # lbfgs fits the multinomial (softmax) model whenever there are more than two classes.
    return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed).fit(x, y)


def _checked_probe_inputs(
    train_features: ArrayLike,
    train_labels: ArrayLike,
    test_features: ArrayLike,
    test_labels: ArrayLike,
    Cs: Sequence[float],
    val_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[float]]:
    """(N, D) float32 / (N,) int64 train and (M, D) / (M,) test arrays, and the candidate Cs in ascending order."""
    x_train = to_numpy(train_features, np.float32)
    y_train = to_numpy(train_labels, np.int64).reshape(-1)
    x_test = to_numpy(test_features, np.float32)
    y_test = to_numpy(test_labels, np.int64).reshape(-1)
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
    return x_train, y_train, x_test, y_test, candidates


def _choose_C(
    x_train: np.ndarray, y_train: np.ndarray, candidates: list[float], val_fraction: float, seed: int, max_iter: int
) -> tuple[float, float]:
    """(chosen C, its validation accuracy in %) on a held-out split of the train set; the first candidate and NaN
    when there is nothing to choose. Ties go to the smaller C."""
    from sklearn.preprocessing import StandardScaler

    if len(candidates) < 2 or val_fraction <= 0:
        return candidates[0], math.nan
    fit_idx, val_idx = _validation_split(y_train, val_fraction, seed)
    if np.unique(y_train[fit_idx]).shape[0] < 2 or val_idx.shape[0] == 0:
        raise ValueError("The validation split leaves fewer than two classes to fit; use more train samples")
    scaler = StandardScaler().fit(x_train[fit_idx])
    x_fit, x_val = scaler.transform(x_train[fit_idx]), scaler.transform(x_train[val_idx])
    best, chosen_C = -1.0, candidates[0]
    for C in candidates:
        clf = _fit_logistic(x_fit, y_train[fit_idx], C, max_iter, seed)
        accuracy = 100.0 * float(np.mean(clf.predict(x_val) == y_train[val_idx]))
        if accuracy > best:
            best, chosen_C = accuracy, C
    return chosen_C, best


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

    x_train, y_train, x_test, y_test, candidates = _checked_probe_inputs(
        train_features, train_labels, test_features, test_labels, Cs, val_fraction
    )
    chosen_C, val_top1 = _choose_C(x_train, y_train, candidates, val_fraction, seed, max_iter)
    scaler = StandardScaler().fit(x_train)
    clf = _fit_logistic(scaler.transform(x_train), y_train, chosen_C, max_iter, seed)
    top1 = 100.0 * float(np.mean(clf.predict(scaler.transform(x_test)) == y_test))
    return {"top1": top1, "C": chosen_C, "val_top1": val_top1}
