"""Round curves for continuous attacks: :class:`~callbacks.round_curves.RoundCurves` plus the mean main accuracy
and backdoor accuracy over the attack (TrojanDam, arXiv 2504.15674, reports BA under attack in every round, so
the mean over the window, not the lifespan after it, is the defense's measure)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from callbacks.round_curves import RoundCurves, curve_summary, plot_curves
from recipes.artifacts import atomic_write_text


def attack_summary(record: dict[str, Any]) -> dict[str, float]:
    """``ba_mean_attack`` / ``ma_mean_attack``: mean BA and MA over the evaluations made while the attack ran (after
    its first round, up to the first evaluation after its last); in a run without attack rounds (a clean reference),
    over all evaluations. NaN without evaluations."""
    attack = record.get("attack_rounds") or []
    first, last = 0, math.inf
    if attack:
        first, end = min(attack) + 1, max(attack) + 1
        later = [r for r in record["rounds"] if r >= end]
        last = later[0] if later else math.inf
    out = {}
    for key in ("ba", "ma"):
        vals = [v for r, v in zip(record["rounds"], record[key]) if first <= r <= last and v is not None]
        out[f"{key}_mean_attack"] = sum(vals) / len(vals) if vals else math.nan
    return out


class AttackCurves(RoundCurves):
    """:class:`RoundCurves` whose summary also holds :func:`attack_summary` (same arguments as RoundCurves)."""

    def write(self, trainer: pl.Trainer) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)
        if not trainer.is_global_zero or not self.record["rounds"]:
            return
        self.out_dir = out
        out.mkdir(parents=True, exist_ok=True)
        summary = {**curve_summary(self.record, self.lifespan_threshold), **attack_summary(self.record)}
        atomic_write_text(out / f"{self.stem}.json", json.dumps({**self.record, "summary": summary}))
        plot_curves({"": self.record}, out / f"{self.stem}.png", self.title or out.name, self.lifespan_threshold)
