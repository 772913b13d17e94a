"""Two "machines" on this one: two torchrun invocations (``--nnodes 2 --node_rank 0/1``, rendezvous on 127.0.0.1),
each in its own working directory with a relative ``--output_dir``, so that no file is shared between them.

- training, a graceful stop (SIGTERM, as a cluster sends before preemption), and a resume on both machines from
  their own checkpoints (``--save_on_each_node``) end with the weights of the uninterrupted run;
- without ``--save_on_each_node``, a resume where machine 1 has no checkpoint fails at once on every machine with a
  message that names the flag, instead of hanging at a collective;
- the README's SLURM script, run as written under a stand-in ``srun`` that starts one task per "machine".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port, torchrun_executable

ROOT = Path(__file__).resolve().parents[1]

# A small real run on the bundled digits: resnet10t at 16 px, 2 machines x 1 process x 48 samples, 5 optimizer steps
# per epoch, a checkpoint every epoch.
SMALL_RUN = [
    "--dataset_name", "digits", "--max_train_samples", "480", "--max_eval_samples", "120",
    "--model_name", "resnet10t", "--stem_type", "", "--output_stride", "0", "--input_size", "16",
    "--out_dim", "32", "--mlp_dim", "64", "--aa", "none", "--reprob", "0", "--scale", "0.7", "1.0",
    "--per_device_train_batch_size", "48", "--per_device_eval_batch_size", "120", "--ra", "3",
    "--num_train_epochs", "3", "--warmup_epochs", "1", "--checkpointing_epochs", "1", "--eval_every", "3",
    "--logging_steps", "1", "--mixed_precision", "no", "--seed", "5", "--output_dir", "out",
]  # fmt: skip


def node_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false")
    env.pop("SIMLAP_DEBUG", None)
    return env


def start_machines(root: Path, flags: list[str]) -> list[subprocess.Popen]:
    """One torchrun per machine (1 process each), in ``root/node0`` and ``root/node1``."""
    torchrun = torchrun_executable()
    port = str(free_port())
    machines = []
    for rank in (0, 1):
        folder = root / f"node{rank}"
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            torchrun,
            "--nnodes",
            "2",
            "--node_rank",
            str(rank),
            "--nproc_per_node",
            "1",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
            str(ROOT / "train_pretrain.py"),
            *flags,
        ]
        log = open(folder / f"launch_{len(list(folder.glob('launch_*.log')))}.log", "w")
        machines.append(subprocess.Popen(command, cwd=folder, env=node_env(), stdout=log, stderr=subprocess.STDOUT))
    return machines


def wait_all(machines: list[subprocess.Popen], timeout: float = 400) -> list[int]:
    deadline = time.monotonic() + timeout
    codes = []
    for machine in machines:
        try:
            codes.append(machine.wait(timeout=max(1.0, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for other in machines:
                other.kill()
            raise AssertionError("a machine did not finish in time (a hang at a collective?)") from None
    return codes


def last_log(root: Path, rank: int) -> str:
    logs = sorted((root / f"node{rank}").glob("launch_*.log"))
    return logs[-1].read_text() if logs else ""


def run_machines(root: Path, flags: list[str], expected: int = 0) -> None:
    codes = wait_all(start_machines(root, flags))
    assert codes == [expected, expected], (
        f"exit codes {codes}\n{last_log(root, 0)[-3000:]}\n---\n{last_log(root, 1)[-3000:]}"
    )


def checkpoints(root: Path, rank: int) -> list[str]:
    folder = root / f"node{rank}" / "out" / "checkpoints"
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("checkpoint-")) if folder.is_dir() else []


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.mark.slow
def test_two_machines_without_shared_files_stop_and_resume_exactly(tmp_path):
    straight = tmp_path / "straight"
    run_machines(straight, SMALL_RUN)
    # Only the main machine writes the model and results; each machine has the checkpoints it needs only with
    # --save_on_each_node.
    assert (straight / "node0" / "out" / "model.safetensors").is_file()
    assert not (straight / "node1" / "out" / "model.safetensors").exists()

    # Without --save_on_each_node machine 1 has no checkpoint to resume from: every machine stops with one line.
    started = time.monotonic()
    run_machines(straight, [*SMALL_RUN, "--num_train_epochs", "4", "--resume_from_checkpoint", "latest"], expected=1)
    assert time.monotonic() - started < 300
    for rank in (0, 1):
        log = last_log(straight, rank)
        assert "error: --resume_from_checkpoint" in log and "--save_on_each_node" in log, log[-3000:]
        assert f'File "{ROOT / "simlap_hf"}' not in log, log[
            -3000:
        ]  # one line from the package; torchrun's report follows

    # A graceful stop (SIGTERM to both machines, as a scheduler sends) after the first logged step, then a resume
    # on both machines from their own copies of the checkpoint.
    stopped = tmp_path / "stopped"
    flags = [*SMALL_RUN, "--save_on_each_node"]
    machines = start_machines(stopped, flags)
    log = stopped / "node0" / "out" / "training_log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and log.read_text().strip()) and time.monotonic() < deadline:
        if any(machine.poll() is not None for machine in machines):
            break
        time.sleep(0.2)
    for machine in machines:
        machine.send_signal(signal.SIGTERM)
    codes = wait_all(machines)
    assert all(code != 0 for code in codes), "the run finished before it was stopped"
    assert checkpoints(stopped, 0) and checkpoints(stopped, 0) == checkpoints(stopped, 1)
    for rank in (0, 1):
        assert not (stopped / f"node{rank}" / "out" / "model.safetensors").exists()
    run_machines(stopped, [*flags, "--resume_from_checkpoint", "latest"])
    assert "Resumed from" in last_log(stopped, 0)
    results = json.loads((stopped / "node0" / "out" / "all_results.json").read_text())
    assert results["epochs"] == 3

    expected, actual = weights(straight / "node0" / "out"), weights(stopped / "node0" / "out")
    assert set(actual) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6, msg=name)


FAKE_SRUN = """#!{python}
# Stand-in for srun: one task per machine (SLURM_NNODES) with SLURM_NODEID set, all in the submit folder (a file
# system shared by the machines, as on most clusters); task N's output goes to $FAKE_SLURM_LOGS/taskN.log.
import os, subprocess, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
tasks = []
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node))
    with open(os.path.join(os.environ["FAKE_SLURM_LOGS"], "task%d.log" % node), "a") as log:
        tasks.append(subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT))
sys.exit(max(task.wait() for task in tasks))
"""


def run_slurm_script(command: str, submit_dir: Path, scratch: Path, *overrides: str) -> subprocess.CompletedProcess:
    """Run the README's ``sbatch launch/slurm_pretrain.sbatch ...`` line as a batch job of 2 machines submitted from
    ``submit_dir`` (which must look like the repository), with a stand-in ``srun`` in ``scratch/bin``."""
    import shlex

    tokens = shlex.split(command)
    assert tokens[:2] == ["sbatch", "launch/slurm_pretrain.sbatch"], command
    bin_dir = scratch / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable))
    (bin_dir / "srun").chmod(0o755)
    env = dict(
        node_env(),
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_SLURM_LOGS=str(scratch),
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(submit_dir),
        MAIN_ADDR="127.0.0.1",
        MAIN_PORT=str(free_port()),
        PROCESSES_PER_NODE="1",
        TORCHRUN=torchrun_executable(),
    )
    return subprocess.run(
        ["bash", str(ROOT / tokens[1]), *tokens[2:], *overrides],
        env=env,
        cwd=submit_dir,
        capture_output=True,
        text=True,
        timeout=900,
    )
