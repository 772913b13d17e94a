"""What describes a training run, shared by the loop, the evaluations and the saving of the outputs: the job
(:class:`TrainingJob`), its loss and evaluation functions, and the result of :func:`~simlap_hf.training.loop.fit`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data import DataBundle
from .arguments import TrainingArguments
from .checkpoints import TrainerState

#: ``(model, batch) -> (loss, {name: scalar tensor})``: one forward pass; the dict is logged.
LossFunction = Callable[[torch.nn.Module, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
#: ``(model) -> {name: float}``: an evaluation, run on every process.
EvaluateFunction = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class TrainingResult:
    """What :func:`fit` returns: the trainer state at the end and the metrics of the last evaluation."""

    state: TrainerState
    final_metrics: dict[str, float]


#: ``(accelerator, data, ema) -> evaluate``: builds a job's evaluation once its loaders are prepared; ``ema`` is the
#: EMA of the weights (a timm ``ModelEmaV3``) when the job keeps one.
EvaluatorFactory = Callable[[Accelerator, "DataBundle", "torch.nn.Module | None"], EvaluateFunction]


@dataclass
class TrainingJob:
    """What a script hands over once the data is loaded and the model built.

    Attributes:
        task: ``"pretrain"``, ``"finetune"`` or ``"fuse"`` (the model card's description, the trackers' project).
        model: the model to train (not yet prepared by the accelerator).
        data: the run's loaders; :func:`run_job` replaces them by their prepared versions.
        args: the training arguments.
        compute_loss: ``(model, batch) -> (loss, logs)``, see :mod:`simlap_hf.training.steps`.
        make_evaluator: ``(accelerator, data, ema) -> evaluate``, see :mod:`simlap_hf.training.evaluators`.
        metric_names: the evaluation metrics reported in ``all_results.json`` and the card.
        hyperparameters: the flat options of the run, for trackers and the card (no hub token).
        dataset_name: ``--dataset_name`` of the run, for the card.
        repo_id: Hub repository to push the final folder (and, with ``--push_checkpoints``, checkpoints) to.
        model_ema_decay: keep an EMA of the weights with this decay; it is evaluated and saved instead.
        base_model: the model fine-tuned from, for the card.
        extra_files: ``(output_dir, trained model) -> None``, writes more files into the saved folder (main process).
        card_sections: ``(trained model) -> {title: markdown}``, more card sections; called on every process.
    """

    task: str
    model: torch.nn.Module
    data: DataBundle
    args: TrainingArguments
    compute_loss: LossFunction
    make_evaluator: EvaluatorFactory
    metric_names: Sequence[str]
    hyperparameters: dict[str, Any]
    dataset_name: str | None = None
    repo_id: str | None = None
    model_ema_decay: float | None = None
    base_model: str | None = None
    extra_files: Callable[[Path, torch.nn.Module], None] | None = None
    card_sections: Callable[[torch.nn.Module], dict[str, str]] | None = None
