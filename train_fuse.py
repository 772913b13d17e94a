#!/usr/bin/env python
"""SimLAP-Fuse: supervised training with an ArcGrad margin head, regularised by the SimLAP term on backbone features
gated by the signs of the class weights.

    accelerate launch train_fuse.py configs/fuse_cifar10_resnet18.yaml
    accelerate launch train_fuse.py --dataset_name digits --output_dir OUT --num_train_epochs 2

The saved folder classifies through ``AutoModelForImageClassification`` and ``pipeline`` like a fine-tuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simlap_hf import SimLAPFuseForImageClassification
from simlap_hf.training import (
    CLASSIFICATION_METRICS,
    FUSE_ARGUMENTS,
    PLACEHOLDER_LABELS,
    TrainingJob,
    arguments_as_dict,
    build_fuse_config,
    check_backbone,
    create_mixup,
    cross_entropy_smoothing,
    fuse_step,
    load_run_data,
    make_classification_evaluator,
    model_folder_files,
    parse_args,
    run_job,
    run_main,
    start_run,
)

# The dataclasses of the command line (flags or a YAML file): FuseModelArguments, ClassificationArguments,
# DataArguments, TrainingArguments, in the order parse_args returns them.
ARGUMENT_CLASSES = FUSE_ARGUMENTS


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPFuseForImageClassification, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), train, save; returns the trained model and the results."""
    model_args, recipe, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_backbone(build_fuse_config(model_args, data_args, 0.0, PLACEHOLDER_LABELS))  # before any data is read
    accelerator, repo_id = start_run(args)
    data = load_run_data(accelerator, data_args, model_args.num_channels, args)
    mixup = create_mixup(recipe, len(data.label_names))
    config = build_fuse_config(model_args, data_args, cross_entropy_smoothing(recipe, mixup), data.label_names)
    job = TrainingJob(
        task="fuse",
        model=SimLAPFuseForImageClassification(config),
        data=data,
        args=args,
        compute_loss=fuse_step(mixup),
        make_evaluator=make_classification_evaluator,
        metric_names=CLASSIFICATION_METRICS,
        hyperparameters=arguments_as_dict(model_args, recipe, data_args, args),
        dataset_name=data_args.dataset_name,
        repo_id=repo_id,
        model_ema_decay=recipe.model_ema_decay,
        extra_files=model_folder_files(data_args, model_args.num_channels),
    )
    return run_job(accelerator, job)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
