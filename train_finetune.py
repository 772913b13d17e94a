#!/usr/bin/env python
"""Fine-tune a pretrained SimLAP backbone for image classification, or train the supervised cross-entropy baseline
from scratch under the same recipe.

    accelerate launch train_finetune.py configs/finetune_cifar10_resnet18.yaml --model_name_or_path outputs/simlap/...
    accelerate launch train_finetune.py --model_name resnet18 --from_scratch --dataset_name digits --output_dir OUT

The saved folder loads with ``AutoModelForImageClassification`` (after ``import simlap_hf``) and in
``pipeline("image-classification", model=OUT)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simlap_hf import SimLAPForImageClassification
from simlap_hf.training import (
    CLASSIFICATION_METRICS,
    FINETUNE_ARGUMENTS,
    TrainingJob,
    arguments_as_dict,
    build_finetune_model,
    check_finetune_arguments,
    classification_step,
    create_mixup,
    cross_entropy_smoothing,
    finetune_num_channels,
    load_run_data,
    make_classification_evaluator,
    model_folder_files,
    parse_args,
    run_job,
    run_main,
    start_run,
)

# The dataclasses of the command line (flags or a YAML file): FinetuneModelArguments, ClassificationArguments,
# DataArguments, TrainingArguments, in the order parse_args returns them.
ARGUMENT_CLASSES = FINETUNE_ARGUMENTS


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPForImageClassification, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), fine-tune, save; returns the trained model and the results."""
    model_args, recipe, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_finetune_arguments(model_args, data_args)  # before any data is read
    accelerator, repo_id = start_run(args)
    num_channels = finetune_num_channels(model_args)
    data = load_run_data(accelerator, data_args, num_channels, args)
    model = build_finetune_model(model_args, data_args, data.label_names)
    mixup = create_mixup(recipe, model.config.num_labels)
    job = TrainingJob(
        task="finetune",
        model=model,
        data=data,
        args=args,
        compute_loss=classification_step(mixup, cross_entropy_smoothing(recipe, mixup)),
        make_evaluator=make_classification_evaluator,
        metric_names=CLASSIFICATION_METRICS,
        hyperparameters=arguments_as_dict(model_args, recipe, data_args, args),
        dataset_name=data_args.dataset_name,
        repo_id=repo_id,
        model_ema_decay=recipe.model_ema_decay,
        base_model=None if model_args.from_scratch else model_args.model_name_or_path,
        extra_files=model_folder_files(data_args, num_channels, timm_export_dir=recipe.export_timm),
    )
    return run_job(accelerator, job)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
