"""Time to the first training batch from a large image folder: every image decoded at load (the check that smaller
folders get) against the start without it (folders above ``simlap_hf.data.images.EAGER_CHECK_MAX_IMAGES``).

Writes ``--images`` JPEG files (``--size`` px, 10 class folders) into a temporary folder, then, alternating
``--repeats`` times, builds the run's loaders with :func:`simlap_hf.data.prepare_data` (``--train_dir``, a tenth
held out for validation) and draws the first training batch, once with the limit raised above the folder's size
(every image decoded at load) and once as the package runs it (nothing decoded at load). Each measurement has a fresh
``datasets`` cache, so the imagefolder builder lists and indexes the files both times. Prints the medians and their
ratio; the cost of the check grows with the number of files, so for a million files the saving is about 50x what it
is for the default 20,000.

Example::

    python benchmarks/bench_folder_start.py                 # 20,000 images of 256 px, 3 repeats
    python benchmarks/bench_folder_start.py --images 2000   # a quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))


def write_folder(root: Path, images: int, size: int, seed: int = 0) -> None:
    """``images`` smooth-noise JPEGs of ``size`` px spread over 10 class folders ``root/<class>/<i>.jpg``."""
    rng = np.random.default_rng(seed)
    for index in range(images):
        folder = root / f"class_{index % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, size=(max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
        PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BILINEAR).save(folder / f"{index}.jpg", quality=90)


def time_to_first_batch(root: Path, cache: Path, check_every_image: bool) -> float:
    """Seconds from nothing to the first training batch of ``root``."""
    import datasets

    from simlap_hf.data import DataArguments, images, prepare_data

    datasets.config.HF_DATASETS_CACHE = str(cache)
    limit = images.EAGER_CHECK_MAX_IMAGES
    images.EAGER_CHECK_MAX_IMAGES = 10**12 if check_every_image else limit
    try:
        start = time.perf_counter()
        args = DataArguments(train_dir=str(root), train_val_split=0.1, input_size=32, dataloader_num_workers=0)
        bundle = prepare_data(args, num_channels=3, train_batch_size=30, eval_batch_size=256, seed=0)
        next(iter(bundle.train))
        return time.perf_counter() - start
    finally:
        images.EAGER_CHECK_MAX_IMAGES = limit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (JPEG quality 90)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import datasets

    from simlap_hf.data import images

    datasets.disable_progress_bars()

    if args.images <= images.EAGER_CHECK_MAX_IMAGES:
        parser.error(f"--images must exceed the limit of {images.EAGER_CHECK_MAX_IMAGES} to be started without it")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch) / "images"
        start = time.perf_counter()
        write_folder(root, args.images, args.size)
        print(
            f"wrote {args.images} JPEGs of {args.size} px in {time.perf_counter() - start:.1f} s; cpus {os.cpu_count()}"
        )
        warm_up = Path(scratch) / "warm_up"  # imports and first calls, untimed
        write_folder(warm_up, 40, 16)
        time_to_first_batch(warm_up, Path(scratch) / "cache_warm_up", check_every_image=False)
        times: dict[bool, list[float]] = {True: [], False: []}
        for repeat in range(args.repeats):
            for check in (True, False):
                cache = Path(scratch) / f"cache_{repeat}_{check}"
                times[check].append(time_to_first_batch(root, cache, check))
        checked, started = statistics.median(times[True]), statistics.median(times[False])
        print()
        print("| images | every image decoded at load, s | not decoded at load, s | faster start |")
        print("|---:|---:|---:|---:|")
        print(f"| {args.images:,} | {checked:.1f} | {started:.1f} | {checked / started:.1f}x |")


if __name__ == "__main__":
    main()
