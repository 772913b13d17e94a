"""Benchmark of the kNN evaluation: the previous code path against the chunked, sharded one, in the same run.

What is compared
----------------
``old``: what training evaluation did before: every process held the whole train feature set (gathered to the
CPU by ``extract_features``) and ran the whole kNN itself, in blocks of 1,024 queries against all N train features
(a 1,024 x N similarity matrix per block, after an L2-normalised copy of the train set). Its code is kept below
(``old_knn_classify``) exactly as the package had it. It runs on the CPU, where the old
``extract_features`` left the features; on a GPU the old code is also timed with its inputs moved to the GPU
(``old, on device``), which is the fairer comparison of the algorithm alone.

``new``: :func:`simlap_hf.evaluation.knn_classify` with ``sharded=True``: each process holds only its shard of the
train features (on the device), queries are processed in chunks whose similarity block stays within 2**26
elements, each process finds its local top-k for every query chunk and the candidates are gathered and merged.
With one process this is the chunked single-process computation.

Data: N train features (default 100,000 x 512) and M queries (default 10,000), float32, drawn around C class
centres (so the kNN accuracy is meaningful and must agree), k = 20, temperature 0.07.

Measured, per process: wall time of the kNN call (the slowest process, after a barrier); the memory held for the
train set (N x D x 4 bytes for ``old``, N / W x D x 4 for ``new``); the peak extra memory during the call above
what was allocated before it: on the CPU the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) minus the resident size before the call; on a GPU
``torch.cuda.max_memory_allocated`` minus the memory allocated before the call (plus the CPU peak for ``old``).
The two paths give the same scores up to float32 rounding, except for queries whose k-th and (k+1)-th neighbours
are closer than that rounding (either may be picked): their count, the number of differing predictions and the
largest difference of the others (relative to the query's total weight) are printed.

How to run
----------
From the repository root, with the package importable::

    python benchmarks/bench_knn.py                                  # one process, CPU (about a minute on 2 cores)
    torchrun --nproc_per_node 2 benchmarks/bench_knn.py             # two processes (gloo on CPU)
    torchrun --nproc_per_node 8 benchmarks/bench_knn.py --device cuda   # eight GPUs (NCCL)
    python benchmarks/bench_knn.py --num-train 20000 --num-queries 2000 --json knn.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from simlap_hf.evaluation import knn_classify

MIB = 2.0**20


@torch.no_grad()
def old_knn_classify(
    train_features, train_labels, query_features, num_classes, k=20, temperature=0.07, batch_size=1024
):
    """The previous ``knn_classify`` (argument checks left out): normalised copies, 1,024 queries x N blocks."""
    train = train_features
    device = train.device
    train = F.normalize(train.float(), dim=1)
    targets = train_labels.to(device=device, dtype=torch.long).reshape(-1)
    queries = F.normalize(query_features.to(device).float(), dim=1)
    k = min(int(k), train.shape[0])
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, queries.shape[0], batch_size):
        block = queries[start : start + batch_size]
        similarity = block @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores[start : start + block.shape[0]].scatter_add_(1, targets[top_idx], weights)
    return scores


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


class PeakMemory:
    """Extra peak memory of a block of code: host (peak RSS above the RSS at entry) and device (CUDA)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.host_mib = self.device_mib = float("nan")

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (the peak RSS) to the current RSS
            self._host_start = _status_kib("VmRSS")
        except OSError:
            self._host_start = None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._device_start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc) -> None:
        if self._host_start is not None:
            self.host_mib = (_status_kib("VmHWM") - self._host_start) / 1024
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.device_mib = (torch.cuda.max_memory_allocated(self.device) - self._device_start) / MIB


def make_data(args) -> tuple[torch.Tensor, ...]:
    """The same class-structured features on every process (CPU, float32)."""
    gen = torch.Generator().manual_seed(0)
    centres = 0.2 * torch.randn(args.classes, args.dim, generator=gen)  # overlapping classes
    train_labels = torch.randint(args.classes, (args.num_train,), generator=gen)
    train = centres[train_labels].add_(torch.randn(args.num_train, args.dim, generator=gen))
    query_labels = torch.randint(args.classes, (args.num_queries,), generator=gen)
    queries = centres[query_labels].add_(torch.randn(args.num_queries, args.dim, generator=gen))
    return train, train_labels, queries, query_labels


def shard_slice(total: int, world: int, rank: int) -> slice:
    return slice(rank * total // world, (rank + 1) * total // world)


def timed(fn, device: torch.device, world: int):
    """Run ``fn`` once; (result, seconds of the slowest process, PeakMemory)."""
    if world > 1:
        dist.barrier()
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    if world > 1:
        slowest = torch.tensor([seconds, memory.host_mib, memory.device_mib], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        seconds, memory.host_mib, memory.device_mib = slowest.tolist()
    return result, seconds, memory


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-train", type=int, default=100_000)
    parser.add_argument("--num-queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.07)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: torch's)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file (main process)")
    return parser.parse_args()


def start_processes(args: argparse.Namespace) -> tuple[int, int, torch.device]:
    """(world size, rank, device) of this process, the process group initialised when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if args.device == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    return world, rank, device


def result_row(
    path: str, bank_mib: float, memory: PeakMemory, device_mib: float, seconds: float, accuracy: float
) -> dict:
    return {
        "path": path,
        "bank_mib": bank_mib,
        "extra_host_mib": memory.host_mib,
        "extra_device_mib": device_mib,
        "seconds": seconds,
        "accuracy": accuracy,
    }


def run_old(args: argparse.Namespace, data: tuple[torch.Tensor, ...], device: torch.device, world: int):
    """The old path (every process holds everything, on the CPU; also on the device on a GPU): its (M, C) scores
    and its result rows."""
    train, train_labels, queries, query_labels = data
    bank_mib = args.num_train * (args.dim * 4 + 8) / MIB  # features + int64 labels
    old_scores, seconds, memory = timed(
        lambda: old_knn_classify(train, train_labels, queries, args.classes, args.k, args.temperature), device, world
    )
    old_accuracy = 100.0 * (old_scores.argmax(dim=1) == query_labels).double().mean().item()
    rows = [result_row("old (every process: whole bank on the CPU)", bank_mib, memory, 0.0, seconds, old_accuracy)]
    if device.type == "cuda":
        on_device = [tensor.to(device) for tensor in (train, train_labels, queries)]
        _, seconds, memory = timed(
            lambda: old_knn_classify(*on_device, args.classes, args.k, args.temperature), device, world
        )
        path = "old, on device (every process: whole bank)"
        rows.append(result_row(path, bank_mib, memory, memory.device_mib, seconds, old_accuracy))
        del on_device
    return old_scores, rows


def run_new(
    args, data: tuple[torch.Tensor, ...], old_scores: torch.Tensor, device: torch.device, world: int, rank: int
) -> tuple[dict, dict]:
    """The new path (each process: its shard of the bank on the device, its share of the queries): its result row
    and its agreement with the old scores, over all processes."""
    train, train_labels, queries, query_labels = data
    mine, my_queries = shard_slice(args.num_train, world, rank), shard_slice(args.num_queries, world, rank)
    shard = train[mine].to(device)
    shard_labels = train_labels[mine].to(device)
    local_queries = queries[my_queries].to(device)
    new_scores, seconds, memory = timed(
        lambda: knn_classify(shard, shard_labels, local_queries, args.classes, args.k, args.temperature, sharded=True),
        device,
        world,
    )
    correct = torch.tensor(
        [(new_scores.argmax(dim=1).cpu() == query_labels[my_queries]).sum().item()], dtype=torch.float64
    )
    # Agreement: a query whose k-th and (k+1)-th neighbours are closer than float32 rounding may pick a different
    # k-th neighbour in the two paths (their cosines are rounded differently); count those and the predictions.
    old_mine = old_scores[my_queries]
    relative = (new_scores.cpu() - old_mine).abs().amax(dim=1) / old_mine.sum(dim=1)
    agreement = torch.tensor(
        [(relative > 1e-4).sum().item(), (new_scores.argmax(dim=1).cpu() != old_mine.argmax(dim=1)).sum().item()],
        dtype=torch.float64,
    )
    difference = torch.tensor([relative[relative <= 1e-4].max().item()], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(correct)
        dist.all_reduce(agreement)
        dist.all_reduce(difference, op=dist.ReduceOp.MAX)
    new_bank_mib = (mine.stop - mine.start) * (args.dim * 4 + 8) / MIB
    device_mib = memory.device_mib if device.type == "cuda" else 0.0
    accuracy = 100.0 * correct.item() / args.num_queries
    row = result_row("new (sharded bank, chunked queries)", new_bank_mib, memory, device_mib, seconds, accuracy)
    agree = {
        "queries_with_another_neighbour": int(agreement[0]),
        "different_predictions": int(agreement[1]),
        "max_relative_difference_same_neighbours": difference.item(),
    }
    return row, agree


def main() -> None:
    args = parse_args()
    world, rank, device = start_processes(args)
    data = make_data(args)
    old_scores, rows = run_old(args, data, device, world)
    new_row, agree = run_new(args, data, old_scores, device, world, rank)
    rows.append(new_row)
    if rank == 0:
        print_table(args, world, device, rows, agree)
        if args.json:
            Path(args.json).write_text(
                json.dumps({"settings": vars(args), "processes": world, "rows": rows, "agreement": agree}, indent=2)
            )
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def print_table(args, world: int, device: torch.device, rows: list[dict], agree: dict) -> None:
    def total(row: dict) -> float:
        extra = [value for value in (row["extra_host_mib"], row["extra_device_mib"]) if not math.isnan(value)]
        return row["bank_mib"] + sum(extra)

    cpu = platform.processor() or platform.machine()
    print(
        f"\nkNN over {args.num_train:,} x {args.dim} train features and {args.num_queries:,} queries, k={args.k}, "
        f"{args.classes} classes; {world} process(es) on {device.type} ({cpu}, {torch.get_num_threads()} "
        f"thread(s) per process)\n"
    )
    print(
        "| path | bank held per process (MiB) | peak extra host memory (MiB) | peak extra device memory (MiB) "
        "| bank + peak extra (MiB) | time (s) | kNN top-1 (%) |"
    )
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['path']} | {row['bank_mib']:.0f} | {row['extra_host_mib']:.0f} | {row['extra_device_mib']:.0f} "
            f"| {total(row):.0f} | {row['seconds']:.2f} | {row['accuracy']:.2f} |"
        )
    new = rows[-1]
    for old in rows[:-1]:
        print(
            f"\n{old['path']} / new: time {old['seconds'] / new['seconds']:.2f}x, memory (bank + peak extra) "
            f"{total(old) / total(new):.2f}x"
        )
    print(
        f"new vs old: {agree['queries_with_another_neighbour']} of {args.num_queries:,} queries picked another k-th "
        f"neighbour (a near tie within float32 rounding), {agree['different_predictions']} prediction(s) differ; "
        f"the others' class scores agree to {agree['max_relative_difference_same_neighbours']:.1e} of the query's "
        "total weight\n"
    )


if __name__ == "__main__":
    main()
