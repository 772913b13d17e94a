#!/usr/bin/env python
"""SimLAP-Fuse (the seed's third job): supervised training with an ArcGrad margin head, regularised by the SimLAP
term on backbone features gated by the signs of the class weights.

    accelerate launch train_fuse.py configs/fuse_cifar10_resnet18.yaml
    accelerate launch train_fuse.py --dataset_name digits --output_dir OUT --num_train_epochs 2

The saved folder classifies through ``AutoModelForImageClassification`` and ``pipeline`` like a fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simlap_hf import SimLAPFuseForImageClassification
from simlap_hf.configuration_simlap import SimLAPFuseConfig
from simlap_hf.data import DataArguments
from simlap_hf.training import (
    PLACEHOLDER_LABELS,
    RESNET_OUTPUT_STRIDE_HELP,
    RESNET_STEM_HELP,
    ClassificationArguments,
    TrainingArguments,
    arguments_as_dict,
    check_backbone,
    create_mixup,
    label_mappings,
    make_classification_evaluator,
    parse_args,
    prepare_data,
    run_main,
    save_image_processor,
    start_run,
    timm_backbone_kwargs,
    train_and_save,
)

METRICS = ("eval_top1", "eval_top5")


@dataclass
class FuseModelArguments:
    """The SimLAP-Fuse model: timm backbone, margin head, and the SimLAP term."""

    model_name: str = field(default="resnet18", metadata={"help": "timm backbone architecture."})
    stem_type: str | None = field(default=None, metadata={"help": RESNET_STEM_HELP})
    output_stride: int | None = field(default=None, metadata={"help": RESNET_OUTPUT_STRIDE_HELP})
    model_kwargs: str | None = field(default=None, metadata={"help": "Extra timm kwargs as JSON."})
    num_channels: int = field(default=3, metadata={"help": "Input channels."})
    head_dim: int | None = field(
        default=None, metadata={"help": "Margin head width; must equal the backbone width (default: that width)."}
    )
    head_hidden_mult: int = field(default=4, metadata={"help": "Hidden width of the margin head = mult x head_dim."})
    arc_scale: float = field(default=10.0, metadata={"help": "Scale s of the ArcGrad logits s * (pi - arccos)."})
    iter_num: int = field(default=1, metadata={"help": "Pair draws averaged in the SimLAP term."})
    pair_mode: str = field(default="arbitrary", metadata={"help": "Partner classes: arbitrary, identical, distinct."})
    temperature: float = field(default=0.1, metadata={"help": "Temperature of the SimLAP term."})
    simlap_weight: float = field(default=1.0, metadata={"help": "Weight of the SimLAP term."})


# The dataclasses of the command line (flags or a YAML file), in the order parse_args returns them.
ARGUMENT_CLASSES = (FuseModelArguments, ClassificationArguments, DataArguments, TrainingArguments)


def build_config(model_args: FuseModelArguments, data_args: DataArguments, label_smoothing: float,
                 label_names: Sequence[str]) -> SimLAPFuseConfig:
    backbone_kwargs = timm_backbone_kwargs(
        model_args.model_name, model_args.stem_type, model_args.output_stride, model_args.model_kwargs
    )
    return SimLAPFuseConfig(
        backbone=model_args.model_name,
        backbone_kwargs=backbone_kwargs,
        num_channels=model_args.num_channels,
        image_size=data_args.input_size,
        head_dim=model_args.head_dim,
        head_hidden_mult=model_args.head_hidden_mult,
        arc_scale=model_args.arc_scale,
        iter_num=model_args.iter_num,
        pair_mode=model_args.pair_mode,
        temperature=model_args.temperature,
        simlap_weight=model_args.simlap_weight,
        label_smoothing=label_smoothing,
        **label_mappings(label_names),
    )


def fuse_step_factory(mixup):
    """``(model, batch) -> (loss, logs)``: ArcGrad cross-entropy (soft targets under mixup) + SimLAP term."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        pixel_values, labels = batch["pixel_values"], batch["labels"]
        soft_labels = None
        if mixup is not None:
            pixel_values, soft_labels = mixup(pixel_values, labels)
        out = model(pixel_values=pixel_values, labels=labels, soft_labels=soft_labels)
        return out.loss, {}

    return step


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPFuseForImageClassification, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), train, save; returns the trained model and the results."""
    model_args, recipe, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_backbone(build_config(model_args, data_args, 0.0, PLACEHOLDER_LABELS))  # model errors before any data
    accelerator, repo_id = start_run(args)
    data = prepare_data(data_args, args, model_args.num_channels)
    mixup = create_mixup(recipe, len(data.label_names))
    # Mixup targets already carry the smoothing; otherwise the model's cross-entropy applies it.
    config = build_config(model_args, data_args, 0.0 if mixup is not None else recipe.smoothing, data.label_names)

    def extra_files(output_dir: Path, trained: SimLAPFuseForImageClassification) -> None:
        save_image_processor(output_dir, data_args, model_args.num_channels)

    return train_and_save(
        accelerator, SimLAPFuseForImageClassification(config), data, args, fuse_step_factory(mixup),
        make_classification_evaluator, "fuse", METRICS, arguments_as_dict(model_args, recipe, data_args, args),
        data_args.dataset_name, repo_id=repo_id, model_ema_decay=recipe.model_ema_decay, extra_files=extra_files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
