"""The runs users make, as they make them: every command in the README's code blocks and every file in ``configs/``.

Each command runs as written, from a working folder that looks like the repository to it (``configs/``,
``benchmarks/`` and the scripts are linked there), so its relative output paths land in a temporary folder. Only what
cannot run here is overridden, by flags appended to the command: the data (a small local stand-in with the layout of
the real data set: CIFAR-10 as a ``save_to_disk`` folder with the Hub's ``img``/``label`` columns and class names),
the length (epochs, samples) and nothing else: batch sizes, repeated augmentation, precision and the model are the
shipped ones. A README command or config that no test here runs fails :func:`test_every_readme_command_is_run`.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import reproduce
import yaml
from conftest import free_port
from PIL import Image

from simlap_hf.data import FASHION_MNIST_LABEL_NAMES

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
TIMEOUT = 900  # seconds per command; generous for two busy cores

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# README command (as shlex tokens joined back) -> the test that runs it. Install and test commands are what CI runs
# itself (`.ci/run` runs `make test`, which creates the venv with the README's install commands), checked by
# test_readme_install_and_test_commands_are_what_ci_runs.
README_COMMAND_TESTS = {
    "make demo": "test_make_demo",
    "make test": "test_readme_install_and_test_commands_are_what_ci_runs",
    "python3 -m venv .venv && . .venv/bin/activate": "test_readme_install_and_test_commands_are_what_ci_runs",
    "pip install torch==2.14.1 torchvision==0.29.1": "test_readme_install_and_test_commands_are_what_ci_runs",
    "pip install -e '.[dev]'": "test_readme_install_and_test_commands_are_what_ci_runs",
    "accelerate launch train_pretrain.py configs/pretrain_cifar10_resnet18.yaml": "test_seed_pretrain_command",
    "accelerate launch train_finetune.py configs/finetune_cifar10_resnet18.yaml --model_name_or_path "
    "outputs/simlap/cifar10_resnet18": "test_seed_finetune_command",
    "accelerate launch train_finetune.py configs/finetune_cifar10_resnet18.yaml --model_name resnet18 "
    "--from_scratch --output_dir outputs/cross_entropy/cifar10_resnet18": "test_finetune_from_scratch_command",
    "accelerate launch train_fuse.py configs/fuse_cifar10_resnet18.yaml": "test_seed_fuse_command",
    "accelerate launch train_pretrain.py "
    "configs/pretrain_cifar10_resnet18_fastssl.yaml": "test_fastssl_pretrain_config",
    "python train_pretrain.py --dataset_name digits --output_dir outputs/digits "
    "--num_train_epochs 2": "test_flag_only_digits_command",
    "python train_pretrain.py configs/quickstart_digits.yaml --num_train_epochs 1": "test_quickstart_command",
    "accelerate launch train_pretrain.py configs/pretrain_cifar10_resnet18.yaml --gate open --pair_mode identical "
    "--output_dir outputs/supcon/cifar10_resnet18": "test_analyze_command",
    "python -m simlap_hf.analyze --model_name_or_path outputs/simlap/cifar10_resnet18 outputs/supcon/cifar10_resnet18 "
    "--labels SimLAP SupCon --dataset_name cifar10 --transfer_dataset_name cifar100 "
    "--output_dir report": "test_analyze_command",
    "python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --output_dir "
    "outputs/reproduce_8ep --threads 1 --seeds 0": "test_reproduce_commands",
    "python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --output_dir "
    "outputs/reproduce_8ep --threads 1 --seeds 1": "test_reproduce_commands",
    "python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --output_dir "
    "outputs/reproduce_8ep": "test_reproduce_commands",
    "python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --override num_train_epochs=3 "
    "eval_every=3 --seeds 0 --variants simlap_fused_arbitrary supcon_open_arbitrary untrained --output_dir "
    "outputs/reproduce_os32_3ep": "test_reproduce_commands",
}
README_COMMAND_TESTS.update(
    {
        "python benchmarks/reproduce.py benchmarks/configs/reproduce_fmnist_cpu_8ep.yaml --variants "
        "simlap_fused_arbitrary cross_entropy --seeds 0 1 --threads 1 --output_dir "
        "outputs/relations_8ep": "test_relations_embed_search_demo",
        "python benchmarks/relations_fmnist.py outputs/relations_8ep --seeds 0 1": "test_relations_embed_search_demo",
        "python -m simlap_hf.embed --model_name_or_path outputs/relations_8ep/simlap_fused_arbitrary_seed0 "
        "--dataset_name fashion_mnist --output_dir index": "test_relations_embed_search_demo",
        "python -m simlap_hf.embed --model_name_or_path outputs/relations_8ep/simlap_fused_arbitrary_seed0 --train_dir "
        "photos/ --output_dir photo_index": "test_relations_embed_search_demo",
        "python -m simlap_hf.search --index index --image sandal.png --k 3": "test_relations_embed_search_demo",
        "python -m simlap_hf.search --index index --image sandal.png --k 3 "
        "--target_class 'Ankle boot'": "test_relations_embed_search_demo",
        "python -m simlap_hf.demo --index index --port 7860": "test_relations_embed_search_demo",
        "accelerate launch --multi_gpu --num_processes 2 train_pretrain.py configs/pretrain_cifar10_resnet18.yaml "
        "--output_dir outputs/simlap_cifar10_2proc": "test_multi_process_commands",
        "accelerate launch --multi_gpu --num_machines 2 --machine_rank 0 --num_processes 2 --main_process_ip "
        "'$MAIN_ADDR' --main_process_port 29500 train_pretrain.py configs/pretrain_cifar10_resnet18.yaml --output_dir "
        "outputs/simlap_cifar10_2machines --save_on_each_node": "test_multi_process_commands",
        "sbatch launch/slurm_pretrain.sbatch configs/pretrain_cifar10_resnet18.yaml --output_dir "
        "outputs/simlap_cifar10_slurm": "test_slurm_command",
    }
)
# Files of configs/ not named by a README command, and the test that runs each as written.
CONFIG_TESTS = {
    "quickstart_digits.yaml": "tests/test_quickstart.py::test_quickstart_reaches_97_percent_online_head_top1"
}


def readme_commands() -> list[str]:
    """Every command in the README's ``bash`` code blocks: continuation lines joined, comments, a trailing ``&``
    and ``wait`` dropped; each normalised to its shlex tokens joined back."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens and tokens[-1] == "&":
                tokens = tokens[:-1]
            if tokens and tokens != ["wait"]:
                commands.append(shlex.join(tokens).replace("'&&'", "&&"))
    return commands


def test_every_readme_command_is_run():
    commands = readme_commands()
    missing = [command for command in commands if command not in README_COMMAND_TESTS]
    assert not missing, f"README commands that no test runs (add a test and an entry here): {missing}"
    stale = [command for command in README_COMMAND_TESTS if command not in commands]
    assert not stale, f"entries for commands that are no longer in the README: {stale}"
    for test in set(README_COMMAND_TESTS.values()):
        assert test in globals(), test


# README sections whose ```python blocks run in a test, and the test.
PYTHON_BLOCK_TESTS = {
    "Python API": "tests/test_readme.py::test_python_api_example_runs",
    "Embeddings, search and class relations": "test_relations_embed_search_demo",
}


def test_every_readme_python_block_is_run():
    for section in README.read_text().split("\n## ")[1:]:
        title = section.splitlines()[0].strip()
        if "```python" in section:
            assert title in PYTHON_BLOCK_TESTS, f"README section {title!r} has Python code that no test runs"


def test_every_config_file_is_run():
    named = " ".join(readme_commands())
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert f"configs/{path.name}" in named or path.name in CONFIG_TESTS, f"no test runs configs/{path.name}"
    for target in CONFIG_TESTS.values():
        file, test = target.split("::")
        assert f"def {test}(" in (ROOT / file).read_text(), target


def test_readme_install_and_test_commands_are_what_ci_runs():
    makefile = (ROOT / "Makefile").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"
    pins = re.search(r"TORCH_PACKAGES \?= (.*)", makefile).group(1).strip()
    assert f"pip install {pins}" in README_COMMAND_TESTS  # the README pins what `make install` installs
    assert '-m pip install --quiet -e ".[dev]"' in makefile and "python3 -m venv $(VENV)" in makefile
    assert "$(PYTHON) -m pytest" in makefile.split("test: install", 1)[1]


# ----------------------------------------------------------------------------------------------------------------
# Stand-in data and the working folder


def _class_images(num_classes: int, per_class: int, size: int, mode: str, seed: int) -> tuple[list, list[int]]:
    """Noisy images whose mean colour (or grey level) depends on the class: learnable, a few KB each."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label in range(num_classes):
        base = rng.integers(40, 215, size=3)
        for _ in range(per_class):
            pixels = np.clip(base + rng.integers(-40, 40, size=(size, size, 3)), 0, 255).astype(np.uint8)
            image = Image.fromarray(pixels)
            images.append(image.convert("L") if mode == "L" else image)
            labels.append(label)
    return images, labels


def write_standin(
    path: Path,
    names: tuple[str, ...],
    image_column: str,
    label_column: str,
    size: int,
    mode: str,
    train_per_class: int,
    test_per_class: int,
) -> str:
    """A ``save_to_disk`` DatasetDict with ``train`` and ``test`` splits in a Hub data set's layout."""
    features = datasets.Features({image_column: datasets.Image(), label_column: datasets.ClassLabel(names=names)})
    splits = {}
    for seed, (split, per_class) in enumerate((("train", train_per_class), ("test", test_per_class))):
        images, labels = _class_images(len(names), per_class, size, mode, seed)
        splits[split] = datasets.Dataset.from_dict({image_column: images, label_column: labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(path))
    return str(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder that looks like the repository to the README's commands; their outputs/ lands here."""
    folder = tmp_path_factory.mktemp("user_runs")
    link_repository(folder)
    return folder


def link_repository(folder: Path) -> None:
    """Make ``folder`` look like the repository to the README's commands (links to what they name)."""
    for name in ("configs", "benchmarks", "launch", "train_pretrain.py", "train_finetune.py", "train_fuse.py"):
        (folder / name).symlink_to(ROOT / name)


@pytest.fixture(scope="module")
def cifar10(tmp_path_factory) -> str:
    """CIFAR-10's Hub layout (``img``, ``label`` with its class names, train/test), 18 + 4 images per class: 180
    training images give 2 batches of the seed recipe's 256 (85 images x 3 copies, plus one extra copy)."""
    return write_standin(tmp_path_factory.mktemp("data") / "cifar10", CIFAR10_NAMES, "img", "label", 32, "RGB", 18, 4)


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory) -> str:
    """CIFAR-100's Hub layout, reduced to 20 classes (``fine_label``; the transfer set of the analyze command)."""
    names = tuple(f"class_{i}" for i in range(20))
    return write_standin(tmp_path_factory.mktemp("data") / "cifar100", names, "img", "fine_label", 32, "RGB", 6, 3)


def run_command(
    command: str, cwd: Path, *overrides: str, env: dict[str, str] | None = None, expected_code: int = 0
) -> subprocess.CompletedProcess:
    """Run a README command as written plus ``overrides`` (appended flags) in ``cwd``."""
    tokens = shlex.split(command)
    program = {"python": sys.executable, "accelerate": str(BIN / "accelerate")}.get(tokens[0], tokens[0])
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    result = subprocess.run(
        [program, *tokens[1:], *overrides], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=TIMEOUT
    )
    assert result.returncode == expected_code, (
        f"{command}: exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


def accelerate_env(tmp_path: Path) -> dict[str, str]:
    """No accelerate config of the machine's user: HF_HOME (where `accelerate config` writes) is empty."""
    home = tmp_path / "hf_home"
    home.mkdir(exist_ok=True)
    return {"HF_HOME": str(home)}


def results_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "all_results.json").read_text())


def command_for(test_name: str) -> list[str]:
    return [command for command, test in README_COMMAND_TESTS.items() if test == test_name]


# ----------------------------------------------------------------------------------------------------------------
# The three training commands of the CIFAR-10 recipe and the fine-tuning baseline (configs/*_cifar10_resnet18.yaml,
# batch 256, ra 3, fp16)


@pytest.fixture(scope="module")
def seed_pretrain(workdir, cifar10, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    (command,) = command_for("test_seed_pretrain_command")
    result = run_command(
        command,
        workdir,
        "--dataset_name",
        cifar10,
        "--num_train_epochs",
        "1",
        env=accelerate_env(tmp_path_factory.mktemp("accelerate")),
    )
    return workdir / "outputs" / "simlap" / "cifar10_resnet18", result


@pytest.mark.xdist_group("cifar10_seed_pretrain")
def test_seed_pretrain_command(seed_pretrain):
    output_dir, result = seed_pretrain
    config = json.loads((output_dir / "config.json").read_text())
    assert config["backbone"] == "resnet18"
    assert config["backbone_kwargs"] == {"stem_type": "deep", "output_stride": 8}
    assert list(config["id2label"].values()) == list(CIFAR10_NAMES)
    results = results_of(output_dir)
    assert results["global_step"] == 2 and results["epochs"] == 1  # 180 images: 2 batches of 85 images x 3 (+1)
    assert results["train_images_per_second"] > 0 and 0 <= results["eval_knn_top1"] <= 100
    assert "Mixed precision: bf16" in result.stderr  # the config's fp16, on a CPU
    log = [json.loads(line) for line in (output_dir / "training_log.jsonl").read_text().splitlines()]
    assert any("eval_top1" in record for record in log)


@pytest.mark.xdist_group("cifar10_seed_pretrain")
def test_seed_finetune_command(seed_pretrain, workdir, cifar10, tmp_path):
    (command,) = command_for("test_seed_finetune_command")
    run_command(command, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path))
    output_dir = workdir / "outputs" / "simlap" / "cifar10_resnet18" / "ft"
    results = results_of(output_dir)
    assert results["global_step"] == 2 and 0 <= results["eval_top1"] <= 100
    assert (output_dir / "preprocessor_config.json").is_file()


def test_finetune_from_scratch_command(workdir, cifar10, tmp_path):
    (command,) = command_for("test_finetune_from_scratch_command")
    run_command(command, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path))
    output_dir = workdir / "outputs" / "cross_entropy" / "cifar10_resnet18"
    config = json.loads((output_dir / "config.json").read_text())
    assert config["backbone"] == "resnet18" and config["backbone_kwargs"]["output_stride"] == 8
    assert results_of(output_dir)["global_step"] == 2


def test_seed_fuse_command(workdir, cifar10, tmp_path):
    (command,) = command_for("test_seed_fuse_command")
    run_command(command, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path))
    output_dir = workdir / "outputs" / "simlap" / "cifar10_resnet18_fuse"
    assert json.loads((output_dir / "config.json").read_text())["model_type"] == "simlap_fuse"
    assert results_of(output_dir)["global_step"] == 2


@pytest.mark.slow
def test_fastssl_pretrain_config(workdir, tmp_path):
    """configs/pretrain_cifar10_resnet18_fastssl.yaml as written (batch 1024 = 512 images x ra 2, fp16 -> bf16 on a
    CPU), on a CIFAR-10 stand-in of 52 training images per class: one step of one epoch."""
    cifar10 = write_standin(tmp_path / "cifar10", CIFAR10_NAMES, "img", "label", 32, "RGB", 52, 2)
    (command,) = command_for("test_fastssl_pretrain_config")
    run_command(command, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path))
    output_dir = workdir / "outputs" / "simlap_fastssl" / "cifar10_resnet18"
    config = json.loads((output_dir / "config.json").read_text())
    assert (config["loss_form"], config["learnable_temperature"], config["alpha"]) == ("dot", True, 0.0)
    assert (config["positive_normalization"], config["projector_norm"], config["gate"]) == (
        "anchor",
        "layernorm",
        "fused",
    )
    assert config["backbone_kwargs"] == {"stem_type": "deep", "output_stride": 8}
    results = results_of(output_dir)
    assert results["global_step"] == 1 and results["epochs"] == 1  # 520 images: one batch of 512 images x 2
    from safetensors import safe_open

    with safe_open(str(output_dir / "model.safetensors"), "pt") as weights:
        assert "scale_logit" in weights.keys() and "alpha" not in weights.keys()  # learnable temperature, alpha off


# ----------------------------------------------------------------------------------------------------------------
# Several processes and machines (the CIFAR-10 recipe; 180 images: 2 batches, one per process)


@pytest.mark.slow
def test_multi_process_commands(workdir, cifar10, tmp_path):
    """2 processes on one machine (without GPUs, accelerate's --multi_gpu starts CPU processes), then 2 machines
    (the README's command on machine 0 and the same with --machine_rank 1), each in its own folder: nothing shared,
    so each keeps its own checkpoint (--save_on_each_node) and only machine 0 writes the model."""
    one_machine, first_machine = command_for("test_multi_process_commands")
    run_command(
        one_machine, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path)
    )
    results = results_of(workdir / "outputs" / "simlap_cifar10_2proc")
    assert results["global_step"] == 1 and results["epochs"] == 1
    port, machines = str(free_port()), []
    for rank in (0, 1):
        folder = tmp_path / f"machine{rank}"
        folder.mkdir()
        link_repository(folder)
        tokens = [{"$MAIN_ADDR": "127.0.0.1", "29500": port}.get(token, token) for token in shlex.split(first_machine)]
        tokens[tokens.index("--machine_rank") + 1] = str(rank)
        env = {**os.environ, **accelerate_env(tmp_path), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        machines.append(
            subprocess.Popen(
                [str(BIN / "accelerate"), *tokens[1:], "--dataset_name", cifar10, "--num_train_epochs", "1"],
                cwd=folder,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [machine.communicate(timeout=TIMEOUT)[0] for machine in machines]
    assert [machine.returncode for machine in machines] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    output_dirs = [tmp_path / f"machine{rank}" / "outputs" / "simlap_cifar10_2machines" for rank in (0, 1)]
    assert results_of(output_dirs[0])["global_step"] == 1
    assert not (output_dirs[1] / "model.safetensors").exists()
    for output_dir in output_dirs:
        (checkpoint,) = (output_dir / "checkpoints").iterdir()
        assert (checkpoint / "trainer_state.json").is_file() and (checkpoint / "model.safetensors").is_file()


@pytest.mark.slow
def test_slurm_command(workdir, cifar10, tmp_path):
    """The SLURM script as written, as a job of 2 machines that share the submit folder (a stand-in srun starts one
    task per machine), then requeued with a longer schedule: it continues from the checkpoint."""
    from test_multinode import run_slurm_script

    (command,) = command_for("test_slurm_command")
    for epochs in (1, 2):
        result = run_slurm_script(
            command, workdir, tmp_path, "--dataset_name", cifar10, "--num_train_epochs", str(epochs)
        )
        logs = [(tmp_path / f"task{node}.log").read_text() for node in (0, 1)]
        assert result.returncode == 0, result.stderr[-2000:] + logs[0][-3000:] + logs[1][-3000:]
        results = results_of(workdir / "outputs" / "simlap_cifar10_slurm")
        assert results["epochs"] == epochs and results["global_step"] == epochs
    assert "continuing from the newest complete checkpoint" in logs[0]


# ----------------------------------------------------------------------------------------------------------------
# Quick runs on the digits


def test_flag_only_digits_command(workdir):
    """The script's defaults as they are (ResNet-18, deep stem, output stride 8, batch 256, ra 3) on the real digits;
    shortened to 1 epoch of 340 images (4 batches)."""
    (command,) = command_for("test_flag_only_digits_command")
    run_command(command, workdir, "--num_train_epochs", "1", "--max_train_samples", "340")
    results = results_of(workdir / "outputs" / "digits")
    assert results["global_step"] == 4 and results["epochs"] == 1


def test_quickstart_command(workdir):
    (command,) = command_for("test_quickstart_command")
    run_command(command, workdir)  # as written: 1 epoch of the quickstart config on the real digits
    results = results_of(workdir / "outputs" / "quickstart_digits")
    assert results["epochs"] == 1 and results["eval_top1"] > 10.0  # above chance after one epoch


def test_make_demo(tmp_path):
    """`make demo` itself (in the repository, with its venv), shortened to one epoch, into a temporary folder."""
    if Path(sys.executable).parent.parent.resolve() != (ROOT / ".venv").resolve():
        pytest.skip("make demo uses the repository's .venv; these tests run from another interpreter")
    output_dir = tmp_path / "demo"
    result = run_command("make demo", ROOT, f"OUTPUT_DIR={output_dir}", "DEMO_ARGS=--num_train_epochs 1")
    assert results_of(output_dir)["epochs"] == 1
    assert "SimLAPModel resnet10t" in result.stdout


# ----------------------------------------------------------------------------------------------------------------
# Analysis and the reproduction


@pytest.mark.xdist_group("cifar10_seed_pretrain")
def test_analyze_command(seed_pretrain, workdir, cifar10, cifar100, tmp_path):
    """The SupCon baseline run, then the analysis of both runs (the SimLAP one is the seed pretrain command's)."""
    supcon, analyze = command_for("test_analyze_command")
    run_command(supcon, workdir, "--dataset_name", cifar10, "--num_train_epochs", "1", env=accelerate_env(tmp_path))
    config = json.loads((workdir / "outputs" / "supcon" / "cifar10_resnet18" / "config.json").read_text())
    assert config["gate"] == "open" and config["pair_mode"] == "identical"
    run_command(analyze, workdir, "--dataset_name", cifar10, "--transfer_dataset_name", cifar100)
    report = json.loads((workdir / "report" / "report.json").read_text())
    assert [model["name"] for model in report["models"]] == ["SimLAP", "SupCon"]
    assert (workdir / "report" / "report.md").is_file()


@pytest.fixture(scope="module")
def fashion_standin(tmp_path_factory) -> tuple[list[str], str]:
    """Overrides that put reproduce.py on a Fashion-MNIST stand-in (10 x 12 training images, 1 epoch of 96) with a
    digits stand-in (90 images) as the transfer set; and the stand-in's folder."""
    folder = tmp_path_factory.mktemp("fashion")
    standin = write_standin(folder / "fmnist", FASHION_MNIST_LABEL_NAMES, "image", "label", 28, "L", 12, 6)
    transfer = write_standin(folder / "digits", tuple(str(i) for i in range(10)), "image", "label", 8, "L", 6, 3)
    overrides = [
        "--override",
        f"dataset_name={standin}",
        "num_train_epochs=1",
        "eval_every=1",
        "max_train_samples=96",
        "max_eval_samples=60",
        f"evaluation.transfer_dataset_name={transfer}",
    ]
    return overrides, standin


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_reproduction")
def test_relations_embed_search_demo(workdir, fashion_standin, fashion_reproduction, tiny_image_folder):
    """The relation measurement (reproduce.py on the stand-in, then relations_fmnist.py on 200 real Fashion-MNIST
    test images), then embedding, search and the web demo on its SimLAP model. The measurement's 4 runs are those
    of the reproduction's seed commands (same budget, variants and seeds), copied into its folder: reproduce.py
    reuses them, as it reuses any finished run (the seed commands trained and evaluated them)."""
    import urllib.request

    commands = command_for("test_relations_embed_search_demo")
    overrides, standin = fashion_standin
    tokens = shlex.split(commands[0])
    variants = tokens[tokens.index("--variants") + 1 : tokens.index("--seeds")]
    seeds = tokens[tokens.index("--seeds") + 1 : tokens.index("--threads")]
    relations_runs = workdir / "outputs" / "relations_8ep"
    for variant in variants:
        for seed in seeds:
            shutil.copytree(fashion_reproduction / f"{variant}_seed{seed}", relations_runs / f"{variant}_seed{seed}")
    copied = weight_files(relations_runs)
    run_command(commands[0], workdir, *overrides)
    assert weight_files(relations_runs) == copied and len(copied) == len(variants) * len(seeds)
    report = json.loads((relations_runs / "results.json").read_text())
    assert [(run["variant"], run["seed"]) for run in report["runs"]] == [(v, int(s)) for s in seeds for v in variants]
    model_dir = relations_runs / "simlap_fused_arbitrary_seed0"
    assert (model_dir / "class_relations.json").is_file()
    run_command(commands[1], workdir, "--max_test_samples", "200")
    run_command(commands[2], workdir, "--dataset_name", standin)
    run_command(commands[3], workdir, "--train_dir", tiny_image_folder)
    assert json.loads((workdir / "photo_index" / "index.json").read_text())
    Image.open(Path(tiny_image_folder) / "red" / "0.png").save(workdir / "sandal.png")  # the query image
    hits = json.loads(run_command(commands[4], workdir).stdout)
    assert len(hits["hits"] if isinstance(hits, dict) else hits) == 3
    paired = json.loads(run_command(commands[5], workdir).stdout)
    assert {hit["label"] for hit in paired["hits"]} == {"Ankle boot"}
    # The section's Python examples, as written, one after the other in one namespace.
    section = README.read_text().split("## Embeddings, search and class relations", 1)[1].split("\n## ", 1)[0]
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for block in re.findall(r"```python\n(.*?)```", section, re.S):
            exec(compile(block, "README.md", "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["features"].shape[0] == 1 and namespace["relations"].relatedness.shape == (10, 10)
    port = str(free_port())  # instead of 7860, which may be taken
    tokens = shlex.split(commands[6])
    demo = subprocess.Popen(
        [sys.executable, *tokens[1:], "--port", port],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"},
    )
    try:
        deadline = time.monotonic() + 300
        while True:
            assert demo.poll() is None, demo.stdout.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    assert response.status == 200 and b"gradio" in response.read().lower()
                    break
            except OSError:
                assert time.monotonic() < deadline, "the demo did not serve its page within 300 s"
                time.sleep(1)
    finally:
        demo.terminate()
        demo.wait(timeout=30)


@pytest.fixture(scope="module")
def fashion_reproduction(workdir, fashion_standin) -> Path:
    """The README's reproduction commands of seed 0 and seed 1 (every variant of the paper, trained and evaluated) on
    the stand-in: outputs/reproduce_8ep. The relation measurement starts from 4 of its runs."""
    overrides, _ = fashion_standin
    for command in command_for("test_reproduce_commands"):
        if is_seed_command(command):
            run_command(command, workdir, *overrides)
    return workdir / "outputs" / "reproduce_8ep"


def is_seed_command(command: str) -> bool:
    """The reproduction's per-seed commands (run side by side in the README) carry ``--threads``."""
    return "--threads" in shlex.split(command)


def weight_files(folder: Path) -> dict[str, int]:
    """Every run's model.safetensors under ``folder`` and its modification time (ns)."""
    return {str(path.relative_to(folder)): path.stat().st_mtime_ns for path in folder.glob("*/model.safetensors")}


@pytest.mark.slow
@pytest.mark.xdist_group("fashion_reproduction")
def test_reproduce_commands(fashion_reproduction, workdir, fashion_standin):
    """The reproduction's four commands in README order (two seeds, the gathering call, the 3-epoch budget) on a
    Fashion-MNIST stand-in of 10 x 12 images, 1 epoch of 96 images, and a digits stand-in (90 images) as the
    transfer set. The gathering call reuses every finished run and trains nothing."""
    overrides, _ = fashion_standin
    seed_runs = fashion_reproduction
    gather, short_budget = [
        command for command in command_for("test_reproduce_commands") if not is_seed_command(command)
    ]
    trained = weight_files(seed_runs)
    run_command(gather, workdir, *overrides)
    assert weight_files(seed_runs) == trained  # nothing trained again
    report = json.loads((seed_runs / "results.json").read_text())
    budget = yaml.safe_load((ROOT / "benchmarks" / "configs" / "reproduce_fmnist_cpu_8ep.yaml").read_text())
    paper = reproduce.VARIANT_GROUPS["paper"]
    assert [(run["seed"], run["variant"]) for run in report["runs"]] == [(s, v) for s in (0, 1) for v in paper]
    for run in report["runs"]:  # the gathering call reads each run's stored evaluation
        stored = json.loads((seed_runs / f"{run['variant']}_seed{run['seed']}" / "reproduce_metrics.json").read_text())
        assert run == stored
        for metric in ("knn_top1", "probe_top1", "transfer_knn_top1", "transfer_probe_top1"):
            assert 0.0 <= run[metric] <= 100.0, (run["variant"], metric)
        assert len(run["spectrum"]) == 60  # 256-d projections and 512-d features of 60 test images
        assert ("online_top1" in run) == (run["variant"] != "cross_entropy")
    assert report["summary"]["untrained"]["online_top1"]["mean"] < 35.0  # an untrained head: near chance (10 classes)
    assert not (seed_runs / "untrained_seed0" / "model.safetensors").exists()  # evaluated, never trained
    assert report["budget"]["train"]["per_device_train_batch_size"] == budget["train"]["per_device_train_batch_size"]
    table = (seed_runs / "results.md").read_text()
    for name in paper:
        assert f"| {reproduce.LABELS[name]} |" in table
    assert (seed_runs / "results.png").stat().st_size > 10_000

    run_command(short_budget, workdir, *overrides)
    short = json.loads((workdir / "outputs" / "reproduce_os32_3ep" / "results.json").read_text())
    assert [run["variant"] for run in short["runs"]] == ["simlap_fused_arbitrary", "supcon_open_arbitrary", "untrained"]
    assert short["budget"]["train"]["num_train_epochs"] == 1 and short["budget"]["train"]["eval_every"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Mixed precision follows accelerate's conventions


TINY = [
    "--model_name",
    "resnet10t",
    "--out_dim",
    "16",
    "--mlp_dim",
    "32",
    "--input_size",
    "16",
    "--aa",
    "none",
    "--reprob",
    "0",
    "--per_device_train_batch_size",
    "12",
    "--num_train_epochs",
    "1",
    "--warmup_epochs",
    "0",
    "--checkpointing_epochs",
    "0",
]


@pytest.mark.parametrize(
    "launch_flags, script_flags, expected",
    [
        ([], [], "Mixed precision: no (accelerate launch / accelerate config / default)"),
        (["--mixed_precision", "bf16"], [], "Mixed precision: bf16 (accelerate launch / accelerate config / default)"),
        (["--mixed_precision", "bf16"], ["--mixed_precision", "no"], "Mixed precision: no (--mixed_precision)"),
        (["CONFIG"], [], "Mixed precision: bf16 (accelerate launch / accelerate config / default)"),
    ],
    ids=["default", "launch-flag", "script-flag-wins", "accelerate-config-file"],
)
def test_mixed_precision_follows_accelerate_launch(tiny_image_folder, tmp_path, launch_flags, script_flags, expected):
    if launch_flags == ["CONFIG"]:  # what `accelerate config` writes, passed as a file
        config = tmp_path / "accelerate.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "compute_environment": "LOCAL_MACHINE",
                    "distributed_type": "NO",
                    "mixed_precision": "bf16",
                    "num_processes": 1,
                    "num_machines": 1,
                    "use_cpu": True,
                }
            )
        )
        launch_flags = ["--config_file", str(config)]
    command = shlex.join(["accelerate", "launch", *launch_flags, str(ROOT / "train_pretrain.py")])
    result = run_command(
        command,
        tmp_path,
        "--train_dir",
        tiny_image_folder,
        "--output_dir",
        str(tmp_path / "run"),
        *TINY,
        *script_flags,
        env=accelerate_env(tmp_path),
    )
    assert expected in result.stderr


# ----------------------------------------------------------------------------------------------------------------
# User errors: one line, no traceback, before any data is read


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), lines
    assert not any("Traceback" in line for line in lines)
    return lines[-1]


MISSING_DATA = ["--dataset_name", "./no/such/data"]  # data that would fail to load: the error must come first


@pytest.mark.parametrize(
    "script, argv, message",
    [
        ("train_pretrain", MISSING_DATA + ["--gate", "sigmoid"], r"gate='sigmoid' is not valid; choose one of"),
        ("train_pretrain", MISSING_DATA + ["--pair_mode", "random"], r"pair_mode='random' is not valid"),
        ("train_pretrain", MISSING_DATA + ["--temperature", "0"], r"temperature=0\.0 is not valid"),
        ("train_pretrain", MISSING_DATA + ["--model_name", "resnet81"], r"'resnet81' is not a timm model name"),
        (
            "train_pretrain",
            MISSING_DATA + ["--model_name", "vit_tiny_patch16_224", "--stem_type", "deep"],
            r"unexpected keyword argument 'stem_type'.*Leave out the option",
        ),
        (
            "train_pretrain",
            ["--dataset_name", "./no/such/data"],
            r"Local data set path './no/such/data' does not exist",
        ),
        ("train_pretrain", ["--resume_from_checkpoint", "latest", "--output_dir", "OUT"], r"no complete checkpoint"),
        ("train_pretrain", ["--learning_rate", "-1"], r"--learning_rate=-1\.0 is not valid"),
        ("train_pretrain", ["--num_train_epoch", "3"], r"Unknown flags: num_train_epoch \(did you mean"),
        (
            "train_finetune",
            MISSING_DATA + ["--model_name_or_path", "outputs/simlap/cifar10_resnet81"],
            r"'outputs/simlap/cifar10_resnet81': this folder does not exist",
        ),
        ("train_finetune", MISSING_DATA + ["--model_name_or_path", "./my-model"], r"this folder does not exist"),
        ("train_finetune", MISSING_DATA, r"Pass --model_name_or_path"),
        ("train_fuse", MISSING_DATA + ["--iter_num", "0"], r"iter_num=0 is not valid"),
    ],
)
def test_input_errors_print_one_line_before_loading_data(tmp_path, monkeypatch, capsys, script, argv, message):
    monkeypatch.chdir(tmp_path)
    module = __import__(script)
    argv = [arg.replace("OUT", str(tmp_path / "out")) for arg in argv]
    assert module.main(argv) == 1
    assert re.search(message, _error_line(capsys))


def test_file_errors_name_the_file(tmp_path, capsys):
    import train_pretrain

    (tmp_path / "taken").write_text("a file")
    assert train_pretrain.main(["--output_dir", str(tmp_path / "taken")]) == 1
    assert "is a file, not a folder" in _error_line(capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name: resnet18\nscale: [0.7, 1.0\ngate: fused\n")
    assert train_pretrain.main([str(broken)]) == 1
    line = _error_line(capsys)
    assert f"Config file '{broken}' is not valid YAML, line 3" in line
    assert train_pretrain.main([str(tmp_path / "missing.yaml")]) == 1
    assert "missing.yaml' does not exist" in _error_line(capsys)


def test_debug_shows_the_traceback_and_bugs_keep_theirs(tmp_path, monkeypatch, capsys):
    import simlap_hf.training as training
    import train_pretrain

    with pytest.raises(ValueError, match="gate='x'"):
        train_pretrain.main(["--gate", "x", "--debug"])
    monkeypatch.setenv("SIMLAP_DEBUG", "1")
    with pytest.raises(ValueError, match="gate='x'"):
        train_pretrain.main(["--gate", "x"])
    monkeypatch.delenv("SIMLAP_DEBUG")

    def bug(*args, **kwargs):
        return [][1]  # an IndexError: a bug, not an input error

    monkeypatch.setattr(train_pretrain, "load_run_data", bug)
    with pytest.raises(IndexError):
        train_pretrain.main(["--output_dir", str(tmp_path / "run")])
    error = ValueError("raised by a library")  # the same type raised outside the package keeps its traceback
    assert not training.is_input_error(error)


def test_command_line_error_has_no_traceback(tmp_path):
    result = run_command("python train_pretrain.py --gate sigmoid", ROOT, expected_code=1)
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: SimLAPConfig.gate='sigmoid' is not valid")
