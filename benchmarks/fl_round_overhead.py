"""Round time of the federated engine vs. the compute floor (issue 3, Performance; target <= 1.15x).

Three ways to run the same R FedAvg rounds of ``configs/fl/mnist_fedavg_naive.yaml`` (MNIST, 100 Dirichlet-0.5
clients, 10 per round, MnistCNN, local SGD, 1 epoch, batch 64), from the same initial model:

* ``fit``: the engine as users run it, a Lightning ``trainer.fit`` of ``FederatedRecipe`` (validation,
  logger, checkpointing and progress bar off). A round is timed from one ``on_train_batch_start`` to the next,
  so Lightning's loop, logging and epoch boundaries are inside it.
* ``compute_round``: the engine without a Trainer, ``FederatedRecipe.compute_round`` plus the server step.
* ``bare``: the compute floor, a plain PyTorch loop: the same clients (the engine's seeded draw), the same
  per-client permutations, the same SGD steps on the same batches, the same weighted average. Client data is
  gathered once before timing, so the floor does strictly less work than the engine.

After every repetition the three final global models are compared (``torch.testing.assert_close``): the bare
loop reproduces the engine, so the ratio compares equal work. Repetitions are interleaved (the order rotates)
so drift of a shared machine hits all three alike, and ratios are taken within a repetition (median and range
over repetitions). Local SGD calls are timed too: the time a variant spends outside them gives the overhead
without the machine's noise inside the SGD steps.

    python benchmarks/fl_round_overhead.py            # 10 rounds x 5 repetitions (+1 warm-up)
    python benchmarks/fl_round_overhead.py --quick    # 3 rounds x 2 repetitions
"""

from __future__ import annotations

import argparse
import copy
import itertools
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning as L
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector

from benchmarks._common import (
    DEFAULT_CONFIG,
    FLJob,
    engine_seed,
    local_sgd,
    machine_note,
    markdown_table,
    median,
    quiet_lightning,
    sample_clients,
    write_json,
)  # fmt: skip

TARGET = 1.15


class RoundClock(L.Callback):
    """Start time of every round (training batch) and the end of training."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())


class Stopwatch:
    """Total time spent inside the calls it wraps (local SGD), to split a round into local SGD and the rest."""

    def __init__(self) -> None:
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - t0

        return timed


def run_fit(job: FLJob, net0: nn.Module, dm, rounds: int, sgd: Stopwatch | None = None):
    """Engine through ``trainer.fit``: per-round times, the whole fit's wall time, the final global model."""
    recipe = job.recipe(copy.deepcopy(net0))
    if sgd is not None:
        recipe.local.train = sgd.wrap(recipe.local.train)
    clock = RoundClock()
    t0 = time.perf_counter()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=rounds, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[clock],
    )  # fmt: skip
    trainer.fit(recipe, dm)
    wall = time.perf_counter() - t0
    assert trainer.global_step == rounds, f"fit ran {trainer.global_step} rounds, expected {rounds}"
    return [b - a for a, b in itertools.pairwise(clock.stamps)], wall, recipe.net


def run_compute_round(job: FLJob, net0: nn.Module, dm, rounds: int, sgd: Stopwatch | None = None):
    """Engine without a Trainer: ``compute_round`` then the server step ``G += server_lr * aggregate``."""
    recipe = job.recipe(copy.deepcopy(net0))
    if sgd is not None:
        recipe.local.train = sgd.wrap(recipe.local.train)
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        out = recipe.compute_round(r, dm)
        with torch.no_grad():
            offset = 0
            for p in recipe.net.parameters():
                p.add_(out["aggregate"][offset : offset + p.numel()].view_as(p), alpha=job.server_lr)
                offset += p.numel()
        times.append(time.perf_counter() - t0)
    return times, recipe.net


def run_bare(job: FLJob, net0: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]], rounds: int,
             sgd: Stopwatch | None = None):  # fmt: skip
    """The compute floor: the engine's local SGD steps and FedAvg written as a plain PyTorch loop."""
    train = local_sgd if sgd is None else sgd.wrap(local_sgd)
    global_net, local = copy.deepcopy(net0), copy.deepcopy(net0)
    gparams, lparams = list(global_net.parameters()), list(local.parameters())
    d = sum(p.numel() for p in gparams)
    sizes = torch.tensor([float(len(y)) for _, y in data])
    times = []
    for r in range(rounds):
        t0 = time.perf_counter()
        clients = sample_clients(job.seed, r, job.num_clients, job.clients_per_round)
        gflat = parameters_to_vector(gparams).detach()
        updates = torch.empty(len(clients), d)
        for j, c in enumerate(clients):
            x, y = data[c]
            with torch.no_grad():
                for pl, pg in zip(lparams, gparams):
                    pl.copy_(pg)
            train(local, x, y, job.lr, job.momentum, job.weight_decay, job.local_epochs, job.batch_size,
                  engine_seed(job.seed, r, c), job.max_local_steps)  # fmt: skip
            updates[j] = parameters_to_vector(lparams).detach() - gflat
        w = sizes[clients]
        aggregate = (w @ updates) / w.sum()
        with torch.no_grad():
            offset = 0
            for p in gparams:
                p.add_(aggregate[offset : offset + p.numel()].view_as(p), alpha=job.server_lr)
                offset += p.numel()
        times.append(time.perf_counter() - t0)
    return times, global_net


def flat(net: nn.Module) -> torch.Tensor:
    return parameters_to_vector(net.parameters()).detach()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="rounds per repetition (default 10)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repetitions of each variant (default 5)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (default 1)")
    ap.add_argument("--quick", action="store_true", help="3 rounds, 2 repetitions, 1 warm-up")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="FL config to take the job from")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default runs/bench/fl_round_overhead.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.repeats, args.warmup = 3, 2, 1
    torch.set_num_threads(args.threads)
    quiet_lightning()

    job = FLJob.from_config(args.config)
    note_before = machine_note()
    dm = job.datamodule()
    dm.setup("fit")
    data = [dm.client_data(c) for c in range(job.num_clients)]
    net0 = job.net()
    steps_per_round = [sum(-(-len(data[c][1]) // job.batch_size) * job.local_epochs
                           for c in sample_clients(job.seed, r, job.num_clients, job.clients_per_round))
                       for r in range(args.rounds)]  # fmt: skip

    variants = ["bare", "compute_round", "fit"]
    times: dict[str, list[list[float]]] = {v: [] for v in variants}
    fit_walls: list[float] = []
    outside: dict[str, list[float]] = {v: [] for v in variants}  # s/round outside local SGD, per repeat
    max_diff = {"compute_round": 0.0, "fit": 0.0}
    for rep in range(args.warmup + args.repeats):
        order = variants[rep % 3 :] + variants[: rep % 3]  # rotate: drift hits every variant alike
        finals, got, sgd = {}, {}, {v: Stopwatch() for v in variants}
        for v in order:
            if v == "bare":
                got[v], finals[v] = run_bare(job, net0, data, args.rounds, sgd[v])
            elif v == "compute_round":
                got[v], finals[v] = run_compute_round(job, net0, dm, args.rounds, sgd[v])
            else:
                got[v], wall, finals[v] = run_fit(job, net0, dm, args.rounds, sgd[v])
        for v in ("compute_round", "fit"):  # honest comparison: same work, same result
            torch.testing.assert_close(flat(finals[v]), flat(finals["bare"]), rtol=1e-5, atol=1e-6)
            max_diff[v] = max(max_diff[v], float((flat(finals[v]) - flat(finals["bare"])).abs().max()))
        assert not torch.equal(flat(finals["bare"]), flat(net0)), "the rounds must move the model"
        if rep >= args.warmup:
            for v in variants:
                times[v].append(got[v])
                outside[v].append((sum(got[v]) - sgd[v].total) / args.rounds)
            fit_walls.append(wall)
        print(f"rep {rep}{' (warm-up)' if rep < args.warmup else ''}: "
              + ", ".join(f"{v} {sum(got[v]):.2f}s" for v in order), file=sys.stderr, flush=True)  # fmt: skip

    # Ratios paired in time: each repeat runs the three variants back to back, and round r trains the same clients
    # in all of them. (Medians taken per variant first could pair a quiet repeat with a busy one.)
    per_round = {v: [median([rep[r] for rep in times[v]]) for r in range(args.rounds)] for v in variants}
    bare_rep = [sum(t) / args.rounds for t in times["bare"]]
    rows, summary = [], {}
    for v, label in (("bare", "bare PyTorch loop (compute floor)"),
                     ("compute_round", "engine: compute_round + server step"),
                     ("fit", "engine: Lightning trainer.fit")):  # fmt: skip
        per_rep = [sum(a) / sum(b) for a, b in zip(times[v], times["bare"])]
        pairs = [x / y for a, b in zip(times[v], times["bare"]) for x, y in zip(a, b)]
        # drift-free estimate: the bare round plus the extra time this variant spends outside local SGD
        from_outside = [1 + (o - ob) / br for o, ob, br in zip(outside[v], outside["bare"], bare_rep)]
        summary[v] = {"median_s_per_round": median([t for rep in times[v] for t in rep]),
                      "ratio_per_repeat": per_rep, "ratio_median_over_repeats": median(per_rep),
                      "ratio_median_over_round_pairs": median(pairs),
                      "outside_local_sgd_s_per_round": median(outside[v]),
                      "ratio_from_outside_sgd": median(from_outside)}  # fmt: skip
        rows.append([label, summary[v]["median_s_per_round"], 1000 * median(outside[v]),
                     f"{median(per_rep):.3f} ({min(per_rep):.2f}-{max(per_rep):.2f})", median(pairs),
                     median(from_outside), "" if v == "bare" else
                     ("yes" if median(per_rep) <= TARGET else "NO")])  # fmt: skip
    fit_wall = [w / sum(b) for w, b in zip(fit_walls, times["bare"])]
    summary["fit_wall_incl_trainer_setup"] = {"s_per_round": median(fit_walls) / args.rounds, "ratio": median(fit_wall)}
    rows.append(["engine: fit wall incl. Trainer setup, / rounds", median(fit_walls) / args.rounds, "",
                 f"{median(fit_wall):.3f} ({min(fit_wall):.2f}-{max(fit_wall):.2f})", "", "", ""])  # fmt: skip
    note_after = machine_note()

    table = markdown_table(["variant", "median s/round", "ms/round outside local SGD",
                            "ratio: median over repeats (range)", "ratio: median over paired rounds",
                            "ratio from time outside SGD", f"<= {TARGET}x"], rows)  # fmt: skip
    print(f"\nFL round overhead: {job.num_clients} {job.dataset} clients ({job.partition} {job.alpha}), "
          f"{job.clients_per_round}/round, {args.rounds} rounds x {args.repeats} interleaved repeats "
          f"(+{args.warmup} warm-up), {args.threads} thread(s); {median(steps_per_round):.0f} local SGD steps "
          f"per round (median)\n")  # fmt: skip
    print(table)
    print("\nratio = variant / bare loop, same repeat. Ratio from time outside SGD = 1 + (time outside local SGD - "
          "the bare loop's) / bare round, per repeat: the overhead without the machine's drift inside the SGD steps")
    print(f"final global models equal the bare loop's: max |diff| compute_round {max_diff['compute_round']:.2e}, "
          f"fit {max_diff['fit']:.2e}")
    print(f"machine: {note_before['cpus']} CPUs, load average {note_before['loadavg'][0]:.2f} before / "
          f"{note_after['loadavg'][0]:.2f} after (other processes share the cores; ratios are interleaved)")
    record = {"job": job, "rounds": args.rounds, "repeats": args.repeats, "warmup": args.warmup,
              "threads": args.threads, "steps_per_round": steps_per_round, "times_s": times,
              "median_per_round_s": per_round, "outside_local_sgd_s": outside, "fit_wall_s": fit_walls,
              "summary": summary,
              "max_abs_diff_vs_bare": max_diff, "target_ratio": TARGET, "machine_before": note_before,
              "machine_after": note_after, "torch": torch.__version__, "lightning": L.__version__}  # fmt: skip
    print(f"wrote {write_json('fl_round_overhead', record, args.out)}")
    return record


if __name__ == "__main__":
    main()
