"""train_finetune.py and train_fuse.py: checkpoint take-over, layer decay, mixup and the one classification loss, end
to end, pipeline."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from transformers import AutoModelForImageClassification, pipeline

import simlap_hf  # noqa: F401  (registers the auto classes)
import train_finetune
import train_fuse
from simlap_hf import SimLAPConfig, SimLAPForImageClassification, SimLAPFuseForImageClassification, SimLAPModel
from simlap_hf.data import DataArguments
from simlap_hf.losses import classification_loss
from simlap_hf.training import (
    ClassificationArguments,
    FinetuneModelArguments,
    TrainingArguments,
    build_finetune_model,
    create_mixup,
    create_optimizer,
    cross_entropy_smoothing,
)

DATA_FLAGS = [
    "--train_val_split",
    "0.25",
    "--input_size",
    "16",
    "--aa",
    "none",
    "--reprob",
    "0",
    "--per_device_train_batch_size",
    "12",
    "--per_device_eval_batch_size",
    "16",
    "--ra",
    "3",
    "--warmup_epochs",
    "1",
    "--eval_every",
    "1",
    "--checkpointing_epochs",
    "1",
    "--seed",
    "3",
]


def pretrained_folder(tmp_path, backbone="resnet10t", **kwargs):
    config = tiny_config(backbone=backbone, num_classes=3, **kwargs)
    model = SimLAPModel(config)
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    return model, folder


def test_build_model_takes_over_backbone_and_starts_new_head(tmp_path):
    pretrained, folder = pretrained_folder(tmp_path)
    args = FinetuneModelArguments(model_name_or_path=str(folder))
    model = build_finetune_model(args, DataArguments(input_size=16), ["a", "b", "c", "d", "e"])
    for name, tensor in pretrained.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[name], tensor), name
    assert model.classifier.weight.shape == (5, pretrained.feature_dim)
    assert model.config.id2label == {0: "a", 1: "b", 2: "c", 3: "d", 4: "e"}


def test_build_model_rejects_another_backbone(tmp_path):
    _, folder = pretrained_folder(tmp_path)
    args = FinetuneModelArguments(model_name_or_path=str(folder), model_name="resnet34")
    with pytest.raises(ValueError, match=r"--model_name 'resnet34' differs from the backbone of .*\('resnet10t'\)"):
        build_finetune_model(args, DataArguments(), ["a", "b"])


def test_layer_decay_scales_follow_distance_from_head():
    config = SimLAPConfig(backbone="resnet18", num_classes=4)
    model = SimLAPForImageClassification(config)
    optimizer = create_optimizer(model, TrainingArguments(opt="sgd", learning_rate=0.1, layer_decay=0.65))
    scale_of = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            scale_of[id(param)] = group["lr_scale"]
    names = dict(model.named_parameters())
    # resnet18: stem (0), 8 residual blocks (1..8), head (9).
    expected = {
        "backbone.conv1.weight": 9,
        "backbone.bn1.weight": 9,
        "backbone.layer1.0.conv1.weight": 8,
        "backbone.layer2.1.bn2.bias": 5,
        "backbone.layer4.1.conv2.weight": 1,
        "classifier.weight": 0,
        "classifier.bias": 0,
    }
    for name, distance in expected.items():
        assert scale_of[id(names[name])] == pytest.approx(0.65**distance), name
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decays[id(names["classifier.bias"])] == 0 and decays[id(names["backbone.bn1.weight"])] == 0
    assert decays[id(names["classifier.weight"])] == pytest.approx(TrainingArguments().weight_decay)


def test_mixup_gives_soft_targets_and_soft_target_loss():
    recipe = ClassificationArguments(mixup=0.8, cutmix=1.0, smoothing=0.1)
    mixup = create_mixup(recipe, num_classes=5)
    images, labels = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    mixed, targets = mixup(images, labels)
    assert targets.shape == (6, 5) and torch.allclose(targets.sum(1), torch.ones(6))
    assert ((targets > 0) & (targets < 1)).any()
    # The soft targets carry the smoothing: the loss must not smooth them again.
    assert cross_entropy_smoothing(recipe, mixup) == 0.0
    logits = torch.randn(6, 5)
    expected = -(targets * torch.log_softmax(logits, 1)).sum(1).mean()
    assert classification_loss(logits, targets, 0.0).item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(classification_loss(logits, targets), SoftTargetCrossEntropy()(logits, targets))


def test_no_mixup_smoothing_is_applied_by_the_cross_entropy():
    recipe = ClassificationArguments(mixup=0.0, cutmix=0.0, smoothing=0.1)
    assert create_mixup(recipe, 5) is None
    assert cross_entropy_smoothing(recipe, None) == 0.1
    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    smoothed = classification_loss(logits, labels, 0.1)
    assert smoothed.item() == pytest.approx(LabelSmoothingCrossEntropy(0.1)(logits, labels).item(), rel=1e-5)
    assert torch.equal(classification_loss(logits, labels), torch.nn.CrossEntropyLoss()(logits, labels))


def test_smoothing_means_the_same_with_and_without_mixup():
    """--smoothing s: mixup's soft target of an unmixed image is the target the cross-entropy smooths class indices
    to, (1 - s) * onehot + s / C, so fine-tuning and SimLAP-Fuse, with or without mixup, optimise one objective."""
    from timm.data.mixup import mixup_target

    logits, labels = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    soft = mixup_target(labels, 5, lam=1.0, smoothing=0.1)
    assert torch.allclose(soft, torch.nn.functional.one_hot(labels, 5) * 0.9 + 0.1 / 5)
    torch.testing.assert_close(classification_loss(logits, soft), classification_loss(logits, labels, 0.1))


def test_fuse_loss_finite_under_autocast_at_saturated_cosines():
    from simlap_hf.configuration_simlap import SimLAPFuseConfig

    torch.manual_seed(0)
    config = SimLAPFuseConfig(backbone="resnet10t", num_classes=3, head_dim=512, head_hidden_mult=1)
    model = SimLAPFuseForImageClassification(config).train()
    pixels, labels = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    # Class weights along +/- one direction: the sign gates are all on or all off (exact +/-1 cosines through
    # arcgrad_logits are tested in test_losses).
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([torch.ones(512), -torch.ones(512), torch.ones(512)]))
        model.margin_head[-1].running_mean.zero_()
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            out = model(pixels, labels=labels)
        features = out["pooler_output"]
        features.retain_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss)
        # What the loss sends back: the gradient reaching the backbone features and the heads' gradients. (The
        # backbone's own low-precision convolution kernels are not under test here.)
        assert torch.isfinite(features.grad).all()
        heads = list(model.margin_head.parameters()) + list(model.classifier.parameters())
        assert all(torch.isfinite(p.grad).all() for p in heads if p.grad is not None)
        model.zero_grad()


def check_pipeline(output_dir, expected_names):
    classifier = pipeline("image-classification", model=str(output_dir))
    image = Image.fromarray(np.full((16, 16, 3), (200, 40, 40), dtype=np.uint8))
    predictions = classifier(image, top_k=4)
    assert {p["label"] for p in predictions} == set(expected_names)
    return predictions


def test_finetune_end_to_end_and_pipeline(tiny_image_folder, tmp_path):
    _, folder = pretrained_folder(tmp_path)
    output_dir = tmp_path / "ft"
    model, results = train_finetune.run(
        [
            "--model_name_or_path",
            str(folder),
            "--train_dir",
            tiny_image_folder,
            "--output_dir",
            str(output_dir),
            "--num_train_epochs",
            "2",
            "--opt",
            "sgd",
            "--learning_rate",
            "0.05",
            "--layer_decay",
            "0.65",
            "--model_ema_decay",
            "0.5",
            *DATA_FLAGS,
        ]
    )
    saved = json.loads((output_dir / "all_results.json").read_text())
    assert saved == results and {"eval_top1", "eval_top5", "best_eval_top1", "best_epoch"} <= set(saved)
    assert (output_dir / "preprocessor_config.json").is_file()
    assert "pipeline_tag: image-classification" in (output_dir / "README.md").read_text()
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert type(reloaded) is SimLAPForImageClassification
    pixels = torch.randn(2, 3, 16, 16)
    assert torch.equal(reloaded(pixels).logits, model.eval()(pixels).logits)  # the saved weights are the EMA's
    check_pipeline(output_dir, ["blue", "gray", "green", "red"])


def test_finetune_from_scratch_baseline(tiny_image_folder, tmp_path):
    output_dir = tmp_path / "scratch"
    model, results = train_finetune.run(
        [
            "--model_name",
            "resnet10t",
            "--from_scratch",
            "--train_dir",
            tiny_image_folder,
            "--output_dir",
            str(output_dir),
            "--num_train_epochs",
            "1",
            "--mixup",
            "0",
            "--cutmix",
            "0",
            *DATA_FLAGS,
        ]
    )
    assert model.config.backbone == "resnet10t" and "eval_top1" in results
    with pytest.raises(ValueError, match="--from_scratch needs --model_name"):
        train_finetune.run(
            ["--from_scratch", "--train_dir", tiny_image_folder, "--output_dir", str(tmp_path / "x"), *DATA_FLAGS]
        )


def test_fuse_end_to_end_and_pipeline(tiny_image_folder, tmp_path):
    output_dir = tmp_path / "fuse"
    model, results = train_fuse.run(
        [
            "--model_name",
            "resnet10t",
            "--head_hidden_mult",
            "1",
            "--iter_num",
            "2",
            "--train_dir",
            tiny_image_folder,
            "--output_dir",
            str(output_dir),
            "--num_train_epochs",
            "2",
            "--opt",
            "sgd",
            "--learning_rate",
            "0.05",
            "--mixup",
            "0",
            "--cutmix",
            "0",
            *DATA_FLAGS,
        ]
    )
    assert type(model) is SimLAPFuseForImageClassification and "eval_top1" in results
    assert model.config.head_dim == 512 and model.config.label_smoothing == 0.1
    reloaded = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    assert type(reloaded) is SimLAPFuseForImageClassification
    predictions = check_pipeline(output_dir, ["blue", "gray", "green", "red"])
    assert all(0 <= p["score"] <= 1 for p in predictions)
