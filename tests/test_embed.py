"""Feature extraction of saved models (image processor, pipeline, get_image_features) and ``simlap_hf.embed``."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, pipeline

import simlap_hf  # noqa: F401  (registers the models and the image processor)
from simlap_hf import (
    SimLAPConfig,
    SimLAPForImageClassification,
    SimLAPFuseConfig,
    SimLAPFuseForImageClassification,
    SimLAPImageProcessor,
    SimLAPModel,
)
from simlap_hf.data import DataArguments, create_eval_transform, save_image_processor

LABELS = {0: "a", 1: "b", 2: "c"}
TINY = dict(
    backbone="resnet10t",
    backbone_kwargs={"stem_type": "deep", "output_stride": 8},
    image_size=16,
    id2label=LABELS,
    label2id={v: k for k, v in LABELS.items()},
)


def random_image(height: int, width: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if mode == "RGB" else (height, width)
    image = Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return image if mode in ("RGB", "L") else image.convert(mode)


def saved_model(kind: str, folder: Path, num_channels: int = 3) -> torch.nn.Module:
    """An untrained model of each kind saved as the training scripts save it (weights, config, processor)."""
    torch.manual_seed(0)
    if kind == "pretrained":
        model = SimLAPModel(SimLAPConfig(out_dim=16, mlp_dim=32, num_channels=num_channels, **TINY))
    elif kind == "finetuned":
        model = SimLAPForImageClassification(SimLAPConfig(num_channels=num_channels, **TINY))
    else:
        model = SimLAPFuseForImageClassification(SimLAPFuseConfig(head_dim=512, num_channels=num_channels, **TINY))
    model.eval().save_pretrained(folder)
    save_image_processor(folder, DataArguments(dataset_name="digits", input_size=16), num_channels)
    return model


@pytest.mark.parametrize("kind", ["pretrained", "finetuned", "fuse"])
def test_feature_extraction_pipeline_returns_pooled_backbone_features(kind, tmp_path):
    folder = tmp_path / kind
    model = saved_model(kind, folder)
    assert json.loads((folder / "preprocessor_config.json").read_text())["image_processor_type"] == (
        "SimLAPImageProcessor"
    )
    extractor = pipeline("image-feature-extraction", model=str(folder))
    # AutoModel: a SimLAP configuration (pretrained or fine-tuned folder) gives SimLAPModel (a fine-tuned folder's
    # projector, filter and online head are then new), a Fuse configuration its backbone alone.
    assert (
        type(extractor.model).__name__
        == {"pretrained": "SimLAPModel", "finetuned": "SimLAPModel", "fuse": "SimLAPFuseModel"}[kind]
    )
    processor = AutoImageProcessor.from_pretrained(folder)
    assert isinstance(processor, SimLAPImageProcessor)
    images = [random_image(21, 19, seed=1), random_image(8, 8, "L", seed=2)]  # colour and grayscale inputs
    for image in images:
        features = torch.tensor(extractor(image))[0]
        inputs = processor(image)
        with torch.no_grad():
            expected = model(**inputs).pooler_output[0]
            assert torch.equal(model.get_image_features(inputs["pixel_values"])[0], expected)
        assert features.shape == (model.backbone.num_features,)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the public outputs are all still there
            out = model(**inputs)
        assert out.logits.shape == (1, 3)


def test_pretrained_output_starts_with_features_and_keeps_named_fields():
    model = SimLAPModel(SimLAPConfig(out_dim=16, mlp_dim=32, **TINY)).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        assert torch.equal(out[0], out.pooler_output)
        assert out.logits.shape == (2, 3) and out.embeddings.shape == (2, 16)
        trained = model.train()(x, labels=torch.tensor([0, 1]))
    assert trained.loss.ndim == 0 and trained.logits.shape == (2, 3)


@pytest.mark.parametrize("num_channels", [1, 3])
@pytest.mark.parametrize("mode,size", [("RGB", (21, 19)), ("L", (8, 8)), ("P", (30, 40)), ("RGBA", (17, 17))])
def test_image_processor_equals_eval_transform(num_channels, mode, size, tmp_path):
    args = DataArguments(dataset_name="digits", input_size=16, interpolation="bilinear", crop_pct=0.9)
    save_image_processor(tmp_path, args, num_channels)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    transform = create_eval_transform(args, num_channels)
    image = random_image(*size, mode=mode, seed=3)
    pixels = processor(image)["pixel_values"]
    assert pixels.shape == (1, num_channels, 16, 16)
    assert torch.equal(pixels[0], transform(image))
    batch = processor([image, image], return_tensors="np")["pixel_values"]
    assert batch.shape == (2, num_channels, 16, 16)


def test_image_processor_rejects_bad_input():
    processor = SimLAPImageProcessor(size=16, image_mean=[0.5], image_std=[0.5], num_channels=1)
    with pytest.raises(TypeError, match="PIL images or numpy arrays"):
        processor("some/file.png")
    with pytest.raises(ValueError, match="image_mean and image_std need 3 values"):
        SimLAPImageProcessor(size=16, image_mean=[0.5], image_std=[0.5], num_channels=3)
