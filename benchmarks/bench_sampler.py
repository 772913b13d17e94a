"""How many partners an anchor finds in its batch, with the plain repeated-augmentation sampler and with the P x K
class-balanced sampler (``--sampler pk``), on CIFAR-100-like labels (100 classes x 500 images, batch 256, ra 3).

SimLAP's positives for an anchor of class y1 paired with class y2 are the batch's samples of class y2; its own
repeated-augmentation copies only count when y2 == y1. What matters is how many *other images* of the partner class
the batch holds. Printed per pair mode (the partner drawn as in ``simlap_hf.losses.sample_pair_labels``):

- anchors with at least one positive image other than their own (copies excluded);
- mean number of positive images per anchor (copies of one image count once);
- anchors without any positive sample at all (``distinct`` partners can be absent from the batch).

Pure label arithmetic, no model: a few seconds on a CPU. Example::

    python benchmarks/bench_sampler.py --classes 100 --images_per_class 500 --batch_size 256 --ra 3 --k 4
"""

from __future__ import annotations

import argparse

import torch

from simlap_hf.data.samplers import ClassBalancedBatchSampler, RepeatedAugmentationBatchSampler
from simlap_hf.losses import sample_pair_labels


def batch_statistics(
    indices: list[int], labels: torch.Tensor, num_classes: int, pair_mode: str, generator: torch.Generator
) -> tuple[float, float, float, int]:
    """(anchors with a positive image other than their own, positive images summed, anchors without any positive,
    anchors) for one batch of sample ``indices``."""
    index = torch.tensor(indices)
    y = labels[index]
    partners = sample_pair_labels(y, pair_mode, num_classes, generator=generator)
    same_class = partners[:, None] == y[None, :]  # (B, B): sample n is a positive of anchor b
    other_image = index[None, :] != index[:, None]
    positive_images = torch.tensor([float(torch.unique(index[row]).numel()) for row in (same_class & other_image)])
    return float((positive_images > 0).sum()), float(positive_images.sum()), float((~same_class.any(1)).sum()), len(y)


def measure(sampler, labels: torch.Tensor, num_classes: int, pair_mode: str, batches: int, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    totals = torch.zeros(4)
    for count, batch in enumerate(sampler):
        if count == batches:
            break
        totals += torch.tensor(batch_statistics(batch, labels, num_classes, pair_mode, generator))
    with_positive, positives, without_any, anchors = totals.tolist()
    return {
        "with_positive": 100 * with_positive / anchors,
        "positives": positives / anchors,
        "without_any": 100 * without_any / anchors,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--images_per_class", type=int, default=500)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--ra", type=int, default=3)
    parser.add_argument("--k", type=int, default=4, help="images per class of the P x K sampler")
    parser.add_argument("--batches", type=int, default=50, help="batches measured per sampler and pair mode")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    labels = torch.arange(options.classes).repeat_interleave(options.images_per_class)
    samplers = {
        "random (ra)": RepeatedAugmentationBatchSampler(len(labels), options.batch_size, options.ra, seed=options.seed),
        f"pk (K={options.k})": ClassBalancedBatchSampler(
            labels, options.batch_size, options.k, options.ra, seed=options.seed
        ),
    }
    print(
        f"# {options.classes} classes x {options.images_per_class} images, batch {options.batch_size}, "
        f"ra {options.ra}, {options.batches} batches per row"
    )
    print(
        "| pair mode | sampler | anchors with a positive image other than their own | positive images per anchor "
        "| anchors without any positive |"
    )
    print("|---|---|---:|---:|---:|")
    for pair_mode in ("identical", "arbitrary", "distinct"):
        for name, sampler in samplers.items():
            result = measure(sampler, labels, options.classes, pair_mode, options.batches, options.seed)
            print(
                f"| {pair_mode} | {name} | {result['with_positive']:.1f}% | {result['positives']:.2f} | "
                f"{result['without_any']:.1f}% |"
            )


if __name__ == "__main__":
    main()
