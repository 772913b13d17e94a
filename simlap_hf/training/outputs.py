"""What a run writes besides checkpoints: ``training_log.jsonl`` during training, and at the end the saved model
folder (``save_pretrained``, extra files, ``all_results.json``, model card), optionally pushed to the Hub."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..data import create_image_processor, resolve_preprocessing
from ..export import export_timm
from ..hub import HubPushError, push_output_dir
from ..model_card import build_model_card
from ..relations import save_class_relations
from .state import TrainingJob, TrainingResult

LOG_FILE = "training_log.jsonl"


def build_results(result: TrainingResult, metric_names: Sequence[str]) -> dict[str, Any]:
    """``all_results.json`` content: final and best metrics, epochs, wall time and images per second."""
    state = result.state
    results: dict[str, Any] = {
        name: result.final_metrics[name] for name in metric_names if name in result.final_metrics
    }
    best_record = next((r for r in state.history if r.get("epoch") == state.best_epoch), None)
    if best_record is not None:
        results.update({f"best_{name}": best_record[name] for name in metric_names if name in best_record})
        results["best_epoch"] = state.best_epoch
    results["epochs"] = state.epoch
    results["global_step"] = state.global_step
    results["train_seconds"] = round(state.train_seconds, 2)
    results["train_images_per_second"] = round(state.train_images / max(state.train_seconds, 1e-9), 2)
    results["train_data_wait_seconds"] = round(state.data_wait_seconds, 2)
    results["train_data_wait_fraction"] = round(state.data_wait_seconds / max(state.train_seconds, 1e-9), 4)
    return results


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file, then rename)."""
    path = Path(path)
    temporary = path.with_suffix(path.suffix + ".tmp")
    temporary.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def arguments_as_dict(*arguments: Any) -> dict[str, Any]:
    """Flatten argument dataclasses into one dict (hub token removed) for trackers and model cards."""
    flat: dict[str, Any] = {}
    for item in arguments:
        flat.update(asdict(item))
    flat.pop("hub_token", None)
    return flat


# ----------------------------------------------------------------------------------------------------------------
# training_log.jsonl


def append_log(output_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record (a JSON line) to the run's ``training_log.jsonl``."""
    with open(Path(output_dir) / LOG_FILE, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def truncate_log(output_dir: str | os.PathLike, last_step: int) -> None:
    """Keep the records of ``training_log.jsonl`` up to ``last_step`` (atomically); unreadable lines are dropped."""
    path = Path(output_dir) / LOG_FILE
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line + "\n")
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)


# ----------------------------------------------------------------------------------------------------------------
# The saved model folder


def model_folder_files(
    data_args: Any, num_channels: int, class_relations: bool = False, timm_export_dir: str | None = None
) -> Callable[[Path, torch.nn.Module], None]:
    """The ``extra_files`` of a job: the image processor of the run's evaluation preprocessing (with its code,
    ``image_processing_simlap.py``, and the ``auto_map`` that loads it without SimLAP-HF), then with
    ``class_relations`` the model's ``class_relations.json`` and heatmap (models with a feature filter), and with
    ``timm_export_dir`` the classifier exported as a timm model folder there.

    The processor's input size, the model config's ``image_size`` (which the card and the exports read) and
    ``--input_size`` are one value; a model whose config says otherwise is a bug, raised before the processor is
    written.
    """

    def write(output_dir: Path, trained: torch.nn.Module) -> None:

        preprocessing = resolve_preprocessing(data_args, num_channels)
        config = trained.config
        if (config.image_size, config.num_channels) != (preprocessing.input_size, preprocessing.num_channels):
            raise RuntimeError(
                f"The model config says {config.num_channels} x {config.image_size} x {config.image_size} inputs but "
                f"the run prepared {preprocessing.num_channels} x {preprocessing.input_size} x "
                f"{preprocessing.input_size} images."
            )
        create_image_processor(preprocessing).save_pretrained(output_dir)
        if class_relations:
            save_class_relations(trained, output_dir)
        if timm_export_dir:
            export_timm(trained, timm_export_dir, source_dir=output_dir)

    return write


def _write_model_folder(
    job: TrainingJob, model: torch.nn.Module, results: dict[str, Any], extra_card_sections: dict[str, str] | None
) -> None:
    """``save_pretrained``, the job's extra files, ``all_results.json`` and the model card (main process only)."""

    output_dir = Path(job.args.output_dir)
    model.save_pretrained(output_dir, safe_serialization=True)
    if job.extra_files is not None:
        job.extra_files(output_dir, model)
    write_json(output_dir / "all_results.json", results)
    card = build_model_card(
        output_dir,
        job.task,
        model.config,
        results,
        job.hyperparameters,
        job.dataset_name,
        repo_id=job.repo_id,
        base_model=job.base_model,
        extra_sections=extra_card_sections,
    )
    card.save(output_dir / "README.md")


def save_final_outputs(
    accelerator: Accelerator,
    job: TrainingJob,
    model: torch.nn.Module,
    result: TrainingResult,
    extra_card_sections: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Save the final ``model`` (``save_pretrained``), ``all_results.json`` and the model card on the main process,
    then push the folder to the Hub when the job has a ``repo_id``. Returns the results."""

    results = build_results(result, job.metric_names)
    push_error: Exception | None = None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_model_folder(job, accelerator.unwrap_model(model), results, extra_card_sections)
        accelerator.print("results: " + json.dumps(results))
        if job.repo_id is not None:
            try:
                url = push_output_dir(Path(job.args.output_dir), job.repo_id, job.args.hub_token, "End of training")
                accelerator.print(f"pushed: {url}")
            except HubPushError as error:  # raised after every process is past the barrier below
                push_error = error
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error is not None:
        raise push_error
    return results
