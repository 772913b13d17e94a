"""Model cards and Hugging Face Hub uploads, shared by the three training scripts.

Everything goes through ``huggingface_hub`` (``HfApi.create_repo``, ``HfApi.upload_folder``) and honours
``HF_ENDPOINT`` (read when a call is made), ``HF_TOKEN`` (or the token saved by ``hf auth login``) and
``HF_HUB_OFFLINE``. The scripts always save locally first: a failed upload loses nothing and its error names the
command that pushes the folder later (``python -m simlap_hf.push``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, constants
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_token

logger = logging.getLogger("simlap_hf")

CITATION = """@article{wu2024rethinking,
  title={Rethinking positive pairs in contrastive learning},
  author={Wu, Jiantao and Atito, Sara and Feng, Zhenhua and Mo, Shentong and Kittler, Josef and Awais, Muhammad},
  journal={arXiv preprint arXiv:2410.18200},
  year={2024}
}"""

# Metric names of all_results.json -> (metric type, readable name) for the card's model-index.
CARD_METRICS = {
    "eval_top1": ("accuracy", "Top-1 accuracy"),
    "eval_top5": ("top_5_accuracy", "Top-5 accuracy"),
    "eval_knn_top1": ("knn_accuracy", "kNN (k=20) top-1 accuracy"),
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

# Usage snippets of the card. They load the model through the code saved with it (``trust_remote_code=True``), so
# they run where SimLAP-HF is not installed. ``{repo}`` is the Hub id, or the local folder when nothing is pushed.
LOAD_SNIPPETS = {
    "pretrain": """import torch
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo}", trust_remote_code=True).eval()
pixel_values = torch.randn(2, {channels}, {size}, {size})  # a batch of normalised images
with torch.no_grad():
    out = model(pixel_values)
print(out.pooler_output.shape, out.embeddings.shape, out.logits.shape)  # features, embeddings, online head
gates = model.gate(torch.tensor([0]), torch.tensor([1]))  # feature filter of the class pair (0, 1)
print(gates.shape)""",
    "pipeline": """from PIL import Image
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}", trust_remote_code=True)
image = Image.new("{mode}", ({size}, {size}), {colour})  # or Image.open("your_image.png")
print(classifier(image))""",
    "classifier": """import torch
from transformers import AutoModelForImageClassification

model = AutoModelForImageClassification.from_pretrained("{repo}", trust_remote_code=True).eval()
pixel_values = torch.randn(2, {channels}, {size}, {size})  # a batch of normalised images
with torch.no_grad():
    logits = model(pixel_values).logits
print([model.config.id2label[int(i)] for i in logits.argmax(-1)])""",
}

NO_REMOTE_CODE_NOTE = (
    "With SimLAP-HF installed, `import simlap_hf` registers the SimLAP classes with the transformers auto classes "
    "and `trust_remote_code=True` is not needed."
)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_MAX_LISTED_LABELS = 30


def _hub_dataset_id(dataset_name: str | None) -> str | None:
    """The Hub id of a data set for the card metadata, or None (local folders, scikit-learn digits...)."""
    if not dataset_name:
        return None
    try:
        from .data import NAMED_DATASETS
    except ImportError:  # pragma: no cover - the data module is part of the package
        NAMED_DATASETS = {}
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


def _usage_snippet(task: str, config: Any, repo: str, has_processor: bool) -> str:
    channels, size = config.num_channels, config.image_size
    if task == "pretrain":
        return LOAD_SNIPPETS["pretrain"].format(repo=repo, channels=channels, size=size)
    if has_processor:
        mode, colour = ("L", "128") if channels == 1 else ("RGB", "(200, 40, 40)")
        return LOAD_SNIPPETS["pipeline"].format(repo=repo, size=size, mode=mode, colour=colour)
    return LOAD_SNIPPETS["classifier"].format(repo=repo, channels=channels, size=size)


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
    results, a usage snippet that runs (through the code saved with the model), preprocessing, training
    hyperparameters, ``extra_sections`` and the citation.

    Args:
        output_dir: the saved model folder (its ``preprocessor_config.json``, if any, selects the pipeline snippet).
        task: ``"pretrain"``, ``"finetune"`` or ``"fuse"``.
        config: the model's ``SimLAPConfig``.
        results: metrics (``eval_top1``, ``eval_top5``, ``eval_knn_top1`` as percentages, and any others).
        hyperparameters: flat mapping of the run's options (the hub token must not be in it).
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
    dataset_label = dataset_name or "custom"
    dataset_id = _hub_dataset_id(dataset_name)
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Image Classification",
            dataset_type=dataset_id or dataset_label,
            dataset_name=dataset_label,
            dataset_split="validation",
            metric_type=metric_type,
            metric_name=readable,
            metric_value=float(results[metric]),
        )
        for metric, (metric_type, readable) in CARD_METRICS.items()
        if results.get(metric) is not None
    ]
    base_model_id = _hub_model_id(base_model)
    tags = ["simlap", "contrastive-learning", "image-classification", config.backbone, "timm"]
    if task == "fuse":
        tags.append("simlap-fuse")
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"] if eval_results else None,
        pipeline_tag="image-feature-extraction" if task == "pretrain" else "image-classification",
        base_model=base_model_id,
        model_name=name,
        eval_results=eval_results or None,
    )

    processor = _read_preprocessing(output_dir)
    snippet = _usage_snippet(task, config, repo, processor is not None)
    labels = [str(config.id2label[i]) for i in range(config.num_labels)]
    listed = ", ".join(labels[:_MAX_LISTED_LABELS]) + (", ..." if len(labels) > _MAX_LISTED_LABELS else "")
    intro = TASK_DESCRIPTIONS[task].format(backbone=config.backbone, dataset=dataset_label) + (
        " Trained with SimLAP-HF, an implementation of SimLAP ([Rethinking positive pairs in contrastive learning]"
        "(https://arxiv.org/abs/2410.18200)) for transformers, timm and accelerate."
    )
    if base_model:
        intro += f" Initialised from `{base_model}`."
    result_rows = "\n".join(f"| {key} | {_format_value(value)} |" for key, value in results.items())
    hyper_rows = "\n".join(
        f"| {key} | {_format_value(value)} |" for key, value in sorted(hyperparameters.items()) if key != "hub_token"
    )
    sections = [
        f"# {name}",
        intro,
        f"Input: {config.num_channels} x {config.image_size} x {config.image_size} images. "
        f"Classes ({config.num_labels}): {listed}.",
        "## Results\n\nOn the validation split (accuracies in %).\n\n| metric | value |\n|---|---|\n" + result_rows,
        "## How to use\n\n```python\n" + snippet + "\n```\n\n" + NO_REMOTE_CODE_NOTE,
    ]
    if processor is not None:
        mean, std = processor.get("image_mean"), processor.get("image_std")
        crop = processor.get("crop_pct")
        sections.append(
            "## Preprocessing\n\n"
            f"Resize to {config.image_size}"
            + (f" / {crop} (crop_pct)" if crop else "")
            + f", center crop {config.image_size}, normalise with mean {mean} and std {std} "
            "(`preprocessor_config.json`, used by the pipeline)."
        )
    relations_file = output_dir / "class_relations.json"
    if relations_file.is_file():
        from .relations import HEATMAP_FILE, ClassRelations

        heatmap = HEATMAP_FILE if (output_dir / HEATMAP_FILE).is_file() else None
        sections.append("## Class relations\n\n" + ClassRelations.load(relations_file).summary_markdown(heatmap=heatmap))
    sections.append("## Training hyperparameters\n\n| option | value |\n|---|---|\n" + hyper_rows)
    for title, body in (extra_sections or {}).items():
        sections.append(f"## {title}\n\n{body}")
    sections.append("## Citation\n\n```bibtex\n" + CITATION + "\n```")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


# ----------------------------------------------------------------------------------------------------------------
# Hub operations


class HubPushError(RuntimeError):
    """A Hub operation failed; the local output folder is intact."""


# Never uploaded: partial files of atomic writes, incomplete checkpoints, caches.
IGNORE_PATTERNS = ["*.tmp", ".tmp*", "**/.tmp*", "**/.tmp*/**", "__pycache__/*", "**/__pycache__/*"]
CHECKPOINT_PATTERNS = ["checkpoints/*", "checkpoints/**"]


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set, now or when huggingface_hub was imported."""
    return bool(getattr(constants, "HF_HUB_OFFLINE", False)) or _env_true("HF_HUB_OFFLINE") or _env_true(
        "TRANSFORMERS_OFFLINE"
    )


def hub_api(token: str | None = None) -> HfApi:
    """``HfApi`` on ``HF_ENDPOINT`` as set now (huggingface_hub itself reads it once, at import)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    return HfApi(endpoint=endpoint.rstrip("/") if endpoint else None, token=token)


def push_later_hint(output_dir: str | os.PathLike, repo_id: str | None) -> str:
    """The command that uploads a saved output folder."""
    return f"python -m simlap_hf.push {output_dir} --hub_model_id {repo_id or 'USER/NAME'}"


def _describe_http_error(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return (
            f"the Hub rejected the token (401 Unauthorized): {error}. Check --hub_token or HF_TOKEN (or run "
            "`hf auth login`); the token needs write access."
        )
    if status == 403:
        return (
            f"the token may not write to this namespace (403 Forbidden): {error}. Use a token with write access "
            "or a --hub_model_id in your own namespace."
        )
    if status == 404:
        return f"not found (404): {error}. Check --hub_model_id (it should look like your-name/model-name)."
    return f"{type(error).__name__}: {error}"


def _check_can_reach_hub(option: str) -> None:
    if hub_offline():
        raise HubPushError(
            f"{option} was given but HF_HUB_OFFLINE is set: the Hub cannot be reached. Unset HF_HUB_OFFLINE or drop "
            f"{option}; a saved output folder can be pushed later with: python -m simlap_hf.push OUTPUT_DIR "
            "--hub_model_id USER/NAME"
        )


def create_hub_repo(repo_id: str | None, token: str | None, private: bool) -> str:
    """Create (or reuse) the Hub model repository at the start of a run, so that a bad token or id fails before
    training. Honours ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``. Returns the full repository id.

    Raises:
        ValueError: no ``repo_id``.
        HubPushError: offline mode, no token, or the Hub refused (the message says why and what to do).
    """
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (for example your-name/simlap-resnet18-cifar10).")
    _check_can_reach_hub("--push_to_hub")
    if not (token or get_token()):
        raise HubPushError(
            "--push_to_hub needs a Hugging Face token with write access: pass --hub_token, set HF_TOKEN, or run "
            "`hf auth login`."
        )
    try:
        url = hub_api(token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except HfHubHTTPError as error:
        raise HubPushError(f"Could not create Hub repository {repo_id!r}: {_describe_http_error(error)}") from error
    except Exception as error:  # network errors (connection refused, DNS, timeouts) of the HTTP client
        raise HubPushError(
            f"Could not create Hub repository {repo_id!r}: {type(error).__name__}: {error}. Is the Hub "
            f"({os.environ.get('HF_ENDPOINT') or constants.ENDPOINT}) reachable?"
        ) from error
    logger.info("Hub repository ready: %s", url)
    return url.repo_id


def push_output_dir(
    output_dir: str | os.PathLike,
    repo_id: str,
    token: str | None,
    message: str,
    include_checkpoints: bool = False,
) -> str:
    """Upload a saved output folder (model, code, card, results, logs) in one commit; ``checkpoints/`` only with
    ``include_checkpoints``. Returns the commit URL.

    Raises HubPushError with the command to retry; nothing local is touched."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise HubPushError(f"{str(output_dir)!r} is not a folder: nothing to push.")
    _check_can_reach_hub("Pushing to the Hub")
    ignore = list(IGNORE_PATTERNS) + ([] if include_checkpoints else CHECKPOINT_PATTERNS)
    try:
        info = hub_api(token).upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=message,
            ignore_patterns=ignore,
            repo_type="model",
        )
    except Exception as error:
        reason = _describe_http_error(error) if isinstance(error, HfHubHTTPError) else f"{type(error).__name__}: {error}"
        raise HubPushError(
            f"Uploading {str(output_dir)!r} to {repo_id!r} failed: {reason}. The folder is saved locally; push it "
            f"later with: {push_later_hint(output_dir, repo_id)}"
            + (" --include_checkpoints" if include_checkpoints else "")
        ) from error
    return str(getattr(info, "commit_url", info))


def push_checkpoint(
    path: str | os.PathLike, repo_id: str, token: str | None, raise_errors: bool = False
) -> str | None:
    """Upload one checkpoint folder into ``checkpoints/<name>/`` of the repository (the ``on_checkpoint`` hook of
    ``fit`` with ``--push_checkpoints``). Returns the commit URL.

    A failed upload only logs a warning (training goes on, the checkpoint stays on disk) unless ``raise_errors``.
    """
    path = Path(path)
    try:
        _check_can_reach_hub("--push_checkpoints")
        info = hub_api(token).upload_folder(
            repo_id=repo_id,
            folder_path=str(path),
            path_in_repo=f"checkpoints/{path.name}",
            commit_message=f"Checkpoint {path.name}",
            ignore_patterns=list(IGNORE_PATTERNS),
            repo_type="model",
        )
    except Exception as error:
        reason = _describe_http_error(error) if isinstance(error, HfHubHTTPError) else f"{type(error).__name__}: {error}"
        message = (
            f"Uploading checkpoint {str(path)!r} to {repo_id!r} failed: {reason}. It is kept locally; push the run "
            f"with its checkpoints later with: {push_later_hint(path.parent.parent, repo_id)} --include_checkpoints"
        )
        if raise_errors:
            raise HubPushError(message) from error
        logger.warning(message)
        return None
    url = str(getattr(info, "commit_url", info))
    logger.info("Pushed checkpoint %s: %s", path.name, url)
    return url
