"""Training machinery of ``train_pretrain.py``, ``train_finetune.py`` and ``train_fuse.py``.

- :mod:`~simlap_hf.training.arguments`: the argument dataclasses (the backbone flags declared once) and
  :func:`parse_args` (an optional YAML file, then flags that override it); :mod:`~simlap_hf.training.validation`
  checks them and the output folder before any data is read;
- :mod:`~simlap_hf.training.backbones` and :mod:`~simlap_hf.training.configs`: the backbone options and each job's
  model configuration, checked before any data is read;
- :mod:`~simlap_hf.training.factories`: ``Accelerator``, timm optimizer and per-iteration scheduler, mixup, EMA;
- :mod:`~simlap_hf.training.steps` and :mod:`~simlap_hf.training.evaluators`: each job's loss step and evaluation;
- :mod:`~simlap_hf.training.loop`: :func:`fit`, the loop with progress bar, periodic evaluation, atomic
  checkpoints (:mod:`~simlap_hf.training.checkpoints`) and resumption;
- :mod:`~simlap_hf.training.state`: :class:`TrainingJob`, one object describing a job, and the types the loop,
  evaluations and outputs share; :mod:`~simlap_hf.training.job`: :func:`start_run` and :func:`run_job`;
- :mod:`~simlap_hf.training.outputs`: ``save_pretrained``, ``all_results.json``, model card, Hub push;
- :mod:`~simlap_hf.training.errors`: clean stops on signals and the command-line exit codes.
"""

from ..data import DataBundle, save_image_processor
from .arguments import (
    FINETUNE_ARGUMENTS,
    FUSE_ARGUMENTS,
    MIXED_PRECISION,
    OPTIMIZERS,
    PRETRAIN_ARGUMENTS,
    BackboneArguments,
    ClassificationArguments,
    FinetuneModelArguments,
    FuseModelArguments,
    PretrainModelArguments,
    TrainingArguments,
    parse_args,
)
from .backbones import (
    RESNET_DEFAULTS,
    RESNET_OUTPUT_STRIDE_HELP,
    RESNET_STEM_HELP,
    backbone_kwargs_of,
    check_backbone,
    check_model_source,
    is_timm_resnet,
    timm_backbone_kwargs,
)
from .checkpoints import (
    CHECKPOINT_PREFIX,
    RUN_ARTIFACTS,
    STATE_FILE,
    PreviousRun,
    TrainerState,
    checkpoint_root,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    previous_run_folder,
    recover_previous_run,
    save_checkpoint,
)
from .configs import (
    PLACEHOLDER_LABELS,
    build_finetune_model,
    build_fuse_config,
    build_pretrain_config,
    build_scratch_config,
    check_finetune_arguments,
    finetune_num_channels,
    label_mappings,
)
from .errors import INPUT_ERROR_TYPES, StopRequested, TrainingInterrupted, is_input_error, run_main
from .evaluators import (
    CLASSIFICATION_METRICS,
    REPRESENTATION_METRICS,
    analysis_card_sections,
    make_classification_evaluator,
    representation_evaluator,
)
from .factories import (
    create_accelerator,
    create_mixup,
    create_model_ema,
    create_optimizer,
    create_scheduler,
    cross_entropy_smoothing,
    prepare_model,
)
from .job import load_run_data, run_job, start_hub_repo, start_run
from .loop import fit
from .outputs import arguments_as_dict, build_results, model_folder_files, save_final_outputs, write_json
from .state import EvaluateFunction, EvaluatorFactory, LossFunction, TrainingJob, TrainingResult
from .steps import classification_step, fuse_step, simlap_step, with_normalized_inputs
from .validation import check_output_folder, validate_training_args

__all__ = [
    "BackboneArguments",
    "CHECKPOINT_PREFIX",
    "CLASSIFICATION_METRICS",
    "ClassificationArguments",
    "DataBundle",
    "EvaluateFunction",
    "EvaluatorFactory",
    "FINETUNE_ARGUMENTS",
    "FUSE_ARGUMENTS",
    "FinetuneModelArguments",
    "FuseModelArguments",
    "INPUT_ERROR_TYPES",
    "LossFunction",
    "MIXED_PRECISION",
    "OPTIMIZERS",
    "PLACEHOLDER_LABELS",
    "PRETRAIN_ARGUMENTS",
    "PretrainModelArguments",
    "REPRESENTATION_METRICS",
    "RESNET_DEFAULTS",
    "RESNET_OUTPUT_STRIDE_HELP",
    "RESNET_STEM_HELP",
    "RUN_ARTIFACTS",
    "STATE_FILE",
    "StopRequested",
    "TrainerState",
    "TrainingArguments",
    "TrainingInterrupted",
    "TrainingJob",
    "TrainingResult",
    "analysis_card_sections",
    "arguments_as_dict",
    "backbone_kwargs_of",
    "build_finetune_model",
    "build_fuse_config",
    "build_pretrain_config",
    "build_results",
    "build_scratch_config",
    "check_backbone",
    "check_finetune_arguments",
    "check_model_source",
    "checkpoint_root",
    "classification_step",
    "create_accelerator",
    "create_mixup",
    "create_model_ema",
    "create_optimizer",
    "create_scheduler",
    "cross_entropy_smoothing",
    "find_checkpoint",
    "finetune_num_channels",
    "fit",
    "fuse_step",
    "is_input_error",
    "is_timm_resnet",
    "label_mappings",
    "list_checkpoints",
    "load_checkpoint",
    "make_classification_evaluator",
    "model_folder_files",
    "PreviousRun",
    "previous_run_folder",
    "recover_previous_run",
    "parse_args",
    "prepare_model",
    "representation_evaluator",
    "run_job",
    "run_main",
    "save_checkpoint",
    "save_final_outputs",
    "save_image_processor",
    "simlap_step",
    "start_hub_repo",
    "start_run",
    "load_run_data",
    "timm_backbone_kwargs",
    "check_output_folder",
    "validate_training_args",
    "with_normalized_inputs",
    "write_json",
]
