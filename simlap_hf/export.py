"""Export a SimLAP model as a plain timm model folder (``--format timm``) or as ONNX (``--format onnx``).

timm: the folder (``config.json`` in timm's format, ``model.safetensors`` with timm's own parameter names,
``README.md``) loads without SimLAP-HF and without remote code:

    timm.create_model("local-dir:OUT_DIR", pretrained=True)
    transformers.AutoModelForImageClassification.from_pretrained("OUT_DIR")  # TimmWrapperForImageClassification
    transformers.pipeline("image-classification", model="OUT_DIR")

and ``timm.create_model("hf-hub:USER/NAME", pretrained=True)`` once the folder is uploaded. Its ``pretrained_cfg``
holds the real preprocessing (input size, resize/crop ratio, interpolation, mean and std) rather than timm's
ImageNet defaults: by default read from the ``preprocessor_config.json`` saved with the model, which holds what
``simlap_hf.data.resolve_preprocessing`` decided for the training run; explicit values and the defaults go through
the same rules (:func:`export_preprocessing`).

Command line::

    python -m simlap_hf.export MODEL_DIR OUT_DIR [--mean M M M --std S S S --crop_pct 0.875 --interpolation bicubic]
    python -m simlap_hf.export --format onnx MODEL_DIR OUT_DIR [--task feature-extraction] [--quantize]

A :class:`~simlap_hf.SimLAPForImageClassification` exports its backbone and ``classifier``; a
:class:`~simlap_hf.SimLAPModel` (pretraining) its backbone and online linear head. SimLAP-Fuse classifies with a
cosine margin head that timm models do not have, so it cannot be exported this way.

ONNX (:func:`export_onnx`, through ``torch.onnx.export``): ``model.onnx`` takes ``pixel_values`` (B, C, S, S) with a
dynamic batch axis and returns ``logits`` (B, num_labels) for a classifier (fine-tuned or Fuse) or ``pooler_output``
(B, D), the pooled backbone features, for a pretrained model (or any model with ``--task feature-extraction``). The
folder also holds the model's ``config.json`` (labels, input size), its image processor (``preprocessor_config.json``
and ``image_processing_simlap.py``, which ``AutoImageProcessor`` loads with ``trust_remote_code=True``) and, with
``--quantize``, ``model.int8.onnx`` (onnxruntime's dynamic INT8 quantisation, for CPU serving). Each export is
checked with onnxruntime against the PyTorch model.

Note: timm 1.0.31's ``save_for_hf`` writes ``num_classes`` into ``model_args``, which makes transformers' TimmWrapper
fail with "got multiple values for keyword argument 'num_classes'"; the configuration is therefore written here.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import save_file
from torch import nn

from .configuration_simlap import SimLAPFuseConfig
from .data.arguments import DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION
from .data.preprocessing import PREPROCESSOR_FILE, Preprocessing, channel_stats, preprocessing_from_processor
from .errors import raise_usage_error, run_command
from .image_processing_simlap import SimLAPImageProcessor
from .saved_model import load_saved_config, load_saved_model, saved_model_class

logger = logging.getLogger("simlap_hf")

# Fields of the architecture's default pretrained_cfg that describe the network (kept); the rest (URLs, ImageNet
# preprocessing, licence of the ImageNet weights, test sizes) describes other weights and is dropped.
_KEPT_CFG_FIELDS = ("first_conv", "fixed_input_size")


def _classifier_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear, Any]:
    """(backbone, linear head, config) of a SimLAP model, or a ValueError saying what can be exported."""
    config = getattr(model, "config", None)
    backbone = getattr(model, "backbone", None)
    if config is None or backbone is None:
        raise ValueError(
            f"export_timm needs a SimLAP model (SimLAPForImageClassification); got {type(model).__name__}."
        )
    if getattr(config, "model_type", None) == "simlap_fuse" or hasattr(model, "margin_head"):
        raise ValueError(
            "SimLAP-Fuse models classify with a cosine margin head, which has no timm equivalent: export a "
            "SimLAPForImageClassification (fine-tuned) or a SimLAPModel (its online linear head) instead."
        )
    head = getattr(model, "classifier", None)
    if head is None:
        head = getattr(model, "online_head", None)
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__} has no linear classifier to export.")
    return backbone, head, config


def export_preprocessing(
    config: Any,
    source_dir: str | os.PathLike | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
) -> Preprocessing:
    """Preprocessing of the exported model: explicit arguments first, then ``source_dir``'s
    ``preprocessor_config.json``, then the training defaults; the input size always comes from ``config``
    (``num_channels``, ``image_size``), and mean and std are adapted to its channels by the data pipeline's rule."""
    found = preprocessing_from_processor(source_dir) if source_dir is not None else None
    found = found or {}
    if found.get("img_size") and found["img_size"] != config.image_size:
        logger.warning(
            "%s crops %s pixels but the model was trained at image_size=%s; exporting input size %s.",
            PREPROCESSOR_FILE,
            found["img_size"],
            config.image_size,
            config.image_size,
        )
    mean = mean if mean is not None else found.get("mean")
    std = std if std is not None else found.get("std")
    if mean is None or std is None:
        raise ValueError(
            "The exported timm model needs the normalisation the SimLAP model was trained with: pass mean= and std= "
            f"(--mean/--std), or source_dir= a folder holding the {PREPROCESSOR_FILE} saved by the training script."
        )
    return Preprocessing(
        input_size=config.image_size,
        crop_pct=float(crop_pct if crop_pct is not None else found.get("crop_pct", DEFAULT_CROP_PCT)),
        interpolation=interpolation or found.get("interpolation") or DEFAULT_INTERPOLATION,
        mean=channel_stats(mean, config.num_channels, "mean"),
        std=channel_stats(std, config.num_channels, "std"),
        num_channels=config.num_channels,
    )


def build_timm_classifier(model: nn.Module) -> tuple[nn.Module, str]:
    """A timm model of the SimLAP backbone's architecture with a C-class head, holding the SimLAP backbone and
    classifier weights. Returns the timm model (eval mode) and the name of its classifier module."""
    backbone, head, config = _classifier_parts(model)
    net = timm.create_model(config.backbone, pretrained=False, num_classes=head.out_features, **config.timm_kwargs())
    timm_head = net.get_classifier()
    head_name = next((name for name, module in net.named_modules() if module is timm_head), None)
    if not isinstance(timm_head, nn.Linear) or head_name is None:
        raise ValueError(
            f"timm's {config.backbone!r} has a {type(timm_head).__name__} classifier, not a Linear layer: its head "
            "cannot hold the SimLAP linear classifier."
        )
    if timm_head.in_features != head.in_features or (timm_head.bias is None) != (head.bias is None):
        raise ValueError(
            f"timm's {config.backbone!r} classifier takes {timm_head.in_features} features but the SimLAP classifier "
            f"takes {head.in_features}."
        )
    head_keys = {f"{head_name}.{name}" for name, _ in timm_head.named_parameters()}
    missing, unexpected = net.load_state_dict(backbone.state_dict(), strict=False)
    if set(missing) != head_keys or unexpected:
        raise ValueError(
            f"The SimLAP backbone does not map onto timm's {config.backbone!r} with a classifier: missing "
            f"{sorted(set(missing) - head_keys)}, unexpected {sorted(unexpected)}."
        )
    with torch.no_grad():
        timm_head.weight.copy_(head.weight)
        if head.bias is not None:
            timm_head.bias.copy_(head.bias)
    return net.eval(), head_name


def _timm_config(
    net: nn.Module, config: Any, head_name: str, preprocessing: dict[str, Any], model_args: dict[str, Any]
) -> dict[str, Any]:
    default_cfg = dict(getattr(net, "pretrained_cfg", {}) or {})
    pretrained_cfg: dict[str, Any] = {key: default_cfg[key] for key in _KEPT_CFG_FIELDS if key in default_cfg}
    pretrained_cfg.update(preprocessing)
    pretrained_cfg.update(
        architecture=config.backbone,
        tag="simlap",
        custom_load=False,
        num_classes=net.num_classes,
        classifier=head_name,
        pool_size=None,
    )
    label_names = [str(config.id2label[i]) for i in range(net.num_classes)]
    return {
        "architecture": config.backbone,
        "num_classes": net.num_classes,
        "num_features": net.num_features,
        "global_pool": getattr(getattr(net, "global_pool", None), "pool_type", None) or "avg",
        "label_names": label_names,
        # timm reconstruction arguments; never num_classes (TimmWrapper passes it itself).
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def _export_card(config: Any, out_dir: Path, preprocessing: dict[str, Any], repo: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    where = repo or str(out_dir)
    card_data = ModelCardData(
        library_name="timm",
        license="apache-2.0",
        tags=["simlap", "contrastive-learning", "image-classification", config.backbone, "timm"],
        pipeline_tag="image-classification",
    )
    size = config.image_size
    body = f"""# {Path(where).name}

A `{config.backbone}` image classifier ({config.num_labels} classes) trained with SimLAP-HF
([Rethinking positive pairs in contrastive learning](https://arxiv.org/abs/2410.18200)), exported as a plain timm
model: no SimLAP code is needed to use it.

Preprocessing: {size} x {size} input, resize by crop_pct {preprocessing["crop_pct"]} then centre crop,
{preprocessing["interpolation"]} interpolation, mean {preprocessing["mean"]}, std {preprocessing["std"]}.

## How to use

```python
import timm
import torch

model = timm.create_model("{"hf-hub:" + repo if repo else "local-dir:" + str(out_dir)}", pretrained=True).eval()
data_config = timm.data.resolve_data_config(model=model)
transform = timm.data.create_transform(**data_config)  # PIL image -> normalised tensor
with torch.no_grad():
    logits = model(torch.randn(1, *data_config["input_size"]))
```

or with transformers:

```python
from transformers import pipeline

classifier = pipeline("image-classification", model="{where}")
```
"""
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}").content


def export_timm(
    model: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    repo_id: str | None = None,
    check: bool = True,
) -> Path:
    """Write ``model``'s backbone and linear classifier as a timm model folder (see the module docstring).

    Args:
        model: a SimLAPForImageClassification or SimLAPModel, or the folder it was saved to.
        output_dir: the folder to write (created; files of the same names are replaced).
        source_dir: a folder holding the ``preprocessor_config.json`` saved with the model (default: ``model``
            when it is a folder), read for mean, std, crop_pct and interpolation.
        mean, std, crop_pct, interpolation: explicit preprocessing (override ``source_dir``'s).
        repo_id: Hub id the folder will be uploaded to (used in the card's snippet).
        check: compare the exported model's logits with the SimLAP model's on a random batch.

    Returns:
        ``output_dir`` as a Path.
    """
    if isinstance(model, (str, os.PathLike)):
        model = local_model_folder(model)
        source_dir = model if source_dir is None else source_dir
        model = load_simlap_classifier(model)
    model = model.eval()
    backbone, head, config = _classifier_parts(model)
    preprocessing = export_preprocessing(config, source_dir, mean, std, crop_pct, interpolation).timm_config()
    model_args = dict(config.timm_kwargs())
    model_args.pop("num_classes", None)
    try:
        json.dumps(model_args)
    except (TypeError, ValueError) as error:
        raise ValueError(f"backbone_kwargs {model_args} are not JSON-serialisable: {error}") from error
    net, head_name = build_timm_classifier(model)
    if check:
        probe = torch.randn(2, *preprocessing["input_size"], generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            expected = head(backbone(probe.to(head.weight.device))).float().cpu()
            got = net(probe).float()
        error = (expected - got).abs().max().item()
        if not error <= 1e-4 * max(1.0, expected.abs().max().item()):
            raise RuntimeError(f"The exported timm model's logits differ from the SimLAP model's by {error:.3g}.")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    timm_config = _timm_config(net, config, head_name, preprocessing, model_args)
    (out / "config.json").write_text(json.dumps(timm_config, indent=2) + "\n")
    (out / "README.md").write_text(_export_card(config, out, preprocessing, repo_id))
    logger.info("Exported a timm %s classifier to %s", config.backbone, out)
    return out


def local_model_folder(name_or_path: str | os.PathLike) -> Path:
    """A local model folder: ``name_or_path`` itself when it exists, else the download of the Hub repository of
    that id (``huggingface_hub.snapshot_download``)."""
    path = Path(name_or_path).expanduser()
    if path.exists() or len(path.parts) != 2 or str(name_or_path).startswith((".", "/", "~")):
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(name_or_path), allow_patterns=["*.json", "*.safetensors", "*.py"]))


def load_simlap_classifier(model_dir: str | os.PathLike) -> nn.Module:
    """Load a saved SimLAPForImageClassification (or SimLAPModel, for its online head) from ``model_dir``."""
    config = load_saved_config(model_dir, flag="model_dir")
    if isinstance(config, SimLAPFuseConfig):
        raise ValueError(
            "SimLAP-Fuse models classify with a cosine margin head, which has no timm equivalent: export a "
            "SimLAPForImageClassification (fine-tuned) or a SimLAPModel (its online linear head) instead."
        )
    return load_saved_model(model_dir, config=config)


ONNX_TASKS = ("auto", "image-classification", "feature-extraction")
ONNX_FILE = "model.onnx"
QUANTIZED_ONNX_FILE = "model.int8.onnx"


class OnnxGraph(nn.Module):
    """The exported computation: (B, C, S, S) ``pixel_values`` -> (B, num_labels) logits or (B, D) pooled
    features."""

    def __init__(self, model: nn.Module, features: bool) -> None:
        super().__init__()
        self.model = model
        self.features = features

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.features:
            return self.model.get_image_features(pixel_values)
        return self.model(pixel_values=pixel_values).logits


def _onnx_task(model_class: type, task: str) -> str:
    """``task`` resolved: 'auto' is feature extraction for a pretrained SimLAPModel, classification otherwise."""
    if task not in ONNX_TASKS:
        raise ValueError(f"--task {task!r} is not valid; choose one of {', '.join(ONNX_TASKS)}.")
    pretrained = model_class.__name__ == "SimLAPModel"
    if task == "auto":
        return "feature-extraction" if pretrained else "image-classification"
    if task == "image-classification" and pretrained:
        raise ValueError(
            "--task image-classification needs a classifier (a fine-tuned or SimLAP-Fuse folder); a pretrained "
            "SimLAPModel exports its pooled features (--task feature-extraction)."
        )
    return task


def _require_onnx() -> None:
    import importlib.util

    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise ValueError(
            f"ONNX export needs {', '.join(missing)}: pip install 'simlap-hf[onnx]' (onnx, onnxscript, onnxruntime)."
        )


def onnx_max_difference(onnx_file: str | os.PathLike, graph: nn.Module, pixel_values: torch.Tensor) -> float:
    """Largest absolute difference between onnxruntime's outputs of ``onnx_file`` and ``graph``'s on
    ``pixel_values`` (B, C, S, S)."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixel_values": pixel_values.numpy()})[0]
    with torch.no_grad():
        expected = graph(pixel_values).float().numpy()
    return float(abs(got - expected).max())


def export_onnx(
    model: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    task: str = "auto",
    quantize: bool = False,
    opset: int | None = None,
    check: bool = True,
) -> Path:
    """Write ``model`` as ``OUT/model.onnx`` with its config and image processor (see the module docstring).

    Args:
        model: a saved SimLAP model folder (or Hub id), or a loaded SimLAP model (then ``source_dir`` names the folder
            holding its ``preprocessor_config.json``).
        output_dir: the folder to write (created; files of the same names are replaced).
        task: 'image-classification' (logits), 'feature-extraction' (pooled backbone features) or 'auto'.
        quantize: also write ``model.int8.onnx`` (dynamic INT8 weights, for CPU inference).
        opset: ONNX opset (default: the exporter's).
        check: compare onnxruntime's outputs with PyTorch's on a random batch of 3 (tolerance 1e-4).

    Returns:
        ``output_dir`` as a Path.
    """
    _require_onnx()
    # Every check before the weights are loaded.
    if isinstance(model, (str, os.PathLike)):
        model = local_model_folder(model)
        source_dir = model if source_dir is None else source_dir
        config = load_saved_config(model, flag="model_dir")
        model_class = saved_model_class(config)
    else:
        model_class, config = type(model), model.config
    if source_dir is None or not (Path(source_dir) / PREPROCESSOR_FILE).is_file():
        raise FileNotFoundError(
            f"The ONNX export carries the model's image processor: pass a model folder holding {PREPROCESSOR_FILE} "
            "(the training scripts save one)."
        )
    processor = SimLAPImageProcessor.from_pretrained(source_dir)
    if processor.size != config.image_size or processor.num_channels != config.num_channels:
        raise ValueError(
            f"{PREPROCESSOR_FILE} of {str(source_dir)!r} prepares {processor.num_channels} x {processor.size} x "
            f"{processor.size} images but config.json says {config.num_channels} x {config.image_size} x "
            f"{config.image_size}: the folder was not written by one run."
        )
    task = _onnx_task(model_class, task)
    if not isinstance(model, nn.Module):
        model = model_class.from_pretrained(model, config=config)
    model = model.float().eval().cpu()
    graph = OnnxGraph(model, features=task == "feature-extraction").eval()
    output_name = "pooler_output" if task == "feature-extraction" else "logits"
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_file = out / ONNX_FILE
    example = torch.randn(2, config.num_channels, config.image_size, config.image_size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            input_names=["pixel_values"],
            output_names=[output_name],
            dynamic_shapes={"pixel_values": {0: batch}},
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(onnx_file))
    files = [onnx_file]
    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        root = logging.getLogger()
        level = root.level
        root.setLevel(max(level, logging.WARNING))  # the quantizer logs every tensor it leaves alone at INFO
        try:
            quantize_dynamic(str(onnx_file), str(out / QUANTIZED_ONNX_FILE), weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        files.append(out / QUANTIZED_ONNX_FILE)
    if check:
        probe = torch.randn(3, *example.shape[1:], generator=torch.Generator().manual_seed(0))
        error = onnx_max_difference(onnx_file, graph, probe)
        if not error <= 1e-4:
            raise RuntimeError(f"The ONNX model's outputs differ from the PyTorch model's by {error:.3g} (> 1e-4).")
        logger.info("onnxruntime vs PyTorch: max |difference| %.3g on a random batch", error)
    config.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info("Exported %s (%s, output %r) to %s", config.backbone, task, output_name, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: 0 when exported; 1 with ``error: ...`` for an input error (see
    :func:`~simlap_hf.errors.run_command`)."""
    parser = argparse.ArgumentParser(
        prog="python -m simlap_hf.export",
        description="Export a saved SimLAP model: as a timm model folder (--format timm, a classifier or the online "
        "head of a pretrained model) that timm ('local-dir:OUT_DIR') and transformers load without SimLAP-HF, or as "
        "ONNX (--format onnx: logits of a classifier, pooled features of a pretrained model) for onnxruntime.",
    )
    parser.add_argument("model_dir", help="Saved SimLAP model folder (or Hub id).")
    parser.add_argument("out_dir", help="Folder to write the export to.")
    parser.add_argument("--format", choices=("timm", "onnx"), default="timm", help="Export format (default: timm).")
    parser.add_argument("--mean", type=float, nargs="+", help="timm: normalisation mean (default: the processor's).")
    parser.add_argument("--std", type=float, nargs="+", help="timm: normalisation std (default: the processor's).")
    parser.add_argument("--crop_pct", type=float, help="timm: resize to input_size / crop_pct before the centre crop.")
    parser.add_argument("--interpolation", help="timm: resize interpolation (bicubic, bilinear, ...).")
    parser.add_argument("--hub_model_id", help="timm: Hub id the export will be pushed to (for the card's snippet).")
    parser.add_argument(
        "--task",
        choices=ONNX_TASKS,
        default="auto",
        help="onnx: image-classification (logits) or feature-extraction (pooled features); auto: features for a "
        "pretrained model, logits for a classifier.",
    )
    parser.add_argument("--quantize", action="store_true", help="onnx: also write model.int8.onnx (dynamic INT8).")
    parser.add_argument("--opset", type=int, help="onnx: opset version (default: the exporter's).")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of input errors (SIMLAP_DEBUG=1).")
    parser.error = raise_usage_error  # type: ignore[method-assign]

    def export(arguments: list[str]) -> None:
        args = parser.parse_args(arguments)
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if args.format == "onnx":
            out = export_onnx(args.model_dir, args.out_dir, task=args.task, quantize=args.quantize, opset=args.opset)
            print(f"exported: {out / ONNX_FILE}  (onnxruntime.InferenceSession('{out / ONNX_FILE}'))")
            return
        out = export_timm(
            args.model_dir,
            args.out_dir,
            mean=args.mean,
            std=args.std,
            crop_pct=args.crop_pct,
            interpolation=args.interpolation,
            repo_id=args.hub_model_id,
        )
        print(f"exported: {out}  (timm.create_model('local-dir:{out}', pretrained=True))")

    # An error raised by timm, transformers or onnxruntime keeps its traceback (a bug); the package's checks print
    # one line.
    return run_command(export, argv, keep_debug_flag=True)


if __name__ == "__main__":
    sys.exit(main())
