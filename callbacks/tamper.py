"""The tampering-attack harness: after testing, fine-tune copies of the model with many attack configurations and
report the forget and retain metrics after each (Tamirisa et al., ICLR 2025, arXiv 2408.00761, red teaming; Qi et
al., arXiv 2412.07097, on why one attack setting is not enough)."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import lightning.pytorch as pl
import yaml
from lightning.pytorch.utilities import rank_zero_info

from lightning_modules.tamper import TamperAttack, run_attack
from foundation.artifacts import atomic_write_text


def load_attacks(path: str | Path) -> list[TamperAttack]:
    """Attacks of a YAML file holding a list of :class:`TamperAttack` fields."""
    rows = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a YAML list of attack settings (name, optimizer, lr, steps, ...)")
    try:
        return [TamperAttack(**r) for r in rows]
    except TypeError as err:
        raise ValueError(f"{path}: {err}; the fields are those of lightning_modules.tamper.TamperAttack") from None


def run_harness(net, dm, attacks: list[TamperAttack], seed: int = 0, log=print) -> list[dict]:
    """One row per attack: its settings, the forget/retain metrics of the attacked copy, and its wall time."""
    rows = []
    for i, attack in enumerate(attacks):
        start = time.perf_counter()
        metrics = run_attack(net, attack, dm, seed=seed + i)
        rows.append({"attack": attack.name, **metrics, "seconds": time.perf_counter() - start,
                     "settings": dict(attack.__dict__)})  # fmt: skip
        log(f"[tamper] {attack.name}: forget_acc {metrics['forget_acc']:.3f} retain_acc {metrics['retain_acc']:.3f} "
            f"({rows[-1]['seconds']:.0f} s)")  # fmt: skip
    return rows


def summarize_rows(rows: list[dict]) -> dict[str, float]:
    """Mean and worst case (highest forget accuracy) over the attacks."""
    forget = [r["forget_acc"] for r in rows]
    return {"mean_forget_acc": statistics.fmean(forget), "max_forget_acc": max(forget),
            "mean_retain_acc": statistics.fmean(r["retain_acc"] for r in rows)}  # fmt: skip


class TamperingHarness(pl.Callback):
    """At the end of testing, run every attack on a copy of ``pl_module.net`` (a safeguard recipe over a
    ``TamperFactsDataModule``), log ``tamper/<attack>/{forget_acc,retain_acc,forget_nll,retain_nll}`` and the mean
    and worst case over attacks, and write the rows to ``<log dir>/tamper.json``. The model itself is unchanged.

    Args:
        attacks: the attack configurations (inline).
        attacks_file: a YAML list of attacks (e.g. ``configs/tar/attacks/harness.yaml``), appended to ``attacks``.
        seed: seed of the attacks' data order (attack ``i`` uses ``seed + i``).
    """

    def __init__(self, attacks: list[TamperAttack] | None = None, attacks_file: str | None = None, seed: int = 0):
        self.attacks = list(attacks or []) + (load_attacks(attacks_file) if attacks_file else [])
        if not self.attacks:
            raise ValueError("TamperingHarness needs attacks (inline) or an attacks_file")
        names = [a.name for a in self.attacks]
        if len(set(names)) != len(names):
            raise ValueError(f"attack names must be unique (they name the logged metrics): {names}")
        self.seed = seed
        self.rows: list[dict] = []

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = run_harness(pl_module.net, trainer.datamodule, self.attacks, self.seed, rank_zero_info)
        for row in self.rows:
            for key in ("forget_acc", "retain_acc", "forget_nll", "retain_nll"):
                pl_module.log(f"tamper/{row['attack']}/{key}", row[key])
        for key, value in summarize_rows(self.rows).items():
            pl_module.log(f"tamper/{key}", value)
        if trainer.is_global_zero and trainer.log_dir:
            Path(trainer.log_dir).mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(trainer.log_dir) / "tamper.json", json.dumps(self.rows, indent=2))
