"""What the analysis command compares: models (local model folders of SimLAP, any transformers vision model or timm
``save_for_hf``; timm architectures with local weights or a random initialisation; nothing is ever downloaded) and
the evaluation loaders of a data set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import AutoConfig, AutoModel

from ..configuration_simlap import check_timm_model_name, gate_has_filter
from ..data import create_eval_dataloader, get_label_names, load_image_dataset, with_image_transforms
from ..modeling_simlap import SimLAPModel
from ..saved_model import CONFIG_CLASSES, load_saved_model
from ..utils import find_weights_file

#: Weights files looked for, in this order, in a folder given as timm weights.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pth", "pytorch_model.pth", "checkpoint.pth")


@dataclass
class LoadedModel:
    """A model ready for analysis and what the report says about it."""

    model: nn.Module
    name: str
    source: str
    kind: str
    num_channels: int = 3
    image_size: int | None = None


def _weights_file(location: Path) -> Path:
    """``location`` itself when it is a file, else the first of :data:`WEIGHT_FILES` inside it."""
    if location.is_file():
        return location
    found = find_weights_file(location, WEIGHT_FILES)
    if found is None:
        raise FileNotFoundError(f"No weights file ({', '.join(WEIGHT_FILES)}) in {str(location)!r}.")
    return Path(found)


def load_timm_model(spec: str, kwargs: dict[str, Any] | None = None) -> LoadedModel:
    """``NAME`` (random initialisation) or ``NAME=WEIGHTS`` (a local weights file or folder) -> a timm feature model
    (``num_classes=0``). The classifier weights of the file are dropped; nothing is downloaded."""
    import timm

    name, _, weights = spec.partition("=")
    name = name.strip()
    check_timm_model_name(name, field="timm_model")
    kwargs = dict(kwargs or {})
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if weights:
        from timm.models import load_state_dict

        path = _weights_file(Path(weights).expanduser())
        state = load_state_dict(str(path))
        own = model.state_dict()
        classifier = model.pretrained_cfg.get("classifier") or ""
        classifiers = classifier if isinstance(classifier, (list, tuple)) else (classifier,)
        for key in list(state):
            if key not in own and any(c and (key == c or key.startswith(c + ".")) for c in classifiers):
                del state[key]
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"The weights {str(path)!r} do not fit timm model {name!r}: missing {list(missing)[:5]}, unexpected "
                f"{list(unexpected)[:5]}."
            )
        label = f"{name} (timm, local weights)"
    else:
        label = f"{name} (timm, random init)"
    return LoadedModel(model, label, spec, "timm", int(kwargs.get("in_chans", 3)))


def load_pretrained_model(path: str) -> LoadedModel:
    """Load a local model folder: a SimLAP model (its ``architectures`` entry picks the class), any transformers model
    (``AutoModel``: the base model, whose output has ``pooler_output``), or a timm ``save_for_hf`` folder."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"--model_name_or_path {path!r} is not a local model folder with a config.json (nothing is downloaded; "
            f"for a timm architecture use --timm_model)."
        )
    raw = json.loads((folder / "config.json").read_text())
    base = folder.resolve().name
    if "model_type" not in raw and "architecture" in raw:  # timm save_for_hf folder
        kwargs = {k: v for k, v in (raw.get("model_args") or {}).items() if k != "num_classes"}
        loaded = load_timm_model(f"{raw['architecture']}={folder}", kwargs)
        loaded.name, loaded.source = f"{base} (timm {raw['architecture']})", str(path)
        return loaded
    if raw.get("model_type") in CONFIG_CLASSES:
        model = load_saved_model(folder)
        config = model.config
    else:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        model = AutoModel.from_pretrained(folder, local_files_only=True)
    kind = type(model).__name__
    if isinstance(model, SimLAPModel):
        gate = model.config.gate
        name = f"{base} (SimLAP, {gate} gate)" if gate_has_filter(gate) else f"{base} (SupCon: {gate} gate)"
    else:
        name = f"{base} ({kind})"
    return LoadedModel(
        model, name, str(path), kind, int(getattr(config, "num_channels", 3) or 3), getattr(config, "image_size", None)
    )


class EvalData:
    """The train (eval transform) and validation loaders of one data set, built per number of input channels."""

    def __init__(self, data_args: Any, batch_size: int, seed: int, description: str) -> None:
        self.args = data_args
        self.batch_size = batch_size
        self.description = description
        self.dataset = load_image_dataset(data_args, seed=seed)
        self.label_names = [str(name) for name in get_label_names(self.dataset)]
        self._loaders: dict[int, tuple[Any, Any]] = {}

    def loaders(self, num_channels: int) -> tuple[Any, Any]:
        """``(train_eval_loader, validation_loader)`` for models with ``num_channels`` input channels."""
        if num_channels not in self._loaders:
            from datasets import DatasetDict  # the optional data sets library, only needed for evaluation data

            # No augmented split: both views get the evaluation transform.
            views = with_image_transforms(
                DatasetDict(train_eval=self.dataset["train"], validation=self.dataset["validation"]),
                self.args,
                num_channels,
            )
            workers = self.args.loader_workers()
            self._loaders[num_channels] = (
                create_eval_dataloader(views["train_eval"], self.batch_size, workers),
                create_eval_dataloader(views["validation"], self.batch_size, workers),
            )
        return self._loaders[num_channels]

    def summary(self) -> dict[str, Any]:
        """The data set's entry of the report: name, classes, split sizes, input size."""
        return {
            "name": self.description,
            "num_classes": len(self.label_names),
            "label_names": self.label_names,
            "num_train": len(self.dataset["train"]),
            "num_validation": len(self.dataset["validation"]),
            "input_size": self.args.input_size,
        }


def describe_data(args: Any) -> str:
    """Name of a data set in the report: its Hub / named data set, or the image folder's name."""
    if args.train_dir:
        return f"imagefolder {Path(args.train_dir).name}"
    return str(args.dataset_name)
