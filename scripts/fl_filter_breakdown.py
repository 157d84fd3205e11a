"""Which malicious updates a robust aggregator kept, by how many colluders took part in the round.

    python scripts/fl_filter_breakdown.py RUN_DIR [RUN_DIR ...]

For each federated run directory (``config.yaml`` + ``metrics.csv`` as ``python -m recipes fit`` writes them), the
clients of every round are drawn again with the recipe's own ``FederatedRecipe.sample_clients`` (run seed, round),
the colluders among them counted, and ``round/malicious_admitted`` (the share of that round's malicious updates the
aggregator kept) averaged per number of colluders. A run whose logged rounds disagree with the redrawn ones (a round
with an admitted share but no colluder, or the reverse) is refused: the breakdown would be wrong.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import yaml

from lightning_modules.federated.recipe import FederatedRecipe


def breakdown(run_dir: Path) -> dict[int, list[float]]:
    """``{colluders in the round: [admitted share of each such round]}``."""
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    model = cfg["model"]["init_args"]
    attack = (model.get("attack") or {}).get("init_args") or {}
    schedule = attack.get("schedule") or {}
    if schedule.get("force_participation"):
        raise SystemExit(f"{run_dir}: forced participation puts every colluder in every round; nothing to break down")
    malicious = set(schedule.get("malicious_clients") or [])
    seed = model.get("seed")
    seed = cfg["seed_everything"] if seed is None else seed  # the recipe falls back to the run's seed
    recipe = SimpleNamespace(seed=seed, attack=None, clients_per_round=model["clients_per_round"])
    num_clients = cfg["data"]["init_args"]["num_clients"]
    out: dict[int, list[float]] = {}
    with open(run_dir / "metrics.csv", newline="") as f:
        for row in csv.DictReader(f):
            value = row.get("round/malicious_admitted", "")
            if value == "" or row.get("round/attack_active", "") == "":
                continue
            r = int(row["step"])
            n = len(malicious & set(FederatedRecipe.sample_clients(recipe, r, num_clients)))
            admitted = float(value)
            if (n > 0) != math.isfinite(admitted):
                raise SystemExit(f"{run_dir}: round {r} has {n} colluders but admitted share {value}; the redrawn "
                                 "clients do not match this run (another sampler or seed)")  # fmt: skip
            if n:
                out.setdefault(n, []).append(admitted)
    return out


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    for run in map(Path, argv):
        if not (run / "config.yaml").exists() or not (run / "metrics.csv").exists():
            print(f"{run}: no config.yaml/metrics.csv here; pass a run directory (e.g. runs/.../seed0)")
            return 2
        by = breakdown(run)
        total = sum(len(v) for v in by.values())
        kept = sum(n * sum(v) for n, v in by.items()) / max(sum(n * len(v) for n, v in by.items()), 1)
        cells = ", ".join(f"{n} colluder{'s' if n > 1 else ''}: {len(v)} rounds, kept {100 * sum(v) / len(v):.1f}%"
                          for n, v in sorted(by.items()))  # fmt: skip
        print(f"{run}: {total} rounds with colluders, {100 * kept:.1f}% of their updates kept; {cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
