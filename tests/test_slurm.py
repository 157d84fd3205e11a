"""scripts/slurm/ddp_multinode.sbatch under a simulated SLURM job: its GPU config, and a requeue that resumes.

``srun`` and ``scontrol`` are stand-ins on ``PATH``: ``srun`` runs its command; ``scontrol requeue <id>`` records
the call and sends SIGTERM to its caller, which is what SLURM does to the job's tasks when it requeues it.
"""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers import REPO, TINY

SBATCH = REPO / "scripts" / "slurm" / "ddp_multinode.sbatch"
JOB_ID = "4242"


def slurm_env(tmp_path: Path, nodes: int, tasks_per_node: int, **extra: str) -> dict[str, str]:
    shims = tmp_path / "bin"
    shims.mkdir(exist_ok=True)
    (shims / "srun").write_text('#!/bin/bash\nexec "$@"\n')
    (shims / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol.log\nkill -TERM $PPID\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    path = os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ["PATH"]])
    return {
        **os.environ, "PATH": path, "PYTHONPATH": str(REPO), "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "safeweights", "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(tasks_per_node), "SLURM_NTASKS": str(nodes * tasks_per_node),
        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", **extra,
    }  # fmt: skip


def sbatch(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SBATCH), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_the_sbatch_command_line_gives_a_gpu_config_named_after_the_job(tmp_path):
    """Experiment configs pinned ``accelerator: cpu`` and won over the overlay; the launcher's config is for GPUs
    whatever the experiment config says (mnist_badnets: the CPU default; smollm2_tar: ``devices: 1``)."""
    for config in ["configs/backdoor/mnist_badnets.yaml", "configs/tar/smollm2_tar.yaml"]:
        proc = sbatch(slurm_env(tmp_path, nodes=2, tasks_per_node=4, CONFIG=config), "--print_config")
        assert proc.returncode == 0, proc.stderr[-3000:]
        printed = yaml.safe_load(proc.stdout)
        trainer = printed["trainer"]
        assert (trainer["accelerator"], str(trainer["devices"]), trainer["num_nodes"]) == ("gpu", "4", 2), config
        assert trainer["strategy"] == "ddp", config
        assert printed["run_name"] == JOB_ID and printed["ckpt_path"] == "last", config


def test_experiment_configs_leave_the_cpu_to_the_trainer_overlays():
    def accelerator(path):
        config = yaml.safe_load(path.read_text())
        return ((config.get("trainer") or {}) if isinstance(config, dict) else {}).get("accelerator")

    pinned = [p for p in (REPO / "configs").rglob("*.yaml") if p.parent.name != "trainer" and accelerator(p) == "cpu"]
    assert not pinned, f"these configs pin the CPU and beat configs/trainer/gpu.yaml stacked before them: {pinned}"


def _rows(path: Path) -> list[tuple[str, str, bool]]:
    with open(path, newline="") as f:
        return [(r["epoch"], r["step"], bool(r["val/acc"])) for r in csv.DictReader(f)]


def test_a_preempted_job_requeued_with_its_job_id_resumes_its_run(tmp_path):
    root = tmp_path / "runs"
    cpu = [f"--config={TINY / 'backdoor' / 'mnist_badnets.yaml'}", "--trainer.accelerator=cpu", "--trainer.strategy=auto",
           "--trainer.precision=32-true", f"--trainer.default_root_dir={root}", "--trainer.max_epochs=3",
           "--trainer.log_every_n_steps=1"]  # fmt: skip
    env = slurm_env(tmp_path, nodes=1, tasks_per_node=1)
    usr1 = ('--trainer.callbacks+={"class_path": "tests.test_resume.SignalAt", '
            f'"init_args": {{"step": 5, "signum": {int(signal.SIGUSR1)}}}}}')  # fmt: skip

    first = sbatch(env, *cpu, usr1)
    assert first.returncode == 143, first.stderr[-3000:]
    run = root / JOB_ID
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", JOB_ID]
    assert (run / "hpc_ckpt_1.ckpt").is_file(), "Lightning's SLURM handler saved into the run directory"
    assert (run / "checkpoints" / "preempted.ckpt").is_file(), "SLURM's SIGTERM saved the preemption checkpoint"

    second = sbatch(env, *cpu)  # the requeued job: same id, same command line
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resume: run '{JOB_ID}' continues from {run / 'checkpoints' / 'preempted.ckpt'}" in second.stderr
    expected = [(str(e), str(s), False) for e in range(3) for s in range(4 * e, 4 * e + 4)]
    expected = sorted(expected + [(str(e), str(4 * e + 3), True) for e in range(3)], key=lambda r: (int(r[1]), r[2]))
    assert _rows(run / "metrics.csv") == expected, "every epoch once, across the requeue"
    assert sorted(p.name for p in root.iterdir()) == [JOB_ID]
