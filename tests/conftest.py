"""Test-wide settings: no test may reach the network; caches go to a temporary folder."""

import gzip
import os
import shutil
import socket
import struct
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(tempfile.gettempdir(), "simlap_hf_test_cache", "datasets"))
# The scripts of benchmarks/ that tests import as modules (reproduce.py, bench_onnx.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

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


def write_idx(path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file of ``array`` (two zero bytes, the type code, the number of dimensions, big-endian uint32 sizes,
    big-endian data), gzip-compressed when ``compress``."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype(">i4"): 0x0C}
    big_endian = array.astype(array.dtype.newbyteorder(">")) if array.dtype.itemsize > 1 else array
    code = codes[np.dtype(big_endian.dtype)]
    payload = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += big_endian.tobytes()
    Path(path).write_bytes(gzip.compress(payload) if compress else payload)


@pytest.fixture
def tiny_image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


def tiny_config(**overrides):
    """The tiny SimLAP configuration the model tests share: resnet10t at 16x16, output stride 8, 4 classes, a
    32-wide projector to 16 dimensions and a small feature filter."""
    from simlap_hf import SimLAPConfig

    values = dict(
        backbone="resnet10t",
        backbone_kwargs={"output_stride": 8},
        num_classes=4,
        out_dim=16,
        mlp_dim=32,
        filter_embed_dim=8,
        filter_hidden_dim=16,
        image_size=16,
    )
    values.update(overrides)
    return SimLAPConfig(**values)


# A tiny pretraining run shared by the training tests: resnet10t (deep stem, output stride 8) on 16x16 images, no
# random augmentation beyond crops and flips, batches of 12 (4 images x 3 copies), an evaluation and a checkpoint
# every epoch, a log line every step.
TINY_RUN = {
    "model_name": "resnet10t",
    "stem_type": "deep",
    "output_stride": "8",
    "out_dim": "16",
    "mlp_dim": "32",
    "input_size": "16",
    "aa": "none",
    "reprob": "0",
    "per_device_train_batch_size": "12",
    "per_device_eval_batch_size": "16",
    "ra": "3",
    "num_train_epochs": "2",
    "warmup_epochs": "1",
    "eval_every": "1",
    "checkpointing_epochs": "1",
    "learning_rate": "0.002",
    "seed": "7",
    "logging_steps": "1",
}


def tiny_run_flags(output_dir, train_dir=None, **overrides) -> list[str]:
    """Command-line flags of :data:`TINY_RUN` (values replaced or added by ``overrides``; None drops a flag) for
    ``output_dir``, on the image folder ``train_dir`` (a quarter held out for validation) when given."""
    values = {**TINY_RUN, **{name: (None if value is None else str(value)) for name, value in overrides.items()}}
    flags = ["--train_dir", str(train_dir), "--train_val_split", "0.25"] if train_dir is not None else []
    flags += ["--output_dir", str(output_dir)]
    for name, value in values.items():
        if value is not None:
            flags += [f"--{name}", value]
    return flags


def free_port() -> int:
    """A free local TCP port (a torchrun rendezvous, a web server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_executable() -> str:
    """The torchrun of this Python; the calling test is skipped when it is not installed."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        pytest.skip("torchrun is not installed")
    return torchrun


def two_process_command(script, *arguments) -> list[str]:
    """``torchrun`` starting ``script`` with ``arguments`` in 2 local CPU processes, rendezvous on a free port."""
    return [
        torchrun_executable(),
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, arguments),
    ]


# The unit tests (`make test-fast`, `pytest -m unit`): these modules, less their tests marked e2e or slow. Every other
# test is end-to-end (`-m e2e`: it trains through a script, starts processes or reads a real data set).
UNIT_MODULES = frozenset(
    {
        "test_data",
        "test_evaluation",
        "test_fast_augment",
        "test_fastssl_form",
        "test_flags",
        "test_layers",
        "test_losses",
        "test_modeling",
        "test_preprocessing",
        "test_relations",
        "test_reproduce",
        "test_upstream_apis",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.stem
        end_to_end = item.get_closest_marker("e2e") is not None or item.get_closest_marker("slow") is not None
        if module in UNIT_MODULES and not end_to_end:
            item.add_marker(pytest.mark.unit)
        elif item.get_closest_marker("e2e") is None:
            item.add_marker(pytest.mark.e2e)
    # Longest first: in a parallel run (make test: pytest-xdist, --dist loadgroup) the quick unit tests then fill the
    # gaps at the end, and no worker is left with a long test while the others have finished.
    items.sort(key=run_order)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Under ``--dist loadgroup`` the tests of one ``xdist_group`` share a worker, and with it the module fixtures
    that build their data once (a reproduction, a pretrained model). A pytest-xdist that no longer groups would build
    them once per worker, silently: such a test fails here instead, before its fixtures start."""
    grouped = item.get_closest_marker("xdist_group") is not None
    if grouped and getattr(item.config.option, "loadgroup", False) and "@" not in item.nodeid:
        pytest.fail(
            "pytest-xdist did not group this test with --dist loadgroup under this pytest (pytest-dev/pytest-xdist"
            "#1386); install the versions of setup.cfg's dev extra: pip install -e '.[dev]'",
            pytrace=False,
        )


def run_order(item: pytest.Item) -> int:
    """0 for slow tests, 1 for the other end-to-end tests, 2 for unit tests (the sort keeps file order within)."""
    if item.get_closest_marker("slow") is not None:
        return 0
    return 2 if item.get_closest_marker("unit") is not None else 1
