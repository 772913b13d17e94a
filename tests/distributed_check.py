"""Run by tests/test_training.py under ``torchrun --nproc_per_node 2`` (CPU, gloo).

1. The gathered SimLAP loss: each process holds half of a batch; the mean of the per-process losses, the gradient
   of that mean with respect to each process's embeddings, and the data-parallel parameter gradient must equal
   those of one process holding the whole batch.
2. A NaN loss on process 1 only must stop both processes at the same batch with the same error (not leave
   process 0 waiting in the gradient all-reduce).
3. A short 2-process train_pretrain.py run must end with identical weights on both processes.

Usage: torchrun --nproc_per_node 2 tests/distributed_check.py IMAGE_FOLDER OUTPUT_DIR
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from test_training import tiny_flags  # noqa: E402

import train_pretrain  # noqa: E402
from simlap_hf.distributed import distributed_mean, gather_labels, gather_with_grad  # noqa: E402
from simlap_hf.losses import (  # noqa: E402
    sample_pair_labels,
    simlap_contrastive_terms,
    simlap_loss,
)


def check_gathered_loss() -> dict[str, float]:
    rank, world = dist.get_rank(), dist.get_world_size()
    generator = torch.Generator().manual_seed(0)
    local, features, dim, classes = 6, 5, 8, 3
    inputs = torch.randn(world * local, features, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (world * local,), generator=generator)
    pair_labels = sample_pair_labels(labels, "arbitrary", classes, generator=generator)
    gates = torch.rand(world * local, dim, generator=generator, dtype=torch.float64)
    weight = torch.randn(dim, features, generator=generator, dtype=torch.float64)

    # One process holding the whole batch.
    reference_weight = weight.clone().requires_grad_(True)
    reference_embeddings = inputs @ reference_weight.T
    reference_embeddings.retain_grad()
    reference = simlap_loss(reference_embeddings, labels, pair_labels, gates)
    reference.backward()

    # Each process with its half; keys gathered with gradient, masks from the gathered labels.
    part = slice(rank * local, (rank + 1) * local)
    encoder = torch.nn.Linear(features, dim, bias=False).double()
    with torch.no_grad():
        encoder.weight.copy_(weight)
    encoder = DistributedDataParallel(encoder)
    embeddings = encoder(inputs[part])
    embeddings.retain_grad()
    keys, key_labels = gather_with_grad(embeddings), gather_labels(labels[part])
    terms = simlap_contrastive_terms(embeddings, labels[part], pair_labels[part], gates[part], 0.1, keys, key_labels)
    loss = distributed_mean(terms.loss_sum, terms.num_positives)
    loss.backward()

    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    # The objective is the mean of the per-process losses, so its gradient is each process's gradient / world.
    embedding_error = (embeddings.grad / world - reference_embeddings.grad[part]).abs().max()
    param_error = (encoder.module.weight.grad - reference_weight.grad).abs().max()
    errors = torch.stack([(mean_loss - reference.detach()).abs(), embedding_error, param_error])
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    return {
        "loss_error": float(errors[0]),
        "embedding_grad_error": float(errors[1]),
        "param_grad_error": float(errors[2]),
    }


def check_nan_on_one_process(image_folder: str, output_dir: Path) -> str:
    """Poison the second batch's loss on process 1 only; return the error every process raised."""
    original = train_pretrain.simlap_step
    calls = []

    def step_with_nan_on_process_1(model, batch):
        calls.append(1)
        loss, logs = original(model, batch)
        if len(calls) == 2 and dist.get_rank() == 1:
            loss = loss + float("nan")
        return loss, logs

    train_pretrain.simlap_step = step_with_nan_on_process_1
    try:
        train_pretrain.run(tiny_flags(image_folder, output_dir / "nan", epochs=1))
    except FloatingPointError as error:
        return str(error)
    finally:
        train_pretrain.simlap_step = original
    return "no error"


def main() -> None:
    image_folder, output_dir = sys.argv[1], Path(sys.argv[2])
    dist.init_process_group("gloo")
    report = {"world_size": dist.get_world_size(), **check_gathered_loss()}
    report["nan_error"] = check_nan_on_one_process(image_folder, output_dir)

    rank = dist.get_rank()
    # The run ends by closing the process group, so each process writes its own report.
    model, results = train_pretrain.run(tiny_flags(image_folder, output_dir, epochs=1))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    report.update(weights_sha256=digest.hexdigest(), trained_steps=results["global_step"])
    (output_dir / f"distributed_report_{rank}.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
