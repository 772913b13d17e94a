#!/usr/bin/env python
"""Fine-tune a pretrained SimLAP backbone for image classification (the seed's second job), or train the supervised
cross-entropy baseline from scratch under the same recipe.

    accelerate launch train_finetune.py configs/finetune_cifar10_resnet18.yaml --model_name_or_path outputs/simlap/...
    accelerate launch train_finetune.py --model_name resnet18 --from_scratch --dataset_name digits --output_dir OUT

The saved folder loads with ``AutoModelForImageClassification`` (after ``import simlap_hf``) and in
``pipeline("image-classification", model=OUT)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simlap_hf import SimLAPConfig, SimLAPForImageClassification
from simlap_hf.data import DataArguments
from simlap_hf.training import (
    PLACEHOLDER_LABELS,
    RESNET_OUTPUT_STRIDE_HELP,
    RESNET_STEM_HELP,
    ClassificationArguments,
    TrainingArguments,
    arguments_as_dict,
    check_backbone,
    check_model_source,
    create_classification_criterion,
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
class FinetuneModelArguments:
    """Where the backbone comes from: a pretrained SimLAP folder or Hub id, or a timm architecture from scratch."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Pretrained SimLAPModel (or classifier) folder or Hub id."}
    )
    model_name: str | None = field(
        default=None, metadata={"help": "timm architecture; with --from_scratch, the supervised baseline."}
    )
    from_scratch: bool = field(default=False, metadata={"help": "Start from random weights (needs --model_name)."})
    stem_type: str | None = field(default=None, metadata={"help": RESNET_STEM_HELP})
    output_stride: int | None = field(default=None, metadata={"help": RESNET_OUTPUT_STRIDE_HELP})
    model_kwargs: str | None = field(default=None, metadata={"help": "Extra timm kwargs as JSON (from scratch)."})
    num_channels: int = field(default=3, metadata={"help": "Input channels (from scratch only)."})
    classifier_dropout: float = field(default=0.0, metadata={"help": "Dropout before the linear classifier."})
    ignore_mismatched_sizes: bool = field(
        default=False, metadata={"help": "Replace a pretrained classifier whose class count differs."}
    )


# The dataclasses of the command line (flags or a YAML file), in the order parse_args returns them.
ARGUMENT_CLASSES = (FinetuneModelArguments, ClassificationArguments, DataArguments, TrainingArguments)


def scratch_config(model_args: FinetuneModelArguments, data_args: DataArguments,
                   label_names: Sequence[str]) -> SimLAPConfig:
    """The classifier's config when training from scratch (``--from_scratch --model_name NAME``)."""
    backbone_kwargs = timm_backbone_kwargs(
        model_args.model_name, model_args.stem_type, model_args.output_stride, model_args.model_kwargs
    )
    return SimLAPConfig(backbone=model_args.model_name, backbone_kwargs=backbone_kwargs,
                        image_size=data_args.input_size, num_channels=model_args.num_channels,
                        classifier_dropout=model_args.classifier_dropout, **label_mappings(label_names))


def check_model_arguments(model_args: FinetuneModelArguments, data_args: DataArguments) -> None:
    """Errors in the model flags, raised before any data is loaded."""
    if model_args.from_scratch:
        if not model_args.model_name:
            raise ValueError("--from_scratch needs --model_name (a timm architecture such as resnet18).")
        check_backbone(scratch_config(model_args, data_args, PLACEHOLDER_LABELS))
    elif not model_args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path (a pretrained SimLAP model) or --model_name NAME --from_scratch.")
    else:
        check_model_source(model_args.model_name_or_path)


def build_model(model_args: FinetuneModelArguments, data_args: DataArguments, label_names: Sequence[str]):
    """A SimLAPForImageClassification for the data's classes: from a pretrained checkpoint (backbone taken over,
    new head) or from scratch."""
    labels = label_mappings(label_names)
    if model_args.from_scratch:
        return SimLAPForImageClassification(scratch_config(model_args, data_args, label_names))
    pretrained = SimLAPConfig.from_pretrained(model_args.model_name_or_path)
    if model_args.model_name and model_args.model_name != pretrained.backbone:
        raise ValueError(
            f"--model_name {model_args.model_name!r} differs from the backbone of {model_args.model_name_or_path!r} "
            f"({pretrained.backbone!r}). Drop --model_name to fine-tune the checkpoint's backbone."
        )
    return SimLAPForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        classifier_dropout=model_args.classifier_dropout,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **labels,
    )


def classification_step_factory(mixup, criterion):
    """``(model, batch) -> (loss, logs)`` with mixup/cutmix soft targets when enabled."""

    def step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
        pixel_values, targets = batch["pixel_values"], batch["labels"]
        if mixup is not None:
            pixel_values, targets = mixup(pixel_values, targets)
        logits = model(pixel_values=pixel_values).logits
        loss = criterion(logits.float(), targets)
        return loss, {}

    return step


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPForImageClassification, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), fine-tune, save; returns the trained model and the results."""
    model_args, recipe, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_model_arguments(model_args, data_args)
    accelerator, repo_id = start_run(args)
    num_channels = (
        model_args.num_channels
        if model_args.from_scratch or not model_args.model_name_or_path
        else SimLAPConfig.from_pretrained(model_args.model_name_or_path).num_channels
    )
    data = prepare_data(data_args, args, num_channels)
    model = build_model(model_args, data_args, data.label_names)
    mixup = create_mixup(recipe, model.config.num_labels)
    step = classification_step_factory(mixup, create_classification_criterion(mixup is not None, recipe.smoothing))

    def extra_files(output_dir: Path, trained: SimLAPForImageClassification) -> None:
        save_image_processor(output_dir, data_args, num_channels)
        if recipe.export_timm:
            from simlap_hf.export import export_timm

            export_timm(trained, recipe.export_timm, source_dir=output_dir)

    base_model = None if model_args.from_scratch else model_args.model_name_or_path
    return train_and_save(
        accelerator, model, data, args, step, make_classification_evaluator, "finetune", METRICS,
        arguments_as_dict(model_args, recipe, data_args, args), data_args.dataset_name, repo_id=repo_id,
        model_ema_decay=recipe.model_ema_decay, base_model=base_model, extra_files=extra_files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
