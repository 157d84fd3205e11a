"""``python -m recipes.gpu_check``: every cluster config runs a few training steps on one GPU, with its throughput,
memory, device placement and precision checked (``scripts/gpu_check.sh``; docs/cluster.md).

Each check takes a cluster config (``configs/``), stacks the trainer overlay it is meant for (FSDP for the 8B full
fine-tuning runs, DDP for the federated ResNet-18, ...) and runs ``--steps`` training steps through the project's own
CLI with a :class:`~callbacks.gpu_probe.Probe` attached (what it asserts is listed there). Whatever the machine lacks is
replaced, and each replacement is printed (:mod:`recipes.gpu_plan`, :mod:`recipes.standins`): hub backbones by the real architecture with random
weights (``--layers N`` cuts the depth for a short check; with ``--layers`` the depth is cut even where the weights
exist), exported data by synthetic data of the configured shapes, artifacts of earlier stages by random weights. The
check shortens a run (no validation, no checkpoints, no tampering harness, NAMET: ``--edits`` edits and
``--stats-tokens`` statistics tokens) but keeps its batch sizes, sequence lengths, image sizes and precision.

``--cpu`` runs the same code on the tiny twins (``tests/configs/``) with accelerator ``cpu`` (the default tests do,
so this script cannot rot); ``--synthetic`` replaces data and pools even where they exist.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from recipes.gpu_plan import Plan, declared_dtypes
from callbacks.gpu_probe import NO_MATMUL, Probe

REPO = Path(__file__).resolve().parents[1]
CONFIGS, TWINS = REPO / "configs", REPO / "tests" / "configs"


@dataclass(frozen=True)
class Check:
    """One cluster config, the trainer overlays stacked before it, and the processes it runs on."""

    name: str
    config: str
    overlays: tuple[str, ...] = ()
    processes: int = 1
    max_steps: int | None = None  # NAMET: one training step is the whole batch of edits


CHECKS = [
    Check("tar_llama3_8b_fsdp", "tar/llama3_8b_tar_fsdp.yaml", ("trainer/fsdp.yaml",)),
    Check("w2s_llama3_8b_poison_fsdp", "w2sdefense/llama3_8b_poison.yaml", ("trainer/fsdp.yaml",)),
    Check("w2s_llama3_8b_teacher", "w2sdefense/llama3_8b_teacher.yaml"),
    Check("w2s_llama3_8b_w2sdefense", "w2sdefense/llama3_8b_w2sdefense.yaml"),
    Check("namet_llama2_7b", "namet/llama2_7b_counterfact_namet.yaml", ("trainer/gpu.yaml",), max_steps=1),
    Check("fl_cifar10_resnet18", "chameleon/cifar10_resnet18_normclip.yaml"),
    Check("fl_cifar10_resnet18_ddp", "chameleon/cifar10_resnet18_normclip.yaml", ("trainer/ddp.yaml",)),
    Check("fl_cifar10_resnet18_ddp2", "chameleon/cifar10_resnet18_normclip.yaml", ("trainer/ddp.yaml",), processes=2),
    *(Check(f"clip_{stage}", f"merging/clip/{stage}.yaml")
      for stage in ("pretrained", "task_finetune", "task_arithmetic", "ties", "dare", "adamerging", "dam")),
]


def run_prepared(check: Check, config: Path, accelerator: str, devices: int, scan: bool) -> dict:
    """Fit ``config`` (stacked after the check's overlays) with a probe; returns its table row."""
    import torch

    from datamodules.sources import load_image_dataset
    from recipes.cli import main

    load_image_dataset.cache_clear()  # a synthetic CIFAR-10 cache may replace the real one
    argv = [*(f"--config={CONFIGS / o}" for o in check.overlays), f"--config={config}",
            f"--trainer.accelerator={accelerator}", f"--trainer.devices={devices}"]  # fmt: skip
    if accelerator == "cpu" and any("fsdp" in o for o in check.overlays):
        argv.append("--trainer.strategy=ddp")  # Lightning's FSDP needs a GPU; the CPU mode keeps the rest
    cli = main(argv, run=False)
    probe = Probe(scan=scan, max_batches=yaml.safe_load(config.read_text())["trainer"]["max_steps"])
    cli.trainer.callbacks.append(probe)
    if accelerator == "gpu":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    row = probe.summary(cli.trainer.precision, declared_dtypes(yaml.safe_load(config.read_text())))
    row.update(check=check.name, fit_s=time.perf_counter() - start, processes=cli.trainer.world_size,
               device=str(probe.device), rank=cli.trainer.global_rank)  # fmt: skip
    if accelerator == "gpu":
        row["gpu"] = torch.cuda.get_device_name(probe.device)
    return row


def run_check(check: Check, args, scratch: Path) -> dict:
    source = (TWINS if args.cpu else CONFIGS) / check.config
    plan = Plan(scratch, args.steps, args.cpu, args.layers, args.synthetic, args.edits, args.stats_tokens,
                export=not args.no_export)  # fmt: skip
    cfg = plan.config(yaml.safe_load(source.read_text()), check.name, check.max_steps)
    config = scratch / "configs" / f"{check.name}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"== {check.name}: {source.relative_to(REPO)} + {', '.join(check.overlays) or 'no overlay'}"
          f" ({check.processes} process{'es' if check.processes > 1 else ''})", flush=True)  # fmt: skip
    if args.cpu and any("fsdp" in o for o in check.overlays):
        plan.notes.append("trainer.strategy: fsdp -> ddp (Lightning's FSDP needs a GPU)")
    for note in plan.notes:
        print(f"   stand-in {note}", flush=True)
    accelerator = "cpu" if args.cpu else "gpu"
    # the whole environment comes back afterwards: besides plan.env, Lightning's DDP launcher writes LOCAL_RANK,
    # NODE_RANK and MASTER_ADDR/PORT into os.environ even for one process, and a later `fit` in this process (or a
    # child that inherits them) would then wait for ranks that an outside launcher was supposed to start
    old = dict(os.environ)
    os.environ.update(plan.env)
    try:
        if check.processes == 1:
            return run_prepared(check, config, accelerator, 1, not args.no_scan)
        out = scratch / f"{check.name}.json"
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "recipes.gpu_check", "--only", check.name, "--prepared", str(config),
               "--json", str(out), *(["--cpu"] if args.cpu else []), *(["--no-scan"] if args.no_scan else [])]
        subprocess.run(cmd, check=True, cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": str(REPO)})
        return json.loads(out.read_text().splitlines()[0])
    finally:
        os.environ.clear()
        os.environ.update(old)


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    head = ["check", "proc", "params M (trained)", "precision", "verdict", "steps/s", "samples/s", "GPU peak GB",
            "host peak GB", "FSDP units", "problems"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        params = f"{_fmt(r.get('params_m'), 1)} ({_fmt(r.get('trained_params_m'), 1)})"
        cells = [r["check"], _fmt(r.get("processes")), params, r.get("precision", "-"), r.get("precision_ok", "-"),
                 _fmt(r.get("steps_per_s"), 3), _fmt(r.get("samples_per_s"), 1), _fmt(r.get("gpu_peak_gb")),
                 _fmt(r.get("host_peak_gb")), _fmt(r.get("fsdp_units")),
                 "; ".join(r.get("problems", [])) or r.get("error", "") or "none"]  # fmt: skip
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m recipes.gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--cpu", action="store_true", help="run the tiny twins of tests/configs on the CPU")
    parser.add_argument("--only", nargs="+", metavar="CHECK", help=f"checks to run: {[c.name for c in CHECKS]}")
    parser.add_argument("--steps", type=int, default=3, help="training steps per check (the first is not timed)")
    parser.add_argument("--layers", type=int, default=None,
                        help="cut every stand-in backbone to N layers (random weights even where real ones exist)")
    parser.add_argument("--synthetic", action="store_true", help="stand-ins even for assets that are present")
    parser.add_argument("--edits", type=int, default=64, help="NAMET: edits in the check (config: 10000)")
    parser.add_argument("--stats-tokens", type=int, default=65536, help="NAMET: corpus tokens for the statistics")
    parser.add_argument("--processes", type=int, default=None,
                        help="run the 2-process DDP check (default: on GPU when 2+ GPUs are visible, never on CPU)")
    parser.add_argument("--no-scan", action="store_true", help="skip the operator device scan of the first step")
    parser.add_argument("--no-export", action="store_true",
                        help="drop ExportArtifact (an 8B export writes 16 GB; kept by default: it gathers FSDP shards)")
    parser.add_argument("--workdir", type=Path, default=Path("runs/gpu_check"), help="stand-ins, configs and runs")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON row per check to this file")
    parser.add_argument("--prepared", type=Path, default=None, help=argparse.SUPPRESS)  # a multi-process child
    args = parser.parse_args(argv)
    if args.steps < 1 or (args.layers is not None and args.layers < 1):
        parser.error("--steps and --layers must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch

    if args.prepared is not None:  # one check in this process (and the ranks Lightning launches from it)
        check = next(c for c in CHECKS if c.name == args.only[0])
        row = run_prepared(check, args.prepared, "cpu" if args.cpu else "gpu", check.processes, not args.no_scan)
        if row["rank"] == 0:
            args.json.write_text(json.dumps(row) + "\n")
        return 0
    if not args.cpu and not torch.cuda.is_available():
        print("no CUDA device is visible: run on a GPU node, or use --cpu for the tiny twins", file=sys.stderr)
        return 2
    gpus = 0 if args.cpu else torch.cuda.device_count()
    multi = args.processes if args.processes is not None else (2 if gpus >= 2 else 1)
    unknown = set(args.only or []) - {c.name for c in CHECKS}
    if unknown:
        print(f"unknown checks {sorted(unknown)}; choose from {[c.name for c in CHECKS]}", file=sys.stderr)
        return 2
    scratch = args.workdir.resolve()
    rows = []
    for check in CHECKS:
        if args.only and check.name not in args.only:
            continue
        if check.processes > multi:
            print(f"== {check.name}: skipped ({check.processes} processes; "
                  f"{'pass --processes 2' if args.cpu else f'{gpus} GPU visible'})", flush=True)  # fmt: skip
            continue
        try:
            row = run_check(check, args, scratch)
        except Exception as err:  # noqa: BLE001 - one broken config must not hide the others
            row = {"check": check.name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as out:
                out.write(json.dumps(row) + "\n")
    print()
    if args.layers:
        print(f"stand-in backbones cut to {args.layers} layers: memory and speed are not those of the full depth")
    print(table(rows))
    bad = [r["check"] for r in rows if r.get("error") or r.get("problems")
           or r.get("precision_ok") not in ("ok", NO_MATMUL)]  # fmt: skip
    if bad:
        print(f"\nFAILED: {', '.join(bad)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
