"""Test-wide settings: no test may reach the network; caches go to a temporary folder."""

import os
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "simlap_hf_test_cache", "datasets"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

TINY_CLASSES = ("red", "green", "blue", "gray")


def write_image_folder(root, images_per_class: int = 12, size: int = 16, seed: int = 0) -> str:
    """An image-folder tree of 4 colour classes (noisy solid colours), easy to learn: root/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    colours = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "gray": (128, 128, 128)}
    for name in TINY_CLASSES:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(images_per_class):
            noise = rng.integers(-30, 30, size=(size, size, 3))
            pixels = np.clip(np.array(colours[name]) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return str(root)


@pytest.fixture
def tiny_image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")
