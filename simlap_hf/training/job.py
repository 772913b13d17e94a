"""One training job, from a built model to a saved model folder: a :class:`TrainingJob` describes it, :func:`start_run`
prepares the run before any data is read, and :func:`run_job` trains and saves.

A script is: parse the arguments, check the model flags, :func:`start_run`, load the data, build the model, describe
the :class:`TrainingJob` (:mod:`~simlap_hf.training.state`), ``run_job(accelerator, job)``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data import DataArguments, DataBundle, image_file_checks_done, prepare_data, prepare_own_part_loader
from ..hub import create_hub_repo, push_checkpoint
from .arguments import TrainingArguments
from .checkpoints import PreviousRun, writes_checkpoint_files
from .factories import create_accelerator, create_model_ema, create_optimizer, prepare_model
from .loop import fit
from .outputs import save_final_outputs
from .processes import agree_on_resume, local_main_first, shares_output_folder
from .state import TrainingJob
from .steps import with_normalized_inputs
from .validation import validate_training_args

logger = logging.getLogger("simlap_hf")


def start_hub_repo(args: TrainingArguments) -> str | None:
    """Create the Hub repository before training when ``--push_to_hub`` (fails early on a bad id or token)."""
    if not args.push_to_hub:
        return None

    return create_hub_repo(args.hub_model_id, args.hub_token, args.hub_private_repo)


def start_run(args: TrainingArguments) -> tuple[Accelerator, str | None]:
    """The first steps of every script, before any data is read: check the flags, create the Hub repository when
    pushing (so a bad id or token fails early), and set up the accelerator. Returns (accelerator, Hub repo id).

    Nothing in the output folder is moved or deleted here: with ``--overwrite_output_dir`` the previous run is moved
    aside by :func:`run_job`, after the data is loaded and the model built (see :class:`PreviousRun`).

    With several processes the output folder is checked on the main process only and every process resumes from
    the checkpoint it chose (see :mod:`simlap_hf.training.processes`)."""
    auto_resume = args.resume_from_checkpoint == "auto"
    several_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1
    validate_training_args(args, check_output_dir=not several_processes)
    repo_id = start_hub_repo(args)
    accelerator = create_accelerator(args)
    if several_processes:
        _choose_checkpoint_copies(accelerator, args)
        agree_on_resume(accelerator, args)
    if auto_resume:
        logger.info(
            "--resume_from_checkpoint auto: %s.",
            "continuing from the newest complete checkpoint"
            if args.resume_from_checkpoint
            else "no complete checkpoint yet, starting fresh",
        )
    accelerator.wait_for_everyone()
    return accelerator, repo_id


def _choose_checkpoint_copies(accelerator: Accelerator, args: TrainingArguments) -> None:
    """Keep ``--save_on_each_node`` only where the machines do not share the output folder; warn when they do not
    share it and the flag is off (a resume then works only on the main machine)."""
    shared = shares_output_folder(accelerator, args.output_dir)
    accelerator.project_configuration.save_on_each_node = args.save_on_each_node and not shared
    if args.save_on_each_node and shared:
        logger.info("--save_on_each_node: every process sees %s; each checkpoint is written once.", args.output_dir)
    if not shared and not args.save_on_each_node and accelerator.is_main_process:
        logger.warning(
            "The machines do not share --output_dir %s: checkpoints are complete on the main machine only, so this "
            "run cannot be resumed on all machines. Pass --save_on_each_node to keep a copy on every machine.",
            args.output_dir,
        )


def load_run_data(
    accelerator: Accelerator, data_args: DataArguments, num_channels: int, args: TrainingArguments
) -> DataBundle:
    """:func:`~simlap_hf.data.prepare_data` of the run: on the first process of each machine first (downloads,
    caches and the image-file checks happen once per machine), then on the others; an error stops every process."""

    def load(first: bool) -> DataBundle:
        with contextlib.nullcontext() if first else image_file_checks_done():
            return prepare_data(
                data_args, num_channels, args.per_device_train_batch_size, args.per_device_eval_batch_size, args.seed
            )

    return local_main_first(accelerator, load, "Loading the data")


def _prepare(accelerator: Accelerator, job: TrainingJob) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """Distributed BatchNorm, memory format, optimizer, then ``accelerator.prepare`` of the model, the optimizer and
    the job's three loaders (replaced in ``job.data``)."""
    args, data = job.args, job.data
    model = prepare_model(job.model, args, accelerator)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, args)
    # A streamed training set (--streaming) is already split across the processes: only placed on the device.
    if data.train_split_per_process:
        data.train = prepare_own_part_loader(accelerator, data.train)
        model, optimizer, data.validation, data.train_eval = accelerator.prepare(
            model, optimizer, data.validation, data.train_eval
        )
        return model, optimizer
    model, optimizer, data.train, data.validation, data.train_eval = accelerator.prepare(
        model, optimizer, data.train, data.validation, data.train_eval
    )
    return model, optimizer


def _ema_hook(accelerator: Accelerator, ema: Any) -> Callable[[torch.nn.Module], None] | None:
    """The ``on_step_end`` that updates the EMA of the weights (saved with every checkpoint), or None."""
    if ema is None:
        return None
    accelerator.register_for_checkpointing(ema)

    def on_step_end(trained: torch.nn.Module) -> None:
        ema.update(accelerator.unwrap_model(trained))

    return on_step_end


def _checkpoint_push_hook(job: TrainingJob) -> Callable[[Path], None] | None:
    """The ``on_checkpoint`` that uploads every checkpoint (``--push_checkpoints`` with a Hub repository), or None."""
    if job.repo_id is None or not job.args.push_checkpoints:
        return None

    def on_checkpoint(path: Path) -> None:
        push_checkpoint(path, job.repo_id, job.args.hub_token)

    return on_checkpoint


def _move_previous_run_aside(accelerator: Accelerator, args: TrainingArguments) -> PreviousRun | None:
    """With ``--overwrite_output_dir``: move the previous run of the output folder aside (on the processes that write
    checkpoint files), once every check has passed, the data is loaded and the model is prepared."""
    previous = None
    if args.overwrite_output_dir and writes_checkpoint_files(accelerator):
        previous = PreviousRun(args.output_dir)
        previous.move_aside()
    accelerator.wait_for_everyone()
    return previous


def _discarding_previous_run(
    previous: PreviousRun, on_checkpoint: Callable[[Path], None] | None
) -> Callable[[Path], None]:
    """``on_checkpoint`` that first deletes the replaced run: the new run now has a complete checkpoint."""

    def discard_then_continue(path: Path) -> None:
        previous.discard()
        if on_checkpoint is not None:
            on_checkpoint(path)

    return discard_then_continue


def run_job(accelerator: Accelerator, job: TrainingJob) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Everything after the model is built: optimizer, ``accelerator.prepare``, optional EMA, trackers, :func:`fit`,
    the card sections, and :func:`save_final_outputs`. Returns the trained (unwrapped) model (the EMA weights when
    kept) and the results.

    With ``--overwrite_output_dir`` the previous run is moved aside just before training and deleted once the new run
    has a complete checkpoint; if the run ends before that (an error, divergence, Ctrl-C, SIGTERM), it is put back.
    """
    model, optimizer = _prepare(accelerator, job)
    ema = create_model_ema(accelerator.unwrap_model(model), job.model_ema_decay)
    on_step_end = _ema_hook(accelerator, ema)
    on_checkpoint = _checkpoint_push_hook(job)
    compute_loss = job.compute_loss
    if job.data.train_normalizer is not None:
        compute_loss = with_normalized_inputs(compute_loss, job.data.train_normalizer)
    if job.args.with_tracking:
        accelerator.init_trackers(f"simlap_{job.task}", {k: str(v) for k, v in job.hyperparameters.items()})
    previous = _move_previous_run_aside(accelerator, job.args)
    if previous is not None:
        on_checkpoint = _discarding_previous_run(previous, on_checkpoint)
    try:
        result = fit(
            accelerator,
            model,
            optimizer,
            job.data.train,
            job.args,
            compute_loss,
            job.make_evaluator(accelerator, job.data, ema),
            on_step_end=on_step_end,
            on_checkpoint=on_checkpoint,
        )
        final = ema.module if ema is not None else model
        # Run on every process (it may gather across processes); only the main process writes the card.
        sections = job.card_sections(final) if job.card_sections is not None else None
        results = save_final_outputs(accelerator, job, final, result, sections)
    finally:  # an error, Ctrl-C or a stop before the first complete checkpoint puts the previous run back
        if previous is not None:
            previous.settle()
    return accelerator.unwrap_model(final), results
