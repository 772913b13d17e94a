"""The one place that decides how images are preprocessed for a model: input size, resize ratio, interpolation,
and the normalisation statistics adapted to the model's input channels.

:func:`resolve_preprocessing` turns a run's ``DataArguments`` into a :class:`Preprocessing`; the train and eval
transforms, the device-side normaliser, the saved image processor (``preprocessor_config.json``, which the model
card and ``pipeline`` read) and the timm export all take their values from it, so they cannot disagree.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..image_processing_simlap import PIL_RESAMPLE, SimLAPImageProcessor
from .arguments import DataArguments
from .registry import named_spec

__all__ = [
    "PREPROCESSOR_FILE",
    "Preprocessing",
    "channel_stats",
    "create_image_processor",
    "preprocessing_from_processor",
    "processor_preprocessing",
    "resolve_mean_std",
    "resolve_preprocessing",
    "save_image_processor",
]

PREPROCESSOR_FILE = "preprocessor_config.json"
# PIL resampling codes used by transformers image processors -> interpolation names.
PIL_INTERPOLATION = {code: name for name, code in PIL_RESAMPLE.items()}


@dataclass(frozen=True)
class Preprocessing:
    """How images are prepared for a model at evaluation (and where training's augmentation ends).

    Attributes:
        input_size: side S of the square (C, S, S) network input.
        crop_pct: the shortest edge is resized to ``floor(S / crop_pct)`` before the centre crop to S.
        interpolation: resize interpolation (bicubic, bilinear, ...).
        mean: normalisation mean, one value per input channel.
        std: normalisation std, one value per input channel.
        num_channels: C: 1 (images converted to grayscale) or 3 (converted to RGB).
    """

    input_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_channels: int

    def timm_config(self) -> dict[str, Any]:
        """The preprocessing fields of a timm ``pretrained_cfg``: ``input_size`` [C, S, S], ``interpolation``,
        ``crop_pct``, ``crop_mode`` ('center'), ``mean`` and ``std`` (lists of C values)."""
        return {
            "input_size": [self.num_channels, self.input_size, self.input_size],
            "interpolation": self.interpolation,
            "crop_pct": float(self.crop_pct),
            "crop_mode": "center",
            "mean": list(self.mean),
            "std": list(self.std),
        }


def channel_stats(values: Sequence[float], num_channels: int, what: str) -> tuple[float, ...]:
    """Adapt mean/std to ``num_channels``: replicate 1 value, average 3 values for 1 channel (an approximation:
    PIL's grayscale conversion weighs the colour channels unequally), otherwise a ValueError."""
    values = tuple(float(v) for v in values)
    if len(values) == num_channels:
        return values
    if len(values) == 1:
        return values * num_channels
    if num_channels == 1:
        return (sum(values) / len(values),)
    raise ValueError(f"{what} has {len(values)} values but the images have {num_channels} channels.")


def resolve_mean_std(args: DataArguments) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Normalisation statistics: explicit ``args.mean`` / ``args.std`` win, each on its own.

    Defaults: the named data set's values (CIFAR-10/100 (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616);
    fashion_mnist 0.2860 / 0.3530 and digits 0.3053 / 0.3759, replicated to 3 channels); any other source
    (local paths, ``train_dir``, other Hub ids) gets timm's ImageNet defaults.

    Returns:
        ``(mean, std)``: tuples of 3 values (or 1 value when given so explicitly), before adaptation to the model's
        channels (see :func:`resolve_preprocessing`).
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    spec = None if args.train_dir else named_spec(args.dataset_name)
    default_mean = spec.mean if spec else IMAGENET_DEFAULT_MEAN
    default_std = spec.std if spec else IMAGENET_DEFAULT_STD
    mean = tuple(float(v) for v in args.mean) if args.mean is not None else tuple(default_mean)
    std = tuple(float(v) for v in args.std) if args.std is not None else tuple(default_std)
    return mean, std


def resolve_preprocessing(data_args: DataArguments, num_channels: int) -> Preprocessing:
    """The preprocessing of a model with ``num_channels`` input channels trained on ``data_args``'s data:
    ``input_size``, ``crop_pct`` and ``interpolation`` as given, mean and std from :func:`resolve_mean_std`
    adapted to the channels by :func:`channel_stats`."""
    mean, std = resolve_mean_std(data_args)
    return Preprocessing(
        input_size=data_args.input_size,
        crop_pct=data_args.crop_pct,
        interpolation=data_args.interpolation,
        mean=channel_stats(mean, num_channels, "mean"),
        std=channel_stats(std, num_channels, "std"),
        num_channels=num_channels,
    )


def create_image_processor(preprocessing: Preprocessing) -> SimLAPImageProcessor:
    """The transformers image processor that applies ``preprocessing`` exactly as the evaluation transform does."""
    p = preprocessing
    return SimLAPImageProcessor(p.input_size, p.crop_pct, p.interpolation, p.mean, p.std, p.num_channels)


def processor_preprocessing(processor: SimLAPImageProcessor) -> Preprocessing:
    """The :class:`Preprocessing` a saved SimLAP image processor applies."""
    return Preprocessing(
        input_size=processor.size,
        crop_pct=processor.crop_pct,
        interpolation=processor.interpolation,
        mean=tuple(processor.image_mean),
        std=tuple(processor.image_std),
        num_channels=processor.num_channels,
    )


def save_image_processor(output_dir: str | os.PathLike, data_args: DataArguments, num_channels: int) -> None:
    """An image processor equal to the eval transform (mode conversion, resize to input/crop_pct with the run's
    interpolation, centre crop, normalise), so that ``pipeline("image-classification" or "image-feature-extraction",
    model=output_dir)`` preprocesses exactly like evaluation."""
    create_image_processor(resolve_preprocessing(data_args, num_channels)).save_pretrained(output_dir)


def _size_from(value: Any) -> int | None:
    """A side length from a processor's ``size`` / ``crop_size`` (an int or a dict of sides)."""
    if isinstance(value, int):
        return value
    if isinstance(value, Mapping) and value:
        for key in ("shortest_edge", "height", "width"):
            if value.get(key):
                return int(value[key])
    return None


def _crop_from(values: Mapping[str, Any]) -> dict[str, Any]:
    """``crop_pct`` and ``img_size`` (the centre-crop side) of a processor's resize-and-crop fields."""
    size = _size_from(values.get("size"))
    crop = _size_from(values.get("crop_size")) if values.get("do_center_crop", True) else None
    if (
        values.get("crop_pct") is not None
        and isinstance(values.get("size"), dict)
        and "shortest_edge" in values["size"]
    ):
        # ConvNext-style: resize the short side to shortest_edge / crop_pct, then centre-crop shortest_edge.
        return {"crop_pct": float(values["crop_pct"]), "img_size": size}
    if crop and size:
        return {"crop_pct": min(1.0, crop / size), "img_size": crop}
    if size:
        return {"crop_pct": 1.0, "img_size": size}
    return {}


def preprocessing_from_processor(path: str | os.PathLike) -> dict[str, Any] | None:
    """Read a transformers ``preprocessor_config.json`` (a file or the folder holding it) into timm data-config
    fields: ``mean``, ``std``, ``crop_pct``, ``interpolation`` and ``img_size`` (the centre-crop side). None when
    there is no such file. Reads the one :func:`save_image_processor` writes as well as other processors'."""
    path = Path(path)
    if path.is_dir():
        path = path / PREPROCESSOR_FILE
    if not path.is_file():
        return None
    values = json.loads(path.read_text())
    found: dict[str, Any] = {}
    if values.get("image_mean") is not None:
        found["mean"] = [float(v) for v in values["image_mean"]]
    if values.get("image_std") is not None:
        found["std"] = [float(v) for v in values["image_std"]]
    if values.get("resample") in PIL_INTERPOLATION:
        found["interpolation"] = PIL_INTERPOLATION[values["resample"]]
    found.update(_crop_from(values))
    return found
