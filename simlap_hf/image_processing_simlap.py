"""Image processor of SimLAP models: exactly the evaluation transform of training, with no SimLAP-HF import.

Mode conversion (``"L"`` for one input channel, ``"RGB"`` for three; palette images through RGBA), resize of the
shortest edge to ``floor(size / crop_pct)`` with the training interpolation (the long edge to
``int(new_short * long / short)``), centre crop to ``size``, scaling to [0, 1] and normalisation with the data set's
mean and std: the steps and the arithmetic of timm's ``create_transform(is_training=False)`` (torchvision's
``Resize``, ``CenterCrop``, ``ToTensor`` and ``Normalize`` on PIL images), so the values are the same.

This file imports only transformers, PIL, numpy and torch: it is copied into every saved model folder together with
an ``auto_map`` entry in ``preprocessor_config.json``, so that ``AutoImageProcessor.from_pretrained(folder,
trust_remote_code=True)`` and ``pipeline(..., trust_remote_code=True)`` work where SimLAP-HF is not installed. The
training code builds its evaluation transform from :class:`EvalTransform` (``simlap_hf.data.transforms``). The file
also names the resize in the ConvNext convention (``size.shortest_edge``, ``crop_pct``, ``resample``), which
``simlap_hf.export`` reads for timm exports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor

# Interpolation names (timm's and the --interpolation flag's) -> PIL resampling codes.
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}
DEFAULT_SIZE = 32
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bicubic"


class EvalTransform:
    """PIL image (any mode) -> normalised float32 Tensor(num_channels, size, size).

    Convert the mode, resize the shortest edge to ``floor(size / crop_pct)``, centre-crop ``size`` x ``size``, scale
    to [0, 1], subtract ``mean`` and divide by ``std``. Picklable (data loader workers receive it).
    """

    def __init__(
        self,
        size: int,
        crop_pct: float,
        interpolation: str,
        mean: Sequence[float],
        std: Sequence[float],
        num_channels: int,
    ) -> None:
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        if interpolation not in PIL_RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(PIL_RESAMPLE)}, got {interpolation!r}.")
        if not 0.0 < float(crop_pct) <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}.")
        if len(mean) != num_channels or len(std) != num_channels:
            raise ValueError(
                f"mean and std need {num_channels} values (num_channels={num_channels}), got {list(mean)} and "
                f"{list(std)}."
            )
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.num_channels = int(num_channels)
        self.mode = "L" if num_channels == 1 else "RGB"
        self.resize_to = math.floor(self.size / self.crop_pct)
        self.mean = torch.tensor([float(v) for v in mean], dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor([float(v) for v in std], dtype=torch.float32).view(-1, 1, 1)

    def convert(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """``image`` in mode "L" or "RGB" (palette images through RGBA, so transparency is resolved first)."""
        if image.mode == self.mode:
            return image
        if image.mode == "P":
            image = image.convert("RGBA")
        return image.convert(self.mode)

    def resize_and_crop(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """The shortest edge resized to ``floor(size / crop_pct)`` (skipped when it already is), then the centre
        ``size`` x ``size`` crop (offsets rounded as torchvision's ``center_crop``)."""
        width, height = image.size
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_to, int(self.resize_to * long / short)
        new_width, new_height = (new_short, new_long) if width <= height else (new_long, new_short)
        if (new_width, new_height) != (width, height):
            image = image.resize((new_width, new_height), PIL_RESAMPLE[self.interpolation])
        top = int(round((new_height - self.size) / 2.0))
        left = int(round((new_width - self.size) / 2.0))
        return image.crop((left, top, left + self.size, top + self.size))

    def to_tensor(self, image: PIL.Image.Image) -> torch.Tensor:
        """(H, W[, C]) uint8 pixels -> normalised float32 (C, H, W): ``(x / 255 - mean) / std``."""
        pixels = np.array(image, dtype=np.uint8, copy=True)
        if pixels.ndim == 2:
            pixels = pixels[:, :, None]
        tensor = torch.from_numpy(pixels).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        return tensor.sub_(self.mean).div_(self.std)

    def __call__(self, image: PIL.Image.Image) -> torch.Tensor:
        """``image`` (PIL, any mode and size) -> Tensor(num_channels, size, size) float32."""
        return self.to_tensor(self.resize_and_crop(self.convert(image)))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(mode={self.mode!r}, resize={self.resize_to} ({self.interpolation}), "
            f"center_crop={self.size}, mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"
        )


class SimLAPImageProcessor(BaseImageProcessor):
    """Preprocess images like SimLAP evaluation: (C, size, size) normalised float tensors as ``pixel_values``.

    Args:
        size: side of the square network input (``--input_size``; the model config's ``image_size``).
        crop_pct: the shortest edge is resized to ``floor(size / crop_pct)`` before the centre crop.
        interpolation: resize interpolation (``--interpolation``: bicubic, bilinear, nearest, ...).
        image_mean, image_std: one value per input channel.
        num_channels: 1 (images converted to grayscale) or 3 (converted to RGB).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        crop_pct: float = DEFAULT_CROP_PCT,
        interpolation: str = DEFAULT_INTERPOLATION,
        image_mean: Sequence[float] = (0.5, 0.5, 0.5),
        image_std: Sequence[float] = (0.5, 0.5, 0.5),
        num_channels: int = 3,
        **kwargs: Any,
    ) -> None:
        auto_map = kwargs.pop("auto_map", None)
        for derived in ("image_processor_type", "resample"):
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        if isinstance(size, dict):  # tolerate the transformers convention {"shortest_edge": n} / {"height": n, ...}
            size = size.get("shortest_edge", size.get("height"))
        if num_channels in (1, 3) and (len(image_mean) != num_channels or len(image_std) != num_channels):
            raise ValueError(
                f"image_mean and image_std need {num_channels} values (num_channels={num_channels}), "
                f"got {list(image_mean)} and {list(image_std)}."
            )
        self.transform = EvalTransform(int(size), crop_pct, interpolation, image_mean, image_std, num_channels)
        self.size = int(size)
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        self.image_mean = [float(value) for value in image_mean]
        self.image_std = [float(value) for value in image_std]
        self.num_channels = int(num_channels)
        if auto_map is not None:
            self.auto_map = auto_map

    def _to_pil(self, image: Any) -> PIL.Image.Image:
        """A PIL image from a PIL image or a numpy array (H, W), (H, W, C) or (C, H, W); the mode conversion is
        part of the transform."""
        if isinstance(image, PIL.Image.Image):
            return image
        if isinstance(image, torch.Tensor):
            image = image.detach().cpu().numpy()
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
        pixel_values = torch.stack([self.transform(self._to_pil(image)) for image in batch])
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
        values = {
            "image_processor_type": type(self).__name__,
            "size": {"shortest_edge": self.size},
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "resample": PIL_RESAMPLE[self.interpolation],
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "num_channels": self.num_channels,
        }
        if getattr(self, "auto_map", None):
            values["auto_map"] = dict(self.auto_map)
        return values


# save_pretrained copies this file next to preprocessor_config.json and writes its auto_map entry.
SimLAPImageProcessor.register_for_auto_class("AutoImageProcessor")
