"""Class relations from the gates: relation matrix, related_classes, shared_dimensions, saving, precision."""

import json

import numpy as np
import pytest
import torch

from simlap_hf import SimLAPConfig, SimLAPModel
from simlap_hf.analysis import gate_matrix
from simlap_hf.hub import build_model_card
from simlap_hf.relations import (
    DEFAULT_MEASURE,
    MEASURES,
    ClassRelations,
    class_mean_cosine,
    precision_at_k,
    ranked_pairs,
    save_class_relations,
)

NAMES = ["cat", "dog", "car", "truck", "ship"]


def tiny_model(gate: str = "fused") -> SimLAPModel:
    torch.manual_seed(0)
    config = SimLAPConfig(
        backbone="resnet10t",
        num_classes=len(NAMES),
        out_dim=12,
        mlp_dim=16,
        gate=gate,
        image_size=16,
        id2label=dict(enumerate(NAMES)),
        label2id={n: i for i, n in enumerate(NAMES)},
    )
    model = SimLAPModel(config)
    if model.feature_filter is not None:
        torch.nn.init.normal_(model.feature_filter.mlp[-1].weight, std=3.0)  # spread the gates
    return model.eval()


@pytest.mark.parametrize("measure", [m for m in MEASURES if m != "class_mean_cosine"])
def test_relation_matrix_is_read_from_the_gates_and_related_classes_agree_with_it(measure):
    model = tiny_model()
    relations = ClassRelations.from_model(model, measure)
    gates = gate_matrix(model).double()  # (C, C, K)
    g = gates.clamp(1e-7, 1 - 1e-7)
    expected = {
        "mean_activation": gates.mean(-1),
        "open_fraction": (gates >= 0.5).double().mean(-1),
        "entropy": (-(g * g.log() + (1 - g) * (1 - g).log())).mean(-1),
    }
    source, sign, _ = MEASURES[measure]
    matrix = sign * expected[source].numpy()
    matrix = (matrix + matrix.T) / 2
    off = ~np.eye(len(NAMES), dtype=bool)
    np.testing.assert_allclose(relations.relatedness[off], matrix[off], rtol=1e-9, atol=1e-12)
    assert np.isnan(np.diag(relations.relatedness)).all()
    for name in NAMES:
        i = NAMES.index(name)
        related = relations.related_classes(name, k=len(NAMES))
        assert [other for other, _ in related] == sorted(
            (n for n in NAMES if n != name), key=lambda n: (-matrix[i, NAMES.index(n)], NAMES.index(n))
        )
        assert [score for _, score in related] == pytest.approx([matrix[i, NAMES.index(o)] for o, _ in related])
        assert relations.related_classes(name, k=2) == related[:2]
    most = relations.most_related_pairs(3)
    assert [(a, b) for a, b, _ in most] == [(NAMES[i], NAMES[j]) for i, j in ranked_pairs(matrix)[:3]]
    assert most[0][2] == pytest.approx(np.nanmax(np.where(off, matrix, np.nan)))


def test_shared_dimensions_are_the_open_dimensions_of_the_pair_gate():
    model = tiny_model()
    relations = ClassRelations.from_model(model)
    with torch.no_grad():
        gate = model.gate(torch.tensor([1]), torch.tensor([3]))[0]
    dims = relations.shared_dimensions("dog", "truck")
    assert dims == (gate >= 0.5).nonzero().flatten().tolist()
    assert relations.shared_dimensions("truck", "dog") == dims  # the fused gate is symmetric
    assert 0 < len(dims) < 12
    with pytest.raises(
        ValueError, match=r"Class 'horse' is not a class of the model; pass one of its class names \(cat, dog"
    ):
        relations.related_classes("horse")
    # An integer is a class id, also when the class names are digits ("0".."9" data sets).
    assert relations.related_classes(1) == relations.related_classes("dog")
    with pytest.raises(ValueError, match=r"Class id 12 is out of range: the model has 5 classes \(ids 0 to 4\)"):
        relations.related_classes(12)


def test_save_load_card_and_heatmap(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert save_class_relations(model, tmp_path)
    saved = json.loads((tmp_path / "class_relations.json").read_text())
    assert saved["measure"] == DEFAULT_MEASURE and saved["label_names"] == NAMES
    loaded = ClassRelations.load(tmp_path)
    original = ClassRelations.from_model(model)
    np.testing.assert_allclose(loaded.relatedness, original.relatedness, equal_nan=True)
    assert loaded.related_classes("car", 2) == original.related_classes("car", 2)
    assert [item["class"] for item in saved["related_classes"]["car"]][:2] == [
        name for name, _ in original.related_classes("car", 2)
    ]
    with pytest.raises(ValueError, match="needs the gates"):
        loaded.shared_dimensions("cat", "dog")
    assert (tmp_path / "class_relations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = build_model_card(tmp_path, "pretrain", model.config, {"eval_top1": 50.0}, {"seed": 0}, "digits")
    assert "## Class relations" in card.text and "![class relatedness](class_relations.png)" in card.text
    a, b, _ = original.most_related_pairs(1)[0]
    assert f"{a} / {b}" in card.text
    # The open gate has no filter: nothing to write, and the API says why.
    open_model = tiny_model("open")
    assert not save_class_relations(open_model, tmp_path / "unused")
    with pytest.raises(ValueError, match="open gate"):
        ClassRelations.from_model(open_model)


def test_precision_at_k_and_class_mean_cosine():
    relatedness = np.array(
        [[np.nan, 0.9, 0.1, 0.2], [0.9, np.nan, 0.3, 0.8], [0.1, 0.3, np.nan, 0.5], [0.2, 0.8, 0.5, np.nan]]
    )
    groups = [[0, 1], [2, 3]]
    assert ranked_pairs(relatedness)[:3] == [(0, 1), (1, 3), (2, 3)]
    assert precision_at_k(relatedness, groups, 1) == 1.0
    assert precision_at_k(relatedness, groups, 3) == pytest.approx(2 / 3)
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    cosine = class_mean_cosine(features, torch.tensor([0, 0, 1, 2]), 3)
    assert cosine[0, 1] == pytest.approx(0.0) and cosine[0, 2] == pytest.approx(2**-0.5)
    assert np.isnan(cosine[1, 1])


def test_relations_from_class_mean_features():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0]])
    relations = ClassRelations.from_features(features, torch.tensor([0, 1, 2, 3, 4]), ["a", "b", "c", "d", "e"])
    assert relations.measure == "class_mean_cosine"
    assert [name for name, _ in relations.related_classes("a", 2)] == ["b", "e"]
    assert relations.most_related_pairs(1)[0][:2] == ("c", "d")


@pytest.fixture
def dummy_gate():
    """A gate kind registered for one test only: the registry and the gate functions are restored afterwards."""
    from simlap_hf.configuration_simlap import GATE_KINDS, GateKind
    from simlap_hf.modeling_simlap import GATE_FUNCTIONS, register_gate

    name = "dummy_difference"
    kind = GateKind(option_fields=("gumbel_temperature",), regularizer_weight="stochastic_gate_lambda")

    @register_gate(name, kind)
    def difference_gate(feature_filter, labels, pair_labels):
        """sigmoid(mlp(E[y1]) - mlp(E[y2])) / tau, (B, K), and the mean gate as its regulariser."""
        both = feature_filter.mlp(feature_filter.label_embedding(torch.cat([labels, pair_labels])))
        first, second = both.chunk(2)
        gates = torch.sigmoid((first - second) / feature_filter.gumbel_temperature)
        return gates, gates.mean()

    try:
        yield name
    finally:
        GATE_KINDS.pop(name, None)
        GATE_FUNCTIONS.pop(name, None)


def test_a_gate_registered_in_one_place_gets_relations_analysis_and_a_card(dummy_gate, tmp_path):
    from simlap_hf.analysis import analyze_gates
    from simlap_hf.configuration_simlap import GATE_KINDS, gate_has_filter

    assert gate_has_filter(dummy_gate)
    model = tiny_model(dummy_gate)
    model.config.stochastic_gate_lambda = 0.25
    # Training: the kind's regulariser is weighted by the field the registry names and logged.
    model.train()
    out = model(pixel_values=torch.randn(6, 3, 16, 16), labels=torch.tensor([0, 1, 2, 3, 4, 0]))
    assert "gate_regularizer_loss" in model.logged_outputs
    with torch.no_grad():
        regularizer = model.feature_filter.gates_and_regularizer(torch.tensor([0, 1, 2, 3, 4, 0]), out.pair_labels)[1]
    assert float(out.gate_regularizer_loss) == pytest.approx(0.25 * float(regularizer), rel=1e-4, abs=1e-6)
    model.eval()
    model.save_pretrained(tmp_path)
    assert save_class_relations(model, tmp_path)
    saved = json.loads((tmp_path / "class_relations.json").read_text())
    assert saved["label_names"] == NAMES and len(saved["relatedness"]) == len(NAMES)
    report = analyze_gates(model)
    assert (
        report["gate"] == dummy_gate and report["has_filter"] and report["relation_measure"]["name"] == DEFAULT_MEASURE
    )
    card = build_model_card(tmp_path, "pretrain", model.config, {"eval_top1": 50.0}, {"seed": 0}, "digits")
    assert "## Class relations" in card.text
    for field in GATE_KINDS[dummy_gate].option_fields:
        assert f"| {field} |" in card.text
    assert f"| gate | {dummy_gate} |" in card.text
