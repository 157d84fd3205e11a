"""Peak memory of 1,000 MNIST clients (issue 3, Performance; target < 2 GB RSS).

Each measurement runs in a fresh child process and reads its own peak resident set size (``VmHWM`` of
``/proc/self/status``; not ``ru_maxrss``, which a child inherits from its parent's address space), checked
against the peak that ``/usr/bin/time -v`` reports for the same child (``benchmarks/_common.run_fresh``):

* ``baseline``: imports torch and loads MNIST (the four IDX arrays as tensors, as ``load_image_dataset`` does);
* ``imports``: the same plus every import the engine's process makes (Lightning, the project's packages);
* ``federated``: a ``FederatedDataModule`` of the config's job with 1,000 clients (Dirichlet 0.5, clean and
  triggered test sets), ``setup()``, then ``trainer.fit`` of ``FederatedRecipe`` for a few rounds at 10 clients
  per round, with validation (main and backdoor accuracy) once.

The table prints the peaks, the federated run's peak minus each baseline, and the stages of the federated run.

    python benchmarks/fl_memory.py              # 1,000 clients, 5 rounds
    python benchmarks/fl_memory.py --quick      # 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._common import (
    DEFAULT_CONFIG,
    FLJob,
    check_rss,
    machine_note,
    markdown_table,
    run_fresh,
    write_json,
)

TARGET_MB = 2000.0  # 2 GB = 2e9 bytes
MB = 1e6


def memory() -> dict[str, float]:
    """This process's peak (VmHWM) and current (VmRSS) resident memory, in MB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[f"{key}_mb"] = int(value.split()[0]) * 1024 / MB
    return out


def load_mnist() -> dict:
    """The four MNIST arrays as torch tensors, as ``datamodules.sources.load_image_dataset`` builds them."""
    import torch

    from foundation.assets import mnist_files, read_idx

    arrays = {k: torch.from_numpy(read_idx(p).copy()) for k, p in mnist_files("mnist").items()}
    return {k: (v.long() if k.endswith("labels") else v) for k, v in arrays.items()}


def child(mode: str, config: Path, num_clients: int, rounds: int) -> dict:
    """Body of a measuring child process; returns the stages' memory."""
    stages = {"start": memory()}
    import torch

    torch.set_num_threads(1)
    if mode == "imports":
        from benchmarks._common import quiet_lightning

        quiet_lightning()
        import datamodules  # noqa: F401
        import lightning_modules  # noqa: F401
    stages["imports"] = memory()
    if mode in ("baseline", "imports"):
        mnist = load_mnist()
        stages["mnist loaded"] = memory()
        return {"stages": stages, "mnist_bytes": sum(t.nbytes for t in mnist.values())}

    import lightning as L

    from benchmarks._common import quiet_lightning
    from datamodules.poisoning import Poisoning
    from datamodules.triggers import PixelPattern

    quiet_lightning()
    job = FLJob.from_config(config, num_clients=num_clients, rounds_per_epoch=min(5, rounds))
    dm = job.datamodule(poisoning=Poisoning(PixelPattern(), target_label=0))
    stages["imports"] = memory()
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    stages[f"setup ({num_clients} clients)"] = memory()
    held = {"train_x": dm.train_x.nbytes, "train_y": dm.train_y.nbytes,
            "client_index": sum(i.nbytes for i in dm.client_train_idx + dm.client_test_idx),
            "eval_sets": sum(t.nbytes for ds in dm.val_sets for t in ds.tensors)}  # fmt: skip
    recipe = job.recipe(job.net())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=rounds, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)  # fmt: skip
    t0 = time.perf_counter()
    trainer.fit(recipe, dm)
    fit_s = time.perf_counter() - t0
    assert trainer.global_step == rounds
    stages[f"fit: {rounds} rounds x {job.clients_per_round} clients + validation"] = memory()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    sizes = [dm.num_samples(c) for c in range(dm.num_clients)]
    return {"stages": stages, "held_bytes": held, "setup_s": setup_s, "fit_s": fit_s, "val": metrics,
            "client_sizes": {"min": min(sizes), "median": sorted(sizes)[len(sizes) // 2], "max": max(sizes)},
            }  # fmt: skip


def measure(mode: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--config", str(args.config),
           "--clients", str(args.clients), "--rounds", str(args.rounds)]  # fmt: skip
    stdout, time_kib = run_fresh(cmd, cwd=ROOT)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_mb"] = max(s["VmHWM_mb"] for s in result["stages"].values())
    result["time_v_peak_mb"] = time_kib * 1024 / MB if time_kib is not None else None
    result["check"] = check_rss(result["peak_mb"], result["time_v_peak_mb"], mode)
    return result


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000, help="clients of the FederatedDataModule (default 1000)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of FederatedRecipe after setup (default 5)")
    ap.add_argument("--quick", action="store_true", help="2 rounds")
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="FL config to take the job from")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default runs/bench/fl_memory.json)")
    ap.add_argument("--child", choices=["baseline", "imports", "federated"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds = 2
    if args.child:
        print(json.dumps(child(args.child, args.config, args.clients, args.rounds)))
        return None

    note = machine_note()
    runs = {mode: measure(mode, args) for mode in ("baseline", "imports", "federated")}
    base, imp, fed = (runs[m]["peak_mb"] for m in ("baseline", "imports", "federated"))
    rows = [
        ["torch + MNIST (baseline)", base, 0.0, ""],
        ["+ Lightning and project imports", imp, imp - base, ""],
        [f"FederatedDataModule, {args.clients} clients, + {args.rounds} rounds of FederatedRecipe", fed, fed - base,
         "yes" if fed < TARGET_MB else "NO"],
    ]  # fmt: skip
    job = FLJob.from_config(args.config)
    print(f"\nPeak RSS, each in a fresh process ({args.clients} MNIST clients, Dirichlet {job.alpha}, {args.rounds} "
          f"rounds at {job.clients_per_round} clients/round)\n")  # fmt: skip
    print(markdown_table(["process", "peak RSS MB", "minus baseline MB", f"< {TARGET_MB:.0f} MB"], rows))
    print("\npeak RSS (MB = 1e6 bytes), each child's own VmHWM against /usr/bin/time -v:\n  "
          + "\n  ".join(runs[m]["check"] for m in runs))
    stages = [[name, s["VmHWM_mb"], s.get("VmRSS_mb", float("nan"))]
              for name, s in runs["federated"]["stages"].items()]  # fmt: skip
    print("\nStages of the federated process:\n")
    print(markdown_table(["after", "peak RSS MB so far", "current RSS MB"], stages))
    held = runs["federated"]["held_bytes"]
    print(f"\ndata held by the DataModule: {', '.join(f'{k} {v / MB:.1f} MB' for k, v in held.items())}; "
          f"client sizes {runs['federated']['client_sizes']}; setup {runs['federated']['setup_s']:.1f}s, "
          f"fit {runs['federated']['fit_s']:.1f}s; val {runs['federated']['val']}")  # fmt: skip
    record = {"clients": args.clients, "rounds": args.rounds, "target_mb": TARGET_MB, "runs": runs,
              "peak_mb": {"baseline": base, "imports": imp, "federated": fed}, "machine": note}  # fmt: skip
    print(f"wrote {write_json('fl_memory', record, args.out)}")
    return record


if __name__ == "__main__":
    main()
