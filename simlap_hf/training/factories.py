"""The objects a training job is made of, built from the arguments: the ``Accelerator``, timm's optimizer and
per-iteration scheduler, the model's distributed BatchNorm, and the supervised recipe's mixup, EMA and label
smoothing."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from ..sync_batchnorm import convert_distributed_batchnorm
from .arguments import MIXED_PRECISION

if TYPE_CHECKING:
    from timm.data import Mixup
    from timm.scheduler.scheduler import Scheduler
    from timm.utils import ModelEmaV3

    from .arguments import ClassificationArguments, TrainingArguments

logger = logging.getLogger("simlap_hf")


def _mixed_precision(args: TrainingArguments) -> str:
    """``--mixed_precision``, else accelerate's own setting (``accelerate launch --mixed_precision`` or the accelerate
    config file, passed as ``ACCELERATE_MIXED_PRECISION``; ``no`` when run with plain python). fp16 becomes bf16
    without a GPU."""
    mixed_precision = (
        args.mixed_precision if args.mixed_precision is not None else os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    )
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(
            f"ACCELERATE_MIXED_PRECISION={mixed_precision!r} (from accelerate launch or its config) is not supported "
            "here; use no, fp16 or bf16, or pass --mixed_precision."
        )
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        logger.warning("fp16 mixed precision needs a GPU; using bf16 autocast on CPU instead.")
        mixed_precision = "bf16"
    return mixed_precision


def _apply_backend_switches(args: TrainingArguments) -> None:
    """``--tf32`` and ``--cudnn_benchmark``: process-wide torch switches."""
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def _configure_logging(accelerator: Accelerator) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_local_main_process else logging.WARNING,
    )
    # accelerate logs every file of every checkpoint at INFO; our own checkpoint messages are enough.
    for name in ("accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(name).setLevel(logging.WARNING)


def create_accelerator(args: TrainingArguments) -> Accelerator:
    """Accelerator with mixed precision, gradient accumulation and trackers; seeds every process.

    ``--mixed_precision`` wins; unset, accelerate's own setting applies (``accelerate launch --mixed_precision`` or
    the accelerate config file, passed as ``ACCELERATE_MIXED_PRECISION``; ``no`` when run with plain python)."""
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, TorchDynamoPlugin

    mixed_precision = _mixed_precision(args)
    # Without a GPU, accelerate only forms a multi-process (gloo) group when told to run on the CPU.
    multi_process_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    _apply_backend_switches(args)
    dynamo_plugin = None
    if args.torch_compile:
        dynamo_plugin = TorchDynamoPlugin(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
    accelerator = Accelerator(
        # Batches come from pinned memory on a GPU machine, so the copy to the device need not wait.
        dataloader_config=DataLoaderConfiguration(non_blocking=torch.cuda.is_available()),
        dynamo_plugin=dynamo_plugin,
        cpu=multi_process_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=[name.strip() for name in args.report_to.split(",")] if args.with_tracking else None,
        # --save_on_each_node is switched off again by start_run when the machines share the output folder.
        project_config=ProjectConfiguration(project_dir=args.output_dir, save_on_each_node=args.save_on_each_node),
    )
    _configure_logging(accelerator)
    logger.info(
        "Mixed precision: %s (%s).",
        accelerator.mixed_precision,
        "--mixed_precision" if args.mixed_precision is not None else "accelerate launch / accelerate config / default",
    )
    # One random stream per process (seed + process index; process 0 keeps the seed): processes augment differently
    # and draw their own partners and dropout masks. Weights start equal anyway (DDP broadcasts process 0's).
    set_seed(args.seed, device_specific=True)
    return accelerator


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """timm optimizer; no weight decay on biases and 1-D parameters; layer-wise lr decay when asked."""
    options: dict[str, Any] = dict(lr=args.learning_rate, weight_decay=args.weight_decay, momentum=args.momentum)
    if args.opt_eps is not None:
        options["eps"] = args.opt_eps
    if args.opt_betas is not None:
        options["betas"] = tuple(args.opt_betas)
    try:
        return create_optimizer_v2(
            model, opt=args.opt, layer_decay=args.layer_decay, filter_bias_and_bn=True, **options
        )
    except (AssertionError, ValueError) as error:
        raise ValueError(f"--opt={args.opt!r} is not a usable timm optimizer ({error}).") from error


def create_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, updates_per_epoch: int) -> Scheduler:
    """timm scheduler: linear warmup over ``warmup_epochs`` then ``sched`` down to ``min_lr``, per iteration."""
    warmup = {"warmup_epochs": args.warmup_epochs, "warmup_lr": args.warmup_lr}
    per_iteration = {"step_on_epochs": False, "updates_per_epoch": updates_per_epoch}
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=args.sched, num_epochs=args.num_train_epochs, min_lr=args.min_lr, **warmup, **per_iteration
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
            model = convert_distributed_batchnorm(model)
    return model


# ----------------------------------------------------------------------------------------------------------------
# Classification recipe (fine-tuning and SimLAP-Fuse)


def create_mixup(args: ClassificationArguments, num_classes: int) -> Mixup | None:
    """timm ``Mixup`` producing soft targets (with label smoothing), or None when mixup and cutmix are off."""
    from timm.data import Mixup

    if args.mixup <= 0 and args.cutmix <= 0:
        return None
    alphas = {"mixup_alpha": args.mixup, "cutmix_alpha": args.cutmix}
    switching = {"prob": args.mixup_prob, "switch_prob": args.mixup_switch_prob, "mode": args.mixup_mode}
    return Mixup(**alphas, **switching, label_smoothing=args.smoothing, num_classes=num_classes)


def cross_entropy_smoothing(args: ClassificationArguments, mixup: Mixup | None) -> float:
    """The label smoothing the cross-entropy applies to class indices: ``--smoothing`` without mixup, 0 with it
    (mixup's soft targets already carry the smoothing, see :func:`create_mixup`), so that it is applied once."""
    return 0.0 if mixup is not None else args.smoothing


def create_model_ema(model: torch.nn.Module, decay: float | None) -> ModelEmaV3 | None:
    """timm ``ModelEmaV3`` of the weights (on the model's device), or None."""
    if decay is None:
        return None
    if not 0.0 < decay < 1.0:
        raise ValueError(f"--model_ema_decay={decay!r} is not valid; it must be in (0, 1), e.g. 0.9998.")
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)
