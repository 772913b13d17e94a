"""The training path where ``datasets`` and ``evaluate`` are not installed (as on a GPU machine's image): array sources
(scikit-learn's digits, Fashion-MNIST's IDX files) train through the same scripts with the same results, any other
source fails with one line naming the missing library, and benchmarks/gpu_check.sh runs its parts there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_run_flags

from simlap_hf.data import DataArguments, create_train_dataloader
from simlap_hf.data.arrays import ArrayImages, ArraySplit, load_array_source
from simlap_hf.data.registry import FASHION_MNIST_DEFAULT_DIR
from simlap_hf.evaluation import metrics

REPO_ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path(os.environ.get("SIMLAP_FASHION_MNIST_DIR") or FASHION_MNIST_DEFAULT_DIR)
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(), reason="Fashion-MNIST IDX files not installed"
)

# Runs a script with `datasets` and `evaluate` made unimportable, as benchmarks/gpu_check.sh --cpu-smoke does.
WITHOUT_LIBRARIES = (
    "import runpy, sys; sys.modules['datasets'] = None; sys.modules['evaluate'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


def run_script(script: str, flags: list[str], without_libraries: bool) -> subprocess.CompletedProcess:
    """``python script flags`` in a child process (one thread, so both paths compute alike)."""
    prefix = ["-c", WITHOUT_LIBRARIES] if without_libraries else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run(
        [sys.executable, *prefix, script, *flags], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(
            ["--dataset_name", "digits", "--max_train_samples", "96", "--sampler", "pk", "--pk_images_per_class", "2"],
            id="digits-pk",
        ),
        pytest.param(
            ["--dataset_name", "fashion_mnist", "--max_train_samples", "96", "--max_eval_samples", "48"],
            id="fashion_mnist",
            marks=needs_fashion_mnist,
        ),
    ],
)
def test_array_sources_train_to_the_same_weights_without_datasets(tmp_path, source):
    outputs = {}
    for without in (False, True):
        output_dir = tmp_path / ("arrays" if without else "standard")
        flags = tiny_run_flags(output_dir, num_train_epochs=1, num_channels=1) + source
        done = run_script("train_pretrain.py", flags, without_libraries=without)
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[without] = output_dir
    standard, arrays = outputs[False], outputs[True]
    assert (arrays / "model.safetensors").read_bytes() == (standard / "model.safetensors").read_bytes()
    results = {name: json.loads((folder / "all_results.json").read_text()) for name, folder in outputs.items()}
    for metric in ("eval_top1", "eval_top5", "eval_knn_top1", "global_step"):
        assert results[True][metric] == results[False][metric], metric
    assert 0.0 <= results[True]["train_data_wait_fraction"] <= 1.0


def test_other_sources_name_the_missing_library_in_one_line(tmp_path):
    done = run_script(
        "train_pretrain.py", tiny_run_flags(tmp_path / "run", train_dir=tmp_path / "images"), without_libraries=True
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: --train_dir") and "pip install datasets" in lines[-1]
    assert "Traceback" not in done.stderr


def test_array_source_resolution_and_errors(tmp_path):
    digits = load_array_source(DataArguments(dataset_name="digits"))
    assert digits.splits["train"].images.shape == (1797, 8, 8) and digits.validation_fraction == 0.2
    with pytest.raises(ValueError, match=r"--dataset_name 'org/name' needs the 'datasets' library"):
        load_array_source(DataArguments(dataset_name="org/name"))


def test_pk_batches_read_the_labels_of_arrays_without_decoding():
    labels = np.repeat(np.arange(4), 6)
    split = ArraySplit(np.zeros((24, 4, 4), dtype=np.uint8), labels)

    def refuse(image):
        raise AssertionError("the sampler decoded an image")

    loader = create_train_dataloader(
        ArrayImages(split, refuse),
        DataArguments(sampler="pk", pk_images_per_class=2, ra=3),
        batch_size=12,
        class_ids=split.labels,
    )
    batches = list(loader.batch_sampler)
    assert batches and all(len(batch) == 12 for batch in batches)
    assert all(len(set(labels[batch].tolist())) == 2 for batch in batches)  # P = 12 / (K 2 x ra 3) = 2 classes


def test_metrics_do_not_need_evaluate(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 4, (300, 7), generator=generator).float()  # many ties
    labels = torch.randint(0, 7, (300,), generator=generator)
    monkeypatch.setitem(sys.modules, "evaluate", None)  # any import of evaluate now fails
    result = metrics.classification_metrics(logits, labels)
    assert result["top1"] == pytest.approx(100.0 * (logits.argmax(dim=1) == labels).double().mean().item(), abs=1e-9)
    few_classes = logits[:, :3]
    assert metrics.classification_metrics(few_classes, labels % 3)["top5"] == 100.0


@pytest.mark.slow
def test_gpu_check_runs_every_part_on_the_cpu_without_datasets(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: the real training scripts (SimLAP and plain cross-entropy, bf16 and fp16,
    torch.compile), the throughput report and the loss benchmark, all with datasets and evaluate unimportable."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "GPU_CHECK_WORK": str(work), "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu-smoke", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    summary = json.loads((out / "summary.json").read_text())
    states = {part["name"]: part["status"] for part in summary["parts"]}
    assert done.returncode == 0 and set(states.values()) == {"ok"}, (states, done.stdout[-4000:])
    expected = {"pretrain_bf16", "pretrain_compile_bf16", "plain_bf16", "pretrain_fp16", "plain_fp16"}
    assert expected | {"info", "throughput_bf16", "throughput_fp16", "loss"} == set(states)
    for name in expected:
        assert (work / "runs" / name / "model.safetensors").is_file()
    throughput = json.loads((out / "throughput_bf16.json").read_text())
    rows = {row["run"]: row for row in throughput["runs"]}
    assert set(rows) == {"simlap_bf16", "simlap_compile_bf16", "plain_bf16"}
    assert throughput["loader_images_per_s"] > 0
    # FLOPs of the SimLAP step exceed the plain step's on the same backbone (projector, filter, loss, head).
    assert rows["simlap_bf16"]["gflop_per_image"] > rows["plain_bf16"]["gflop_per_image"] > 0
    assert "| simlap_compile_bf16 |" in (out / "report.md").read_text()
