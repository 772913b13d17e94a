"""SimLAP models: shapes, outputs, save/load round trips, auto classes and configuration errors."""

import pytest
import torch
from conftest import tiny_config
from transformers import AutoConfig, AutoModel, AutoModelForImageClassification

from simlap_hf import (
    SimLAPConfig,
    SimLAPForImageClassification,
    SimLAPFuseForImageClassification,
    SimLAPModel,
)
from simlap_hf.configuration_simlap import SimLAPFuseConfig


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 16, 16, generator=generator), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])


@pytest.mark.parametrize("gate", ["fused", "product", "open"])
def test_forward_outputs(gate, batch):
    pixels, labels = batch
    model = SimLAPModel(tiny_config(gate=gate))
    out = model(pixels, labels=labels)
    width = model.feature_dim
    assert out.logits.shape == (8, 4)
    assert out.embeddings.shape == (8, 16)
    assert out.pooler_output.shape == (8, width)
    for name in (
        "loss",
        "contrastive_loss",
        "head_loss",
        "gate_activation",
        "gate_entropy",
        "cos_own",
        "cos_partner",
        "cos_negative",
        "embedding_std",
    ):
        assert torch.isfinite(getattr(out, name)), name
    assert out.loss.item() == pytest.approx(out.contrastive_loss.item() + out.head_loss.item(), rel=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    gates = model.gate(torch.tensor([0, 1]), torch.tensor([2, 3]))
    assert gates.shape == (2, 16) and gates.min() >= 0 and gates.max() <= 1
    if gate == "open":
        assert torch.equal(gates, torch.ones(2, 16)) and model.feature_filter is None
    # Fresh filters output about 0.5 per dimension (0.25 for the product of two gates); the open gate is all ones.
    expected_activation = {"fused": 8.0, "product": 4.0, "open": 16.0}[gate]
    assert out.gate_activation.item() == pytest.approx(expected_activation, rel=0.25)


def test_online_head_is_detached_unless_asked(batch):
    pixels, labels = batch
    for detach in (True, False):
        model = SimLAPModel(tiny_config(detach_head=detach))
        model(pixels, labels=labels).head_loss.backward()
        backbone_grad = sum(p.grad.abs().sum() for p in model.backbone.parameters() if p.grad is not None)
        assert (backbone_grad == 0) == detach


def test_fused_gate_is_symmetric():
    model = SimLAPModel(tiny_config()).eval()
    y1, y2 = torch.tensor([0, 1, 2]), torch.tensor([3, 2, 1])
    torch.testing.assert_close(model.gate(y1, y2), model.gate(y2, y1))


def test_gate_penalty_adds_weighted_entropy(batch):
    pixels, labels = batch
    model = SimLAPModel(tiny_config(gate_penalty=0.5))
    out = model(pixels, labels=labels, pair_labels=labels)
    assert out.gate_penalty_loss.item() == pytest.approx(0.5 * out.gate_entropy.item(), rel=1e-5)


def test_save_load_round_trip_is_bit_exact(tmp_path, batch):
    pixels, labels = batch
    model = SimLAPModel(tiny_config())
    model(pixels, labels=labels).loss.backward()  # BatchNorm statistics move away from their defaults
    model.eval()
    reference = model(pixels, labels=labels, pair_labels=labels)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / "config.json").exists()
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(reloaded) is SimLAPModel
    again = reloaded(pixels, labels=labels, pair_labels=labels)
    for name in ("logits", "embeddings", "pooler_output", "loss"):
        assert torch.equal(getattr(again, name), getattr(reference, name)), name
    assert type(AutoConfig.from_pretrained(tmp_path)) is SimLAPConfig


def test_classifier_takes_over_pretrained_backbone(tmp_path, batch):
    pixels, _ = batch
    pretrained = SimLAPModel(tiny_config())
    pretrained.save_pretrained(tmp_path)
    labels = {0: "a", 1: "b", 2: "c"}
    classifier = SimLAPForImageClassification.from_pretrained(
        tmp_path, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    for name, tensor in pretrained.backbone.state_dict().items():
        assert torch.equal(classifier.backbone.state_dict()[name], tensor), name
    assert classifier.classifier.weight.shape == (3, pretrained.feature_dim)
    assert torch.isfinite(classifier.classifier.weight).all() and classifier.classifier.weight.std() > 0
    assert not hasattr(classifier, "projector")
    logits = classifier.eval()(pixels).logits
    assert logits.shape == (8, 3)
    auto = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert type(auto) is SimLAPForImageClassification


def test_classifier_round_trip_and_soft_targets(tmp_path, batch):
    pixels, labels = batch
    model = SimLAPForImageClassification(tiny_config()).eval()
    soft = torch.nn.functional.one_hot(labels, 4).float()
    hard_loss, soft_loss = model(pixels, labels=labels).loss, model(pixels, labels=soft).loss
    assert hard_loss.item() == pytest.approx(soft_loss.item(), rel=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(pixels).logits, model(pixels).logits)


def test_classifier_layer_groups_follow_timm():
    model = SimLAPForImageClassification(tiny_config(backbone="resnet18", backbone_kwargs={}))
    matcher = model.group_matcher()
    groups = {name: matcher(name)[0] for name, _ in model.named_parameters()}
    assert groups["backbone.conv1.weight"] == 0
    assert groups["backbone.layer1.0.conv1.weight"] == 1 and groups["backbone.layer4.1.conv2.weight"] == 8
    assert groups["classifier.weight"] == 9


def test_fuse_model_outputs_and_gate(batch):
    pixels, labels = batch
    config = SimLAPFuseConfig(backbone="resnet10t", num_classes=4, head_dim=512, head_hidden_mult=1, iter_num=2)
    model = SimLAPFuseForImageClassification(config)
    out = model(pixels, labels=labels)
    assert out.logits.shape == (8, 4) and torch.isfinite(out.loss)
    out.loss.backward()
    gate = model.class_gate(torch.tensor([0, 1]), torch.tensor([0, 2]))
    weight = model.classifier.weight.detach()
    assert torch.equal(gate[0], (weight[0] != 0).float())
    assert torch.equal(gate[1], (weight[1] * weight[2] > 0).float())
    assert not gate.requires_grad
    model.eval()
    cosine = model(pixels).logits
    assert cosine.abs().max() <= 1.0


def test_fuse_width_mismatch_is_a_clear_error():
    config = SimLAPFuseConfig(backbone="resnet10t", num_classes=4, head_dim=256)
    with pytest.raises(ValueError, match="has 512 features but head_dim=256"):
        SimLAPFuseForImageClassification(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(gate="soft"), r"gate='soft' is not valid; choose one of fused, product, open"),
        (dict(pair_mode="random"), r"pair_mode='random' is not valid; choose one of arbitrary, identical, distinct"),
        (dict(temperature=0.0), r"temperature=0.0 is not valid; it must be > 0"),
        (dict(temperature=-1.0), r"temperature=-1.0"),
        (dict(backbone="resnet181"), r"backbone='resnet181' is not a timm model name. Did you mean: resnet18"),
        (dict(out_dim=0), r"out_dim=0"),
    ],
)
def test_bad_configuration_fails_at_construction(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_labels_out_of_range_are_rejected(batch):
    pixels, _ = batch
    model = SimLAPModel(tiny_config())
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\).*from 0 to 4"):
        model(pixels, labels=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]))
    with pytest.raises(ValueError, match=r"from -1"):
        model.gate(torch.tensor([-1]), torch.tensor([0]))


def test_unknown_forward_arguments_are_named():
    from simlap_hf.modeling_simlap import SimLAPFuseForImageClassification

    config = SimLAPConfig(
        backbone="resnet10t",
        num_classes=3,
        out_dim=8,
        mlp_dim=16,
        filter_embed_dim=8,
        filter_hidden_dim=8,
        image_size=16,
    )
    pixels, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    for model in (SimLAPModel(config), SimLAPForImageClassification(config)):
        with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) 'label'; it takes pixel_values, labels"):
            model(pixels, label=labels)
        model(pixels, output_hidden_states=False)  # transformers' switches are accepted
    fuse = SimLAPFuseForImageClassification(
        SimLAPFuseConfig(backbone="resnet10t", num_classes=3, image_size=16, head_hidden_mult=1)
    )
    with pytest.raises(TypeError, match="'soft_label'"):
        fuse(pixels, soft_label=labels)


def test_gate_registry_matches_the_config_kinds():
    from simlap_hf.configuration_simlap import GATE_KINDS
    from simlap_hf.modeling_simlap import GATE_FUNCTIONS, SimLAPFeatureFilter

    assert set(GATE_FUNCTIONS) | {"open"} == set(GATE_KINDS)
    with pytest.raises(ValueError, match="Unknown gate kind 'sigmoid'"):
        SimLAPFeatureFilter(3, 8, 8, 8, kind="sigmoid")


def test_logged_outputs_are_scalar_fields_of_the_output(batch):
    """The loss terms and statistics that training logs are declared by the model: each is a scalar of its output."""
    pixels, labels = batch
    out = SimLAPModel(tiny_config()).train()(pixels, labels=labels)
    for name in SimLAPModel.logged_outputs:
        value = getattr(out, name)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, name


# Imports the code files of a saved model folder (as transformers' remote code does) with only torch, timm and
# transformers usable: simlap_hf and the training-time libraries are blocked, then a model is built and run.
BLOCKED_IMPORT_CHECK = """
import importlib.util
import json
import sys
from pathlib import Path

import timm  # noqa: F401
import torch
import transformers  # noqa: F401
from transformers import PreTrainedModel  # noqa: F401

BLOCKED = ("simlap_hf", "datasets", "evaluate", "accelerate")


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the saved model code must not need it")
        return None


for module in [name for name in sys.modules if name.split(".")[0] in BLOCKED]:
    del sys.modules[module]
sys.meta_path.insert(0, Blocker())

folder = Path(sys.argv[1])
spec = importlib.util.spec_from_file_location("saved_model", folder / "__init__.py",
                                              submodule_search_locations=[str(folder)])
package = importlib.util.module_from_spec(spec)
sys.modules["saved_model"] = package
names = sorted(path.stem for path in folder.glob("*.py") if path.stem != "__init__")
for name in names:
    importlib.import_module(f"saved_model.{name}")
config_values = json.loads((folder / "config.json").read_text())
configuration = sys.modules["saved_model.configuration_simlap"]
modeling = sys.modules["saved_model.modeling_simlap"]
config = configuration.SimLAPConfig.from_dict(config_values)
model = modeling.SimLAPModel(config).eval()
with torch.no_grad():
    out = model(torch.randn(2, 3, 16, 16), labels=torch.tensor([0, 1]))
assert torch.isfinite(out.loss)
print("IMPORTED", ",".join(names))
"""


@pytest.mark.e2e
def test_saved_model_code_imports_with_torch_timm_transformers_only(tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "saved"
    SimLAPModel(tiny_config()).save_pretrained(folder)
    (folder / "__init__.py").write_text("")
    script = tmp_path / "check.py"
    script.write_text(BLOCKED_IMPORT_CHECK)
    result = subprocess.run(
        [sys.executable, str(script), str(folder)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    imported = result.stdout.strip().splitlines()[-1].removeprefix("IMPORTED ").split(",")
    assert {"configuration_simlap", "modeling_simlap", "losses"} <= set(imported)
