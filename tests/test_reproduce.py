"""benchmarks/reproduce.py end to end on a tiny budget (scikit-learn digits as source and transfer set)."""

import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import reproduce  # noqa: E402

VARIANTS = ["simlap_fused_arbitrary", "supcon_open_arbitrary", "cross_entropy", "untrained"]


def tiny_budget(path: Path) -> Path:
    budget = {
        "seeds": [0],
        "threads": 2,
        "evaluation": {"transfer_dataset_name": "digits"},
        "train": {
            "dataset_name": "digits",
            "max_train_samples": 240,
            "max_eval_samples": 60,
            "model_name": "resnet10t",
            "stem_type": "",
            "output_stride": 8,
            "num_channels": 1,
            "input_size": 16,
            "mean": [0.5],
            "std": [0.5],
            "aa": "none",
            "reprob": 0.0,
            "ra": 3,
            "per_device_train_batch_size": 48,
            "per_device_eval_batch_size": 64,
            "num_train_epochs": 1,
            "warmup_epochs": 0,
            "opt": "adam",
            "learning_rate": 0.002,
            "out_dim": 16,
            "mlp_dim": 32,
            "temperature": 0.1,
            "eval_every": 1,
            "checkpointing_epochs": 1,
            "logging_steps": 5,
        },
    }
    path.write_text(yaml.safe_dump(budget))
    return path


def test_reproduce_trains_evaluates_reports_and_reuses_finished_runs(tmp_path, monkeypatch):
    budget = tiny_budget(tmp_path / "budget.yaml")
    output_dir = tmp_path / "reproduce"
    reproduce.main([str(budget), "--output_dir", str(output_dir), "--variants", *VARIANTS])

    report = json.loads((output_dir / "results.json").read_text())
    assert [run["variant"] for run in report["runs"]] == VARIANTS
    for run in report["runs"]:
        for metric in ("knn_top1", "probe_top1", "transfer_knn_top1", "transfer_probe_top1"):
            assert 0.0 <= run[metric] <= 100.0, (run["variant"], metric)
        # K=16 projections; the cross-entropy model's 512-d features on 360 validation images have 360 values.
        assert len(run["spectrum"]) == (16 if run["variant"] != "cross_entropy" else 360)
        assert ("online_top1" in run) == (run["variant"] != "cross_entropy")
    untrained = report["summary"]["untrained"]
    assert untrained["online_top1"]["mean"] < 35.0  # a head that never trained is near chance (10 classes)
    table = (output_dir / "results.md").read_text()
    for name in VARIANTS:
        assert f"| {reproduce.LABELS[name]} |" in table
    assert (output_dir / "results.png").stat().st_size > 10_000
    assert not (output_dir / "untrained_seed0" / "model.safetensors").exists()  # evaluated, never trained

    # A second call reuses every finished run instead of training again.
    def no_training(script, flags):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(reproduce, "run_training_script", no_training)
    reproduce.main([str(budget), "--output_dir", str(output_dir), "--variants", *VARIANTS])
    assert json.loads((output_dir / "results.json").read_text())["runs"] == report["runs"]


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
