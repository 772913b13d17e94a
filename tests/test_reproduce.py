"""benchmarks/reproduce.py's budget handling. Its runs end to end are the README's commands, in
tests/test_user_runs.py::test_reproduce_commands."""

from pathlib import Path

import pytest
import reproduce
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_budget_flags_leave_pretraining_model_flags_out_of_fine_tuning():
    budget = {"train": {"out_dim": 16, "temperature": 0.1, "learning_rate": 0.002, "mean": [0.5, 0.4]}}
    assert reproduce.budget_flags(budget, "pretrain") == [
        "--out_dim",
        "16",
        "--temperature",
        "0.1",
        "--learning_rate",
        "0.002",
        "--mean",
        "0.5",
        "0.4",
    ]
    assert reproduce.budget_flags(budget, "finetune") == ["--learning_rate", "0.002", "--mean", "0.5", "0.4"]


def test_overrides_change_known_training_values_and_refuse_others():
    budget = {"train": {"num_train_epochs": 8, "mean": [0.5]}}
    reproduce.apply_overrides(budget, ["num_train_epochs=3", "mean=[0.25]"])
    assert budget["train"] == {"num_train_epochs": 3, "mean": [0.25]}
    with pytest.raises(ValueError, match=r"'epochs=3'.*one of the budget's training keys \(num_train_epochs, mean\)"):
        reproduce.apply_overrides(budget, ["epochs=3"])
    with pytest.raises(ValueError, match="expected KEY=VALUE"):
        reproduce.apply_overrides(budget, ["num_train_epochs"])
    budget["evaluation"] = {"transfer_dataset_name": "digits"}
    reproduce.apply_overrides(budget, ["evaluation.transfer_dataset_name=cifar100"])
    assert budget["evaluation"] == {"transfer_dataset_name": "cifar100"}
    with pytest.raises(ValueError, match=r"evaluation.KEY \(evaluation.transfer_dataset_name\)"):
        reproduce.apply_overrides(budget, ["evaluation.knn_k=5"])


@pytest.mark.parametrize("name", ["reproduce_fmnist_cpu.yaml", "reproduce_fmnist_cpu_8ep.yaml"])
def test_published_budgets_parse_for_every_variant(name):
    """Every flag of the published budgets is accepted by the script it goes to (a typo would only show after
    an hour of training otherwise)."""
    budget = yaml.safe_load((ROOT / "benchmarks" / "configs" / name).read_text())
    for script, argument_classes in reproduce.ARGUMENTS.items():
        flags = reproduce.budget_flags(budget, script) + ["--output_dir", "unused"]
        parsed = reproduce.parse_args(argument_classes, flags)
        assert parsed[-1].num_train_epochs == budget["train"]["num_train_epochs"]


def test_reproduce_imports_the_package_not_the_training_scripts():
    import ast

    tree = ast.parse((ROOT / "benchmarks" / "reproduce.py").read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not [name for name in imported if name.startswith("train_")], imported
