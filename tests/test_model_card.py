"""The model card states what the run did: the kNN accuracy names the number of neighbours the run used."""

import json

from conftest import tiny_config, tiny_run_flags

import train_pretrain
from simlap_hf.evaluation import DEFAULT_KNN_K
from simlap_hf.model_card import build_model_card


def test_card_names_the_knn_k_the_run_used(tiny_image_folder, tmp_path):
    knn_k = DEFAULT_KNN_K // 2 + 1  # not the default
    output_dir = tmp_path / "run"
    train_pretrain.run(tiny_run_flags(output_dir, tiny_image_folder, num_train_epochs=1, knn_k=knn_k))
    results = json.loads((output_dir / "all_results.json").read_text())
    assert "eval_knn_top1" in results
    card = (output_dir / "README.md").read_text()
    assert f"name: kNN (k={knn_k}) top-1 accuracy" in card
    assert f"k={DEFAULT_KNN_K})" not in card
    assert f"| knn_k | {knn_k} |" in card


def test_card_without_a_recorded_knn_k_does_not_invent_one(tmp_path):
    card = build_model_card(tmp_path, "pretrain", tiny_config(), {"eval_knn_top1": 50.0}, {"seed": 0}, "digits")
    assert "name: kNN top-1 accuracy" in card.content and "(k=" not in card.content
