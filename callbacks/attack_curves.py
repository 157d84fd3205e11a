"""Round curves for continuous attacks: :class:`~callbacks.round_curves.RoundCurves` plus the mean main accuracy
and backdoor accuracy over the attack (TrojanDam, arXiv 2504.15674, reports BA under attack in every round, so
the mean over the window, not the lifespan after it, is the defense's measure)."""

from __future__ import annotations

import math
from typing import Any

from callbacks.round_curves import RoundCurves


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


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


class AttackCurves(RoundCurves):
    """:class:`RoundCurves` whose summary also holds :func:`attack_summary` (same arguments as RoundCurves) and two
    per-round means: ``malicious_admitted``, the share of the malicious updates the aggregator kept, over the rounds
    with a malicious update (1 for FedAvg and clipping, less where a filter removed some), and ``ood_fit_mean``,
    TrojanDam's accuracy on its current OOD mapping (NaN without the defense)."""

    ROUND_KEYS = {"admitted": "round/malicious_admitted", "ood_fit": "round/ood_fit"}

    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        super().on_train_batch_end(trainer, pl_module, *args)
        for key, metric in self.ROUND_KEYS.items():
            value = trainer.callback_metrics.get(metric)
            if value is not None and math.isfinite(float(value)):
                self.record.setdefault(key, []).append(float(value))

    def summary(self) -> dict[str, float]:
        return {**super().summary(), **attack_summary(self.record),
                "malicious_admitted": _mean(self.record.get("admitted", [])),
                "ood_fit_mean": _mean(self.record.get("ood_fit", []))}  # fmt: skip
