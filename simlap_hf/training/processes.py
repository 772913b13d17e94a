"""What the processes of a multi-process (and multi-machine) run agree on before training: whether the machines
share the output folder, where to resume from, and the data, prepared by one process per machine first.

Every decision is taken on one process and broadcast, and every failure reaches every process as the same error:
a process that fails alone would leave the others waiting at the next collective until its timeout.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from .arguments import TrainingArguments
from .checkpoints import STATE_FILE, checkpoint_root, find_checkpoint, rng_state_file
from .validation import check_output_folder

logger = logging.getLogger("simlap_hf")
Result = TypeVar("Result")


def processes_where(accelerator: Accelerator, flag: bool) -> list[int]:
    """Indices of the processes whose ``flag`` is true (one all-gather of one number per process)."""
    flags = accelerator.gather(torch.tensor([int(flag)], device=accelerator.device))
    return [index for index, value in enumerate(flags.tolist()) if value]


def broadcast_from_main(accelerator: Accelerator, value: Any) -> Any:
    """The main process's ``value`` (any picklable object), on every process."""
    box = [value if accelerator.is_main_process else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def raise_everywhere(accelerator: Accelerator, error: BaseException | None, what: str) -> None:
    """Raise on every process when ``error`` (this process's failure, or None) happened on any process: the failing
    processes raise their own error, the others a ValueError pointing to it."""
    failed = processes_where(accelerator, error is not None)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{what} failed on process(es) {failed}; their error message says why.")


def shares_output_folder(accelerator: Accelerator, output_dir: str) -> bool:
    """Whether every process sees the main process's output folder (a shared file system, or a single machine): the
    main process writes a marker file that the others look for."""
    if accelerator.num_processes == 1:
        return True
    marker = Path(output_dir) / f".simlap-shared-{broadcast_from_main(accelerator, uuid.uuid4().hex)}"
    if accelerator.is_main_process:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    accelerator.wait_for_everyone()
    shared = not processes_where(accelerator, not marker.exists())
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker.unlink(missing_ok=True)
    return shared


def _resolve_on_main(args: TrainingArguments) -> tuple[str | None, BaseException | None]:
    """The main process's check of the output folder; returns (the checkpoint folder's name under checkpoints/ or
    its path, None) or (None, the error)."""
    try:
        check_output_folder(args)
        if args.resume_from_checkpoint is None:
            return None, None
        path = find_checkpoint(args.output_dir, args.resume_from_checkpoint).resolve()
        inside = path.parent == checkpoint_root(args.output_dir).resolve()
        return (path.name if inside else str(path)), None
    except (ValueError, OSError) as error:
        return None, error


def agree_on_resume(accelerator: Accelerator, args: TrainingArguments) -> None:
    """Check the output folder on the main process and resume every process from the same checkpoint, each from its
    own copy (its machine's output folder): ``args.resume_from_checkpoint`` becomes that folder, or None.

    A process that cannot read the checkpoint's files makes every process fail with a message that names it, and
    the fix (a shared file system, or --save_on_each_node when training)."""
    resolved, error = _resolve_on_main(args) if accelerator.is_main_process else (None, None)
    resolved, message = broadcast_from_main(accelerator, (resolved, None if error is None else str(error)))
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    if resolved is None:
        args.resume_from_checkpoint = None
        return
    folder = checkpoint_root(args.output_dir) / resolved if not Path(resolved).is_absolute() else Path(resolved)
    args.resume_from_checkpoint = str(folder)
    needed = [folder / STATE_FILE, folder / rng_state_file(accelerator.process_index)]
    missing = processes_where(accelerator, not all(path.is_file() for path in needed))
    if missing:
        raise FileNotFoundError(
            f"--resume_from_checkpoint: checkpoint {resolved!r} (chosen by the main process) is missing or "
            f"incomplete in the output folder of process(es) {missing}: the machines do not share "
            f"{str(args.output_dir)!r}. Train with --save_on_each_node so that every machine keeps its own copy of "
            "each checkpoint, use a shared file system, or copy the checkpoints folder to every machine."
        )


def local_main_first(accelerator: Accelerator, work: Callable[[bool], Result], what: str) -> Result:
    """Run ``work(first)`` on one process per machine first (``first=True``: download, build caches, run the
    expensive checks), then on that machine's other processes (``first=False``), which reuse what it left. An error
    on the first process stops every process instead of leaving them waiting."""
    error: BaseException | None = None
    result: Any = None
    if accelerator.is_local_main_process:
        try:
            result = work(True)
        except (ValueError, OSError) as failure:
            error = failure
    raise_everywhere(accelerator, error, what)
    if not accelerator.is_local_main_process:
        result = work(False)
    return result
