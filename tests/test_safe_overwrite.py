"""--overwrite_output_dir never loses a finished run: the previous run is moved aside only once the data is loaded,
put back when the new run ends before its first complete checkpoint (an input error, divergence, a double Ctrl-C, a
SIGKILL followed by the next start), and deleted only once the new run has one."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_flags, write_image_folder

import train_pretrain
from simlap_hf.training import previous_run_folder

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 300

# train_pretrain.py with every step slowed down (2 s, after touching the file $STEP_MARKER), so that a test can act
# between the moment the previous run is moved aside and the new run's first checkpoint.
SLOW_STEPS = (
    "import os, pathlib, sys, time, train_pretrain\n"
    "from simlap_hf.training import run_main\n"
    "step = train_pretrain.simlap_step\n"
    "def slow_step(model, batch):\n"
    "    pathlib.Path(os.environ['STEP_MARKER']).touch()\n"
    "    time.sleep(2.0)\n"
    "    return step(model, batch)\n"
    "train_pretrain.simlap_step = slow_step\n"
    "sys.exit(run_main(train_pretrain.run, sys.argv[1:]))\n"
)


def fingerprint(output_dir: Path) -> dict[str, str]:
    """Digest of every file of a run folder (hidden ones included), by relative path."""
    return {
        str(path.relative_to(output_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(output_dir.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """(image folder, a finished one-epoch run's folder, its file digests); tests copy the folder before changing it."""
    root = tmp_path_factory.mktemp("overwrite")
    images = write_image_folder(root / "images", images_per_class=6)
    output_dir = root / "finished"
    assert train_pretrain.main(run_flags(images, output_dir)) == 0
    return images, output_dir, fingerprint(output_dir)


def run_flags(images: str, output_dir: Path, *extra: str) -> list[str]:
    return tiny_run_flags(output_dir, images, num_train_epochs=1, output_stride=0, stem_type=None) + list(extra)


def copy_of(finished_run, tmp_path: Path) -> Path:
    _, output_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(output_dir, copy)
    return copy


def assert_intact(finished_run, output_dir: Path) -> None:
    assert fingerprint(output_dir) == finished_run[2]
    assert not previous_run_folder(output_dir).exists()


def test_overwrite_with_a_mistyped_data_set_keeps_the_previous_run(finished_run, tmp_path, capsys):
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    argv = run_flags(images, output_dir, "--overwrite_output_dir", "--train_dir", str(tmp_path / "imagez"))
    assert train_pretrain.main(argv) == 1
    assert "imagez" in capsys.readouterr().err.strip().splitlines()[-1]
    assert_intact(finished_run, output_dir)


def test_overwrite_that_diverges_at_once_puts_the_previous_run_back(finished_run, tmp_path, monkeypatch, capsys):
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    original = train_pretrain.simlap_step

    def diverging(model, batch):
        loss, logs = original(model, batch)
        return loss * torch.tensor(float("nan")), logs

    monkeypatch.setattr(train_pretrain, "simlap_step", diverging)
    assert train_pretrain.main(run_flags(images, output_dir, "--overwrite_output_dir")) == 1
    assert "Non-finite loss" in capsys.readouterr().err.strip().splitlines()[-1]
    assert_intact(finished_run, output_dir)


def test_overwrite_is_replaced_once_the_new_run_has_a_checkpoint(finished_run, tmp_path):
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    (output_dir / "notes.txt").write_text("not part of a run")
    assert train_pretrain.main(run_flags(images, output_dir, "--overwrite_output_dir", "--seed", "3")) == 0
    assert not previous_run_folder(output_dir).exists()
    assert (output_dir / "notes.txt").is_file()
    assert fingerprint(output_dir)["model.safetensors"] != finished_run[2]["model.safetensors"]


def start_slow_overwrite(images: str, output_dir: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "STEP_MARKER": str(log) + ".step"}
    argv = [sys.executable, "-c", SLOW_STEPS, *run_flags(images, output_dir, "--overwrite_output_dir")]
    with open(log, "w") as output:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)


def wait_until_moved_aside(process: subprocess.Popen, output_dir: Path, log: Path) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not previous_run_folder(output_dir).is_dir() or (output_dir / "model.safetensors").exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the previous run was never moved aside"
        time.sleep(0.01)


def test_double_ctrl_c_before_the_first_checkpoint_puts_the_previous_run_back(finished_run, tmp_path):
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    log = tmp_path / "log"
    process = start_slow_overwrite(images, output_dir, log)
    try:
        wait_until_moved_aside(process, output_dir, log)
        marker = Path(str(log) + ".step")
        while not marker.exists():  # the first step has started: 2 s before the loop could save a checkpoint
            assert process.poll() is None, log.read_text()[-3000:]
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)
        time.sleep(0.2)  # two signals at once would be handled as one
        process.send_signal(signal.SIGINT)  # the second Ctrl-C stops at once, without a checkpoint
        assert process.wait(timeout=TIMEOUT) == 130, log.read_text()[-3000:]
    finally:
        process.kill()
    assert "the previous run of" in log.read_text() and "was put back as it was" in log.read_text()
    assert_intact(finished_run, output_dir)


def test_sigkill_before_the_first_checkpoint_then_the_next_start_puts_the_previous_run_back(finished_run, tmp_path):
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    log = tmp_path / "log"
    process = start_slow_overwrite(images, output_dir, log)
    try:
        wait_until_moved_aside(process, output_dir, log)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=TIMEOUT)
    finally:
        process.kill()
    assert previous_run_folder(output_dir).is_dir() and not (output_dir / "model.safetensors").exists()
    # The next command on that folder, whatever it is (here one that fails at once), first puts the run back.
    result = subprocess.run(
        [sys.executable, "train_pretrain.py", *run_flags(images, output_dir, "--learning_rate", "-1")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 1 and "it was put back" in result.stderr, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: --learning_rate=-1.0 is not valid")
    assert_intact(finished_run, output_dir)


def test_resume_flag_wins_over_an_overwrite_set_in_the_yaml_file(finished_run, tmp_path, caplog):
    """The stop message's advice (the same command plus --resume_from_checkpoint latest) works when the YAML file
    sets overwrite_output_dir: true, as the quickstart configuration does."""
    images, _, _ = finished_run
    output_dir = copy_of(finished_run, tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text("overwrite_output_dir: true\n")
    argv = [str(config), *run_flags(images, output_dir, "--resume_from_checkpoint", "latest")]
    assert train_pretrain.main(argv) == 0  # the finished run only re-saves
    assert "--overwrite_output_dir is ignored" in caplog.text
    assert (output_dir / "checkpoints").is_dir() and not previous_run_folder(output_dir).exists()
