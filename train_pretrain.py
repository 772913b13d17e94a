#!/usr/bin/env python
"""SimLAP pretraining with accelerate: the reference protocol (SPEC section 5) on any image data set.

    accelerate launch train_pretrain.py configs/pretrain_cifar10_resnet18.yaml
    accelerate launch train_pretrain.py --dataset_name digits --output_dir outputs/digits --num_train_epochs 2
    python train_pretrain.py configs/quickstart_digits.yaml --num_train_epochs 1

Reports the online linear head's top-1/top-5 and the kNN top-1 of frozen backbone features on the validation
split, and saves a ``SimLAPModel`` folder (config, safetensors weights, model card, results, checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from simlap_hf import SimLAPConfig, SimLAPModel
from simlap_hf.analysis import analyze_model, summary_markdown
from simlap_hf.data import DataArguments
from simlap_hf.evaluation import classification_metrics, extract_features, knn_accuracy
from simlap_hf.relations import save_class_relations
from simlap_hf.training import (
    PLACEHOLDER_LABELS,
    RESNET_OUTPUT_STRIDE_HELP,
    RESNET_STEM_HELP,
    TrainingArguments,
    arguments_as_dict,
    check_backbone,
    label_mappings,
    parse_args,
    prepare_data,
    run_main,
    save_image_processor,
    start_run,
    timm_backbone_kwargs,
    train_and_save,
    write_json,
)

LOGGED_OUTPUTS = ("contrastive_loss", "head_loss", "gate_penalty_loss", "gate_activation", "gate_entropy",
                  "cos_own", "cos_partner", "cos_negative", "embedding_std")
METRICS = ("eval_top1", "eval_top5", "eval_knn_top1")


@dataclass
class PretrainModelArguments:
    """The SimLAP model: timm backbone, projector, feature filter and loss."""

    model_name: str = field(default="resnet18", metadata={"help": "timm backbone architecture."})
    stem_type: str | None = field(default=None, metadata={"help": RESNET_STEM_HELP})
    output_stride: int | None = field(default=None, metadata={"help": RESNET_OUTPUT_STRIDE_HELP})
    model_kwargs: str | None = field(
        default=None, metadata={"help": "Extra timm.create_model kwargs as JSON, e.g. '{\"drop_path_rate\": 0.1}'."}
    )
    num_channels: int = field(default=3, metadata={"help": "Input channels (grayscale data is converted)."})
    gate: str = field(default="fused", metadata={"help": "Feature filter: fused, product or open (SupCon)."})
    pair_mode: str = field(default="arbitrary", metadata={"help": "Partner classes: arbitrary, identical, distinct."})
    temperature: float = field(default=0.1, metadata={"help": "Temperature of the gated cosine logits."})
    out_dim: int = field(default=256, metadata={"help": "Projection size K."})
    mlp_dim: int = field(default=2048, metadata={"help": "Hidden size of the projector."})
    gate_penalty: float = field(default=0.0, metadata={"help": "Weight of the gate entropy penalty."})
    sup_loss: bool = field(
        default=False, metadata={"help": "Let the online head's cross-entropy train the backbone (not detached)."}
    )
    analyze: bool = field(
        default=False, metadata={"help": "After training, analyse collapse and gates (analysis.json) and add the "
                                         "summary to the model card."}
    )


# The dataclasses of the command line (flags or a YAML file), in the order parse_args returns them.
ARGUMENT_CLASSES = (PretrainModelArguments, DataArguments, TrainingArguments)


def build_config(model_args: PretrainModelArguments, data_args: DataArguments, label_names: Sequence[str]):
    return SimLAPConfig(
        backbone=model_args.model_name,
        backbone_kwargs=timm_backbone_kwargs(
            model_args.model_name, model_args.stem_type, model_args.output_stride, model_args.model_kwargs
        ),
        out_dim=model_args.out_dim,
        mlp_dim=model_args.mlp_dim,
        gate=model_args.gate,
        pair_mode=model_args.pair_mode,
        temperature=model_args.temperature,
        gate_penalty=model_args.gate_penalty,
        detach_head=not model_args.sup_loss,
        image_size=data_args.input_size,
        num_channels=model_args.num_channels,
        **label_mappings(label_names),
    )


def simlap_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """One forward pass with labels: the total loss and the statistics to log."""
    out = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
    return out.loss, {name: getattr(out, name) for name in LOGGED_OUTPUTS}


def make_evaluator(accelerator, data, ema=None):
    """Online-head top-1/top-5 on the validation split and kNN top-1 of backbone features, across processes."""

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        val_features, val_labels = extract_features(model, data.validation, accelerator)
        # The kNN memory bank stays split across the processes, on their devices; each process classifies its own
        # slice of the validation queries against every shard, and the counts are reduced once.
        train_features, train_labels = extract_features(model, data.train_eval, accelerator, shard=True)
        unwrapped = accelerator.unwrap_model(model)
        head = unwrapped.online_head
        with torch.no_grad():
            logits = head(val_features.to(head.weight.device)).float().cpu()
        metrics = classification_metrics(logits, val_labels)
        training = data.training_args
        rank, world = accelerator.process_index, accelerator.num_processes
        knn = knn_accuracy(train_features, train_labels, val_features[rank::world].to(train_features.device),
                           val_labels[rank::world], unwrapped.config.num_classes, k=training.knn_k,
                           temperature=training.knn_temperature, sharded=world > 1)
        return {"eval_top1": metrics["top1"], "eval_top5": metrics["top5"], "eval_knn_top1": knn}

    return evaluate


def run(argv: Sequence[str] | None = None) -> tuple[SimLAPModel, dict[str, Any]]:
    """Parse ``argv`` (YAML file and/or flags), train, save; returns the trained model and the results."""
    model_args, data_args, args = parse_args(ARGUMENT_CLASSES, argv)
    check_backbone(build_config(model_args, data_args, PLACEHOLDER_LABELS))  # model errors before any data is read
    accelerator, repo_id = start_run(args)
    data = prepare_data(data_args, args, model_args.num_channels)
    config = build_config(model_args, data_args, data.label_names)

    def analysis_sections(model: torch.nn.Module) -> dict[str, str]:
        report = analyze_model(model, data.train_eval, data.validation, data.label_names, accelerator,
                               knn_k=args.knn_k, knn_temperature=args.knn_temperature)
        if accelerator.is_main_process:
            write_json(Path(args.output_dir) / "analysis.json", report)
        return {"Representation analysis": summary_markdown(report)}

    def extra_files(output_dir: Path, trained: SimLAPModel) -> None:
        save_image_processor(output_dir, data_args, model_args.num_channels)
        save_class_relations(trained, output_dir)  # class_relations.json + heatmap (models with a feature filter)

    return train_and_save(
        accelerator, SimLAPModel(config), data, args, simlap_step, make_evaluator, "pretrain", METRICS,
        arguments_as_dict(model_args, data_args, args), data_args.dataset_name, repo_id=repo_id,
        card_sections=analysis_sections if model_args.analyze else None, extra_files=extra_files,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when finished, 130/143 after Ctrl-C/SIGTERM (a checkpoint was saved to resume from)."""
    return run_main(run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
