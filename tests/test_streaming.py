"""``--streaming``: repeated augmentation over a stream of tar shards (decode once, copies in one batch), disjoint
parts and equal batch counts on 2 processes, an end-to-end run, and an exact mid-epoch resume."""

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_flags, two_process_command
from PIL import Image
from safetensors.torch import load_file

import simlap_hf.data.streaming as streaming
import simlap_hf.training as training
import simlap_hf.training.loop as loop
from simlap_hf.data import DataArguments, expand_shard_patterns
from simlap_hf.data.stream_sources import open_train_stream

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train_pretrain  # noqa: E402

COLOURS = ((200, 40, 40), (40, 200, 40), (40, 40, 200), (128, 128, 128))


def write_shards(folder: Path, name: str, shards: int, per_shard: int, seed: int = 0) -> str:
    """``shards`` tar files ``<name>-0000.tar``... of ``per_shard`` 16x16 PNGs each (key.png + key.cls, 4 colour
    classes, image ``i`` of class ``i % 4``); returns the brace pattern that names them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for shard in range(shards):
        with tarfile.open(folder / f"{name}-{shard:04d}.tar", "w") as tar:
            for index in range(shard * per_shard, (shard + 1) * per_shard):
                noise = rng.integers(-30, 30, size=(16, 16, 3))
                pixels = np.clip(np.array(COLOURS[index % 4]) + noise, 0, 255).astype(np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).save(buffer, format="PNG")
                for member, data in (
                    (f"{index:05d}.png", buffer.getvalue()),
                    (f"{index:05d}.cls", b"%d" % (index % 4)),
                ):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return str(folder / f"{name}-{{0000..{shards - 1:04d}}}.tar")


@pytest.fixture
def shards(tmp_path):
    """(training pattern: 4 shards x 12 images, validation pattern: 1 shard x 16 images)."""
    return write_shards(tmp_path / "shards", "train", 4, 12), write_shards(tmp_path / "shards", "val", 1, 16, seed=1)


def test_expand_shard_patterns(shards):
    files = expand_shard_patterns([shards[0]])
    assert [Path(f).name for f in files] == [f"train-{i:04d}.tar" for i in range(4)]
    assert expand_shard_patterns([str(Path(shards[0]).parent / "val-*.tar")])[0].endswith("val-0000.tar")
    with pytest.raises(FileNotFoundError, match="No shard file"):
        expand_shard_patterns([str(Path(shards[0]).parent / "none-{0..1}.tar")])


def _dataset(pattern: str, batch_size: int, ra: int, rank: int = 0, world_size: int = 1):
    args = DataArguments(streaming=True, train_files=[pattern], ra=ra, shuffle_buffer_size=16)
    to_tensor = lambda image: torch.as_tensor(np.array(image)).permute(2, 0, 1)  # noqa: E731 (identity augmentation)
    return streaming.StreamingRepeatedAugmentation(
        open_train_stream(args).rows, to_tensor, args, 48, batch_size, 3, rank, world_size
    )


def test_streaming_repeated_augmentation_batches_decode_each_image_once(shards, monkeypatch):
    decoded = []
    original = streaming.decode_image

    def counting(value, index):
        decoded.append(value["path"])
        return original(value, index)

    monkeypatch.setattr(streaming, "decode_image", counting)
    dataset = _dataset(shards[0], batch_size=10, ra=3)  # 3 images per batch: copies 4, 3, 3
    batches = list(dataset)
    assert len(batches) == len(dataset) == 48 // 3
    for batch in batches:
        assert batch["pixel_values"].shape == (10, 3, 16, 16) and batch["pixel_values"].dtype == torch.uint8
        groups = [(0, 4), (4, 7), (7, 10)]
        for start, end in groups:  # copies of an image are adjacent (the transform here is the identity)
            assert (batch["pixel_values"][start:end] == batch["pixel_values"][start]).all()
            assert (batch["labels"][start:end] == batch["labels"][start]).all()
    assert len(decoded) == 48 and len(set(decoded)) == 48  # each image decoded once, all images of the epoch
    first_epoch = [b["labels"].tolist() for b in batches]
    dataset.set_epoch(1)
    assert [b["labels"].tolist() for b in dataset] != first_epoch  # reshuffled per epoch
    dataset.set_epoch(0)
    dataset.start_epoch(first_batch=5)  # a resume replays the stream to batch 5
    assert [b["labels"].tolist() for b in dataset] == first_epoch[5:]


def test_streaming_parts_of_two_processes_are_disjoint_with_equal_batch_counts(shards):
    keys = []
    counts = []
    for rank in range(2):
        dataset = _dataset(shards[0], batch_size=3, ra=3, rank=rank, world_size=2)
        rows = list(dataset._rows_once())
        keys.append({row["image"]["path"] for row in rows})
        counts.append(len(list(dataset)))
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 48
    assert counts == [24, 24]


def test_streaming_needs_its_epoch_length_and_a_validation_split(shards, tmp_path):
    from simlap_hf.data import prepare_data

    args = DataArguments(streaming=True, train_files=[shards[0]], validation_files=[shards[1]])
    with pytest.raises(ValueError, match="--streaming_num_examples"):
        prepare_data(args, 3, 12, 16, seed=0)
    args = DataArguments(streaming=True, train_files=[shards[0]], streaming_num_examples=48)
    with pytest.raises(ValueError, match="--validation_files"):
        prepare_data(args, 3, 12, 16, seed=0)
    with pytest.raises(ValueError, match="'digits' is built in and small: drop --streaming"):
        prepare_data(DataArguments(streaming=True), 3, 12, 16, seed=0)
    with pytest.raises(ValueError, match="--train_files is read only with --streaming"):
        DataArguments(train_files=[shards[0]])
    with pytest.raises(ValueError, match="--sampler pk needs random access"):
        DataArguments(streaming=True, sampler="pk")


def _flags(shards, output_dir, **overrides):
    flags = tiny_run_flags(output_dir, num_train_epochs=2, **overrides)
    return flags + [
        "--streaming",
        "--train_files",
        shards[0],
        "--validation_files",
        shards[1],
        "--streaming_num_examples",
        "48",
        "--shuffle_buffer_size",
        "16",
        "--dataloader_num_workers",
        "0",
    ]


def test_streaming_training_run_and_mid_epoch_resume_equal_the_uninterrupted_run(shards, tmp_path, monkeypatch):
    train_pretrain.run(_flags(shards, tmp_path / "uninterrupted"))
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    results = json.loads((tmp_path / "uninterrupted" / "all_results.json").read_text())
    assert results

    calls = []
    original = loop._exchange_step_flags

    def stop_at_step_16(accelerator, requested, losses):
        calls.append(1)
        return original(accelerator, requested or len(calls) == 16, losses)

    monkeypatch.setattr(loop, "_exchange_step_flags", stop_at_step_16)
    output_dir = tmp_path / "stopped"
    assert training.run_main(train_pretrain.run, _flags(shards, output_dir)) == 143
    latest = training.find_checkpoint(output_dir, "latest")
    state = json.loads((latest / training.STATE_FILE).read_text())
    assert state["epoch"] == 1 and state["step_in_epoch"] == 4, state  # 12 batches per epoch: inside the second
    monkeypatch.setattr(loop, "_exchange_step_flags", original)
    train_pretrain.run(_flags(shards, output_dir) + ["--resume_from_checkpoint", "latest"])
    actual = load_file(output_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=0, rtol=0, msg=name)


WORKER = (
    "import sys, json, os\n"
    "sys.path.insert(0, {root!r})\n"
    "import torch.distributed as dist\n"
    "from accelerate import PartialState\n"
    "from simlap_hf.data import DataArguments, prepare_data\n"
    "state = PartialState(cpu=True)\n"
    "args = DataArguments(streaming=True, train_files=[{train!r}], validation_files=[{val!r}],\n"
    "    streaming_num_examples=48, shuffle_buffer_size=8, aa='none', input_size=16, dataloader_num_workers=2)\n"
    "bundle = prepare_data(args, 3, 6, 16, seed=0)\n"
    "loader = bundle.train\n"
    "labels = [batch['labels'].tolist() for batch in loader]\n"
    "paths = [row['image']['path'] for row in loader.dataset._rows_once()]\n"
    "result = {{'batches': len(labels), 'len': len(loader), 'paths': paths}}\n"
    "json.dump(result, open({out!r} + str(state.process_index), 'w'))\n"
)


def test_two_processes_with_two_workers_each_get_equal_batch_counts(shards, tmp_path):
    entry = tmp_path / "worker.py"
    out = str(tmp_path / "result_")
    entry.write_text(WORKER.format(root=str(ROOT), train=shards[0], val=shards[1], out=out))
    done = subprocess.run(two_process_command(entry), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    results = [json.loads(Path(out + str(rank)).read_text()) for rank in range(2)]
    assert [(r["batches"], r["len"]) for r in results] == [(12, 12), (12, 12)]  # 48 images / (2 processes x 2)
    paths = [set(r["paths"]) for r in results]
    assert not paths[0] & paths[1] and len(paths[0] | paths[1]) == 48  # disjoint parts covering the stream


def test_a_stream_shorter_than_the_epoch_is_read_again_with_a_warning(shards, caplog):
    """An epoch of 96 images (--streaming_num_examples) on a 48-image stream: every image twice, and a warning that
    says the stream ran out and is read again; an epoch that fits gives no warning."""
    args = DataArguments(streaming=True, train_files=[shards[0]], ra=3, shuffle_buffer_size=16)
    to_tensor = lambda image: torch.as_tensor(np.array(image)).permute(2, 0, 1)  # noqa: E731 (identity augmentation)
    with caplog.at_level("WARNING", logger="simlap_hf"):
        fitting = streaming.StreamingRepeatedAugmentation(open_train_stream(args).rows, to_tensor, args, 48, 9, 3)
        assert len(list(fitting)) == 16
        assert "ran out" not in caplog.text
        longer = streaming.StreamingRepeatedAugmentation(open_train_stream(args).rows, to_tensor, args, 96, 9, 3)
        assert len(list(longer)) == 32
    assert caplog.text.count("The training stream ran out after 48 images") == 1
