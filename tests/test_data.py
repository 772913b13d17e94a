"""Tests of simlap_hf.data: every source kind to the standard form, transforms, sampler, loaders, errors.

All fixtures are written into ``tmp_path``; the ``datasets`` cache is redirected there too. Runs offline.
"""

import io
import logging
import os
import struct
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import write_idx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import BatchSampler

from simlap_hf.data import (
    FASHION_MNIST_LABEL_NAMES,
    ClassBalancedBatchSampler,
    DataArguments,
    RepeatedAugmentationBatchSampler,
    RepeatedAugmentationSampler,
    ResumableAugmentations,
    capture_rng_state,
    collate_fn,
    create_eval_dataloader,
    create_eval_transform,
    create_train_dataloader,
    create_train_transform,
    get_label_names,
    load_image_dataset,
    read_idx,
    resolve_mean_std,
    with_image_transforms,
)

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


# ------------------------------------------------------------------------------------------------------------
# Helpers and fixtures
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Send the datasets cache into tmp_path and make sure no test reaches the Hub."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    return cache


def _files_under(path: Path) -> list[Path]:
    """All files below ``path`` (empty when it does not exist)."""
    return [p for p in path.rglob("*") if p.is_file()] if path.exists() else []


def _color_image(label: int, size: tuple[int, int] = (12, 10), mode: str = "RGB") -> PIL.Image.Image:
    """An image whose pixel values encode its label (so label/image pairing can be checked)."""
    value = 40 * (label + 1)
    return PIL.Image.new(mode, size, (value, value, value) if mode == "RGB" else value)


def _png_bytes(image: PIL.Image.Image) -> bytes:
    """PNG-encoded bytes of ``image``."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_dataset(
    labels: list[Any],
    image_column: str = "image",
    label_column: str = "label",
    label_feature: Any | None = None,
    extra: bool = False,
) -> datasets.Dataset:
    """In-memory Dataset with an Image column; the label feature defaults to what datasets infers."""
    as_int = [i if isinstance(i, int) else 0 for i in labels]
    columns: dict[str, list[Any]] = {
        image_column: [_color_image(i % 5) for i in as_int],
        label_column: labels,
    }
    features = {image_column: datasets.Image()}
    if label_feature is not None:
        features[label_column] = label_feature
    if extra:
        columns["note"] = [f"row {i}" for i in range(len(labels))]
        features["note"] = datasets.Value("string")
    inferred = datasets.Dataset.from_dict(columns).features
    inferred.update(features)
    return datasets.Dataset.from_dict(columns, features=inferred)


def _write_idx_folder(folder: Path, compress: bool, n_train: int = 30, n_test: int = 10, classes: int = 4) -> dict:
    """Write train/t10k IDX image+label pairs (6x5 uint8 images) into ``folder``; return the arrays."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if compress else ""
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 6, 5), dtype=np.uint8)
        labels = (np.arange(n) % classes).astype(np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
        arrays[prefix] = (images, labels)
    return arrays


def _write_imagefolder(root: Path, per_class: int = 6, classes: tuple[str, ...] = ("cat", "dog", "emu")) -> None:
    """Write an imagefolder tree root/<class>/<class>_<i>.png with images encoding the class."""
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _color_image(index, size=(12 + i, 10)).save(root / name / f"{name}_{i}.png")


def _assert_standard(ds: datasets.DatasetDict, names: list[str] | None = None) -> None:
    """Check the standard form: train/validation, columns image (Image) + label (ClassLabel)."""
    assert isinstance(ds, datasets.DatasetDict)
    assert set(ds) == {"train", "validation"}
    for split in ds.values():
        assert split.column_names == ["image", "label"]
        assert isinstance(split.features["image"], datasets.Image)
        assert isinstance(split.features["label"], datasets.ClassLabel)
        assert len(split) > 0
        row = split[0]
        assert isinstance(row["image"], PIL.Image.Image)
        assert isinstance(row["label"], int)
        assert 0 <= row["label"] < split.features["label"].num_classes
    if names is not None:
        assert get_label_names(ds) == names
        assert ds["validation"].features["label"].names == names


def _labels_match_colors(split: datasets.Dataset) -> None:
    """Images built by _color_image carry their label in the pixel value: check the pairing survived."""
    for row in split:
        value = np.asarray(row["image"].convert("L"))[0, 0]
        assert value == 40 * (row["label"] % 5 + 1)


# ------------------------------------------------------------------------------------------------------------
# Sources -> standard form
# ------------------------------------------------------------------------------------------------------------


def test_digits_default_is_offline_and_stratified() -> None:
    args = DataArguments()
    assert args.dataset_name == "digits"
    ds = load_image_dataset(args, seed=0)
    _assert_standard(ds, [str(i) for i in range(10)])
    assert (len(ds["train"]), len(ds["validation"])) == (1437, 360)
    image = ds["train"][0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    assert np.asarray(image).max() <= 255
    counts = np.bincount(ds["validation"]["label"], minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    again = load_image_dataset(DataArguments(), seed=0)
    assert again["validation"]["label"] == ds["validation"]["label"]
    other = load_image_dataset(DataArguments(), seed=1)
    assert other["validation"]["label"] != ds["validation"]["label"]


def test_imagefolder_train_and_validation(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "train")
    _write_imagefolder(tmp_path / "val", per_class=2)
    args = DataArguments(
        dataset_name="ignored", train_dir=str(tmp_path / "train"), validation_dir=str(tmp_path / "val")
    )
    ds = load_image_dataset(args)
    _assert_standard(ds, ["cat", "dog", "emu"])
    assert (len(ds["train"]), len(ds["validation"])) == (18, 6)
    _labels_match_colors(ds["train"])
    _labels_match_colors(ds["validation"])


def test_imagefolder_without_validation_dir_carves_split(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "train", per_class=10)
    ds = load_image_dataset(DataArguments(train_dir=str(tmp_path / "train"), train_val_split=0.2), seed=3)
    _assert_standard(ds, ["cat", "dog", "emu"])
    assert (len(ds["train"]), len(ds["validation"])) == (24, 6)
    assert sorted(ds["validation"]["label"]) == [0, 0, 1, 1, 2, 2]  # stratified


@pytest.mark.parametrize("as_dict", [True, False])
def test_save_to_disk_with_column_flags(tmp_path: Path, as_dict: bool) -> None:
    train = _image_dataset(list(range(5)) * 4, image_column="picture", label_column="target", extra=True)
    folder = tmp_path / "saved"
    if as_dict:
        test = _image_dataset([0, 1, 2, 3, 4], image_column="picture", label_column="target", extra=True)
        datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(folder))
    else:
        train.save_to_disk(str(folder))
    args = DataArguments(dataset_name=str(folder), image_column_name="picture", label_column_name="target")
    ds = load_image_dataset(args)
    _assert_standard(ds, ["0", "1", "2", "3", "4"])
    assert len(ds["train"]) + len(ds["validation"]) == (25 if as_dict else 20)
    if not as_dict:
        assert len(ds["validation"]) == 2  # train_val_split=0.1 of 20
    _labels_match_colors(ds["train"])


def test_parquet_file_with_string_labels(tmp_path: Path) -> None:
    names = ["zebra", "ant", "moose"]
    labels = [names[i % 3] for i in range(30)]
    ds = _image_dataset(labels)
    ds.to_parquet(str(tmp_path / "data.parquet"))
    loaded = load_image_dataset(DataArguments(dataset_name=str(tmp_path / "data.parquet"), train_val_split=0.2))
    _assert_standard(loaded, ["ant", "moose", "zebra"])  # sorted class names
    assert len(loaded["train"]) == 24 and len(loaded["validation"]) == 6


def test_parquet_folder_with_splits(tmp_path: Path) -> None:
    folder = tmp_path / "pq"
    folder.mkdir()
    _image_dataset([0, 1, 2, 3] * 3).to_parquet(str(folder / "train.parquet"))
    _image_dataset([0, 1, 2, 3]).to_parquet(str(folder / "test.parquet"))
    loaded = load_image_dataset(DataArguments(dataset_name=str(folder)))
    _assert_standard(loaded, ["0", "1", "2", "3"])
    assert (len(loaded["train"]), len(loaded["validation"])) == (12, 4)
    _labels_match_colors(loaded["validation"])


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "raw"])
def test_idx_folder(tmp_path: Path, compress: bool) -> None:
    arrays = _write_idx_folder(tmp_path / "idx", compress)
    ds = load_image_dataset(DataArguments(dataset_name=str(tmp_path / "idx")))
    _assert_standard(ds, ["0", "1", "2", "3"])
    assert (len(ds["train"]), len(ds["validation"])) == (30, 10)
    images, labels = arrays["train"]
    row = ds["train"][7]
    assert row["image"].mode == "L" and row["image"].size == (5, 6)
    np.testing.assert_array_equal(np.asarray(row["image"]), images[7])  # lossless round trip
    assert row["label"] == labels[7]
    np.testing.assert_array_equal(
        read_idx(tmp_path / "idx" / f"t10k-images-idx3-ubyte{'.gz' if compress else ''}"), arrays["t10k"][0]
    )


def test_read_idx_rejects_bad_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad-idx"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(bad)
    short = tmp_path / "short-idx"
    short.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


def test_fashion_mnist_named_uses_local_idx_and_class_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_idx_folder(tmp_path / "fm", compress=True, classes=10)
    monkeypatch.setenv("SIMLAP_FASHION_MNIST_DIR", str(tmp_path / "fm"))
    ds = load_image_dataset(DataArguments(dataset_name="fashion_mnist"))
    _assert_standard(ds, list(FASHION_MNIST_LABEL_NAMES))
    assert len(ds["train"]) == 30


def _hub_like_cifar100() -> datasets.DatasetDict:
    """A DatasetDict shaped like uoft-cs/cifar100: img, fine_label, coarse_label; train/test."""
    fine = datasets.ClassLabel(names=[f"fine{i}" for i in range(6)])
    coarse = datasets.ClassLabel(names=["c0", "c1"])

    def split(n: int) -> datasets.Dataset:
        """One split of ``n`` rows."""
        base = _image_dataset(
            [i % 6 for i in range(n)], image_column="img", label_column="fine_label", label_feature=fine
        )
        return base.add_column("coarse_label", [i % 2 for i in range(n)], feature=coarse)

    return datasets.DatasetDict({"train": split(24), "test": split(12)})


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None]]:
    """Serve a locally built dataset for 'uoft-cs/cifar100' and 'someorg/pets' through datasets.load_dataset."""
    saved = tmp_path / "hub_cifar100"
    _hub_like_cifar100().save_to_disk(str(saved))
    calls: list[tuple[str, str | None]] = []
    real_load = datasets.load_dataset

    def fake_load(path: str, name: str | None = None, *args: Any, **kwargs: Any) -> Any:
        """Stand-in for datasets.load_dataset serving the local Hub-like data set."""
        if path in ("uoft-cs/cifar100", "someorg/pets"):
            calls.append((path, name))
            return datasets.load_from_disk(str(saved))
        return real_load(path, name, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    return calls


def test_named_cifar100_goes_through_hub_path(fake_hub: list) -> None:
    ds = load_image_dataset(DataArguments(dataset_name="cifar100"))
    _assert_standard(ds, [f"fine{i}" for i in range(6)])
    assert (len(ds["train"]), len(ds["validation"])) == (24, 12)
    assert fake_hub == [("uoft-cs/cifar100", None)]
    _labels_match_colors(ds["train"])
    coarse = load_image_dataset(DataArguments(dataset_name="cifar100", dataset_config_name="coarse"))
    _assert_standard(coarse, ["c0", "c1"])
    assert fake_hub[-1] == ("uoft-cs/cifar100", None)
    with pytest.raises(ValueError, match="'medium'.*coarse"):
        load_image_dataset(DataArguments(dataset_name="cifar100", dataset_config_name="medium"))


def test_arbitrary_hub_id_uses_column_flags(fake_hub: list) -> None:
    with pytest.raises(ValueError, match=r"could not detect the label column.*fine_label.*--label_column_name"):
        load_image_dataset(DataArguments(dataset_name="someorg/pets"))
    ds = load_image_dataset(DataArguments(dataset_name="someorg/pets", label_column_name="coarse_label"))
    _assert_standard(ds, ["c0", "c1"])  # the single Image column 'img' was auto-detected
    assert fake_hub[-1] == ("someorg/pets", None)


def test_unreachable_hub_id_keeps_error_and_adds_fix() -> None:
    with pytest.raises(Exception) as info:  # datasets raises ConnectionError offline
        load_image_dataset(DataArguments(dataset_name="someorg/not-here"))
    # A UsageError naming the id and the way to work offline, or the library's own error with that as a note.
    text = " ".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "'someorg/not-here'" in text and "--train_dir" in text


def test_path_string_image_column_is_cast_to_image(tmp_path: Path) -> None:
    paths = []
    for i in range(8):
        path = tmp_path / f"img{i}.png"
        _color_image(i % 2).save(path)
        paths.append(str(path))
    folder = tmp_path / "paths"
    datasets.Dataset.from_dict({"file": paths, "label": [i % 2 for i in range(8)]}).save_to_disk(str(folder))
    ds = load_image_dataset(DataArguments(dataset_name=str(folder), image_column_name="file", train_val_split=0.25))
    _assert_standard(ds, ["0", "1"])
    _labels_match_colors(ds["train"])


def test_max_samples_are_seeded_prefixes() -> None:
    args = DataArguments(max_train_samples=50, max_eval_samples=20)
    first = load_image_dataset(args, seed=5)
    second = load_image_dataset(args, seed=5)
    assert (len(first["train"]), len(first["validation"])) == (50, 20)
    assert first["train"]["label"] == second["train"]["label"]
    full = load_image_dataset(DataArguments(), seed=5)
    assert set(first["train"]["label"]) <= set(full["train"]["label"])


@pytest.mark.skipif(
    not (REAL_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
    reason="real Fashion-MNIST not installed at /usr/share/datasets/fashion-mnist",
)
@pytest.mark.e2e
def test_real_fashion_mnist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SIMLAP_FASHION_MNIST_DIR", raising=False)
    ds = load_image_dataset(DataArguments(dataset_name="fashion_mnist"))
    assert (len(ds["train"]), len(ds["validation"])) == (60000, 10000)
    assert ds["train"][0]["label"] == 9
    assert get_label_names(ds)[9] == "Ankle boot"
    assert ds["train"][0]["image"].size == (28, 28)


# ------------------------------------------------------------------------------------------------------------
# Sampler and sharding
# ------------------------------------------------------------------------------------------------------------


def test_sampler_repeats_adjacent_and_seeded() -> None:
    sampler = RepeatedAugmentationSampler(10, repeats=3, seed=7)
    order = list(sampler)
    assert len(order) == len(sampler) == 30
    assert sorted(order) == sorted(list(range(10)) * 3)
    assert all(order[i] == order[i + 1] == order[i + 2] for i in range(0, 30, 3))
    assert list(RepeatedAugmentationSampler(10, repeats=3, seed=7)) == order
    sampler.set_epoch(1)
    assert list(sampler) != order
    other = RepeatedAugmentationSampler(10, repeats=3, seed=7)
    other.set_epoch(1)
    assert list(other) == list(sampler)
    torch.manual_seed(123)  # the global RNG must not matter
    other.set_epoch(0)
    assert list(other) == order
    assert list(RepeatedAugmentationSampler(4, repeats=2, shuffle=False)) == [0, 0, 1, 1, 2, 2, 3, 3]


def _shard_batches(
    num_samples: int, batch_size: int, ra: int, shards: int, epoch: int = 0, seed: int = 11
) -> list[list[list[int]]]:
    """Batches of every shard of a BatchSamplerShard over the repeated-augmentation sampler."""
    from accelerate.data_loader import BatchSamplerShard

    per_shard = []
    for index in range(shards):
        sampler = RepeatedAugmentationSampler(num_samples, repeats=ra, seed=seed)
        sampler.set_epoch(epoch)
        batch_sampler = BatchSampler(sampler, batch_size=batch_size, drop_last=True)
        per_shard.append(list(BatchSamplerShard(batch_sampler, num_processes=shards, process_index=index)))
    return per_shard


def test_two_shards_are_disjoint_and_cover_the_data() -> None:
    shards = _shard_batches(num_samples=40, batch_size=12, ra=3, shards=2)  # 120 samples = 10 batches
    images = [{i for batch in shard for i in batch} for shard in shards]
    assert images[0].isdisjoint(images[1])
    assert images[0] | images[1] == set(range(40))
    for shard in shards:
        for batch in shard:
            assert all(batch.count(i) == 3 for i in batch)  # all copies in the same batch


@settings(max_examples=50, deadline=None, database=None)
@given(
    num_samples=st.integers(min_value=1, max_value=60),
    ra=st.integers(min_value=1, max_value=4),
    groups_per_batch=st.integers(min_value=1, max_value=6),
    shards=st.integers(min_value=1, max_value=4),
    epoch=st.integers(min_value=0, max_value=3),
)
def test_sampler_sharding_property(num_samples: int, ra: int, groups_per_batch: int, shards: int, epoch: int) -> None:
    batch_size = ra * groups_per_batch
    # Unsharded epoch: each index exactly ra times, copies adjacent.
    sampler = RepeatedAugmentationSampler(num_samples, repeats=ra, seed=3)
    sampler.set_epoch(epoch)
    order = list(sampler)
    assert sorted(order) == sorted(list(range(num_samples)) * ra)
    assert all(len(set(order[i : i + ra])) == 1 for i in range(0, len(order), ra))
    again = RepeatedAugmentationSampler(num_samples, repeats=ra, seed=3)
    again.set_epoch(epoch)
    assert list(again) == order
    # Sharded: disjoint images, whole copy groups per batch, union = images of the full rounds of batches.
    full_batches = [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rounds = len(full_batches) // shards
    expected = {i for batch in full_batches[: rounds * shards] for i in batch}
    shard_batches = _shard_batches(num_samples, batch_size, ra, shards, epoch, seed=3)
    seen: set[int] = set()
    for batches in shard_batches:
        images = {i for batch in batches for i in batch}
        assert seen.isdisjoint(images)
        seen |= images
        for batch in batches:
            assert len(batch) == batch_size
            assert all(batch.count(i) == ra for i in batch)
    assert seen == expected
    if num_samples * ra % (batch_size * shards) == 0:
        assert seen == set(range(num_samples))


class _IndexDataset(torch.utils.data.Dataset):
    """Rows {"pixel_values": FloatTensor(1, 2, 2) filled with the index, "labels": index}."""

    def __init__(self, n: int) -> None:
        """``n``: number of rows."""
        self.n = n

    def __len__(self) -> int:
        """Number of rows."""
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Row ``index``."""
        return {"pixel_values": torch.full((1, 2, 2), float(index)), "labels": index}


def test_train_dataloader_batches_and_accelerate_sharding() -> None:
    from accelerate.data_loader import prepare_data_loader

    args = DataArguments(ra=3)
    loader = create_train_dataloader(_IndexDataset(24), args, batch_size=6, seed=1)
    assert isinstance(loader.batch_sampler.sampler, RepeatedAugmentationSampler)
    batches = list(loader)
    assert len(batches) == 12
    assert batches[0]["pixel_values"].shape == (6, 1, 2, 2) and batches[0]["labels"].dtype == torch.int64
    seen = []
    for process in range(2):
        shard = prepare_data_loader(loader, num_processes=2, process_index=process, put_on_device=False)
        assert shard.batch_sampler.batch_sampler.sampler is loader.batch_sampler.sampler
        shard.set_epoch(4)
        assert loader.batch_sampler.sampler.epoch == 4
        seen.append({int(i) for batch in shard for i in batch["labels"]})
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(24))


def test_train_dataloader_takes_any_batch_size_with_whole_copy_groups() -> None:
    # The reference's batch 256 with ra=3: 85 images per batch, one of them with a 4th copy.
    loader = create_train_dataloader(_IndexDataset(170), DataArguments(ra=3), batch_size=256, seed=0)
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        counts = torch.bincount(batch["labels"], minlength=170)
        assert batch["labels"].numel() == 256
        assert sorted(counts[counts > 0].tolist()) == [3] * 84 + [4]
    seen = torch.cat([batch["labels"] for batch in batches]).unique()
    assert seen.tolist() == list(range(170))  # every image of the epoch, in one batch each
    loader = create_train_dataloader(_IndexDataset(30), DataArguments(ra=3), batch_size=10)
    assert len(loader) == 10 and all(len(batch["labels"]) == 10 for batch in loader)
    with pytest.raises(ValueError, match="fewer than the 3 images of one batch"):
        create_train_dataloader(_IndexDataset(2), DataArguments(ra=3), batch_size=9)


@settings(max_examples=60, deadline=None, database=None)
@given(
    num_samples=st.integers(min_value=1, max_value=60),
    ra=st.integers(min_value=1, max_value=4),
    batch_size=st.integers(min_value=1, max_value=17),
    shards=st.integers(min_value=1, max_value=3),
    epoch=st.integers(min_value=0, max_value=3),
)
def test_batch_sampler_any_batch_size_property(
    num_samples: int, ra: int, batch_size: int, shards: int, epoch: int
) -> None:
    from accelerate.data_loader import BatchSamplerShard

    sampler = RepeatedAugmentationBatchSampler(num_samples, batch_size, repeats=ra, seed=5)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    images_per_batch = max(1, batch_size // ra)
    assert len(batches) == len(sampler) == num_samples // images_per_batch
    seen: set[int] = set()
    for batch in batches:
        assert len(batch) == batch_size
        images = set(batch)
        assert len(images) == images_per_batch and seen.isdisjoint(images)  # all copies of an image in one batch
        seen |= images
        counts = [batch.count(i) for i in images]
        assert min(counts) >= min(ra, batch_size) and max(counts) - min(counts) <= 1
        assert len(_starts(batch)) == len(images)  # copies adjacent: one run per image
    assert len(seen) == len(batches) * images_per_batch  # coverage: only the incomplete last group is left out
    if batch_size % ra == 0:  # the reference layout: the flat repeated order cut into batches
        flat = RepeatedAugmentationSampler(num_samples, repeats=ra, seed=5)
        flat.set_epoch(epoch)
        order = list(flat)
        assert batches == [order[i * batch_size : (i + 1) * batch_size] for i in range(len(batches))]
    again = RepeatedAugmentationBatchSampler(num_samples, batch_size, repeats=ra, seed=5)
    again.set_epoch(epoch)
    shard_images = [
        {i for b in BatchSamplerShard(again, num_processes=shards, process_index=p) for i in b} for p in range(shards)
    ]
    for p in range(shards):
        for q in range(p):
            assert shard_images[p].isdisjoint(shard_images[q])


def _starts(batch: list[int]) -> list[int]:
    """Start positions of the runs of equal indices in ``batch``."""
    return [i for i in range(len(batch)) if i == 0 or batch[i] != batch[i - 1]]


# ------------------------------------------------------------------------------------------------------------
# Transforms
# ------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rgb_dataset() -> datasets.DatasetDict:
    """Eight random 32x32 RGB images, labels a/b, used as both train and validation."""
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(8)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    split = datasets.Dataset.from_dict({"image": images, "label": [0, 1] * 4}, features=features)
    return datasets.DatasetDict({"train": split, "validation": split})


def test_copies_in_a_batch_are_augmented_independently(rgb_dataset: datasets.DatasetDict) -> None:
    torch.manual_seed(0)
    args = DataArguments(ra=3)
    transformed = with_image_transforms(rgb_dataset, args, augmented_split="train")
    loader = create_train_dataloader(transformed["train"], args, batch_size=6)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["pixel_values"].dtype == torch.uint8
    assert batch["labels"].shape == (6,) and batch["labels"].dtype == torch.int64
    assert batch["labels"][0] == batch["labels"][1] == batch["labels"][2]
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])
    assert not torch.equal(batch["pixel_values"][1], batch["pixel_values"][2])


def test_each_image_is_decoded_once_per_batch_and_augmented_per_copy(rgb_dataset, monkeypatch) -> None:
    import simlap_hf.data.loaders as data_module

    decoded: list[Any] = []
    original = data_module.decode_image

    def counting_decode(value: Any, index: int) -> PIL.Image.Image:
        decoded.append(value)
        return original(value, index)

    monkeypatch.setattr(data_module, "decode_image", counting_decode)
    args = DataArguments(ra=3)
    loader = create_train_dataloader(
        with_image_transforms(rgb_dataset, args, augmented_split="train")["train"], args, batch_size=7
    )
    batch = next(iter(loader))  # 2 images: one with 4 copies, one with 3
    assert len(decoded) == 2 and batch["pixel_values"].shape[0] == 7
    assert not torch.equal(batch["pixel_values"][0], batch["pixel_values"][1])  # copies still augmented apart
    decoded.clear()
    transform = data_module.ImageTransform(create_train_transform(args), decode_once=False)  # the per-copy path
    transform({"image": [{"bytes": _png_bytes(_color_image(0)), "path": None}] * 3, "label": [0] * 3})
    assert len(decoded) == 3


def test_train_dataloader_with_a_worker_process(rgb_dataset: datasets.DatasetDict) -> None:
    args = DataArguments(ra=2, dataloader_num_workers=1)
    transformed = with_image_transforms(rgb_dataset, args, augmented_split="train")
    loader = create_train_dataloader(transformed["train"], args, batch_size=4)
    import pickle

    restored = pickle.loads(pickle.dumps(transformed["train"]))  # spawn-started workers need this
    assert restored[0]["pixel_values"].shape == (3, 32, 32)
    batches = list(loader)
    assert len(batches) == 4  # 8 images x 2 copies / 4
    assert all(b["pixel_values"].shape == (4, 3, 32, 32) for b in batches)
    assert sorted(int(i) for b in batches for i in b["labels"]) == sorted([0, 1] * 8)


def test_eval_transform_is_deterministic_resize_then_center_crop(rgb_dataset: datasets.DatasetDict) -> None:
    args = DataArguments()
    transform = create_eval_transform(args)
    text = repr(transform)
    assert "resize=36 (bicubic)" in text and "center_crop=32" in text
    image = rgb_dataset["validation"][0]["image"]
    first, second = transform(image), transform(image)
    assert first.shape == (3, 32, 32)
    assert torch.equal(first, second)
    transformed = with_image_transforms(rgb_dataset, args)["validation"]
    assert torch.equal(transformed[0]["pixel_values"], first)
    loader = create_eval_dataloader(transformed, batch_size=3)
    sizes = [len(batch["labels"]) for batch in loader]
    assert sizes == [3, 3, 2]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "1", "I;16"])
def test_any_mode_becomes_three_channels(mode: str) -> None:
    if mode == "I;16":
        image = PIL.Image.new("I;16", (20, 24), 100)
    else:
        image = PIL.Image.new("RGB", (20, 24), (10, 200, 30)).convert(mode)
    args = DataArguments(dataset_name="fashion_mnist")
    assert create_train_transform(args)(image).shape == (3, 32, 32)
    assert create_eval_transform(args)(image).shape == (3, 32, 32)
    assert create_eval_transform(args, num_channels=1)(image).shape == (1, 32, 32)
    assert create_train_transform(args, num_channels=1)(image).shape == (1, 32, 32)


def test_grayscale_dataset_rows_and_collate() -> None:
    ds = load_image_dataset(DataArguments(max_train_samples=9, max_eval_samples=4))
    transformed = with_image_transforms(ds, DataArguments())
    row = transformed["train"][0]
    assert set(row) == {"pixel_values", "labels"}
    assert row["pixel_values"].shape == (3, 32, 32) and isinstance(row["labels"], int)
    batch = collate_fn([transformed["validation"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["labels"].tolist() == ds["validation"]["label"]
    assert get_label_names(transformed) == [str(i) for i in range(10)]


def test_aa_none_and_reprob_zero_give_plain_pipeline() -> None:
    text = repr(create_train_transform(DataArguments(aa="none", reprob=0.0)))
    assert "RandAugment" not in text and "RandomErasing" not in text and "ColorJitter" not in text
    text = repr(create_train_transform(DataArguments()))
    assert "RandAugment" in text and "RandomErasing(p=0.1" in text and "scale=(0.7, 1.0)" in text


def test_resolve_mean_std() -> None:
    import timm.data

    assert resolve_mean_std(DataArguments(dataset_name="cifar10")) == (
        (0.4914, 0.4822, 0.4465),
        (0.2470, 0.2435, 0.2616),
    )
    assert resolve_mean_std(DataArguments(dataset_name="uoft-cs/cifar100"))[0] == (0.4914, 0.4822, 0.4465)
    assert resolve_mean_std(DataArguments(dataset_name="fashion_mnist")) == ((0.2860,) * 3, (0.3530,) * 3)
    mean, std = resolve_mean_std(DataArguments(dataset_name="digits"))
    assert len(mean) == len(std) == 3
    unknown = resolve_mean_std(DataArguments(dataset_name="someorg/whatever"))
    imagenet = (tuple(timm.data.IMAGENET_DEFAULT_MEAN), tuple(timm.data.IMAGENET_DEFAULT_STD))
    assert unknown == imagenet
    explicit = resolve_mean_std(DataArguments(dataset_name="cifar10", mean=[0.5, 0.5, 0.5]))
    assert explicit == ((0.5, 0.5, 0.5), (0.2470, 0.2435, 0.2616))
    assert resolve_mean_std(DataArguments(dataset_name="cifar10", train_dir="x")) == imagenet


def test_hf_argument_parser_round_trip() -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        [
            "--dataset_name",
            "cifar10",
            "--scale",
            "0.5",
            "1.0",
            "--mean",
            "0.5",
            "--aa",
            "none",
            "--ra",
            "2",
            "--skip_corrupt_images",
        ]
    )
    assert args.scale == [0.5, 1.0] and args.mean == [0.5] and args.aa == "none" and args.ra == 2
    assert args.skip_corrupt_images is True
    (defaults,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses([])
    assert defaults == DataArguments()


# ------------------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names(_isolated_cache: Path) -> None:
    with pytest.raises(ValueError, match=r"'cifar11'.*cifar10, cifar100, digits, fashion_mnist.*org/name"):
        load_image_dataset(DataArguments(dataset_name="cifar11"))
    assert not _files_under(_isolated_cache)


def test_missing_local_path(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope" / "data")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset(DataArguments(dataset_name=missing))
    with pytest.raises(FileNotFoundError, match=r"--train_dir '.*nope'.*does not exist"):
        load_image_dataset(DataArguments(train_dir=str(tmp_path / "nope")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="contains no image files"):
        load_image_dataset(DataArguments(train_dir=str(empty)))
    with pytest.raises(ValueError, match="holds no supported data"):
        load_image_dataset(DataArguments(dataset_name=str(empty)))


def test_missing_columns_list_columns_and_flag(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    _image_dataset([0, 1] * 5, image_column="picture", label_column="target").save_to_disk(str(folder))
    with pytest.raises(
        ValueError, match=r"image column 'photo' not found.*\['picture', 'target'\].*--image_column_name"
    ):
        load_image_dataset(DataArguments(dataset_name=str(folder), image_column_name="photo"))
    with pytest.raises(ValueError, match=r"label column 'klass' not found.*'target'.*--label_column_name"):
        load_image_dataset(DataArguments(dataset_name=str(folder), label_column_name="klass"))
    with pytest.raises(ValueError, match=r"could not detect the label column.*--label_column_name"):
        load_image_dataset(DataArguments(dataset_name=str(folder)))


def test_bad_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    floats = tmp_path / "floats"
    _image_dataset([0.0, 1.5, 2.0, 1.0]).save_to_disk(str(floats))
    with pytest.raises(ValueError, match=r"label column 'label'.*value 1\.5"):
        load_image_dataset(DataArguments(dataset_name=str(floats)))
    negative = tmp_path / "negative"
    _image_dataset([0, 1, -3, 2]).save_to_disk(str(negative))
    with pytest.raises(ValueError, match=r"label column 'label' has value -3 outside the valid range \[0, 3\)"):
        load_image_dataset(DataArguments(dataset_name=str(negative)))
    unlabeled = tmp_path / "unlabeled"
    _image_dataset([0, 1, -1, 1], label_feature=datasets.ClassLabel(names=["x", "y"])).save_to_disk(str(unlabeled))
    with pytest.raises(ValueError, match=r"value -1 outside the valid range \[0, 2\)"):
        load_image_dataset(DataArguments(dataset_name=str(unlabeled)))
    idx = tmp_path / "idx_twelve_classes"
    _write_idx_folder(idx, compress=False, classes=12)
    monkeypatch.setenv("SIMLAP_FASHION_MNIST_DIR", str(idx))
    with pytest.raises(ValueError, match=r"value 10 outside the valid range \[0, 10\)"):
        load_image_dataset(DataArguments(dataset_name="fashion_mnist"))


def test_empty_split(tmp_path: Path) -> None:
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": _image_dataset([0, 1] * 3), "test": _image_dataset([0, 1]).select([])}).save_to_disk(
        str(folder)
    )
    with pytest.raises(ValueError, match="split 'test' is empty"):
        load_image_dataset(DataArguments(dataset_name=str(folder)))
    # A validation split that only holds corrupt images is empty once they are skipped.
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    broken = datasets.Dataset.from_dict(
        {"image": [{"bytes": b"not an image", "path": None}] * 2, "label": [0, 1]}, features=features
    )
    corrupt_only = tmp_path / "corrupt_only"
    datasets.DatasetDict({"train": _image_dataset([0, 1] * 3).cast(features), "test": broken}).save_to_disk(
        str(corrupt_only)
    )
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        load_image_dataset(DataArguments(dataset_name=str(corrupt_only), skip_corrupt_images=True))


def test_corrupt_imagefolder_file(tmp_path: Path, caplog: pytest.LogCaptureFixture, _isolated_cache: Path) -> None:
    _write_imagefolder(tmp_path / "train", per_class=5)
    broken = tmp_path / "train" / "dog" / "broken.png"
    broken.write_bytes(_png_bytes(_color_image(1))[:40])  # truncated PNG
    (tmp_path / "train" / "cat" / "text.jpg").write_bytes(b"this is not a jpeg")
    args = DataArguments(train_dir=str(tmp_path / "train"))
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\).*broken\.png.*--skip_corrupt_images"):
        load_image_dataset(args)
    assert not _files_under(_isolated_cache)  # nothing built before the error
    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        ds = load_image_dataset(DataArguments(train_dir=str(tmp_path / "train"), skip_corrupt_images=True))
    assert len(ds["train"]) + len(ds["validation"]) == 15
    assert "Skipped 2 corrupt image(s)" in caplog.text and "broken.png" in caplog.text


def test_corrupt_embedded_image(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    good = _png_bytes(_color_image(0))
    rows = [{"bytes": good, "path": f"img{i}.png"} for i in range(10)]
    rows[3] = {"bytes": b"garbage", "path": "bad3.png"}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"image": rows, "label": [0, 1] * 5}, features=features).save_to_disk(str(folder))
    ds = load_image_dataset(DataArguments(dataset_name=str(folder), train_val_split=0.5), seed=0)
    transformed = with_image_transforms(ds, DataArguments())
    with pytest.raises(ValueError, match=r"Could not decode image 'bad3\.png'.*--skip_corrupt_images"):
        for split in transformed.values():
            for i in range(len(split)):
                split[i]
    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        skipped = load_image_dataset(DataArguments(dataset_name=str(folder), skip_corrupt_images=True))
    assert len(skipped["train"]) + len(skipped["validation"]) == 9
    assert "Skipped 1 corrupt image(s)" in caplog.text and "bad3.png" in caplog.text


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match=r"--train_val_split.*1\.5"):
        DataArguments(train_val_split=1.5)
    with pytest.raises(ValueError, match=r"--scale.*\[1\.0, 0\.5\]"):
        DataArguments(scale=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"--max_train_samples.*0"):
        DataArguments(max_train_samples=0)
    with pytest.raises(ValueError, match=r"--ra.*0"):
        DataArguments(ra=0)


def test_no_validation_split_needs_positive_train_val_split(tmp_path: Path) -> None:
    folder = tmp_path / "train_only"
    _image_dataset([0, 1] * 4).save_to_disk(str(folder))
    with pytest.raises(ValueError, match=r"no validation/test split.*--train_val_split must be in \(0, 1\).*got 0\.0"):
        load_image_dataset(DataArguments(dataset_name=str(folder), train_val_split=0.0))


class _RandomRows(torch.utils.data.Dataset):
    """Rows drawn from the global RNGs, as random augmentations are: (torch.rand, random.random, np.random.rand)."""

    def __len__(self) -> int:
        return 100

    def __getitem__(self, index: int):
        import random

        return float(torch.rand(())), random.random(), float(np.random.rand())


def test_resumable_augmentations_replays_a_batch_and_returns_to_the_checkpoint_state():
    torch.manual_seed(0)
    stopped = ResumableAugmentations(_RandomRows())
    stopped.start_epoch()
    batches = [stopped.__getitems__([3 * b, 3 * b + 1, 3 * b + 2]) for b in range(3)]
    assert stopped[5] is not None and len(stopped) == 100
    before_batch_2 = stopped.state_before_batch(2)
    assert stopped.state_before_batch(7) is None  # never fetched
    checkpoint_rng = capture_rng_state()  # what the checkpoint restores (after batch 2 was already fetched)
    torch.rand(5)  # anything drawn between loading the checkpoint and the first fetch is undone

    resumed = ResumableAugmentations(_RandomRows())
    resumed.start_epoch(first_batch=2)
    resumed.resume_at(before_batch_2, checkpoint_rng)
    assert resumed.__getitems__([6, 7, 8]) == batches[2]  # the same augmentations as the stopped run
    assert resumed.state_before_batch(2) is before_batch_2
    after = capture_rng_state()
    assert torch.equal(after["torch"], checkpoint_rng["torch"]) and after["python"] == checkpoint_rng["python"]
    assert resumed.__getitems__([9]) != batches[2][:1]  # later batches draw on from the checkpoint's state


def test_integer_labels_without_names_are_renumbered_never_leaving_an_empty_class(tmp_path, caplog) -> None:
    folder = tmp_path / "one_to_ten"
    labels = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 2
    datasets.DatasetDict({"train": _image_dataset(labels), "test": _image_dataset(labels[:10])}).save_to_disk(
        str(folder)
    )
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        data = load_image_dataset(DataArguments(dataset_name=str(folder)))
    assert get_label_names(data) == [str(i) for i in range(1, 11)]  # 10 classes, named by their original ids
    assert sorted(set(data["train"]["label"])) == list(range(10))
    assert data["train"][0]["label"] == 0 and data["train"][9]["label"] == 9  # 1 -> 0, ..., 10 -> 9
    assert "not 0..9 (starting at 1)" in caplog.text and "1->0, 2->1" in caplog.text
    caplog.clear()
    gaps = tmp_path / "gaps"
    datasets.DatasetDict({"train": _image_dataset([0, 2, 5] * 3), "test": _image_dataset([0, 2, 5])}).save_to_disk(
        str(gaps)
    )
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        data = load_image_dataset(DataArguments(dataset_name=str(gaps)))
    assert get_label_names(data) == ["0", "2", "5"] and "with gaps" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        load_image_dataset(DataArguments(dataset_name="digits"))
    assert "renumbered" not in caplog.text and "no train images" not in caplog.text


def test_classes_missing_from_a_split_are_named(tmp_path, caplog) -> None:
    folder = tmp_path / "unbalanced"
    names = datasets.ClassLabel(names=["cat", "dog", "fox", "owl"])
    datasets.DatasetDict(
        {
            "train": _image_dataset([0, 1, 2] * 3, label_feature=names),
            "test": _image_dataset([0, 1, 3], label_feature=names),
        }
    ).save_to_disk(str(folder))
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        load_image_dataset(DataArguments(dataset_name=str(folder)))
    assert "1 of 4 class(es) have no train images: 'owl' (1 of them appear in validation)" in caplog.text
    assert "1 of 4 class(es) have no validation images: 'fox'" in caplog.text


def test_class_balanced_sampler_gives_p_classes_of_k_images_on_every_process() -> None:
    from accelerate.data_loader import BatchSamplerShard

    labels = torch.arange(10).repeat_interleave(6)  # 10 classes x 6 images: groups of K=3 without filling up
    sampler = ClassBalancedBatchSampler(labels, batch_size=26, images_per_class=3, repeats=3, seed=2)
    assert sampler.layout.images_per_batch == 8 and sampler.group_sizes == [3, 3, 2]  # P = 2 classes of 3, + 2
    assert len(sampler) == 60 // 8
    for process in range(2):
        sampler.set_epoch(1)
        shard = list(BatchSamplerShard(sampler, num_processes=2, process_index=process))
        assert len(shard) == len(sampler) // 2
        for batch in shard:
            assert len(batch) == 26
            images = sorted(set(batch))
            counts = torch.bincount(labels[images], minlength=10)
            assert sorted(counts[counts > 0].tolist()) == [2, 3, 3]  # P x K (+ the remainder), distinct classes
            assert len(_starts(batch)) == 8 and min(batch.count(i) for i in images) == 3  # whole copy groups
    first, again = list(sampler), list(sampler)
    assert first == again  # the epoch's order is seeded
    sampler.set_epoch(2)
    assert list(sampler) != first
    few = ClassBalancedBatchSampler(torch.tensor([0, 0, 1, 1, 1, 1]), batch_size=6, images_per_class=3, repeats=1)
    for batch in few:  # class 0 has 2 images: its group of 3 draws one of them again
        assert torch.bincount(torch.tensor([0, 0, 1, 1, 1, 1])[batch]).tolist() == [3, 3]


def test_pk_sampler_through_the_loader(rgb_dataset) -> None:
    args = DataArguments(ra=2, sampler="pk", pk_images_per_class=2)
    rows = with_image_transforms(rgb_dataset, args, augmented_split="train")["train"]
    class_ids = np.asarray(rgb_dataset["train"]["label"])
    loader = create_train_dataloader(rows, args, batch_size=8, class_ids=class_ids)
    assert isinstance(loader.batch_sampler, ClassBalancedBatchSampler)
    for batch in loader:
        assert torch.bincount(batch["labels"], minlength=2).tolist() == [4, 4]  # 2 classes x 2 images x 2 copies
    with pytest.raises(ValueError, match="--sampler='balanced' is not valid; choose one of random, pk"):
        DataArguments(sampler="balanced")


def test_uint8_transfer_equals_normalising_in_the_loader(rgb_dataset) -> None:
    """Without erasing, the uint8 path normalised on the device gives exactly the float path's values (the same
    random crops and RandAugment operations, the same arithmetic); batches travel as uint8."""
    import random

    from simlap_hf.data import create_train_normalizer

    images = [rgb_dataset["train"][i]["image"] for i in range(4)]
    for num_channels in (3, 1):
        outputs = {}
        for uint8 in (False, True):
            args = DataArguments(ra=3, reprob=0.0, uint8_transfer=uint8)
            transform = create_train_transform(args, num_channels)
            random.seed(3), np.random.seed(3), torch.manual_seed(3)
            outputs[uint8] = torch.stack([transform(image) for image in images])
        assert outputs[True].dtype == torch.uint8 and outputs[False].dtype == torch.float32
        normalize = create_train_normalizer(DataArguments(), num_channels)
        assert torch.equal(normalize(outputs[True]), outputs[False])  # same operations on the same values
    args = DataArguments(ra=3)
    batch = next(
        iter(
            create_train_dataloader(
                with_image_transforms(rgb_dataset, args, augmented_split="train")["train"], args, batch_size=6
            )
        )
    )
    assert batch["pixel_values"].dtype == torch.uint8
    assert create_train_normalizer(DataArguments(uint8_transfer=False)) is None


def test_uint8_random_erasing_fills_a_rectangle_with_the_mean_colour() -> None:
    import random

    from simlap_hf.data import UInt8RandomErasing

    random.seed(0)
    image = torch.full((3, 32, 32), 7, dtype=torch.uint8)
    erased = UInt8RandomErasing(1.0, fill=(125, 123, 114))(image)
    changed = (erased != image).any(0)
    rows, cols = changed.nonzero(as_tuple=True)
    assert changed.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # one filled rectangle
    assert 0.02 * 1024 * 0.5 <= changed.sum() <= 1024 / 3 * 1.5
    assert erased[:, rows[0], cols[0]].tolist() == [125, 123, 114] and torch.equal(image, torch.full_like(image, 7))
    assert torch.equal(UInt8RandomErasing(0.0, fill=(1, 1, 1))(image), image)


def test_loader_workers_default_to_zero_without_a_gpu_and_to_the_cores_with_one(monkeypatch):
    """Unset --dataloader_num_workers: 0 on a CPU-only machine (exact mid-epoch resume); with a GPU, the CPU cores
    per local process minus one, between 1 and 8; an explicit value always wins."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert DataArguments(dataset_name="digits").loader_workers() == 0
    assert DataArguments(dataset_name="digits", dataloader_num_workers=3).loader_workers() == 3
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert DataArguments(dataset_name="digits").loader_workers() == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert DataArguments(dataset_name="digits").loader_workers() == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert DataArguments(dataset_name="digits").loader_workers() == 1
    assert DataArguments(dataset_name="digits", dataloader_num_workers=0).loader_workers() == 0
