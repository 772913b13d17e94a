"""Class relations learned by a SimLAP model's gates, as an API.

The feature filter gives every pair of classes (a, b) a gate g(a, b) in (0, 1)^K: the dimensions in which a sample
of class b counts as a positive for an anchor of class a. :class:`ClassRelations` turns the C x C x K gates into a
C x C *relatedness* matrix (higher = more related), lists a class's most related classes by name and the
dimensions a pair shares, and saves all of it as ``class_relations.json`` beside the model.

**Which measure.** Intuition says related classes share many open dimensions (high mean gate). Measured on
Fashion-MNIST it is the other way round (README "Results", ``benchmarks/relations_fmnist.py``): against the garment
groups {T-shirt/top, Pullover, Coat, Shirt, Dress}, {Sandal, Sneaker, Ankle boot}, {Trouser}, {Bag}, the pairs with
the *highest* mean gate activation are almost never in one group, while the pairs with the *most undecided* gates
(highest mean Bernoulli entropy of g(a, b)), the *lowest* mean activation or the *fewest* open dimensions are. A
plausible reading: the negatives of a pair (a, b) include the nearest confusers of both, so a close pair can only
open few, less decided dimensions. The default measure, :data:`DEFAULT_MEASURE`, is the gate entropy; the others stay
available by name (``measure=``).

    from simlap_hf import SimLAPModel
    from simlap_hf.relations import ClassRelations
    relations = ClassRelations.from_model(SimLAPModel.from_pretrained("outputs/simlap"))
    relations.related_classes("Shirt", k=3)        # [("T-shirt/top", 0.61), ("Pullover", 0.58), ...]
    relations.shared_dimensions("Shirt", "Coat")   # indices of the dimensions g(Shirt, Coat) opens
    relations.save("outputs/simlap/class_relations.json")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .configuration_simlap import gate_has_filter
from .utils import bernoulli_entropy, eval_mode, model_device, unwrap_model

RELATIONS_FILE = "class_relations.json"
HEATMAP_FILE = "class_relations.png"
#: Gate values at or above this count as an "open" dimension.
DEFAULT_THRESHOLD = 0.5
#: The gate kind of SimLAP-Fuse classifiers: binary gates from the signs of the class weights (no feature filter, so
#: not a ``SimLAPConfig.gate`` value).
SIGN_GATE = "sign"
_DEFAULT_LABEL = re.compile(r"^LABEL_\d+$")
# Clamp of the gate values before their entropy is taken: float64 keeps 1 - 1e-7 apart from 1.
_ENTROPY_EPS = 1e-7

# name: (matrix it is computed from, sign: +1 when a larger value means more related, description)
MEASURES: dict[str, tuple[str, float, str]] = {
    "gate_entropy": ("entropy", 1.0, "mean Bernoulli entropy of g(a, b) (higher: more related)"),
    "low_activation": ("mean_activation", -1.0, "minus the mean gate value of g(a, b) (lower gates: more related)"),
    "low_open_fraction": ("open_fraction", -1.0, "minus the share of open dimensions of g(a, b) (fewer: more related)"),
    "high_activation": ("mean_activation", 1.0, "the mean gate value of g(a, b) (measured to be backwards)"),
    "class_mean_cosine": ("class_mean_cosine", 1.0, "cosine of the class-mean backbone features (from data)"),
}
DEFAULT_MEASURE = "gate_entropy"


def gate_kind(model: nn.Module) -> str | None:
    """The gate kind of a model: its ``config.gate`` (a kind of the gate registry
    :data:`~simlap_hf.configuration_simlap.GATE_KINDS`) for a SimLAP pretraining model, :data:`SIGN_GATE` for
    SimLAP-Fuse (gates from the signs of the class weights), ``None`` for a model without class-pair gates."""
    model = unwrap_model(model)
    if callable(getattr(model, "gate", None)) and hasattr(getattr(model, "config", None), "gate"):
        return str(model.config.gate)
    if callable(getattr(model, "class_gate", None)):
        return SIGN_GATE
    return None


def has_class_gates(kind: str | None) -> bool:
    """Whether a model of gate kind ``kind`` (:func:`gate_kind`) has gates that differ between class pairs: a
    registered kind with a feature filter, or SimLAP-Fuse's sign gates."""
    return kind == SIGN_GATE or gate_has_filter(kind)


def gate_function(model: nn.Module) -> tuple[nn.Module, str, Callable[[Tensor, Tensor], Tensor], int]:
    """``(unwrapped model, gate kind, gate function, C)``: the function maps (P,) first and (P,) second classes to
    the (P, K) gates g(first, second). A ValueError for a model without class-pair gates."""
    model = unwrap_model(model)
    kind = gate_kind(model)
    if kind is None:
        raise ValueError(
            f"{type(model).__name__} has no class-pair gates: gate analysis needs a SimLAPModel (model.gate) or a "
            f"SimLAPFuseForImageClassification (model.class_gate)."
        )
    function = model.class_gate if kind == SIGN_GATE else model.gate
    return model, kind, function, int(model.config.num_labels)


@torch.no_grad()
def iter_gate_rows(
    model: nn.Module, batch_size: int = 65536, show_progress: bool = False
) -> Iterator[tuple[int, Tensor]]:
    """Yield ``(first_row, gates)`` blocks of the C x C x K gate tensor: gates (R, C, K) float32 on the CPU hold
    g(y1, y2) for y1 in [first_row, first_row + R) and every y2. Eval mode, no gradient, at most about
    ``batch_size`` pairs per forward pass; the train/eval flags of the model are restored afterwards."""
    from tqdm.auto import tqdm

    inner, _, function, num_classes = gate_function(model)
    device = model_device(inner)
    rows = max(1, int(batch_size) // max(num_classes, 1))
    with eval_mode(inner):
        partners = torch.arange(num_classes, device=device)
        starts = range(0, num_classes, rows)
        for start in tqdm(starts, desc="Class-pair gates", disable=not show_progress or len(starts) < 2):
            stop = min(start + rows, num_classes)
            first = torch.arange(start, stop, device=device).repeat_interleave(num_classes)  # (R*C,)
            second = partners.repeat(stop - start)  # (R*C,)
            gates = function(first, second).float().cpu()  # (R*C, K)
            yield start, gates.reshape(stop - start, num_classes, -1)


def pair_statistics(gates: Tensor, threshold: float) -> dict[str, Tensor]:
    """Per-pair statistics of a (R, C, K) block of gates, each (R, C) float64: ``mean_activation`` (mean over K),
    ``open_fraction`` (share of the K dimensions with g >= threshold), ``entropy`` (mean Bernoulli entropy, nats)."""
    return {
        "mean_activation": gates.double().mean(dim=2),
        "open_fraction": (gates >= threshold).double().mean(dim=2),
        "entropy": bernoulli_entropy(gates.double(), _ENTROPY_EPS).mean(dim=2),
    }


def class_names(model: nn.Module, num_classes: int, label_names: Sequence[str] | None) -> list[str]:
    """Class names for the gate indices: the model's own ``id2label`` when it holds real names (the gates are indexed
    by the model's classes), else ``label_names`` when they fit, else ``class i``."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))) for i in range(num_classes)]
    if all(name and not _DEFAULT_LABEL.match(name) for name in names):
        return names
    if label_names is not None and len(label_names) == num_classes:
        return [str(name) for name in label_names]
    return [f"class {i}" for i in range(num_classes)]


def gate_matrices(model: nn.Module, threshold: float = DEFAULT_THRESHOLD) -> dict[str, Tensor]:
    """The C x C matrices of every gate statistic: ``mean_activation``, ``open_fraction`` (share of dimensions with
    g >= threshold), ``entropy`` (mean Bernoulli entropy, nats); and ``open`` (C, C, K) bool masks. Eval mode, no
    gradient (the model's train/eval flags are restored)."""
    kind = gate_kind(model)
    if not has_class_gates(kind):
        raise ValueError(f"The model has the {kind} gate (no feature filter): there are no class relations to read.")
    blocks: dict[str, list[Tensor]] = {"mean_activation": [], "open_fraction": [], "entropy": [], "open": []}
    for _, gates in iter_gate_rows(model):  # (R, C, K)
        for name, values in pair_statistics(gates, threshold).items():
            blocks[name].append(values)
        blocks["open"].append(gates >= threshold)
    return {name: torch.cat(values) for name, values in blocks.items()}


def relatedness_from(matrices: Mapping[str, Any], measure: str = DEFAULT_MEASURE) -> np.ndarray:
    """C x C symmetric relatedness (higher = more related) of one of :data:`MEASURES`; the diagonal is NaN."""
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}.")
    source, sign, _ = MEASURES[measure]
    matrix = sign * np.asarray(matrices[source], dtype=np.float64)
    matrix = (matrix + matrix.T) / 2
    np.fill_diagonal(matrix, np.nan)
    return matrix


def class_mean_cosine(features: Tensor, labels: Tensor, num_classes: int) -> np.ndarray:
    """C x C cosine similarity of the class-mean feature vectors (a relation measure from data, for comparison);
    the diagonal is NaN."""
    features = features.double()
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64)
    means.index_add_(0, labels.long(), features)
    counts = torch.bincount(labels.long(), minlength=num_classes).clamp_min(1).double()
    means = torch.nn.functional.normalize(means / counts[:, None], dim=1)
    matrix = (means @ means.T).numpy()
    np.fill_diagonal(matrix, np.nan)
    return matrix


def ranked_pairs(relatedness: np.ndarray) -> list[tuple[int, int]]:
    """Unordered off-diagonal pairs (i < j), most related first (ties by index)."""
    size = relatedness.shape[0]
    return sorted(combinations(range(size), 2), key=lambda p: (-relatedness[p], p))


def precision_at_k(relatedness: np.ndarray, groups: Sequence[Sequence[int]], k: int) -> float:
    """Share of the ``k`` most related pairs whose two classes lie in one of ``groups`` (lists of class indices)."""
    group_of = {index: g for g, members in enumerate(groups) for index in members}
    top = ranked_pairs(relatedness)[:k]
    return sum(group_of.get(i, -1) == group_of.get(j, -2) for i, j in top) / max(len(top), 1)


class ClassRelations:
    """The class relations of a trained SimLAP model.

    Attributes:
        names: the C class names (the model's ``id2label``).
        relatedness: C x C symmetric numpy matrix, higher = more related (the chosen ``measure``); NaN diagonal.
        measure: the name of the measure (:data:`MEASURES`).
        matrices: the gate statistics it is read from (``mean_activation``, ``open_fraction``, ``entropy``).
    """

    def __init__(
        self,
        names: Sequence[str],
        matrices: Mapping[str, Any],
        measure: str = DEFAULT_MEASURE,
        open_masks: Tensor | None = None,
        threshold: float = DEFAULT_THRESHOLD,
    ) -> None:
        self.names = [str(name) for name in names]
        self.matrices = {
            name: np.asarray(value, dtype=np.float64)
            for name, value in matrices.items()
            if name in ("mean_activation", "open_fraction", "entropy", "class_mean_cosine")
        }
        self.measure = measure
        self.relatedness = relatedness_from(self.matrices, measure)
        self.threshold = threshold
        self._open = open_masks
        if self.relatedness.shape != (len(self.names), len(self.names)):
            raise ValueError(f"{len(self.names)} class names for a {self.relatedness.shape} relation matrix.")

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        measure: str = DEFAULT_MEASURE,
        threshold: float = DEFAULT_THRESHOLD,
        label_names: Sequence[str] | None = None,
    ) -> ClassRelations:
        """Read the relations from a SimLAPModel's gates (or a SimLAP-Fuse classifier's sign gates)."""
        inner, _, _, num_classes = gate_function(model)
        names = class_names(inner, num_classes, label_names)
        matrices = gate_matrices(model, threshold)
        return cls(names, matrices, measure, open_masks=matrices["open"], threshold=threshold)

    @classmethod
    def from_features(cls, features: Tensor, labels: Tensor, names: Sequence[str]) -> ClassRelations:
        """Relations from data instead of gates: the cosine similarity of class-mean (N, D) features, for any model
        (the Fashion-MNIST measurement in README "Results" finds it at least as precise as the gates)."""
        matrix = class_mean_cosine(features, labels, len(names))
        return cls(names, {"class_mean_cosine": np.nan_to_num(matrix, nan=1.0)}, "class_mean_cosine")

    @classmethod
    def load(cls, path: str | os.PathLike, measure: str | None = None) -> ClassRelations:
        """Read a ``class_relations.json`` (a file or the model folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / RELATIONS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{str(path)!r} does not exist; write it with ClassRelations.save().")
        data = json.loads(path.read_text())
        return cls(data["label_names"], data["matrices"], measure or data["measure"], threshold=data["threshold"])

    # -- queries -----------------------------------------------------------------------------------------------
    def index(self, name: str | int) -> int:
        """Index of a class given by its name or by its integer id (``0 <= id < number of classes``)."""
        if isinstance(name, str) and name in self.names:
            return self.names.index(name)
        if isinstance(name, int) and not isinstance(name, bool):
            if 0 <= name < len(self.names):
                return name
            raise ValueError(
                f"Class id {name} is out of range: the model has {len(self.names)} classes (ids 0 to "
                f"{len(self.names) - 1}); pass an id in that range or a class name ({', '.join(self.names)})."
            )
        raise ValueError(
            f"Class {name!r} is not a class of the model; pass one of its class names ({', '.join(self.names)}) or "
            f"an integer id from 0 to {len(self.names) - 1}."
        )

    def related_classes(self, name: str | int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` classes most related to ``name`` with their relatedness, most related first."""
        i = self.index(name)
        others = [j for j in range(len(self.names)) if j != i]
        others.sort(key=lambda j: (-self.relatedness[i, j], j))
        return [(self.names[j], float(self.relatedness[i, j])) for j in others[: max(int(k), 0)]]

    def shared_dimensions(self, a: str, b: str) -> list[int]:
        """Indices of the embedding dimensions the gate g(a, b) opens (g >= threshold): the subspace in which a
        class-b sample is a positive for a class-a anchor. Needs the gates (:meth:`from_model`)."""
        i, j = self.index(a), self.index(b)
        if self._open is None:
            raise ValueError("shared_dimensions needs the gates: build the relations with ClassRelations.from_model.")
        return self._open[i, j].nonzero().flatten().tolist()

    def most_related_pairs(self, k: int = 5) -> list[tuple[str, str, float]]:
        return [
            (self.names[i], self.names[j], float(self.relatedness[i, j])) for i, j in ranked_pairs(self.relatedness)[:k]
        ]

    def least_related_pairs(self, k: int = 5) -> list[tuple[str, str, float]]:
        return [
            (self.names[i], self.names[j], float(self.relatedness[i, j]))
            for i, j in ranked_pairs(self.relatedness)[::-1][:k]
        ]

    # -- saving ------------------------------------------------------------------------------------------------
    def to_dict(self, top_k: int = 5) -> dict[str, Any]:
        pairs = lambda items: [{"classes": [a, b], "relatedness": score} for a, b, score in items]  # noqa: E731
        return {
            "measure": self.measure,
            "measure_description": MEASURES[self.measure][2],
            "threshold": self.threshold,
            "label_names": self.names,
            "relatedness": [[None if math.isnan(v) else float(v) for v in row] for row in self.relatedness],
            "related_classes": {
                name: [{"class": other, "relatedness": score} for other, score in self.related_classes(name, top_k)]
                for name in self.names
            },
            "most_related": pairs(self.most_related_pairs(top_k)),
            "least_related": pairs(self.least_related_pairs(top_k)),
            "matrices": {name: matrix.tolist() for name, matrix in self.matrices.items()},
        }

    def save(self, path: str | os.PathLike, top_k: int = 5) -> Path:
        """Write ``class_relations.json`` (a file path, or a folder to write it into)."""
        path = Path(path)
        if path.is_dir():
            path = path / RELATIONS_FILE
        path.write_text(json.dumps(self.to_dict(top_k), indent=1) + "\n")
        return path

    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Heatmap of the relatedness matrix with class names on both axes (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        size = len(self.names)
        side = min(4.0 + 0.35 * size, 16.0)
        figure = Figure(figsize=(side + 1.2, side))
        FigureCanvasAgg(figure)
        axes = figure.add_subplot(1, 1, 1)
        image = axes.imshow(np.ma.masked_invalid(self.relatedness), cmap="viridis")
        step = max(1, math.ceil(size / 36))
        ticks = list(range(0, size, step))
        axes.set_xticks(ticks, [self.names[t] for t in ticks], rotation=90, fontsize=8)
        axes.set_yticks(ticks, [self.names[t] for t in ticks], fontsize=8)
        axes.set_title(title or f"Class relatedness ({MEASURES[self.measure][2]})", fontsize=9)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="relatedness (higher: more related)")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        return Path(path)

    def summary_markdown(self, top_k: int = 5, heatmap: str | None = HEATMAP_FILE) -> str:
        """A model-card section: the measure, the most / least related pairs, each class's closest classes."""
        lines = [
            f"Read from the gates g(a, b) of every class pair; measure: **{self.measure}**, "
            f"{MEASURES[self.measure][2]} (`class_relations.json`; "
            "`simlap_hf.relations.ClassRelations.load(folder)`).",
            "",
            "Most related pairs: " + ", ".join(f"{a} / {b}" for a, b, _ in self.most_related_pairs(top_k)) + ".",
            "",
            "Least related pairs: " + ", ".join(f"{a} / {b}" for a, b, _ in self.least_related_pairs(top_k)) + ".",
        ]
        if len(self.names) <= 30:
            lines += ["", "| class | most related classes |", "|---|---|"]
            lines += [
                f"| {name} | " + ", ".join(other for other, _ in self.related_classes(name, 3)) + " |"
                for name in self.names
            ]
        if heatmap:
            lines += ["", f"![class relatedness]({heatmap})"]
        return "\n".join(lines)


def save_class_relations(model: nn.Module, output_dir: str | os.PathLike, measure: str = DEFAULT_MEASURE) -> bool:
    """Write ``class_relations.json`` and its heatmap beside a saved model; False (nothing written) for a model
    without a feature filter (open gate) or without gates."""
    try:
        kind = gate_kind(model)
    except (TypeError, ValueError, AttributeError):
        return False
    if not gate_has_filter(kind):  # no filter (open), none at all, or Fuse's binary sign gates
        return False
    relations = ClassRelations.from_model(model, measure)
    relations.save(Path(output_dir) / RELATIONS_FILE)
    relations.plot(Path(output_dir) / HEATMAP_FILE)
    return True
