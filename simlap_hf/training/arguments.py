"""Command-line arguments of the training scripts: the dataclasses and YAML-and-flags parsing (the checks of the
values are in :mod:`~simlap_hf.training.validation`).

Every script reads ``[CONFIG.yaml] [--flag value ...]`` into its tuple of dataclasses (:data:`PRETRAIN_ARGUMENTS`,
:data:`FINETUNE_ARGUMENTS`, :data:`FUSE_ARGUMENTS`) with :func:`parse_args`; the values of the YAML file are defaults
that flags override. The backbone flags are declared once, in :class:`BackboneArguments`, which the three model
dataclasses extend.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..configuration_simlap import DEFAULT_GATE, GATE_KINDS
from ..data import DataArguments
from ..errors import UsageError, raise_usage_error
from ..evaluation import DEFAULT_KNN_K, DEFAULT_KNN_TEMPERATURE
from ..evaluation.features import DEFAULT_EVAL_BATCH_SIZE
from ..losses import DEFAULT_TEMPERATURE
from .backbones import RESNET_OUTPUT_STRIDE_HELP, RESNET_STEM_HELP
from .flag_groups import GroupedArgumentParser, field_names, resolve_aliases

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum", "lars", "lamb")
MIXED_PRECISION = ("no", "fp16", "bf16")
SMOOTHING_HELP = (
    "Label smoothing s: the target of class y is (1 - s) * onehot(y) + s / C, applied once, by mixup/cutmix when they "
    "are on (their soft targets), else by the cross-entropy. The same for fine-tuning and SimLAP-Fuse."
)
EMA_HELP = (
    "Keep an EMA of the weights with this decay (e.g. 0.9998); it is evaluated and saved instead of the raw weights."
)


@dataclass
class TrainingArguments:
    """Optimisation, schedule, evaluation, checkpointing, tracking and Hub options shared by the three scripts."""

    output_dir: str = field(default="outputs/simlap", metadata={"help": "Where the model, results and checkpoints go."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the run in output_dir: it is moved aside once the data is loaded, deleted when the new "
            "run has a complete checkpoint, put back if the new run ends before that. Ignored with "
            "--resume_from_checkpoint."
        },
    )
    num_train_epochs: int = field(default=50, metadata={"help": "Number of training epochs."})
    per_device_train_batch_size: int = field(
        default=256, metadata={"help": "Images per process and step, repeated-augmentation copies included."}
    )
    per_device_eval_batch_size: int = field(
        default=DEFAULT_EVAL_BATCH_SIZE, metadata={"help": "Images per process in evaluation."}
    )
    learning_rate: float = field(default=1e-3, metadata={"help": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=5e-4, metadata={"help": "Weight decay (none on biases and 1-D parameters)."})
    opt: str = field(
        default="adam", metadata={"help": f"timm optimizer name: {', '.join(OPTIMIZERS)} or any timm opt."}
    )
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
        metadata={
            "help": "no, fp16 or bf16; unset: what `accelerate launch --mixed_precision` or the accelerate config "
            "says (else no). fp16 falls back to bf16 on CPU, where it is not supported."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of every random number generator and of the data order."})
    eval_every: int = field(default=2, metadata={"help": "Evaluate every N epochs (and always after the last)."})
    checkpointing_epochs: int = field(default=1, metadata={"help": "Save a checkpoint every N epochs (0: never)."})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints (best kept too)."})
    save_on_each_node: bool = field(
        default=False,
        metadata={
            "help": "Multi-machine runs without a shared file system: every machine keeps a full copy of each "
            "checkpoint in its own --output_dir, so every machine can resume. Unneeded (and ignored) when the "
            "machines share the output folder."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' or a checkpoint folder: continue that run where it stopped. 'auto': continue from "
            "the newest complete checkpoint when there is one, else start fresh (for requeued jobs)."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log training statistics every N optimizer steps."})
    with_tracking: bool = field(default=False, metadata={"help": "Log to experiment trackers (see report_to)."})
    report_to: str = field(
        default="all", metadata={"help": "Tracker(s) for accelerate: all, tensorboard, wandb, ... (comma-separated)."}
    )
    sync_bn: bool = field(default=False, metadata={"help": "Convert BatchNorm to SyncBatchNorm in multi-process runs."})
    knn_k: int = field(default=DEFAULT_KNN_K, metadata={"help": "Neighbours of the kNN evaluation."})
    knn_temperature: float = field(
        default=DEFAULT_KNN_TEMPERATURE, metadata={"help": "Temperature of the cosine-weighted kNN vote."}
    )
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
        default=False,
        metadata={
            "help": "Model and training batches in channels-last memory format (faster convs "
            "on GPUs with tensor cores)."
        },
    )
    tf32: bool = field(default=False, metadata={"help": "Allow TF32 float32 matmuls and convolutions on NVIDIA GPUs."})
    cudnn_benchmark: bool = field(
        default=False, metadata={"help": "Let cuDNN pick the fastest convolution algorithms for the (fixed) shapes."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the model with torch.compile (accelerate's TorchDynamoPlugin); "
            "`accelerate launch --dynamo_backend inductor` does the same."
        },
    )
    torch_compile_backend: str = field(default="inductor", metadata={"help": "torch.compile backend."})
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode: default, reduce-overhead, max-autotune."}
    )


@dataclass
class ClassificationArguments:
    """Regularisation of supervised training (fine-tuning and SimLAP-Fuse): mixup/cutmix, label smoothing, EMA of the
    weights, timm export."""

    mixup: float = field(default=0.8, metadata={"help": "Mixup alpha (0 disables)."})
    cutmix: float = field(default=1.0, metadata={"help": "CutMix alpha (0 disables)."})
    mixup_prob: float = field(default=1.0, metadata={"help": "Probability of applying mixup or cutmix to a batch."})
    mixup_switch_prob: float = field(default=0.5, metadata={"help": "Probability of cutmix instead of mixup."})
    mixup_mode: str = field(default="batch", metadata={"help": "timm mixup mode: batch, pair or elem."})
    smoothing: float = field(default=0.1, metadata={"help": SMOOTHING_HELP})
    model_ema_decay: float | None = field(default=None, metadata={"help": EMA_HELP})
    export_timm: str | None = field(
        default=None, metadata={"help": "Also export the classifier as a timm model folder here."}
    )


# ----------------------------------------------------------------------------------------------------------------
# Model arguments of the three scripts


@dataclass
class BackboneArguments:
    """The timm backbone: architecture, ResNet stem and output stride, extra timm options, input channels."""

    model_name: str = field(default="resnet18", metadata={"help": "timm backbone architecture."})
    stem_type: str | None = field(default=None, metadata={"help": RESNET_STEM_HELP})
    output_stride: int | None = field(default=None, metadata={"help": RESNET_OUTPUT_STRIDE_HELP})
    model_kwargs: str | None = field(
        default=None, metadata={"help": "Extra timm.create_model kwargs as JSON, e.g. '{\"drop_path_rate\": 0.1}'."}
    )
    num_channels: int = field(
        default=3,
        metadata={
            "help": "Input channels of a new model (grayscale data is converted); a pretrained model keeps its own."
        },
    )


@dataclass
class PretrainModelArguments(BackboneArguments):
    """The SimLAP model: timm backbone, projector, feature filter and loss."""

    gate: str = field(
        default=DEFAULT_GATE,
        metadata={
            "help": "Feature filter: " + "; ".join(f"{name}: {kind.description}" for name, kind in GATE_KINDS.items())
        },
    )
    pair_mode: str = field(default="arbitrary", metadata={"help": "Partner classes: arbitrary, identical, distinct."})
    temperature: float = field(
        default=DEFAULT_TEMPERATURE, metadata={"help": "Temperature of the gated cosine logits."}
    )
    out_dim: int = field(default=256, metadata={"help": "Projection size K."})
    mlp_dim: int = field(default=2048, metadata={"help": "Hidden size of the projector."})
    gate_penalty: float = field(default=0.0, metadata={"help": "Weight of the gate entropy penalty."})
    loss_form: str = field(
        default="cosine",
        metadata={
            "help": "cosine (reference: cosine of the gated, renormalised embeddings) or dot (the authors' later "
            "form: <z * g * g, z'> of the unit-normalised embeddings, no renormalisation)."
        },
    )
    learnable_temperature: bool = field(
        default=False, metadata={"help": "Learn the logit scale s = exp(scale_logit), starting at 1 / temperature."}
    )
    alpha: float = field(
        default=0.0,
        metadata={"help": "Initial value of a learnable alpha: logits -= alpha * s * cos(z, z'); 0 turns it off."},
    )
    positive_normalization: str = field(
        default="batch",
        metadata={"help": "batch (one mean over all positive pairs) or anchor (mean per anchor, then over anchors)."},
    )
    gumbel_temperature: float = field(default=1.0, metadata={"help": "Temperature of the gumbel gate."})
    gumbel_straight_through: bool = field(
        default=False, metadata={"help": "Round the gumbel gate to 0/1 in the forward pass (straight-through)."}
    )
    stochastic_gate_sigma: float = field(default=0.5, metadata={"help": "Noise std of the stochastic gate."})
    stochastic_gate_lambda: float = field(
        default=1e-6, metadata={"help": "Weight of the stochastic gate's regulariser (mean Gaussian CDF)."}
    )
    projector_norm: str = field(
        default="layernorm", metadata={"help": "Last layer of the projector: layernorm, batchnorm or none."}
    )
    sup_loss: bool = field(
        default=False, metadata={"help": "Let the online head's cross-entropy train the backbone (not detached)."}
    )
    analyze: bool = field(
        default=False,
        metadata={
            "help": "After training, analyse collapse and gates (analysis.json) and add the summary to the model card."
        },
    )


@dataclass
class FinetuneModelArguments(BackboneArguments):
    """Where the backbone comes from: a pretrained SimLAP folder or Hub id, or a timm architecture from scratch."""

    # No default architecture here: without --from_scratch the backbone is the pretrained model's.
    model_name: str | None = field(
        default=None, metadata={"help": "timm architecture; with --from_scratch, the supervised baseline."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained SimLAPModel (or classifier) folder or Hub id."}
    )
    from_scratch: bool = field(default=False, metadata={"help": "Start from random weights (needs --model_name)."})
    classifier_dropout: float = field(default=0.0, metadata={"help": "Dropout before the linear classifier."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a pretrained classifier whose class count differs."}
    )


@dataclass
class FuseModelArguments(BackboneArguments):
    """The SimLAP-Fuse model: timm backbone, margin head, and the SimLAP term."""

    head_dim: int | None = field(
        default=None, metadata={"help": "Margin head width; must equal the backbone width (default: that width)."}
    )
    head_hidden_mult: int = field(default=4, metadata={"help": "Hidden width of the margin head = mult x head_dim."})
    arc_scale: float = field(default=10.0, metadata={"help": "Scale s of the ArcGrad logits s * (pi - arccos)."})
    iter_num: int = field(default=1, metadata={"help": "Pair draws averaged in the SimLAP term."})
    pair_mode: str = field(default="arbitrary", metadata={"help": "Partner classes: arbitrary, identical, distinct."})
    temperature: float = field(default=DEFAULT_TEMPERATURE, metadata={"help": "Temperature of the SimLAP term."})
    simlap_weight: float = field(default=1.0, metadata={"help": "Weight of the SimLAP term."})


# The dataclasses of each script's command line (flags or a YAML file), in the order parse_args returns them.
PRETRAIN_ARGUMENTS = (PretrainModelArguments, DataArguments, TrainingArguments)
FINETUNE_ARGUMENTS = (FinetuneModelArguments, ClassificationArguments, DataArguments, TrainingArguments)
FUSE_ARGUMENTS = (FuseModelArguments, ClassificationArguments, DataArguments, TrainingArguments)


# ----------------------------------------------------------------------------------------------------------------
# Parsing


def _close_matches_message(unknown: Sequence[str], known: Sequence[str], what: str) -> str:
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        parts.append(f"{name}{hint}")
    return f"Unknown {what}: {'; '.join(parts)}. Run with --help for the list of options."


def _read_config_file(config_path: Path, known: Sequence[str]) -> dict[str, Any]:
    """The ``option: value`` mapping of a YAML config file; every key must be one of ``known``."""
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
    values = resolve_aliases(values, f"Config file {str(config_path)!r}")
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(_close_matches_message(unknown, known, f"keys in {config_path}"))
    return values


def _check_config_values(parser: GroupedArgumentParser, values: dict[str, Any], config_path: Path) -> None:
    """Each YAML value converted as its flag would be: a value of the wrong type or outside the choices names the
    file and the key instead of argparse's usage text."""
    actions = {action.dest: action for action in parser._actions}
    for key, value in values.items():
        action = actions[key]
        items = value if isinstance(value, list) else [value]
        for item in items:
            if item is None:
                continue
            try:
                converted = action.type(item) if callable(action.type) else item
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                kind = getattr(action.type, "__name__", "value")
                raise UsageError(
                    f"Config file {str(config_path)!r}: {key}: {item!r} is not a valid {kind}; write it as the flag "
                    f"--{key} expects (see --help)."
                ) from None
            if action.choices is not None and converted not in action.choices:
                choices = ", ".join(str(choice) for choice in action.choices)
                raise UsageError(f"Config file {str(config_path)!r}: {key}: {item!r} is not one of {choices}.")


def parse_args(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Parse ``[CONFIG.yaml] [--flag value ...]`` into instances of ``dataclass_types``.

    Values of the YAML file become defaults that flags override. Unknown YAML keys or flags raise a ValueError that
    lists close matches.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = GroupedArgumentParser(dataclass_types, allow_abbrev=False)
    parser.error = raise_usage_error  # type: ignore[method-assign]
    known = field_names(dataclass_types)
    if argv and argv[0].endswith((".yaml", ".yml")):
        config_path = Path(argv.pop(0))
        values = _read_config_file(config_path, known)
        _check_config_values(parser, values, config_path)
        parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if remaining:
        flags = [item.split("=")[0].lstrip("-") for item in remaining if item.startswith("-")] or remaining
        raise ValueError(_close_matches_message(flags, known, "flags"))
    return tuple(parsed)
