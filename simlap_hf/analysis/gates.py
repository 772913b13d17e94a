"""The class-pair gates of SimLAP models: the C x C x K gate tensor, streamed, and the class relationships and
statistics read from it.

Shapes: C classes, K gate (embedding) dimensions, R rows of a streamed block.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..relations import (
    DEFAULT_MEASURE,
    DEFAULT_THRESHOLD,
    MEASURES,
    SIGN_GATE,
    class_names,
    gate_function,
    has_class_gates,
    iter_gate_rows,
    pair_statistics,
    ranked_pairs,
    relatedness_from,
)

#: Gate values within this distance of 0 or 1 count as near-binary.
DEFAULT_NEAR_BINARY_MARGIN = 0.05
OPEN_GATE_NOTE = (
    "open gate: the model has no feature filter (g = 1 for every class pair), so its gates carry no information "
    "about class relationships"
)


def gate_matrix(model: nn.Module, batch_size: int = 65536, show_progress: bool = False) -> Tensor:
    """Gate vector of every ordered class pair: ``G[i, j] = g(i, j)``, a (C, C, K) float32 CPU tensor.

    Computed in eval mode (the BatchNorm layers of the feature filter use their running statistics, so every pair's
    gate is independent of the others) without gradient, ``batch_size`` pairs at a time; the model's train/eval flags
    are restored. The diagonal ``G[y, y]`` holds the single-class gates g(y, y). Memory: C * C * K * 4 bytes (use
    :func:`analyze_gates`, which streams, for very many classes). For the ``open`` gate every value is 1.

    Works for a :class:`~simlap_hf.SimLAPModel` (``model.gate``) and for SimLAP-Fuse (``model.class_gate``, binary
    gates from the signs of the class weights); wrappers of DDP, DataParallel and ``torch.compile`` are looked through.
    """
    blocks = [gates for _, gates in iter_gate_rows(model, batch_size, show_progress)]
    return torch.cat(blocks)


class _GateTally:
    """Running C x C statistics, single-class gates and histograms of the gate row blocks (R, C, K)."""

    def __init__(self, num_classes: int, threshold: float, near_binary_margin: float, bins: int) -> None:
        C = num_classes
        self.threshold, self.margin, self.bins = threshold, near_binary_margin, bins
        self.matrices = {
            name: torch.zeros(C, C, dtype=torch.float64) for name in ("mean_activation", "open_fraction", "entropy")
        }
        self.same_counts = torch.zeros(bins, dtype=torch.float64)
        self.cross_counts = torch.zeros(bins, dtype=torch.float64)
        self.single: Tensor | None = None  # (C, K) single-class gates g(y, y), filled block by block
        self.near_binary = 0
        self.total = 0
        self.dim = 0

    def add(self, start: int, gates: Tensor) -> None:
        rows, num_classes, self.dim = gates.shape
        index = torch.arange(start, start + rows)
        for name, values in pair_statistics(gates, self.threshold).items():
            self.matrices[name][index] = values
        margin = self.margin
        self.near_binary += int(((gates <= margin) | (gates >= 1.0 - margin)).sum())
        self.total += gates.numel()
        diagonal = gates[torch.arange(rows), index]  # (R, K): g(y, y)
        self.single = diagonal if self.single is None else torch.cat([self.single, diagonal])
        is_diagonal = torch.zeros(rows, num_classes, dtype=torch.bool)
        is_diagonal[torch.arange(rows), index] = True
        self.same_counts += torch.histc(gates[is_diagonal].double(), bins=self.bins, min=0.0, max=1.0)
        self.cross_counts += torch.histc(gates[~is_diagonal].double(), bins=self.bins, min=0.0, max=1.0)

    def jaccard(self) -> Tensor:
        """(C, C) Jaccard overlap of the open dimensions of the single-class gates (0 when both are empty)."""
        open_sets = (self.single >= self.threshold).double()  # (C, K)
        intersection = open_sets @ open_sets.T
        union = open_sets.sum(1, keepdim=True) + open_sets.sum(1)[None, :] - intersection
        return torch.where(union > 0, intersection / union.clamp_min(1), torch.zeros_like(union))

    def stats(self) -> dict[str, Any]:
        activation, entropy = self.matrices["mean_activation"], self.matrices["entropy"]
        act = activation.numpy()
        C = act.shape[0]
        return {
            "mean_entropy_nats": float(entropy.mean()),
            "mean_entropy_bits": float(entropy.mean()) / math.log(2.0),
            "near_binary_fraction": self.near_binary / max(self.total, 1),
            "mean_activation": float(activation.mean()),
            "mean_open_dims": float(self.matrices["open_fraction"].mean()) * self.dim,
            "same_class_mean_activation": float(np.diag(act).mean()),
            "cross_class_mean_activation": float(act[~np.eye(C, dtype=bool)].mean()) if C > 1 else math.nan,
            "is_symmetric": bool(np.allclose(act, act.T, atol=1e-6)),
        }

    def report(self, kind: str, names: Sequence[str], top_k: int) -> dict[str, Any]:
        """The entries of :func:`analyze_gates` read from the whole gate tensor, from ``dim`` to ``histogram``."""
        jaccard = self.jaccard().numpy()
        matrices = {name: self.matrices[name].numpy().tolist() for name in ("mean_activation", "open_fraction")}
        matrices.update(jaccard=jaccard.tolist(), entropy=self.matrices["entropy"].numpy().tolist())
        return {
            "dim": int(self.dim),
            "matrices": matrices,
            "single_class_gates": self.single.tolist(),
            **_related_pairs(self, jaccard, kind, names, top_k),
            "stats": self.stats(),
            "histogram": self.histogram(),
        }

    def histogram(self) -> dict[str, list[float]]:
        return {
            "bin_edges": np.linspace(0.0, 1.0, self.bins + 1).tolist(),
            "same_class_counts": self.same_counts.tolist(),
            "cross_class_counts": self.cross_counts.tolist(),
        }


def _related_pairs(
    tally: _GateTally, jaccard: np.ndarray, kind: str, names: Sequence[str], top_k: int
) -> dict[str, Any]:
    """The relation measure and the ``top_k`` most / least related unordered class pairs under it."""
    act, opn = tally.matrices["mean_activation"].numpy(), tally.matrices["open_fraction"].numpy()
    ent = tally.matrices["entropy"].numpy()
    symmetric = (act + act.T) / 2
    C = act.shape[0]
    pairs = C * (C - 1) // 2
    measure = "high_activation" if kind == SIGN_GATE else DEFAULT_MEASURE
    relatedness = relatedness_from({"mean_activation": act, "open_fraction": opn, "entropy": ent}, measure)
    ranked = ranked_pairs(relatedness)
    k = min(int(top_k), max(1, pairs // 2))  # the two lists do not overlap when there are enough pairs

    def entry(i: int, j: int) -> dict[str, Any]:
        return {
            "classes": [names[i], names[j]],
            "indices": [i, j],
            "relatedness": float(relatedness[i, j]),
            "mean_activation": float(symmetric[i, j]),
            "entropy": float((ent[i, j] + ent[j, i]) / 2),
            "open_dims": float(opn[i, j] * tally.dim),
            "jaccard": float(jaccard[i, j]),
        }

    return {
        "relation_measure": {"name": measure, "description": MEASURES[measure][2]},
        "most_related": [entry(i, j) for i, j in ranked[:k]],
        "least_related": [entry(i, j) for i, j in ranked[::-1][:k]],
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
    """Class relationships and statistics of the gates of every class pair, streamed block by block (memory O(C^2)).

    Args: the model (a SimLAPModel or SimLAP-Fuse classifier, possibly wrapped); ``label_names``, used when the
    model's ``id2label`` holds only default names; ``threshold`` (g >= threshold: open dimension);
    ``near_binary_margin`` (distance to 0 or 1 that counts as near-binary); ``top_k`` most / least related pairs;
    ``bins`` of the histogram over [0, 1]; ``batch_size`` pairs per forward pass; ``show_progress``.

    Returns:
        A JSON-friendly dict. Always: ``gate`` (kind), ``has_filter``, ``num_classes`` (C), ``dim`` (K),
        ``label_names``. For the ``open`` gate also ``note`` and nothing else (there is no filter). Otherwise:

        * ``matrices``: C x C lists ``mean_activation`` (mean over K of g(i, j)), ``open_fraction`` (share of the
          K dimensions with g(i, j) >= threshold), ``jaccard`` (|O_i & O_j| / |O_i | O_j| with O_y the open dimensions
          of the single-class gate g(y, y); 0 when both are empty) and ``entropy`` (mean Bernoulli entropy of g(i, j));
        * ``single_class_gates``: the C x K gates g(y, y);
        * ``relation_measure``: how pairs are ranked (:mod:`simlap_hf.relations`): the gate entropy for a SimLAP
          filter (most undecided gates first: on Fashion-MNIST it names related classes, the largest mean activation
          unrelated ones), the share of agreeing dimensions (high_activation) for SimLAP-Fuse's sign gates;
        * ``most_related`` / ``least_related``: the ``top_k`` off-diagonal unordered pairs with the largest / smallest
          relatedness (symmetrised), each ``{"classes": [name_i, name_j], "indices", "relatedness",
          "mean_activation", "entropy", "open_dims", "jaccard"}``;
        * ``stats``: ``mean_entropy_nats`` (all C*C*K values), ``mean_entropy_bits`` (0..1),
          ``near_binary_fraction``, ``mean_activation``, ``mean_open_dims``, ``same_class_mean_activation``
          (diagonal), ``cross_class_mean_activation`` (off-diagonal), ``is_symmetric``;
        * ``histogram``: ``bin_edges`` and ``same_class_counts`` / ``cross_class_counts`` of the gate values.
    """
    inner, kind, _, num_classes = gate_function(model)
    names = class_names(inner, num_classes, label_names)
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1); got {threshold}")
    if not 0.0 <= near_binary_margin < 0.5:
        raise ValueError(f"near_binary_margin must lie in [0, 0.5); got {near_binary_margin}")
    report: dict[str, Any] = {
        "gate": kind,
        "has_filter": has_class_gates(kind),
        "num_classes": num_classes,
        "label_names": names,
        "threshold": threshold,
        "near_binary_margin": near_binary_margin,
    }
    if not has_class_gates(kind):
        report.update(dim=int(inner.config.out_dim), note=OPEN_GATE_NOTE)
        return report
    tally = _GateTally(num_classes, threshold, near_binary_margin, bins)
    for start, gates in iter_gate_rows(inner, batch_size, show_progress):
        tally.add(start, gates)
    report.update(tally.report(kind, names, top_k))
    return report
