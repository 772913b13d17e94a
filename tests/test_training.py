"""train_pretrain.py end to end on tiny on-disk data: training, evaluation, checkpoints, resume, saving, errors."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_flags, two_process_command
from safetensors.torch import load_file

import simlap_hf.training as training
import simlap_hf.training.job as training_job
import simlap_hf.training.loop as training_loop
import train_pretrain
from simlap_hf import SimLAPModel
from simlap_hf.data import DataArguments, prepare_data
from simlap_hf.training import PretrainModelArguments, TrainingArguments, parse_args

ROOT = Path(__file__).resolve().parents[1]


def tiny_flags(train_dir: str, output_dir: Path, epochs: int = 2) -> list[str]:
    return tiny_run_flags(output_dir, train_dir, num_train_epochs=epochs)


def test_end_to_end_trains_evaluates_checkpoints_and_saves(tiny_image_folder, tmp_path):
    output_dir = tmp_path / "run"
    model, results = train_pretrain.run(tiny_flags(tiny_image_folder, output_dir))
    for name in ("config.json", "model.safetensors", "README.md", "all_results.json", "training_log.jsonl"):
        assert (output_dir / name).is_file(), name
    saved = json.loads((output_dir / "all_results.json").read_text())
    assert saved == results
    for name in ("eval_top1", "eval_top5", "eval_knn_top1", "best_eval_top1", "train_images_per_second"):
        assert name in saved
    assert 0 <= saved["eval_top1"] <= 100 and saved["epochs"] == 2
    checkpoints = sorted(p.name for p in (output_dir / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-00000009", "checkpoint-00000018"]
    log = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    logged = set().union(*log)
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
        "lr",
        "eval_knn_top1",
    ):
        assert name in logged, name

    reloaded = SimLAPModel.from_pretrained(output_dir).eval()
    assert reloaded.config.id2label == {0: "blue", 1: "gray", 2: "green", 3: "red"}
    model.eval()
    data = prepare_data(
        parse_args(
            (PretrainModelArguments, DataArguments, TrainingArguments),
            tiny_flags(tiny_image_folder, tmp_path / "unused"),
        )[1],
        num_channels=3,
        train_batch_size=12,
        eval_batch_size=16,
        seed=7,
    )
    correct = total = 0
    with torch.no_grad():
        for batch in data.validation:
            logits = reloaded(batch["pixel_values"]).logits
            assert torch.equal(logits, model(batch["pixel_values"]).logits)
            correct += int((logits.argmax(1) == batch["labels"]).sum())
            total += len(batch["labels"])
    assert 100.0 * correct / total == pytest.approx(saved["eval_top1"], abs=1e-6)


def test_resume_after_epoch_one_matches_uninterrupted_run(tiny_image_folder, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    train_pretrain.run(tiny_flags(tiny_image_folder, straight, epochs=3))

    interrupted = tmp_path / "interrupted"
    original_save = training_loop.save_checkpoint

    def save_then_die(*args, **kwargs):
        original_save(*args, **kwargs)
        raise KeyboardInterrupt("killed after the first checkpoint")

    monkeypatch.setattr(training_loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_pretrain.run(tiny_flags(tiny_image_folder, interrupted, epochs=3))
    monkeypatch.setattr(training_loop, "save_checkpoint", original_save)
    assert not (interrupted / "model.safetensors").exists()
    train_pretrain.run(tiny_flags(tiny_image_folder, interrupted, epochs=3) + ["--resume_from_checkpoint", "latest"])

    expected = load_file(straight / "model.safetensors")
    resumed = load_file(interrupted / "model.safetensors")
    assert expected.keys() == resumed.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(resumed[name], tensor, atol=1e-6, rtol=0, msg=name)
    first = json.loads((straight / "all_results.json").read_text())
    second = json.loads((interrupted / "all_results.json").read_text())
    assert first["eval_top1"] == second["eval_top1"] and first["global_step"] == second["global_step"]


def test_incomplete_checkpoint_is_ignored(tmp_path):
    root = tmp_path / "checkpoints"
    good = root / "checkpoint-00000010"
    good.mkdir(parents=True)
    (good / "trainer_state.json").write_text(json.dumps({"global_step": 10}))
    (root / ".tmp-checkpoint-00000020").mkdir()
    broken = root / "checkpoint-00000030"
    broken.mkdir()
    assert training.find_checkpoint(tmp_path, "latest") == good


def test_cifar10_config_parses_to_the_paper_recipe():
    model_args, data_args, args = parse_args(
        (PretrainModelArguments, DataArguments, TrainingArguments),
        [str(ROOT / "configs/pretrain_cifar10_resnet18.yaml")],
    )
    assert (model_args.model_name, model_args.stem_type, model_args.output_stride) == ("resnet18", "deep", 8)
    assert (model_args.gate, model_args.pair_mode, model_args.temperature) == ("fused", "arbitrary", 0.1)
    assert (model_args.out_dim, model_args.mlp_dim, model_args.gate_penalty) == (256, 2048, 0.0)
    assert data_args.dataset_name == "cifar10" and data_args.input_size == 32
    assert data_args.scale == [0.7, 1.0] and data_args.ra == 3 and data_args.reprob == 0.1
    assert data_args.aa == "rand-m9-mstd0.5-inc1" and data_args.interpolation == "bicubic"
    assert data_args.mean == [0.4914, 0.4822, 0.4465] and data_args.std == [0.2470, 0.2435, 0.2616]
    assert data_args.crop_pct == 0.875
    assert (args.opt, args.learning_rate, args.weight_decay) == ("adam", 0.001, 0.0005)
    assert (args.num_train_epochs, args.warmup_epochs, args.warmup_lr, args.min_lr) == (50, 2, 1e-5, 1e-6)
    assert args.per_device_train_batch_size == 256 and args.eval_every == 2 and args.checkpointing_epochs == 2
    assert args.sched == "cosine" and args.mixed_precision == "fp16"


def test_flag_overrides_yaml_value():
    _, _, args = parse_args(
        (PretrainModelArguments, DataArguments, TrainingArguments),
        [str(ROOT / "configs/pretrain_cifar10_resnet18.yaml"), "--num_train_epochs", "1", "--opt", "sgd"],
    )
    assert args.num_train_epochs == 1 and args.opt == "sgd" and args.learning_rate == 0.001


def test_unknown_flag_and_yaml_key_list_close_matches(tmp_path):
    types = (PretrainModelArguments, DataArguments, TrainingArguments)
    with pytest.raises(ValueError, match=r"Unknown flags: num_train_epoch \(did you mean num_train_epochs"):
        parse_args(types, ["--num_train_epoch", "3"])
    config = tmp_path / "bad.yaml"
    config.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match=r"learning_rat \(did you mean learning_rate"):
        parse_args(types, [str(config)])


def test_bad_input_fails_before_training(tiny_image_folder, tmp_path, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training_job, "fit", no_training)
    flags = tiny_flags(tiny_image_folder, tmp_path / "a")
    with pytest.raises(ValueError, match=r"fewer than the 40 images of one batch"):
        train_pretrain.run(flags + ["--per_device_train_batch_size", "120"])
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train_pretrain.run(flags + ["--resume_from_checkpoint", "latest"])
    with pytest.raises(FileNotFoundError, match="is not a complete checkpoint folder"):
        train_pretrain.run(flags + ["--resume_from_checkpoint", str(tmp_path)])
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "all_results.json").write_text("{}")
    with pytest.raises(ValueError, match=r"already holds a run \(all_results.json\).*--overwrite_output_dir"):
        train_pretrain.run(tiny_flags(tiny_image_folder, occupied))
    with pytest.raises(ValueError, match=r"gate='sigmoid' is not valid"):
        train_pretrain.run(flags + ["--gate", "sigmoid"])


def test_two_processes_gather_loss_and_train_identically(tiny_image_folder, tmp_path):
    """torchrun with 2 CPU processes (gloo): see tests/distributed_check.py for what is compared."""
    command = two_process_command(ROOT / "tests" / "distributed_check.py", tiny_image_folder, tmp_path / "ddp")
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    reports = [json.loads((tmp_path / "ddp" / f"distributed_report_{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["world_size"] == 2
        assert report["loss_error"] < 1e-5
        assert report["embedding_grad_error"] < 1e-5 and report["param_grad_error"] < 1e-5
    # 36 training images x ra 3 = 108 samples: 9 batches of 12; each process takes 4 (accelerate drops the
    # incomplete last round, like drop_last).
    for report in reports:  # process 1's NaN stopped both, before the update of that batch
        assert "Non-finite loss" in report["nan_error"] and "batch 2/4" in report["nan_error"], report["nan_error"]
        assert "on process(es) [1]" in report["nan_error"]
    assert reports[0]["trained_steps"] == reports[1]["trained_steps"] == 4
    assert reports[0]["weights_sha256"] == reports[1]["weights_sha256"]


def test_gpu_switches_parse_and_run_on_cpu(tiny_image_folder, tmp_path):
    """--channels_last, --tf32, --cudnn_benchmark and --torch_compile (the aot_eager backend: dynamo tracing without
    a C++ compile, so that it runs in seconds on a CPU) go through the real training loop."""
    import torch._dynamo

    torch._dynamo.reset()
    flags = tiny_flags(tiny_image_folder, tmp_path / "switches", epochs=1)
    model, results = train_pretrain.run(
        flags
        + ["--channels_last", "--tf32", "--cudnn_benchmark", "--torch_compile", "--torch_compile_backend", "aot_eager"]
    )
    assert results["global_step"] == 9 and 0 <= results["eval_top1"] <= 100  # 36 images, 4 per batch
    conv = next(module for module in model.backbone.modules() if isinstance(module, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.benchmark
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.benchmark = False
    assert SimLAPModel.from_pretrained(tmp_path / "switches").config.backbone == "resnet10t"
