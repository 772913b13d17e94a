"""How the training scripts' flags are shown: grouped by concern in ``--help``, with descriptive names for the short
ones (the short names stay valid, on the command line and in YAML files).

The argument dataclasses say what a flag means; this module only says where ``--help`` lists it. Every flag of the
three scripts has a group (``tests/test_flags.py`` checks it), so a new flag must be added here.
"""

from __future__ import annotations

import copy
import dataclasses
import types
from collections.abc import Iterable, Mapping

from transformers import HfArgumentParser

MODEL_GROUP = "model"
# Group titles in the order --help lists them, and the flags of each. The fields of the model dataclasses
# (PretrainModelArguments, FinetuneModelArguments, FuseModelArguments) go to MODEL_GROUP unless listed elsewhere.
FLAG_GROUPS: dict[str, tuple[str, ...]] = {
    MODEL_GROUP: ("analyze",),
    "data": (
        "dataset_name",
        "dataset_config_name",
        "train_dir",
        "validation_dir",
        "image_column_name",
        "label_column_name",
        "train_val_split",
        "max_train_samples",
        "max_eval_samples",
        "skip_corrupt_images",
        "streaming",
        "train_files",
        "validation_files",
        "shuffle_buffer_size",
        "streaming_num_examples",
        "streaming_train_eval_examples",
        "sampler",
        "pk_images_per_class",
    ),
    "augmentation and preprocessing": (
        "input_size",
        "scale",
        "ratio",
        "hflip",
        "aa",
        "color_jitter",
        "reprob",
        "interpolation",
        "crop_pct",
        "mean",
        "std",
        "ra",
        "mixup",
        "cutmix",
        "mixup_prob",
        "mixup_switch_prob",
        "mixup_mode",
        "smoothing",
    ),
    "optimisation": (
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "opt",
        "momentum",
        "opt_eps",
        "opt_betas",
        "layer_decay",
        "sched",
        "warmup_epochs",
        "warmup_lr",
        "min_lr",
        "clip_grad",
        "model_ema_decay",
        "seed",
    ),
    "evaluation": ("eval_every", "per_device_eval_batch_size", "knn_k", "knn_temperature"),
    "output and checkpoints": (
        "output_dir",
        "overwrite_output_dir",
        "checkpointing_epochs",
        "save_total_limit",
        "save_on_each_node",
        "resume_from_checkpoint",
        "export_timm",
    ),
    "logging": ("logging_steps", "with_tracking", "report_to", "debug"),
    "speed and devices": (
        "mixed_precision",
        "channels_last",
        "tf32",
        "cudnn_benchmark",
        "torch_compile",
        "torch_compile_backend",
        "torch_compile_mode",
        "sync_bn",
        "dataloader_num_workers",
        "uint8_transfer",
    ),
    "Hub": ("push_to_hub", "hub_model_id", "hub_token", "hub_private_repo", "push_checkpoints"),
}
# Descriptive names of the short flags inherited from timm's scripts: flag -> its longer name. Both are accepted.
FLAG_ALIASES: dict[str, str] = {
    "aa": "auto_augment",
    "ra": "repeated_augmentations",
    "reprob": "random_erasing_prob",
    "opt": "optimizer",
    "sched": "lr_scheduler",
    "smoothing": "label_smoothing",
    "iter_num": "pair_draws",
    "sup_loss": "backbone_learns_from_head",
}
_GROUP_OF = {name: group for group, names in FLAG_GROUPS.items() for name in names}


def flag_group(field_name: str, dataclass_type: type) -> str | None:
    """The ``--help`` group of a dataclass field: its listed group, else the model group for a model dataclass's
    field, else None (a flag nobody placed)."""
    if field_name in _GROUP_OF:
        return _GROUP_OF[field_name]
    if dataclass_type.__name__.endswith("ModelArguments"):
        return MODEL_GROUP
    return None


def field_names(dataclass_types: Iterable[type]) -> list[str]:
    """Every flag name (dataclass field) of ``dataclass_types``."""
    return [field.name for dtype in dataclass_types for field in dataclasses.fields(dtype) if field.init]


def resolve_aliases(values: Mapping[str, object], source: str) -> dict[str, object]:
    """``values`` (a YAML file's ``option: value`` mapping) with descriptive names replaced by the flags' own names;
    a flag given under both names is an error naming ``source``."""
    resolved: dict[str, object] = {}
    canonical = {alias: name for name, alias in FLAG_ALIASES.items()}
    for key, value in values.items():
        name = canonical.get(key, key)
        if name in resolved:
            raise ValueError(f"{source} sets {name!r} twice (as {name!r} and as {FLAG_ALIASES[name]!r}); keep one.")
        resolved[name] = value
    return resolved


class GroupedArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` whose ``--help`` lists the flags by concern (:data:`FLAG_GROUPS`) and which also accepts
    the descriptive names of :data:`FLAG_ALIASES`."""

    def __init__(self, dataclass_types: Iterable[type], **kwargs) -> None:
        self._groups: dict[str, object] = {}
        self._current_type: type | None = None
        kwargs.setdefault("usage", "%(prog)s [CONFIG.yaml] [--flag value ...]")
        super().__init__(list(dataclass_types), **kwargs)

    def _add_dataclass_arguments(self, dtype: type) -> None:
        self._current_type = dtype
        super()._add_dataclass_arguments(dtype)

    def _parse_dataclass_field(self, parser, field: dataclasses.Field) -> None:  # noqa: D102 - see the class
        if not self._groups:  # created in the order --help lists them; argparse leaves empty ones out
            for title in (*FLAG_GROUPS, "other"):
                self._groups[title] = self.add_argument_group(f"{title} options")
        if field.name in FLAG_ALIASES:
            field = copy.copy(field)
            field.metadata = types.MappingProxyType({**field.metadata, "aliases": [f"--{FLAG_ALIASES[field.name]}"]})
        title = flag_group(field.name, self._current_type) or "other"
        HfArgumentParser._parse_dataclass_field(self._groups[title], field)
