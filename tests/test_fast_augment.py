"""The uint8 training path's own steps give timm's values from timm's random draws."""

import random

import numpy as np
import PIL.Image
import pytest
import torch
from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation

from simlap_hf.data import DataArguments, create_train_transform
from simlap_hf.data.preprocessing import resolve_preprocessing
from simlap_hf.data.transforms import DirectRandomResizedCrop, PILToUInt8Tensor


def _images(mode: str, sizes: list[tuple[int, int]]) -> list[PIL.Image.Image]:
    """Smooth random images (width, height) in ``mode``."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in sizes:
        coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
        images.append(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR).convert(mode))
    return images


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "1"])
def test_pil_to_uint8_tensor_equals_pil_to_tensor_and_is_contiguous(mode: str) -> None:
    for image in _images(mode, [(32, 32), (37, 21), (1, 5), (160, 131)]):  # both sides of plane_by_plane_pixels
        expected = MaybePILToTensor()(image)
        out = PILToUInt8Tensor()(image)
        assert out.is_contiguous() and out.dtype == expected.dtype and torch.equal(out, expected)
    tensor = torch.zeros(3, 4, 4, dtype=torch.uint8)
    assert PILToUInt8Tensor()(tensor) is tensor


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "random"])
def test_direct_random_resized_crop_equals_timm_with_the_same_draws(interpolation: str) -> None:
    crop = RandomResizedCropAndInterpolation((24, 20), scale=(0.08, 1.0), interpolation=interpolation)
    direct = DirectRandomResizedCrop(crop)
    images = _images("RGB", [(32, 32), (20, 24), (50, 17), (8, 8)]) * 5
    random.seed(5)
    expected = [np.asarray(crop(image)) for image in images]
    after_timm = random.random()
    random.seed(5)
    out = [np.asarray(direct(image)) for image in images]
    assert random.random() == after_timm  # the same number of draws
    assert all(np.array_equal(a, b) for a, b in zip(out, expected))
    assert "scale=(0.08, 1.0)" in repr(direct)


def test_uint8_pipeline_equals_timm_pipeline_draw_for_draw() -> None:
    """The whole uint8 training transform against timm's own steps, same seeds: the same tensors and RNG states."""
    from timm.data import create_transform

    images = _images("RGB", [(48, 40)] * 12)
    args = DataArguments(input_size=32, aa="rand-m9-mstd0.5-inc1", reprob=0.0, uint8_transfer=True)
    ours = create_train_transform(args)
    assert "DirectRandomResizedCrop(" in repr(ours) and "PILToUInt8Tensor()" in repr(ours)
    preprocessing = resolve_preprocessing(args, 3)
    timm_steps = create_transform(
        input_size=preprocessing.input_size,
        is_training=True,
        scale=tuple(args.scale),
        ratio=tuple(args.ratio),
        hflip=args.hflip,
        auto_augment=args.aa,
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,
        std=preprocessing.std,
        normalize=False,
    )
    outputs, states = [], []
    for transform in (ours, timm_steps):
        random.seed(11), np.random.seed(11), torch.manual_seed(11)
        outputs.append(torch.stack([transform(image) for image in images]))
        states.append((random.random(), np.random.random(), torch.rand(1).item()))
    assert torch.equal(outputs[0], outputs[1]) and states[0] == states[1]
