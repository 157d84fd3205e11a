"""Round time of the federated engine vs. Flower's simulation engine on the same job (issue 3, Performance;
target: ours at least 5x faster).

The job is ``configs/fl/mnist_fedavg_naive.yaml`` without its attack: MNIST, 100 Dirichlet-0.5 clients (the
engine's partition), 10 clients per round, MnistCNN, local SGD (lr, momentum, weight decay of the config),
1 local epoch, batch 64, FedAvg weighted by client size.

* ours: ``trainer.fit`` of ``FederatedRecipe`` (validation, logger, checkpoints off), timed per round as in
  ``fl_round_overhead.py``.
* Flower: a ServerApp (``flwr.serverapp.strategy.FedAvg``) and a ClientApp run by
  ``flwr.simulation.run_simulation`` on its Ray backend with one 1-CPU actor (ours uses one core too), in a
  child process (``benchmarks/_flower_app.py``). Its strategy tells each sampled node which partition to train
  with which seed (the engine's), so both do the same local steps on the same batches; the final global models
  are compared. A round is timed from one ``configure_train`` to the next. Ray's start-up is reported apart.

Runs alternate (ours, Flower, Flower, ours, ...) so drift of a shared machine hits both alike.

Flower is not a dependency of the project. Install it with the ``bench`` extra, or (keeping the project's
environment untouched) into a separate folder that only the Flower child sees::

    .venv/bin/pip install --target /tmp/flwrlib 'flwr[simulation]'
    python benchmarks/fl_vs_flower.py --flwr-path /tmp/flwrlib     # default path; --quick for 3 rounds
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import (
    DEFAULT_CONFIG,
    OUT_DIR,
    FLJob,
    machine_note,
    markdown_table,
    median,
    quiet_lightning,
    round_plan,
    write_json,
)  # fmt: skip

TARGET = 5.0
INSTALL_HINT = """Flower is not installed, so this benchmark cannot run. Flower is an optional benchmark dependency:
  pip install -e '.[bench]'                                      # into the project's environment, or
  .venv/bin/pip install --target /tmp/flwrlib 'flwr[simulation]'  # beside it (flwr pins older packaging/rich/typer)
and run  python benchmarks/fl_vs_flower.py --flwr-path /tmp/flwrlib"""


def find_flower(flwr_path: Path | None) -> list[str] | None:
    """Extra ``sys.path`` entries under which ``flwr`` and ``ray`` import ([] if importable here), else None."""
    if importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None:
        return []
    if flwr_path is not None and (flwr_path / "flwr").is_dir():
        return [str(flwr_path)]
    return None


def run_flower(workdir: Path, extra_path: list[str], log: Path) -> dict:
    """One Flower simulation in a child process; returns its per-round times, total time and final model."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(extra_path + [str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    for f in ("final.pt", "round1.pt", "flower_result.json"):
        (workdir / f).unlink(missing_ok=True)
    with log.open("a") as out:
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "_flower_app.py"), str(workdir)],
                              env=env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, check=False)  # fmt: skip
    if proc.returncode != 0 or not (workdir / "flower_result.json").exists():
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"Flower's simulation failed (exit {proc.returncode}); log {log}:\n{tail}")
    result = json.loads((workdir / "flower_result.json").read_text())
    import torch

    result["final"] = torch.load(workdir / "final.pt", weights_only=True)
    result["round1"] = torch.load(workdir / "round1.pt", weights_only=True)
    return result


VARIANTS = {"full": None, "one-step": 1}  # name -> LocalTrainer.max_steps


def compare(job: FLJob, dm, net0, rounds: int, repeats: int, workdir: Path, extra_path: list[str], log: Path,
            flower_cpus: int, verbose: bool) -> dict:  # fmt: skip
    """Alternated runs of ours and Flower on ``job``; per-round times, one-off costs, model agreement."""
    import torch
    from torch.nn.utils import parameters_to_vector

    from benchmarks.fl_round_overhead import run_fit

    def flat(net) -> torch.Tensor:
        return parameters_to_vector(net.parameters()).detach()

    plan = round_plan(job, rounds, [dm.num_samples(c) for c in range(job.num_clients)])
    (workdir / "plan.json").write_text(json.dumps(plan))
    (workdir / "job.json").write_text(json.dumps({**job.__dict__, "flower_cpus": flower_cpus, "verbose": verbose}))
    # warm-up of our process (imports, allocator; Flower starts cold every run) and the round-1 reference
    round1_ours = flat(run_fit(job, net0, dm, 1)[2])
    ours, flower, final_diff, round1_diff = [], [], 0.0, 0.0
    for rep in range(repeats):
        for engine in (("ours", "flower") if rep % 2 == 0 else ("flower", "ours")):
            if engine == "ours":
                times, wall, net = run_fit(job, net0, dm, rounds)
                ours.append({"round_s": times, "fit_s": wall})
                final_ours = flat(net)
            else:
                t0 = time.perf_counter()
                res = run_flower(workdir, extra_path, log)
                res["process_s"] = time.perf_counter() - t0
                flower.append(res)
        fl_net = copy.deepcopy(net0)
        fl_net.load_state_dict(flower[-1].pop("round1"))
        # Same clients, same batches, same steps: after round 1 the models differ only by the rounding of the
        # average (Flower averages weights in numpy, we average updates in torch), ~1e-8.
        torch.testing.assert_close(flat(fl_net), round1_ours, rtol=0, atol=1e-6)
        round1_diff = max(round1_diff, float((flat(fl_net) - round1_ours).abs().max()))
        # Later rounds amplify that rounding (a 1e-8 change of G grows to ~1e-4 in 3 rounds of local SGD), so the
        # final models are reported, not compared.
        fl_net.load_state_dict(flower[-1].pop("final"))
        final_diff = max(final_diff, float((flat(fl_net) - final_ours).abs().max()))
        name = "full" if job.max_local_steps is None else f"{job.max_local_steps}-step"
        print(f"  {name} run {rep}: ours {sum(ours[-1]['round_s']):.2f}s, Flower "
              f"{sum(flower[-1]['round_s']):.2f}s in {rounds} rounds", file=sys.stderr, flush=True)  # fmt: skip

    # Ratios paired in time: run i of Flower against run i of ours (run back to back).
    per_round = {name: [median([run["round_s"][r] for run in runs]) for r in range(rounds)]
                 for name, runs in (("ours", ours), ("flower", flower))}  # fmt: skip
    per_run = [median(f["round_s"]) / median(o["round_s"]) for f, o in zip(flower, ours)]
    sum_per_run = [sum(f["round_s"]) / sum(o["round_s"]) for f, o in zip(flower, ours)]
    return {
        "ours": ours, "flower": flower, "median_per_round_s": per_round,
        "ratio_per_round": median(per_run), "ratio_per_round_per_run": per_run,
        "ratio_sum": median(sum_per_run), "ratio_sum_per_run": sum_per_run,
        "flower_startup_s": median([f["process_s"] - sum(f["round_s"]) for f in flower]),
        "max_abs_diff_round1": round1_diff, "max_abs_diff_final": final_diff,
        "flwr": flower[0]["flwr"], "ray": flower[0]["ray"],
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each engine per variant, alternated (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 1 run each")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS),
                    help="full: the config's local epoch; one-step: 1 local step per client, so the engines' "
                         "own overhead dominates (default both)")  # fmt: skip
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="FL config to take the job from")
    ap.add_argument("--flwr-path", type=Path, default=Path(os.environ.get("SAFEWEIGHTS_FLWR_PATH", "/tmp/flwrlib")),
                    help="folder holding flwr and ray (pip --target), used if flwr is not importable here")
    ap.add_argument("--flower-cpus", type=int, default=1, help="CPUs (= 1-CPU actors) Ray may use (default 1)")
    ap.add_argument("--verbose", action="store_true", help="keep Flower's INFO log")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default runs/bench/fl_vs_flower.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats = 3, 1
    extra_path = find_flower(args.flwr_path)
    if extra_path is None:
        print(INSTALL_HINT)
        return None

    import dataclasses

    import torch

    torch.set_num_threads(1)
    quiet_lightning()

    job = FLJob.from_config(args.config)
    note_before = machine_note()
    dm = job.datamodule()
    dm.setup("fit")
    net0 = job.net()
    workdir = Path(tempfile.mkdtemp(prefix="fl_vs_flower_"))
    log = (args.out or OUT_DIR / "fl_vs_flower.json").with_suffix(".flower.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    results = {}
    try:
        torch.save({"x": dm.train_x, "y": dm.train_y, "client_idx": dm.client_train_idx}, workdir / "data.pt")
        torch.save(net0.state_dict(), workdir / "initial.pt")
        for variant in args.variants:
            vjob = dataclasses.replace(job, max_local_steps=VARIANTS[variant])
            results[variant] = compare(vjob, dm, net0, args.rounds, args.repeats, workdir, extra_path, log,
                                       args.flower_cpus, args.verbose)  # fmt: skip
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    note_after = machine_note()

    rows = []
    for variant, res in results.items():
        o, f = res["median_per_round_s"]["ours"], res["median_per_round_s"]["flower"]
        name = "full local epoch" if variant == "full" else "1 local step/client"
        rows.append([name, "ours: trainer.fit(FederatedRecipe)", median(o), o[0], "", "", "", ""])
        pr, ps = res["ratio_per_round_per_run"], res["ratio_sum_per_run"]
        rows.append([name, f"Flower {res['flwr']} run_simulation (Ray {res['ray']}, {args.flower_cpus} CPU)",
                     median(f), f[0], res["flower_startup_s"],
                     f"{res['ratio_per_round']:.2f} ({min(pr):.2f}-{max(pr):.2f})",
                     f"{res['ratio_sum']:.2f} ({min(ps):.2f}-{max(ps):.2f})",
                     "yes" if res["ratio_per_round"] >= TARGET else "NO"])  # fmt: skip
    table = markdown_table(["local work", "engine", "median s/round", "round 1 s", "Ray start-up + teardown s",
                            "Flower/ours, median round (range over runs)",
                            f"Flower/ours, sum of {args.rounds} rounds (range)", f">= {TARGET}x per round"],
                           rows)  # fmt: skip
    print(f"\nOurs vs. Flower: {job.num_clients} {job.dataset} clients ({job.partition} {job.alpha}), "
          f"{job.clients_per_round}/round, batch {job.batch_size}, {args.rounds} rounds x {args.repeats} alternated "
          f"runs per variant, one core each (Flower: {args.flower_cpus} Ray actor(s))\n")  # fmt: skip
    print(table)
    for variant, res in results.items():
        print(f"{variant}: same job checked: global models after round 1 max |diff| {res['max_abs_diff_round1']:.1e} "
              f"(float rounding of the average); after {args.rounds} rounds {res['max_abs_diff_final']:.1e} "
              f"(that rounding amplified by local SGD)")  # fmt: skip
    print(f"machine: {note_before['cpus']} CPUs, load average {note_before['loadavg'][0]:.2f} before / "
          f"{note_after['loadavg'][0]:.2f} after (other processes share the cores; runs are alternated)")
    record = {"job": job, "rounds": args.rounds, "repeats": args.repeats, "flower_cpus": args.flower_cpus,
              "results": results, "target": TARGET, "machine_before": note_before, "machine_after": note_after,
              "flwr_path": extra_path}  # fmt: skip
    print(f"wrote {write_json('fl_vs_flower', record, args.out)}")
    return record


if __name__ == "__main__":
    main()
