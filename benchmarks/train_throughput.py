"""Throughput of finished training runs: images/s, time waiting for data, and achieved TFLOP/s against the chip's peak.

Reads what ``train_pretrain.py`` / ``train_finetune.py`` wrote into each run's output folder (``all_results.json``:
``train_images_per_second``, ``train_seconds``, ``train_data_wait_seconds``; ``config.json``: the model) and counts
the floating-point operations of one training step of that model at the run's batch size with
``torch.utils.flop_counter.FlopCounterMode`` (forward and backward of the job's loss; matrix products and
convolutions, which is where the work is). Achieved TFLOP/s = FLOPs per image x images/s, over the whole measured
training time (data waits, optimizer and logging included). Peak: a timed square matrix product in the run's
precision on the same device (the reachable peak) and, for known chips, the datasheet's dense figure.

Also reported per run: the step's consumption (images/s if no batch ever waited: images / (training time - wait))
against the loader's delivery (images/s of ``--loader-batches`` batches drawn from the run's training loader alone,
built from the same command-line flags, with the run's loader workers).

Example (each RUN is LABEL=OUTPUT_DIR; the flags after ``--`` rebuild the loader of the runs, optional)::

    python benchmarks/train_throughput.py --device cuda --batch-size 255 --precision bf16 \\
        simlap_bf16=out/pretrain_bf16 plain_bf16=out/ce_bf16 --json throughput.json \\
        -- configs/pretrain_cifar10_resnet18.yaml --dataset_name fashion_mnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from a source checkout
    sys.path.insert(0, str(REPO_ROOT))

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' datasheets, TFLOP/s, by name fragment.
DATASHEET_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}


def training_flops(run_dir: Path, batch_size: int, device: torch.device) -> float:
    """FLOPs of one training step (forward + backward of the job's loss) of the run's model on ``batch_size`` images
    of the run's input size, counted in float32 (the count does not depend on the precision)."""
    from torch.utils.flop_counter import FlopCounterMode

    from simlap_hf import SimLAPForImageClassification, SimLAPModel
    from simlap_hf.losses import classification_loss

    config = json.loads((run_dir / "config.json").read_text())
    architecture = (config.get("architectures") or ["SimLAPModel"])[0]
    model_class = SimLAPForImageClassification if "Classification" in architecture else SimLAPModel
    model = model_class.from_pretrained(str(run_dir)).to(device).train()
    processor = json.loads((run_dir / "preprocessor_config.json").read_text())
    size = int(processor["size"]["shortest_edge"])  # the network input side (the processor crops to it)
    channels = int(config.get("num_channels", 3))
    pixel_values = torch.randn(batch_size, channels, size, size, device=device)
    labels = torch.arange(batch_size, device=device) % model.config.num_labels
    counter = FlopCounterMode(display=False)
    with counter:
        if model_class is SimLAPModel:
            loss = model(pixel_values=pixel_values, labels=labels).loss
        else:
            loss = classification_loss(model(pixel_values=pixel_values).logits, labels, 0.0)
        loss.backward()
    return float(counter.get_total_flops())


def matmul_peak_tflops(device: torch.device, precision: str, size: int = 8192, repeats: int = 20) -> float | None:
    """TFLOP/s of a square matrix product in ``precision`` on ``device`` (a GPU); None on the CPU."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    b = torch.randn(size, size, device=device, dtype=DTYPES[precision])
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def datasheet_tflops(device: torch.device) -> float | None:
    """The datasheet's dense bf16/fp16 peak of a known GPU, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for fragment, value in DATASHEET_TFLOPS.items() if fragment in name), None)


def loader_images_per_second(flags: list[str], batches: int) -> float:
    """Images/s that the training loader of a ``train_pretrain.py`` command (``flags``: config file and flags) delivers
    alone, with its workers, after one warm-up batch."""
    from simlap_hf.data import prepare_data
    from simlap_hf.training import PRETRAIN_ARGUMENTS, parse_args

    model_args, data_args, args = parse_args(PRETRAIN_ARGUMENTS, flags)
    bundle = prepare_data(data_args, model_args.num_channels, args.per_device_train_batch_size, 1, args.seed)
    iterator = iter(bundle.train)
    next(iterator)
    images, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = next(iterator, None)
        if batch is None:
            break
        images += batch["pixel_values"].shape[0]
    return images / (time.perf_counter() - start)


def report(runs: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    """One row per run (see the module docstring) and the peaks they are measured against."""
    device = torch.device(args.device)
    peak = matmul_peak_tflops(device, args.precision)
    datasheet = datasheet_tflops(device)
    loader = loader_images_per_second(args.loader_flags, args.loader_batches) if args.loader_flags else None
    rows = []
    for label, run_dir in runs.items():
        results = json.loads((run_dir / "all_results.json").read_text())
        flops_per_image = training_flops(run_dir, args.batch_size, device) / args.batch_size
        images_per_s = float(results["train_images_per_second"])
        seconds, wait = float(results["train_seconds"]), float(results.get("train_data_wait_seconds", 0.0))
        achieved = flops_per_image * images_per_s / 1e12
        rows.append(
            {
                "run": label,
                "images_per_s": images_per_s,
                "train_seconds": seconds,
                "data_wait_seconds": wait,
                "data_wait_fraction": wait / max(seconds, 1e-9),
                "step_images_per_s": images_per_s * seconds / max(seconds - wait, 1e-9),
                "gflop_per_image": flops_per_image / 1e9,
                "achieved_tflops": achieved,
                "of_matmul_peak": achieved / peak if peak else None,
                "of_datasheet_peak": achieved / datasheet if datasheet else None,
            }
        )
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": args.precision,
        "matmul_peak_tflops": peak,
        "datasheet_tflops": datasheet,
        "loader_images_per_s": loader,
        "runs": rows,
    }


def print_table(result: dict[str, Any]) -> None:
    """The report as markdown."""

    def number(value: float | None, pattern: str) -> str:
        return "n/a" if value is None else pattern.format(value)

    print(
        f"device {result['device']}, {result['precision']}: matmul peak "
        f"{number(result['matmul_peak_tflops'], '{:.0f}')} TFLOP/s, datasheet "
        f"{number(result['datasheet_tflops'], '{:.0f}')} TFLOP/s; training loader alone: "
        f"{number(result['loader_images_per_s'], '{:.0f}')} images/s"
    )
    print()
    print(
        "| run | images/s | waiting for data | step alone, images/s | GFLOP/image | TFLOP/s | "
        "of matmul peak | of datasheet peak |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for row in result["runs"]:
        print(
            f"| {row['run']} | {row['images_per_s']:.0f} | {100 * row['data_wait_fraction']:.1f}% | "
            f"{row['step_images_per_s']:.0f} | {row['gflop_per_image']:.2f} | {row['achieved_tflops']:.2f} | "
            f"{number(row['of_matmul_peak'] and 100 * row['of_matmul_peak'], '{:.1f}%')} | "
            f"{number(row['of_datasheet_peak'] and 100 * row['of_datasheet_peak'], '{:.1f}%')} |"
        )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    loader_flags = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="LABEL=OUTPUT_DIR of a finished run")
    parser.add_argument("--batch-size", type=int, required=True, help="per-process training batch of the runs")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="bf16", help="of the peak measurement")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loader-batches", type=int, default=30, help="batches drawn to time the loader alone")
    parser.add_argument("--json", help="write the report here")
    args = parser.parse_args(argv)
    args.loader_flags = loader_flags
    runs = {}
    for item in args.runs:
        label, _, folder = item.partition("=")
        if not folder or not (Path(folder) / "all_results.json").is_file():
            parser.error(f"run {item!r}: expected LABEL=OUTPUT_DIR of a finished run (with all_results.json)")
        runs[label] = Path(folder)
    result = report(runs, args)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
