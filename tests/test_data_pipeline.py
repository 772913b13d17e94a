"""The one data pipeline: the three readers (arrays, ``datasets`` splits, a stream) give the same DataBundle contract
through :func:`build_data_bundle`; the array and ``datasets`` readers of one source give the same batches; which
split is augmented is an argument."""

import io
import random
import tarfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from conftest import write_idx

from simlap_hf.data import (
    ArrayReader,
    DataArguments,
    DatasetsReader,
    StreamReader,
    build_data_bundle,
    create_train_dataloader,
    resolve_source,
    with_image_transforms,
)

SIZE = 12  # images are SIZE x SIZE
CLASSES = 3


def _images(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` grayscale images (count, SIZE, SIZE) uint8 and their classes (count,): class ``i % CLASSES``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % CLASSES
    images = np.clip(labels[:, None, None] * 80 + rng.integers(0, 60, size=(count, SIZE, SIZE)), 0, 255)
    return images.astype(np.uint8), labels.astype(np.uint8)


def _write_idx(folder: Path, prefix: str, count: int, seed: int) -> None:
    images, labels = _images(count, seed)
    write_idx(folder / f"{prefix}-images-idx3-ubyte", images)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels)


def _write_shard(path: Path, count: int, seed: int) -> None:
    """A WebDataset tar of ``count`` PNGs (key.png + key.cls)."""
    images, labels = _images(count, seed)
    with tarfile.open(path, "w") as tar:
        for index in range(count):
            buffer = io.BytesIO()
            PIL.Image.fromarray(images[index]).save(buffer, format="PNG")
            for member, data in ((f"{index:05d}.png", buffer.getvalue()), (f"{index:05d}.cls", b"%d" % labels[index])):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _args(**overrides) -> DataArguments:
    values = dict(input_size=SIZE, aa="none", ra=2, dataloader_num_workers=0) | overrides
    return DataArguments(**values)


@pytest.fixture
def idx_folder(tmp_path, monkeypatch) -> Path:
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    folder = tmp_path / "idx"
    folder.mkdir()
    _write_idx(folder, "train", 30, seed=0)
    _write_idx(folder, "t10k", 9, seed=1)
    return folder


def _seeded_batches(loader) -> list[dict[str, torch.Tensor]]:
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    return list(loader)


def _check_contract(bundle, train_rows: int, validation_rows: int, per_process: bool) -> None:
    """What every DataBundle holds, whatever its reader."""
    assert bundle.label_names == [str(i) for i in range(CLASSES)]
    assert bundle.train_split_per_process is per_process
    batches = list(bundle.train)
    assert batches and len(batches) == len(bundle.train)
    for batch in batches:
        assert set(batch) == {"pixel_values", "labels"}
        assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE) and batch["pixel_values"].dtype == torch.uint8
        assert batch["labels"].dtype == torch.int64 and torch.equal(batch["labels"][0::2], batch["labels"][1::2])
    normalized = bundle.train_normalizer(batches[0]["pixel_values"])
    assert normalized.dtype == torch.float32 and normalized.shape == (6, 3, SIZE, SIZE)
    for loader, rows in ((bundle.validation, validation_rows), (bundle.train_eval, train_rows)):
        sizes = [len(batch["labels"]) for batch in loader]
        assert sum(sizes) == rows and max(sizes) <= 4
        first, again = next(iter(loader)), next(iter(loader))
        assert first["pixel_values"].dtype == torch.float32 and first["pixel_values"].shape[1:] == (3, SIZE, SIZE)
        assert torch.equal(first["pixel_values"], again["pixel_values"])  # the evaluation transform: no randomness


def test_the_three_readers_give_the_same_bundle_contract(idx_folder, tmp_path):
    args = _args(dataset_name=str(idx_folder))
    source = resolve_source(args)
    assert source.kind == "idx"
    bundles = {
        "arrays": build_data_bundle(ArrayReader(source, seed=0), 3, 6, 4, seed=0),
        "datasets": build_data_bundle(DatasetsReader(source, seed=0), 3, 6, 4, seed=0),
    }
    for bundle in bundles.values():
        _check_contract(bundle, train_rows=30, validation_rows=9, per_process=False)
    # One source, two readers: the same rows, batches and augmentations.
    for name in ("train", "validation", "train_eval"):
        arrays, standard = (_seeded_batches(getattr(bundles[kind], name)) for kind in ("arrays", "datasets"))
        assert len(arrays) == len(standard)
        for left, right in zip(arrays, standard, strict=True):
            assert torch.equal(left["labels"], right["labels"]), name
            assert torch.equal(left["pixel_values"], right["pixel_values"]), name

    _write_shard(tmp_path / "train.tar", 24, seed=0)
    _write_shard(tmp_path / "val.tar", 9, seed=1)
    stream_args = _args(
        streaming=True,
        train_files=[str(tmp_path / "train.tar")],
        validation_files=[str(tmp_path / "val.tar")],
        streaming_num_examples=24,
        streaming_train_eval_examples=10,
        shuffle_buffer_size=8,
    )
    stream = build_data_bundle(StreamReader(stream_args), 3, 6, 4, seed=0)
    _check_contract(stream, train_rows=10, validation_rows=9, per_process=True)


def test_the_augmented_split_is_an_argument(idx_folder):
    data = DatasetsReader(resolve_source(_args(dataset_name=str(idx_folder))), seed=0).data
    args = _args(hflip=0.0, scale=[0.2, 0.4])
    splits = datasets.DatasetDict(train=data["train"], other=data["train"])

    def varies(view: datasets.Dataset) -> bool:
        torch.manual_seed(0)
        draws = [view[0]["pixel_values"] for _ in range(4)]
        return any(not torch.equal(draws[0], draw) for draw in draws[1:])

    plain = with_image_transforms(splits, args)
    assert not varies(plain["train"]) and not varies(plain["other"])  # no split is augmented by its name
    chosen = with_image_transforms(splits, args, augmented_split="other")
    assert varies(chosen["other"]) and not varies(chosen["train"])
    assert torch.equal(chosen["train"][0]["pixel_values"], plain["other"][0]["pixel_values"])
    with pytest.raises(KeyError, match="'validation' is not a split"):
        with_image_transforms(splits, args, augmented_split="validation")


def test_the_pk_sampler_takes_the_class_ids_from_the_caller():
    rows = [{"pixel_values": torch.zeros(1, 2, 2), "labels": index % 2} for index in range(8)]
    with pytest.raises(TypeError, match="needs class_ids"):
        create_train_dataloader(rows, DataArguments(sampler="pk", pk_images_per_class=2, ra=1), batch_size=4)
    loader = create_train_dataloader(
        rows, DataArguments(sampler="pk", pk_images_per_class=2, ra=1), batch_size=4, class_ids=[0, 1] * 4
    )
    assert all(sorted(batch["labels"].tolist()) == [0, 0, 1, 1] for batch in loader)
