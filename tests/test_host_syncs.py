"""Host synchronisations of the training step: at most one per optimizer step, except on logging steps.

A host synchronisation is a read of tensor values by Python (``.item()``, ``.tolist()``, ``bool(t)``, ``float(t)``,
``if t:`` ...) or an operation whose output size depends on the values (boolean-mask indexing, ``nonzero``): on an
accelerator each one waits for every kernel queued before it. On the CPU nothing waits, so these tests count the
calls themselves, with a ``TorchFunctionMode`` that is active while the loop trains (forward, backward, the flag
exchange, the update, the logging) and inactive while the loader produces a batch (data loading reads host-side
random numbers on purpose). ``torch.distributed`` collectives called outside the loss are counted as well.
"""

from __future__ import annotations

import sys
import traceback
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

ROOT = Path(__file__).resolve().parents[1]
LOGGING_STEPS = 4

# Tensor methods and torch functions that hand tensor values to Python.
READS = frozenset(
    {
        "item",
        "tolist",
        "numpy",
        "cpu",
        "__bool__",
        "__float__",
        "__int__",
        "__index__",
        "__complex__",
        "__array__",
        "__format__",
        "__repr__",
        "equal",
        "allclose",
        "is_nonzero",
        # Their output size depends on the values.
        "nonzero",
        "masked_select",
        "unique",
        "unique_consecutive",
    }
)
COLLECTIVES = (
    "all_gather",
    "all_gather_into_tensor",
    "all_gather_single",
    "all_gather_object",
    "all_reduce",
    "broadcast",
    "broadcast_object_list",
    "barrier",
    "reduce_scatter_tensor",
    "reduce_scatter_single",
    "gather",
    "scatter",
)


def _masks_by_value(func: Any, args: tuple) -> bool:
    """``tensor[mask]`` / ``tensor[mask] = value`` with a boolean mask: the output size depends on the mask."""
    if getattr(func, "__name__", "") not in ("__getitem__", "__setitem__") or len(args) < 2:
        return False
    index = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in index)


class HostSyncCounter(TorchFunctionMode):
    """Records every host read while ``active``, by window (one window per batch the loop trains on), with the
    line of package code that made it.

    Reads of the optimizer's step counters are left out: torch.optim keeps them on the host by design (reading
    them never waits for the accelerator)."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False
        self.window = -1
        self.reads: dict[int, list[str]] = defaultdict(list)
        self.collectives: dict[int, list[str]] = defaultdict(list)
        self.optimizer: Any = None

    def host_counter(self, tensor: torch.Tensor) -> bool:
        """One of the optimizer's step counters."""
        states = self.optimizer.state.values() if self.optimizer is not None else ()
        return any(state.get("step") is tensor for state in states)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if self.active:
            name = getattr(func, "__name__", str(func))
            tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
            hit = name in READS or _masks_by_value(func, args)
            if hit and not (tensor is not None and self.host_counter(tensor)):
                self.reads[self.window].append(f"{name} at {_caller()}")
        return func(*args, **kwargs)

    def record_collective(self, name: str) -> None:
        """A ``torch.distributed`` collective, with the package code that called it."""
        if self.active:
            self.collectives[self.window].append(f"{name} at {_caller()}")


def _caller() -> str:
    """The innermost frame of package or script code: where the read comes from."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "simlap_hf" in frame.filename or frame.filename.endswith("train_pretrain.py"):
            return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"
    return "outside the package"


@contextmanager
def counting_host_syncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[HostSyncCounter, dict[int, int]]]:
    """Count host reads and collectives of every training window; yields the counter and ``{window: optimizer step
    it belongs to}`` (the step it trains, 1-based)."""
    import torch.distributed as dist

    import simlap_hf.training.loop as loop

    counter = HostSyncCounter()
    steps: dict[int, int] = {}
    original_start, original_run = loop._TrainingLoop.start_epoch, loop._TrainingLoop.run

    def start_epoch(self: Any, epoch: int) -> tuple[int, Iterator]:
        skip, batches = original_start(self, epoch)

        def counted() -> Iterator:
            for batch in batches:  # produced with the mode inactive
                counter.window += 1
                steps[counter.window] = self.state.global_step + 1
                counter.optimizer = self.optimizer
                counter.active = True
                yield batch
                counter.active = False

        return skip, counted()

    def run(self: Any) -> Any:
        try:
            return original_run(self)
        finally:
            counter.active = False

    for name in COLLECTIVES:
        if hasattr(dist, name):
            original = getattr(dist, name)

            def collective(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                counter.record_collective(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(dist, name, collective)
    monkeypatch.setattr(loop._TrainingLoop, "start_epoch", start_epoch)
    monkeypatch.setattr(loop._TrainingLoop, "run", run)
    with counter:
        yield counter, steps


@dataclass
class StepCounts:
    """What one optimizer step did: host reads, and collectives of the loop itself (the loss's collectives, the
    key gather, its backward and the count of positives, are asynchronous on accelerators and only listed)."""

    reads: list[str]
    loop_collectives: list[str]
    other_collectives: list[str]


def counts_per_step(counter: HostSyncCounter, steps: dict[int, int]) -> dict[int, StepCounts]:
    """The counter's windows grouped by the optimizer step they belong to."""
    per_step: dict[int, StepCounts] = {}
    for window, step in steps.items():
        counts = per_step.setdefault(step, StepCounts([], [], []))
        counts.reads += counter.reads[window]
        for event in counter.collectives[window]:
            (counts.loop_collectives if " at loop.py:" in event else counts.other_collectives).append(event)
    return per_step


def count_tiny_run(root: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> dict[int, StepCounts]:
    """A one-epoch tiny pretraining run on the image folder ``root / "images"`` (9 batches of 12, shared among the
    processes), logging every :data:`LOGGING_STEPS` optimizer steps, counted."""
    from conftest import tiny_run_flags

    import train_pretrain

    settings = dict(num_train_epochs=1, checkpointing_epochs=0, logging_steps=LOGGING_STEPS, **overrides)
    with counting_host_syncs(monkeypatch) as (counter, steps):
        train_pretrain.run(tiny_run_flags(root / "run", root / "images", **settings))
    return counts_per_step(counter, steps)


def check_counts(per_step: dict[int, StepCounts], expected_steps: int) -> None:
    """At most one host read and one collective of the loop per optimizer step, except on logging steps (which read
    the logged values)."""
    assert sorted(per_step) == list(range(1, expected_steps + 1)), sorted(per_step)
    for step, counts in per_step.items():
        if step % LOGGING_STEPS:
            assert len(counts.reads) <= 1 and len(counts.loop_collectives) <= 1, (step, counts)
        else:  # the logged values are read: the counter sees them (it is not blind)
            assert len(counts.reads) >= 2, (step, counts)


def _show(per_step: dict[int, StepCounts]) -> str:
    return "\n".join(f"step {step}: {counts}" for step, counts in sorted(per_step.items()))


@pytest.mark.parametrize("accumulation, clip_grad", [(1, None), (3, 1.0)])
def test_one_host_sync_per_optimizer_step(tmp_path, monkeypatch, accumulation, clip_grad):
    """One process; with gradient accumulation the non-finite flags of the 3 batches of an update are exchanged
    once, before it."""
    from conftest import write_image_folder

    write_image_folder(tmp_path / "images")
    per_step = count_tiny_run(tmp_path, monkeypatch, gradient_accumulation_steps=accumulation, clip_grad=clip_grad)
    print(_show(per_step), file=sys.stderr)
    check_counts(per_step, expected_steps=-(-9 // accumulation))


def test_one_host_sync_per_optimizer_step_on_two_processes(tmp_path):
    """Two processes (torchrun, gloo): the stop requests and the non-finite flags travel in one gather per step."""
    from conftest import write_image_folder
    from test_distributed import run_torchrun

    write_image_folder(tmp_path / "images")
    for report in run_torchrun("host_syncs", tmp_path, timeout=600):
        per_step = {int(step): StepCounts(**counts) for step, counts in report.items()}
        print(_show(per_step), file=sys.stderr)
        check_counts(per_step, expected_steps=4)  # each process takes 4 of the 9 batches (the last round dropped)
        for counts in per_step.values():
            assert len(counts.loop_collectives) >= 1, counts  # the counter sees the collectives


def test_no_graph_break_from_the_key_gather_under_torch_compile(tmp_path):
    """The key gather (forward all-gather, backward reduce-scatter, both collective paths) is traced by dynamo into
    functional collectives: one graph, no break, and the compiled loss and gradient equal the eager ones."""
    from test_distributed import run_torchrun

    for report in run_torchrun("compile", tmp_path):
        for path in ("single", "fallback"):
            assert report[path]["graphs"] == 1 and report[path]["graph_breaks"] == 0, report[path]
            assert report[path]["bit_identical"], report[path]
        assert report["model"] == {"graphs": 1, "graph_breaks": 0}, report["model"]


def test_non_finite_loss_inside_an_accumulation_stops_before_the_update_naming_its_batch(tmp_path, monkeypatch):
    """The finiteness of the 3 accumulated batches is checked once, before the update: a NaN in the second batch
    of the second update stops the run there, naming that batch and its loss parts; that update is not applied."""
    import json

    from conftest import tiny_run_flags, write_image_folder

    import train_pretrain

    original = train_pretrain.simlap_step
    calls = []

    def step_with_nan(model: torch.nn.Module, batch: dict) -> tuple:
        calls.append(1)
        loss, logs = original(model, batch)
        if len(calls) == 5:
            nan = torch.full_like(loss, float("nan"))
            return loss + nan, {**logs, "contrastive_loss": logs["contrastive_loss"] + nan}
        return loss, logs

    monkeypatch.setattr(train_pretrain, "simlap_step", step_with_nan)
    write_image_folder(tmp_path / "images")
    flags = tiny_run_flags(tmp_path / "run", tmp_path / "images", num_train_epochs=1, gradient_accumulation_steps=3)
    with pytest.raises(FloatingPointError) as error:
        train_pretrain.run(flags)
    assert "Non-finite loss nan in epoch 1/1, batch 5/9 (loss parts: " in str(error.value)
    assert "contrastive_loss=nan" in str(error.value) and "stopped before this update" in str(error.value)
    log = [json.loads(line) for line in (tmp_path / "run" / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log if "loss" in row] == [1]
