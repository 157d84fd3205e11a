"""``python -m recipes.reproduce <name> --jobs N``: run a comparison's stages as N parallel processes.

Each (stage, seed) pair is one ``python -m recipes.reproduce <name> --seeds <s> --only <key>`` process, so it
caches, resumes and writes its run exactly as a serial reproduction does. A stage that reads another stage's
artifact (``{artifact:<key>}`` in its overrides) starts once that stage has a result for the same seed; when that
stage fails, its dependents are skipped and reported. Each process gets one CPU thread (``OMP_NUM_THREADS=1`` unless
set) and its log beside its run (``<root>/<name>/<key>/seed<s>.log``). The table is then made from the results on disk
(``--cached``).

On a GPU machine every process takes the same GPU (``accelerator: auto``). Small models leave most of it idle, so
many processes can share it: on one H200 with 16 cores, 13 federated runs of the Chameleon and
TrojanDam testbeds at once took 90-470 s each (2026-12-04), where one such run takes 1,100-2,900 s on one CPU core.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from recipes.reproduce import Stage, _stage_dir, check_dependencies, dependencies, result_path


@dataclass
class Job:
    key: str
    seed: int
    waits_on: list[tuple[str, int]]  # the (stage, seed) pairs of this run whose artifacts it reads
    log: Path
    state: str = "pending"  # pending -> running -> done | failed; pending -> skipped (a dependency failed)
    proc: object = None
    started: float = 0.0


def _popen(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env)


def run_parallel(
    name: str,
    stages: list[Stage],
    seeds: list[int],
    root: Path,
    jobs: int,
    tiny: bool = False,
    force: bool = False,
    poll: float = 2.0,
    launch: Callable[[list[str], Path, dict[str, str]], object] = _popen,
) -> dict[tuple[str, int], str]:
    """Run every (stage, seed) of ``stages`` without a result (all of them with ``force``), at most ``jobs`` at once;
    return each pair's final state (``done``, ``failed``, ``skipped``; ``cached`` for those not run)."""
    if jobs < 1:
        raise SystemExit(f"--jobs {jobs}: pass the number of processes to run at once (1 or more)")
    base = root / name
    check_dependencies(stages, seeds, base, force)
    keys = {s.key for s in stages}

    def to_run(key: str, seed: int) -> bool:
        return force or not result_path(base, key, seed).exists()

    states: dict[tuple[str, int], str] = {}
    todo: dict[tuple[str, int], Job] = {}
    for seed in seeds:
        for stage in stages:
            if not to_run(stage.key, seed):
                states[(stage.key, seed)] = "cached"
                continue
            waits_on = [(key, seed) for key in dependencies(stage) if key in keys and to_run(key, seed)]
            todo[(stage.key, seed)] = Job(stage.key, seed, waits_on, _stage_dir(base, stage.key) / f"seed{seed}.log")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    start = time.perf_counter()

    def say(text: str) -> None:
        print(f"[parallel {name}] {time.perf_counter() - start:6.0f} s  {text}", flush=True)

    while any(job.state in ("pending", "running") for job in todo.values()):
        for job in todo.values():
            if job.state == "running" and job.proc.poll() is not None:
                ok = job.proc.returncode == 0 and result_path(base, job.key, job.seed).exists()
                job.state = "done" if ok else "failed"
                took = time.perf_counter() - job.started
                say(f"{job.key} seed {job.seed}: " + (f"done in {took:.0f} s" if ok else
                    f"FAILED (exit {job.proc.returncode}) after {took:.0f} s; log: {job.log}"))  # fmt: skip
        running = sum(job.state == "running" for job in todo.values())
        for job in todo.values():
            if job.state != "pending":
                continue
            deps = [todo[dep].state for dep in job.waits_on]
            if any(s in ("failed", "skipped") for s in deps):
                job.state = "skipped"
                say(f"{job.key} seed {job.seed}: skipped (a stage it reads failed)")
            elif running < jobs and all(s == "done" for s in deps):
                cmd = [sys.executable, "-m", "recipes.reproduce", name, "--seeds", str(job.seed), "--root", str(root),
                       "--only", job.key, *(["--tiny"] if tiny else []), *(["--force"] if force else [])]  # fmt: skip
                job.proc, job.started, job.state = launch(cmd, job.log, env), time.perf_counter(), "running"
                running += 1
                say(f"{job.key} seed {job.seed}: started ({running} running; log: {job.log})")
        time.sleep(poll)
    states.update({pair: job.state for pair, job in todo.items()})
    return states
