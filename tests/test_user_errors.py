"""User mistakes print one line naming the value and the fix, as a user runs the commands: a subprocess, no --debug,
from a working directory outside the repository, and from a wheel installed outside it (no editable install)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from conftest import write_image_folder

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_user_command(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *argv],
        cwd=cwd,
        env={**os.environ, **OFFLINE, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit code 1, no traceback, and a last line ``error: ...`` holding every fragment."""
    assert result.returncode == 1, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: "), line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A working directory outside the repository with the files the cases need."""
    folder = tmp_path_factory.mktemp("probe")
    write_image_folder(folder / "images", images_per_class=4)
    (folder / "ten.yaml").write_text('num_train_epochs: "ten"\n')
    (folder / "garbage").mkdir()
    (folder / "garbage" / "config.json").write_text("{not json")
    tarfile.open(folder / "empty.tar", "w").close()
    return folder


PRETRAIN = str(ROOT / "train_pretrain.py")
FINETUNE = str(ROOT / "train_finetune.py")

# (argv with {probe} for the probe folder, fragments of the one line)
CASES = {
    "yaml_value_of_the_wrong_type": (
        [PRETRAIN, "{probe}/ten.yaml", "--output_dir", "{probe}/out"],
        ["ten.yaml", "num_train_epochs", "'ten' is not a valid int"],
    ),
    "flag_value_of_the_wrong_type": (
        [PRETRAIN, "--num_train_epochs", "ten", "--output_dir", "{probe}/out"],
        ["--num_train_epochs", "invalid int value: 'ten'"],
    ),
    "unwritable_output_dir": (
        [PRETRAIN, "--output_dir", "/proc/simlap-out", "--train_dir", "{probe}/images"],
        ["--output_dir '/proc/simlap-out' cannot be written"],
    ),
    "mistyped_stem_type": (
        [PRETRAIN, "--stem_type", "dep", "--output_dir", "{probe}/out"],
        ["--stem_type='dep'", "'deep'"],
    ),
    # A ViT is built at --input_size (img_size follows it); an img_size of its own that disagrees is the mistake.
    "vit_img_size_against_input_size": (
        [
            PRETRAIN,
            "--model_name",
            "vit_tiny_patch16_224",
            "--model_kwargs",
            '{"img_size": 224}',
            "--input_size",
            "32",
            "--output_dir",
            "{probe}/out",
        ],
        ["--model_kwargs sets img_size 224", "--input_size"],
    ),
    "garbage_config_json": (
        [FINETUNE, "--model_name_or_path", "{probe}/garbage", "--output_dir", "{probe}/out"],
        ["--model_name_or_path", "garbage", "not a valid JSON file"],
    ),
    "hub_model_id_offline": (
        [FINETUNE, "--model_name_or_path", "someone/no-such-model", "--output_dir", "{probe}/out"],
        ["--model_name_or_path 'someone/no-such-model'", "in the cache"],
    ),
    "hub_data_set_offline_not_cached": (
        [PRETRAIN, "--dataset_name", "cifar10", "--output_dir", "{probe}/out"],
        ["--dataset_name", "uoft-cs/cifar10", "--train_dir"],
    ),
    "pk_batches_of_one_class": (
        [
            PRETRAIN,
            "--train_dir",
            "{probe}/images",
            "--sampler",
            "pk",
            "--per_device_train_batch_size",
            "12",
            "--ra",
            "3",
            "--pk_images_per_class",
            "4",
            "--output_dir",
            "{probe}/out",
        ],
        ["--sampler pk", "single class", "--pk_images_per_class"],
    ),
    "empty_tar_shard": (
        [
            PRETRAIN,
            "--streaming",
            "--train_files",
            "{probe}/empty.tar",
            "--validation_files",
            "{probe}/empty.tar",
            "--streaming_num_examples",
            "10",
            "--output_dir",
            "{probe}/out",
        ],
        ["--train_files", "empty.tar", "Must pass at least one table"],
    ),
    "analyze_missing_model_folder": (
        ["-m", "simlap_hf.analyze", "--model_name_or_path", "{probe}/missing", "--output_dir", "{probe}/analysis"],
        ["--model_name_or_path", "missing"],
    ),
    "search_with_a_folder_as_image": (
        ["-m", "simlap_hf.search", "--index", "{probe}", "--image", "{probe}/images"],
        ["--image", "is a folder"],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_one_line(case, probe):
    argv, fragments = CASES[case]
    env = {"HF_DATASETS_CACHE": str(probe / "empty-cache"), "PYTHONPATH": str(ROOT)}
    result = run_user_command([arg.replace("{probe}", str(probe)) for arg in argv], probe, env)
    assert_one_line_error(result, *fragments)
    assert not (probe / "out").exists()  # stopped before writing anything


def test_debug_shows_the_traceback_of_a_user_error(probe):
    argv = [PRETRAIN, "--stem_type", "dep", "--output_dir", str(probe / "out"), "--debug"]
    result = run_user_command(argv, probe, {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "Traceback" in result.stderr and "UsageError" in result.stderr


def test_a_bug_in_a_command_keeps_its_traceback(probe, tmp_path):
    """embed/search/demo no longer turn every ValueError into one line: an error raised inside a library is shown
    with its traceback."""
    code = (
        "import sys, json\n"
        "import simlap_hf.search as search\n"
        "def broken(argv):\n"
        "    return json.loads('{not json')\n"  # a ValueError raised inside the json library: a bug
        "search.run = broken\n"
        "sys.exit(search.main(sys.argv[1:]))\n"
    )
    result = run_user_command(["-c", code], tmp_path, {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 1 and "Traceback" in result.stderr and "JSONDecodeError" in result.stderr


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    """The package built as a wheel and installed into a folder outside the repository (no editable install)."""
    folder = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(folder / "dist"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if build.returncode != 0:
        pytest.skip(f"the wheel could not be built here: {build.stderr[-500:]}")
    (wheel,) = (folder / "dist").glob("*.whl")
    target = folder / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=TIMEOUT,
    )
    scripts = folder / "scripts"
    scripts.mkdir()
    shutil.copy(ROOT / "train_pretrain.py", scripts / "train_pretrain.py")
    return target, scripts


def test_installed_wheel_prints_user_errors_as_one_line(wheel_install, probe):
    target, scripts = wheel_install
    env = {"PYTHONPATH": str(target)}  # before site-packages, so the wheel's copy is imported, not the editable one
    where = run_user_command(["-c", "import simlap_hf, json; print(json.dumps(simlap_hf.__file__))"], probe, env)
    assert json.loads(where.stdout).startswith(str(target)), where.stdout + where.stderr
    result = run_user_command([str(scripts / "train_pretrain.py"), "--ra", "0"], probe, env)
    assert_one_line_error(result, "--ra")
    result = run_user_command([str(scripts / "train_pretrain.py"), str(probe / "ten.yaml")], probe, env)
    assert_one_line_error(result, "ten.yaml", "num_train_epochs")
    result = run_user_command(["-m", "simlap_hf.search", "--index", str(probe), "--image", str(probe)], probe, env)
    assert_one_line_error(result, "--image", "is a folder")
