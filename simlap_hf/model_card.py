"""The model card written into every saved model folder by the three training scripts: metadata (tags, data set,
``model-index`` results, pipeline tag, base model), description, results, usage (with SimLAP-HF, without it through the
code saved with the model, and through ONNX; every code block runs as written), preprocessing, class relations,
training hyperparameters and the citation.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .configuration_simlap import GATE_KINDS
from .data import NAMED_DATASETS
from .relations import HEATMAP_FILE, RELATIONS_FILE, ClassRelations

CITATION = """@article{wu2024rethinking,
  title={Rethinking positive pairs in contrastive learning},
  author={Wu, Jiantao and Atito, Sara and Feng, Zhenhua and Mo, Shentong and Kittler, Josef and Awais, Muhammad},
  journal={arXiv preprint arXiv:2410.18200},
  year={2024}
}"""

# Metric names of all_results.json -> (metric type, readable name) for the card's model-index; ``{knn}`` is the
# kNN setting the run recorded (its ``knn_k`` option).
CARD_METRICS = {
    "eval_top1": ("accuracy", "Top-1 accuracy"),
    "eval_top5": ("top_5_accuracy", "Top-5 accuracy"),
    "eval_knn_top1": ("knn_accuracy", "kNN{knn} top-1 accuracy"),
}

TASK_DESCRIPTIONS = {
    "pretrain": (
        "A timm `{backbone}` backbone pretrained on `{dataset}` with SimLAP: contrastive learning from arbitrary "
        "class pairs, where a label-conditioned feature filter selects the embedding dimensions in which the two "
        "classes are pulled together. The model holds the backbone, the projector, the feature filter and an online "
        "linear head (whose accuracy is the top-1 reported below)."
    ),
    "finetune": (
        "An image classifier fine-tuned on `{dataset}`: a timm `{backbone}` backbone pretrained with SimLAP "
        "(contrastive learning from arbitrary class pairs) and a linear head."
    ),
    "fuse": (
        "An image classifier trained on `{dataset}` with SimLAP-Fuse: a timm `{backbone}` backbone and an ArcGrad "
        "margin head, regularised by the SimLAP term (class pairs gated by the signs of the class weights)."
    ),
}

# The card's usage section: three ways to run the model, each a heading with code blocks that run as written. ``{repo}``
# is the Hub id, or the local folder when nothing is pushed; ``{onnx_dir}`` the folder the ONNX export is written to.
USAGE_WITH_PACKAGE = "With SimLAP-HF installed"
USAGE_REMOTE_CODE = "Without SimLAP-HF (the code saved with the model)"
USAGE_ONNX = "ONNX (onnxruntime)"

_IMAGE_LINE = 'image = Image.new("{mode}", ({size}, {size}), {colour})  # or Image.open("your_image.png")'

PACKAGE_SNIPPETS = {
    "pretrain": """import simlap_hf  # noqa: F401  (registers the SimLAP classes with the transformers auto classes)
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel

processor = AutoImageProcessor.from_pretrained("{repo}")
model = AutoModel.from_pretrained("{repo}").eval()
{image_line}
with torch.no_grad():
    out = model(**processor(image))
features = out.pooler_output  # (1, D) pooled backbone features; out.embeddings, out.logits: projection, online head
gates = model.gate(torch.tensor([0]), torch.tensor([1]))  # feature filter of the class pair (0, 1)
print(features.shape, out.embeddings.shape, out.logits.shape, gates.shape)""",
    "classifier": """import simlap_hf  # noqa: F401  (registers the SimLAP classes with the transformers auto classes)
from PIL import Image
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}")
{image_line}
predictions = classifier(image)
print(predictions)""",
}

REMOTE_CODE_SNIPPETS = {
    "pretrain": """from PIL import Image
from transformers import pipeline

extractor = pipeline("image-feature-extraction", model="{repo}", trust_remote_code=True)
{image_line}
features = extractor(image, return_tensors=True)  # (1, D) pooled backbone features
print(features.shape)""",
    "classifier": """from PIL import Image
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)
{image_line}
predictions = classifier(image)
print(predictions)""",
    "classifier_model": """import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True).eval()
{image_line}
with torch.no_grad():
    logits = model(**processor(image)).logits  # (1, {num_labels})
print(model.config.id2label[int(logits.argmax(-1))])""",
}

ONNX_EXPORT_COMMAND = "python -m simlap_hf.export --format onnx {repo} {onnx_dir}"

ONNX_SNIPPETS = {
    "pretrain": """import onnxruntime
from PIL import Image
from transformers import AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("{onnx_dir}", trust_remote_code=True)
session = onnxruntime.InferenceSession("{onnx_dir}/model.onnx")
{image_line}
(features,) = session.run(None, {{"pixel_values": processor(image, return_tensors="np")["pixel_values"]}})
print(features.shape)  # (1, D) pooled backbone features""",
    "classifier": """import json

import onnxruntime
from PIL import Image
from transformers import AutoImageProcessor

processor = AutoImageProcessor.from_pretrained("{onnx_dir}", trust_remote_code=True)
session = onnxruntime.InferenceSession("{onnx_dir}/model.onnx")
id2label = json.loads(open("{onnx_dir}/config.json").read())["id2label"]
{image_line}
(logits,) = session.run(None, {{"pixel_values": processor(image, return_tensors="np")["pixel_values"]}})
print([id2label[str(i)] for i in logits.argmax(-1)])""",
}


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_LISTED_LABELS = 30


def _hub_dataset_id(dataset_name: str | None) -> str | None:
    """The Hub id of a data set for the card metadata, or None (local folders, scikit-learn digits...)."""
    if not dataset_name:
        return None
    spec = NAMED_DATASETS.get(dataset_name.strip().lower().replace("-", "_"))
    if spec is not None:
        return spec.hub_id
    if _REPO_ID.match(dataset_name) and not Path(dataset_name).exists():
        return dataset_name
    return None


def _hub_model_id(name: str | None) -> str | None:
    """``name`` when it looks like a Hub model id rather than a local folder (the card's ``base_model``)."""
    if name and _REPO_ID.match(str(name)) and not Path(name).exists():
        return str(name)
    return None


def _read_preprocessing(output_dir: Path) -> dict[str, Any] | None:
    """The image processor saved next to the model (``preprocessor_config.json``), if any."""
    path = output_dir / "preprocessor_config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def _code(language: str, code: str) -> str:
    return f"```{language}\n{code}\n```"


def usage_section(task: str, config: Any, repo: str) -> str:
    """The card's "How to use": with SimLAP-HF, without it (``trust_remote_code=True``: the code saved with the
    model), and through ONNX. Every code block runs as written on the saved folder (``repo``)."""
    channels, size = config.num_channels, config.image_size
    mode, colour = ("L", "128") if channels == 1 else ("RGB", "(200, 40, 40)")
    onnx_dir = Path(repo).name + "-onnx"
    values = {
        "repo": repo,
        "onnx_dir": onnx_dir,
        "num_labels": config.num_labels,
        "image_line": _IMAGE_LINE.format(mode=mode, size=size, colour=colour),
    }
    kind = "pretrain" if task == "pretrain" else "classifier"
    remote = [REMOTE_CODE_SNIPPETS[kind]] + ([REMOTE_CODE_SNIPPETS["classifier_model"]] if kind == "classifier" else [])
    output = "pooled features" if kind == "pretrain" else "logits"
    parts = [
        "## How to use",
        f"### {USAGE_WITH_PACKAGE}\n\n`pip install simlap-hf`, then:\n\n"
        + _code("python", PACKAGE_SNIPPETS[kind].format(**values)),
        f"### {USAGE_REMOTE_CODE}\n\nOnly torch, timm, transformers and Pillow are needed: the folder carries the "
        "model, configuration and image processor code, which `trust_remote_code=True` runs.\n\n"
        + "\n\n".join(_code("python", snippet.format(**values)) for snippet in remote),
        f"### {USAGE_ONNX}\n\nExport once (`pip install 'simlap-hf[onnx]'`): `model.onnx` takes `pixel_values` "
        f"(batch, {channels}, {size}, {size}) and returns the {output}; the image processor is saved beside it.\n\n"
        + _code("bash", ONNX_EXPORT_COMMAND.format(**values))
        + "\n\nThen neither SimLAP-HF nor timm is needed (onnxruntime and Pillow; transformers and torch for the "
        "image processor):\n\n" + _code("python", ONNX_SNIPPETS[kind].format(**values)),
    ]
    return "\n\n".join(parts)


def _eval_results(
    results: Mapping[str, Any], dataset_label: str, dataset_id: str | None, knn_k: int | None
) -> list[EvalResult]:
    """The card's ``model-index`` entries: one per metric of :data:`CARD_METRICS` present in ``results``; the kNN
    accuracy names ``knn_k``, the number of neighbours it was measured with, when known."""
    knn = f" (k={knn_k})" if knn_k is not None else ""
    return [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or dataset_label,
            dataset_name=dataset_label,
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=readable.format(knn=knn),
            metric_value=float(results[metric]),
        )
        for metric, (metric_type, readable) in CARD_METRICS.items()
        if results.get(metric) is not None
    ]


def _card_data(
    task: str,
    config: Any,
    results: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    dataset_name: str | None,
    base_model: str | None,
    name: str,
) -> ModelCardData:
    """The card's YAML metadata (library, license, tags, data set, results, pipeline tag, base model)."""
    dataset_label = dataset_name or "custom"
    dataset_id = _hub_dataset_id(dataset_name)
    eval_results = _eval_results(results, dataset_label, dataset_id, hyperparameters.get("knn_k"))
    tags = ["simlap", "contrastive-learning", "image-classification", config.backbone, "timm"]
    if task == "fuse":
        tags.append("simlap-fuse")
    return ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if eval_results else None,
        pipeline_tag="image-feature-extraction" if task == "pretrain" else "image-classification",
        base_model=_hub_model_id(base_model),
        model_name=name,
        eval_results=eval_results or None,
    )


def _table(header: str, rows: Mapping[str, Any]) -> str:
    """A two-column markdown table under ``header`` (``| a | b |``)."""
    return header + "\n|---|---|\n" + "\n".join(f"| {key} | {_format_value(value)} |" for key, value in rows.items())


def _intro_sections(task: str, config: Any, dataset_name: str | None, base_model: str | None) -> list[str]:
    """The description of the model, then its input and classes."""
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    listed = ", ".join(labels[:_MAX_LISTED_LABELS]) + (", ..." if len(labels) > _MAX_LISTED_LABELS else "")
    intro = TASK_DESCRIPTIONS[task].format(backbone=config.backbone, dataset=dataset_name or "custom") + (
        " Trained with SimLAP-HF, an implementation of SimLAP ([Rethinking positive pairs in contrastive learning]"
        "(https://arxiv.org/abs/2410.18200)) for transformers, timm and accelerate."
    )
    if base_model:
        intro += f" Initialised from `{base_model}`."
    shape = (
        f"Input: {config.num_channels} x {config.image_size} x {config.image_size} images. "
        f"Classes ({config.num_labels}): {listed}."
    )
    return [intro, shape]


def _preprocessing_section(config: Any, processor: Mapping[str, Any]) -> str:
    mean, std = processor.get("image_mean"), processor.get("image_std")
    crop = processor.get("crop_pct")
    return (
        "## Preprocessing\n\n"
        f"Resize to {config.image_size}"
        + (f" / {crop} (crop_pct)" if crop else "")
        + f", center crop {config.image_size}, normalise with mean {mean} and std {std} "
        "(`preprocessor_config.json`, used by the pipeline)."
    )


# The config fields that set the SimLAP loss, the gates and the projector (the authors' later options included).
LOSS_OPTION_FIELDS = (
    "gate",
    "pair_mode",
    "temperature",
    "loss_form",
    "learnable_temperature",
    "alpha",
    "positive_normalization",
    "projector_norm",
)


def _loss_options_section(config: Any) -> str:
    """The pretraining model's loss, gate and projector options (``SimLAPConfig`` fields) as a table."""
    gate = GATE_KINDS.get(config.gate)
    fields = LOSS_OPTION_FIELDS + (gate.option_fields if gate is not None else ())
    rows = {field: getattr(config, field) for field in fields if hasattr(config, field)}
    return "## SimLAP options\n\n" + _table("| config field | value |", rows)


def _class_relations_section(output_dir: Path) -> str | None:
    """The summary of ``class_relations.json`` (and its heatmap) when the folder has one."""
    relations_file = output_dir / RELATIONS_FILE
    if not relations_file.is_file():
        return None
    heatmap = HEATMAP_FILE if (output_dir / HEATMAP_FILE).is_file() else None
    return "## Class relations\n\n" + ClassRelations.load(relations_file).summary_markdown(heatmap=heatmap)


def build_model_card(
    output_dir: str | os.PathLike,
    task: str,
    config: Any,
    results: Mapping[str, Any],
    hyperparameters: Mapping[str, Any],
    dataset_name: str | None,
    repo_id: str | None = None,
    base_model: str | None = None,
    extra_sections: Mapping[str, str] | None = None,
) -> ModelCard:
    """One model card for the three scripts.

    Metadata: ``library_name``, license, tags (``simlap``, ``contrastive-learning``, ``image-classification``, the
    backbone, ``timm``), the data set (Hub id when known), ``model-index`` results from ``results`` (the content of
    ``all_results.json``), ``pipeline_tag`` and ``base_model`` (when it is a Hub id). Body: description, classes,
    results, usage (:func:`usage_section`), preprocessing, training
    hyperparameters, ``extra_sections`` and the citation.

    Args:
        output_dir: the saved model folder (its ``preprocessor_config.json``, if any, selects the pipeline snippet).
        task: ``"pretrain"``, ``"finetune"`` or ``"fuse"``.
        config: the model's ``SimLAPConfig``.
        results: metrics (``eval_top1``, ``eval_top5``, ``eval_knn_top1`` as percentages, and any others).
        hyperparameters: flat mapping of the run's options (the hub token must not be in it); its ``knn_k`` names
            the kNN setting of ``eval_knn_top1``.
        dataset_name: the ``--dataset_name`` of the run.
        repo_id: Hub repository id used in the snippet (default: the local folder).
        base_model: the model fine-tuned from (a Hub id or a local folder).
        extra_sections: more ``title: markdown`` sections.
    """
    if task not in TASK_DESCRIPTIONS:
        raise ValueError(f"task={task!r} is not valid; choose one of {', '.join(TASK_DESCRIPTIONS)}.")
    output_dir = Path(output_dir)
    repo = repo_id or str(output_dir)
    name = Path(repo).name
    card_data = _card_data(task, config, results, hyperparameters, dataset_name, base_model, name)
    processor = _read_preprocessing(output_dir)
    sections = [
        f"# {name}",
        *_intro_sections(task, config, dataset_name, base_model),
        "## Results\n\nOn the validation split (accuracies in %).\n\n" + _table("| metric | value |", results),
        usage_section(task, config, repo),
    ]
    if processor is not None:
        sections.append(_preprocessing_section(config, processor))
    if task == "pretrain":
        sections.append(_loss_options_section(config))
    relations = _class_relations_section(output_dir)
    if relations is not None:
        sections.append(relations)
    options = {key: value for key, value in sorted(hyperparameters.items()) if key != "hub_token"}
    sections.append("## Training hyperparameters\n\n" + _table("| option | value |", options))
    for title, body in (extra_sections or {}).items():
        sections.append(f"## {title}\n\n{body}")
    sections.append("## Citation\n\n```bibtex\n" + CITATION + "\n```")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)
