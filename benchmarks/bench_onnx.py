"""ONNX export of a digits classifier: onnxruntime against PyTorch, and dynamic INT8 quantisation for CPU serving.

What is measured
----------------
A classifier on scikit-learn's digits (resnet10t at 16 x 16, one channel, trained from scratch with
``train_finetune.py`` unless ``--model_dir`` names a saved one) is exported with
``python -m simlap_hf.export --format onnx --quantize``: ``model.onnx`` (float32) and ``model.int8.onnx``
(onnxruntime's ``quantize_dynamic``, INT8 weights). The held-out digits split (the 20% the training scripts carve out
with the run's seed, 360 images) is preprocessed once by the model folder's image processor; then

* the largest absolute difference of the float32 ONNX logits from PyTorch's, and the top-1 accuracy of PyTorch,
  onnxruntime float32 and onnxruntime INT8 (with how many predictions INT8 changes);
* the time of one pass over the split in batches of ``--batch_size``: the median of ``--repeats`` passes (after one
  untimed pass) for PyTorch (``torch.no_grad``), onnxruntime float32 and onnxruntime INT8, all on ``--threads``
  CPU threads, alternated so that drift of the machine affects all three alike.

How to run
----------
From the repository root, with the package and the ``onnx`` extra installed::

    python benchmarks/bench_onnx.py                        # trains 8 epochs first: 1 to 3 minutes on 2 cores
    python benchmarks/bench_onnx.py --model_dir outputs/digits_classifier --seed 42 --json onnx.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def train_digits_classifier(output_dir: Path, epochs: int, seed: int) -> Path:
    """A resnet10t classifier of the digits at 16 x 16 (``train_finetune.py --from_scratch``), saved to
    ``output_dir``."""
    import train_finetune

    flags = ["--model_name", "resnet10t", "--from_scratch", "--dataset_name", "digits", "--num_channels", "1"]
    flags += ["--input_size", "16", "--stem_type", "", "--output_stride", "0", "--scale", "0.7", "1.0"]
    flags += ["--aa", "none", "--reprob", "0", "--mixup", "0", "--cutmix", "0", "--opt", "adam"]
    flags += ["--learning_rate", "0.003", "--weight_decay", "0.0005", "--warmup_epochs", "1"]
    flags += ["--num_train_epochs", str(epochs), "--per_device_train_batch_size", "96", "--seed", str(seed)]
    flags += ["--per_device_eval_batch_size", "256", "--checkpointing_epochs", "0", "--output_dir", str(output_dir)]
    train_finetune.run(flags)
    return output_dir


def digits_test_split(seed: int) -> tuple[list[Any], np.ndarray]:
    """The held-out digits images (PIL, mode L) and labels (N,): the validation split the scripts carve with
    ``seed``."""
    import PIL.Image

    from simlap_hf.data.arrays import carve_indices, digits_arrays
    from simlap_hf.data.registry import named_spec

    source = digits_arrays()
    train = source.splits["train"]
    _, rows = carve_indices(train.labels, named_spec("digits").validation_fraction, seed, source.description)
    return [PIL.Image.fromarray(train.images[row]) for row in rows], train.labels[rows]


def batched(run: Callable[[np.ndarray], np.ndarray], pixel_values: np.ndarray, batch_size: int) -> np.ndarray:
    """``run`` over ``pixel_values`` (N, C, S, S) in batches: (N, num_labels) outputs."""
    return np.concatenate([run(pixel_values[i : i + batch_size]) for i in range(0, len(pixel_values), batch_size)])


def compare(model_dir: Path, onnx_dir: Path, seed: int, batch_size: int, repeats: int, threads: int) -> dict[str, Any]:
    """Accuracy and timing of PyTorch, onnxruntime float32 and onnxruntime INT8 on the digits test split."""
    import onnxruntime

    from simlap_hf.export import QUANTIZED_ONNX_FILE
    from simlap_hf.image_processing_simlap import SimLAPImageProcessor
    from simlap_hf.saved_model import load_saved_model

    torch.set_num_threads(threads)
    images, labels = digits_test_split(seed)
    pixel_values = SimLAPImageProcessor.from_pretrained(model_dir)(images, return_tensors="np")["pixel_values"]
    model = load_saved_model(model_dir)

    def pytorch(batch: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(pixel_values=torch.from_numpy(batch)).logits.numpy()

    def session(file: Path) -> Callable[[np.ndarray], np.ndarray]:
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        runner = onnxruntime.InferenceSession(str(file), options, providers=["CPUExecutionProvider"])
        return lambda batch: runner.run(None, {"pixel_values": batch})[0]

    runs = {
        "pytorch": pytorch,
        "onnx": session(onnx_dir / "model.onnx"),
        "onnx_int8": session(onnx_dir / QUANTIZED_ONNX_FILE),
    }
    outputs = {name: batched(run, pixel_values, batch_size) for name, run in runs.items()}  # also the warm-up
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            batched(run, pixel_values, batch_size)
            seconds[name].append(time.perf_counter() - start)
    top1 = {name: float((logits.argmax(-1) == labels).mean() * 100) for name, logits in outputs.items()}
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {
        "images": len(labels),
        "max_abs_difference_onnx": float(np.abs(outputs["onnx"] - outputs["pytorch"]).max()),
        "max_abs_difference_int8": float(np.abs(outputs["onnx_int8"] - outputs["pytorch"]).max()),
        "top1": top1,
        "int8_changed_predictions": int((outputs["onnx_int8"].argmax(-1) != outputs["onnx"].argmax(-1)).sum()),
        "onnx_same_predictions": bool((outputs["onnx"].argmax(-1) == outputs["pytorch"].argmax(-1)).all()),
        "seconds": median,
        "speedup_int8_vs_onnx": median["onnx"] / median["onnx_int8"],
        "speedup_int8_vs_pytorch": median["pytorch"] / median["onnx_int8"],
        "model_bytes": {
            "onnx": (onnx_dir / "model.onnx").stat().st_size,
            "onnx_int8": (onnx_dir / QUANTIZED_ONNX_FILE).stat().st_size,
        },
        "batch_size": batch_size,
        "threads": threads,
        "repeats": repeats,
    }


def report(result: dict[str, Any]) -> str:
    """The markdown table of :func:`compare`'s result."""
    rows = [
        "| | PyTorch | onnxruntime float32 | onnxruntime INT8 |",
        "|---|---|---|---|",
        "| top-1 (%) | {pytorch:.2f} | {onnx:.2f} | {onnx_int8:.2f} |".format(**result["top1"]),
        "| ms per pass | {:.1f} | {:.1f} | {:.1f} |".format(
            *(1000 * result["seconds"][k] for k in ("pytorch", "onnx", "onnx_int8"))
        ),
        "| max abs logit difference from PyTorch | - | {:.2g} | {:.2g} |".format(
            result["max_abs_difference_onnx"], result["max_abs_difference_int8"]
        ),
        "| model file (KiB) | - | {:.0f} | {:.0f} |".format(
            result["model_bytes"]["onnx"] / 1024, result["model_bytes"]["onnx_int8"] / 1024
        ),
    ]
    change = result["top1"]["onnx_int8"] - result["top1"]["onnx"]
    summary = (
        f"{result['images']} digits test images, batches of {result['batch_size']}, {result['threads']} thread(s), "
        f"median of {result['repeats']} passes. INT8: accuracy {change:+.2f} points "
        f"({result['int8_changed_predictions']} predictions changed), "
        f"{result['speedup_int8_vs_onnx']:.2f}x the speed of float32 onnxruntime, "
        f"{result['speedup_int8_vs_pytorch']:.2f}x PyTorch's."
    )
    return "\n".join(rows) + "\n\n" + summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", help="A saved digits classifier (default: train one into a temporary folder).")
    parser.add_argument("--epochs", type=int, default=8, help="Training epochs when no --model_dir is given.")
    parser.add_argument("--seed", type=int, default=42, help="The run's seed: it chose the held-out split.")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="Write the result here as JSON.")
    args = parser.parse_args(argv)

    from simlap_hf.export import export_onnx

    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(args.model_dir) if args.model_dir else None
        if model_dir is None:
            model_dir = train_digits_classifier(Path(scratch) / "digits", args.epochs, args.seed)
        onnx_dir = export_onnx(model_dir, Path(scratch) / "onnx", quantize=True)
        result = compare(model_dir, onnx_dir, args.seed, args.batch_size, args.repeats, args.threads)
    print(report(result))
    print(f"max |onnxruntime - PyTorch| logit difference: {result['max_abs_difference_onnx']:.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
