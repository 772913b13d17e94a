"""Model cards and Hugging Face Hub uploads, shared by the three training scripts."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HfHubHTTPError

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
    "pretrain": "SimLAP pretraining (contrastive learning from arbitrary class pairs, with an online linear head)",
    "finetune": "fine-tuning of a SimLAP backbone for image classification",
    "fuse": "SimLAP-Fuse supervised training (ArcGrad margin head regularised by the SimLAP term)",
}

LOAD_SNIPPETS = {
    "pretrain": """import torch
import simlap_hf  # registers the SimLAP classes with the transformers auto classes
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo}").eval()
pixel_values = torch.randn(2, {channels}, {size}, {size})  # normalised images
out = model(pixel_values)
print(out.pooler_output.shape, out.embeddings.shape, out.logits.shape)
gates = model.gate(torch.tensor([0]), torch.tensor([1]))  # feature filter of the class pair (0, 1)""",
    "classifier": """import simlap_hf  # registers the SimLAP classes with the transformers auto classes
from transformers import pipeline

classifier = pipeline("image-classification", model="{repo}")
print(classifier("image.png"))""",
}


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
    """One model card for the three scripts: metadata (library, tags, data set, model-index from the results,
    pipeline tag, base model), a description, results, hyperparameters, a runnable usage snippet and the citation.
    """
    repo = repo_id or str(output_dir)
    dataset_label = dataset_name or "custom"
    eval_results = [
        EvalResult(
            task_type="image-classification",
            dataset_type=dataset_label,
            dataset_name=dataset_label,
            metric_type=metric_type,
            metric_name=readable,
            metric_value=float(results[name]),
        )
        for name, (metric_type, readable) in CARD_METRICS.items()
        if results.get(name) is not None
    ]
    card_data = ModelCardData(
        library_name="transformers",
        license="apache-2.0",
        tags=["simlap", "contrastive-learning", "image-classification", config.backbone, "timm"],
        datasets=[dataset_name] if dataset_name else None,
        pipeline_tag="image-feature-extraction" if task == "pretrain" else "image-classification",
        base_model=base_model,
        model_name=Path(repo).name,
        eval_results=eval_results or None,
    )
    snippet = LOAD_SNIPPETS["pretrain" if task == "pretrain" else "classifier"].format(
        repo=repo, channels=config.num_channels, size=config.image_size
    )
    result_rows = "\n".join(f"| {name} | {value} |" for name, value in results.items())
    hyper_rows = "\n".join(f"| {name} | {value} |" for name, value in sorted(hyperparameters.items()))
    labels = ", ".join(str(config.id2label[i]) for i in range(config.num_labels))
    sections = [
        f"# {Path(repo).name}",
        f"{TASK_DESCRIPTIONS[task]} of a timm `{config.backbone}` backbone on `{dataset_label}`, trained with "
        "[SimLAP-HF](https://arxiv.org/abs/2410.18200).",
        f"Classes ({config.num_labels}): {labels}.",
        "## Results\n\n| metric | value |\n|---|---|\n" + result_rows,
        "## How to use\n\n```python\n" + snippet + "\n```",
        "## Training hyperparameters\n\n| option | value |\n|---|---|\n" + hyper_rows,
    ]
    for title, body in (extra_sections or {}).items():
        sections.append(f"## {title}\n\n{body}")
    sections.append("## Citation\n\n```bibtex\n" + CITATION + "\n```")
    content = f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n"
    return ModelCard(content)


class HubPushError(RuntimeError):
    """A Hub operation failed; the local output folder is intact."""


def create_hub_repo(repo_id: str | None, token: str | None, private: bool) -> str:
    """Create (or reuse) the Hub model repository at the start of a run, so that a bad token or id fails before
    training. Honours ``HF_ENDPOINT``, ``HF_TOKEN`` and ``HF_HUB_OFFLINE``. Returns the full repository id."""
    if not repo_id:
        raise ValueError("--push_to_hub needs --hub_model_id (for example your-name/simlap-resnet18-cifar10).")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise HubPushError(
            "--push_to_hub was given but HF_HUB_OFFLINE is set: the Hub cannot be reached. Unset HF_HUB_OFFLINE or "
            "drop --push_to_hub (push later with python -m simlap_hf.push OUTPUT_DIR --hub_model_id ...)."
        )
    try:
        url = HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubPushError(f"Could not create Hub repository {repo_id!r}: {error}") from error
    return url.repo_id


def push_output_dir(output_dir: str | os.PathLike, repo_id: str, token: str | None, message: str) -> str:
    """Upload a saved output folder (model, card, results; checkpoints excluded). Returns the commit URL.

    Raises HubPushError with the command to retry; nothing local is touched."""
    try:
        info = HfApi(token=token).upload_folder(
            repo_id=repo_id,
            folder_path=str(output_dir),
            commit_message=message,
            ignore_patterns=["checkpoints/*", "checkpoints/**", "*.tmp", ".tmp*"],
        )
    except (HfHubHTTPError, OSError, ValueError) as error:
        raise HubPushError(
            f"Uploading {str(output_dir)!r} to {repo_id!r} failed: {error}. The folder is saved locally; push it "
            f"later with: python -m simlap_hf.push {output_dir} --hub_model_id {repo_id}"
        ) from error
    return str(info)
