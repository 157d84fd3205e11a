"""``python -m recipes.tamper``: run the tampering-attack harness on a safeguarded model and print a table.

    python -m recipes.tamper --config configs/tar/smollm2_tar.yaml --artifact runs/reproduce/tar/tar/seed0/artifact
    python -m recipes.tamper --config configs/tar/smollm2_none.yaml --attacks configs/tar/attacks/harness.yaml

The config names the model spec and the forget/retain data (the same one the safeguard was trained with); the
artifact holds the safeguard's trained parameters (omit it to attack the undefended model). Every attack fine-tunes
a fresh copy; the rows (forget/retain accuracy and NLL after each attack) are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from callbacks.tamper import load_attacks, run_harness, summarize_rows
from foundation.artifacts import atomic_write_text


def table(before: dict, rows: list[dict]) -> str:
    """Markdown table: the model before any attack, then one row per attack, then mean and worst case."""
    lines = ["| attack | forget acc (%) | retain acc (%) | forget NLL | retain NLL |", "|---|---|---|---|---|"]
    for name, r in [("before attack", before), *[(r["attack"], r) for r in rows]]:
        lines.append(f"| {name} | {100 * r['forget_acc']:.1f} | {100 * r['retain_acc']:.1f} | "
                     f"{r['forget_nll']:.2f} | {r['retain_nll']:.2f} |")  # fmt: skip
    s = summarize_rows(rows)
    lines.append(f"| mean / worst over attacks | {100 * s['mean_forget_acc']:.1f} / {100 * s['max_forget_acc']:.1f} "
                 f"| {100 * s['mean_retain_acc']:.1f} | | |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.tamper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the safeguard's experiment config (model spec and data)")
    parser.add_argument("--artifact", default=None, help="artifact of the safeguard's trained parameters")
    parser.add_argument("--attacks", default="configs/tar/attacks/harness.yaml", help="YAML list of attacks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the attacks' data order")
    parser.add_argument("--out", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args(argv)

    from lightning_modules.tamper import evaluate
    from recipes.cli import main as cli_main

    overrides = [f"--model.init_args.init_from={args.artifact}"] if args.artifact else []
    cli = cli_main(["--config", args.config, *overrides, "--trainer.logger=false"], run=False)
    model, dm = cli.model, cli.datamodule
    if not hasattr(model, "net") or not hasattr(dm, "sentences"):
        raise SystemExit(f"{args.config}: expected a safeguard recipe (lightning_modules.tar) over TamperFactsDataModule")
    model.configure_model()
    dm.setup("test")
    before = evaluate(model.net, dm)
    rows = run_harness(model.net, dm, load_attacks(args.attacks), args.seed)
    print(table(before, rows))
    if args.out is not None:
        atomic_write_text(args.out, json.dumps({"before": before, "attacks": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
