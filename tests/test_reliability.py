"""Fault injection: faults and bad input lose nothing.

Each test injects one fault and checks the guarantee written in README "Guarantees":

* SIGKILL mid-epoch: ``--resume_from_checkpoint latest`` finishes the run with the weights, metrics and per-step losses
  of an uninterrupted run (CPU, same seed).
* SIGKILL while a checkpoint is written: the half-written folder is never taken for a checkpoint; resume falls back to
  the previous one with a warning and still matches the uninterrupted run.
* SIGTERM / SIGINT: a checkpoint at the next step boundary, a message saying how to resume, exit code 143 / 130 and
  no traceback; the resumed run matches the uninterrupted one.
* A failing write (disk full): a clear error, no half-written checkpoint, the previous checkpoint intact and loadable.
* A non-finite loss: a message naming epoch, batch and loss parts; the last good checkpoint stays the latest.
* Broken data and broken model files: errors that name the file, class or mismatch.
* Properties of the loss (permutation invariance, finiteness) and of the resumed data order.

Subprocess runs use one thread each so that they are comparable with each other to 1e-6. Bad input already covered
elsewhere is not repeated here: label values out of range when loading (tests/test_data.py::test_bad_labels) and in the
model (tests/test_modeling.py::test_labels_out_of_range_are_rejected), corrupt images when loading
(tests/test_data.py::test_corrupt_imagefolder_file, ::test_corrupt_embedded_image), empty splits
(tests/test_data.py::test_empty_split), the loss on one class or without partners (tests/test_losses.py), the sampler's
coverage and sharding (tests/test_data.py::test_sampler_sharding_property).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate.data_loader import prepare_data_loader, skip_first_batches
from conftest import tiny_run_flags, two_process_command, write_image_folder
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import simlap_hf.training as training
import simlap_hf.training.checkpoints as training_checkpoints
import train_pretrain
from simlap_hf import SimLAPConfig, SimLAPForImageClassification, SimLAPModel
from simlap_hf.data import DataArguments, create_train_dataloader
from simlap_hf.errors import UsageError
from simlap_hf.losses import simlap_loss

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
STEPS_PER_EPOCH = 4  # 24 images, a quarter kept for validation: 18 x ra 3 = 54 samples = 4 batches of 12
TOTAL_STEPS = EPOCHS * STEPS_PER_EPOCH
PROCESS_TIMEOUT = 300  # seconds; generous for two busy cores

# Writes the second checkpoint's files, cuts its weights file in half as an interrupted write would, announces that it
# is saving (a file 'saving' in the output folder) and waits there to be killed.
SLOW_SECOND_SAVE = (
    "import sys, time, pathlib, accelerate, train_pretrain\n"
    "original = accelerate.Accelerator.save_state\n"
    "calls = []\n"
    "def save_state(self, output_dir=None, **kwargs):\n"
    "    calls.append(output_dir)\n"
    "    result = original(self, output_dir, **kwargs)\n"
    "    if len(calls) == 2:\n"
    "        weights = pathlib.Path(output_dir) / 'model.safetensors'\n"
    "        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])\n"
    "        (pathlib.Path(output_dir).parents[1] / 'saving').touch()\n"
    "        time.sleep(600)\n"
    "    return result\n"
    "accelerate.Accelerator.save_state = save_state\n"
    "train_pretrain.run(sys.argv[1:])\n"
)


def flags(train_dir: str | Path, output_dir: Path, epochs: int = EPOCHS) -> list[str]:
    """A tiny pretraining run: resnet10t (output stride 32) on 16x16 images, 4 steps per epoch, an evaluation and a
    checkpoint per epoch."""
    return tiny_run_flags(
        output_dir,
        train_dir,
        stem_type=None,
        output_stride=0,
        per_device_eval_batch_size=32,
        knn_k=5,
        num_train_epochs=epochs,
    )


# ----------------------------------------------------------------------------------------------------------------
# Subprocess runs


class Script:
    """``python train_pretrain.py ARGS`` (or ``python -c CODE ARGS``) in the background, output kept in files."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, code: str | None = None, command: list[str] | None = None
    ) -> None:
        self.name = name
        self.stdout_path = log_dir / f"{name}.stdout"
        self.stderr_path = log_dir / f"{name}.stderr"
        if command is None:
            command = [sys.executable, "-c", code] if code else [sys.executable, str(ROOT / "train_pretrain.py")]
        # One thread per run: comparable results, and two runs can share two cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(command + args, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def describe(self) -> str:
        return f"{self.name} (exit code {self.process.poll()}):\n{self.stdout[-2000:]}\n{self.stderr[-4000:]}"

    def wait(self, expected_code: int | None = 0) -> int:
        try:
            code = self.process.wait(timeout=PROCESS_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            pytest.fail(f"{self.name} did not finish within {PROCESS_TIMEOUT} s: {self.describe()}")
        if expected_code is not None:
            assert code == expected_code, self.describe()
        return code

    def wait_until(self, condition, what: str) -> None:
        """Poll ``condition()`` until it holds; fail if the process ends first."""
        deadline = time.monotonic() + PROCESS_TIMEOUT
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"{self.name} ended before {what}: {self.describe()}")
            if time.monotonic() > deadline:
                pytest.fail(f"{self.name}: no {what} within {PROCESS_TIMEOUT} s: {self.describe()}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill the run if it is still going, and the worker processes it started (torchrun), by process id."""
        if self.process.poll() is None:
            try:
                workers = _children(self.process.pid)
            except OSError:
                workers = []
            self.process.kill()
            self.process.wait()
            for pid in workers:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def scripts(tmp_path):
    """Start :class:`Script` runs; any still running at the end of the test is killed."""
    started: list[Script] = []

    def start(name: str, args: list[str], code: str | None = None, command: list[str] | None = None) -> Script:
        script = Script(name, args, tmp_path, code, command)
        started.append(script)
        return script

    yield start
    for script in started:
        script.stop()


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> str:
    return write_image_folder(tmp_path_factory.mktemp("reliability") / "images", images_per_class=6)


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    """An uninterrupted subprocess run, started on first use and awaited by :func:`reference_dir`: tests compare
    their resumed runs with it. Runs in the background while the test that first asks for it starts its own."""
    folder = tmp_path_factory.mktemp("reference")
    script = Script("reference", flags(image_folder, folder / "run"), folder)
    yield script, folder / "run"
    script.stop()


def reference_dir(reference) -> Path:
    script, output_dir = reference
    script.wait()
    return output_dir


def read_log(output_dir: Path) -> list[dict]:
    """Complete records of ``training_log.jsonl`` (a line being written is skipped)."""
    path = output_dir / "training_log.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def last_trained_step(output_dir: Path) -> int:
    return max((record["step"] for record in read_log(output_dir) if "loss" in record), default=0)


def checkpoint_names(output_dir: Path) -> list[str]:
    root = output_dir / "checkpoints"
    return sorted(path.name for path in root.iterdir()) if root.is_dir() else []


def assert_same_run(expected_dir: Path, actual_dir: Path) -> None:
    """Same final weights (to 1e-6), metrics and per-step losses; the log holds every step exactly once."""
    expected, actual = load_file(expected_dir / "model.safetensors"), load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=name)
    first = json.loads((expected_dir / "all_results.json").read_text())
    second = json.loads((actual_dir / "all_results.json").read_text())
    for name in ("eval_top1", "eval_top5", "eval_knn_top1", "epochs", "global_step"):
        assert first[name] == second[name], name
    assert_same_losses(expected_dir, actual_dir, until_step=TOTAL_STEPS)


def assert_same_losses(expected_dir: Path, actual_dir: Path, until_step: int) -> None:
    """The log of ``actual_dir`` holds every step exactly once, with the losses of ``expected_dir`` up to
    ``until_step``."""
    losses = {r["step"]: r["loss"] for r in read_log(expected_dir) if "loss" in r}
    resumed = [(r["step"], r["loss"]) for r in read_log(actual_dir) if "loss" in r]
    assert [step for step, _ in resumed] == list(range(1, TOTAL_STEPS + 1))  # no step lost or logged twice
    for step, loss in resumed[:until_step]:
        assert loss == pytest.approx(losses[step], rel=1e-5, abs=1e-6), step


# ----------------------------------------------------------------------------------------------------------------
# Killed, stopped, interrupted


@pytest.mark.xdist_group("reliability_reference")
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(image_folder, reference, scripts, tmp_path):
    output_dir = tmp_path / "killed"
    run = scripts("killed", flags(image_folder, output_dir))
    first_checkpoint = output_dir / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH:08d}"
    # Past the first (epoch-end) checkpoint, inside the second epoch.
    run.wait_until(
        lambda: first_checkpoint.is_dir() and last_trained_step(output_dir) > STEPS_PER_EPOCH,
        "a step of the second epoch",
    )
    run.process.send_signal(signal.SIGKILL)
    assert run.wait(expected_code=None) == -signal.SIGKILL
    assert STEPS_PER_EPOCH < last_trained_step(output_dir) < 2 * STEPS_PER_EPOCH  # killed mid-epoch
    assert checkpoint_names(output_dir) == [first_checkpoint.name]
    assert not (output_dir / "model.safetensors").exists()

    resumed = scripts("resumed", flags(image_folder, output_dir) + ["--resume_from_checkpoint", "latest"])
    resumed.wait()
    assert f"Resumed from {first_checkpoint}" in resumed.stderr
    assert_same_run(reference_dir(reference), output_dir)


@pytest.mark.xdist_group("reliability_reference")
def test_sigkill_while_writing_a_checkpoint_falls_back_to_previous(image_folder, reference, scripts, tmp_path, caplog):
    output_dir = tmp_path / "killed_saving"
    run = scripts("killed_saving", flags(image_folder, output_dir), code=SLOW_SECOND_SAVE)
    run.wait_until((output_dir / "saving").is_file, "the second checkpoint being written")
    run.process.send_signal(signal.SIGKILL)
    run.wait(expected_code=-signal.SIGKILL)
    first, second = f"checkpoint-{STEPS_PER_EPOCH:08d}", f"checkpoint-{2 * STEPS_PER_EPOCH:08d}"
    assert checkpoint_names(output_dir) == [
        f".tmp-{second}",
        first,
    ]  # the half-written one only under its temporary name

    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        assert training.find_checkpoint(output_dir, "latest") == output_dir / "checkpoints" / first
    assert "Ignoring incomplete checkpoint" in caplog.text and f".tmp-{second}" in caplog.text

    resumed = scripts("resumed", flags(image_folder, output_dir) + ["--resume_from_checkpoint", "latest"])
    resumed.wait()
    assert (
        "Ignoring incomplete checkpoint" in resumed.stderr
        and f"Resumed from {output_dir / 'checkpoints' / first}" in resumed.stderr
    )
    assert not any(name.startswith(".tmp") for name in checkpoint_names(output_dir))  # rewritten, then renamed
    assert_same_run(reference_dir(reference), output_dir)


@pytest.mark.xdist_group("reliability_reference")
def test_sigterm_saves_mid_epoch_checkpoint_exits_143_and_resumes(image_folder, reference, scripts, tmp_path):
    output_dir = tmp_path / "preempted"
    run = scripts("preempted", flags(image_folder, output_dir))
    run.wait_until(lambda: last_trained_step(output_dir) > STEPS_PER_EPOCH, "a step of the second epoch")
    run.process.send_signal(signal.SIGTERM)
    run.wait(expected_code=143)
    assert "Traceback" not in run.stderr
    assert "Resume with the same command plus --resume_from_checkpoint latest" in run.stdout
    latest = training.find_checkpoint(output_dir, "latest")
    state = json.loads((latest / training.STATE_FILE).read_text())
    assert state["epoch"] == 1 and 0 < state["step_in_epoch"] <= STEPS_PER_EPOCH  # inside the second epoch
    assert latest.name == f"checkpoint-{state['global_step']:08d}-{state['step_in_epoch']}"
    assert f"checkpoint saved to {latest}" in run.stdout
    assert state["global_step"] == last_trained_step(output_dir)  # saved at the step boundary after the signal
    assert (latest / "augmentation_rng_0.pt").is_file()  # the random state before the next batch's augmentations

    resumed = scripts("resumed", flags(image_folder, output_dir) + ["--resume_from_checkpoint", "latest"])
    resumed.wait()
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["epochs"] == EPOCHS and results["global_step"] == TOTAL_STEPS
    # The same batches (test_resumed_epoch_sees_exactly_the_remaining_batches), augmented from the random state the
    # stopped run had before it fetched the next batch, and the same partner classes: the uninterrupted run exactly.
    assert_same_run(reference_dir(reference), output_dir)


def test_sigint_saves_checkpoint_and_exits_130(image_folder, scripts, tmp_path):
    output_dir = tmp_path / "ctrl_c"
    run = scripts("ctrl_c", flags(image_folder, output_dir))
    run.wait_until(lambda: last_trained_step(output_dir) >= 2, "the second step")
    run.process.send_signal(signal.SIGINT)
    run.wait(expected_code=130)
    assert "Traceback" not in run.stderr
    assert "Resume with the same command plus --resume_from_checkpoint latest" in run.stdout
    state = json.loads((training.find_checkpoint(output_dir, "latest") / training.STATE_FILE).read_text())
    assert state["global_step"] >= 2 and not (output_dir / "model.safetensors").exists()


@pytest.mark.xdist_group("reliability_reference")
def test_overwrite_then_ctrl_c_then_resume_continues_the_new_run(image_folder, reference, scripts, tmp_path):
    """--overwrite_output_dir over a finished run, Ctrl-C, then the printed resume command: the new run continues
    (not the old one, whose checkpoints would otherwise be the newest) and ends with the uninterrupted run's weights."""
    output_dir = tmp_path / "replaced"
    old = scripts("old", flags(image_folder, output_dir, epochs=EPOCHS + 1) + ["--seed", "8"])
    old.wait()
    assert checkpoint_names(output_dir)[-1] == f"checkpoint-{(EPOCHS + 1) * STEPS_PER_EPOCH:08d}"
    (output_dir / "notes.txt").write_text("not part of a run")
    new = scripts("new", flags(image_folder, output_dir) + ["--overwrite_output_dir"])
    old_steps = last_trained_step(output_dir)  # the old run's log is there until the new run moves it away
    new.wait_until(lambda: 2 <= last_trained_step(output_dir) < old_steps, "the second step of the new run")
    new.process.send_signal(signal.SIGINT)
    new.wait(expected_code=130)
    names = checkpoint_names(output_dir)
    assert names and all(int(name.split("-")[1]) < TOTAL_STEPS for name in names), names  # only the new run's
    assert not (output_dir / "model.safetensors").exists() and (output_dir / "notes.txt").is_file()
    resumed = scripts("resumed", flags(image_folder, output_dir) + ["--resume_from_checkpoint", "latest"])
    resumed.wait()
    assert_same_run(reference_dir(reference), output_dir)


@pytest.mark.xdist_group("reliability_reference")
def test_auto_resume_restarts_a_run_killed_before_its_first_checkpoint(image_folder, reference, scripts, tmp_path):
    """A requeued job runs the same command with --resume_from_checkpoint auto: killed before its first complete
    checkpoint, it starts fresh; later it continues; finished, it only re-saves. Every time the same final run."""
    output_dir = tmp_path / "requeued"
    command = flags(image_folder, output_dir) + ["--resume_from_checkpoint", "auto"]
    first = scripts("first", command)
    first.wait_until(lambda: last_trained_step(output_dir) >= 1, "the first step")
    first.stop()  # SIGKILL inside the first epoch: no checkpoint yet
    assert not checkpoint_names(output_dir) or all(name.startswith(".") for name in checkpoint_names(output_dir))
    second = scripts("second", command)
    second.wait_until(lambda: last_trained_step(output_dir) > STEPS_PER_EPOCH + 1, "a step of the second epoch")
    second.stop()  # killed after the epoch-1 checkpoint
    third = scripts("third", command)
    third.wait()
    assert "continuing from the newest complete checkpoint" in third.stderr
    assert_same_run(reference_dir(reference), output_dir)
    again = scripts("again", command)  # the job requeued once more after it finished
    again.wait()
    assert_same_run(reference_dir(reference), output_dir)


def test_more_epochs_on_resume_rebuild_the_schedule_fewer_are_refused(image_folder, tmp_path, caplog):
    output_dir = tmp_path / "extended"
    train_pretrain.run(flags(image_folder, output_dir, epochs=1) + ["--min_lr", "1e-6"])
    with caplog.at_level(logging.WARNING, logger="simlap_hf"):
        train_pretrain.run(
            flags(image_folder, output_dir, epochs=2) + ["--min_lr", "1e-6", "--resume_from_checkpoint", "latest"]
        )
    assert "schedule is rebuilt for 2 epochs" in caplog.text
    rates = {record["step"]: record["lr"] for record in read_log(output_dir) if "lr" in record}
    assert sorted(rates) == list(range(1, 2 * STEPS_PER_EPOCH + 1))
    # The second epoch follows a cosine over 2 epochs (1 of warmup): well above min_lr, falling to it at the end.
    second_epoch = [rates[step] for step in range(STEPS_PER_EPOCH + 1, 2 * STEPS_PER_EPOCH + 1)]
    assert second_epoch[0] > 100 * 1e-6 and second_epoch == sorted(second_epoch, reverse=True)
    assert json.loads((output_dir / "all_results.json").read_text())["epochs"] == 2
    with pytest.raises(ValueError, match=r"--num_train_epochs=1 is less than the 2 epoch\(s\)"):
        train_pretrain.run(flags(image_folder, output_dir, epochs=1) + ["--resume_from_checkpoint", "latest"])


def _children(pid: int) -> list[int]:
    """Process ids of the direct children of ``pid`` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def _local_rank(pid: int) -> str | None:
    try:
        variables = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    values = dict(item.split(b"=", 1) for item in variables if b"=" in item)
    return values.get(b"LOCAL_RANK", b"").decode() or None


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(image_folder, scripts, tmp_path):
    """Preemption may reach the processes of a multi-process run at different steps (or only one of them): they agree
    on the step to stop at, save one checkpoint together and exit, instead of waiting on each other for ever."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc to signal a single worker process")
    output_dir = tmp_path / "two_processes"
    command = two_process_command(ROOT / "train_pretrain.py")
    run = scripts("two_processes", flags(image_folder, output_dir), command=command)
    # Each process takes 2 of the 4 batches of an epoch: signal rank 1 only, inside the second epoch.
    run.wait_until(lambda: last_trained_step(output_dir) >= 3, "a step of the second epoch")
    workers = {_local_rank(pid): pid for pid in _children(run.process.pid)}
    assert set(workers) >= {"0", "1"}, workers
    os.kill(workers["1"], signal.SIGTERM)
    run.wait(expected_code=None)  # torchrun reports the deliberate non-zero exits of its workers as a failure
    assert "Resume with the same command plus --resume_from_checkpoint latest" in run.stdout, run.describe()
    latest = training.find_checkpoint(output_dir, "latest")
    state = json.loads((latest / training.STATE_FILE).read_text())
    # One checkpoint inside an epoch, at the same step on both processes (else save_state would not have finished).
    assert state["step_in_epoch"] > 0 and state["global_step"] == 2 * state["epoch"] + state["step_in_epoch"]
    assert f"checkpoint saved to {latest}" in run.stdout


# Stops (as after a signal) at the third optimizer step, on every process; run by the two-process resume test.
STOP_AT_THIRD_STEP = (
    "import sys, train_pretrain\n"
    "import simlap_hf.training as training\n"
    "import simlap_hf.training.loop as loop\n"
    "calls = []\n"
    "original = loop._exchange_step_flags\n"
    "def stop_at_third_step(accelerator, requested, losses):\n"
    "    calls.append(1)\n"
    "    return original(accelerator, requested or len(calls) == 3, losses)\n"
    "loop._exchange_step_flags = stop_at_third_step\n"
    "sys.exit(training.run_main(train_pretrain.run, sys.argv[1:]))\n"
)


@pytest.mark.slow
def test_two_processes_mid_epoch_resume_equals_uninterrupted_two_process_run(image_folder, tmp_path):
    """Each process replays its own augmentation RNG state: the resumed 2-process run ends with the weights of an
    uninterrupted 2-process run."""

    def torchrun_run(code: str | None, output_dir: Path, extra: list[str]) -> subprocess.CompletedProcess:
        """The script itself in two processes, or ``code`` (which runs it with a change) when given."""
        entry = ROOT / "train_pretrain.py"
        if code is not None:
            entry = tmp_path / f"entry_{len(list(tmp_path.glob('entry_*')))}.py"
            entry.write_text(f"import sys\nsys.path.insert(0, {str(ROOT)!r})\n" + code)
        command = two_process_command(entry, *flags(image_folder, output_dir), *extra)
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT)

    uninterrupted = torchrun_run(None, tmp_path / "uninterrupted", [])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    output_dir = tmp_path / "stopped"
    torchrun_run(STOP_AT_THIRD_STEP, output_dir, [])  # exits non-zero on purpose, after saving the checkpoint
    latest = training.find_checkpoint(output_dir, "latest")
    state = json.loads((latest / training.STATE_FILE).read_text())
    assert state["global_step"] == 3 and state["step_in_epoch"] > 0, state  # inside an epoch
    assert (latest / "augmentation_rng_0.pt").is_file() and (latest / "augmentation_rng_1.pt").is_file()
    resumed = torchrun_run(None, output_dir, ["--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = load_file(tmp_path / "uninterrupted" / "model.safetensors")
    actual = load_file(output_dir / "model.safetensors")
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, atol=1e-6, rtol=0, msg=name)


def test_run_main_exit_codes():
    def stopped(signum):
        def run(argv):
            raise training.TrainingInterrupted("stopped", signum)

        return run

    def ctrl_c(argv):
        raise KeyboardInterrupt

    def broken(argv):
        raise UsageError("bad flag")  # the user's mistake, by type: one line

    def foreign(argv):
        raise ValueError("raised outside the package")  # neither a UsageError nor the package's own check

    def bug(argv):
        return {}["missing"]  # a KeyError: a bug keeps its traceback

    assert training.run_main(lambda argv: None, []) == 0
    assert training.run_main(stopped(signal.SIGTERM), []) == 143
    assert training.run_main(stopped(signal.SIGINT), []) == 130
    assert training.run_main(ctrl_c, []) == 130
    assert training.run_main(broken, []) == 1
    with pytest.raises(ValueError, match="bad flag"):
        training.run_main(broken, ["--debug"])
    with pytest.raises(KeyError):
        training.run_main(bug, [])
    with pytest.raises(ValueError, match="outside the package"):
        training.run_main(foreign, [])


# ----------------------------------------------------------------------------------------------------------------
# Failing writes, non-finite losses


def _tiny_accelerator_run(tmp_path):
    accelerator = accelerate.Accelerator()
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, training.TrainingArguments(output_dir=str(tmp_path / "run"))


def test_disk_full_on_second_checkpoint_keeps_the_first(tmp_path, monkeypatch):
    accelerator, model, args = _tiny_accelerator_run(tmp_path)
    first = training.save_checkpoint(accelerator, training.TrainerState(epoch=1, global_step=1), args)
    saved = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    original = accelerate.Accelerator.save_state

    def save_state_disk_full(self, output_dir=None, **kwargs):
        original(self, output_dir, **kwargs)  # some files written, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state_disk_full)
    with torch.no_grad():
        model.weight.add_(1.0)
    with pytest.raises(
        OSError, match=r"Could not write checkpoint .*checkpoint-00000002.*No space left on device"
    ) as error:
        training.save_checkpoint(accelerator, training.TrainerState(epoch=2, global_step=2), args)
    message = str(error.value)
    assert f"The previous checkpoint {first} is intact" in message and "--resume_from_checkpoint latest" in message
    assert checkpoint_names(Path(args.output_dir)) == [first.name]  # nothing half-written left behind
    assert training.find_checkpoint(args.output_dir, "latest") == first
    monkeypatch.undo()
    state = training.load_checkpoint(accelerator, first)
    assert state.global_step == 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_checkpoint_deleted_halfway_never_looks_like_a_checkpoint(tmp_path, monkeypatch):
    """Killed while an old checkpoint is being removed (rotation): the half-deleted folder is no checkpoint."""
    accelerator, _, args = _tiny_accelerator_run(tmp_path)
    args.save_total_limit = 1
    first = training.save_checkpoint(accelerator, training.TrainerState(epoch=1, global_step=1), args)
    original = shutil.rmtree

    def killed_while_deleting(path, *rest, **kwargs):
        path = Path(path)
        if path.is_dir() and first.name in path.name:
            (path / "model.safetensors").unlink()  # some files gone, trainer_state.json still there
            raise KeyboardInterrupt("killed")
        return original(path, *rest, **kwargs)

    monkeypatch.setattr(training_checkpoints.shutil, "rmtree", killed_while_deleting)
    with pytest.raises(KeyboardInterrupt):
        training.save_checkpoint(accelerator, training.TrainerState(epoch=2, global_step=2), args)
    monkeypatch.undo()
    second = Path(args.output_dir) / "checkpoints" / "checkpoint-00000002"
    assert training.list_checkpoints(args.output_dir) == [second]
    assert not first.exists()


def test_epoch_end_checkpoint_is_later_than_a_stop_after_the_last_batch(tmp_path):
    """A stop request after the last batch of an epoch saves checkpoint-<step>-<batches>; the epoch-end checkpoint of
    the same step (saved after resuming and evaluating) is the later one."""
    root = tmp_path / "checkpoints"
    for name, state in (
        ("checkpoint-00000008", {"epoch": 2, "step_in_epoch": 0}),
        ("checkpoint-00000008-4", {"epoch": 1, "step_in_epoch": 4}),
    ):
        (root / name).mkdir(parents=True)
        (root / name / training.STATE_FILE).write_text(json.dumps({"global_step": 8, **state}))
    assert training.find_checkpoint(tmp_path, "latest") == root / "checkpoint-00000008"


def test_damaged_checkpoint_names_itself_and_the_alternatives(tmp_path):
    accelerator, model, args = _tiny_accelerator_run(tmp_path)
    first = training.save_checkpoint(accelerator, training.TrainerState(epoch=1, global_step=1), args)
    second = training.save_checkpoint(accelerator, training.TrainerState(epoch=2, global_step=2), args)
    weights = second / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:20])
    with pytest.raises(OSError, match=r"Could not load checkpoint .*checkpoint-00000002") as error:
        training.load_checkpoint(accelerator, training.find_checkpoint(args.output_dir, "latest"))
    assert str(first) in str(error.value) and "--resume_from_checkpoint <folder>" in str(error.value)
    assert training.load_checkpoint(accelerator, first).global_step == 1


def test_real_write_failure_during_training_then_resume(image_folder, tmp_path, monkeypatch):
    """The operating system refuses the writes (a file size limit, as a full disk would): torch and safetensors raise
    their own error types, which must still give the clear error and keep the previous checkpoint."""
    resource = pytest.importorskip("resource", reason="file size limits (RLIMIT_FSIZE) need a POSIX system")

    output_dir = tmp_path / "full_disk"
    original = accelerate.Accelerator.save_state
    calls = []

    def save_state_with_full_disk(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) != 2:
            return original(self, output_dir, **kwargs)
        # Room for the weights file (as big as in the first checkpoint) but not for the larger optimizer state.
        first = Path(calls[0].replace(".tmp-", ""))
        limit = (first / "model.safetensors").stat().st_size + 4096
        assert (first / "optimizer.bin").stat().st_size > limit
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        previous_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            return original(self, output_dir, **kwargs)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, previous_handler)

    monkeypatch.setattr(accelerate.Accelerator, "save_state", save_state_with_full_disk)
    with pytest.raises(OSError, match=r"Could not write checkpoint .*checkpoint-00000008': RuntimeError") as error:
        train_pretrain.run(flags(image_folder, output_dir, epochs=2))
    first = output_dir / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH:08d}"
    assert f"The previous checkpoint {first} is intact" in str(error.value)
    assert checkpoint_names(output_dir) == [first.name]
    monkeypatch.undo()

    _, results = train_pretrain.run(flags(image_folder, output_dir, epochs=2) + ["--resume_from_checkpoint", "latest"])
    assert results["global_step"] == 2 * STEPS_PER_EPOCH and (output_dir / "model.safetensors").is_file()


def test_non_finite_loss_stops_with_message_and_keeps_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    output_dir = tmp_path / "nan"
    original = train_pretrain.simlap_step
    calls = []

    def step_with_nan(model, batch):
        calls.append(1)
        loss, logs = original(model, batch)
        if len(calls) == STEPS_PER_EPOCH + 2:  # the second batch of the second epoch
            nan = torch.full_like(loss, float("nan"))
            return loss + nan, {**logs, "contrastive_loss": logs["contrastive_loss"] + nan}
        return loss, logs

    monkeypatch.setattr(train_pretrain, "simlap_step", step_with_nan)
    with pytest.raises(FloatingPointError) as error:
        train_pretrain.run(flags(image_folder, output_dir, epochs=2))
    message = str(error.value)
    first = output_dir / "checkpoints" / f"checkpoint-{STEPS_PER_EPOCH:08d}"
    assert f"Non-finite loss nan in epoch 2/2, batch 2/{STEPS_PER_EPOCH}" in message
    assert "contrastive_loss=nan" in message and "head_loss=" in message
    assert f"The last good checkpoint, {first}, stays the latest" in message
    assert training.find_checkpoint(output_dir, "latest") == first
    assert checkpoint_names(output_dir) == [first.name] and not (output_dir / "model.safetensors").exists()
    assert last_trained_step(output_dir) == STEPS_PER_EPOCH + 1  # the bad step was not applied


# ----------------------------------------------------------------------------------------------------------------
# Broken data


def test_corrupt_images_named_or_skipped_and_counted_through_the_script(tmp_path, caplog):
    folder = Path(write_image_folder(tmp_path / "images", images_per_class=6))
    truncated = folder / "red" / "0.png"
    truncated.write_bytes(truncated.read_bytes()[:30])
    garbage = folder / "blue" / "junk.jpg"
    garbage.write_bytes(b"not a jpeg at all")
    with pytest.raises(ValueError, match=r"2 unreadable image file\(s\)") as error:
        train_pretrain.run(flags(folder, tmp_path / "refused", epochs=1))
    assert str(truncated) in str(error.value) and str(garbage) in str(error.value)
    assert "--skip_corrupt_images" in str(error.value)

    with caplog.at_level(logging.WARNING, logger="simlap_hf.data"):
        _, results = train_pretrain.run(flags(folder, tmp_path / "skipped", epochs=1) + ["--skip_corrupt_images"])
    assert "Skipped 2 corrupt image(s)" in caplog.text
    assert "0.png" in caplog.text and "junk.jpg" in caplog.text
    # 22 readable images: 16 for training (16 x ra 3 = 48 samples = 4 batches of 12).
    assert results["global_step"] == 4


def test_empty_class_folder_is_an_error_naming_it(tmp_path):
    folder = Path(write_image_folder(tmp_path / "images", images_per_class=3))
    (folder / "purple").mkdir()
    (folder / "purple" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) 'purple' hold no image files"):
        train_pretrain.run(flags(folder, tmp_path / "run", epochs=1))


def test_single_class_is_refused_before_training(tmp_path):
    folder = Path(write_image_folder(tmp_path / "images", images_per_class=6))
    for name in ("green", "blue", "gray"):
        shutil.rmtree(folder / name)
    with pytest.raises(ValueError, match=r"single class \('red'.*at least 2 classes"):
        train_pretrain.run(flags(folder, tmp_path / "run", epochs=1))


def test_single_class_batch_trains_without_nan():
    """The model itself has a defined behaviour on one class: no negatives, contrastive loss 0, finite gradients."""
    torch.manual_seed(0)
    config = SimLAPConfig(backbone="resnet10t", backbone_kwargs={}, num_classes=1, out_dim=8, mlp_dim=16)
    model = SimLAPModel(config).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(2):
        out = model(torch.randn(6, 3, 16, 16), labels=torch.zeros(6, dtype=torch.long))
        assert torch.isfinite(out.loss) and float(out.contrastive_loss.detach()) == 0.0
        optimizer.zero_grad()
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Broken model files


@pytest.fixture(scope="module")
def saved_classifier(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("classifier") / "three_classes"
    config = SimLAPConfig(backbone="resnet10t", backbone_kwargs={}, num_classes=3, out_dim=8, mlp_dim=16)
    SimLAPForImageClassification(config).save_pretrained(folder)
    return folder


def test_truncated_weights_file_is_named(saved_classifier, tmp_path):
    folder = tmp_path / "truncated"
    shutil.copytree(saved_classifier, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(OSError, match="truncated or corrupt") as error:
        SimLAPForImageClassification.from_pretrained(folder)
    assert str(weights) in str(error.value)


def test_folder_without_config_is_named(saved_classifier, tmp_path):
    folder = tmp_path / "no_config"
    shutil.copytree(saved_classifier, folder)
    (folder / "config.json").unlink()
    with pytest.raises(OSError, match=r"has no config\.json") as error:
        SimLAPForImageClassification.from_pretrained(folder)
    assert str(folder) in str(error.value)
    with pytest.raises(OSError, match="does not exist"):
        SimLAPForImageClassification.from_pretrained(tmp_path / "never_written")


@pytest.mark.parametrize("override", [{"num_labels": 5}, {"id2label": {i: f"c{i}" for i in range(5)}}])
def test_other_number_of_classes_names_the_mismatch(saved_classifier, override):
    with pytest.raises(
        ValueError, match=r"classifier\.weight: \(3, \d+\) in the file, \(5, \d+\) in the model"
    ) as error:
        SimLAPForImageClassification.from_pretrained(saved_classifier, **override)
    assert str(saved_classifier / "model.safetensors") in str(error.value)
    assert "ignore_mismatched_sizes=True" in str(error.value)
    model = SimLAPForImageClassification.from_pretrained(saved_classifier, ignore_mismatched_sizes=True, **override)
    assert model.classifier.out_features == 5
    same, info = SimLAPForImageClassification.from_pretrained(saved_classifier, output_loading_info=True)
    assert same.classifier.out_features == 3 and not info["mismatched_keys"]


# ----------------------------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None, database=None)
@given(
    batch=st.integers(min_value=1, max_value=12),
    dim=st.integers(min_value=1, max_value=8),
    num_classes=st.integers(min_value=1, max_value=6),
    temperature=st.floats(min_value=0.02, max_value=2.0),
    scale=st.sampled_from([1e-4, 1.0, 1e3]),
    zero_gates=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_loss_is_permutation_invariant_and_finite(batch, dim, num_classes, temperature, scale, zero_gates, seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=generator) * scale
    embeddings[0] = 0.0  # a collapsed embedding
    labels = torch.randint(0, num_classes, (batch,), generator=generator)
    pairs = torch.randint(0, num_classes + 2, (batch,), generator=generator)  # partner classes may be absent
    gates = torch.rand(batch, dim, generator=generator)
    if zero_gates:
        gates[-1] = 0.0  # a gate that switches every dimension off
    embeddings.requires_grad_(True)
    gates.requires_grad_(True)
    loss = simlap_loss(embeddings, labels, pairs, gates, temperature=temperature)
    assert torch.isfinite(loss) and loss >= 0
    loss.backward()
    assert torch.isfinite(embeddings.grad).all() and torch.isfinite(gates.grad).all()
    order = torch.randperm(batch, generator=generator)
    permuted = simlap_loss(embeddings[order], labels[order], pairs[order], gates[order], temperature=temperature)
    torch.testing.assert_close(permuted, loss, rtol=1e-5, atol=1e-5)
    # Keys given separately, in another order, give the same loss.
    key_order = torch.randperm(batch, generator=generator)
    with_keys = simlap_loss(
        embeddings,
        labels,
        pairs,
        gates,
        temperature=temperature,
        keys=embeddings[key_order],
        key_labels=labels[key_order],
    )
    torch.testing.assert_close(with_keys, loss, rtol=1e-5, atol=1e-5)


class _Indices(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": torch.zeros(1), "labels": index}


@settings(max_examples=60, deadline=None, database=None)
@given(
    num_samples=st.integers(min_value=1, max_value=40),
    ra=st.integers(min_value=1, max_value=4),
    groups_per_batch=st.integers(min_value=1, max_value=4),
    processes=st.integers(min_value=1, max_value=3),
    epoch=st.integers(min_value=0, max_value=3),
    data=st.data(),
)
def test_resumed_epoch_sees_exactly_the_remaining_batches(num_samples, ra, groups_per_batch, processes, epoch, data):
    """Extends tests/test_data.py::test_sampler_sharding_property to resumption: on every process, the loader that
    fit builds after a mid-epoch checkpoint (set_epoch, then skip the trained batches) yields exactly the batches the
    uninterrupted epoch still had, in the same order, and a fresh loader repeats the epoch identically."""
    batch_size = ra * groups_per_batch
    args = DataArguments(ra=ra)
    if num_samples * ra < batch_size:
        with pytest.raises(ValueError, match="images of one batch"):
            create_train_dataloader(_Indices(num_samples), args, batch_size, seed=5)
        return

    def epoch_batches(process: int, skip: int = 0) -> list[list[int]]:
        loader = create_train_dataloader(_Indices(num_samples), args, batch_size, seed=5)
        shard = prepare_data_loader(loader, num_processes=processes, process_index=process, put_on_device=False)
        shard.set_epoch(epoch)
        if skip:
            shard = skip_first_batches(shard, skip)
        return [batch["labels"].tolist() for batch in shard]

    for process in range(processes):
        full = epoch_batches(process)
        assert epoch_batches(process) == full
        skip = data.draw(st.integers(min_value=0, max_value=len(full)), label=f"skip on process {process}")
        assert epoch_batches(process, skip) == full[skip:]
        assert all(batch.count(i) == ra for batch in full for i in batch)  # copies stay together
