"""Short SimLAP pretraining run on Fashion-MNIST at the reference recipe, with a plain torch data path.

Made for a lent GPU without the ``datasets``/``evaluate`` libraries: the IDX files are parsed with numpy
(``simlap_hf.data.idx``), a plain ``torch.utils.data.Dataset`` produces PIL images that go through timm's
``create_transform``, and only modules that need neither library are imported from the package (the models,
``simlap_hf.data.idx``, ``simlap_hf.data.samplers``, ``simlap_hf.evaluation``'s kNN; not the rest of
``simlap_hf.data``). Runs on the CPU as well, for a smoke test.

Recipe (the reference's CIFAR-10 pretraining recipe, applied to Fashion-MNIST)
------------------------------------------------------------------------------
* Model: ``SimLAPModel(SimLAPConfig(...))``: ResNet-18, deep stem, output stride 8, K=256, mlp 2048, T=0.1, fused
  gate, arbitrary pairs, online linear head on detached features (the package defaults).
* Input: the 28x28 grayscale images stay single-channel: the model is built with ``num_channels=1`` (timm
  ``in_chans=1``), normalised with the Fashion-MNIST statistics 0.2860 / 0.3530 (``--in_chans 3`` converts to RGB
  and replicates them instead). Network input 32x32, as for CIFAR.
* Train transform (timm ``create_transform``): RandomResizedCrop(32, scale (0.7, 1), bicubic), horizontal flip,
  RandAugment ``rand-m9-mstd0.5-inc1``, normalise, RandomErasing p=0.1. Eval: Resize(36, bicubic), CenterCrop(32).
* Repeated augmentation 3: every epoch is a random permutation of the training images with each index repeated
  3 times adjacently (one epoch = 3 passes over the data); the batch (``--batch_size`` 256) is rounded down to a
  multiple of 3 (255 = 85 images x 3 views), so the 3 views of an image always share a batch; drop_last.
* Adam (timm ``create_optimizer_v2``, coupled L2 weight decay 5e-4, none on biases and 1-D parameters), lr 1e-3;
  timm ``create_scheduler_v2``: linear warmup from 1e-5 (default ``--warmup_epochs``: the reference's 2 of 50
  epochs scaled to ``--epochs``), then cosine to 1e-6, updated every iteration.
* bfloat16 autocast and channels-last on CUDA (``--bf16`` / ``--channels_last``, on by default there).

Reported
--------
Online-head top-1 (and top-5) on the test set (10,000 images), kNN top-1 (k=20, cosine similarity, neighbours
weighted by exp(sim / 0.07)) of the test images against the training images (both with the eval transform) on
the pooled backbone features (D=512) and on the projected embeddings (K=256), training images/s (augmented
samples, i.e. each of the 3 views counts, including data loading; also without the first steps), and the time
the training loop waited for data. ``--time_budget_s`` stops the training early (and still evaluates) when the
run would not fit a time slot; the report then says so.

Data
----
The four IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each raw or ``.gz``) are looked up in ``--data_dir`` (default:
``$SIMLAP_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``), then in ``outputs/fashion-mnist/``
of this repository.

Examples::

    python benchmarks/gpu_pretrain_fmnist.py --device cuda --epochs 10 --json fmnist.json
    python benchmarks/gpu_pretrain_fmnist.py --device cpu --epochs 1 --max_train_samples 600 --max_test_samples 300
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from timm.data import create_transform
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from simlap_hf.configuration_simlap import SimLAPConfig  # noqa: E402
from simlap_hf.data.idx import read_idx  # noqa: E402
from simlap_hf.data.samplers import RepeatedAugmentationSampler  # noqa: E402
from simlap_hf.evaluation import knn_accuracy  # noqa: E402
from simlap_hf.modeling_simlap import SimLAPModel  # noqa: E402

DATA_DIR_ENV = "SIMLAP_FASHION_MNIST_DIR"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
REPO_DATA_DIR = REPO_ROOT / "outputs" / "fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
FMNIST_MEAN, FMNIST_STD = 0.2860, 0.3530  # the 60k training images, pixel values scaled to [0, 1]
NUM_CLASSES = 10


# --------------------------------------------------------------------------------------------------------------
# IDX files
# --------------------------------------------------------------------------------------------------------------


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """``stem`` or ``stem.gz`` (also the ``train-images.idx3-ubyte`` spelling) inside ``folder``."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def locate_data(data_dir: str | None) -> tuple[Path, dict[str, Path]]:
    """The first folder holding all four IDX files: ``data_dir``, then this repository's outputs/fashion-mnist."""
    folders = [Path(data_dir).expanduser()] if data_dir else []
    folders.append(REPO_DATA_DIR)
    for folder in folders:
        files = {key: find_idx_file(folder, stem) for key, stem in IDX_FILES.items()}
        if all(files.values()):
            return folder, files  # type: ignore[return-value]
    raise SystemExit(
        f"Fashion-MNIST IDX files ({', '.join(IDX_FILES.values())}, raw or .gz) not found in "
        f"{' or '.join(str(folder) for folder in folders)}. Pass --data_dir, set ${DATA_DIR_ENV}, or copy them to "
        f"{REPO_DATA_DIR}."
    )


def load_split(files: dict[str, Path], split: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(files[f"{split}_images"]), read_idx(files[f"{split}_labels"])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{split}: images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= NUM_CLASSES:
        raise ValueError(f"{split}: labels go up to {labels.max()}, expected < {NUM_CLASSES}")
    return images, labels.astype(np.int64)


def subset(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random subset of ``limit`` samples (all of them when ``limit`` is None or not smaller)."""
    if limit is None or limit >= len(labels):
        return images, labels
    keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:limit])
    return images[keep], labels[keep]


# --------------------------------------------------------------------------------------------------------------
# Data pipeline
# --------------------------------------------------------------------------------------------------------------


class GrayscaleImages(Dataset):
    """(N, H, W) uint8 images + labels -> (transform(PIL image), label); ``rgb`` converts the images to RGB first."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any, rgb: bool) -> None:
        self.images, self.labels, self.transform, self.rgb = images, labels, transform, rgb

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image = PIL.Image.fromarray(self.images[index])  # 2-D uint8 -> mode "L"
        if self.rgb:
            image = image.convert("RGB")
        return self.transform(image), int(self.labels[index])


def build_transforms(args: argparse.Namespace) -> tuple[Any, Any]:
    channels = args.in_chans
    mean, std = (FMNIST_MEAN,) * channels, (FMNIST_STD,) * channels
    train = create_transform(
        input_size=args.input_size,
        is_training=True,
        scale=(0.7, 1.0),
        hflip=0.5,
        auto_augment=None if args.aa.lower() == "none" else args.aa,
        interpolation="bicubic",
        mean=mean,
        std=std,
        re_prob=args.reprob,
    )
    evaluation = create_transform(
        input_size=args.input_size, is_training=False, crop_pct=0.875, interpolation="bicubic", mean=mean, std=std
    )
    return train, evaluation


def shared_memory_free() -> int | None:
    """Free bytes of /dev/shm, through which loader workers hand over their batches (small in some containers)."""
    try:
        stats = os.statvfs("/dev/shm")
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def loader_kwargs(args: argparse.Namespace, device: torch.device, batch_size: int) -> dict[str, Any]:
    """Workers, pinned memory on CUDA, and a prefetch depth whose batches in flight use at most a quarter of the
    free /dev/shm (up to 4 batches per worker)."""
    kwargs: dict[str, Any] = {"num_workers": args.num_workers, "pin_memory": device.type == "cuda"}
    if args.num_workers > 0:
        batch_bytes = batch_size * args.in_chans * args.input_size**2 * 4
        free = shared_memory_free()
        prefetch = 4 if free is None else int(free / 4 / (args.num_workers * batch_bytes))
        kwargs["prefetch_factor"] = max(1, min(4, prefetch))
    return kwargs


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


@torch.no_grad()
def extract(
    model: SimLAPModel, loader: DataLoader, device: torch.device, args: argparse.Namespace
) -> dict[str, Tensor]:
    """Online-head logits, pooled backbone features and projected embeddings (float32, on ``device``) + labels."""
    model.eval()
    parts: dict[str, list[Tensor]] = {"logits": [], "features": [], "embeddings": [], "labels": []}
    for images, labels in loader:
        images = images.to(device, non_blocking=True)
        if args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(device, args.bf16):
            output = model(images)
        parts["logits"].append(output.logits.float())
        parts["features"].append(output.pooler_output.float())
        parts["embeddings"].append(output.embeddings.float())
        parts["labels"].append(labels.to(device))
    return {name: torch.cat(values) for name, values in parts.items()}


def top_k_accuracy(logits: Tensor, labels: Tensor, k: int) -> float:
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(dim=1).float().mean() * 100)


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--data_dir",
        default=os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR,
        help=f"folder of the IDX files (default ${DATA_DIR_ENV} or {DEFAULT_DATA_DIR}; then {REPO_DATA_DIR})",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs (one epoch = ra passes) (10)")
    parser.add_argument("--batch_size", type=int, default=256, help="rounded down to a multiple of --ra (256 -> 255)")
    parser.add_argument("--ra", type=int, default=3, help="repeated augmentation: views per image in a batch (3)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=5e-4)
    parser.add_argument(
        "--warmup_epochs", type=float, default=None, help="linear warmup epochs (default min(2, epochs * 2 / 50))"
    )
    parser.add_argument("--warmup_lr", type=float, default=1e-5)
    parser.add_argument("--min_lr", type=float, default=1e-6)
    parser.add_argument("--aa", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy, or 'none'")
    parser.add_argument("--reprob", type=float, default=0.1, help="RandomErasing probability (0.1)")
    parser.add_argument("--input_size", type=int, default=32)
    parser.add_argument("--in_chans", type=int, choices=(1, 3), default=1, help="1: grayscale model; 3: RGB copies")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    parser.add_argument(
        "--num_workers", type=int, default=None, help="data loader workers (default: cores - 2, at most 14)"
    )
    parser.add_argument("--max_train_samples", type=int, default=None, help="random subset of the 60k train images")
    parser.add_argument("--max_test_samples", type=int, default=None, help="random subset of the 10k test images")
    parser.add_argument("--knn_k", type=int, default=20)
    parser.add_argument("--knn_temperature", type=float, default=0.07)
    parser.add_argument("--time_budget_s", type=float, default=0.0, help="stop training after this many s (0: none)")
    parser.add_argument("--log_every", type=int, default=100, help="print the loss every this many steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    args.bf16 = on_cuda if args.bf16 is None else args.bf16
    args.channels_last = on_cuda if args.channels_last is None else args.channels_last
    if args.num_workers is None:
        args.num_workers = max(0, min(14, (os.cpu_count() or 1) - 2))
    if args.warmup_epochs is None:
        args.warmup_epochs = min(2.0, args.epochs * 2 / 50)
    if args.epochs < 1 or args.ra < 1 or args.batch_size < args.ra:
        parser.error("--epochs must be >= 1 and --batch_size >= --ra >= 1")
    args.requested_batch_size = args.batch_size
    args.batch_size -= args.batch_size % args.ra
    return args


def start(args: argparse.Namespace) -> tuple[torch.device, str, str]:
    """Seed, CUDA settings and the run's header; returns (device, command line, device name)."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but CUDA is not available")
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"command: {command}", flush=True)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, device {device} ({device_name}), "
        f"{os.cpu_count()} CPUs, {args.num_workers} loader workers, bf16 {args.bf16}, "
        f"channels-last {args.channels_last}, /dev/shm free "
        + ("n/a" if shared_memory_free() is None else f"{shared_memory_free() / 2**30:.1f} GiB")
    )
    return device, command, device_name


@dataclass
class Data:
    """The two splits (uint8 images, labels), the evaluation transform and the repeated-augmentation train loader."""

    folder: Path
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    eval_transform: Any
    sampler: RepeatedAugmentationSampler
    train_loader: DataLoader
    steps_per_epoch: int


def load_data(args: argparse.Namespace, device: torch.device) -> Data:
    """Read (and subsample) the IDX files and build the train loader: ``ra`` views of each image in a batch."""
    folder, files = locate_data(args.data_dir)
    train_images, train_labels = subset(*load_split(files, "train"), args.max_train_samples, args.seed)
    test_images, test_labels = subset(*load_split(files, "test"), args.max_test_samples, args.seed + 1)
    print(f"data: {folder} -> train {train_images.shape}, test {test_images.shape}", flush=True)

    train_transform, eval_transform = build_transforms(args)
    train_set = GrayscaleImages(train_images, train_labels, train_transform, args.in_chans == 3)
    sampler = RepeatedAugmentationSampler(len(train_set), repeats=args.ra, seed=args.seed)
    batches = BatchSampler(sampler, args.batch_size, drop_last=True)
    if len(batches) == 0:
        raise SystemExit(f"{len(train_set)} images x {args.ra} views do not fill one batch of {args.batch_size}")
    train_loader = DataLoader(
        train_set,
        batch_sampler=batches,
        persistent_workers=args.num_workers > 0,
        **loader_kwargs(args, device, args.batch_size),
    )
    return Data(
        folder,
        train_images,
        train_labels,
        test_images,
        test_labels,
        eval_transform,
        sampler,
        train_loader,
        len(batches),
    )


def build_model(args: argparse.Namespace, device: torch.device, steps_per_epoch: int):
    """The SimLAPModel of the recipe, its Adam optimizer and its per-iteration warmup + cosine schedule."""
    config = SimLAPConfig(
        backbone="resnet18",
        backbone_kwargs={"stem_type": "deep", "output_stride": 8},
        num_classes=NUM_CLASSES,
        num_channels=args.in_chans,
        image_size=args.input_size,
    )
    model = SimLAPModel(config).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer_v2(
        model, opt="adam", lr=args.lr, weight_decay=args.weight_decay, filter_bias_and_bn=True
    )
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=args.epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    print(
        f"model: SimLAPModel resnet18 deep stem OS8, {args.in_chans} input channel(s), "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; batch {args.batch_size} "
        f"({args.batch_size // args.ra} images x {args.ra} views), {steps_per_epoch} steps/epoch, {args.epochs} "
        f"epochs, warmup {args.warmup_epochs:g} epochs",
        flush=True,
    )
    return model, optimizer, scheduler


@dataclass
class TrainState:
    """Counters of the training loop (steps, samples, time waiting for data, losses, early stop)."""

    warm_steps: int
    train_start: float
    warm_start: float
    global_step: int = 0
    samples: int = 0
    warm_samples: int = 0
    data_wait: float = 0.0
    nonfinite: int = 0
    last_loss: float | None = None
    epoch_losses: list[float] = field(default_factory=list)
    completed_epochs: int = 0
    stopped_early: str = ""
    stop_requested: bool = False
    train_s: float = 0.0
    images_per_s: float = 0.0
    steady_images_per_s: float | None = None


def train_step(
    args,
    model,
    optimizer,
    scheduler,
    images: Tensor,
    labels: Tensor,
    device: torch.device,
    state: TrainState,
    epoch: int,
) -> Tensor:
    """One optimizer step on a batch; updates the counters and logs every ``--log_every`` steps; the loss."""
    images = images.to(device, non_blocking=True)
    labels = labels.to(device, non_blocking=True)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, args.bf16):
        output = model(images, labels=labels)
    loss = output.loss
    loss.backward()
    optimizer.step()
    state.global_step += 1
    scheduler.step_update(num_updates=state.global_step)
    state.samples += images.shape[0]
    if state.global_step == state.warm_steps:
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        synchronize()
        state.warm_start, state.warm_samples = time.perf_counter(), state.samples
    if state.global_step % args.log_every == 0:
        state.last_loss = float(loss.detach())
        if not math.isfinite(state.last_loss):
            state.nonfinite += 1
        rate = state.samples / (time.perf_counter() - state.train_start)
        contrastive, head = float(output.contrastive_loss.detach()), float(output.head_loss.detach())
        print(
            f"epoch {epoch + 1}/{args.epochs} step {state.global_step}: loss {state.last_loss:.4f} "
            f"(contrastive {contrastive:.4f}, head {head:.4f}), "
            f"lr {optimizer.param_groups[0]['lr']:.2e}, {rate:,.0f} images/s",
            flush=True,
        )
    return loss


def train_epoch(
    args, model, optimizer, scheduler, data: Data, device: torch.device, state: TrainState, epoch: int
) -> None:
    """One epoch (``ra`` passes over the images), stopping early at the time budget or after SIGTERM."""
    data.sampler.set_epoch(epoch)
    epoch_loss = torch.zeros((), device=device)
    epoch_steps = 0
    iterator = iter(data.train_loader)
    while True:
        wait_start = time.perf_counter()
        try:
            images, labels = next(iterator)
        except StopIteration:
            break
        state.data_wait += time.perf_counter() - wait_start
        loss = train_step(args, model, optimizer, scheduler, images, labels, device, state, epoch)
        epoch_loss += loss.detach().float()
        epoch_steps += 1
        elapsed = time.perf_counter() - state.train_start
        if args.time_budget_s > 0 and elapsed > args.time_budget_s:
            state.stopped_early = (
                f"time budget {args.time_budget_s:g} s reached at epoch {epoch + 1}, step {state.global_step}"
            )
        elif state.stop_requested:
            state.stopped_early = f"SIGTERM at epoch {epoch + 1}, step {state.global_step}"
        if state.stopped_early:
            break
    del iterator
    state.epoch_losses.append(float(epoch_loss) / max(epoch_steps, 1))
    print(f"epoch {epoch + 1}: mean loss {state.epoch_losses[-1]:.4f} ({epoch_steps} steps)", flush=True)


def train(args, model, optimizer, scheduler, data: Data, device: torch.device) -> TrainState:
    """The training loop: a SIGTERM or the time budget ends it early (the model is evaluated all the same)."""
    now = time.perf_counter()
    state = TrainState(
        warm_steps=min(20, max(1, data.steps_per_epoch * args.epochs // 10)), train_start=now, warm_start=now
    )

    def request_stop(signum: int, frame: Any) -> None:
        state.stop_requested = True
        print(f"signal {signum}: stopping the training, then evaluating", flush=True)

    previous_handler = signal.signal(signal.SIGTERM, request_stop)
    model.train()
    for epoch in range(args.epochs):
        train_epoch(args, model, optimizer, scheduler, data, device, state, epoch)
        if state.stopped_early:
            print(f"stopped early: {state.stopped_early}", flush=True)
            break
        state.completed_epochs += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    train_end = time.perf_counter()
    state.train_s = train_end - state.train_start
    signal.signal(signal.SIGTERM, previous_handler)
    state.images_per_s = state.samples / state.train_s
    if state.samples > state.warm_samples and state.warm_samples:
        state.steady_images_per_s = (state.samples - state.warm_samples) / (train_end - state.warm_start)
    return state


def evaluate(args, model, data: Data, device: torch.device) -> dict[str, float]:
    """Online-head top-1 / top-5 on the test images; kNN top-1 against the training images (both under the
    evaluation transform) on the backbone features and on the projected embeddings."""
    eval_kwargs = {"batch_size": 512, "shuffle": False, **loader_kwargs(args, device, 512)}
    rgb = args.in_chans == 3
    test_set = GrayscaleImages(data.test_images, data.test_labels, data.eval_transform, rgb)
    train_set = GrayscaleImages(data.train_images, data.train_labels, data.eval_transform, rgb)
    test = extract(model, DataLoader(test_set, **eval_kwargs), device, args)
    train = extract(model, DataLoader(train_set, **eval_kwargs), device, args)
    metrics = {
        "online_head_top1": top_k_accuracy(test["logits"], test["labels"], 1),
        "online_head_top5": top_k_accuracy(test["logits"], test["labels"], 5),
    }
    for name in ("features", "embeddings"):
        metrics[f"knn_top1_{name}"] = knn_accuracy(
            train[name],
            train["labels"],
            test[name],
            test["labels"],
            NUM_CLASSES,
            k=args.knn_k,
            temperature=args.knn_temperature,
        )
    return metrics


def print_report(
    args, data: Data, state: TrainState, metrics: dict[str, float], eval_s: float, total_s: float, device_name: str
) -> None:
    """The results as a markdown table."""
    stopped = state.stopped_early
    rows = [
        (
            "epochs completed / planned",
            f"{state.completed_epochs} / {args.epochs}" + (" (stopped early)" if stopped else ""),
        ),
        (
            "optimizer steps (batch)",
            f"{state.global_step} ({args.batch_size} = {args.batch_size // args.ra} x {args.ra})",
        ),
        ("training samples seen (views)", f"{state.samples:,}"),
        ("training wall time", f"{state.train_s:.1f} s"),
        (
            "training images/s (all steps; after warm-up)",
            f"{state.images_per_s:,.0f}; "
            + (f"{state.steady_images_per_s:,.0f}" if state.steady_images_per_s else "n/a"),
        ),
        ("time waiting for data", f"{state.data_wait:.1f} s ({100 * state.data_wait / max(state.train_s, 1e-9):.0f}%)"),
        ("mean loss of the last epoch", f"{state.epoch_losses[-1]:.4f}" if state.epoch_losses else "n/a"),
        (
            f"online head top-1 / top-5 ({len(data.test_labels):,} test images)",
            f"{metrics['online_head_top1']:.2f} / {metrics['online_head_top5']:.2f}",
        ),
        (
            f"kNN top-1, backbone features (k={args.knn_k}, T={args.knn_temperature:g}, "
            f"{len(data.train_labels):,} train)",
            f"{metrics['knn_top1_features']:.2f}",
        ),
        ("kNN top-1, projected embeddings", f"{metrics['knn_top1_embeddings']:.2f}"),
        ("evaluation wall time", f"{eval_s:.1f} s"),
        ("total wall time", f"{total_s:.1f} s"),
    ]
    print(f"\n| Fashion-MNIST SimLAP pretraining ({device_name}) | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if stopped:
        print(f"\nNote: {stopped}; the cosine schedule did not finish.")


def write_results(
    args,
    command: str,
    device: torch.device,
    device_name: str,
    data: Data,
    state: TrainState,
    metrics: dict[str, float],
    eval_s: float,
    total_s: float,
) -> None:
    """The settings, timings and metrics as JSON (``--json``)."""
    payload = {
        "command": command,
        "torch": torch.__version__,
        "device": str(device),
        "device_name": device_name,
        "data_dir": str(data.folder),
        "train_size": int(len(data.train_labels)),
        "test_size": int(len(data.test_labels)),
        "in_chans": args.in_chans,
        "input_size": args.input_size,
        "batch_size": args.batch_size,
        "ra": args.ra,
        "epochs_planned": args.epochs,
        "epochs_completed": state.completed_epochs,
        "stopped_early": state.stopped_early or None,
        "steps": state.global_step,
        "steps_per_epoch": data.steps_per_epoch,
        "samples_seen": state.samples,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "warmup_epochs": args.warmup_epochs,
        "bf16": args.bf16,
        "channels_last": args.channels_last,
        "num_workers": args.num_workers,
        "train_s": state.train_s,
        "images_per_s": state.images_per_s,
        "steady_images_per_s": state.steady_images_per_s,
        "data_wait_s": state.data_wait,
        "epoch_mean_losses": state.epoch_losses,
        "nonfinite_logged_losses": state.nonfinite,
        "eval_s": eval_s,
        "total_s": total_s,
        "knn_k": args.knn_k,
        "knn_temperature": args.knn_temperature,
        **metrics,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2))
    print(f"results written to {args.json}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_start = time.perf_counter()
    device, command, device_name = start(args)
    data = load_data(args, device)
    model, optimizer, scheduler = build_model(args, device, data.steps_per_epoch)
    state = train(args, model, optimizer, scheduler, data, device)
    eval_start = time.perf_counter()
    metrics = evaluate(args, model, data, device)
    eval_s = time.perf_counter() - eval_start
    total_s = time.perf_counter() - run_start
    print_report(args, data, state, metrics, eval_s, total_s, device_name)
    if args.json is not None:
        write_results(args, command, device, device_name, data, state, metrics, eval_s, total_s)


if __name__ == "__main__":
    main()
