"""Benchmark of one SimLAP training step against a plain cross-entropy step on the same backbone.

What is measured
----------------
Training throughput (images per second) of two full training steps on random 32 x 32 RGB images and random labels
of 10 classes, with a timm ResNet-18 backbone built with ``stem_type="deep"`` and ``output_stride=8``:

* ``simlap``: :class:`simlap_hf.SimLAPModel` (backbone, 2048-wide projector, label-conditioned feature filter,
  online linear head) called with ``labels`` (partner classes drawn with the default ``arbitrary`` pairs),
  ``out.loss.backward()`` and an Adam step over all of its parameters.
* ``plain``: :class:`simlap_hf.SimLAPForImageClassification` with the same configuration (backbone + linear
  classifier), cross-entropy on its logits, backward and an Adam step.

Each model gets one untimed warm-up step, then the timed steps alternate (simlap, plain, simlap, plain, ...) so that
drift of the machine (other processes, frequency scaling) affects both alike. A step is timed from
``zero_grad`` to the end of ``optimizer.step()`` (with ``torch.cuda.synchronize`` on CUDA). The report gives the
median step time and images/s of each, and SimLAP's overhead over the plain step, both from the two medians and
as the median of the per-pair ratios. Target: an overhead of at most 10% (judged on the medians of wall time).
The CPU time of the process (``time.process_time``, all threads) of each step is reported too: with
``--threads 1`` it is insensitive to other processes sharing the cores, unlike wall time.

``--breakdown`` additionally times, in isolation and on random pooled features of the backbone's width, the parts
that only the SimLAP step has: the projector, the feature filter (gate), the loss with its statistics, and the
online head, each forward + backward, and the optimizer step over all parameters of each model.

How to run
----------
From the repository root, with the package importable (for example inside its virtual environment)::

    python benchmarks/bench_step.py                        # batch 256 on the CPU, a few minutes on 2 cores
    python benchmarks/bench_step.py --quick                # batch 64, fewer steps: under a minute
    python benchmarks/bench_step.py --threads 2 --channels-last --bf16 --breakdown --json step.json
    python benchmarks/bench_step.py --device cuda --steps 50
    python benchmarks/bench_step.py --device cuda --bf16 --channels-last --compile --steps 50

``--compile`` wraps both models in ``torch.compile`` (``--compile-backend``, default inductor; ``--compile-mode``);
the optimizer step stays eager. Compiled models get 3 untimed warm-up steps each by default (``--warmup-steps``),
which include the compilation; their total time is reported as the warm-up time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from simlap_hf.configuration_simlap import SimLAPConfig  # noqa: E402
from simlap_hf.losses import sample_pair_labels, simlap_contrastive_terms  # noqa: E402
from simlap_hf.modeling_simlap import (  # noqa: E402
    SimLAPForImageClassification,
    SimLAPModel,
    SimLAPModelOutput,
)

TARGET_OVERHEAD_PERCENT = 10.0


def build_config(num_classes: int) -> SimLAPConfig:
    """ResNet-18, deep stem, output stride 8, ``num_classes`` classes; every other SimLAP setting at its default."""
    return SimLAPConfig(
        backbone="resnet18", backbone_kwargs={"stem_type": "deep", "output_stride": 8}, num_classes=num_classes
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_context(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on ``device`` when ``bf16``, else a no-op context."""
    if bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.train()


def make_simlap_step(
    model: SimLAPModel, optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """SimLAP step: forward with labels, ``out.loss.backward()``, optimizer step. Returns the detached loss."""

    def step(images: Tensor, labels: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, bf16):
            output = model(images, labels=labels)
        output.loss.backward()
        optimizer.step()
        return output.loss.detach()

    return step


def make_plain_step(
    model: SimLAPForImageClassification, optimizer: torch.optim.Optimizer, device: torch.device, bf16: bool
) -> Callable[[Tensor, Tensor], Tensor]:
    """Plain step: cross-entropy on the classifier's logits, backward, optimizer step. Returns the detached loss."""

    def step(images: Tensor, labels: Tensor) -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context(device, bf16):
            logits = model(images).logits
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    return step


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall time of ``fn()`` in seconds, synchronising the device before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def median_time(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        timed(fn, device)
    return statistics.median(timed(fn, device) for _ in range(repeats))


@contextlib.contextmanager
def step_timer(device: torch.device, wall: list[float], cpu: list[float]) -> Iterator[None]:
    """Append the wall time and the CPU time of this process (all its threads) of the block, in seconds."""
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    yield
    synchronize(device)
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)


def breakdown(
    simlap: SimLAPModel,
    plain: SimLAPForImageClassification,
    optimizers: dict[str, torch.optim.Optimizer],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, float]:
    """Median milliseconds of the SimLAP-only parts, each forward + backward on random (B, D) pooled features.

    The parameters' gradients are cleared afterwards, so the training state of the timed steps is not affected.
    """
    batch, feature_dim = args.batch_size, simlap.feature_dim
    generator = torch.Generator().manual_seed(args.seed + 1)
    features = torch.randn(batch, feature_dim, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (batch,), generator=generator).to(device)
    pair_labels = sample_pair_labels(labels, "arbitrary", args.num_classes)
    embeddings = simlap.projector(features).detach()
    gates = simlap.gate(labels, pair_labels).detach()
    repeats = args.breakdown_repeats

    def run(fn: Callable[[], Tensor]) -> Callable[[], None]:
        def wrapped() -> None:
            with autocast_context(device, args.bf16):
                value = fn()
            value.float().sum().backward()

        return wrapped

    def projector() -> Tensor:
        return simlap.projector(features.requires_grad_(True))

    def feature_filter() -> Tensor:
        return simlap.gate(labels, pair_labels)

    def loss_only() -> Tensor:
        z, g = embeddings.clone().requires_grad_(True), gates.clone().requires_grad_(True)
        terms = simlap_contrastive_terms(z, labels, pair_labels, g, simlap.config.temperature)
        return terms.loss_sum / terms.num_positives.clamp_min(1.0)

    def heads_and_loss() -> Tensor:
        # Everything after the backbone, as in SimLAPModel.forward: projector, online head, gate, loss, statistics.
        pooled = features.detach().requires_grad_(True)
        output = SimLAPModelOutput(logits=simlap.online_head(pooled.detach()), embeddings=simlap.projector(pooled))
        simlap._add_loss(output, labels, pair_labels, gather_keys=False)
        return output.loss

    def plain_head() -> Tensor:
        pooled = features.detach().requires_grad_(True)
        return F.cross_entropy(plain.classifier(plain.dropout(pooled)).float(), labels)

    def backbone_step() -> None:
        # Forward + backward of the backbone alone (both models' cost floor).
        with autocast_context(device, args.bf16):
            pooled = plain.backbone(args.images)
        pooled.float().sum().backward()

    results = {
        "projector_ms": median_time(run(projector), device, repeats),
        "feature_filter_ms": median_time(run(feature_filter), device, repeats),
        "loss_ms": median_time(run(loss_only), device, repeats),
        "simlap_heads_and_loss_ms": median_time(run(heads_and_loss), device, repeats),
        "plain_head_and_loss_ms": median_time(run(plain_head), device, repeats),
        "backbone_forward_backward_ms": median_time(backbone_step, device, max(2, repeats // 5), warmup=1),
        "simlap_optimizer_step_ms": median_time(optimizers["simlap"].step, device, repeats),
        "plain_optimizer_step_ms": median_time(optimizers["plain"].step, device, repeats),
    }
    simlap.zero_grad(set_to_none=True)
    plain.zero_grad(set_to_none=True)
    return {name: value * 1e3 for name, value in results.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to flag CPU contention from other processes."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default 256, --quick 64)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps of each model (default 12, --quick 5)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads (CPU)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--quick", action="store_true", help="batch 64 and fewer steps")
    parser.add_argument("--channels-last", action="store_true", help="channels-last models and inputs")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward passes")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models (not the optimizer)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (default inductor)")
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="untimed warm-up steps of each model (default 1, --compile 3)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--breakdown", action="store_true", help="also time the SimLAP-only parts in isolation")
    parser.add_argument("--breakdown-repeats", type=int, default=10, help="repetitions of each --breakdown timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.batch_size is None:
        args.batch_size = 64 if args.quick else 256
    if args.steps is None:
        args.steps = 5 if args.quick else 12
    if args.warmup_steps is None:
        args.warmup_steps = 3 if args.compile else 1
    args.warmup_steps = max(1, args.warmup_steps)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but CUDA is not available")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(
        f"torch {torch.__version__}, device {device} ({device_name}), threads {torch.get_num_threads()}, "
        f"batch {args.batch_size}, {args.image_size}x{args.image_size} RGB, {args.num_classes} classes, "
        f"channels-last {args.channels_last}, bf16 autocast {args.bf16}, "
        f"torch.compile {f'{args.compile_backend} mode {args.compile_mode}' if args.compile else False}"
    )
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs; other processes distort the times)")

    config = build_config(args.num_classes)
    simlap = prepare(SimLAPModel(config), device, args.channels_last)
    plain = prepare(SimLAPForImageClassification(config), device, args.channels_last)
    if args.compile:  # the wrappers share the parameters and forward attribute access to the models
        simlap = torch.compile(simlap, backend=args.compile_backend, mode=args.compile_mode)
        plain = torch.compile(plain, backend=args.compile_backend, mode=args.compile_mode)
    optimizers = {
        "simlap": torch.optim.Adam(simlap.parameters(), lr=args.lr),
        "plain": torch.optim.Adam(plain.parameters(), lr=args.lr),
    }
    steps = {
        "simlap": make_simlap_step(simlap, optimizers["simlap"], device, args.bf16),
        "plain": make_plain_step(plain, optimizers["plain"], device, args.bf16),
    }
    print(
        f"parameters: simlap {count_parameters(simlap) / 1e6:.2f} M, plain {count_parameters(plain) / 1e6:.2f} M "
        f"(backbone {count_parameters(plain.backbone) / 1e6:.2f} M)"
    )

    generator = torch.Generator().manual_seed(args.seed)
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
    if args.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    args.images = images

    times: dict[str, list[float]] = {"simlap": [], "plain": []}
    cpu_times: dict[str, list[float]] = {"simlap": [], "plain": []}
    warmup: dict[str, float] = {}
    for name in ("simlap", "plain"):
        warmup[name] = sum(
            timed(lambda name=name: steps[name](images, labels), device) for _ in range(args.warmup_steps)
        )
    for _ in range(args.steps):
        for name in ("simlap", "plain"):
            with step_timer(device, times[name], cpu_times[name]):
                steps[name](images, labels)

    medians = {name: statistics.median(values) for name, values in times.items()}
    throughput = {name: args.batch_size / medians[name] for name in medians}
    overhead = (medians["simlap"] / medians["plain"] - 1.0) * 100.0
    paired = statistics.median(a / b for a, b in zip(times["simlap"], times["plain"]))
    paired_overhead = (paired - 1.0) * 100.0
    cpu_medians = {name: statistics.median(values) for name, values in cpu_times.items()}
    cpu_overhead = (cpu_medians["simlap"] / cpu_medians["plain"] - 1.0) * 100.0

    print()
    print(
        "| step | median s/step | min s/step | images/s (median) | overhead vs plain (medians; paired) "
        "| median CPU s/step | CPU-time overhead |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("plain", "simlap"):
        cell = "-" if name == "plain" else f"{overhead:+.1f}%; {paired_overhead:+.1f}%"
        cpu_cell = "-" if name == "plain" else f"{cpu_overhead:+.1f}%"
        print(
            f"| {name} | {medians[name]:.3f} | {min(times[name]):.3f} | {throughput[name]:.1f} | {cell} "
            f"| {cpu_medians[name]:.3f} | {cpu_cell} |"
        )
    met = overhead <= TARGET_OVERHEAD_PERCENT
    print(
        f"\n{args.steps} timed steps each, alternated, after {args.warmup_steps} warm-up step(s) each "
        f"(warm-up total: simlap {warmup['simlap']:.2f} s, plain {warmup['plain']:.2f} s)."
    )
    print(f"SimLAP overhead {overhead:+.1f}% (target <= {TARGET_OVERHEAD_PERCENT:g}%: {'met' if met else 'NOT met'})")

    parts: dict[str, float] = {}
    if args.breakdown:
        parts = breakdown(simlap, plain, optimizers, args, device)
        print("\n| SimLAP-only part (forward + backward, isolated) | median ms |")
        print("|---|---|")
        for name, value in parts.items():
            print(f"| {name.removesuffix('_ms').replace('_', ' ')} | {value:.1f} |")
    print(f"load average at end: {load_average()}")

    if args.json is not None:
        payload = {
            "command": command,
            "torch": torch.__version__,
            "device": str(device),
            "device_name": device_name,
            "image_size": args.image_size,
            "compile": args.compile,
            "compile_backend": args.compile_backend if args.compile else None,
            "compile_mode": args.compile_mode if args.compile else None,
            "warmup_steps": args.warmup_steps,
            "threads": torch.get_num_threads(),
            "batch_size": args.batch_size,
            "channels_last": args.channels_last,
            "bf16": args.bf16,
            "step_times_s": times,
            "warmup_s": warmup,
            "median_step_s": medians,
            "step_cpu_times_s": cpu_times,
            "median_step_cpu_s": cpu_medians,
            "cpu_overhead_percent": cpu_overhead,
            "images_per_s": throughput,
            "overhead_percent": overhead,
            "paired_overhead_percent": paired_overhead,
            "target_met": met,
            "breakdown_ms": parts,
            "load_average_end": load_average(),
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
