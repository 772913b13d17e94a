"""One preprocessing for a model: the evaluation transform, the saved image processor and the timm export all take
their values from ``simlap_hf.data.resolve_preprocessing`` and so agree on every image."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor

import simlap_hf  # noqa: F401  (registers SimLAPImageProcessor with AutoImageProcessor)
from simlap_hf import SimLAPConfig, SimLAPForImageClassification
from simlap_hf.data import (
    DataArguments,
    Preprocessing,
    create_eval_transform,
    create_train_normalizer,
    processor_preprocessing,
    resolve_preprocessing,
    save_image_processor,
)
from simlap_hf.data.transforms import ConvertImageMode
from simlap_hf.export import export_preprocessing, export_timm

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def _random_images(seed: int = 0) -> list[PIL.Image.Image]:
    """Odd sizes (neither square nor a multiple of the input size), one whose short edge already has the resize
    size, in the modes a data set may hold."""
    rng = np.random.default_rng(seed)
    rgb = [
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((37, 53), (64, 40), (36, 41))
    ]
    gray = PIL.Image.fromarray(rng.integers(0, 256, (53, 37), dtype=np.uint8))
    palette = rgb[0].convert("P")
    rgba = PIL.Image.fromarray(rng.integers(0, 256, (29, 45, 4), dtype=np.uint8))
    return [*rgb, gray, palette, rgba]


def _timm_eval_transform(preprocessing: Preprocessing):
    """The reference: timm's own evaluation transform after the mode conversion (what training used before the
    image processor computed it)."""
    from timm.data import create_transform

    timm_transform = create_transform(
        input_size=preprocessing.input_size,
        is_training=False,
        crop_pct=preprocessing.crop_pct,
        interpolation=preprocessing.interpolation,
        mean=preprocessing.mean,
        std=preprocessing.std,
    )
    convert = ConvertImageMode(preprocessing.num_channels)
    return lambda image: timm_transform(convert(image))


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize(("input_size", "crop_pct"), [(32, 0.875), (32, 1.0), (32, 0.95), (24, 0.9), (16, 0.5)])
def test_saved_processor_equals_eval_transform(
    tmp_path: Path, num_channels: int, interpolation: str, input_size: int, crop_pct: float
):
    args = DataArguments(dataset_name="cifar10", input_size=input_size, interpolation=interpolation, crop_pct=crop_pct)
    save_image_processor(tmp_path, args, num_channels)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["auto_map"] == {"AutoImageProcessor": "image_processing_simlap.SimLAPImageProcessor"}
    assert (tmp_path / "image_processing_simlap.py").is_file()
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(processor).__name__ == "SimLAPImageProcessor"
    assert processor_preprocessing(processor) == resolve_preprocessing(args, num_channels)

    images = _random_images()
    reference = _timm_eval_transform(resolve_preprocessing(args, num_channels))
    expected = torch.stack([reference(image) for image in images])
    got = processor(images)["pixel_values"]
    assert got.shape == expected.shape == (len(images), num_channels, input_size, input_size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # Training evaluates with the processor's transform.
    transform = create_eval_transform(args, num_channels)
    torch.testing.assert_close(torch.stack([transform(image) for image in images]), expected, rtol=0, atol=1e-6)
    as_arrays = processor([np.asarray(image) for image in images[:2]])["pixel_values"]
    torch.testing.assert_close(as_arrays, expected[:2], rtol=0, atol=1e-6)


def test_one_channel_cifar_with_bilinear_resize_is_saved_as_evaluated(tmp_path: Path):
    """A grayscale model on CIFAR-10: the colour statistics are averaged, and the saved file says so."""
    args = DataArguments(dataset_name="cifar10", interpolation="bilinear")
    preprocessing = resolve_preprocessing(args, 1)
    assert preprocessing.interpolation == "bilinear" and preprocessing.num_channels == 1
    assert preprocessing.mean == pytest.approx((sum(CIFAR_MEAN) / 3,))
    assert preprocessing.mean[0] == pytest.approx(0.4734, abs=1e-4)
    assert preprocessing.std == pytest.approx((sum(CIFAR_STD) / 3,))
    save_image_processor(tmp_path, args, 1)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["interpolation"] == "bilinear" and saved["resample"] == 2
    assert saved["image_mean"] == list(preprocessing.mean) and saved["image_std"] == list(preprocessing.std)
    assert saved["size"] == {"shortest_edge": 32} and saved["crop_pct"] == 0.875 and saved["num_channels"] == 1
    normalizer = create_train_normalizer(args, 1)
    assert normalizer.mean.flatten().tolist() == pytest.approx(list(preprocessing.mean))


def test_resolver_rules() -> None:
    three = resolve_preprocessing(DataArguments(dataset_name="fashion_mnist", mean=[0.5], std=[0.25]), 3)
    assert three.mean == (0.5,) * 3 and three.std == (0.25,) * 3  # one value: replicated
    digits = resolve_preprocessing(DataArguments(dataset_name="digits", input_size=16, crop_pct=1.0), 1)
    assert (digits.input_size, digits.crop_pct, digits.interpolation, digits.num_channels) == (16, 1.0, "bicubic", 1)
    assert digits.mean == pytest.approx((0.3053,)) and digits.std == pytest.approx((0.3759,))  # 3 equal values averaged
    assert digits.timm_config() == {
        "input_size": [1, 16, 16],
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": list(digits.mean),
        "std": list(digits.std),
    }
    with pytest.raises(ValueError, match="mean has 3 values but the images have 2 channels"):
        resolve_preprocessing(DataArguments(dataset_name="cifar10"), 2)


def _tiny_classifier(num_channels: int) -> SimLAPForImageClassification:
    labels = {0: "a", 1: "b", 2: "c"}
    config = SimLAPConfig(
        backbone="resnet10t",
        backbone_kwargs={"stem_type": "deep", "output_stride": 8},
        out_dim=16,
        mlp_dim=32,
        filter_embed_dim=16,
        filter_hidden_dim=16,
        image_size=16,
        num_channels=num_channels,
        id2label=labels,
        label2id={name: i for i, name in labels.items()},
    )
    torch.manual_seed(0)
    return SimLAPForImageClassification(config).eval()


@pytest.mark.parametrize("num_channels", [1, 3])
def test_timm_export_carries_the_resolved_preprocessing(tmp_path: Path, num_channels: int) -> None:
    import timm

    args = DataArguments(dataset_name="cifar10", input_size=16, interpolation="bilinear", crop_pct=0.95)
    source = tmp_path / "model"
    _tiny_classifier(num_channels).save_pretrained(source)
    save_image_processor(source, args, num_channels)
    out = export_timm(source, tmp_path / "timm")

    expected = resolve_preprocessing(args, num_channels)
    cfg = json.loads((out / "config.json").read_text())["pretrained_cfg"]
    assert {key: cfg[key] for key in expected.timm_config()} == expected.timm_config()

    # timm's own transform for the exported model equals evaluation's (after the mode conversion timm leaves out).
    net = timm.create_model(f"local-dir:{out}", pretrained=True)
    data_config = timm.data.resolve_data_config({}, model=net)
    timm_transform = timm.data.create_transform(**data_config)
    ours = create_eval_transform(args, num_channels)
    convert = ConvertImageMode(num_channels)
    for image in _random_images(seed=1):
        torch.testing.assert_close(timm_transform(convert(image)), ours(image), rtol=0, atol=1e-5)


def test_export_defaults_and_explicit_statistics_follow_the_resolver() -> None:
    config = _tiny_classifier(1).config
    # Three colour statistics for a grayscale model are averaged, as for training; unset values are the defaults.
    exported = export_preprocessing(config, mean=list(CIFAR_MEAN), std=list(CIFAR_STD))
    assert exported == resolve_preprocessing(DataArguments(dataset_name="cifar10", input_size=16), 1)
    explicit = export_preprocessing(config, mean=[0.3], std=[0.4], crop_pct=1.0, interpolation="bilinear")
    assert explicit == Preprocessing(16, 1.0, "bilinear", (0.3,), (0.4,), 1)
    with pytest.raises(ValueError, match="needs the normalisation"):
        export_preprocessing(config)
