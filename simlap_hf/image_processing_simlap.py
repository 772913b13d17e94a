"""Image processor of SimLAP models: exactly the evaluation transform of training (``simlap_hf.data``).

Mode conversion (``"L"`` for one input channel, ``"RGB"`` for three; palette images through RGBA), resize of the
shortest edge to ``floor(size / crop_pct)`` with the training interpolation, centre crop to ``size``, scaling to
[0, 1] and normalisation with the data set's mean and std. The processor runs the very transform that evaluation
runs (:func:`simlap_hf.data.transforms.eval_transform`), so ``processor(image)["pixel_values"][0]`` equals
``create_eval_transform(args)(image)``.

Saved as ``preprocessor_config.json`` beside every trained model (:func:`simlap_hf.data.save_image_processor`);
``AutoImageProcessor.from_pretrained(folder)`` finds it after ``import simlap_hf``. The file also names the resize in
the ConvNext convention (``size.shortest_edge``, ``crop_pct``, ``resample``), which ``simlap_hf.export`` reads for
timm exports.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

from .data.arguments import DEFAULT_CROP_PCT, DEFAULT_INPUT_SIZE, DEFAULT_INTERPOLATION
from .data.preprocessing import PIL_INTERPOLATION, Preprocessing
from .data.transforms import eval_transform

# PIL resampling codes, written as ``resample`` for readers of the ConvNext convention.
_PIL_CODES = {name: code for code, name in PIL_INTERPOLATION.items()}


class SimLAPImageProcessor(BaseImageProcessor):
    """Preprocess images like SimLAP evaluation: (C, size, size) normalised float tensors as ``pixel_values``.

    Args:
        size: side of the square network input (``--input_size``).
        crop_pct: the shortest edge is resized to ``floor(size / crop_pct)`` before the centre crop.
        interpolation: resize interpolation (``--interpolation``: bicubic, bilinear, nearest, ...).
        image_mean, image_std: one value per input channel.
        num_channels: 1 (images converted to grayscale) or 3 (converted to RGB).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = DEFAULT_INPUT_SIZE,
        crop_pct: float = DEFAULT_CROP_PCT,
        interpolation: str = DEFAULT_INTERPOLATION,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        num_channels: int = 3,
        **kwargs: Any,
    ) -> None:
        for derived in ("image_processor_type", "resample", "auto_map"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate the transformers convention {"shortest_edge": n} / {"height": n, ...}
            size = size.get("shortest_edge", size.get("height"))
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        if interpolation not in _PIL_CODES:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_CODES)}, got {interpolation!r}.")
        if not 0.0 < float(crop_pct) <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        if len(image_mean) != num_channels or len(image_std) != num_channels:
            raise ValueError(
                f"image_mean and image_std need {num_channels} values (num_channels={num_channels}), "
                f"got {list(image_mean)} and {list(image_std)}."
            )
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.num_channels = int(num_channels)

    @property
    def preprocessing(self) -> Preprocessing:
        """The processor's settings as the data pipeline describes them."""
        return Preprocessing(
            input_size=self.size,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=tuple(self.image_mean),
            std=tuple(self.image_std),
            num_channels=self.num_channels,
        )

    def _transform(self) -> Callable[[PIL.Image.Image], torch.Tensor]:
        """PIL image (any mode) -> normalised Tensor(num_channels, size, size): evaluation's own transform."""
        return eval_transform(self.preprocessing)

    def _to_pil(self, image: Any) -> PIL.Image.Image:
        """A PIL image from a PIL image or a numpy array (H, W), (H, W, C) or (C, H, W); the mode conversion is
        part of the transform."""
        if isinstance(image, PIL.Image.Image):
            return image
        if not isinstance(image, np.ndarray):
            raise TypeError(
                f"SimLAPImageProcessor takes PIL images or numpy arrays (H, W[, C]), got {type(image).__name__}; "
                f"open files with PIL.Image.open(path) first."
            )
        array = image
        if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
            array = array.transpose(1, 2, 0)  # channels first -> last
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8:
            array = np.clip(array * 255.0 if array.max() <= 1.0 else array, 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(array)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        """One image or a list of images -> ``BatchFeature`` with ``pixel_values`` (B, C, size, size)."""
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        if not batch:
            raise ValueError("SimLAPImageProcessor got an empty list of images.")
        transform = self._transform()
        pixel_values = torch.stack([transform(self._to_pil(image)) for image in batch])
        if return_tensors in (None, "pt"):
            data = {"pixel_values": pixel_values}
        elif return_tensors == "np":
            data = {"pixel_values": pixel_values.numpy()}
        else:
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}.")
        return BatchFeature(data=data)

    def __call__(self, images: Any = None, *args: Any, **kwargs: Any) -> BatchFeature:
        if images is None:
            images = kwargs.pop("image", None)
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "size": {"shortest_edge": self.size},
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "resample": _PIL_CODES[self.interpolation],
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_channels": self.num_channels,
        }
