"""The timm backbone of a run: its ``timm.create_model`` options from the scripts' flags, and the early checks of the
model flags (before any data is read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..modeling_simlap import create_backbone

# The CIFAR setting of a timm ResNet in the paper's code, applied to ResNets when --stem_type / --output_stride are
# unset.
RESNET_DEFAULTS = {"stem_type": "deep", "output_stride": 8}
RESNET_STEM_HELP = (
    "timm ResNet stem ('', 'deep', 'deep_tiered'); unset: 'deep' for timm ResNets (the paper's "
    "CIFAR setting), nothing for other backbones; '' keeps timm's default."
)
RESNET_OUTPUT_STRIDE_HELP = (
    "timm output stride (8 suits 32x32 inputs); unset: 8 for timm ResNets, nothing for other "
    "backbones; 0 keeps timm's default."
)


def is_timm_resnet(model_name: str) -> bool:
    """Whether ``model_name`` is a timm architecture of the ResNet family (``timm.models.resnet``: resnet18,
    resnet10t, resnet50d, ...), which takes ``stem_type`` and ``output_stride``."""
    import timm.models

    return timm.is_model(model_name) and timm.models.is_model_in_modules(model_name, ["resnet"])


def timm_backbone_kwargs(
    model_name: str, stem_type: str | None, output_stride: int | None, model_kwargs: str | None
) -> dict[str, Any]:
    """``timm.create_model`` keyword arguments from the scripts' ``--stem_type``, ``--output_stride`` and
    ``--model_kwargs`` (a JSON object) flags.

    Unset (None) ``stem_type`` / ``output_stride`` mean: the ``deep`` stem and output stride 8 for a timm ResNet
    (:data:`RESNET_DEFAULTS`), nothing for other architectures. An empty stem or 0 keeps timm's default; any other
    value is passed to timm as given."""
    try:
        kwargs: Any = json.loads(model_kwargs) if model_kwargs else {}
    except ValueError as error:
        raise ValueError(f"--model_kwargs={model_kwargs!r} is not valid JSON ({error}).") from None
    if not isinstance(kwargs, dict):
        raise ValueError(
            f"--model_kwargs={model_kwargs!r} must be a JSON object such as '{{\"drop_path_rate\": 0.1}}'."
        )
    resnet = is_timm_resnet(model_name)
    for name, value in (("stem_type", stem_type), ("output_stride", output_stride)):
        if value is None:
            value = RESNET_DEFAULTS[name] if resnet else None
        if value:
            kwargs[name] = value
    return kwargs


def backbone_kwargs_of(model_args: Any) -> dict[str, Any]:
    """:func:`timm_backbone_kwargs` of a script's model arguments (a :class:`BackboneArguments`)."""
    return timm_backbone_kwargs(
        model_args.model_name, model_args.stem_type, model_args.output_stride, model_args.model_kwargs
    )


# The stems timm's ResNet builds (timm.models.resnet.ResNet's stem_type); it takes any string and builds the plain stem
# for one it does not know, so a typo would pass silently.
TIMM_RESNET_STEMS = ("", "deep", "deep_tiered")


def check_backbone(config: Any) -> None:
    """Build the config's backbone on the meta device (no memory, no weights) and pass it one batch of the configured
    input size, so that an architecture that rejects its options (``--stem_type`` on a ViT, an unknown stem, a ViT
    built for another input size) fails before any data is loaded."""

    stem = config.timm_kwargs().get("stem_type")
    if stem is not None and is_timm_resnet(config.backbone) and stem not in TIMM_RESNET_STEMS:
        raise UsageError(
            f"--stem_type={stem!r} is not a stem timm's ResNet builds; choose one of "
            f"{', '.join(repr(name) for name in TIMM_RESNET_STEMS)}."
        )
    size = int(config.image_size)
    with torch.device("meta"):
        backbone = create_backbone(config)
        try:
            backbone(torch.empty(1, config.num_channels, size, size))
        except AssertionError as error:  # timm's input-size checks (the patch embedding of a ViT, ...)
            raise UsageError(
                f"--model_name {config.backbone!r} does not take {size}x{size} inputs (--input_size {size}): {error} "
                f"Build it for this size with --model_kwargs '{{\"img_size\": {size}}}', or pass the --input_size "
                "it was made for."
            ) from None
        except Exception:  # noqa: BLE001 - an operation without a meta kernel says nothing about the input size
            pass


def check_model_source(name_or_path: str, flag: str = "--model_name_or_path") -> None:
    """Fail early, with the right message, on a local model folder that does not exist (instead of a Hub error):
    a path that exists must be a folder with ``config.json``; a name that is not a Hub id ('org/name'), or whose
    first part is an existing local folder, is taken for a mistyped local path."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise ValueError(
                f"{flag} {name_or_path!r} is not a saved model folder (no config.json in it); pass the output_dir of "
                "train_pretrain.py / train_finetune.py / train_fuse.py, or a Hub id."
            )
        return
    parts = Path(name_or_path).parts
    hub_like = len(parts) == 2 and not name_or_path.startswith((".", "/", "~")) and "\\" not in name_or_path
    if not hub_like or Path(parts[0]).is_dir():
        parent = next((str(Path(*parts[:i])) for i in range(len(parts) - 1, 0, -1) if Path(*parts[:i]).is_dir()), None)
        where = (
            f" ({parent!r} exists and holds: {sorted(p.name for p in Path(parent).iterdir())[:10]})" if parent else ""
        )
        raise FileNotFoundError(
            f"{flag} {name_or_path!r}: this folder does not exist{where}. Check the path (the output_dir of the run "
            "you want to load)."
        )
