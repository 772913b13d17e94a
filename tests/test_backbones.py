"""Other timm families end to end with the scripts' defaults: a ViT, a ConvNeXt and an EfficientNet pretrain, fine-tune
with layer decay and load with from_pretrained; the ResNet-only defaults (deep stem, output stride 8) stay off them."""

from __future__ import annotations

import json

import pytest
import torch

import train_finetune
import train_pretrain
from simlap_hf import SimLAPForImageClassification, SimLAPModel
from simlap_hf.training import TrainingArguments, create_optimizer, timm_backbone_kwargs

DATA = [
    "--train_val_split",
    "0.25",
    "--aa",
    "none",
    "--reprob",
    "0",
    "--per_device_train_batch_size",
    "12",
    "--per_device_eval_batch_size",
    "32",
    "--num_train_epochs",
    "1",
    "--warmup_epochs",
    "0",
    "--checkpointing_epochs",
    "0",
    "--knn_k",
    "5",
]

BACKBONES = {
    # name: (timm kwargs as JSON, input size)
    "vit_tiny_patch16_224": ('{"img_size": 32, "patch_size": 8}', 32),
    "convnext_atto": (None, 32),
    "efficientnet_b0": (None, 32),
}


def test_resnet_defaults_apply_to_resnets_only():
    assert timm_backbone_kwargs("resnet18", None, None, None) == {"stem_type": "deep", "output_stride": 8}
    assert timm_backbone_kwargs("resnet10t", "", 0, None) == {}  # explicit: timm's defaults
    assert timm_backbone_kwargs("resnet50d", "deep_tiered", 16, None) == {
        "stem_type": "deep_tiered",
        "output_stride": 16,
    }
    for name in BACKBONES:
        assert timm_backbone_kwargs(name, None, None, '{"drop_path_rate": 0.1}') == {"drop_path_rate": 0.1}
    assert timm_backbone_kwargs("efficientnet_b0", None, 16, None) == {"output_stride": 16}  # given: passed on
    with pytest.raises(ValueError, match="not valid JSON"):
        timm_backbone_kwargs("resnet18", None, None, "{drop_path_rate: 0.1}")


@pytest.mark.parametrize("name", list(BACKBONES))
def test_backbone_pretrains_finetunes_with_layer_decay_and_loads(name, tiny_image_folder, tmp_path):
    model_kwargs, size = BACKBONES[name]
    extra = ["--model_kwargs", model_kwargs] if model_kwargs else []
    pretrained_dir = tmp_path / "pretrained"
    model, results = train_pretrain.run(
        [
            "--model_name",
            name,
            *extra,
            "--train_dir",
            tiny_image_folder,
            "--output_dir",
            str(pretrained_dir),
            "--input_size",
            str(size),
            "--out_dim",
            "16",
            "--mlp_dim",
            "32",
            *DATA,
        ]
    )
    assert 0 <= results["eval_knn_top1"] <= 100
    config = json.loads((pretrained_dir / "config.json").read_text())
    assert "stem_type" not in config["backbone_kwargs"] and "output_stride" not in config["backbone_kwargs"]
    loaded = SimLAPModel.from_pretrained(pretrained_dir).eval()
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        # Same weights, same computation: equal up to float32 rounding of identical kernels.
        torch.testing.assert_close(
            loaded(pixels).pooler_output, model.eval()(pixels).pooler_output, rtol=1e-5, atol=1e-6
        )

    finetuned_dir = tmp_path / "finetuned"
    classifier, results = train_finetune.run(
        [
            "--model_name_or_path",
            str(pretrained_dir),
            "--train_dir",
            tiny_image_folder,
            "--output_dir",
            str(finetuned_dir),
            "--input_size",
            str(size),
            "--opt",
            "sgd",
            "--learning_rate",
            "0.05",
            "--layer_decay",
            "0.65",
            *DATA,
        ]
    )
    assert 0 <= results["eval_top1"] <= 100
    # Layer decay: timm's groups of this family, scales falling away from the head.
    optimizer = create_optimizer(classifier, TrainingArguments(opt="sgd", learning_rate=0.1, layer_decay=0.65))
    scales = sorted({round(group["lr_scale"], 6) for group in optimizer.param_groups})
    assert len(scales) >= 3 and scales[-1] == 1.0 and scales[0] < 0.65**2
    reloaded = SimLAPForImageClassification.from_pretrained(finetuned_dir).eval()
    assert reloaded.config.backbone == name and reloaded.config.num_labels == 4
