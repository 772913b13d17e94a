#!/usr/bin/env python
"""Do the gates name related classes? Precision of class-relation measures against Fashion-MNIST's garment groups.

Reads the SimLAP and cross-entropy models trained by ``benchmarks/reproduce.py`` (folders
``simlap_fused_arbitrary_seed<S>`` and ``cross_entropy_seed<S>``), ranks the 45 class pairs by each relation measure
of :mod:`simlap_hf.relations` (from the gates) and by the cosine similarity of class-mean backbone features (from
data, for both models), and reports the precision of the 5 and 10 most related pairs against the groups
{T-shirt/top, Pullover, Coat, Shirt, Dress}, {Sandal, Sneaker, Ankle boot}, {Trouser}, {Bag} (13 of the 45 pairs
lie within a group: chance 0.29).

    python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml \\
        --variants simlap_fused_arbitrary cross_entropy --seeds 0 1 --output_dir outputs/relations_8ep
    python benchmarks/relations_fmnist.py outputs/relations_8ep --seeds 0 1

Writes ``relations_fmnist.json`` and ``relations_fmnist.md`` into the run folder.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simlap_hf.relations import (  # noqa: E402
    MEASURES,
    ClassRelations,
    class_mean_cosine,
    precision_at_k,
    ranked_pairs,
)

# The garment groups of Fashion-MNIST's classes (also the reference of benchmarks/reproduce.py's relation columns).
GROUPS = [
    ["T-shirt/top", "Pullover", "Coat", "Shirt", "Dress"],
    ["Sandal", "Sneaker", "Ankle boot"],
    ["Trouser"],
    ["Bag"],
]


@torch.no_grad()
def test_features(
    model_dir: Path, model: torch.nn.Module, max_samples: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features of the Fashion-MNIST test split (the first ``max_samples`` after a seeded shuffle)."""
    from datasets import DatasetDict

    from simlap_hf.data import DataArguments, create_eval_dataloader, load_image_dataset, with_image_transforms
    from simlap_hf.embed import data_args_for_model

    data_args = data_args_for_model(
        DataArguments(dataset_name="fashion_mnist", max_eval_samples=max_samples), model_dir, model
    )
    test = load_image_dataset(data_args, seed=0)["validation"]
    view = with_image_transforms(DatasetDict(test=test), data_args, int(model.config.num_channels))["test"]
    features, labels = [], []
    for batch in create_eval_dataloader(view, 500):
        features.append(model.get_image_features(batch["pixel_values"]).float())
        labels.append(batch["labels"])
    return torch.cat(features), torch.cat(labels)


class Precisions:
    """Precision@5 and @10 of each relation measure against the garment groups, over seeds, and its top-5 pairs."""

    def __init__(self) -> None:
        self.rows: dict[str, dict[str, list[float]]] = {}
        self.top_pairs: dict[str, dict[int, list[list[str]]]] = {}

    def record(self, name: str, seed: int, relatedness: torch.Tensor, names: list[str]) -> None:
        """Score one (C, C) relatedness matrix of measure ``name`` for ``seed``."""
        index = {n: i for i, n in enumerate(names)}
        groups = [[index[n] for n in group] for group in GROUPS]
        entry = self.rows.setdefault(name, {"p5": [], "p10": []})
        entry["p5"].append(precision_at_k(relatedness, groups, 5))
        entry["p10"].append(precision_at_k(relatedness, groups, 10))
        self.top_pairs.setdefault(name, {})[seed] = [[names[i], names[j]] for i, j in ranked_pairs(relatedness)[:5]]

    def markdown(self, first_seed: int) -> str:
        def cell(values: list[float]) -> str:
            text = " / ".join(f"{v:.2f}" for v in values)
            return f"{statistics.mean(values):.2f} ({text})" if len(values) > 1 else text

        lines = [
            f"| relation measure (most related first) | precision@5 | precision@10 | top-5 pairs, seed {first_seed} |",
            "|---|---|---|---|",
        ]
        for name, entry in self.rows.items():
            pairs = "; ".join(f"{a} / {b}" for a, b in self.top_pairs[name][first_seed])
            lines.append(f"| {name} | {cell(entry['p5'])} | {cell(entry['p10'])} | {pairs} |")
        return "\n".join(lines)


def measure_seed(runs: Path, seed: int, max_test_samples: int | None, precisions: Precisions) -> None:
    """Every gate measure of the SimLAP model of ``seed``, and the class-mean cosine of its backbone features and of
    the cross-entropy model's (when trained)."""
    from simlap_hf.saved_model import load_saved_model

    simlap_dir = runs / f"simlap_fused_arbitrary_seed{seed}"
    model = load_saved_model(simlap_dir)
    for measure in (name for name in MEASURES if name != "class_mean_cosine"):  # the gate measures
        relations = ClassRelations.from_model(model, measure)
        precisions.record(f"SimLAP gates: {measure}", seed, relations.relatedness, relations.names)
    names = relations.names
    features, labels = test_features(simlap_dir, model, max_test_samples)
    cosine = class_mean_cosine(features, labels, len(names))
    precisions.record("SimLAP backbone: class-mean cosine", seed, cosine, names)
    ce_dir = runs / f"cross_entropy_seed{seed}"
    if ce_dir.is_dir():
        features, labels = test_features(ce_dir, load_saved_model(ce_dir), max_test_samples)
        cosine = class_mean_cosine(features, labels, len(names))
        precisions.record("cross-entropy backbone: class-mean cosine", seed, cosine, names)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", help="output folder of benchmarks/reproduce.py")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument(
        "--max_test_samples",
        type=int,
        default=None,
        help="test images for the class-mean features (default: all 10,000)",
    )
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(argv)
    if options.threads:
        torch.set_num_threads(options.threads)
    runs = Path(options.runs)
    precisions = Precisions()
    for seed in options.seeds:
        measure_seed(runs, seed, options.max_test_samples, precisions)
        print(f"seed {seed} done", flush=True)
    table = precisions.markdown(options.seeds[0])
    print(table)
    (runs / "relations_fmnist.md").write_text(table + "\n")
    payload = {
        "seeds": options.seeds,
        "groups": GROUPS,
        "chance": 13 / 45,
        "precision": precisions.rows,
        "top_pairs": precisions.top_pairs,
    }
    (runs / "relations_fmnist.json").write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
