"""Gate analysis, representation analysis and the ``python -m simlap_hf.analyze`` report, on tiny offline models."""

import json

import numpy as np
import pytest
import timm
import torch
from conftest import write_image_folder
from datasets import DatasetDict
from PIL import Image
from safetensors.torch import save_file

from simlap_hf import SimLAPConfig, SimLAPModel
from simlap_hf.analysis import (
    OPEN_GATE_NOTE,
    analyze_gates,
    analyze_model,
    gate_matrix,
    plot_gate_heatmap,
    summary_markdown,
)
from simlap_hf.analyze import run
from simlap_hf.data import (
    DataArguments,
    create_eval_dataloader,
    get_label_names,
    load_image_dataset,
    with_image_transforms,
)

NAMES = ("cat", "dog", "car", "truck", "ship")


def tiny_simlap(gate: str = "fused", names=NAMES, seed: int = 0) -> SimLAPModel:
    """A tiny SimLAPModel whose feature filter has non-trivial BatchNorm statistics and spread-out gates."""
    torch.manual_seed(seed)
    config = SimLAPConfig(
        backbone="resnet10t",
        out_dim=8,
        mlp_dim=16,
        filter_embed_dim=8,
        filter_hidden_dim=16,
        gate=gate,
        image_size=16,
        id2label=dict(enumerate(names)),
    )
    model = SimLAPModel(config)
    if model.feature_filter is not None:
        torch.nn.init.normal_(model.feature_filter.mlp[-1].weight, std=3.0)
        model.train()
        with torch.no_grad():
            for _ in range(3):  # move the BatchNorm running statistics away from their initial values
                model.gate(torch.randint(0, len(names), (32,)), torch.randint(0, len(names), (32,)))
    return model


@pytest.mark.parametrize("gate", ["fused", "product"])
def test_gate_matrix_is_symmetric_and_its_diagonal_holds_single_class_gates(gate):
    model = tiny_simlap(gate)
    model.train()
    gates = gate_matrix(model, batch_size=7)  # several row blocks
    C, K = len(NAMES), model.config.out_dim
    assert gates.shape == (C, C, K) and not gates.requires_grad
    assert model.training and model.feature_filter.training  # train/eval flags restored
    assert gates.min() >= 0 and gates.max() <= 1
    torch.testing.assert_close(gates, gates.transpose(0, 1), atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        single = model.gate(torch.arange(C), torch.arange(C))
        torch.testing.assert_close(gates[torch.arange(C), torch.arange(C)], single, atol=1e-6, rtol=0)
        pair = model.gate(torch.tensor([1]), torch.tensor([3]))
    torch.testing.assert_close(gates[1, 3], pair[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(gate_matrix(model, batch_size=10_000), gates, atol=1e-6, rtol=0)
    assert gates.std() > 0.05  # the fixture really spreads the gates


def test_analyze_gates_matrices_pairs_and_statistics():
    model = tiny_simlap("fused")
    report = analyze_gates(model, top_k=3)
    gates = gate_matrix(model)
    C, K = gates.shape[0], gates.shape[2]
    assert report["has_filter"] and report["gate"] == "fused" and report["dim"] == K
    assert report["label_names"] == list(NAMES)
    activation = np.asarray(report["matrices"]["mean_activation"])
    np.testing.assert_allclose(activation, gates.double().mean(-1).numpy(), atol=1e-6)
    np.testing.assert_allclose(activation, activation.T, atol=1e-6)
    open_fraction = np.asarray(report["matrices"]["open_fraction"])
    np.testing.assert_allclose(open_fraction, (gates >= 0.5).double().mean(-1).numpy())
    jaccard = np.asarray(report["matrices"]["jaccard"])
    open_sets = (gates[torch.arange(C), torch.arange(C)] >= 0.5).numpy()
    for i in range(C):
        for j in range(C):
            union = np.logical_or(open_sets[i], open_sets[j]).sum()
            expected = np.logical_and(open_sets[i], open_sets[j]).sum() / union if union else 0.0
            assert jaccard[i, j] == pytest.approx(expected)

    # Pairs are ranked by the gate entropy (most undecided gates = most related; see simlap_hf.relations).
    assert report["relation_measure"]["name"] == "gate_entropy"
    entropy = np.asarray(report["matrices"]["entropy"])
    g = gates.double().clamp(1e-7, 1 - 1e-7)
    np.testing.assert_allclose(entropy, (-(g * g.log() + (1 - g) * (1 - g).log())).mean(-1).numpy(), atol=1e-6)
    most, least = report["most_related"], report["least_related"]
    assert len(most) == len(least) == 3
    for pair in most + least:
        i, j = pair["indices"]
        assert i != j and pair["classes"] == [NAMES[i], NAMES[j]]
        assert pair["mean_activation"] == pytest.approx(activation[i, j])
        assert pair["relatedness"] == pytest.approx(entropy[i, j]) == pytest.approx(pair["entropy"])
    values = [pair["relatedness"] for pair in most]
    assert values == sorted(values, reverse=True)
    off_diagonal = entropy[~np.eye(C, dtype=bool)]
    assert most[0]["relatedness"] == pytest.approx(off_diagonal.max())
    assert least[0]["relatedness"] == pytest.approx(off_diagonal.min())

    stats = report["stats"]
    g = gates.double().clamp(1e-7, 1 - 1e-7)
    entropy = -(g * g.log() + (1 - g) * (1 - g).log()).mean().item()
    assert stats["mean_entropy_nats"] == pytest.approx(entropy, rel=1e-6)
    assert stats["mean_entropy_bits"] == pytest.approx(entropy / np.log(2), rel=1e-6)
    near = ((gates <= 0.05) | (gates >= 0.95)).double().mean().item()
    assert stats["near_binary_fraction"] == pytest.approx(near)
    assert stats["is_symmetric"]
    histogram = report["histogram"]
    assert sum(histogram["same_class_counts"]) == C * K
    assert sum(histogram["cross_class_counts"]) == C * (C - 1) * K
    json.dumps(report)  # JSON-friendly


def test_open_gate_reports_that_there_is_no_filter():
    model = tiny_simlap("open")
    assert torch.equal(gate_matrix(model), torch.ones(len(NAMES), len(NAMES), 8))
    report = analyze_gates(model)
    assert report["gate"] == "open" and report["has_filter"] is False
    assert report["note"] == OPEN_GATE_NOTE and "no feature filter" in report["note"]
    assert "most_related" not in report and "matrices" not in report
    with pytest.raises(ValueError, match="no feature filter"):
        plot_gate_heatmap(report, "unused.png")
    assert "no feature filter" in summary_markdown({"gates": report, "collapse": {}, "validation": {}})


def _tiny_loaders(folder, input_size=16):
    data_args = DataArguments(train_dir=folder, train_val_split=0.25, input_size=input_size)
    dataset = load_image_dataset(data_args, seed=0)
    views = with_image_transforms(DatasetDict(train_eval=dataset["train"], validation=dataset["validation"]), data_args)
    names = get_label_names(dataset)
    return create_eval_dataloader(views["train_eval"], 32), create_eval_dataloader(views["validation"], 32), names


def test_analyze_model_and_summary_markdown(tiny_image_folder):
    train_loader, validation_loader, names = _tiny_loaders(tiny_image_folder)
    model = tiny_simlap("product", names=names)
    model.train()
    report = analyze_model(model, train_loader, validation_loader, names, knn_k=5, show_progress=False)
    assert model.training
    assert report["model_class"] == "SimLAPModel" and report["embedding_source"] == "embeddings"
    assert report["label_names"] == names and report["gates"]["label_names"] == names
    assert report["collapse"]["dim"] == 8 and report["feature_dim"] == model.feature_dim
    validation = report["validation"]
    assert validation["num_train"] == 36 and validation["num_query"] == 12 and validation["knn_k"] == 5
    assert 0 <= validation["knn_top1"] <= 100 and 0 <= validation["linear_probe_top1"] <= 100
    assert report["warnings"] == []

    text = summary_markdown(report)
    first, second = report["gates"]["most_related"][0]["classes"]
    assert f"**{first} / {second}**" in text
    for phrase in ("Effective rank", "99% of the variance", "kNN top-1", "Linear-probe top-1"):
        assert phrase in text
    assert summary_markdown(report, heading="## Representation analysis").startswith("## Representation analysis\n")

    timm_model = timm.create_model("resnet10t", num_classes=0)
    plain = analyze_model(
        timm_model, train_loader, validation_loader, names, knn_k=5, run_linear_probe=False, show_progress=False
    )
    assert plain["gates"] is None and plain["embedding_source"] == "pooler_output"
    assert plain["collapse"]["dim"] == timm_model.num_features and plain["validation"]["linear_probe_top1"] is None


def _check_png(path, min_width=700, min_height=400):
    assert path.is_file() and path.stat().st_size > 10_000, path
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG"
        width, height = image.size
        assert width >= min_width and height >= min_height, (path, image.size)
        pixels = np.asarray(image.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50, path  # a real picture, not a blank canvas
    return width, height


def test_analyze_command_writes_report_and_figures(tiny_image_folder, tmp_path):
    names = get_label_names(load_image_dataset(DataArguments(train_dir=tiny_image_folder, train_val_split=0.25)))
    simlap_dir, supcon_dir = tmp_path / "simlap", tmp_path / "supcon"
    tiny_simlap("fused", names=names).save_pretrained(simlap_dir)
    tiny_simlap("open", names=names).save_pretrained(supcon_dir)
    weights = tmp_path / "resnet10t.safetensors"
    save_file(timm.create_model("resnet10t", num_classes=7).state_dict(), weights)  # its classifier is dropped
    transfer = write_image_folder(tmp_path / "transfer_images", images_per_class=6, seed=5)
    transfer_dir = tmp_path / "transfer_saved"
    load_image_dataset(DataArguments(train_dir=transfer, train_val_split=0.25)).save_to_disk(transfer_dir)
    output = tmp_path / "report"

    report = run(
        [
            "--model_name_or_path",
            str(simlap_dir),
            str(supcon_dir),
            "--timm_model",
            f"resnet10t={weights}",
            "--labels",
            "SimLAP",
            "SupCon",
            "ResNet-10t",
            "--train_dir",
            tiny_image_folder,
            "--train_val_split",
            "0.25",  # no --input_size: the models' image_size (16)
            "--transfer_dataset_name",
            str(transfer_dir),
            "--knn_k",
            "5",
            "--batch_size",
            "64",
            "--output_dir",
            str(output),
        ]
    )

    saved = json.loads((output / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"JSON has {c}"))
    assert saved == report
    assert saved["dataset"]["label_names"] == names and saved["dataset"]["input_size"] == 16
    assert saved["transfer_dataset"]["num_classes"] == 4
    assert [m["name"] for m in saved["models"]] == ["SimLAP", "SupCon", "ResNet-10t"]
    simlap, supcon, resnet = saved["models"]
    assert simlap["gates"]["label_names"] == names
    assert {tuple(p["classes"]) for p in simlap["gates"]["most_related"]} <= {
        (a, b) for a in names for b in names if a != b
    }
    assert supcon["gates"]["has_filter"] is False and "no feature filter" in supcon["gates"]["note"]
    assert resnet["gates"] is None and resnet["embedding_source"] == "pooler_output" and resnet["kind"] == "timm"
    for model in saved["models"]:
        assert 0 <= model["validation"]["knn_top1"] <= 100 and 0 <= model["validation"]["linear_probe_top1"] <= 100
        assert (
            0 <= model["transfer"]["knn_top1"] <= 100
            and model["transfer"]["num_query"] == saved["transfer_dataset"]["num_validation"]
        )
        assert model["collapse"]["effective_rank"] >= 1

    markdown = (output / "report.md").read_text()
    for text in ("SimLAP", "SupCon", "ResNet-10t", "singular_values.png", "no feature filter", "Transfer"):
        assert text in markdown
    first, second = simlap["gates"]["most_related"][0]["classes"]
    assert f"**{first} / {second}**" in markdown

    spectrum_size = _check_png(output / "singular_values.png", min_width=1000)
    assert spectrum_size[0] > spectrum_size[1]
    maps = [model["figures"]["embedding_map"] for model in saved["models"]]
    assert sorted(p.name for p in output.glob("*.png")) == sorted(
        ["gate_heatmap_SimLAP.png", "gate_histogram_SimLAP.png", "singular_values.png", *maps]
    )
    for model, name in zip(saved["models"], maps):  # one t-SNE map per model, coloured by class, in the report
        assert name.startswith("embedding_map_") and model["embedding_map_method"] in ("tsne", "umap")
        _check_png(output / name)
        assert f"({name})" in markdown
    _check_png(output / simlap["figures"]["gate_heatmap"], min_width=1000)
    _check_png(output / simlap["figures"]["gate_histogram"])
    arrays = np.load(output / simlap["figures"]["gate_arrays"])
    assert arrays["pair_gates"].shape == (4, 4, 8) and list(arrays["label_names"]) == names


def test_analyze_command_rejects_a_wrong_number_of_labels(tmp_path):
    with pytest.raises(ValueError, match="one name per model"):
        run(["--timm_model", "resnet10t", "--labels", "a", "b", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(ValueError, match="Nothing to analyse"):
        run(["--output_dir", str(tmp_path / "out")])


def test_embedding_map_of_a_split_too_small_for_tsne_is_skipped_with_a_warning(tmp_path, caplog):
    """A 4-image validation split: no t-SNE map (it needs 5 points), a warning that says so, and no error, so the rest
    of the report is still written."""
    from conftest import tiny_config

    from simlap_hf.analyze import MIN_MAP_POINTS, _embedding_map_figure

    model = SimLAPModel(tiny_config()).eval()
    batch = {"pixel_values": torch.randn(4, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3])}
    with caplog.at_level("WARNING", logger="simlap_hf.analyze"):
        figure = _embedding_map_figure(
            model, [batch], ["a", "b", "c", "d"], "tiny", tmp_path / "map.png", 100, "tsne", 0, "features"
        )
    assert figure is None and not (tmp_path / "map.png").exists()
    assert f"at least {MIN_MAP_POINTS} validation images, the split has 4" in caplog.text
    five = {"pixel_values": torch.randn(5, 3, 16, 16), "labels": torch.tensor([0, 1, 2, 3, 0])}
    figure = _embedding_map_figure(
        model, [five], ["a", "b", "c", "d"], "tiny", tmp_path / "map.png", 100, "tsne", 0, "features"
    )
    assert figure == ("map.png", "tsne") and (tmp_path / "map.png").is_file()
