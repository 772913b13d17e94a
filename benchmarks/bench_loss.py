"""Benchmark of the SimLAP loss: our B x N form against the reference's materialised B x N x K formulation.

What is measured
----------------
``ours``: :func:`simlap_hf.losses.simlap_loss`, which computes the gated cosine of every anchor b against every
key n with two (B, K) x (K, N) matrix products, so its largest intermediate is a (B, N) float32 matrix.

``baseline``: the reference's formulation, written in this file: the gated keys are materialised as a (B, N, K)
tensor ``gates[:, None, :] * keys[None, :, :]``, the cosine is taken along K against ``gates * z`` and the same
multi-positive InfoNCE follows (positives: keys of the partner class; negatives: keys of neither the anchor's nor
the partner's class; for every positive (b, p) the term ``log(exp(l_bp) + sum_neg exp(l_bn)) - l_bp``; mean over
all positive pairs).

Both run forward + backward on the CPU (the embeddings and the gates require gradients; gates are the sigmoid of
random numbers), with K = 256, temperature 0.1, C = 10 classes and ``arbitrary`` pairs (partner labels are the
labels of a random permutation of the batch), keys = the batch itself (N = B), for B = 256, 768 (the reference
batch: 256 images x 3 repeated augmentations) and 2048.

* Agreement: before any timing, both losses and their gradients are computed on the same inputs and the largest
  absolute differences are printed.
* Time: median over several repetitions of forward + backward, after warm-up repetitions, with
  ``torch.set_num_threads(--threads)`` (default: every core).
* Peak memory: every (method, B) pair is measured in its own fresh subprocess (this script run again through
  ``sys.executable`` with hidden flags). The child imports torch, runs a tiny warm-up of the same method (B = 8) to
  initialise the thread pools and kernels, creates the inputs, records its resident set size (RSS) as the
  baseline, then runs one forward + backward while a background thread samples ``/proc/self/statm``; the
  reported number is the extra peak RSS over that baseline (also cross-checked with ``ru_maxrss``). The analytic
  size of the largest intermediate tensor is reported as well: (B, N) float32 for ours, (B, N, K) float32 for
  the baseline.
* Memory cap: the baseline's peak is estimated before it is run (from the peak per element of the (B, N, K)
  tensor measured at a smaller B, else a default of 6 copies). When the estimate exceeds ``--max-baseline-gib``
  (or the memory the machine has available), the baseline is reported as out of memory with the estimate and is
  neither timed nor run; otherwise its child runs under ``RLIMIT_AS`` = its current address space + the cap, and a
  child that dies is reported as out of memory too. Ours always runs.

Targets (at B = 768): ours at least 8x faster and with at least 30x less extra peak memory than the baseline.

Loss forms (``--forms``, default ``reference``; each gets its own table):

* ``reference``: the gated cosine, fixed temperature, one mean over all positive pairs (above).
* ``fastssl``: the authors' later form (erow/FastSSL ``model/simlap.py``): the gated dot product of the
  unit-normalised embeddings ``<z_b * g_b * g_b, z_n>`` without renormalisation, a learnable logit scale
  ``s = exp(scale_logit)``, ``alpha`` = 0.5 (learnable: ``- alpha * s * <z_b, z_n>``) and the per-anchor mean (each
  anchor's terms divided by its positive count + 1e-6, then the mean over anchors). Ours: ``simlap_loss`` with
  those options; baseline: the same formulation with the anchor-gated keys materialised as (B, N, K).
* ``cosine_options``: the reference's gated cosine with the learnable logit scale, alpha 0.5 and the per-anchor
  mean; the baseline materialises the gated keys as for ``reference``.

The scale logit and alpha are leaf tensors that require gradients in both methods, so the backward computes theirs.

How to run
----------
From the repository root, with the package importable (for example inside its virtual environment)::

    python benchmarks/bench_loss.py                  # full run, a few minutes on 2 cores
    python benchmarks/bench_loss.py --quick          # fewer repetitions
    python benchmarks/bench_loss.py --batch-sizes 256 768 --threads 2 --json loss.json
    python benchmarks/bench_loss.py --device cuda --batch-sizes 1024 4096 16384 --max-baseline-gib 120
    python benchmarks/bench_loss.py --forms reference fastssl cosine_options --batch-sizes 768

On a GPU (``--device cuda``) everything runs in this process: the times synchronise the device, and the extra
peak memory is ``torch.cuda.max_memory_allocated`` during one forward + backward minus the memory allocated
before it. The baseline's cap is the smaller of ``--max-baseline-gib`` and 85% of the free GPU memory; an
estimate above it is reported as out of memory without running, and a ``torch.cuda.OutOfMemoryError`` is caught
and reported the same way.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from simlap_hf.losses import simlap_loss  # noqa: E402

METHODS = ("ours", "baseline")
FORMS = ("reference", "fastssl", "cosine_options")
ALPHA = 0.5
FLOAT_BYTES = 4
GIB = 1024**3
MIB = 1024**2
DEFAULT_COPIES = 6.0  # (B, N, K)-sized float32 tensors alive at the baseline's peak, when none was measured yet
TARGET_SPEEDUP = 8.0
TARGET_MEMORY_RATIO = 30.0
TARGET_BATCH = 768


# --------------------------------------------------------------------------------------------------------------
# The two losses
# --------------------------------------------------------------------------------------------------------------


def baseline_loss(embeddings: Tensor, labels: Tensor, pair_labels: Tensor, gates: Tensor, temperature: float) -> Tensor:
    """The reference's materialised SimLAP loss, keys = anchors: builds a (B, N, K) tensor of gated keys.

    Args:
        embeddings: (B, K) anchor embeddings z (also the keys). labels, pair_labels: (B,) int64 classes y1, y2.
        gates: (B, K) gates in [0, 1]. temperature: logits are ``cos / temperature``.

    Returns:
        float32 scalar: mean over all positive pairs (b, p) of ``log(exp(l_bp) + sum_neg exp(l_bn)) - l_bp``.
    """
    keys, key_labels = embeddings, labels
    gated_keys = gates[:, None, :] * keys[None, :, :]  # (B, N, K)
    gated_queries = gates * embeddings  # (B, K)
    cosine = F.cosine_similarity(gated_queries[:, None, :], gated_keys, dim=2)  # (B, N)
    logits = cosine / temperature
    positive = key_labels[None, :] == pair_labels[:, None]  # (B, N)
    negative = ~(positive | (key_labels[None, :] == labels[:, None]))  # (B, N)
    exp_logits = logits.exp()
    negative_sum = (exp_logits * negative).sum(dim=1, keepdim=True)  # (B, 1)
    terms = torch.log(exp_logits + negative_sum) - logits  # (B, N)
    positive = positive.float()
    return (terms * positive).sum() / positive.sum().clamp_min(1.0)


def ours_loss(embeddings: Tensor, labels: Tensor, pair_labels: Tensor, gates: Tensor, temperature: float) -> Tensor:
    """The package's B x N SimLAP loss (keys = anchors)."""
    return simlap_loss(embeddings, labels, pair_labels, gates, temperature)


def learnable_scalars(temperature: float, like: Tensor) -> tuple[Tensor, Tensor]:
    """Leaf tensors (requiring gradients) of the later form: the scale logit log(1 / T) and alpha."""
    scale_logit = torch.tensor(math.log(1.0 / temperature), device=like.device, requires_grad=True)
    alpha = torch.tensor(ALPHA, device=like.device, requires_grad=True)
    return scale_logit, alpha


def ours_options_loss(form: str) -> Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]:
    """The package's B x N loss with the later options: learnable scale, alpha, per-anchor mean; ``form`` is the
    similarity (``"dot"`` or ``"cosine"``)."""

    def loss(embeddings: Tensor, labels: Tensor, pair_labels: Tensor, gates: Tensor, temperature: float) -> Tensor:
        scale_logit, alpha = learnable_scalars(temperature, embeddings)
        return simlap_loss(
            embeddings,
            labels,
            pair_labels,
            gates,
            temperature,
            form=form,
            logit_scale=scale_logit.exp(),
            alpha=alpha,
            positive_normalization="anchor",
        )

    return loss


def baseline_options_loss(form: str) -> Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]:
    """The later options with the gated keys materialised as a (B, N, K) tensor (keys = anchors): ``"dot"``:
    ``<z_b / |z_b| * g_b, g_b * z_n / |z_n|>`` summed over K; ``"cosine"``: the reference's renormalised cosine.
    Then ``s * sim - alpha * s * <z_b, z_n>`` and the per-anchor multi-positive InfoNCE."""

    def loss(embeddings: Tensor, labels: Tensor, pair_labels: Tensor, gates: Tensor, temperature: float) -> Tensor:
        scale_logit, alpha = learnable_scalars(temperature, embeddings)
        scale = scale_logit.exp()
        unit = F.normalize(embeddings, dim=1)  # (B, K); the keys are the anchors
        if form == "dot":
            gated_keys = gates[:, None, :] * unit[None, :, :]  # (B, N, K)
            similarity = ((unit * gates)[:, None, :] * gated_keys).sum(dim=2)  # (B, N)
        else:
            gated_keys = gates[:, None, :] * embeddings[None, :, :]  # (B, N, K)
            similarity = F.cosine_similarity((gates * embeddings)[:, None, :], gated_keys, dim=2)  # (B, N)
        logits = scale * similarity - alpha * scale * (unit @ unit.T)
        positive = labels[None, :] == pair_labels[:, None]  # (B, N)
        negative = ~(positive | (labels[None, :] == labels[:, None]))
        logits = logits - logits.mean(dim=1, keepdim=True).detach()
        exp_logits = logits.exp()
        negative_sum = (exp_logits * negative).sum(dim=1, keepdim=True)  # (B, 1)
        terms = (torch.log(exp_logits + negative_sum) - logits) * positive  # (B, N)
        return (terms.sum(dim=1) / (positive.sum(dim=1) + 1e-6)).mean()

    return loss


LOSSES: dict[str, dict[str, Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor]]] = {
    "reference": {"ours": ours_loss, "baseline": baseline_loss},
    "fastssl": {"ours": ours_options_loss("dot"), "baseline": baseline_options_loss("dot")},
    "cosine_options": {"ours": ours_options_loss("cosine"), "baseline": baseline_options_loss("cosine")},
}


def make_inputs(
    batch: int, dim: int, num_classes: int, seed: int, device: str = "cpu"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Random (embeddings, labels, pair_labels, gate_logits) on ``device`` (drawn on the CPU, so the same for every
    device); labels of a random permutation are the partners."""
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator)
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    pair_labels = labels[torch.randperm(batch, generator=generator)]
    gate_logits = torch.randn(batch, dim, generator=generator)
    if device != "cpu":
        return embeddings.to(device), labels.to(device), pair_labels.to(device), gate_logits.to(device)
    return embeddings, labels, pair_labels, gate_logits


def forward_backward(
    method: str,
    embeddings: Tensor,
    labels: Tensor,
    pair_labels: Tensor,
    gate_logits: Tensor,
    temperature: float,
    form: str = "reference",
) -> tuple[Tensor, Tensor, Tensor]:
    """One forward + backward of ``method`` in loss ``form``; returns (loss, d loss / d embeddings, d loss / d gate
    logits)."""
    z = embeddings.detach().requires_grad_(True)
    raw = gate_logits.detach().requires_grad_(True)
    gates = torch.sigmoid(raw)
    loss = LOSSES[form][method](z, labels, pair_labels, gates, temperature)
    loss.backward()
    return loss.detach(), z.grad, raw.grad


# --------------------------------------------------------------------------------------------------------------
# Sizes and memory
# --------------------------------------------------------------------------------------------------------------


def largest_intermediate_bytes(method: str, batch: int, dim: int) -> int:
    """Analytic size of the largest float32 intermediate: (B, N) for ours, (B, N, K) for the baseline (N = B)."""
    elements = batch * batch * (dim if method == "baseline" else 1)
    return elements * FLOAT_BYTES


def page_size() -> int:
    return os.sysconf("SC_PAGE_SIZE")


def current_rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm (second field, in pages)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * page_size()


def current_vm_bytes() -> int:
    """Virtual address-space size of this process, from /proc/self/statm (first field, in pages)."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * page_size()


def max_rss_bytes() -> int:
    """Lifetime peak RSS of this process (``ru_maxrss`` is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None when it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRSSSampler:
    """Background thread that records the largest RSS seen while it runs (torch kernels release the GIL)."""

    def __init__(self, interval_s: float = 0.0005) -> None:
        self.interval_s = interval_s
        self.peak = current_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> PeakRSSSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss_bytes())


def child_measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run in a fresh subprocess: extra peak RSS of one forward + backward of ``args.child_method`` at
    ``args.child_batch``."""
    method, batch = args.child_method, args.child_batch
    torch.set_num_threads(args.threads)
    # Warm up the same code path on a tiny batch so thread pools and kernels are initialised before the baseline.
    forward_backward(method, *make_inputs(8, args.dim, args.num_classes, args.seed + 1), args.temperature, args.form)
    inputs = make_inputs(batch, args.dim, args.num_classes, args.seed)
    base_rss = current_rss_bytes()
    base_max_rss = max_rss_bytes()
    if args.child_cap_gib > 0:
        limit = current_vm_bytes() + int(args.child_cap_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        with PeakRSSSampler() as sampler:
            loss, _, _ = forward_backward(method, *inputs, args.temperature, args.form)
    except (RuntimeError, MemoryError) as error:
        return {"method": method, "batch": batch, "ok": False, "error": f"{type(error).__name__}: {error}"[:300]}
    peak = sampler.peak
    after_max_rss = max_rss_bytes()
    if after_max_rss > base_max_rss:  # the lifetime peak was reached during the measured step
        peak = max(peak, after_max_rss)
    return {
        "method": method,
        "batch": batch,
        "ok": True,
        "loss": float(loss),
        "base_rss_bytes": base_rss,
        "extra_peak_bytes": max(peak - base_rss, 0),
    }


def cuda_measure(args: argparse.Namespace, method: str, batch: int, cap_gib: float) -> dict[str, Any]:
    """GPU version of the memory measurement, in this process: ``torch.cuda.max_memory_allocated`` during one
    forward + backward minus the memory allocated before it (inputs included in the base). ``cap_gib`` is unused
    here (the estimate gate in ``main`` applies); an out-of-memory error is caught and reported."""
    device = torch.device(args.device)
    warmup_inputs = make_inputs(8, args.dim, args.num_classes, args.seed + 1, args.device)
    forward_backward(method, *warmup_inputs, args.temperature, args.form)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    inputs = make_inputs(batch, args.dim, args.num_classes, args.seed, args.device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        loss, _, _ = forward_backward(method, *inputs, args.temperature, args.form)
        torch.cuda.synchronize(device)
    except torch.cuda.OutOfMemoryError as error:
        return {"method": method, "batch": batch, "ok": False, "error": f"OutOfMemoryError: {error}"[:300]}
    finally:
        peak = torch.cuda.max_memory_allocated(device)
        del inputs
        torch.cuda.empty_cache()
    return {
        "method": method,
        "batch": batch,
        "ok": True,
        "loss": float(loss),
        "base_allocated_bytes": base,
        "extra_peak_bytes": max(peak - base, 0),
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def run_child(args: argparse.Namespace, method: str, batch: int, cap_gib: float) -> dict[str, Any]:
    """Measure one (method, B) in a fresh interpreter running this script with the hidden child flags."""
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child-method",
        method,
        "--child-batch",
        str(batch),
        "--child-cap-gib",
        str(cap_gib),
        "--threads",
        str(args.threads),
        "--dim",
        str(args.dim),
        "--num-classes",
        str(args.num_classes),
        "--temperature",
        str(args.temperature),
        "--seed",
        str(args.seed),
        "--child-form",
        args.form,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in completed.stdout.splitlines() if line.startswith("{")]
    if completed.returncode != 0 or not lines:
        reason = completed.stderr.strip().splitlines()[-1:] or [f"exit code {completed.returncode}"]
        return {"method": method, "batch": batch, "ok": False, "error": f"child died: {reason[0]}"[:300]}
    return json.loads(lines[-1])


# --------------------------------------------------------------------------------------------------------------
# Timing and agreement
# --------------------------------------------------------------------------------------------------------------


def time_method(args: argparse.Namespace, method: str, batch: int, repeats: int, warmup: int) -> dict[str, float]:
    """Median (and min/max) wall time in ms of forward + backward over ``repeats`` runs after ``warmup`` runs."""
    inputs = make_inputs(batch, args.dim, args.num_classes, args.seed, args.device)
    for _ in range(warmup):
        forward_backward(method, *inputs, args.temperature, args.form)
    times = []
    for _ in range(repeats):
        synchronize(args.device)
        start = time.perf_counter()
        forward_backward(method, *inputs, args.temperature, args.form)
        synchronize(args.device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "repeats": repeats}


def check_agreement(args: argparse.Namespace, batch: int) -> dict[str, float]:
    """Largest absolute differences between ours and the baseline: loss, gradient of z, gradient of the gates."""
    inputs = make_inputs(batch, args.dim, args.num_classes, args.seed, args.device)
    loss_a, grad_z_a, grad_g_a = forward_backward("ours", *inputs, args.temperature, args.form)
    loss_b, grad_z_b, grad_g_b = forward_backward("baseline", *inputs, args.temperature, args.form)
    return {
        "loss_ours": float(loss_a),
        "loss_baseline": float(loss_b),
        "loss_abs_diff": float((loss_a - loss_b).abs()),
        "grad_embeddings_max_abs_diff": float((grad_z_a - grad_z_b).abs().max()),
        "grad_gates_max_abs_diff": float((grad_g_a - grad_g_b).abs().max()),
    }


def estimate_baseline_peak(batch: int, dim: int, bytes_per_element: float | None) -> float:
    """Estimated extra peak bytes of the baseline at ``batch``: peak per (B, N, K) element times B * B * K."""
    per_element = bytes_per_element if bytes_per_element is not None else DEFAULT_COPIES * FLOAT_BYTES
    return per_element * batch * batch * dim


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, to flag CPU contention from other processes."""
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


def format_mib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / MIB:,.1f}"


def format_size(value: float) -> str:
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / MIB:.1f} MiB"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| B | ours ms | baseline ms | speed-up | ours extra peak MiB | baseline extra peak MiB | memory ratio "
        "| largest intermediate ours / baseline |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        ours_ms = f"{row['ours_ms']:.2f}"
        if row["baseline_ok"]:
            base_ms = f"{row['baseline_ms']:.1f}"
            speedup = f"{row['speedup']:.1f}x"
            base_mem = format_mib(row["baseline_extra_peak_bytes"])
            ratio = "n/a" if row["memory_ratio"] is None else f"{row['memory_ratio']:.0f}x"
        else:
            base_ms = speedup = ratio = "-"
            base_mem = f"out of memory ({row['baseline_needs']})"
        sizes = f"{format_size(row['ours_largest_bytes'])} / {format_size(row['baseline_largest_bytes'])}"
        lines.append(
            f"| {row['batch']} | {ours_ms} | {base_ms} | {speedup} | {format_mib(row['ours_extra_peak_bytes'])} "
            f"| {base_mem} | {ratio} | {sizes} |"
        )
    return "\n".join(lines)


def measure_form(
    args: argparse.Namespace, cap_bytes: float, on_gpu: bool, measure_memory: Callable[..., dict[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Agreement, times and peak memory of ours and the baseline at every B, for the loss form ``args.form``;
    prints the form's table and targets. Returns (rows, targets)."""
    rows: list[dict[str, Any]] = []
    bytes_per_element: float | None = None  # measured baseline extra peak per (B, N, K) element
    for batch in sorted(args.batch_sizes):
        estimate = estimate_baseline_peak(batch, args.dim, bytes_per_element)
        baseline_fits = estimate <= cap_bytes
        row: dict[str, Any] = {
            "batch": batch,
            "ours_largest_bytes": largest_intermediate_bytes("ours", batch, args.dim),
            "baseline_largest_bytes": largest_intermediate_bytes("baseline", batch, args.dim),
            "baseline_estimate_bytes": estimate,
            "ours_extra_peak_bytes": None,
            "baseline_extra_peak_bytes": None,
        }
        row["baseline_needs"] = f"needs ~{estimate / GIB:.1f} GiB"
        if not baseline_fits:
            row["baseline_failure"] = f"estimated {estimate / GIB:.1f} GiB > cap {cap_bytes / GIB:.1f} GiB, not run"
        if not args.no_memory:
            ours_mem = measure_memory(args, "ours", batch, 0.0)
            if not ours_mem["ok"]:
                raise RuntimeError(f"our loss failed at B={batch}: {ours_mem['error']}")
            row["ours_extra_peak_bytes"] = ours_mem["extra_peak_bytes"]
            if baseline_fits:  # measured first, under the cap, so that this process never runs out of memory
                base_mem = measure_memory(args, "baseline", batch, cap_bytes / GIB)
                if base_mem["ok"]:
                    row["baseline_extra_peak_bytes"] = base_mem["extra_peak_bytes"]
                    bytes_per_element = base_mem["extra_peak_bytes"] / (batch * batch * args.dim)
                else:
                    row["baseline_failure"] = (
                        f"{'run' if on_gpu else 'child'} failed under the {cap_bytes / GIB:.1f} GiB cap: "
                        f"{base_mem['error']}"
                    )
                    row["baseline_needs"] = f"needs > {cap_bytes / GIB:.1f} GiB"
                    baseline_fits = False
        row["baseline_ok"] = baseline_fits
        if baseline_fits:
            agreement = check_agreement(args, batch)
            row["agreement"] = agreement
            print(
                f"B={batch}: loss ours {agreement['loss_ours']:.6f}, baseline {agreement['loss_baseline']:.6f}; "
                f"max abs diff: loss {agreement['loss_abs_diff']:.2e}, "
                f"grad z {agreement['grad_embeddings_max_abs_diff']:.2e}, "
                f"grad gates {agreement['grad_gates_max_abs_diff']:.2e}"
            )
        else:
            print(f"B={batch}: baseline out of memory ({row['baseline_failure']})")

        ours_time = time_method(args, "ours", batch, args.repeats, args.warmup)
        row["ours_ms"] = ours_time["median_ms"]
        row["ours_timing"] = ours_time
        if baseline_fits:
            repeats = max(1, min(args.repeats, args.max_baseline_repeats))
            base_time = time_method(args, "baseline", batch, repeats, min(args.warmup, 1))
            row["baseline_ms"] = base_time["median_ms"]
            row["baseline_timing"] = base_time
            row["speedup"] = base_time["median_ms"] / ours_time["median_ms"]
            if row["ours_extra_peak_bytes"] and row["baseline_extra_peak_bytes"] is not None:
                row["memory_ratio"] = row["baseline_extra_peak_bytes"] / row["ours_extra_peak_bytes"]
            else:
                row["memory_ratio"] = None
        rows.append(row)

    print()
    print(markdown_table(rows))
    print(
        f"\nTimes: median of forward + backward ({args.repeats} repetitions for ours, up to "
        f"{args.max_baseline_repeats} for the baseline). Extra peak: "
        + (
            "torch.cuda.max_memory_allocated above the memory allocated before the step."
            if on_gpu
            else "RSS above the child process's baseline."
        )
    )
    print(f"load average at end: {load_average()}")
    target_row = next((row for row in rows if row["batch"] == TARGET_BATCH and row["baseline_ok"]), None)
    targets: dict[str, Any] = {}
    if target_row is not None:
        speed_ok = target_row["speedup"] >= TARGET_SPEEDUP
        ratio = target_row["memory_ratio"]
        memory_ok = None if ratio is None else ratio >= TARGET_MEMORY_RATIO
        targets = {"batch": TARGET_BATCH, "speedup_met": speed_ok, "memory_met": memory_ok}
        memory_text = (
            "not measured"
            if ratio is None
            else f"{ratio:.0f}x (target >= {TARGET_MEMORY_RATIO:g}x: {'met' if memory_ok else 'NOT met'})"
        )
        print(
            f"Targets at B={TARGET_BATCH}: speed-up {target_row['speedup']:.1f}x (target >= {TARGET_SPEEDUP:g}x: "
            f"{'met' if speed_ok else 'NOT met'}), memory ratio {memory_text}"
        )
    return rows, targets


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 768, 2048], help="B values (N = B)")
    parser.add_argument("--dim", type=int, default=256, help="embedding size K")
    parser.add_argument("--num-classes", type=int, default=10, help="number of classes C")
    parser.add_argument("--temperature", type=float, default=0.1)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions (default 30, --quick 10)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (default 3, --quick 1)")
    parser.add_argument("--max-baseline-repeats", type=int, default=None, help="cap on the baseline's repetitions")
    parser.add_argument("--max-baseline-gib", type=float, default=16.0, help="memory cap of the baseline (GiB)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--json", type=Path, default=None, help="write the results to this JSON file")
    parser.add_argument(
        "--forms", nargs="+", choices=FORMS, default=["reference"], help="loss forms to measure, one table each"
    )
    # Hidden flags of the memory-measuring child process.
    parser.add_argument("--child-method", choices=METHODS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-batch", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--child-cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--child-form", choices=FORMS, default="reference", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.form = args.child_form
    if args.repeats is None:
        args.repeats = 10 if args.quick else 30
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.max_baseline_repeats is None:
        args.max_baseline_repeats = 3 if args.quick else 7
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child_method is not None:
        print(json.dumps(child_measure(args)), flush=True)
        return

    on_gpu = args.device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but CUDA is not available")
    torch.set_num_threads(args.threads)
    command = shlex.join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    hardware = torch.cuda.get_device_name(args.device) if on_gpu else platform.processor() or platform.machine()
    print(
        f"torch {torch.__version__}, {f'device {args.device} ({hardware})' if on_gpu else hardware}, "
        f"threads {torch.get_num_threads()}, "
        f"K={args.dim}, C={args.num_classes}, T={args.temperature}, pairs: arbitrary, N = B, forward + backward"
    )
    available = torch.cuda.mem_get_info(args.device)[0] if on_gpu else available_memory_bytes()
    measure_memory = cuda_measure if on_gpu else run_child
    cap_bytes = args.max_baseline_gib * GIB
    if available is not None:
        cap_bytes = min(cap_bytes, 0.85 * available)
    print(f"baseline memory cap: {cap_bytes / GIB:.1f} GiB (--max-baseline-gib {args.max_baseline_gib:g})")
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs; other processes distort the times)\n")

    results: dict[str, dict[str, Any]] = {}
    for form in args.forms:
        args.form = form
        print(f"=== loss form: {form} ===")
        rows, targets = measure_form(args, cap_bytes, on_gpu, measure_memory)
        results[form] = {"rows": rows, "targets": targets}
        print()
    if args.json is not None:
        payload = {
            "command": command,
            "torch": torch.__version__,
            "device": args.device,
            "device_name": hardware,
            "threads": torch.get_num_threads(),
            "dim": args.dim,
            "num_classes": args.num_classes,
            "temperature": args.temperature,
            "baseline_cap_bytes": cap_bytes,
            "load_average_end": load_average(),
            "rows": results[args.forms[0]]["rows"],
            "targets": results[args.forms[0]]["targets"],
            "forms": results,
        }
        args.json.write_text(json.dumps(payload, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
