"""The named data sets: one :class:`NamedDatasetSpec` row per name, each naming the loader kind that reads it.

A row only contributes defaults (where the data lives, column names, class names, normalisation statistics); the
loading itself is done by the loader function its ``loader`` field names (see ``simlap_hf.data.sources``).
Adding a named data set means adding a row here, nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

__all__ = [
    "FASHION_MNIST_DEFAULT_DIR",
    "FASHION_MNIST_DIR_ENV",
    "FASHION_MNIST_LABEL_NAMES",
    "NAMED_DATASETS",
    "NamedDatasetSpec",
    "known_names",
    "local_copy",
    "named_spec",
    "normalize_name",
]

FASHION_MNIST_LABEL_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_MNIST_DIR_ENV = "SIMLAP_FASHION_MNIST_DIR"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class NamedDatasetSpec:
    """Defaults contributed by a named data set; everything else goes through the generic path.

    Attributes:
        name: the short name accepted by ``--dataset_name``.
        hub_id: Hub repository id, or ``None`` for a built-in source.
        image_column: name of the image column in the source.
        label_column: name of the label column in the source.
        mean: per-channel normalisation mean (3 values).
        std: per-channel normalisation std (3 values).
        label_names: class names to use when the source only stores integer labels.
        config_label_columns: ``--dataset_config_name`` values that select another label column
            (the Hub config itself is then left at its default).
        local_dir_env: environment variable naming a local IDX folder tried before the Hub.
        local_dir_default: folder tried when ``local_dir_env`` is unset.
        validation_fraction: fixed fraction carved into ``validation`` (overrides ``train_val_split``).
        loader: the source kind that reads the data set (a key of ``simlap_hf.data.dataset.SOURCE_LOADERS``:
            ``"hub"`` for ``hub_id``, ``"sklearn_digits"`` for scikit-learn's bundled digits).
    """

    name: str
    hub_id: str | None
    image_column: str
    label_column: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    label_names: tuple[str, ...] | None = None
    config_label_columns: Mapping[str, str] = field(default_factory=dict)
    local_dir_env: str | None = None
    local_dir_default: str | None = None
    validation_fraction: float | None = None
    loader: str = "hub"


_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)

NAMED_DATASETS: dict[str, NamedDatasetSpec] = {
    "cifar10": NamedDatasetSpec(
        name="cifar10",
        hub_id="uoft-cs/cifar10",
        image_column="img",
        label_column="label",
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
        loader="hub",
    ),
    "cifar100": NamedDatasetSpec(
        name="cifar100",
        hub_id="uoft-cs/cifar100",
        image_column="img",
        label_column="fine_label",
        mean=_CIFAR_MEAN,
        std=_CIFAR_STD,
        config_label_columns={"fine": "fine_label", "coarse": "coarse_label"},
        loader="hub",
    ),
    # Fashion-MNIST statistics of the 60k training images (0.2860 / 0.3530), replicated to 3 channels.
    "fashion_mnist": NamedDatasetSpec(
        name="fashion_mnist",
        hub_id="zalando-datasets/fashion_mnist",
        image_column="image",
        label_column="label",
        mean=(0.2860,) * 3,
        std=(0.3530,) * 3,
        label_names=FASHION_MNIST_LABEL_NAMES,
        local_dir_env=FASHION_MNIST_DIR_ENV,
        local_dir_default=FASHION_MNIST_DEFAULT_DIR,
        loader="hub",
    ),
    # scikit-learn digits: statistics of all 1,797 images after scaling 0..16 -> 0..255 (0.3053 / 0.3759).
    "digits": NamedDatasetSpec(
        name="digits",
        hub_id=None,
        image_column="image",
        label_column="label",
        mean=(0.3053,) * 3,
        std=(0.3759,) * 3,
        label_names=tuple(str(i) for i in range(10)),
        validation_fraction=0.2,
        loader="sklearn_digits",
    ),
}


def normalize_name(name: str) -> str:
    """Canonical form of a data set name: stripped, lower case, '-' -> '_'."""
    return name.strip().lower().replace("-", "_")


def named_spec(name: str | None) -> NamedDatasetSpec | None:
    """Return the named spec for a short name (``cifar10``) or its Hub id (``uoft-cs/cifar10``)."""
    if not name:
        return None
    key = normalize_name(name)
    if key in NAMED_DATASETS:
        return NAMED_DATASETS[key]
    for spec in NAMED_DATASETS.values():
        if spec.hub_id is not None and spec.hub_id.lower() == name.strip().lower():
            return spec
    return None


def known_names() -> str:
    """Comma-separated named data sets, for error messages."""
    return ", ".join(sorted(NAMED_DATASETS))


def local_copy(spec: NamedDatasetSpec) -> str | None:
    """The local folder a row names (its environment variable, else its default folder), or None. Whether the
    folder exists and holds the data is for the caller to check."""
    if not (spec.local_dir_env or spec.local_dir_default):
        return None
    return os.environ.get(spec.local_dir_env or "", "") or spec.local_dir_default
