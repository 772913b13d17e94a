#!/usr/bin/env python
"""SimLAP pretraining with accelerate: the paper's protocol (contrastive learning from arbitrary class pairs through a
label-conditioned feature filter) on any image data set.

    accelerate launch train_pretrain.py configs/pretrain_cifar10_resnet18.yaml
    accelerate launch train_pretrain.py --dataset_name digits --output_dir outputs/digits --num_train_epochs 2
    python train_pretrain.py configs/quickstart_digits.yaml --num_train_epochs 1

Reports the online linear head's top-1/top-5 and the kNN top-1 of frozen backbone features on the validation
split, and saves a ``SimLAPModel`` folder (config, safetensors weights, model card, results, checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from simlap_hf import SimLAPModel
from simlap_hf.training import (
    PLACEHOLDER_LABELS,
    PRETRAIN_ARGUMENTS,
    REPRESENTATION_METRICS,
    TrainingJob,
    analysis_card_sections,
    arguments_as_dict,
    build_pretrain_config,
    check_backbone,
    load_run_data,
    model_folder_files,
    parse_args,
    representation_evaluator,
    run_job,
    run_main,
    simlap_step,
    start_run,
)

# The dataclasses of the command line (flags or a YAML file): PretrainModelArguments, DataArguments,
# TrainingArguments, in the order parse_args returns them.
ARGUMENT_CLASSES = PRETRAIN_ARGUMENTS


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPModel, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), train, save; returns the trained model and the results."""
    model_args, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_backbone(build_pretrain_config(model_args, data_args, PLACEHOLDER_LABELS))  # before any data is read
    accelerator, repo_id = start_run(args)
    data = load_run_data(accelerator, data_args, model_args.num_channels, args)
    config = build_pretrain_config(model_args, data_args, data.label_names)
    sections = analysis_card_sections(accelerator, data, args.output_dir, args.knn_k, args.knn_temperature)
    job = TrainingJob(
        task="pretrain",
        model=SimLAPModel(config),
        data=data,
        args=args,
        compute_loss=simlap_step,
        make_evaluator=representation_evaluator(args.knn_k, args.knn_temperature),
        metric_names=REPRESENTATION_METRICS,
        hyperparameters=arguments_as_dict(model_args, data_args, args),
        dataset_name=data_args.dataset_name,
        repo_id=repo_id,
        extra_files=model_folder_files(data_args, model_args.num_channels, class_relations=True),
        card_sections=sections if model_args.analyze else None,
    )
    return run_job(accelerator, job)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
