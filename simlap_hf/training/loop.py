"""The training loop, :func:`fit`: epochs of optimizer steps with a progress bar, logging, periodic evaluation,
atomic checkpoints, resumption (mid-epoch included) and a clean stop on SIGINT/SIGTERM.

Its phases are the methods of :class:`_TrainingLoop`: restore (from a checkpoint), start of an epoch, one step,
the update that follows it (schedule, hooks, logging), the stop (a checkpoint, then :class:`TrainingInterrupted`),
and the end of an epoch (evaluation, best epoch, checkpoint).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from ..data import ResumableAugmentations, capture_rng_state
from .checkpoints import (
    TrainerState,
    augmentation_rng_file,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    save_checkpoint,
)
from .errors import StopRequested, TrainingInterrupted
from .factories import create_scheduler
from .outputs import LOG_FILE, append_log, truncate_log
from .state import EvaluateFunction, LossFunction, TrainingResult

if TYPE_CHECKING:
    from .arguments import TrainingArguments

logger = logging.getLogger("simlap_hf")


def _mean_over_processes(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    """Scalar tensors averaged over the processes, as floats (one all-reduce for all of them)."""
    if not values:
        return {}
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names]).to(accelerator.device)
    averaged = accelerator.reduce(stacked, reduction="mean")
    return {name: float(value) for name, value in zip(names, averaged.tolist())}


@dataclass
class _StepFlags:
    """What every process agrees on before an optimizer update.

    Attributes:
        stop: some process was asked to stop (SIGINT/SIGTERM).
        non_finite_ranks: the processes whose loss was NaN or infinite in a batch since the last update.
        first_non_finite: position, among those batches, of the first one with a non-finite loss on any process.
    """

    stop: bool
    non_finite_ranks: list[int]
    first_non_finite: int | None


def _exchange_step_flags(accelerator: Accelerator, stop_requested: bool, losses: list[torch.Tensor]) -> _StepFlags:
    """The one host synchronisation of an optimizer step: every process's stop request and the finiteness of its
    ``losses`` (scalars, one per batch since the last update), in one tiny gather read once. Every process must call
    this at the same point, and every process gets the same answer: all of them stop at the same step, and a
    non-finite loss stops all of them before the update instead of the healthy ones waiting forever in the next
    gradient all-reduce."""
    device = accelerator.device
    finite = torch.isfinite(torch.stack([loss.detach().float().reshape(()) for loss in losses]).to(device))  # (A,)
    # torch.full, not torch.tensor: a fill on the device needs no blocking copy from the host.
    stop = torch.full((1,), float(stop_requested), device=device)
    flags = torch.cat([(~finite).float(), stop])  # (A + 1,)
    if accelerator.num_processes > 1:
        flags = accelerator.gather(flags)
    rows = flags.reshape(accelerator.num_processes, len(losses) + 1).tolist()  # (W, A + 1) on the host
    bad = [[index for index, value in enumerate(row[:-1]) if value] for row in rows]
    return _StepFlags(
        stop=any(row[-1] for row in rows),
        non_finite_ranks=[rank for rank, indices in enumerate(bad) if indices],
        first_non_finite=min((indices[0] for indices in bad if indices), default=None),
    )


def _adapt_schedule_length(
    state: TrainerState, args: TrainingArguments, scheduler: Any, rebuild: Callable[[], Any]
) -> None:
    """Resuming with another ``--num_train_epochs``: the learning-rate schedule is rebuilt for the new length (warmup
    and cosine over the new total, continued at the current step) instead of the checkpoint's, which would train the
    extra epochs at ``min_lr``. Fewer epochs than already trained is an error."""
    saved = state.num_train_epochs
    if saved is None or saved == args.num_train_epochs:
        return
    if args.num_train_epochs < state.epoch + (1 if state.step_in_epoch else 0):
        raise ValueError(
            f"--num_train_epochs={args.num_train_epochs} is less than the {state.epoch} epoch(s) the checkpoint has "
            f"already trained; pass --num_train_epochs {saved} (the run's length) or more."
        )
    before = scheduler._get_lr(state.global_step)[0]
    scheduler.load_state_dict(rebuild().state_dict())
    after = scheduler._get_lr(state.global_step)[0]
    logger.warning(
        "--num_train_epochs changed from %d (the checkpoint's schedule) to %d: the %s schedule is rebuilt for %d "
        "epochs and continues at step %d (learning rate %.3g instead of %.3g).",
        saved,
        args.num_train_epochs,
        args.sched,
        args.num_train_epochs,
        state.global_step,
        after,
        before,
    )


class _TrainingLoop:
    """One call of :func:`fit`: its state (trainer state, scheduler, progress bar, last metrics) and its phases."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        train_dataloader: Any,
        args: TrainingArguments,
        compute_loss: LossFunction,
        evaluate: EvaluateFunction,
        metric_for_best: str,
        on_step_end: Callable[[torch.nn.Module], None] | None,
        on_checkpoint: Callable[[Path], None] | None,
    ) -> None:
        self.accelerator, self.model, self.optimizer, self.args = accelerator, model, optimizer, args
        self.train_dataloader, self.compute_loss, self.evaluate = train_dataloader, compute_loss, evaluate
        self.metric_for_best, self.on_step_end, self.on_checkpoint = metric_for_best, on_step_end, on_checkpoint
        self.updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
        self.scheduler = create_scheduler(optimizer, args, self.updates_per_epoch)
        accelerator.register_for_checkpointing(self.scheduler)
        self.state = TrainerState()
        dataset = train_dataloader.dataset
        self.augmentations = dataset if isinstance(dataset, ResumableAugmentations) else None
        # (saved RNG states before the next batch, the states to restore afterwards) of a mid-epoch resume.
        self.resume_augmentations: tuple[dict[str, Any], dict[str, Any]] | None = None
        self.metrics: dict[str, float] = {}
        self.world_images = args.per_device_train_batch_size * accelerator.num_processes
        self.progress: Any = None
        # (batch index, detached loss, logged parts) of the batches since the last update, checked before it.
        self.unchecked: list[tuple[int, torch.Tensor, dict[str, torch.Tensor]]] = []

    def run(self) -> TrainingResult:
        """Restore, train the remaining epochs, and return the final state and metrics."""
        self.restore()
        batches_per_epoch = len(self.train_dataloader)
        self.progress = tqdm(
            total=batches_per_epoch * self.args.num_train_epochs,
            initial=batches_per_epoch * self.state.epoch + self.state.step_in_epoch,
            disable=not self.accelerator.is_local_main_process,
            desc="train",
            dynamic_ncols=True,
        )
        with StopRequested() as stop, self.progress:  # the bar is closed on errors too
            for epoch in range(self.state.epoch, self.args.num_train_epochs):
                self.train_epoch(epoch, stop)
                self.end_epoch(epoch)
        self.progress.close()
        if not self.metrics:  # resumed a run that had already finished
            self.metrics = self.evaluate(self.model)
        return TrainingResult(state=self.state, final_metrics=self.metrics)

    def restore(self) -> None:
        """Continue from ``--resume_from_checkpoint`` (states, schedule length, augmentation RNG); set the schedule to
        the current step; start or trim ``training_log.jsonl``."""
        args, accelerator = self.args, self.accelerator
        if args.resume_from_checkpoint is not None:
            path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
            self.state = load_checkpoint(accelerator, path)
            logger.info("Resumed from %s (epoch %d, step %d).", path, self.state.epoch, self.state.global_step)
            rng_file = path / augmentation_rng_file(accelerator)
            if self.augmentations is not None and self.state.step_in_epoch and rng_file.is_file():
                self.resume_augmentations = (torch.load(rng_file, weights_only=False), capture_rng_state())
            _adapt_schedule_length(
                self.state, args, self.scheduler, lambda: create_scheduler(self.optimizer, args, self.updates_per_epoch)
            )
        self.state.num_train_epochs = args.num_train_epochs
        self.scheduler.step_update(self.state.global_step)
        if accelerator.is_main_process:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            if self.state.global_step == 0:
                (Path(args.output_dir) / LOG_FILE).unlink(missing_ok=True)
            else:  # drop what the interrupted run logged after its checkpoint: those steps are trained again
                truncate_log(args.output_dir, self.state.global_step)

    def start_epoch(self, epoch: int) -> tuple[int, Iterable[dict[str, torch.Tensor]]]:
        """Model in training mode, the loader's epoch, and the batches left in it: (first batch index, batches)."""
        self.model.train()
        self.train_dataloader.set_epoch(epoch)
        skip = self.state.step_in_epoch
        # A streamed training set replays its stream up to the position itself (start_epoch below), undecoded.
        replays = self.augmentations is not None and self.augmentations.replays_to_position
        batches = self.train_dataloader
        if skip and not replays:
            batches = self.accelerator.skip_first_batches(self.train_dataloader, skip)
        if self.augmentations is not None:
            self.augmentations.start_epoch(first_batch=skip)
            if self.resume_augmentations is not None:
                self.augmentations.resume_at(*self.resume_augmentations)
                self.resume_augmentations = None
        return skip, batches

    def train_epoch(self, epoch: int, stop: StopRequested) -> None:
        """The steps of one epoch (from the first batch not yet trained); stops at a step boundary when asked."""
        skip, batches = self.start_epoch(epoch)
        epoch_start = waiting_since = time.perf_counter()
        for step, batch in enumerate(batches, start=skip):
            # Time this process waits for the loader (fetch, collate, copy to the device): with one host sync per
            # step the device is idle for about as long, so it says whether the input keeps up with the step.
            self.state.data_wait_seconds += time.perf_counter() - waiting_since
            loss, logs, stop_now = self.train_step(batch, epoch, step, stop)
            self.state.step_in_epoch = step + 1
            self.state.train_images += self.world_images
            self.progress.update(1)
            if self.accelerator.sync_gradients:
                self.after_update(epoch, {"loss": loss.detach(), **logs})
            # Only at an optimizer-step boundary (agreed before its update): accumulated gradients are not saved.
            if stop_now:
                self.stop(epoch, epoch_start, stop)
            waiting_since = time.perf_counter()
        self.state.train_seconds += time.perf_counter() - epoch_start

    def train_step(
        self, batch: dict[str, torch.Tensor], epoch: int, step: int, stop: StopRequested
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], bool]:
        """Forward, backward, and at the end of an accumulation the flag exchange (stop requests, finiteness of
        every process's losses since the last update), clipping and the optimizer update.

        Returns the loss, its logged parts, and whether every process stops after this update."""
        accelerator, args = self.accelerator, self.args
        if args.channels_last:
            batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
        stop_now = False
        with accelerator.accumulate(self.model):
            loss, logs = self.compute_loss(self.model, batch)
            self.unchecked.append((step, loss.detach(), logs))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                stop_now = self.check_before_update(epoch, stop.requested)
                if args.clip_grad is not None:
                    accelerator.clip_grad_norm_(self.model.parameters(), args.clip_grad)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss, logs, stop_now

    def check_before_update(self, epoch: int, stop_requested: bool) -> bool:
        """Exchange the step's flags; raise FloatingPointError on every process, before the update, when a loss of
        any process since the last update is not finite. Returns whether every process stops after the update."""
        unchecked, self.unchecked = self.unchecked, []
        flags = _exchange_step_flags(self.accelerator, stop_requested, [loss for _, loss, _ in unchecked])
        if flags.first_non_finite is None:
            return flags.stop
        step, loss, logs = unchecked[flags.first_non_finite]
        parts = ", ".join(f"{k}={float(torch.as_tensor(v).detach()):.4g}" for k, v in logs.items())
        where = "" if self.accelerator.num_processes == 1 else f" on process(es) {flags.non_finite_ranks}"
        good = list_checkpoints(self.args.output_dir)
        raise FloatingPointError(
            f"Non-finite loss {float(loss):.4g}{where} in epoch {epoch + 1}/{self.args.num_train_epochs}, "
            f"batch {step + 1}/{len(self.train_dataloader)} (loss parts: {parts}); training stopped before this "
            f"update. The last good checkpoint, {str(good[-1]) if good else '(none yet)'}, stays the latest; lower the "
            "learning rate or disable mixed precision and resume with --resume_from_checkpoint latest."
        )

    def after_update(self, epoch: int, logs: dict[str, torch.Tensor]) -> None:
        """After an optimizer update: the step count, the schedule, ``on_step_end``, and every ``logging_steps`` the
        step's loss parts (averaged over processes) to the trackers, the progress bar and ``training_log.jsonl``."""
        state = self.state
        state.global_step += 1
        self.scheduler.step_update(state.global_step)
        if self.on_step_end is not None:
            self.on_step_end(self.model)
        if state.global_step % self.args.logging_steps != 0:
            return
        lr = max(group["lr"] for group in self.optimizer.param_groups)
        record = _mean_over_processes(self.accelerator, logs)
        record.update(lr=lr, epoch=epoch + state.step_in_epoch / len(self.train_dataloader))
        self.accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.global_step)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
        if self.accelerator.is_main_process:
            append_log(self.args.output_dir, {"step": state.global_step, **record})

    def stop(self, epoch: int, epoch_start: float, stop: StopRequested) -> None:
        """Save a mid-epoch checkpoint (with the augmentation RNG state of the next batch), say how to resume, and
        raise :class:`TrainingInterrupted`."""
        state = self.state
        state.train_seconds += time.perf_counter() - epoch_start
        next_batch_rng = self.augmentations.state_before_batch(state.step_in_epoch) if self.augmentations else None
        path = save_checkpoint(self.accelerator, state, self.args, augmentation_rng=next_batch_rng)
        self.progress.close()
        message = (
            f"Stopped in epoch {epoch + 1}/{self.args.num_train_epochs} after batch {state.step_in_epoch}/"
            f"{len(self.train_dataloader)} (global step {state.global_step}); checkpoint saved to {path}. "
            "Resume with the same command plus --resume_from_checkpoint latest."
        )
        self.accelerator.print(message)
        raise TrainingInterrupted(message, stop.signum)

    def end_epoch(self, epoch: int) -> None:
        """Evaluate every ``eval_every`` epochs and after the last; checkpoint every ``checkpointing_epochs`` and
        after the last."""
        state = self.state
        state.epoch, state.step_in_epoch = epoch + 1, 0
        is_last = state.epoch == self.args.num_train_epochs
        if state.epoch % self.args.eval_every == 0 or is_last:
            self.evaluate_epoch()
        due = self.args.checkpointing_epochs > 0 and state.epoch % self.args.checkpointing_epochs == 0
        if due or is_last:
            path = save_checkpoint(self.accelerator, state, self.args)
            if state.best_epoch == state.epoch:
                state.best_checkpoint = str(path)
            if self.on_checkpoint is not None and self.accelerator.is_main_process:
                self.on_checkpoint(path)

    def evaluate_epoch(self) -> None:
        """Evaluate, record and log the metrics, and keep the best epoch by ``metric_for_best``."""
        state, accelerator = self.state, self.accelerator
        self.metrics = metrics = self.evaluate(self.model)
        record = {"epoch": state.epoch, "step": state.global_step, **metrics}
        state.history.append(record)
        accelerator.log(metrics, step=state.global_step)
        accelerator.print(f"epoch {state.epoch}: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
        if accelerator.is_main_process:
            append_log(self.args.output_dir, record)
        best = state.best_metric
        if self.metric_for_best in metrics and (best is None or metrics[self.metric_for_best] > best):
            state.best_metric, state.best_epoch = metrics[self.metric_for_best], state.epoch
            state.best_checkpoint = None


def fit(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_dataloader: torch.utils.data.DataLoader,
    args: TrainingArguments,
    compute_loss: LossFunction,
    evaluate: EvaluateFunction,
    metric_for_best: str = "eval_top1",
    on_step_end: Callable[[torch.nn.Module], None] | None = None,
    on_checkpoint: Callable[[Path], None] | None = None,
) -> TrainingResult:
    """Train ``model`` (already prepared by ``accelerator``) for ``args.num_train_epochs`` epochs.

    Args:
        compute_loss: ``(model, batch) -> (loss, {name: scalar tensor})``; the dict is logged.
        evaluate: ``(model) -> {name: float}``; called every ``eval_every`` epochs and after the last one, on every
            process (it must gather across processes itself).
        metric_for_best: the evaluation metric whose maximum defines the best epoch.
        on_step_end: called after every optimizer update (for example to update an EMA of the weights).
        on_checkpoint: called on the main process with the folder of every checkpoint saved at an epoch end.

    Checkpoints every ``checkpointing_epochs`` epochs, resumes from ``args.resume_from_checkpoint``, and on
    SIGINT/SIGTERM saves a checkpoint and raises :class:`TrainingInterrupted`.
    """
    loop = _TrainingLoop(
        accelerator,
        model,
        optimizer,
        train_dataloader,
        args,
        compute_loss,
        evaluate,
        metric_for_best,
        on_step_end,
        on_checkpoint,
    )
    return loop.run()
