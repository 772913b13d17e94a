"""Two-process checks (torchrun, CPU, gloo) of the distributed pieces: the sharded kNN evaluation, the key gather
with gradient, BatchNorm with global batch statistics (``--sync_bn``), per-process random streams.

Each test starts ``torchrun --nproc_per_node 2 tests/test_distributed.py MODE OUTPUT_DIR``; the workers (the
``worker_*`` functions below, selected by MODE) write one JSON report per process, which the test reads.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import two_process_command

ROOT = Path(__file__).resolve().parents[1]
U32 = 2.0**-24  # float32 unit roundoff
GLOO_ABORT = "terminate called without an active exception"


def run_torchrun(mode: str, output_dir: Path, timeout: int = 300) -> list[dict]:
    """Run the workers of ``mode`` once (no retry: every run must end cleanly) and return their reports."""
    command = two_process_command(Path(__file__).resolve(), mode, output_dir)
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]
    assert GLOO_ABORT not in completed.stderr
    return [json.loads((output_dir / f"{mode}_{rank}.json").read_text()) for rank in (0, 1)]


# --------------------------------------------------------------------------------------------------------------
# Sharded kNN
# --------------------------------------------------------------------------------------------------------------


def worker_knn(output_dir: Path) -> dict:
    """Each process holds an uneven shard of the train set and of the queries; the sharded kNN must give every
    process the scores a single process computes for its queries with the whole train set."""
    import torch.distributed as dist

    from simlap_hf.evaluation import knn_accuracy, knn_classify

    rank = dist.get_rank()
    report: dict = {}
    gen = torch.Generator().manual_seed(6)  # overlapping classes (57% accuracy); smallest k-th margin 2.5e-4
    classes, dim, k, temperature = 6, 32, 10, 0.07
    centres = 0.3 * torch.randn(classes, dim, generator=gen)
    train_labels = torch.randint(classes, (301,), generator=gen)
    train = centres[train_labels] + torch.randn(301, dim, generator=gen)
    query_labels = torch.randint(classes, (53,), generator=gen)
    queries = centres[query_labels] + torch.randn(53, dim, generator=gen)
    train_split, query_split = [140, 161], [20, 33]  # uneven on purpose
    mine = slice(sum(train_split[:rank]), sum(train_split[: rank + 1]))
    my_queries = slice(sum(query_split[:rank]), sum(query_split[: rank + 1]))

    sims = (
        torch.nn.functional.normalize(queries.double(), dim=1) @ torch.nn.functional.normalize(train.double(), dim=1).T
    )
    top = sims.topk(k + 1, dim=1).values
    report["kth_margin"] = (top[:, k - 1] - top[:, k]).min().item()

    single = knn_classify(train, train_labels, queries, classes, knn_k=k, knn_temperature=temperature)[my_queries]
    errors = []
    for batch_size, block in ((None, 1 << 24), (7, 1 << 24), (None, 2 * 161 * 3)):  # 1 chunk, 7 queries, 3 queries
        sharded = knn_classify(
            train[mine],
            train_labels[mine],
            queries[my_queries],
            classes,
            knn_k=k,
            knn_temperature=temperature,
            batch_size=batch_size,
            sharded=True,
            max_block_elements=block,
        )
        errors.append(((sharded - single).abs() / single.abs().clamp_min(1e-30)).max().item())
        report["zero_pattern_equal"] = bool(torch.equal(sharded == 0, single == 0))
    report["knn_max_rel_error"] = max(errors)
    report["accuracy_sharded"] = knn_accuracy(
        train[mine],
        train_labels[mine],
        queries[my_queries],
        query_labels[my_queries],
        classes,
        knn_k=k,
        knn_temperature=temperature,
        batch_size=5,
        sharded=True,
    )
    report["accuracy_single"] = knn_accuracy(
        train, train_labels, queries, query_labels, classes, knn_k=k, knn_temperature=temperature
    )

    # Exact cosines (+-1 vectors in 16 dimensions: multiples of 1/16) with duplicates across the two shards:
    # ties at the k-th neighbour must be broken the same way (lower global index) as by one process.
    base = torch.randint(0, 2, (10, 16), generator=gen).float() * 2 - 1
    tie_train = torch.cat([base, base, base[:4]])  # 24 rows: rank 0 holds 11, rank 1 holds 13
    tie_labels = torch.randint(0, 4, (24,), generator=gen)
    tie_queries = torch.cat([base[:3], torch.randint(0, 2, (5, 16), generator=gen).float() * 2 - 1])
    tie_mine = slice(0, 11) if rank == 0 else slice(11, 24)
    tie_my_queries = slice(0, 3) if rank == 0 else slice(3, 8)
    expected = knn_classify(tie_train, tie_labels, tie_queries, 4, knn_k=5, knn_temperature=0.5)[tie_my_queries]
    got = knn_classify(
        tie_train[tie_mine],
        tie_labels[tie_mine],
        tie_queries[tie_my_queries],
        4,
        knn_k=5,
        knn_temperature=0.5,
        batch_size=2,
        sharded=True,
    )
    report["ties_max_rel_error"] = ((got - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
    report["ties_zero_pattern_equal"] = bool(torch.equal(got == 0, expected == 0))

    # k larger than a shard (rank 0 holds 2 rows) but not than the whole train set.
    small = knn_classify(
        train[:2] if rank == 0 else train[2:9],
        train_labels[:2] if rank == 0 else train_labels[2:9],
        queries[my_queries],
        classes,
        knn_k=5,
        knn_temperature=temperature,
        sharded=True,
    )
    small_expected = knn_classify(train[:9], train_labels[:9], queries, classes, knn_k=5, knn_temperature=temperature)
    report["small_shard_max_rel_error"] = (
        ((small - small_expected[my_queries]).abs() / small_expected[my_queries].abs().clamp_min(1e-30)).max().item()
    )
    return report


def test_sharded_knn_equals_single_process_knn(tmp_path):
    reports = run_torchrun("knn", tmp_path)
    # Same neighbours everywhere (the k-th cosine is separated from the next by far more than rounding), so the
    # scores differ only by the rounding of the cosines computed in differently shaped matmuls: the bound of
    # tests/test_evaluation.py::knn_rtol, (2 D / T + 2 k + 8) u = 6.5e-5 for D = 32, T = 0.07, k = 10.
    rtol = (2 * 32 / 0.07 + 2 * 10 + 8) * U32
    for report in reports:
        assert report["kth_margin"] > 10 * 32 * U32  # ten times the rounding of a 32-dimensional cosine
        assert report["knn_max_rel_error"] <= rtol, report
        assert report["zero_pattern_equal"] and report["ties_zero_pattern_equal"]
        assert report["accuracy_sharded"] == report["accuracy_single"]
        # Exact cosines: only the summation order of the 5 weights may differ.
        assert report["ties_max_rel_error"] <= 2 * 5 * U32, report
        assert report["small_shard_max_rel_error"] <= (2 * 32 / 0.07 + 2 * 5 + 8) * U32, report
    assert reports[0]["accuracy_sharded"] == reports[1]["accuracy_sharded"]


# --------------------------------------------------------------------------------------------------------------
# Key gather with gradient
# --------------------------------------------------------------------------------------------------------------


def worker_gather(output_dir: Path) -> dict:
    """Each process holds half of a batch; keys gathered with gradient. The mean of the per-process losses, the
    gradient of each process's embeddings and the data-parallel (averaged) weight gradient must equal those of one
    process holding the whole batch, for the equal-size collectives, their gloo fallbacks and the variable-size
    gather; the equal-size path must use exactly one all-gather forward and one reduce-scatter backward."""
    import torch.distributed as dist

    from simlap_hf import distributed, losses

    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    local, features, dim, classes = 6, 5, 8, 3
    inputs = torch.randn(world * local, features, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, classes, (world * local,), generator=gen)
    pair_labels = losses.sample_pair_labels(labels, "arbitrary", classes, generator=gen)
    gates = torch.rand(world * local, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(dim, features, generator=gen, dtype=torch.float64)

    reference_weight = weight.clone().requires_grad_(True)
    reference_embeddings = inputs @ reference_weight.T
    reference_embeddings.retain_grad()
    reference = losses.simlap_loss(reference_embeddings, labels, pair_labels, gates)
    reference.backward()

    part = slice(rank * local, (rank + 1) * local)
    calls: dict[str, int] = {}
    originals = {}
    for name in (
        "all_gather_single",
        "all_gather_into_tensor",
        "reduce_scatter_single",
        "reduce_scatter_tensor",
        "all_gather",
        "all_reduce",
    ):
        if hasattr(dist, name):
            originals[name] = getattr(dist, name)

            def counted(*args, _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return originals[_name](*args, **kwargs)

            setattr(dist, name, counted)

    report: dict = {}
    gradients: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    backend = str(dist.get_backend())
    try:
        for mode in ("equal", "fallback", "variable"):
            distributed._NO_GATHER_INTO_TENSOR.discard(backend)
            distributed._NO_REDUCE_SCATTER_TENSOR.discard(backend)
            if mode == "fallback":  # as on a backend without the single-tensor collectives
                distributed._NO_GATHER_INTO_TENSOR.add(backend)
                distributed._NO_REDUCE_SCATTER_TENSOR.add(backend)
            local_weight = weight.clone().requires_grad_(True)
            embeddings = inputs[part] @ local_weight.T
            embeddings.retain_grad()
            equal = mode != "variable"
            calls.clear()
            keys = distributed.gather_with_grad(embeddings, equal_sizes=equal)
            key_labels = distributed.gather_labels(labels[part], equal_sizes=equal)
            forward_calls = dict(calls)
            terms = losses.simlap_contrastive_terms(
                embeddings, labels[part], pair_labels[part], gates[part], 0.1, keys, key_labels
            )
            loss = distributed.distributed_mean(terms.loss_sum, terms.num_positives)
            calls.clear()
            loss.backward()
            backward_calls = {name: count for name, count in calls.items() if name != "all_reduce"}
            # Data-parallel training averages the parameter gradients over processes (DDP's all-reduce / world).
            grad = local_weight.grad.clone()
            originals["all_reduce"](grad)
            grad /= world
            mean_loss = loss.detach().clone()
            originals["all_reduce"](mean_loss)
            mean_loss /= world
            errors = torch.stack(
                [
                    (mean_loss - reference.detach()).abs() / reference.detach().abs(),
                    # The objective is the mean of the per-process losses: its gradient is each process's / world.
                    (
                        (embeddings.grad / world - reference_embeddings.grad[part]).abs().max()
                        / reference_embeddings.grad.abs().max()
                    ),
                    (grad - reference_weight.grad).abs().max() / reference_weight.grad.abs().max(),
                ]
            )
            originals["all_reduce"](errors, op=dist.ReduceOp.MAX)
            report[mode] = {
                "loss_rel_error": errors[0].item(),
                "embedding_grad_rel_error": errors[1].item(),
                "weight_grad_rel_error": errors[2].item(),
                "forward_calls": forward_calls,
                "backward_calls": backward_calls,
            }
            gradients[mode] = (embeddings.grad.clone(), grad)
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
        distributed._NO_GATHER_INTO_TENSOR.discard(backend)
        distributed._NO_REDUCE_SCATTER_TENSOR.discard(backend)
    # With two processes every cross-process sum has two terms (commutative in floating point): the three gathers
    # must give bit-identical gradients.
    report["modes_bit_identical"] = all(
        torch.equal(gradients["equal"][i], gradients[mode][i]) for mode in ("fallback", "variable") for i in (0, 1)
    )
    return report


def test_gather_with_grad_equals_one_process_with_the_whole_batch(tmp_path):
    reports = run_torchrun("gather", tmp_path)
    for report in reports:
        for mode in ("equal", "fallback", "variable"):
            # The loss computes its cosines and log-sum-exps in float32 by design (even for float64 inputs). One
            # process and two differ only in how sums are grouped: a logit is 1/T = 10 times a cosine made of
            # K = 8 products over keys from N = 12 rows, so rounding moves it by about 10 * (8 + 12) * u = 1.2e-5
            # relative at worst (2x for the two evaluations); a wrong or missing gradient term would be O(1).
            tolerance = 2 * 10 * (8 + 12) * U32
            for name in ("loss_rel_error", "embedding_grad_rel_error", "weight_grad_rel_error"):
                assert report[mode][name] < tolerance, (mode, report[mode])
        single = (
            "all_gather_single" if "all_gather_single" in report["equal"]["forward_calls"] else "all_gather_into_tensor"
        )
        # Equal sizes: one single-tensor all-gather for the keys and one for the labels, no size exchange, and one
        # reduce-scatter in the backward.
        assert report["equal"]["forward_calls"] == {single: 2}, report["equal"]
        assert set(report["equal"]["backward_calls"]) <= {"reduce_scatter_single", "reduce_scatter_tensor"}
        assert sum(report["equal"]["backward_calls"].values()) == 1, report["equal"]
        assert report["fallback"]["forward_calls"] == {"all_gather": 2}, report["fallback"]
        assert report["modes_bit_identical"]
        # Variable sizes: a size exchange and a padded gather, for the keys and for the labels.
        assert report["variable"]["forward_calls"] == {single: 4}, report["variable"]


# --------------------------------------------------------------------------------------------------------------
# --sync_bn: BatchNorm statistics of the global batch
# --------------------------------------------------------------------------------------------------------------


def test_converting_timm_fused_batchnorm_act_keeps_outputs_and_activations():
    import timm
    from timm.layers import BatchNormAct2d
    from timm.layers import convert_sync_batchnorm as timm_convert

    from simlap_hf.sync_batchnorm import DistributedBatchNormAct, convert_distributed_batchnorm

    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", num_classes=0).eval()
    fused = [m for m in model.modules() if isinstance(m, BatchNormAct2d)]
    activations = sum(not isinstance(m.act, torch.nn.Identity) for m in fused)
    assert len(fused) == 49 and activations == 33  # efficientnet_b0: 49 fused layers, 33 with an activation
    images = torch.randn(2, 3, 64, 64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        expected = model(images)
        model.train()
        expected_train = model(images)  # batch statistics (and one running-statistics update)
    model.eval()

    converted = convert_distributed_batchnorm(model)
    converted.load_state_dict(state)  # undo the running-statistics update of the train-mode call
    layers = [m for m in converted.modules() if isinstance(m, DistributedBatchNormAct)]
    assert len(layers) == 49 and not any(isinstance(m, BatchNormAct2d) for m in converted.modules())
    assert sum(not isinstance(m.act, torch.nn.Identity) for m in layers) == activations
    with torch.no_grad():
        # Same kernels on the same inputs (F.batch_norm, then the same drop/act modules): bit-identical, so no
        # tolerance. Eval uses the running statistics; one process in training the local batch statistics.
        assert torch.equal(converted.eval()(images), expected)
        state_before_train = {k: v.clone() for k, v in converted.state_dict().items()}
        converted.train()
        torch.testing.assert_close(converted(images), expected_train, rtol=0, atol=0)
    assert set(state_before_train) == set(converted.state_dict())  # same keys: checkpoints stay compatible

    # The GPU path (timm's converter, whose SyncBatchNormAct calls drop and act after the synchronised BatchNorm)
    # keeps the activations too. (torch's converter makes plain SyncBatchNorm layers, whose forward never calls the
    # act it carries over as a child; SyncBatchNorm cannot run on the CPU, so that is not exercised here.)
    fresh = timm.create_model("efficientnet_b0", num_classes=0)
    synced = timm_convert(fresh)
    kept = [m for m in synced.modules() if isinstance(m, torch.nn.SyncBatchNorm)]
    assert len(kept) == 49 and all(type(m).__name__ == "SyncBatchNormAct" for m in kept)
    assert sum(not isinstance(m.act, torch.nn.Identity) for m in kept) == activations


def worker_syncbn(output_dir: Path) -> dict:
    """DistributedBatchNorm on uneven shards (3 and 5 samples) against BatchNorm on the 8 samples together:
    outputs, input and parameter gradients, running statistics; float64 and float32."""
    import torch.distributed as dist

    from simlap_hf.sync_batchnorm import DistributedBatchNorm

    rank = dist.get_rank()
    report = {}
    for dtype in (torch.float64, torch.float32):
        gen = torch.Generator().manual_seed(1)
        for shape, layer_type in (((8, 4, 3, 3), torch.nn.BatchNorm2d), ((8, 6), torch.nn.BatchNorm1d)):
            inputs = torch.randn(*shape, generator=gen, dtype=dtype) * 3 + 1
            upstream = torch.randn(*shape, generator=gen, dtype=dtype)
            reference = layer_type(shape[1], momentum=0.3).to(dtype)
            with torch.no_grad():
                reference.weight.uniform_(0.5, 1.5, generator=gen)
                reference.bias.uniform_(-1, 1, generator=gen)
            layer = DistributedBatchNorm(shape[1], momentum=0.3).to(dtype)
            layer.load_state_dict(reference.state_dict())
            whole = inputs.clone().requires_grad_(True)
            (reference(whole) * upstream).sum().backward()
            mine = slice(0, 3) if rank == 0 else slice(3, 8)
            part = inputs[mine].clone().requires_grad_(True)
            output = layer(part)
            # The objective is the sum over processes: each process's loss is its part of the sum.
            (output * upstream[mine]).sum().backward()
            weight_grad = torch.cat([layer.weight.grad, layer.bias.grad])
            dist.all_reduce(weight_grad)  # parameter gradients summed over processes (the objective is the sum)
            # The reference's output on the whole batch with batch statistics (no second running-statistics update).
            reference_output = torch.nn.functional.batch_norm(
                inputs, None, None, reference.weight.detach(), reference.bias.detach(), True, 0.0, reference.eps
            )
            errors = {
                "output": (output.detach() - reference_output[mine]).abs().max().item(),
                "input_grad": (part.grad - whole.grad[mine]).abs().max().item() / whole.grad.abs().max().item(),
                "weight_grad": (
                    (weight_grad - torch.cat([reference.weight.grad, reference.bias.grad])).abs().max()
                    / torch.cat([reference.weight.grad, reference.bias.grad]).abs().max()
                ).item(),
                "running_mean": (layer.running_mean - reference.running_mean).abs().max().item(),
                "running_var": (
                    (layer.running_var - reference.running_var).abs().max() / reference.running_var.abs().max()
                ).item(),
                "batches_tracked": int(layer.num_batches_tracked.item()),
            }
            report[f"{str(dtype).split('.')[-1]}_{layer_type.__name__}"] = errors
    return report


def test_distributed_batchnorm_equals_batchnorm_over_the_whole_batch(tmp_path):
    reports = run_torchrun("syncbn", tmp_path)
    for report in reports:
        for name, errors in report.items():
            # Outputs are O(1) (normalised, weight <= 1.5, |bias| <= 1), gradients and statistics are compared
            # relative to their largest entry. Both sides reduce 8 (or 72) values per channel in different orders
            # and the variance is combined from two shards: a few tens of unit roundoffs. float64: 1e-12;
            # float32: 1e-5 (about 170 u), far below the O(1) error of per-process statistics.
            tolerance = 1e-12 if name.startswith("float64") else 1e-5
            for key in ("output", "input_grad", "weight_grad", "running_mean", "running_var"):
                assert errors[key] < tolerance, (name, key, errors)
            assert errors["batches_tracked"] == 1


def equivalence_flags(train_dir: Path, output_dir: Path, batch_size: int) -> list[str]:
    """A real pretraining run (timm resnet10t: BatchNorm in backbone, projector and gate; the real sampler and data
    path) with the randomness switched off: identical pairs, no random augmentation (full-image crops, no flip,
    RandAugment or erasing), float32. 12 training images, 3 repeats: 3 optimizer steps of 12 samples in all.

    SGD with momentum rather than Adam: the bias of the Linear layer before a BatchNorm has a true gradient of 0
    (BatchNorm removes it), so its computed gradient is rounding noise, which Adam's per-entry normalisation turns
    into a full learning-rate step of random sign with any batch layout, one process or two."""
    return [
        "--train_dir",
        str(train_dir),
        "--train_val_split",
        "0.25",
        "--output_dir",
        str(output_dir),
        "--model_name",
        "resnet10t",
        "--out_dim",
        "16",
        "--mlp_dim",
        "32",
        "--input_size",
        "16",
        "--pair_mode",
        "identical",
        "--aa",
        "none",
        "--reprob",
        "0",
        "--hflip",
        "0",
        "--scale",
        "1",
        "1",
        "--ratio",
        "1",
        "1",
        "--mixed_precision",
        "no",
        "--per_device_train_batch_size",
        str(batch_size),
        "--per_device_eval_batch_size",
        "32",
        "--ra",
        "3",
        "--num_train_epochs",
        "1",
        "--warmup_epochs",
        "0",
        "--eval_every",
        "1",
        "--checkpointing_epochs",
        "0",
        "--opt",
        "sgd",
        "--momentum",
        "0.9",
        "--learning_rate",
        "0.002",
        "--seed",
        "7",
        "--logging_steps",
        "1",
    ]


def worker_train_sync_bn(output_dir: Path) -> dict:
    """2 processes x 6 samples per step, --sync_bn."""
    import train_pretrain

    train_pretrain.run(equivalence_flags(output_dir / "images", output_dir / "two_sync_bn", 6) + ["--sync_bn"])
    return {}


def test_two_processes_with_sync_bn_train_like_one_process_with_the_whole_batch(tmp_path):
    """2 processes x 6 samples with --sync_bn end with the weights and BatchNorm statistics of 1 process x 12.

    Tolerance: 1e-4 absolute on every tensor of the state dict (weights are O(0.1-1)). The two runs differ only in
    float32 summation order (the loss over gathered keys, the BatchNorm moments combined from two shards), about
    1e-7 after the first step; this small network amplifies such differences from step to step: one process fed
    the same 3 batches with their rows permuted (a pure rounding change) ends 4e-6 away (measured; 2.7e-3 with
    another initialisation, which is why the run is kept to 3 steps and seeded). Measured here: 1.8e-6. Without
    --sync_bn (per-process statistics of 6 samples) the same comparison gives 0.5."""
    from conftest import write_image_folder
    from safetensors.torch import load_file

    write_image_folder(tmp_path / "images", images_per_class=4)
    run_torchrun("train_sync_bn", tmp_path, timeout=600)
    single = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, train_pretrain; train_pretrain.run(sys.argv[1:])",
            *equivalence_flags(tmp_path / "images", tmp_path / "one", 12),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    expected = load_file(tmp_path / "one" / "model.safetensors")
    actual = load_file(tmp_path / "two_sync_bn" / "model.safetensors")
    assert set(actual) == set(expected)
    logs = [
        [json.loads(line) for line in (tmp_path / run / "training_log.jsonl").read_text().splitlines()]
        for run in ("one", "two_sync_bn")
    ]
    assert [row["step"] for row in logs[0] if "loss" in row] == [1, 2, 3]  # 3 optimizer steps in both
    assert [row["step"] for row in logs[1] if "loss" in row] == [1, 2, 3]
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-4, msg=name)


# --------------------------------------------------------------------------------------------------------------
# Per-process random streams
# --------------------------------------------------------------------------------------------------------------


def _draws() -> dict:
    import random

    import numpy as np

    from simlap_hf.losses import sample_pair_labels

    labels = torch.arange(12) % 4
    return {
        "torch": torch.rand(3).tolist(),
        "numpy": np.random.rand(3).tolist(),
        "python": random.random(),
        "partners": sample_pair_labels(labels, "arbitrary", 4).tolist(),
    }


def worker_seeds(output_dir: Path) -> dict:
    """The streams every training script seeds through create_accelerator, on each of two processes."""
    from simlap_hf.training import TrainingArguments, create_accelerator

    create_accelerator(TrainingArguments(output_dir=str(output_dir / "run"), seed=5))
    return _draws()


def test_each_process_has_its_own_random_stream(tmp_path):
    from accelerate.state import AcceleratorState, GradientState

    from simlap_hf.training import TrainingArguments, create_accelerator

    reports = run_torchrun("seeds", tmp_path)
    # Processes augment differently and draw different partners: every stream differs between them.
    for name in ("torch", "numpy", "python", "partners"):
        assert reports[0][name] != reports[1][name], name
    # Process 0 keeps the seed itself: one-process runs (and process 0) draw what they drew before.
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        create_accelerator(TrainingArguments(output_dir=str(tmp_path / "single"), seed=5))
        assert _draws() == reports[0]
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# --------------------------------------------------------------------------------------------------------------
# Host synchronisations of the training step, and the key gather under torch.compile (tests/test_host_syncs.py)
# --------------------------------------------------------------------------------------------------------------


def worker_host_syncs(output_dir: Path) -> dict:
    """A tiny pretraining run on two processes with the host reads and collectives of every optimizer step counted
    (the image folder ``output_dir / "images"`` is written by the test)."""
    from dataclasses import asdict

    from test_host_syncs import count_tiny_run

    with pytest.MonkeyPatch.context() as monkeypatch:
        per_step = count_tiny_run(output_dir, monkeypatch)
    return {str(step): asdict(counts) for step, counts in per_step.items()}


def worker_compile(output_dir: Path) -> dict:
    """The SimLAP loss over gathered keys under torch.compile, with the single-tensor collectives and with the
    gloo fallbacks: graphs and graph breaks (torch._dynamo.explain), and whether the compiled loss and gradient
    (fullgraph, aot_eager) equal the eager ones bit for bit; and the graph breaks of a training-mode SimLAPModel
    forward with labels (keys gathered by default)."""
    import torch._dynamo
    import torch.distributed as dist
    from conftest import tiny_config

    from simlap_hf import SimLAPModel, distributed, losses

    gen = torch.Generator().manual_seed(dist.get_rank())
    embeddings = torch.randn(6, 8, generator=gen, requires_grad=True)
    labels = torch.randint(0, 3, (6,), generator=gen)

    def loss_of(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        keys, key_labels = distributed.gather_with_grad(embeddings), distributed.gather_labels(labels)
        gates = torch.ones_like(embeddings)
        terms = losses.simlap_contrastive_terms(embeddings, labels, labels.flip(0), gates, 0.1, keys, key_labels)
        return distributed.distributed_mean(terms.loss_sum, terms.num_positives)

    report: dict = {}
    backend = str(dist.get_backend())
    unsupported_sets = (distributed._NO_GATHER_INTO_TENSOR, distributed._NO_REDUCE_SCATTER_TENSOR)
    saved = [set(unsupported) for unsupported in unsupported_sets]
    try:
        for path in ("single", "fallback"):
            for unsupported in unsupported_sets:
                (unsupported.add if path == "fallback" else unsupported.discard)(backend)
            torch._dynamo.reset()
            explained = torch._dynamo.explain(loss_of)(embeddings, labels)
            eager = loss_of(embeddings, labels)
            (eager_grad,) = torch.autograd.grad(eager, embeddings)
            compiled = torch.compile(loss_of, backend="aot_eager", fullgraph=True)(embeddings, labels)
            (compiled_grad,) = torch.autograd.grad(compiled, embeddings)
            report[path] = {
                "graphs": explained.graph_count,
                "graph_breaks": explained.graph_break_count,
                "reasons": [str(reason.reason) for reason in explained.break_reasons],
                "bit_identical": torch.equal(compiled, eager) and torch.equal(compiled_grad, eager_grad),
            }
    finally:
        for unsupported, before in zip(unsupported_sets, saved):
            unsupported.clear()
            unsupported.update(before)
    torch._dynamo.reset()
    model = SimLAPModel(tiny_config()).train()
    pixels = torch.randn(4, 3, 16, 16, generator=gen)
    explained = torch._dynamo.explain(lambda p, y: model(pixel_values=p, labels=y).loss)(pixels, labels[:4])
    report["model"] = {"graphs": explained.graph_count, "graph_breaks": explained.graph_break_count}
    return report


# --------------------------------------------------------------------------------------------------------------
# Entry point of the torchrun workers
# --------------------------------------------------------------------------------------------------------------


def main() -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    mode, output_dir = sys.argv[1], Path(sys.argv[2])
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    # Imported before the process group exists, as a training script does: importing torch.distributed.fsdp (timm
    # does) after init_process_group keeps the gloo group's threads alive past destroy_process_group, and their
    # destruction at interpreter exit then aborts the process now and then with GLOO_ABORT.
    import simlap_hf  # noqa: F401

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    report = globals()[f"worker_{mode}"](output_dir)
    report = {
        key: (value if not isinstance(value, float) or math.isfinite(value) else str(value))
        for key, value in report.items()
    }
    (output_dir / f"{mode}_{rank}.json").write_text(json.dumps(report, indent=2))
    if dist.is_initialized():  # a training run closes the group itself
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
