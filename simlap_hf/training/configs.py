"""The model of each training job, built from the parsed arguments: the ``SimLAPConfig`` of pretraining, of a
classifier trained from scratch and of SimLAP-Fuse, and the fine-tuned classifier (a pretrained checkpoint with a new
head, or a new model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..configuration_simlap import SimLAPConfig, SimLAPFuseConfig
from ..modeling_simlap import SimLAPForImageClassification
from ..saved_model import load_saved_config
from .backbones import backbone_kwargs_of, check_backbone, check_model_source

if TYPE_CHECKING:
    from ..data import DataArguments
    from .arguments import BackboneArguments, FinetuneModelArguments, FuseModelArguments, PretrainModelArguments

# Stand-in class names for checking a model configuration before the data (and its classes) are loaded.
PLACEHOLDER_LABELS = ("class_0", "class_1")


def label_mappings(label_names: Sequence[str]) -> dict[str, dict]:
    """``id2label`` / ``label2id`` keyword arguments for a config."""
    return {
        "id2label": {i: str(name) for i, name in enumerate(label_names)},
        "label2id": {str(name): i for i, name in enumerate(label_names)},
    }


def fixed_input_size(model_name: str, backbone_kwargs: dict[str, Any]) -> bool:
    """Whether timm's ``model_name`` is built for one input size (ViT, Swin, ...: position embeddings of a fixed
    grid), unless ``dynamic_img_size`` is asked for."""
    import timm.models

    if not timm.is_model(model_name) or backbone_kwargs.get("dynamic_img_size"):
        return False
    return bool(getattr(timm.models.get_pretrained_cfg(model_name), "fixed_input_size", False))


def sized_backbone_kwargs(model_name: str, backbone_kwargs: dict[str, Any], input_size: int) -> dict[str, Any]:
    """``backbone_kwargs`` for an input of ``input_size`` pixels: an architecture of fixed input size gets
    ``img_size`` = ``input_size`` (the one input size of the model, its processor, card and exports); an ``img_size``
    given in ``--model_kwargs`` that differs is a ValueError."""
    if not fixed_input_size(model_name, backbone_kwargs):
        return backbone_kwargs
    given = backbone_kwargs.get("img_size")
    if given is not None and given != input_size and given != [input_size, input_size]:
        raise ValueError(
            f"--model_kwargs sets img_size {given} but --input_size is {input_size}: {model_name} takes one input "
            f"size; drop img_size from --model_kwargs (it follows --input_size) or pass --input_size {given}."
        )
    return {**backbone_kwargs, "img_size": input_size}


def _backbone_fields(model_args: BackboneArguments, data_args: DataArguments) -> dict[str, Any]:
    """The config fields that come from the backbone flags and the input size, the same for every job."""
    return {
        "backbone": model_args.model_name,
        "backbone_kwargs": sized_backbone_kwargs(
            model_args.model_name, backbone_kwargs_of(model_args), data_args.input_size
        ),
        "image_size": data_args.input_size,
        "num_channels": model_args.num_channels,
    }


def _copied(model_args: Any, names: Sequence[str]) -> dict[str, Any]:
    """Config fields that take the value of the model flag of the same name."""
    return {name: getattr(model_args, name) for name in names}


def build_pretrain_config(
    model_args: PretrainModelArguments, data_args: DataArguments, label_names: Sequence[str]
) -> SimLAPConfig:
    """The :class:`SimLAPModel` configuration of ``train_pretrain.py``."""
    model = _copied(
        model_args,
        (
            "out_dim",
            "mlp_dim",
            "gate",
            "pair_mode",
            "temperature",
            "gate_penalty",
            "loss_form",
            "learnable_temperature",
            "alpha",
            "positive_normalization",
            "gumbel_temperature",
            "gumbel_straight_through",
            "stochastic_gate_sigma",
            "stochastic_gate_lambda",
            "projector_norm",
        ),
    )
    return SimLAPConfig(
        **_backbone_fields(model_args, data_args),
        **model,
        detach_head=not model_args.sup_loss,
        **label_mappings(label_names),
    )


def build_scratch_config(
    model_args: FinetuneModelArguments, data_args: DataArguments, label_names: Sequence[str]
) -> SimLAPConfig:
    """The classifier's config when training from scratch (``--from_scratch --model_name NAME``)."""
    dropout = model_args.classifier_dropout
    return SimLAPConfig(
        **_backbone_fields(model_args, data_args), classifier_dropout=dropout, **label_mappings(label_names)
    )


def build_fuse_config(
    model_args: FuseModelArguments, data_args: DataArguments, label_smoothing: float, label_names: Sequence[str]
) -> SimLAPFuseConfig:
    """The :class:`SimLAPFuseForImageClassification` configuration of ``train_fuse.py``; ``label_smoothing`` is what
    its cross-entropy applies to class indices (see ``factories.cross_entropy_smoothing``)."""
    head = _copied(model_args, ("head_dim", "head_hidden_mult", "arc_scale", "iter_num"))
    term = _copied(model_args, ("pair_mode", "temperature", "simlap_weight"))
    return SimLAPFuseConfig(
        **_backbone_fields(model_args, data_args),
        **head,
        **term,
        label_smoothing=label_smoothing,
        **label_mappings(label_names),
    )


def check_finetune_arguments(model_args: FinetuneModelArguments, data_args: DataArguments) -> None:
    """Errors in the fine-tuning model flags, raised before any data is loaded."""
    if model_args.from_scratch:
        if not model_args.model_name:
            raise ValueError("--from_scratch needs --model_name (a timm architecture such as resnet18).")
        check_backbone(build_scratch_config(model_args, data_args, PLACEHOLDER_LABELS))
    elif not model_args.model_name_or_path:
        raise ValueError("Pass --model_name_or_path (a pretrained SimLAP model) or --model_name NAME --from_scratch.")
    else:
        check_model_source(model_args.model_name_or_path)
        pretrained = load_saved_config(model_args.model_name_or_path)
        if pretrained.image_size != data_args.input_size and fixed_input_size(
            pretrained.backbone, pretrained.backbone_kwargs
        ):
            raise ValueError(
                f"--input_size {data_args.input_size} differs from the {pretrained.image_size} pixels "
                f"{model_args.model_name_or_path!r} was trained at, and its {pretrained.backbone} takes one input "
                f"size: pass --input_size {pretrained.image_size}."
            )


def finetune_num_channels(model_args: FinetuneModelArguments) -> int:
    """Input channels of the fine-tuned model: ``--num_channels`` for a new model, else the pretrained model's."""
    if model_args.from_scratch or not model_args.model_name_or_path:
        return model_args.num_channels
    return load_saved_config(model_args.model_name_or_path).num_channels


def build_finetune_model(
    model_args: FinetuneModelArguments, data_args: DataArguments, label_names: Sequence[str]
) -> SimLAPForImageClassification:
    """A SimLAPForImageClassification for the data's classes: from a pretrained checkpoint (backbone taken over,
    new head) or from scratch."""
    labels = label_mappings(label_names)
    if model_args.from_scratch:
        return SimLAPForImageClassification(build_scratch_config(model_args, data_args, label_names))
    pretrained = load_saved_config(model_args.model_name_or_path)
    if model_args.model_name and model_args.model_name != pretrained.backbone:
        raise ValueError(
            f"--model_name {model_args.model_name!r} differs from the backbone of {model_args.model_name_or_path!r} "
            f"({pretrained.backbone!r}). Drop --model_name to fine-tune the checkpoint's backbone."
        )
    # The classifier's input size is this run's (the processor, card and exports take it from the config).
    return SimLAPForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        image_size=data_args.input_size,
        classifier_dropout=model_args.classifier_dropout,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **labels,
    )
