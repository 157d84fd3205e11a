"""Where does a planted federated backdoor live: in the units TrojanDam calls redundant, or in the important ones?

    python scripts/trojandam_backdoor_units.py RUN_DIR [RUN_DIR ...] [--draws 10]

TrojanDam (Dai et al., arXiv 2504.15674) rests on the premise that backdoor updates settle in *redundant* units, the
ones the main task barely uses, and injects fresh OOD mappings there to overwrite them. For each finished attack run
(its ``config.yaml`` and exported ``artifact/``, as ``python -m recipes.reproduce trojandam`` writes them), this takes
the final global model, ranks its units as TrojanDam does (``|clean gradient|`` on the server-held clean set,
``configs/fl/defenses/trojandam.yaml``: 20 images per class, half of each layer's units redundant), and resets one set
of units to the clean warm-up the run started from (the run's ``init_from``), keeping every other parameter and every
BatchNorm statistic of the final model:

- the redundant half (the units TrojanDam's injection may change),
- the important half,
- a random half of each layer's units (``--draws`` draws; mean ± standard error).

A set whose reset removes the backdoor (BA falls) while the main accuracy stays holds the backdoor. The backdoor
accuracy is measured as the recipe does (non-target test images with the trigger, classified as the target).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from foundation.artifacts import load_artifact
from lightning_modules.federated.recipe import backdoor_accuracy
from lightning_modules.trojandam import TrojanDam

DEFENSE = Path("configs/fl/defenses/trojandam.yaml")


@torch.no_grad()
def accuracies(net: torch.nn.Module, dm) -> tuple[float, float]:
    """(MA on the clean test set, BA as the recipe measures it: triggered non-target test images)."""
    net.eval()
    x, y = dm.val_sets[0].tensors[:2]
    ma = float((torch.cat([net(x[i : i + 1000]).argmax(-1) for i in range(0, len(y), 1000)]) == y).float().mean())
    return ma, backdoor_accuracy(net, dm)


def build(run: Path):
    """The run's net at its final weights, its DataModule, and the warm-up weights it started from."""
    from recipes.cli import main

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    warm = cfg["model"]["init_args"]["init_from"]
    for key in ("ckpt_path", "weights_only", "ckpt_hparams"):  # fit's own options: built here without a subcommand
        cfg.pop(key, None)
    tmp = Path(tempfile.mkdtemp()) / "config.yaml"
    tmp.write_text(yaml.safe_dump(cfg))
    cli = main([f"--config={tmp}", f"--model.init_args.init_from={run / 'artifact'}",
                "--trainer.logger=false", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
                "--trainer.default_root_dir=/tmp/trojandam_backdoor_units"], run=False)  # fmt: skip
    cli.datamodule.setup("fit")
    cli.model.configure_models()
    warm_state = {k.removeprefix("net."): v for k, v in load_artifact(warm).state_dict.items() if k.startswith("net.")}
    return cli.model.net, cli.datamodule, warm_state


def reset(net, final: dict, warm: dict, masks: dict[str, torch.Tensor]) -> None:
    """Load ``final``, then set the ``masks`` entries back to ``warm`` (parameters only; buffers stay final)."""
    net.load_state_dict(final)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name in masks:
                p.copy_(torch.where(masks[name], warm[name], p))


def analyse(run: Path, draws: int) -> dict[str, tuple[float, float, float, float]]:
    """label -> (MA, BA, SE of MA, SE of BA) for the final model and each reset."""
    net, dm, warm = build(run)
    init = yaml.safe_load(DEFENSE.read_text())["model"]["init_args"]["server_defense_hooks"][0]["init_args"]
    hook = TrojanDam(**init)
    seed = int(yaml.safe_load((run / "config.yaml").read_text())["seed_everything"])
    hook.track_clean_gradient(net, *dm.server_clean_set(hook.clean_per_class, seed))
    redundant = hook.redundant(net)
    final = {k: v.clone() for k, v in net.state_dict().items()}
    out = {"final model": (*accuracies(net, dm), 0.0, 0.0)}
    for label, units in (("redundant half reset", redundant),
                         ("important half reset", {k: ~v for k, v in redundant.items()})):  # fmt: skip
        reset(net, final, warm, hook.entry_masks(net, units))
        out[label] = (*accuracies(net, dm), 0.0, 0.0)
    g = torch.Generator().manual_seed(0)
    rand = []
    for _ in range(draws):
        units = {k: torch.zeros_like(v).index_fill_(0, torch.randperm(len(v), generator=g)[: int(v.sum())], True)
                 for k, v in redundant.items()}  # fmt: skip
        reset(net, final, warm, hook.entry_masks(net, units))
        rand.append(accuracies(net, dm))
    se = (lambda v: statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan"))
    ma, ba = [r[0] for r in rand], [r[1] for r in rand]
    out[f"random half reset ({draws} draws)"] = (statistics.fmean(ma), statistics.fmean(ba), se(ma), se(ba))
    reset(net, final, warm, {k: torch.ones_like(v, dtype=torch.bool) for k, v in hook.masks(net).items()})
    out["every masked layer reset (the warm-up's weights)"] = (*accuracies(net, dm), 0.0, 0.0)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--draws", type=int, default=10, help="random halves to average (default 10)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not (run / "config.yaml").exists() or not (run / "artifact").exists():
            print(f"{run}: needs config.yaml and artifact/ (a finished run of python -m recipes.reproduce trojandam)")
            return 2
    print("| run | units reset to the warm-up | MA (%) | BA (%) |\n|---|---|---|---|")
    for run in args.runs:
        for label, (ma, ba, se_ma, se_ba) in analyse(run, args.draws).items():
            pm = (lambda v, se: f"{100 * v:.1f}" + (f" ± {100 * se:.1f}" if se else ""))
            print(f"| {run} | {label} | {pm(ma, se_ma)} | {pm(ba, se_ba)} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
