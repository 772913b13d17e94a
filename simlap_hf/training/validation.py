"""Checks of the training options that need neither data nor a model, and of the output folder against the resume
flags; each error names the flag and the valid values."""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import check_writable_folder
from .arguments import MIXED_PRECISION, TrainingArguments
from .checkpoints import find_checkpoint, list_checkpoints, recover_previous_run

logger = logging.getLogger("simlap_hf")


def _check_values(args: TrainingArguments) -> None:
    if args.mixed_precision is not None and args.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed_precision={args.mixed_precision!r} is not valid; choose one of no, fp16, bf16.")
    for name in (
        "num_train_epochs",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "eval_every",
        "logging_steps",
    ):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} is not valid; it must be >= 1.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate={args.learning_rate!r} is not valid; it must be > 0.")
    if args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit={args.save_total_limit!r} is not valid; it must be >= 1.")


def validate_training_args(args: TrainingArguments, check_output_dir: bool = True) -> None:
    """Checks that need no data and no model; each error names the flag and the valid values.

    With ``check_output_dir`` also :func:`check_output_folder`, which resolves ``--resume_from_checkpoint auto``."""
    if check_output_dir:  # first: whatever this command turns out to be, a run left aside by a kill is put back
        recover_previous_run(args.output_dir)
    _check_values(args)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(
            f"--output_dir {str(output_dir)!r} is a file, not a folder; choose a folder path (it is created if needed)."
        )
    check_writable_folder(output_dir, "--output_dir")  # before the data is loaded
    if check_output_dir:
        check_output_folder(args)


def check_output_folder(args: TrainingArguments) -> None:
    """The output folder against the resume flags: a folder holding another run needs --overwrite_output_dir or
    --resume_from_checkpoint, and a resumed run needs a complete checkpoint.

    Resolves ``--resume_from_checkpoint auto`` in place: 'latest' when the output folder holds a complete checkpoint,
    else None (a fresh start)."""
    output_dir = Path(args.output_dir)
    recover_previous_run(output_dir)  # left aside by an --overwrite_output_dir run that was killed
    fresh_auto_start = False
    if args.resume_from_checkpoint == "auto":
        args.resume_from_checkpoint = "latest" if list_checkpoints(output_dir) else None
        fresh_auto_start = args.resume_from_checkpoint is None
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        # A resume is what was asked for last (the printed resume advice adds it to a command or YAML file that may
        # set overwrite_output_dir): continue the run, replace nothing.
        logger.warning(
            "--resume_from_checkpoint %s: continuing the run in %s; --overwrite_output_dir is ignored.",
            args.resume_from_checkpoint,
            output_dir,
        )
        args.overwrite_output_dir = False
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir and output_dir.is_dir():
        # A run killed before its first complete checkpoint leaves only incomplete ones: 'auto' starts it again.
        previous = [
            name
            for name in ("all_results.json", "checkpoints", "model.safetensors")
            if (output_dir / name).exists() and not (fresh_auto_start and name == "checkpoints")
        ]
        if previous:
            raise ValueError(
                f"--output_dir {str(output_dir)!r} already holds a run ({', '.join(previous)}). Pass "
                "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or choose "
                "another --output_dir."
            )
    if args.resume_from_checkpoint is not None:
        find_checkpoint(args.output_dir, args.resume_from_checkpoint)  # fails early when there is none
