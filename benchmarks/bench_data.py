"""Throughput of the SimLAP-HF training input pipeline (decode + augment + collate).

Builds a synthetic data set of random 32x32 RGB PNG images (saved with ``save_to_disk`` into a temporary
directory and memory-mapped back, like a real local data set), attaches the training transform with
``simlap_hf.data.with_image_transforms`` and iterates ``simlap_hf.data.create_train_dataloader`` (repeated
augmentation sampler, batch ``--batch-size``, ``--ra`` copies per image) with 0, 1, 2, ... loader workers.

Images/s counts augmented samples (``ra`` copies of an image count ``ra`` times) that reach the collated
batch ``{"pixel_values": Tensor(B, 3, 32, 32), "labels": LongTensor(B)}`` (uint8 on the loader's path, float32
on the earlier one). The first batch of every
run is a warm-up (worker start-up) and is not timed.

Prints two markdown tables: the loader's path (each image decoded once per repeated-augmentation group, samples
left as uint8 for the device to normalise) against the earlier path (every copy decoded, normalised to float32 in
the loader), and each change alone, for 32x32 PNGs and 224x224 JPEGs (``--compare-formats``), measured side by side
on one core (0 workers, 1 torch thread), alternated ``--repeats`` times (medians; the last column divides images
per second of the process's CPU time, which moves less than wall-clock time on a machine shared with other jobs);
then images/s against loader workers (0, 1, 2, ...) on the loader's path.

Example::

    python benchmarks/bench_data.py            # 2,048 images, batch 255 (256 rounded to ra=3), 1 epoch each
    python benchmarks/bench_data.py --quick    # 768 images, for a smoke test
"""

import argparse
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

from simlap_hf.data import DataArguments, create_train_dataloader, with_image_transforms  # noqa: E402


def build_dataset(
    num_images: int, size: int, num_classes: int, seed: int, folder: str, image_format: str = "PNG"
) -> datasets.DatasetDict:
    """Random RGB images (size x size, PNG or JPEG) with random labels, saved to ``folder``, loaded memory-mapped.

    The pixels are smooth noise (a small random image upscaled), so that JPEG files have a realistic size."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(num_images, max(2, size // 8), max(2, size // 8), 3), dtype=np.uint8)
    encoded = []
    for small in coarse:
        image = PIL.Image.fromarray(small).resize((size, size), PIL.Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format=image_format, **({"quality": 90} if image_format == "JPEG" else {}))
        encoded.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(num_classes)])}
    )
    labels = rng.integers(0, num_classes, size=num_images).tolist()
    split = datasets.Dataset.from_dict({"image": encoded, "label": labels}, features=features)
    datasets.DatasetDict({"train": split}).save_to_disk(folder)
    return datasets.load_from_disk(folder)


def measure(dataset: datasets.Dataset, args: DataArguments, batch_size: int, epochs: int) -> tuple[float, int, float]:
    """Iterate the training loader for ``epochs`` epochs; return (images per second, timed images, images per
    second of this process's CPU time). The CPU-time rate leaves out the time the process waits for a core, so it
    moves less than the wall-clock rate on a machine shared with other jobs."""
    loader = create_train_dataloader(dataset, args, batch_size=batch_size, seed=0)
    timed_images = 0
    elapsed = cpu = 0.0
    for epoch in range(epochs):
        loader.batch_sampler.sampler.set_epoch(epoch)
        iterator = iter(loader)
        first = next(iterator)  # warm-up: worker start-up and first decode
        assert first["pixel_values"].shape[0] == batch_size
        start, start_cpu = time.perf_counter(), time.process_time()
        for batch in iterator:
            timed_images += batch["pixel_values"].shape[0]
        elapsed += time.perf_counter() - start
        cpu += time.process_time() - start_cpu
        del iterator
    return timed_images / max(elapsed, 1e-9), timed_images, timed_images / max(cpu, 1e-9)


PATHS = {  # name: (decode once per group, uint8 samples)
    "earlier (decode per copy, float32)": (False, False),
    "decode once, float32": (True, False),
    "decode per copy, uint8": (False, True),
    "now (decode once, uint8)": (True, True),
}


def compare_paths(
    image_format: str, image_size: int, input_size: int, options: argparse.Namespace, folder: str
) -> tuple[dict[str, float], dict[str, float]]:
    """Median images/s on one core of every path of :data:`PATHS`, alternated ``options.repeats`` times: per
    second of wall-clock time and per second of CPU time."""
    from simlap_hf.data import ImageTransform, create_train_transform

    count = options.num_images if image_size <= 64 else options.num_images // 4
    data = build_dataset(
        count, image_size, 10, options.seed, os.path.join(folder, f"{image_format}{image_size}"), image_format
    )["train"]
    raw = data.cast_column("image", datasets.Image(decode=False))
    speeds: dict[str, list[float]] = {name: [] for name in PATHS}
    cpu_speeds: dict[str, list[float]] = {name: [] for name in PATHS}
    for _ in range(options.repeats):
        for name, (decode_once, uint8) in PATHS.items():
            args = DataArguments(
                dataset_name="bench", input_size=input_size, ra=options.ra, aa=options.aa, uint8_transfer=uint8
            )
            view = raw.with_transform(ImageTransform(create_train_transform(args), decode_once=decode_once))
            speed, _, cpu_speed = measure(view, args, options.batch_size, 1)
            speeds[name].append(speed)
            cpu_speeds[name].append(cpu_speed)
    return (
        {name: float(np.median(values)) for name, values in speeds.items()},
        {name: float(np.median(values)) for name, values in cpu_speeds.items()},
    )


def main() -> None:
    """Parse the options, build the data set, time every worker count, print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, default=2048, help="distinct images in the data set (2048)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the stored images in pixels (32)")
    parser.add_argument("--input-size", type=int, default=32, help="network input size after augmentation (32)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=256,
        help="batch size (256); rounded down to a multiple of --ra as the loader requires (256 -> 255 for ra 3)",
    )
    parser.add_argument("--ra", type=int, default=3, help="repeated augmentation count (3)")
    parser.add_argument("--workers", type=str, default="0,1,2", help="worker counts, comma-separated ('' skips)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per setting; one epoch = ra passes (1)")
    parser.add_argument("--aa", type=str, default="rand-m9-mstd0.5-inc1", help="RandAugment policy or 'none'")
    parser.add_argument("--quick", action="store_true", help="short run: 768 images, batch 96 (before rounding)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data (0)")
    parser.add_argument(
        "--compare-formats",
        default="png32,jpeg224",
        help="decode-once comparison: FORMAT+SIZE items (png32, jpeg224; '' skips it)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="alternations of the decode comparison (3)")
    options = parser.parse_args()
    if options.quick:
        options.num_images, options.batch_size, options.repeats = 768, 96, 1
    workers = [int(w) for w in options.workers.split(",") if w.strip()]
    args = DataArguments(dataset_name="bench", input_size=options.input_size, ra=options.ra, aa=options.aa)

    print(
        f"# bench_data: {options.num_images} images {options.image_size}x{options.image_size} RGB PNG, "
        f"batch {options.batch_size}" + f", ra {options.ra}, input {options.input_size}, aa {options.aa}"
    )
    print(
        f"# python {platform.python_version()}, torch {torch.__version__}, cores {os.cpu_count()}, "
        f"torch threads {torch.get_num_threads()}"
    )
    with tempfile.TemporaryDirectory(prefix="simlap_bench_") as folder:
        comparisons = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        for item in filter(None, options.compare_formats.split(",")):
            image_format = "JPEG" if item.startswith("jpeg") else "PNG"
            size = int(item.removeprefix("jpeg").removeprefix("png"))
            speeds, cpu_speeds = compare_paths(image_format, size, min(size, 224), options, folder)
            comparisons.append((f"{size}x{size} {image_format}", speeds, cpu_speeds))
            print(f"# {item}: " + ", ".join(f"{name} {speed:.0f}" for name, speed in speeds.items()), flush=True)
        torch.set_num_threads(threads)
        if comparisons:
            names = list(PATHS)
            print()
            print(
                f"| images (ra {options.ra}, 1 core), images/s | "
                + " | ".join(names)
                + " | now / earlier | now / earlier, CPU time |"
            )
            print("|---|" + "---:|" * (len(names) + 2))
            for label, speeds, cpu_speeds in comparisons:
                ratio = speeds[names[-1]] / speeds[names[0]]
                cpu_ratio = cpu_speeds[names[-1]] / cpu_speeds[names[0]]
                print(
                    f"| {label} | "
                    + " | ".join(f"{speeds[n]:,.0f}" for n in names)
                    + f" | {ratio:.2f}x | {cpu_ratio:.2f}x |"
                )
            print()
        if not workers:
            return
        start = time.perf_counter()
        data = build_dataset(options.num_images, options.image_size, 10, options.seed, folder)
        print(f"# built and saved the data set in {time.perf_counter() - start:.1f} s")
        train = with_image_transforms(data, args, augmented_split="train")["train"]
        rows = []
        for count in workers:
            args.dataloader_num_workers = count
            speed, images, _ = measure(train, args, options.batch_size, options.epochs)
            rows.append((count, speed, images))
            print(f"# workers={count}: {images} images timed, {speed:.0f} images/s", flush=True)
    base = next((speed for count, speed, _ in rows if count == 0), rows[0][1])
    print()
    print("| workers | images/s | ratio vs 0 workers |")
    print("|--------:|---------:|-------------------:|")
    for count, speed, _ in rows:
        print(f"| {count} | {speed:,.0f} | {speed / base:.2f}x |")


if __name__ == "__main__":
    main()
