"""Checkpoints of a run: the trainer state, atomic saving and loading, finding the newest complete one, rotation, and
keeping a replaced run until the new one has a complete checkpoint.

A checkpoint is ``<output_dir>/checkpoints/checkpoint-<global step>[-<batch in epoch>]/``: accelerate's states
(model, optimizer, scheduler, scaler, RNGs), ``trainer_state.json`` and, mid-epoch, each process's augmentation RNG
state.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME

from ..errors import UsageError

if TYPE_CHECKING:
    from .arguments import TrainingArguments

logger = logging.getLogger("simlap_hf")

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Progress saved with every checkpoint (``trainer_state.json``)."""

    epoch: int = 0  # epochs fully completed
    step_in_epoch: int = 0  # batches of the current epoch already trained (mid-epoch checkpoints)
    global_step: int = 0  # optimizer updates
    best_metric: float | None = None
    best_epoch: int | None = None
    best_checkpoint: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    train_images: int = 0
    data_wait_seconds: float = 0.0  # of train_seconds, waiting for the training loader
    num_train_epochs: int | None = None  # the schedule's length (None in checkpoints of older versions)


# What a finished or interrupted run leaves in its output folder; --overwrite_output_dir moves these aside and nothing
# else, so unrelated files and sub-folders of other runs stay.
RUN_ARTIFACTS = (
    "checkpoints",
    "model.safetensors",
    "config.json",
    "all_results.json",
    "training_log.jsonl",
    "README.md",
    "preprocessor_config.json",
    "analysis.json",
    "class_relations.json",
)


def previous_run_folder(output_dir: str | os.PathLike) -> Path:
    """Where ``--overwrite_output_dir`` keeps the previous run of ``output_dir`` until the new run has a complete
    checkpoint: the hidden sibling folder ``.<name>.previous-run`` (outside the output folder, so it is never pushed
    or listed as a checkpoint)."""
    output_dir = Path(output_dir).resolve()
    return output_dir.parent / f".{output_dir.name}.previous-run"


class PreviousRun:
    """The previous run of an output folder replaced with ``--overwrite_output_dir``, kept until the new run has a
    complete checkpoint.

    :meth:`move_aside` renames its files (:data:`RUN_ARTIFACTS`) into :func:`previous_run_folder`; :meth:`settle`
    then deletes them once the new run has a complete checkpoint, or moves them back (the new run's partial files
    removed) when it has none: a new run that stops, fails or is interrupted before its first checkpoint leaves the
    folder as it was. A process killed in between (SIGKILL) leaves the folder aside; the next start puts it back
    (:func:`recover_previous_run`)."""

    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.output_dir = Path(output_dir)
        self.folder = previous_run_folder(output_dir)
        self.moved: list[str] = []

    def move_aside(self) -> None:
        """Rename the previous run's files out of the output folder (each rename is atomic)."""
        present = [name for name in RUN_ARTIFACTS if (self.output_dir / name).exists()]
        if not present:
            return
        if self.folder.exists():  # left by a killed run that recover_previous_run did not see (another process)
            raise UsageError(
                f"--overwrite_output_dir: {str(self.folder)!r} still holds an earlier previous run of "
                f"{str(self.output_dir)!r}. Move it back into the output folder or delete it, then run again."
            )
        self.folder.mkdir()
        for name in present:
            os.replace(self.output_dir / name, self.folder / name)
            self.moved.append(name)
        logger.info(
            "--overwrite_output_dir: moved the previous run's %s from %s to %s; it is deleted once this run has a "
            "complete checkpoint and put back if the run ends before that.",
            ", ".join(present),
            self.output_dir,
            self.folder,
        )

    def settle(self) -> None:
        """Delete the previous run when the new one has a complete checkpoint, else put it back."""
        if not self.moved:
            return
        if list_checkpoints(self.output_dir):
            self.discard()
        else:
            self.restore()

    def discard(self) -> None:
        """Delete the previous run (the new one has a complete checkpoint)."""
        if not self.moved:
            return
        shutil.rmtree(self.folder, ignore_errors=True)
        self.moved = []
        logger.info("--overwrite_output_dir: deleted the previous run of %s.", self.output_dir)

    def restore(self) -> None:
        """Put the previous run back, removing what the new run wrote in its place."""
        _put_back(self.output_dir, self.folder)
        self.moved = []
        logger.warning(
            "The new run stopped before its first complete checkpoint: the previous run of %s was put back as it was.",
            self.output_dir,
        )


def _put_back(output_dir: Path, folder: Path) -> None:
    for path in sorted(folder.iterdir()):
        target = output_dir / path.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.replace(path, target)
    folder.rmdir()


def recover_previous_run(output_dir: str | os.PathLike) -> None:
    """A previous run left aside by an overwrite that was killed (SIGKILL): put it back when the new run never made a
    complete checkpoint, else delete it (the new run had replaced it)."""
    output_dir, folder = Path(output_dir), previous_run_folder(output_dir)
    if not folder.is_dir():
        return
    if list_checkpoints(output_dir):
        shutil.rmtree(folder, ignore_errors=True)
        logger.info("Deleted %s: the run that replaced it in %s has a complete checkpoint.", folder, output_dir)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    _put_back(output_dir, folder)
    logger.warning(
        "%s held the previous run of %s, moved aside by an --overwrite_output_dir run that was killed before its "
        "first complete checkpoint: it was put back.",
        folder,
        output_dir,
    )


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    """The folder holding the checkpoints of the run in ``output_dir``."""
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (holding a readable trainer state), oldest first. Incomplete ones are skipped with a
    warning: a checkpoint is written under a temporary name and renamed only once complete."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    complete = []
    for path in sorted(root.iterdir()):
        if not path.name.startswith(CHECKPOINT_PREFIX):
            if path.name.startswith(".tmp"):
                logger.warning("Ignoring incomplete checkpoint %s (the run stopped while writing it).", path)
            continue
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            logger.warning("Ignoring checkpoint %s: its %s is missing or unreadable.", path, STATE_FILE)
            continue
        # Progress order; the epoch breaks the tie between a checkpoint taken after the last step of an epoch (on a
        # stop request) and the epoch-end checkpoint of the same step, which comes later.
        complete.append((state.get("global_step", 0), state.get("epoch", 0), state.get("step_in_epoch", 0), path))
    return [path for *_, path in sorted(complete)]


def find_checkpoint(output_dir: str | os.PathLike, which: str) -> Path:
    """Resolve ``--resume_from_checkpoint``: 'latest' (newest complete checkpoint of output_dir) or a folder."""
    if which == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint under {str(checkpoint_root(output_dir))!r}. "
                "Start the run without --resume_from_checkpoint."
            )
        return checkpoints[-1]
    path = Path(which)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint {which!r} is not a complete checkpoint folder (no {STATE_FILE}). Use 'latest' "
            f"or one of: {[str(p) for p in list_checkpoints(output_dir)]}."
        )
    return path


def save_checkpoint(
    accelerator: Accelerator,
    state: TrainerState,
    args: TrainingArguments,
    augmentation_rng: dict[str, Any] | None = None,
) -> Path:
    """Write model, optimizer, scheduler, scaler and RNG states plus the trainer state, atomically.

    ``augmentation_rng`` (mid-epoch checkpoints): the RNG states before the next batch was augmented, see
    :class:`~simlap_hf.data.ResumableAugmentations`; each process writes its own.

    Everything goes to a temporary folder that is renamed to ``checkpoint-<step>`` only when complete, so a run
    killed while saving never leaves a checkpoint that looks good. Old checkpoints beyond ``save_total_limit`` are
    removed (the best one is kept).
    """
    root = checkpoint_root(args.output_dir)
    name = f"{CHECKPOINT_PREFIX}{state.global_step:08d}" + (f"-{state.step_in_epoch}" if state.step_in_epoch else "")
    final = root / name
    temporary = root / f".tmp-{name}"
    writer = writes_checkpoint_files(accelerator)
    if writer:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary), safe_serialization=True)
        if augmentation_rng is not None:
            torch.save(augmentation_rng, temporary / augmentation_rng_file(accelerator))
        if writer:
            (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    except Exception as error:  # a full disk shows as OSError, SafetensorError (safetensors) or RuntimeError (torch)
        if writer:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(args.output_dir)
        raise OSError(
            f"Could not write checkpoint {str(final)!r}: {type(error).__name__}: {error}. The previous checkpoint "
            f"{str(previous[-1]) if previous else '(none)'} is intact; free disk space (or fix the cause above) and "
            "resume with the same command plus --resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    if writer:
        _remove_checkpoint(final)
        os.replace(temporary, final)
        _rotate_checkpoints(args, keep={final.name, Path(state.best_checkpoint).name if state.best_checkpoint else ""})
    accelerator.wait_for_everyone()
    return final


def writes_checkpoint_files(accelerator: Accelerator) -> bool:
    """Whether this process writes a checkpoint's shared files (model, optimizer, trainer state) and renames it
    complete: the main process, and with --save_on_each_node (on machines that do not share the output folder) the
    first process of every machine, into that machine's folder. Every process writes its own random states."""
    each_node = accelerator.project_configuration.save_on_each_node
    return accelerator.is_main_process or (each_node and accelerator.is_local_main_process)


def rng_state_file(process_index: int) -> str:
    """Name of a process's random states (accelerate's) in a checkpoint."""
    return f"{RNG_STATE_NAME}_{process_index}.pkl"


def augmentation_rng_file(accelerator: Accelerator) -> str:
    """Name of this process's augmentation RNG state in a mid-epoch checkpoint."""
    return f"augmentation_rng_{accelerator.process_index}.pt"


def _rotate_checkpoints(args: TrainingArguments, keep: set[str]) -> None:
    checkpoints = list_checkpoints(args.output_dir)
    excess = len(checkpoints) - args.save_total_limit
    for path in checkpoints:
        if excess <= 0:
            break
        if path.name not in keep:
            _remove_checkpoint(path)
            excess -= 1


def _remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint folder such that a kill midway never leaves a half-deleted folder that still looks like a
    checkpoint: it is renamed away (atomically) first, then removed."""
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(accelerator: Accelerator, path: Path) -> TrainerState:
    """Restore every state saved by :func:`save_checkpoint`; returns the trainer state.

    A checkpoint that cannot be read (a file damaged after it was written) raises an OSError naming the folder and
    the other checkpoints to resume from instead."""
    try:
        accelerator.load_state(str(path))
        values = json.loads((path / STATE_FILE).read_text())
        return TrainerState(**values)
    except Exception as error:
        others = [str(p) for p in list_checkpoints(Path(path).parent.parent) if p.resolve() != Path(path).resolve()]
        raise OSError(
            f"Could not load checkpoint {str(path)!r}: {type(error).__name__}: {error}. Either a file of it is "
            "damaged or missing, or this command's model/optimizer flags differ from the run that saved it. Resume "
            "with the run's original flags, or from another checkpoint with --resume_from_checkpoint <folder> "
            f"(available: {others or 'none'})."
        ) from error
