"""Image folders and splits above ``EAGER_CHECK_MAX_IMAGES`` are not decoded when loaded: an unreadable image is
reported when it is met, and with ``--skip_corrupt_images`` replaced in its batch by a readable image of that batch,
with that image's label.

The limit is lowered to 8 so that the folders stay tiny; at or below the limit the checks at load time of
tests/test_data.py::test_corrupt_imagefolder_file and ::test_corrupt_embedded_image apply.
"""

from __future__ import annotations

import io
import logging
import random
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import tiny_run_flags, write_image_folder

import simlap_hf.data.images as images_module
import simlap_hf.data.loaders as loaders_module
import train_pretrain
from simlap_hf.data import DataArguments, ImageTransform, create_train_transform, load_image_dataset
from simlap_hf.data.images import check_image_files, image_file_checks_done, list_image_files

LIMIT = 8


@pytest.fixture(autouse=True)
def _small_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A limit of 8 images, and a datasets cache of the test's own."""
    monkeypatch.setattr(images_module, "EAGER_CHECK_MAX_IMAGES", LIMIT)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")


def _folder_with_a_truncated_file(tmp_path: Path, images_per_class: int = 3) -> tuple[Path, Path]:
    """An image folder of 4 classes x ``images_per_class`` images, red/0.png cut short (it does not decode)."""
    folder = Path(write_image_folder(tmp_path / "images", images_per_class=images_per_class))
    truncated = folder / "red" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:30])
    return folder, truncated


def _count_opened(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every ``PIL.Image.open`` call from now on (by this package or by datasets) is recorded in the returned list."""
    opened: list[Any] = []
    original = PIL.Image.open

    def counting_open(fp: Any, *args: Any, **kwargs: Any) -> PIL.Image.Image:
        opened.append(fp)
        return original(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    return opened


@pytest.mark.parametrize("skip", [False, True])
def test_a_folder_above_the_limit_is_loaded_without_decoding_an_image(tmp_path, monkeypatch, caplog, skip) -> None:
    folder, _ = _folder_with_a_truncated_file(tmp_path)  # 12 images
    opened = _count_opened(monkeypatch)
    args = DataArguments(train_dir=str(folder), train_val_split=0.25, skip_corrupt_images=skip)
    with caplog.at_level(logging.INFO, logger="simlap_hf.data"):
        data = load_image_dataset(args)
    assert opened == []
    assert len(data["train"]) + len(data["validation"]) == 12  # the unreadable file is still there
    assert "holds 12 images, more than 8: they are not decoded before training" in caplog.text
    assert ("replaced in its batch" if skip else "stops the run with an error naming it") in caplog.text


@pytest.mark.parametrize("skip", [False, True])
def test_a_folder_at_the_limit_is_still_decoded_when_loaded(tmp_path, monkeypatch, caplog, skip) -> None:
    folder, truncated = _folder_with_a_truncated_file(tmp_path, images_per_class=2)  # 8 images
    args = DataArguments(train_dir=str(folder), train_val_split=0.25, skip_corrupt_images=skip)
    if not skip:
        with pytest.raises(ValueError, match=r"1 unreadable image file\(s\).*0\.png.*--skip_corrupt_images"):
            load_image_dataset(args)
        return
    with caplog.at_level(logging.INFO, logger="simlap_hf.data"):
        data = load_image_dataset(args)
    assert len(data["train"]) + len(data["validation"]) == 7
    assert "Skipped 1 corrupt image(s)" in caplog.text and str(truncated) in caplog.text
    assert "not decoded before training" not in caplog.text


def test_other_processes_of_a_machine_still_skip_the_checks(tmp_path, monkeypatch, caplog) -> None:
    folder, _ = _folder_with_a_truncated_file(tmp_path, images_per_class=2)  # 8 images: checked on the first process
    files = list_image_files(folder)
    opened = _count_opened(monkeypatch)
    with pytest.raises(ValueError, match="unreadable image file"):
        check_image_files(files, str(folder))
    assert len(opened) == 8
    opened.clear()
    with caplog.at_level(logging.INFO, logger="simlap_hf.data"), image_file_checks_done():
        check_image_files(files, str(folder))
        check_image_files(list_image_files(folder) * 2, str(folder))  # above the limit: not even the log line
    assert opened == [] and caplog.text == ""


def test_an_unreadable_image_above_the_limit_stops_the_run_when_met(tmp_path) -> None:
    folder, truncated = _folder_with_a_truncated_file(tmp_path)
    with pytest.raises(ValueError, match=r"Could not decode image .*--skip_corrupt_images") as error:
        train_pretrain.run(tiny_run_flags(tmp_path / "run", folder, num_train_epochs=1))
    assert str(truncated) in str(error.value)
    assert "unreadable image file(s)" not in str(error.value)  # met in training, not refused when loaded


def test_an_unreadable_image_above_the_limit_is_replaced_when_met_with_the_flag(tmp_path, caplog) -> None:
    folder, truncated = _folder_with_a_truncated_file(tmp_path)
    flags = tiny_run_flags(tmp_path / "run", folder, num_train_epochs=1) + ["--skip_corrupt_images"]
    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        _, results = train_pretrain.run(flags)
    assert results["global_step"] == 2  # 9 training images, 4 per batch: nothing dropped
    warnings = [record.getMessage() for record in caplog.records if "Unreadable image" in record.getMessage()]
    assert warnings and all(str(truncated) in message for message in warnings)


# ----------------------------------------------------------------------------------------------------------------
# ImageTransform, directly


def _png(label: int) -> dict[str, Any]:
    """An image whose grey level encodes ``label``, stored as PNG bytes with a path."""
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (6, 5), (40 * (label + 1),) * 3).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": f"label{label}.png"}


def _broken(name: str) -> dict[str, Any]:
    return {"bytes": b"not an image", "path": name}


def _pixels(image: PIL.Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def test_unreadable_rows_take_the_next_readable_image_with_its_label(monkeypatch, caplog) -> None:
    decoded: list[Any] = []
    original = loaders_module.decode_image

    def counting_decode(value: Any, index: int) -> PIL.Image.Image:
        decoded.append(value["path"])
        return original(value, index)

    monkeypatch.setattr(loaders_module, "decode_image", counting_decode)
    a, b, bad, bad_last = _png(0), _png(1), _broken("bad.png"), _broken("bad_last.png")
    # bad.png's copies take the next row (b, label 1); the last row wraps around to the first (a, label 0).
    batch = {"image": [a, a, bad, bad, b, bad_last], "label": [0, 0, 3, 3, 1, 2]}
    transform = ImageTransform(_pixels, skip_corrupt_images=True)
    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        out = transform(batch)
    assert out["labels"] == [0, 0, 1, 1, 1, 0]
    assert [int(pixels[0, 0, 0]) // 40 - 1 for pixels in out["pixel_values"]] == out["labels"]
    assert decoded == ["label0.png", "bad.png", "label1.png", "bad_last.png"]  # each distinct image once
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 2
    assert "'bad.png'" in messages[0] and "'label1.png'" in messages[0] and "label 1" in messages[0]
    assert "'bad_last.png'" in messages[1] and "'label0.png'" in messages[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        assert transform(batch)["labels"] == [0, 0, 1, 1, 1, 0]
    assert caplog.records == []  # each file is named once


def test_without_the_flag_or_without_a_readable_image_the_batch_fails() -> None:
    batch = {"image": [_png(0), _broken("bad.png")], "label": [0, 1]}
    with pytest.raises(ValueError, match=r"Could not decode image 'bad\.png'.*--skip_corrupt_images"):
        ImageTransform(_pixels)(batch)
    only_bad = {"image": [_broken("bad.png"), _broken("worse.png")], "label": [0, 1]}
    with pytest.raises(ValueError, match=r"Every image of a batch of 2 is unreadable \('bad\.png', 'worse\.png'\)"):
        ImageTransform(_pixels, skip_corrupt_images=True)(only_bad)


def _augment(batch: dict[str, list[Any]], skip: bool, seed: int = 3) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Random training augmentations of ``batch`` from a fixed seed; the torch RNG state they leave."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    args = DataArguments(input_size=8, aa="rand-m9-mstd0.5", reprob=0.5)
    out = ImageTransform(create_train_transform(args), skip_corrupt_images=skip)(batch)
    return out["pixel_values"], torch.get_rng_state()


def test_replacing_draws_no_extra_random_numbers() -> None:
    clean = {"image": [_png(0), _png(1), _png(1), _png(2)], "label": [0, 1, 1, 2]}
    without, state_without = _augment(clean, skip=False)
    with_flag, state_with = _augment(clean, skip=True)
    assert all(torch.equal(x, y) for x, y in zip(without, with_flag, strict=True))
    assert torch.equal(state_without, state_with)
    broken = {"image": [_png(0), _broken("bad.png"), _broken("bad.png"), _png(2)], "label": [0, 1, 1, 2]}
    replaced, state_replaced = _augment(broken, skip=True)
    assert torch.equal(state_replaced, state_without)  # the same draws, so the next batches do not change
    assert torch.equal(replaced[0], without[0])
