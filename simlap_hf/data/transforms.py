"""Image transforms: training augmentation (timm's, with an optional uint8 finish normalised on the device) and the
deterministic evaluation transform that the saved image processor reproduces."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..image_processing_simlap import EvalTransform
from .arguments import DataArguments
from .preprocessing import Preprocessing, resolve_preprocessing

__all__ = [
    "ConvertImageMode",
    "TrainNormalizer",
    "UInt8RandomErasing",
    "create_eval_transform",
    "create_train_normalizer",
    "create_train_transform",
    "eval_transform",
]


def _auto_augment(policy: str | None) -> str | None:
    """The timm policy string, or ``None`` when disabled (None, '', 'none', 'null')."""
    if policy is None or policy.strip().lower() in ("", "none", "null"):
        return None
    return policy


class ConvertImageMode:
    """Convert a PIL image to ``"L"`` (``num_channels=1``) or ``"RGB"`` (``num_channels=3``).

    Palette images go through RGBA so transparency is resolved before dropping alpha.
    """

    def __init__(self, num_channels: int = 3) -> None:
        """``num_channels``: 1 (-> mode 'L') or 3 (-> mode 'RGB')."""
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels}.")
        self.mode = "L" if num_channels == 1 else "RGB"

    def __call__(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """Return ``image`` in the target mode (unchanged when already in it)."""
        if image.mode == self.mode:
            return image
        if image.mode == "P":
            image = image.convert("RGBA")
        return image.convert(self.mode)

    def __repr__(self) -> str:
        """Readable form, shown inside the composed transform's repr."""
        return f"{type(self).__name__}(mode={self.mode!r})"


class PILToUInt8Tensor:
    """PIL image of H x W pixels -> contiguous uint8 tensor (C, H, W) of the same values; tensors pass unchanged.

    The values of torchvision's ``pil_to_tensor`` (timm's ``MaybePILToTensor``). That one returns a (C, H, W) view of
    the (H, W, C) pixels, which the collate's ``torch.stack`` then gathers channel by channel; here the sample is made
    contiguous at once, so the stack is a plain copy. Modes other than ``"L"`` and ``"RGB"`` (which
    :class:`ConvertImageMode` produces) go through ``pil_to_tensor``.
    """

    # From about this many pixels on, reading each channel plane out of PIL (one call per channel) is faster than
    # transposing the interleaved pixels in NumPy; below it the per-call cost dominates.
    plane_by_plane_pixels = 128 * 128

    def __call__(self, image: PIL.Image.Image | torch.Tensor) -> torch.Tensor:
        """``image`` -> Tensor(C, H, W) uint8 for "L" (C=1) and "RGB" (C=3) images."""
        if isinstance(image, torch.Tensor):
            return image
        width, height = image.size
        if image.mode == "L":
            return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(1, height, width)
        if image.mode != "RGB":
            from torchvision.transforms.functional import pil_to_tensor

            return pil_to_tensor(image).contiguous()
        if width * height < self.plane_by_plane_pixels:
            pixels = np.frombuffer(image.tobytes(), dtype=np.uint8).reshape(height, width, 3)
            return torch.from_numpy(pixels.transpose(2, 0, 1).copy())
        out = torch.empty((3, height, width), dtype=torch.uint8)
        planes = out.numpy()
        for index, band in enumerate("RGB"):
            planes[index] = np.frombuffer(image.tobytes("raw", band), dtype=np.uint8).reshape(height, width)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class DirectRandomResizedCrop:
    """timm's ``RandomResizedCropAndInterpolation`` applied to PIL images without torchvision's functional dispatch.

    The same random draws (the wrapped transform's ``get_params``, then its interpolation choice when that is random)
    and the same PIL calls as ``torchvision.transforms.functional.resized_crop`` (``crop`` of the box, then
    ``resize`` to ``size`` unless the box already has that size), so the same pixels; tensors go to the wrapped
    transform.
    """

    def __init__(self, crop: Any) -> None:
        """``crop``: a timm ``RandomResizedCropAndInterpolation``."""
        self.crop = crop

    def __call__(self, image: PIL.Image.Image | torch.Tensor) -> PIL.Image.Image | torch.Tensor:
        """``image`` -> PIL image of ``crop.size`` (height, width)."""
        if not isinstance(image, PIL.Image.Image):
            return self.crop(image)
        from torchvision.transforms.functional import pil_modes_mapping

        crop = self.crop
        top, left, height, width = crop.get_params(image, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (tuple, list)):
            interpolation = random.choice(interpolation)
        image = image.crop((left, top, left + width, top + height))
        if [height, width] == list(crop.size):
            return image
        return image.resize((crop.size[1], crop.size[0]), pil_modes_mapping.get(interpolation, interpolation))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.crop!r})"


def _direct_uint8_steps(timm_transform: Any) -> Any:
    """Swap, in timm's uint8 training pipeline (a torchvision ``Compose``), the random resized crop for
    :class:`DirectRandomResizedCrop` and the final ``MaybePILToTensor`` for :class:`PILToUInt8Tensor`: the same
    random draws and the same values, less time per sample. Steps of other types are kept as they are."""
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

    steps = timm_transform.transforms
    for index, step in enumerate(steps):
        if type(step) is RandomResizedCropAndInterpolation:
            steps[index] = DirectRandomResizedCrop(step)
        elif type(step) is MaybePILToTensor:
            steps[index] = PILToUInt8Tensor()
    return timm_transform


class UInt8RandomErasing:
    """Random erasing of one rectangle of a (C, H, W) uint8 image, filled with a constant colour (the mean, so that
    it normalises to 0 like timm's ``RandomErasing(mode='const')`` of a normalised image).

    With probability ``probability``: an area of 2% to 1/3 of the image and an aspect ratio log-uniform in
    (0.3, 1/0.3), up to 10 tries to fit it. Draws from Python's ``random`` (the loader's resumable state).
    """

    def __init__(
        self,
        probability: float,
        fill: Sequence[int],
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
    ) -> None:
        self.probability = probability
        self.fill = torch.tensor(list(fill), dtype=torch.uint8).view(-1, 1, 1)
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (np.log(min_aspect), np.log(1 / min_aspect))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """``image`` (C, H, W) uint8, with one rectangle filled (a copy) or unchanged."""
        if self.probability <= 0 or random.random() > self.probability:
            return image
        _, height, width = image.shape
        for _ in range(10):
            area = random.uniform(self.min_area, self.max_area) * height * width
            aspect = float(np.exp(random.uniform(*self.log_aspect)))
            h, w = int(round((area * aspect) ** 0.5)), int(round((area / aspect) ** 0.5))
            if 0 < h < height and 0 < w < width:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                image = image.clone()
                image[:, top : top + h, left : left + w] = self.fill
                return image
        return image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.probability}, fill={self.fill.flatten().tolist()})"


class TrainNormalizer:
    """On the device: (B, C, H, W) uint8 training batches -> float32 ``(x / 255 - mean) / std``, the same operations
    (and so the same values) as ToTensor + Normalize in the loader. Float batches pass unchanged."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.is_floating_point():
            return pixel_values
        if self.mean.device != pixel_values.device:
            self.mean, self.std = self.mean.to(pixel_values.device), self.std.to(pixel_values.device)
        return pixel_values.to(torch.float32).div(255).sub(self.mean).div(self.std)


def create_train_normalizer(args: DataArguments, num_channels: int = 3) -> TrainNormalizer | None:
    """The device-side normalisation of uint8 training batches, or None when the loader normalises."""
    if not args.uint8_transfer:
        return None
    preprocessing = resolve_preprocessing(args, num_channels)
    return TrainNormalizer(preprocessing.mean, preprocessing.std)


class _Compose:
    """Picklable composition of callables (used so DataLoader workers can receive the transform)."""

    def __init__(self, steps: Sequence[Callable[[Any], Any]]) -> None:
        """``steps``: callables applied in order."""
        self.steps = list(steps)

    def __call__(self, value: Any) -> Any:
        """Apply every step in order."""
        for step in self.steps:
            value = step(value)
        return value

    def __repr__(self) -> str:
        """Readable form listing the steps."""
        return "Compose(" + ", ".join(repr(step) for step in self.steps) + ")"


def create_train_transform(args: DataArguments, num_channels: int = 3) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Training augmentation: mode conversion, then timm's ``create_transform(is_training=True)``.

    RandomResizedCrop(input_size, scale, ratio, interpolation) -> horizontal flip -> RandAugment (``args.aa``)
    -> ToTensor -> Normalize -> RandomErasing(``args.reprob``). Color jitter only when ``args.color_jitter``
    is set and ``aa`` is disabled. With ``args.uint8_transfer`` the result stays uint8 (no ToTensor scaling, no
    Normalize; the erased rectangle gets the mean colour, which normalises to 0 as timm's erasing) and
    :class:`TrainNormalizer` finishes it on the device; that path crops with :class:`DirectRandomResizedCrop` and
    ends with :class:`PILToUInt8Tensor` (timm's random draws and values, less time per sample).

    Returns:
        A callable mapping any PIL image to a tensor of shape (num_channels, input_size, input_size): float32, or
        uint8 with ``args.uint8_transfer``.
    """
    from timm.data import create_transform

    preprocessing = resolve_preprocessing(args, num_channels)
    # uint8: timm stops before ToTensor/Normalize (mean still sets RandAugment's fill) and erasing is done here.
    finish = {"normalize": False} if args.uint8_transfer else {"re_prob": args.reprob}
    timm_transform = create_transform(
        input_size=preprocessing.input_size,
        is_training=True,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        color_jitter=args.color_jitter if args.color_jitter else None,
        auto_augment=_auto_augment(args.aa),
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,
        std=preprocessing.std,
        **finish,
    )
    if args.uint8_transfer:
        timm_transform = _direct_uint8_steps(timm_transform)
    steps = [ConvertImageMode(num_channels), timm_transform]
    if args.uint8_transfer and args.reprob > 0:
        steps.append(UInt8RandomErasing(args.reprob, tuple(round(255 * value) for value in preprocessing.mean)))
    return _Compose(steps)


def eval_transform(preprocessing: Preprocessing) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """The deterministic evaluation transform of ``preprocessing``: mode conversion, Resize(input_size / crop_pct)
    + CenterCrop(input_size) -> ToTensor -> Normalize, the values of timm's ``create_transform(is_training=False)``.

    It is the saved image processor's own transform (:class:`~simlap_hf.image_processing_simlap.EvalTransform`), so
    a model folder preprocesses exactly like evaluation, with or without SimLAP-HF installed.

    Returns:
        A callable mapping any PIL image to a float tensor of shape (num_channels, input_size, input_size).
    """
    p = preprocessing
    return EvalTransform(p.input_size, p.crop_pct, p.interpolation, p.mean, p.std, p.num_channels)


def create_eval_transform(args: DataArguments, num_channels: int = 3) -> Callable[[PIL.Image.Image], torch.Tensor]:
    """Deterministic evaluation transform: mode conversion, Resize(input_size / crop_pct) + CenterCrop(input_size).

    For input 32 and crop_pct 0.875: Resize(36, bicubic) -> CenterCrop(32) -> ToTensor -> Normalize.

    Returns:
        A callable mapping any PIL image to a float tensor of shape (num_channels, input_size, input_size).
    """
    return eval_transform(resolve_preprocessing(args, num_channels))
