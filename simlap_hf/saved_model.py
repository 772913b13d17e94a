"""Loading a saved SimLAP model: one reader of a model folder (or Hub id) for every command and library function.

A folder written by ``train_pretrain.py`` holds a :class:`~simlap_hf.SimLAPModel`, one written by
``train_finetune.py`` a :class:`~simlap_hf.SimLAPForImageClassification`, one written by ``train_fuse.py`` a
:class:`~simlap_hf.SimLAPFuseForImageClassification`; the ``model_type`` and ``architectures`` of its ``config.json``
say which. A folder or Hub id that cannot be read, or that holds another kind of model, is a
:class:`~simlap_hf.errors.UsageError` naming the flag it was given with.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import PretrainedConfig

from .configuration_simlap import SimLAPConfig, SimLAPFuseConfig
from .errors import UsageError
from .modeling_simlap import (
    SimLAPForImageClassification,
    SimLAPFuseForImageClassification,
    SimLAPModel,
    SimLAPPreTrainedModel,
)

#: The configuration class of each SimLAP ``model_type``.
CONFIG_CLASSES: dict[str, type[SimLAPConfig]] = {
    SimLAPConfig.model_type: SimLAPConfig,
    SimLAPFuseConfig.model_type: SimLAPFuseConfig,
}
DEFAULT_FLAG = "--model_name_or_path"


def _reason(error: BaseException) -> str:
    return " ".join(str(error).split()).rstrip(".") or type(error).__name__


def looks_like_a_folder(name_or_path: str) -> bool:
    """Whether ``name_or_path`` can only be a local folder, not a Hub id: it exists, is absolute, starts with ``.``
    or ``~``, or has more than two parts."""
    if os.path.exists(name_or_path) or name_or_path.startswith((".", "~", os.sep)):
        return True
    return len(Path(name_or_path).parts) > 2


def load_saved_config(name_or_path: str | os.PathLike, flag: str = DEFAULT_FLAG) -> SimLAPConfig:
    """The configuration (:class:`SimLAPConfig` or :class:`SimLAPFuseConfig`) of the saved model ``name_or_path``
    (a folder or a Hub id) given with ``flag``. A UsageError when its config.json cannot be read, the Hub id cannot
    be reached, or it is not a SimLAP model."""
    source = os.fspath(name_or_path)
    if looks_like_a_folder(source) and not os.path.isdir(os.path.expanduser(source)):
        raise FileNotFoundError(
            f"{flag} {source!r} is not a folder; pass a model folder saved by train_pretrain.py, train_finetune.py or "
            "train_fuse.py, or a Hub id (namespace/name)."
        )
    try:
        values, _ = PretrainedConfig.get_config_dict(os.path.expanduser(source))
    except (OSError, ValueError) as error:  # unreadable config.json, no such id, offline and not cached
        raise UsageError(
            f"{flag} {source!r}: its SimLAP config could not be read ({_reason(error)}). Pass a model folder saved by "
            "train_pretrain.py, train_finetune.py or train_fuse.py (with its config.json), or a Hub id that exists "
            "and, offline, is in the cache."
        ) from error
    model_type = values.get("model_type")
    if model_type not in CONFIG_CLASSES:
        raise UsageError(
            f"{flag} {source!r} holds a model of type {model_type!r}, not a SimLAP model; pass a folder written by "
            "train_pretrain.py, train_finetune.py or train_fuse.py."
        )
    try:
        return CONFIG_CLASSES[model_type].from_pretrained(source)
    except (OSError, ValueError) as error:  # a field the configuration rejects
        raise UsageError(f"{flag} {source!r}: its SimLAP config is not valid ({_reason(error)}).") from error


def saved_model_class(config: SimLAPConfig) -> type[SimLAPPreTrainedModel]:
    """The class of a saved model with configuration ``config``: SimLAP-Fuse for its config class, else the
    SimLAPModel when ``architectures`` names it, else the classifier."""
    if isinstance(config, SimLAPFuseConfig):
        return SimLAPFuseForImageClassification
    if SimLAPModel.__name__ in (getattr(config, "architectures", None) or []):
        return SimLAPModel
    return SimLAPForImageClassification


def load_saved_model(
    name_or_path: str | os.PathLike,
    flag: str = DEFAULT_FLAG,
    device: torch.device | str | None = None,
    config: SimLAPConfig | None = None,
) -> SimLAPPreTrainedModel:
    """Load any saved SimLAP model (pretrained, fine-tuned or Fuse) in eval mode, on ``device`` when given.

    ``config``: the model's configuration when already read with :func:`load_saved_config`."""
    source = os.fspath(name_or_path)
    config = config if config is not None else load_saved_config(source, flag)
    model = saved_model_class(config).from_pretrained(os.path.expanduser(source), config=config)
    if device is not None:
        model = model.to(device)
    return model.eval()
