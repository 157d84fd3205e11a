"""Scale of the federated engine against Flower's simulation: federations of 100, 1,000 and 10,000 clients,
10 and 100 clients per round; time per round and peak memory, each engine in its own fresh process.

The job is the config's (``configs/fl/mnist_fedavg_naive.yaml``: MnistCNN, local SGD lr/momentum/weight decay,
batch 64, FedAvg weighted by client size) on an IID split of MNIST's 60,000 training images (a Dirichlet(0.5)
split cannot give 10,000 clients the engine's minimum of 10 images each; IID gives each 6 to 600), with
``--local-steps`` local SGD steps per client (default 1), so both engines do the same small, fixed work per
sampled client and the table shows what the engine itself costs as the federation and the rounds grow.

* ours: ``trainer.fit`` of ``FederatedRecipe`` (validation, logger, checkpoints off) in a child process; a
  1-round fit first (warm-up, and the round-1 model for the agreement check), then ``--rounds`` timed rounds.
* Flower: ``benchmarks/_flower_app.py`` (``flwr.simulation.run_simulation``, Ray backend, one 1-CPU actor),
  ``num_supernodes`` = the federation, sampling the engine's clients with the engine's seeds. Its first round
  (actor spin-up, data loading) is excluded from the median, as ours is.

Memory: the peak over time of the summed PSS (proportional set size: shared pages split between processes) of
the child and all its descendants (Ray's GCS, raylet and worker processes for Flower), sampled every
``--sample-s`` seconds, for both engines. For ours, the single process's own ``VmHWM`` is also reported and
checked against ``/usr/bin/time -v``. The checks print side by side.

    OMP_NUM_THREADS=1 python benchmarks/fl_scale.py                  # 100/1,000/10,000 x 10/100, 3 rounds
    python benchmarks/fl_scale.py --quick                             # 100 and 1,000 clients, 10/round, 2 rounds
    python benchmarks/fl_scale.py --federations 100 --per-round 10 100 --out /tmp/bench
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import (  # noqa: E402
    DEFAULT_CONFIG,
    OUT_DIR,
    TIME_V,
    FLJob,
    check_rss,
    machine_note,
    markdown_table,
    median,
    peak_rss_mb,
    round_plan,
    write_json,
)

TARGET = 2.0  # Flower / ours, time per round at 100 clients per round


# ------------------------------------------------------------------------------------------ memory sampling
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            kids.setdefault(ppid, []).append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


def _tree_kib(root: int) -> tuple[int, int]:
    """Summed (PSS, RSS) in KiB of ``root`` and its descendants, from ``/proc/<pid>/smaps_rollup``."""
    kids, todo, pss, rss = _children(), [root], 0, 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    pss += int(line.split()[1])
                elif line.startswith("Rss:"):
                    rss += int(line.split()[1])
        except OSError:
            continue
    return pss, rss


def run_sampled(cmd: list[str], env: dict, sample_s: float, log: Path) -> dict:
    """Run ``cmd`` under ``/usr/bin/time -v`` (if installed), sampling its process tree's PSS/RSS meanwhile."""
    timed = os.path.exists(TIME_V)
    tv = log.with_suffix(".time")
    full = [TIME_V, "-v", "-o", str(tv), *cmd] if timed else cmd
    peak = {"pss_kib": 0, "rss_kib": 0}
    with log.open("a") as out:
        proc = subprocess.Popen(full, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=out, text=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                pss, rss = _tree_kib(proc.pid)
                peak["pss_kib"], peak["rss_kib"] = max(peak["pss_kib"], pss), max(peak["rss_kib"], rss)
                done.wait(sample_s)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        stdout, _ = proc.communicate()
        done.set()
        thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    peak["time_v_kib"] = None
    if timed:
        for line in tv.read_text().splitlines():
            if "Maximum resident set size" in line:
                peak["time_v_kib"] = int(line.rsplit(":", 1)[1])
    peak["stdout"] = stdout
    return peak


# ------------------------------------------------------------------------------------------------- children
def job_for(config: Path, clients: int, per_round: int, local_steps: int) -> FLJob:
    return FLJob.from_config(config, num_clients=clients, clients_per_round=per_round, partition="iid",
                             max_local_steps=local_steps)  # fmt: skip


def ours_child(args) -> dict:
    """Body of our fresh process: setup, a 1-round warm-up fit, then ``rounds`` timed rounds."""
    import torch

    from benchmarks._common import quiet_lightning
    from benchmarks.fl_round_overhead import run_fit

    torch.set_num_threads(1)
    quiet_lightning()
    job = job_for(args.config, args.clients, args.per_round, args.local_steps)
    t0 = time.perf_counter()
    dm = job.datamodule()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    net0 = job.net()
    _, _, round1 = run_fit(job, net0, dm, 1)  # warm-up of the process; the round-1 model for the check
    torch.save(round1.state_dict(), Path(args.workdir) / "ours_round1.pt")
    times, wall, net = run_fit(job, net0, dm, args.rounds)
    torch.save(net.state_dict(), Path(args.workdir) / "ours_final.pt")
    return {"round_s": times, "fit_s": wall, "setup_s": setup_s, "vmhwm_mb": peak_rss_mb()}


def prepare_flower(job: FLJob, rounds: int, workdir: Path) -> None:
    """The data, initial model and round plan that ``_flower_app.py`` reads (the engine's partition and seeds)."""
    import torch

    dm = job.datamodule()
    dm.setup("fit")
    plan = round_plan(job, rounds, [dm.num_samples(c) for c in range(job.num_clients)])
    torch.save({"x": dm.train_x, "y": dm.train_y, "client_idx": dm.client_train_idx}, workdir / "data.pt")
    torch.save(job.net().state_dict(), workdir / "initial.pt")
    (workdir / "plan.json").write_text(json.dumps(plan))
    (workdir / "job.json").write_text(json.dumps({**dataclasses.asdict(job), "flower_cpus": 1, "verbose": False}))


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a if a[k].is_floating_point())


def measure(clients: int, per_round: int, args, extra_path: list[str], log: Path) -> dict:
    import torch

    job = job_for(args.config, clients, per_round, args.local_steps)
    workdir = Path(tempfile.mkdtemp(prefix="fl_scale_"))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    try:
        prepare_flower(job, args.rounds + 1, workdir)  # the first round is not timed (actor spin-up, warm-up)
        runs = {}
        order = ("ours", "flower") if (clients + per_round) % 2 else ("flower", "ours")  # alternate over cells
        for engine in order:
            if engine == "ours":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--workdir", str(workdir),
                       "--config", str(args.config), "--clients", str(clients), "--per-round", str(per_round),
                       "--rounds", str(args.rounds + 1), "--local-steps", str(args.local_steps)]  # fmt: skip
                res = run_sampled(cmd, env, args.sample_s, log)
                res.update(json.loads(res.pop("stdout").strip().splitlines()[-1]))
                timed = res["round_s"][1:] if len(res["round_s"]) > 1 else res["round_s"]
            else:
                t0 = time.perf_counter()
                res = run_sampled([sys.executable, str(ROOT / "benchmarks" / "_flower_app.py"), str(workdir)], env,
                                  args.sample_s, log)  # fmt: skip
                res.pop("stdout")
                res["process_s"] = time.perf_counter() - t0
                res.update(json.loads((workdir / "flower_result.json").read_text()))
                timed = res["round_s"][1:] if len(res["round_s"]) > 1 else res["round_s"]
            res["median_round_s"] = median(timed)
            runs[engine] = res
        ours1 = torch.load(workdir / "ours_round1.pt", weights_only=True)
        flower1 = torch.load(workdir / "round1.pt", weights_only=True)
        runs["max_abs_diff_round1"] = max_abs_diff(ours1, flower1)
        runs["max_abs_diff_final"] = max_abs_diff(torch.load(workdir / "ours_final.pt", weights_only=True),
                                                  torch.load(workdir / "final.pt", weights_only=True))  # fmt: skip
        if not runs["max_abs_diff_round1"] <= 1e-5:
            raise AssertionError(f"{clients} clients, {per_round}/round: round-1 models differ by "
                                 f"{runs['max_abs_diff_round1']:.1e}; the engines did not do the same work")
        return runs
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--federations", type=int, nargs="+", default=[100, 1000, 10000], help="clients in the federation")
    ap.add_argument("--per-round", type=int, nargs="+", default=[10, 100], help="clients sampled per round")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds per run, after the first (default 3)")
    ap.add_argument("--local-steps", type=int, default=1, help="local SGD steps per sampled client (default 1)")
    ap.add_argument("--quick", action="store_true", help="100 and 1,000 clients, 10 per round, 2 rounds")
    ap.add_argument("--sample-s", type=float, default=0.2, help="memory sampling interval (s)")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="FL config to take the job from")
    ap.add_argument("--flwr-path", type=Path, default=Path(os.environ.get("SAFEWEIGHTS_FLWR_PATH", "/tmp/flwrlib")),
                    help="folder holding flwr and ray (pip --target), used if they are not importable here")
    ap.add_argument("--out", type=Path, default=None, help="JSON file or folder (default runs/bench/fl_scale.json)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    ap.add_argument("--clients", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.per_round = args.per_round[0]
        print(json.dumps(ours_child(args)))
        return None
    if args.quick:
        args.federations, args.per_round, args.rounds = [100, 1000], [10], 2

    from benchmarks.fl_vs_flower import INSTALL_HINT, find_flower

    extra_path = find_flower(args.flwr_path)
    if extra_path is None:
        print(INSTALL_HINT.replace("fl_vs_flower.py", "fl_scale.py"))
        return None
    note_before = machine_note()
    log = Path(args.out or OUT_DIR / "fl_scale.json")
    log = (log if log.suffix == ".json" else log / "fl_scale.json").with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    cells = [(n, k) for n in args.federations for k in args.per_round if k <= n]
    results = {}
    for n, k in cells:
        print(f"  {n} clients, {k}/round ...", file=sys.stderr, flush=True)
        results[f"{n}x{k}"] = measure(n, k, args, extra_path, log)
    note_after = machine_note()

    rows, checks = [], []
    for (n, k), res in zip(cells, results.values()):
        o, f = res["ours"], res["flower"]
        rows.append([n, k, o["median_round_s"], f["median_round_s"], f"{f['median_round_s'] / o['median_round_s']:.2f}x",
                     o["pss_kib"] / 1024, f["pss_kib"] / 1024, f"{f['pss_kib'] / o['pss_kib']:.2f}x",
                     o["setup_s"], f["process_s"] - sum(f["round_s"])])  # fmt: skip
        checks.append(f"{n}x{k}: ours " + check_rss(o["vmhwm_mb"], o["time_v_kib"] / 1024 if o["time_v_kib"] else None,
                                                   "own peak RSS (MiB)")  # fmt: skip
                      + f"; round-1 models max |diff| {res['max_abs_diff_round1']:.1e}, after {args.rounds + 1} rounds "
                      f"{res['max_abs_diff_final']:.1e}")  # fmt: skip
    flwr = next(iter(results.values()))["flower"]
    header = ["clients", "per round", "ours s/round", "Flower s/round", "Flower/ours time", "ours peak MiB",
              "Flower peak MiB", "Flower/ours memory", "ours setup s", "Flower start-up + rest s"]  # fmt: skip
    print(f"\nOurs (trainer.fit of FederatedRecipe) vs Flower {flwr['flwr']} run_simulation (Ray {flwr['ray']}, one "
          f"1-CPU actor): IID MNIST, {args.local_steps} local step(s) of batch {job_for(args.config, 100, 10, 1).batch_size} "
          f"per sampled client, median of {args.rounds} rounds after the first; peak = summed PSS of the process tree\n")
    print(markdown_table(header, rows))
    print("\nchecks:\n  " + "\n  ".join(checks))
    at100 = [float(r[4][:-1]) for r in rows if r[1] == 100]
    if at100:
        print(f"Flower/ours per round at 100 clients/round: {', '.join(f'{x:.2f}x' for x in at100)} "
              f"(target >= {TARGET}x: {'met' if min(at100) >= TARGET else 'NOT met'})")
    print(f"machine: {note_before['cpus']} CPUs, load average {note_before['loadavg'][0]:.2f} before / "
          f"{note_after['loadavg'][0]:.2f} after (shared cores: the ratios, not the seconds, are what carries over)")
    record = {"federations": args.federations, "per_round": args.per_round, "rounds": args.rounds,
              "local_steps": args.local_steps, "results": results, "machine_before": note_before,
              "machine_after": note_after}  # fmt: skip
    print(f"wrote {write_json('fl_scale', record, args.out)}")
    return record


if __name__ == "__main__":
    main()
