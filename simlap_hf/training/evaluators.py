"""The evaluations run by the training loop, as factories ``(accelerator, data, ema) -> evaluate(model)``:
the representation of a pretraining run (online head and kNN) and the accuracy of a classifier; and the optional
representation analysis of a pretraining run's model card."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator

from ..analysis import analyze_model, summary_markdown
from ..data import DataBundle
from ..evaluation import classification_metrics, evaluate_representation, extract_features
from .outputs import write_json
from .state import EvaluateFunction, EvaluatorFactory

REPRESENTATION_METRICS = ("eval_top1", "eval_top5", "eval_knn_top1")
CLASSIFICATION_METRICS = ("eval_top1", "eval_top5")


def representation_evaluator(knn_k: int, knn_temperature: float) -> EvaluatorFactory:
    """The evaluation of pretraining: online-head top-1/top-5 on the validation split and kNN top-1 of backbone
    features against the training images (``train_eval``), across processes
    (:func:`simlap_hf.evaluation.evaluate_representation`)."""

    def make_evaluator(
        accelerator: Accelerator, data: DataBundle, ema: torch.nn.Module | None = None
    ) -> EvaluateFunction:

        def evaluate(model: torch.nn.Module) -> dict[str, float]:
            num_classes = accelerator.unwrap_model(model).config.num_classes
            return evaluate_representation(
                model,
                data.validation,
                data.train_eval,
                accelerator,
                num_classes,
                knn_k=knn_k,
                knn_temperature=knn_temperature,
            )

        return evaluate

    return make_evaluator


def make_classification_evaluator(
    accelerator: Accelerator, data: DataBundle, ema: torch.nn.Module | None = None
) -> EvaluateFunction:
    """Top-1/top-5 of the model's ``logits`` on the validation split (of the EMA weights when given)."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        evaluated = ema.module if ema is not None else model
        logits, labels = extract_features(evaluated, data.validation, accelerator, output_key="logits")
        metrics = classification_metrics(logits, labels)
        return {"eval_top1": metrics["top1"], "eval_top5": metrics["top5"]}

    return evaluate


def analysis_card_sections(
    accelerator: Accelerator, data: DataBundle, output_dir: str | os.PathLike, knn_k: int, knn_temperature: float
) -> Callable[[torch.nn.Module], dict[str, str]]:
    """The ``card_sections`` of a pretraining job run with ``--analyze``: analyse the trained model's collapse and
    gates on every process, write ``analysis.json`` (main process) and return the summary as a card section."""

    def sections(model: torch.nn.Module) -> dict[str, str]:
        report = analyze_model(
            model,
            data.train_eval,
            data.validation,
            data.label_names,
            accelerator,
            knn_k=knn_k,
            knn_temperature=knn_temperature,
        )
        if accelerator.is_main_process:
            write_json(Path(output_dir) / "analysis.json", report)
        return {"Representation analysis": summary_markdown(report)}

    return sections
