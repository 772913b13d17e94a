"""Training machinery shared by ``train_pretrain.py``, ``train_finetune.py`` and ``train_fuse.py``.

- argument parsing: dataclasses read by ``transformers.HfArgumentParser`` from an optional YAML file followed by
  flags that override it;
- ``Accelerator`` setup (mixed precision, gradient accumulation, seeding, trackers);
- timm optimizer and per-iteration scheduler factories;
- :func:`fit`: the train loop with a progress bar, periodic evaluation, atomic checkpoints and resumption;
- :func:`save_final_outputs`: ``save_pretrained``, ``all_results.json``, model card.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm
from transformers import HfArgumentParser

logger = logging.getLogger("simlap_hf")

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "lars", "lamb")
MIXED_PRECISION = ("no", "fp16", "bf16")
CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainingArguments:
    """Optimisation, schedule, evaluation, checkpointing, tracking and Hub options shared by the three scripts."""

    output_dir: str = field(default="outputs/simlap", metadata={"help": "Where the model, results and checkpoints go."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Allow writing into an output_dir that already holds another run."}
    )
    num_train_epochs: int = field(default=50, metadata={"help": "Number of training epochs."})
    per_device_train_batch_size: int = field(
        default=256, metadata={"help": "Images per process and step, repeated-augmentation copies included."}
    )
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Images per process in evaluation."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (none on biases and 1-D parameters)."})
    opt: str = field(default="adam", metadata={"help": f"timm optimizer name: {', '.join(OPTIMIZERS)} or any timm opt."})
    momentum: float = field(default=0.9, metadata={"help": "Momentum of SGD-type optimizers."})
    opt_eps: float | None = field(default=None, metadata={"help": "Optimizer epsilon (timm default when unset)."})
    opt_betas: list[float] | None = field(default=None, metadata={"help": "Adam-type betas (timm default when unset)."})
    layer_decay: float | None = field(default=None, metadata={"help": "Layer-wise lr decay (e.g. 0.65), off if unset."})
    sched: str = field(default="cosine", metadata={"help": "timm scheduler name, updated every iteration."})
    warmup_epochs: float = field(default=2, metadata={"help": "Linear warmup epochs from warmup_lr."})
    warmup_lr: float = field(default=1e-5, metadata={"help": "Learning rate at the start of warmup."})
    min_lr: float = field(default=1e-6, metadata={"help": "Final learning rate of the cosine schedule."})
    clip_grad: float | None = field(default=None, metadata={"help": "Clip the gradient norm to this value."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer update."})
    mixed_precision: str | None = field(
        default=None,
        metadata={"help": "no, fp16 or bf16; unset: what `accelerate launch --mixed_precision` or the accelerate config "
                          "says (else no). fp16 falls back to bf16 on CPU, where it is not supported."},
    )
    seed: int = field(default=42, metadata={"help": "Seed of every random number generator and of the data order."})
    eval_every: int = field(default=2, metadata={"help": "Evaluate every N epochs (and always after the last)."})
    checkpointing_epochs: int = field(default=1, metadata={"help": "Save a checkpoint every N epochs (0: never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints (best kept too)."})
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={"help": "'latest' or a checkpoint folder: continue that run where it stopped. 'auto': continue from "
                          "the newest complete checkpoint when there is one, else start fresh (for requeued jobs)."},
    )
    logging_steps: int = field(default=10, metadata={"help": "Log training statistics every N optimizer steps."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to experiment trackers (see report_to)."})
    report_to: str = field(
        default="all", metadata={"help": "Tracker(s) for accelerate: all, tensorboard, wandb, ... (comma-separated)."}
    )
    sync_bn: bool = field(default=False, metadata={"help": "Convert BatchNorm to SyncBatchNorm in multi-process runs."})
    knn_k: int = field(default=20, metadata={"help": "Neighbours of the kNN evaluation."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Temperature of the cosine-weighted kNN vote."})
    push_to_hub: bool = field(default=False, metadata={"help": "Upload the final model and card to the Hub."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repository id (user/name)."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: HF_TOKEN / saved login)."})
    hub_private_repo: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    push_checkpoints: bool = field(
        default=False, metadata={"help": "With --push_to_hub, also upload every saved checkpoint."}
    )
    debug: bool = field(
        default=False, metadata={"help": "Show the full traceback of input errors (also: SIMLAP_DEBUG=1)."}
    )
    channels_last: bool = field(
        default=False, metadata={"help": "Model and training batches in channels-last memory format (faster convs "
                                         "on GPUs with tensor cores)."}
    )
    tf32: bool = field(default=False, metadata={"help": "Allow TF32 float32 matmuls and convolutions on NVIDIA GPUs."})
    cudnn_benchmark: bool = field(
        default=False, metadata={"help": "Let cuDNN pick the fastest convolution algorithms for the (fixed) shapes."}
    )
    torch_compile: bool = field(
        default=False, metadata={"help": "Compile the model with torch.compile (accelerate's TorchDynamoPlugin); "
                                         "`accelerate launch --dynamo_backend inductor` does the same."}
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode: default, reduce-overhead, max-autotune."}
    )


# ----------------------------------------------------------------------------------------------------------------
# Argument parsing


def _parser_destinations(parser: HfArgumentParser) -> list[str]:
    return [action.dest for action in parser._actions if action.dest != "help"]


def _close_matches_message(unknown: Sequence[str], known: Sequence[str], what: str) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"{name}{hint}")
    return f"Unknown {what}: {'; '.join(parts)}. Run with --help for the list of options."


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml] [--flag value ...]`` into instances of ``dataclass_types``.

    Values of the YAML file become defaults that flags override. Unknown YAML keys or flags raise a ValueError that
    lists close matches.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(list(dataclass_types), allow_abbrev=False)
    known = _parser_destinations(parser)
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = Path(argv.pop(0))
        if not config_path.is_file():
            raise FileNotFoundError(f"Config file {str(config_path)!r} does not exist.")
        try:
            values = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ValueError(f"Config file {str(config_path)!r} is not valid YAML{where}: {problem}.") from None
        if not isinstance(values, dict):
            raise ValueError(f"Config file {str(config_path)!r} must hold a mapping of option: value.")
        unknown = [key for key in values if key not in known]
        if unknown:
            raise ValueError(_close_matches_message(unknown, known, f"keys in {config_path}"))
        parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        flags = [item.split("=")[0].lstrip("-") for item in remaining if item.startswith("-")] or remaining
        raise ValueError(_close_matches_message(flags, known, "flags"))
    return tuple(parsed)


# ----------------------------------------------------------------------------------------------------------------
# Setup


def validate_training_args(args: TrainingArguments) -> None:
    """Checks that need no data and no model; each error names the flag and the valid values."""
    if args.mixed_precision is not None and args.mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"--mixed_precision={args.mixed_precision!r} is not valid; choose one of no, fp16, bf16.")
    for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps", "eval_every", "logging_steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name}={getattr(args, name)!r} is not valid; it must be >= 1.")
    if args.learning_rate <= 0:
        raise ValueError(f"--learning_rate={args.learning_rate!r} is not valid; it must be > 0.")
    if args.save_total_limit < 1:
        raise ValueError(f"--save_total_limit={args.save_total_limit!r} is not valid; it must be >= 1.")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(
            f"--output_dir {str(output_dir)!r} is a file, not a folder; choose a folder path (it is created if needed)."
        )
    fresh_auto_start = False
    if args.resume_from_checkpoint == "auto":
        args.resume_from_checkpoint = "latest" if list_checkpoints(output_dir) else None
        fresh_auto_start = args.resume_from_checkpoint is None
    if args.resume_from_checkpoint is not None and args.overwrite_output_dir:
        raise ValueError(
            "--overwrite_output_dir and --resume_from_checkpoint contradict each other: drop --overwrite_output_dir "
            "to continue the run, or --resume_from_checkpoint to replace it."
        )
    if args.resume_from_checkpoint is None and not args.overwrite_output_dir and output_dir.is_dir():
        # A run killed before its first complete checkpoint leaves only incomplete ones: 'auto' starts it again.
        previous = [name for name in ("all_results.json", "checkpoints", "model.safetensors")
                    if (output_dir / name).exists() and not (fresh_auto_start and name == "checkpoints")]
        if previous:
            raise ValueError(
                f"--output_dir {str(output_dir)!r} already holds a run ({', '.join(previous)}). Pass "
                "--overwrite_output_dir to replace it, --resume_from_checkpoint latest to continue it, or choose "
                "another --output_dir."
            )
    if args.resume_from_checkpoint is not None:
        find_checkpoint(args.output_dir, args.resume_from_checkpoint)  # fails early when there is none


def start_run(args: TrainingArguments) -> tuple[Accelerator, str | None]:
    """The first steps of every script, before any data is read: check the flags, create the Hub repository when
    pushing (so a bad id or token fails early), and set up the accelerator. Returns (accelerator, Hub repo id)."""
    auto_resume = args.resume_from_checkpoint == "auto"
    validate_training_args(args)
    repo_id = start_hub_repo(args)
    accelerator = create_accelerator(args)
    if auto_resume:
        logger.info("--resume_from_checkpoint auto: %s.", "continuing from the newest complete checkpoint"
                    if args.resume_from_checkpoint else "no complete checkpoint yet, starting fresh")
    if args.overwrite_output_dir and accelerator.is_main_process:
        move_previous_run_away(args.output_dir)
    accelerator.wait_for_everyone()
    return accelerator, repo_id


# What a finished or interrupted run leaves in its output folder; --overwrite_output_dir removes these (checkpoints
# first) and nothing else, so unrelated files and sub-folders of other runs stay.
RUN_ARTIFACTS = ("checkpoints", "model.safetensors", "config.json", "all_results.json", "training_log.jsonl",
                 "README.md", "preprocessor_config.json", "analysis.json", "class_relations.json")


def move_previous_run_away(output_dir: str | os.PathLike) -> None:
    """Remove the previous run's files from ``output_dir`` before a new run writes anything.

    Its ``checkpoints/`` folder is first renamed (atomically) to a hidden name and then deleted, so that from that
    moment on ``--resume_from_checkpoint latest`` can only find the new run's checkpoints, even if this process is
    killed halfway through the deletion."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    present = [name for name in RUN_ARTIFACTS if (output_dir / name).exists()]
    if not present:
        return
    trash = output_dir / f".replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    trash.mkdir()
    for name in present:
        os.replace(output_dir / name, trash / name)
    shutil.rmtree(trash, ignore_errors=True)
    logger.info("--overwrite_output_dir: removed the previous run's %s from %s.", ", ".join(present), output_dir)


def create_accelerator(args: TrainingArguments) -> Accelerator:
    """Accelerator with mixed precision, gradient accumulation and trackers; seeds every process.

    ``--mixed_precision`` wins; unset, accelerate's own setting applies (``accelerate launch --mixed_precision`` or
    the accelerate config file, passed as ``ACCELERATE_MIXED_PRECISION``; ``no`` when run with plain python)."""
    from_flag = args.mixed_precision is not None
    mixed_precision = args.mixed_precision if from_flag else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"ACCELERATE_MIXED_PRECISION={mixed_precision!r} (from accelerate launch or its config) is not supported "
            "here; use no, fp16 or bf16, or pass --mixed_precision."
        )
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 mixed precision needs a GPU; using bf16 autocast on CPU instead.")
        mixed_precision = "bf16"
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told to run on the CPU.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    dynamo_plugin = None
    if args.torch_compile:
        from accelerate.utils import TorchDynamoPlugin

        dynamo_plugin = TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    from accelerate.utils import DataLoaderConfiguration

    accelerator = Accelerator(
        # Batches come from pinned memory on a GPU machine, so the copy to the device need not wait.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_plugin=dynamo_plugin,
        cpu=multi_process_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=[name.strip() for name in args.report_to.split(",")] if args.with_tracking else None,
        project_dir=args.output_dir,
    )
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    # accelerate logs every file of every checkpoint at INFO; our own checkpoint messages are enough.
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logger.info("Mixed precision: %s (%s).", accelerator.mixed_precision,
                "--mixed_precision" if from_flag else "accelerate launch / accelerate config / default")
    # One random stream per process (seed + process index; process 0 keeps the seed): processes augment differently
    # and draw their own partners and dropout masks. Weights start equal anyway (DDP broadcasts process 0's).
    set_seed(args.seed, device_specific=True)
    return accelerator


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """timm optimizer; no weight decay on biases and 1-D parameters; layer-wise lr decay when asked."""
    kwargs: dict[str, Any] = {}
    if args.opt_eps is not None:
        kwargs["eps"] = args.opt_eps
    if args.opt_betas is not None:
        kwargs["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(
            model,
            opt=args.opt,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            momentum=args.momentum,
            layer_decay=args.layer_decay,
            filter_bias_and_bn=True,
            **kwargs,
        )
    except (AssertionError, ValueError) as error:
        raise ValueError(f"--opt={args.opt!r} is not a usable timm optimizer ({error}).") from error


def create_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, updates_per_epoch: int):
    """timm scheduler: linear warmup over ``warmup_epochs`` then ``sched`` down to ``min_lr``, per iteration."""
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        num_epochs=args.num_train_epochs,
        warmup_epochs=args.warmup_epochs,
        warmup_lr=args.warmup_lr,
        min_lr=args.min_lr,
        step_on_epochs=False,
        updates_per_epoch=updates_per_epoch,
    )
    return scheduler


def prepare_model(model: torch.nn.Module, args: TrainingArguments, accelerator: Accelerator) -> torch.nn.Module:
    """``--sync_bn`` (multi-process runs only): BatchNorm statistics of the global batch. On GPUs timm's converter
    (torch ``SyncBatchNorm``, keeping the activation of timm's fused ``BatchNormAct2d``); elsewhere (CPU processes
    on gloo, where ``SyncBatchNorm`` cannot run) :mod:`simlap_hf.sync_batchnorm`'s all-gathered batch moments."""
    if args.sync_bn and accelerator.num_processes > 1:
        if accelerator.device.type == "cuda":
            from timm.layers import convert_sync_batchnorm

            model = convert_sync_batchnorm(model)
        else:
            from .sync_batchnorm import convert_distributed_batchnorm

            model = convert_distributed_batchnorm(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


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
    num_train_epochs: int | None = None  # the schedule's length (None in checkpoints of older versions)


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
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
    accelerator: Accelerator, state: TrainerState, args: TrainingArguments,
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
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary), safe_serialization=True)
        if augmentation_rng is not None:
            torch.save(augmentation_rng, temporary / _augmentation_rng_file(accelerator))
        if accelerator.is_main_process:
            (temporary / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    except Exception as error:  # a full disk shows as OSError, SafetensorError (safetensors) or RuntimeError (torch)
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)
        previous = list_checkpoints(args.output_dir)
        raise OSError(
            f"Could not write checkpoint {str(final)!r}: {type(error).__name__}: {error}. The previous checkpoint "
            f"{str(previous[-1]) if previous else '(none)'} is intact; free disk space (or fix the cause above) and "
            "resume with the same command plus --resume_from_checkpoint latest."
        ) from error
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _remove_checkpoint(final)
        os.replace(temporary, final)
        _rotate_checkpoints(args, keep={final.name, Path(state.best_checkpoint).name if state.best_checkpoint else ""})
    accelerator.wait_for_everyone()
    return final


def _augmentation_rng_file(accelerator: Accelerator) -> str:
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
            "damaged or missing, or this command's model/optimizer flags differ from the run that saved it. Resume with "
            f"the run's original flags, or from another checkpoint with --resume_from_checkpoint <folder> (available: "
            f"{others or 'none'})."
        ) from error


# ----------------------------------------------------------------------------------------------------------------
# The loop


class StopRequested:
    """SIGINT/SIGTERM handler: asks the loop to checkpoint at the next step boundary and exit cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None  # the first signal received
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopRequested:
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.signum = signum
        logger.warning("Received signal %d: saving a checkpoint at the next step, then stopping.", signum)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class TrainingInterrupted(Exception):
    """Raised after a checkpoint was saved because of SIGINT/SIGTERM.

    ``signum`` is the signal that asked for the stop (SIGTERM when it reached another process of the run);
    ``exit_code`` is what a command line returns for it: 128 + signum, i.e. 130 for SIGINT and 143 for SIGTERM, the
    codes a shell reports for a process ended by that signal.
    """

    def __init__(self, message: str, signum: int | None = None) -> None:
        super().__init__(message)
        self.signum = int(signum) if signum is not None else int(signal.SIGTERM)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def run_main(run: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> int:
    """Command-line entry point around a script's ``run(argv)``: returns the process exit code.

    0 when the run finished. After SIGINT/SIGTERM, :func:`fit` has saved a checkpoint and printed how to resume;
    this returns :attr:`TrainingInterrupted.exit_code` (130 for SIGINT, 143 for SIGTERM) without a traceback. A
    second Ctrl-C (stop at once, no new checkpoint) or one before training started also returns 130, with a message
    saying that a resume continues from the last complete checkpoint. An input error (see :func:`is_input_error`:
    bad flags, YAML, data, model files, checkpoints) prints one line, ``error: <message>``, and returns 1 without a
    traceback, unless ``--debug`` or ``SIMLAP_DEBUG=1``; every other error (a bug) propagates with its traceback. Use
    as ``raise SystemExit(run_main(run, argv))``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SIMLAP_DEBUG", "").lower() in ("1", "true", "yes")
    try:
        run(argv)
    except TrainingInterrupted as stop:
        return stop.exit_code
    except Exception as error:
        if debug or not is_input_error(error):
            raise
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            "Interrupted before a checkpoint could be saved; a resume (the same command plus "
            "--resume_from_checkpoint latest) continues from the last complete checkpoint, if any.",
            file=sys.stderr,
        )
        return 128 + int(signal.SIGINT)
    return 0


# Where the package's own checks raise: an error raised by code in these folders is a message written for the user.
_OWN_CODE = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1]))
INPUT_ERROR_TYPES = (ValueError, OSError, FloatingPointError)


def is_input_error(error: BaseException) -> bool:
    """Whether ``error`` is one of the package's checks of user input (flags, YAML, data, model files, checkpoints,
    disk), not a bug: a ValueError, OSError or FloatingPointError raised by the package's own code (the scripts and
    ``simlap_hf``), whose messages name the value and the fix. The same types raised inside a library are bugs or
    unexpected failures and keep their traceback."""
    if not isinstance(error, INPUT_ERROR_TYPES):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    raised_in = str(Path(frames[-1].filename).resolve())
    return raised_in.startswith(_OWN_CODE) and "site-packages" not in raised_in


def _flag_of_every_process(accelerator: Accelerator, flag: bool | torch.Tensor) -> list[bool]:
    """``flag`` of every process in rank order, the same list on all of them (one tiny gather when there are several
    processes: every process must call this at the same point)."""
    values = torch.as_tensor(flag, dtype=torch.float32, device=accelerator.device).reshape(1)
    if accelerator.num_processes > 1:
        values = accelerator.gather(values)
    return [bool(value) for value in values.tolist()]


def _stop_everywhere(accelerator: Accelerator, requested: bool) -> bool:
    """Whether any process was asked to stop, agreed by all of them, so that they save the same mid-epoch checkpoint
    together instead of waiting on each other."""
    return any(_flag_of_every_process(accelerator, requested))


LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
EvaluateFunction = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class TrainingResult:
    state: TrainerState
    final_metrics: dict[str, float]


def _append_log(args: TrainingArguments, record: dict[str, Any]) -> None:
    with open(Path(args.output_dir) / "training_log.jsonl", "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _truncate_log(args: TrainingArguments, last_step: int) -> None:
    """Keep the records of ``training_log.jsonl`` up to ``last_step`` (atomically); unreadable lines are dropped."""
    path = Path(args.output_dir) / "training_log.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


def _mean_over_processes(accelerator: Accelerator, values: dict[str, torch.Tensor]) -> dict[str, float]:
    if not values:
        return {}
    names = sorted(values)
    stacked = torch.stack([values[name].detach().float().reshape(()) for name in names]).to(accelerator.device)
    averaged = accelerator.reduce(stacked, reduction="mean")
    return {name: float(value) for name, value in zip(names, averaged.tolist())}


def _processes_with_non_finite_loss(accelerator: Accelerator, loss: torch.Tensor) -> list[int]:
    """Ranks whose loss is NaN or infinite. Every process gets the same answer, so all of them stop at the same
    batch instead of the healthy ones waiting forever in the next gradient all-reduce."""
    finite = _flag_of_every_process(accelerator, torch.isfinite(loss.detach()))
    return [rank for rank, ok in enumerate(finite) if not ok]


def _adapt_schedule_length(state: TrainerState, args: TrainingArguments, scheduler: Any,
                           rebuild: Callable[[], Any]) -> None:
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
        saved, args.num_train_epochs, args.sched, args.num_train_epochs, state.global_step, after, before,
    )


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
    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    scheduler = create_scheduler(optimizer, args, updates_per_epoch)
    accelerator.register_for_checkpointing(scheduler)
    from .data import ResumableAugmentations, capture_rng_state

    state = TrainerState()
    augmentations = train_dataloader.dataset if isinstance(train_dataloader.dataset, ResumableAugmentations) else None
    resume_augmentations: tuple[dict[str, Any], dict[str, Any]] | None = None
    if args.resume_from_checkpoint is not None:
        path = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = load_checkpoint(accelerator, path)
        logger.info("Resumed from %s (epoch %d, step %d).", path, state.epoch, state.global_step)
        rng_file = path / _augmentation_rng_file(accelerator)
        if augmentations is not None and state.step_in_epoch and rng_file.is_file():
            resume_augmentations = (torch.load(rng_file, weights_only=False), capture_rng_state())
        _adapt_schedule_length(state, args, scheduler, lambda: create_scheduler(optimizer, args, updates_per_epoch))
    state.num_train_epochs = args.num_train_epochs
    scheduler.step_update(state.global_step)
    if accelerator.is_main_process:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        if state.global_step == 0:
            (Path(args.output_dir) / "training_log.jsonl").unlink(missing_ok=True)
        else:  # drop what the interrupted run logged after its checkpoint: those steps are trained again
            _truncate_log(args, state.global_step)

    total_batches = len(train_dataloader) * args.num_train_epochs
    done_batches = len(train_dataloader) * state.epoch + state.step_in_epoch
    progress = tqdm(total=total_batches, initial=done_batches, disable=not accelerator.is_local_main_process,
                    desc="train", dynamic_ncols=True)
    metrics: dict[str, float] = {}
    world_images = args.per_device_train_batch_size * accelerator.num_processes
    with StopRequested() as stop, progress:  # the bar is closed on errors too
        for epoch in range(state.epoch, args.num_train_epochs):
            model.train()
            train_dataloader.set_epoch(epoch)
            skip = state.step_in_epoch
            batches = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
            if augmentations is not None:
                augmentations.start_epoch(first_batch=skip)
                if resume_augmentations is not None:
                    augmentations.resume_at(*resume_augmentations)
                    resume_augmentations = None
            epoch_start = time.perf_counter()
            pending_logs: dict[str, torch.Tensor] = {}
            for step, batch in enumerate(batches, start=skip):
                if args.channels_last:
                    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=torch.channels_last)
                with accelerator.accumulate(model):
                    loss, logs = compute_loss(model, batch)
                    bad_processes = _processes_with_non_finite_loss(accelerator, loss)
                    if bad_processes:
                        parts = ", ".join(f"{k}={float(torch.as_tensor(v).detach()):.4g}" for k, v in logs.items())
                        where = "" if accelerator.num_processes == 1 else f" on process(es) {bad_processes}"
                        good = list_checkpoints(args.output_dir)
                        raise FloatingPointError(
                            f"Non-finite loss {float(loss.detach()):.4g}{where} in epoch {epoch + 1}/"
                            f"{args.num_train_epochs}, batch "
                            f"{step + 1}/{len(train_dataloader)} (loss parts: {parts}); training stopped before this "
                            f"update. The last good checkpoint, {str(good[-1]) if good else '(none yet)'}, stays the "
                            "latest; lower the learning rate or disable mixed precision and resume with "
                            "--resume_from_checkpoint latest."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.clip_grad is not None:
                        accelerator.clip_grad_norm_(model.parameters(), args.clip_grad)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                state.step_in_epoch = step + 1
                state.train_images += world_images
                pending_logs = {"loss": loss.detach(), **logs}
                progress.update(1)
                if accelerator.sync_gradients:
                    state.global_step += 1
                    scheduler.step_update(state.global_step)
                    if on_step_end is not None:
                        on_step_end(model)
                    lr = max(group["lr"] for group in optimizer.param_groups)
                    if state.global_step % args.logging_steps == 0:
                        record = _mean_over_processes(accelerator, pending_logs)
                        record.update(lr=lr, epoch=epoch + state.step_in_epoch / len(train_dataloader))
                        accelerator.log({f"train/{k}": v for k, v in record.items()}, step=state.global_step)
                        progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                        if accelerator.is_main_process:
                            _append_log(args, {"step": state.global_step, **record})
                # Stop only at an optimizer-step boundary: gradients accumulated so far are not part of a checkpoint.
                if accelerator.sync_gradients and _stop_everywhere(accelerator, stop.requested):
                    state.train_seconds += time.perf_counter() - epoch_start
                    next_batch_rng = augmentations.state_before_batch(state.step_in_epoch) if augmentations else None
                    path = save_checkpoint(accelerator, state, args, augmentation_rng=next_batch_rng)
                    progress.close()
                    message = (
                        f"Stopped in epoch {epoch + 1}/{args.num_train_epochs} after batch {state.step_in_epoch}/"
                        f"{len(train_dataloader)} (global step {state.global_step}); checkpoint saved to {path}. "
                        "Resume with the same command plus --resume_from_checkpoint latest."
                    )
                    accelerator.print(message)
                    raise TrainingInterrupted(message, stop.signum)
            state.train_seconds += time.perf_counter() - epoch_start
            state.epoch, state.step_in_epoch = epoch + 1, 0
            is_last = state.epoch == args.num_train_epochs
            if state.epoch % args.eval_every == 0 or is_last:
                metrics = evaluate(model)
                record = {"epoch": state.epoch, "step": state.global_step, **metrics}
                state.history.append(record)
                accelerator.log(metrics, step=state.global_step)
                accelerator.print(f"epoch {state.epoch}: " + ", ".join(f"{k}={v:.2f}" for k, v in metrics.items()))
                if accelerator.is_main_process:
                    _append_log(args, record)
                if metric_for_best in metrics and (
                    state.best_metric is None or metrics[metric_for_best] > state.best_metric
                ):
                    state.best_metric, state.best_epoch = metrics[metric_for_best], state.epoch
                    state.best_checkpoint = None
            due = args.checkpointing_epochs > 0 and state.epoch % args.checkpointing_epochs == 0
            if due or is_last:
                path = save_checkpoint(accelerator, state, args)
                if state.best_epoch == state.epoch:
                    state.best_checkpoint = str(path)
                if on_checkpoint is not None and accelerator.is_main_process:
                    on_checkpoint(path)
    progress.close()
    if not metrics:  # resumed a run that had already finished
        metrics = evaluate(model)
    return TrainingResult(state=state, final_metrics=metrics)


# ----------------------------------------------------------------------------------------------------------------
# Final outputs


def build_results(result: TrainingResult, metric_names: Sequence[str]) -> dict[str, Any]:
    """``all_results.json`` content: final and best metrics, epochs, wall time and images per second."""
    state = result.state
    results: dict[str, Any] = {name: result.final_metrics[name] for name in metric_names if name in result.final_metrics}
    best_record = next((r for r in state.history if r.get("epoch") == state.best_epoch), None)
    if best_record is not None:
        results.update({f"best_{name}": best_record[name] for name in metric_names if name in best_record})
        results["best_epoch"] = state.best_epoch
    results["epochs"] = state.epoch
    results["global_step"] = state.global_step
    results["train_seconds"] = round(state.train_seconds, 2)
    results["train_images_per_second"] = round(state.train_images / max(state.train_seconds, 1e-9), 2)
    return results


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def arguments_as_dict(*arguments: Any) -> dict[str, Any]:
    """Flatten argument dataclasses into one dict (hub token removed) for trackers and model cards."""
    flat: dict[str, Any] = {}
    for item in arguments:
        flat.update(asdict(item))
    flat.pop("hub_token", None)
    return flat


# ----------------------------------------------------------------------------------------------------------------
# Data and end-of-run steps shared by the scripts


@dataclass
class DataBundle:
    """Loaders of one run: ``train`` (augmented, repeated), ``validation`` and ``train_eval`` (train images with the
    eval transform, for kNN) — the latter two sequential and unaugmented."""

    label_names: list[str]
    train: torch.utils.data.DataLoader
    validation: torch.utils.data.DataLoader
    train_eval: torch.utils.data.DataLoader
    training_args: TrainingArguments
    # Normalises uint8 training batches on the device (None: the loader already normalised them).
    train_normalizer: Callable[[torch.Tensor], torch.Tensor] | None = None


def prepare_data(data_args: Any, args: TrainingArguments, num_channels: int) -> DataBundle:
    """Load the data set of ``data_args`` and build the three loaders (see :class:`DataBundle`)."""
    from datasets import DatasetDict

    from .data import (
        create_eval_dataloader,
        create_train_dataloader,
        create_train_normalizer,
        get_label_names,
        load_image_dataset,
        with_image_transforms,
    )

    dataset = load_image_dataset(data_args, seed=args.seed)
    train_classes = dataset["train"].unique("label")
    if len(train_classes) < 2:
        names = get_label_names(dataset)
        present = [names[i] for i in train_classes]
        raise ValueError(
            f"The training split holds a single class ({', '.join(map(repr, present))}; classes named by the data: "
            f"{names}). Training needs at least 2 classes: the contrastive loss has no negatives and the "
            "cross-entropy nothing to separate, so nothing would be learned. Check --train_dir / --dataset_name and "
            "--label_column_name."
        )
    views = with_image_transforms(
        DatasetDict(train=dataset["train"], validation=dataset["validation"], train_eval=dataset["train"]),
        data_args,
        num_channels,
    )
    workers = data_args.dataloader_num_workers
    return DataBundle(
        label_names=get_label_names(dataset),
        train=create_train_dataloader(views["train"], data_args, args.per_device_train_batch_size, seed=args.seed),
        validation=create_eval_dataloader(views["validation"], args.per_device_eval_batch_size, workers),
        train_eval=create_eval_dataloader(views["train_eval"], args.per_device_eval_batch_size, workers),
        training_args=args,
        train_normalizer=create_train_normalizer(data_args, num_channels),
    )


# The reference's CIFAR setting of a timm ResNet, applied to ResNets when --stem_type / --output_stride are unset.
RESNET_DEFAULTS = {"stem_type": "deep", "output_stride": 8}
RESNET_STEM_HELP = ("timm ResNet stem ('', 'deep', 'deep_tiered'); unset: 'deep' for timm ResNets (the reference's "
                    "CIFAR setting), nothing for other backbones; '' keeps timm's default.")
RESNET_OUTPUT_STRIDE_HELP = ("timm output stride (8 suits 32x32 inputs); unset: 8 for timm ResNets, nothing for other "
                             "backbones; 0 keeps timm's default.")
# Stand-in class names for checking a model configuration before the data (and its classes) are loaded.
PLACEHOLDER_LABELS = ("class_0", "class_1")


def check_backbone(config: Any) -> None:
    """Build the config's backbone on the meta device (no memory, no weights), so that an architecture that rejects
    its options (``--stem_type`` on a ViT, say) fails before any data is loaded."""
    from .modeling_simlap import create_backbone

    with torch.device("meta"):
        create_backbone(config)


def check_model_source(name_or_path: str, flag: str = "--model_name_or_path") -> None:
    """Fail early, with the right message, on a local model folder that does not exist (instead of a Hub error):
    a path that exists must be a folder with ``config.json``; a name that is not a Hub id ('org/name'), or whose
    first part is an existing local folder, is taken for a mistyped local path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"{flag} {name_or_path!r} is not a saved model folder (no config.json in it); pass the output_dir of "
                "train_pretrain.py / train_finetune.py / train_fuse.py, or a Hub id."
            )
        return
    parts = Path(name_or_path).parts
    hub_like = len(parts) == 2 and not name_or_path.startswith((".", "/", "~")) and "\\" not in name_or_path
    if not hub_like or Path(parts[0]).is_dir():
        parent = next((str(Path(*parts[:i])) for i in range(len(parts) - 1, 0, -1) if Path(*parts[:i]).is_dir()),
                      None)
        where = f" ({parent!r} exists and holds: {sorted(p.name for p in Path(parent).iterdir())[:10]})" if parent else ""
        raise FileNotFoundError(
            f"{flag} {name_or_path!r}: this folder does not exist{where}. Check the path (the output_dir of the run "
            "you want to load)."
        )


def is_timm_resnet(model_name: str) -> bool:
    """Whether ``model_name`` is a timm architecture of the ResNet family (``timm.models.resnet``: resnet18,
    resnet10t, resnet50d, ...), which takes ``stem_type`` and ``output_stride``."""
    import timm.models

    return timm.is_model(model_name) and timm.models.is_model_in_modules(model_name, ["resnet"])


def timm_backbone_kwargs(
    model_name: str, stem_type: str | None, output_stride: int | None, model_kwargs: str | None
) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments from the scripts' ``--stem_type``, ``--output_stride`` and
    ``--model_kwargs`` (a JSON object) flags.

    Unset (None) ``stem_type`` / ``output_stride`` mean: the reference's ``deep`` stem and output stride 8 for a timm
    ResNet (:data:`RESNET_DEFAULTS`), nothing for other architectures. An empty stem or 0 keeps timm's default; any
    other value is passed to timm as given."""
    try:
        kwargs: Any = json.loads(model_kwargs) if model_kwargs else {}
    except ValueError as error:
        raise ValueError(f"--model_kwargs={model_kwargs!r} is not valid JSON ({error}).") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--model_kwargs={model_kwargs!r} must be a JSON object such as '{{\"drop_path_rate\": 0.1}}'.")
    resnet = is_timm_resnet(model_name)
    for name, value in (("stem_type", stem_type), ("output_stride", output_stride)):
        if value is None:
            value = RESNET_DEFAULTS[name] if resnet else None
        if value:
            kwargs[name] = value
    return kwargs


def label_mappings(label_names: Sequence[str]) -> dict[str, dict]:
    """``id2label`` / ``label2id`` keyword arguments for a config."""
    return {
        "id2label": {i: str(name) for i, name in enumerate(label_names)},
        "label2id": {str(name): i for i, name in enumerate(label_names)},
    }


def start_hub_repo(args: TrainingArguments) -> str | None:
    """Create the Hub repository before training when ``--push_to_hub`` (fails early on a bad id or token)."""
    if not args.push_to_hub:
        return None
    from .hub import create_hub_repo

    return create_hub_repo(args.hub_model_id, args.hub_token, args.hub_private_repo)


def save_final_outputs(
    accelerator: Accelerator,
    model: torch.nn.Module,
    result: TrainingResult,
    args: TrainingArguments,
    task: str,
    metric_names: Sequence[str],
    hyperparameters: dict[str, Any],
    dataset_name: str | None,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra_files: Callable[[Path, torch.nn.Module], None] | None = None,
    extra_card_sections: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Save the final model (``save_pretrained``), ``all_results.json`` and the model card on the main process, then
    push the folder to the Hub when ``repo_id`` is set. Returns the results."""
    results = build_results(result, metric_names)
    output_dir = Path(args.output_dir)
    push_error: Exception | None = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        unwrapped.save_pretrained(output_dir, safe_serialization=True)
        if extra_files is not None:
            extra_files(output_dir, unwrapped)
        write_json(output_dir / "all_results.json", results)
        from .hub import build_model_card

        card = build_model_card(output_dir, task, unwrapped.config, results, hyperparameters, dataset_name,
                                repo_id=repo_id, base_model=base_model, extra_sections=extra_card_sections)
        card.save(output_dir / "README.md")
        accelerator.print("results: " + json.dumps(results))
        if repo_id is not None:
            from .hub import HubPushError, push_output_dir

            try:
                url = push_output_dir(output_dir, repo_id, args.hub_token, "End of training")
                accelerator.print(f"pushed: {url}")
            except HubPushError as error:  # raised after every process is past the barrier below
                push_error = error
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error is not None:
        raise push_error
    return results


# ----------------------------------------------------------------------------------------------------------------
# Classification recipe (fine-tuning and SimLAP-Fuse)


@dataclass
class ClassificationArguments:
    """Regularisation of supervised training: mixup/cutmix, label smoothing, EMA of the weights, timm export."""

    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 disables)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 disables)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of applying mixup or cutmix to a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of cutmix instead of mixup."})
    mixup_mode: str = field(default="batch", metadata={"help": "timm mixup mode: batch, pair or elem."})
    smoothing: float = field(default=0.1, metadata={"help": "Label smoothing."})
    model_ema_decay: float | None = field(
        default=None, metadata={"help": "Keep an EMA of the weights with this decay (e.g. 0.9998); it is evaluated "
                                        "and saved instead of the raw weights."}
    )
    export_timm: str | None = field(
        default=None, metadata={"help": "Also export the classifier as a timm model folder here."}
    )


def create_mixup(args: ClassificationArguments, num_classes: int):
    """timm ``Mixup`` producing soft targets (with label smoothing), or None when mixup and cutmix are off."""
    from timm.data import Mixup

    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    return Mixup(
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        prob=args.mixup_prob,
        switch_prob=args.mixup_switch_prob,
        mode=args.mixup_mode,
        label_smoothing=args.smoothing,
        num_classes=num_classes,
    )


def create_classification_criterion(mixup_active: bool, smoothing: float) -> torch.nn.Module:
    """timm's soft-target cross-entropy with mixup, label-smoothing cross-entropy with smoothing, else plain."""
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=smoothing)
    return torch.nn.CrossEntropyLoss()


def create_model_ema(model: torch.nn.Module, decay: float | None):
    """timm ``ModelEmaV3`` of the weights (on the model's device), or None."""
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--model_ema_decay={decay!r} is not valid; it must be in (0, 1), e.g. 0.9998.")
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


def make_classification_evaluator(
    accelerator: Accelerator, data: DataBundle, ema: torch.nn.Module | None = None
) -> EvaluateFunction:
    """Top-1/top-5 of the model's ``logits`` on the validation split (of the EMA weights when given)."""
    from .evaluation import classification_metrics, extract_features

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        evaluated = ema.module if ema is not None else model
        logits, labels = extract_features(evaluated, data.validation, accelerator, output_key="logits")
        metrics = classification_metrics(logits, labels)
        return {"eval_top1": metrics["top1"], "eval_top5": metrics["top5"]}

    return evaluate


def save_image_processor(output_dir: Path, data_args: Any, num_channels: int) -> None:
    """An image processor equal to the eval transform (mode conversion, resize to input/crop_pct with the run's
    interpolation, centre crop, normalise), so that ``pipeline("image-classification" or "image-feature-extraction",
    model=output_dir)`` preprocesses exactly like evaluation."""
    from .data import _stats_for_channels, resolve_mean_std
    from .image_processing_simlap import SimLAPImageProcessor

    mean, std = resolve_mean_std(data_args)
    processor = SimLAPImageProcessor(
        size=data_args.input_size,
        crop_pct=data_args.crop_pct,
        interpolation=data_args.interpolation,
        image_mean=_stats_for_channels(mean, num_channels, "mean"),
        image_std=_stats_for_channels(std, num_channels, "std"),
        num_channels=num_channels,
    )
    processor.save_pretrained(output_dir)


# ----------------------------------------------------------------------------------------------------------------
# One job, from a built model to saved outputs


def _with_normalized_inputs(compute_loss: LossFunction, normalize: Callable[[torch.Tensor], torch.Tensor]):
    """``compute_loss`` on batches whose uint8 ``pixel_values`` are first normalised on their device."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        return compute_loss(model, {**batch, "pixel_values": normalize(batch["pixel_values"])})

    return step


def train_and_save(
    accelerator: Accelerator,
    model: torch.nn.Module,
    data: DataBundle,
    args: TrainingArguments,
    compute_loss: LossFunction,
    make_evaluator: Callable[[Accelerator, DataBundle, torch.nn.Module | None], EvaluateFunction],
    task: str,
    metric_names: Sequence[str],
    hyperparameters: dict[str, Any],
    dataset_name: str | None,
    repo_id: str | None = None,
    model_ema_decay: float | None = None,
    base_model: str | None = None,
    extra_files: Callable[[Path, torch.nn.Module], None] | None = None,
    card_sections: Callable[[torch.nn.Module], dict[str, str]] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The part of every script after the model is built: optimizer, ``accelerator.prepare``, optional EMA, trackers,
    :func:`fit`, and :func:`save_final_outputs`. ``card_sections(model)`` may add sections to the model card.
    Returns the trained (unwrapped) model and the results."""
    model = prepare_model(model, args, accelerator)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = create_optimizer(model, args)
    model, optimizer, data.train, data.validation, data.train_eval = accelerator.prepare(
        model, optimizer, data.train, data.validation, data.train_eval
    )
    ema = create_model_ema(accelerator.unwrap_model(model), model_ema_decay)
    on_step_end = None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

        def on_step_end(trained: torch.nn.Module) -> None:
            ema.update(accelerator.unwrap_model(trained))

    on_checkpoint = None
    if repo_id is not None and args.push_checkpoints:
        from .hub import push_checkpoint

        def on_checkpoint(path: Path) -> None:
            push_checkpoint(path, repo_id, args.hub_token)

    if data.train_normalizer is not None:
        compute_loss = _with_normalized_inputs(compute_loss, data.train_normalizer)
    if args.with_tracking:
        accelerator.init_trackers(f"simlap_{task}", {k: str(v) for k, v in hyperparameters.items()})
    result = fit(accelerator, model, optimizer, data.train, args, compute_loss,
                 make_evaluator(accelerator, data, ema), on_step_end=on_step_end, on_checkpoint=on_checkpoint)
    final = ema.module if ema is not None else model
    # Run on every process (it may gather across processes); only the main process writes the card.
    sections = card_sections(final) if card_sections is not None else None
    results = save_final_outputs(accelerator, final, result, args, task, metric_names, hyperparameters,
                                 dataset_name, repo_id=repo_id, base_model=base_model, extra_files=extra_files,
                                 extra_card_sections=sections)
    return accelerator.unwrap_model(final), results
