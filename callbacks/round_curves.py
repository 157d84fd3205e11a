"""Per-round curves of a federated run: main accuracy (MA) and backdoor accuracy (BA), attack window shaded."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from foundation.artifacts import atomic_write_text


def plot_curves(
    runs: dict[str, dict[str, Any]], path: Path | None = None, title: str = "", threshold: float | None = None,
    ax: Any = None,
) -> None:
    """Plot MA (dashed) and BA (solid) of several runs on one axis; save a PNG atomically to ``path`` if given.

    ``runs`` maps a label to a curves record as written by :class:`RoundCurves` (``rounds``, ``ma``, ``ba``,
    ``attack_rounds``); the attack rounds of the first run that has any are shaded, and the end of any other run's
    window that closes elsewhere is a dotted line in that run's colour. ``threshold`` (a BA level, e.g. the
    lifespan threshold) is drawn as a dotted grey line.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(8.5, 4))
    shaded: int | None = None  # the last attack round of the shaded window
    for i, (label, rec) in enumerate(runs.items()):
        color = f"C{i % 10}"
        rounds = rec["rounds"]
        if rec.get("ba") and any(v is not None for v in rec["ba"]):
            ax.plot(rounds, [100 * v if v is not None else math.nan for v in rec["ba"]], color=color, lw=1.8,
                    label=f"{label} BA".strip())  # fmt: skip
        ax.plot(rounds, [100 * v if v is not None else math.nan for v in rec["ma"]], color=color, lw=1.0, ls="--",
                label=f"{label} MA".strip())  # fmt: skip
        attack = sorted(rec.get("attack_rounds", []))
        if attack and shaded is None:
            for k, (start, stop) in enumerate(_spans(attack)):
                ax.axvspan(start, stop + 1, color="red", alpha=0.08, lw=0, label=None if k else "attack rounds")
            shaded = attack[-1]
        elif attack and attack[-1] != shaded:  # this run's window closed elsewhere: mark its end in its colour
            ax.axvline(attack[-1] + 1, color=color, lw=0.8, ls=":")
    if threshold is not None:
        ax.axhline(100 * threshold, color="gray", lw=0.8, ls=":")
    ax.set_xlabel("round")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    if fig is not None and path is not None:
        fig.tight_layout()
        save_figure(fig, path)


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG through a temporary file (never a half-written plot) and close it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def curve_summary(record: dict[str, Any], threshold: float = 0.5, half_life_ratio: float = 0.5) -> dict[str, float]:
    """Scalars of a curves record (fractions in [0, 1]; NaN where undefined).

    ``ba_peak``: the highest BA evaluated; ``ba_final`` / ``ma_final``: at the last evaluation. With an attack
    window (``attack_rounds``), ``window_end`` is the round after its last attack round and ``window_length`` its
    number of attack rounds; ``ba_attack_end`` (BA_end) is BA at ``window_end`` when the run measured it there
    (``ba_at``: the recipe's ``round/ba_global`` of an early-closing window), else at the first evaluation after it,
    and ``ba_mean_after`` the mean BA over those evaluations. The durability measures count rounds from
    ``window_end`` to the first evaluation that meets a condition; when none does they are the rounds observed
    (a lower bound) and ``*_censored`` is 1:

    - ``lifespan``: BA < ``threshold``: the rounds the backdoor lasts after the attacker leaves, the durability
      measure of Chameleon (Dai & Li, ICML 2023) and Neurotoxin (Zhang et al., ICML 2022). A backdoor that is not
      planted, BA_end already below the threshold, has no lifespan: NaN (not 0), so a weak attack does not pass
      for a short-lived one.
    - ``half_life``: BA_t / BA_end < ``half_life_ratio``: a normalised decay time, defined for any BA_end > 0, that
      compares backdoors planted to different levels.
    """
    rounds, ba, ma = record["rounds"], record["ba"], record["ma"]
    out = {"ma_final": ma[-1] if ma else math.nan}
    bas = [(r, v) for r, v in zip(rounds, ba) if v is not None]
    if not bas:
        return out
    out["ba_peak"], out["ba_final"] = max(v for _, v in bas), bas[-1][1]
    attack = record.get("attack_rounds") or []
    if not attack:
        return out
    end = max(attack) + 1  # rounds completed when the window closed
    out["window_end"], out["window_length"] = float(end), float(len(set(attack)))
    after = [(r, v) for r, v in bas if r >= end]
    exact = (record.get("ba_at") or {}).get(str(end))  # BA measured right after the last attack round
    if exact is not None and (not after or after[0][0] != end):
        after = [(end, exact), *after]
    nan = math.nan
    if not after:
        out.update(ba_attack_end=nan, ba_mean_after=nan, lifespan=nan, half_life=nan)
        return out
    ba_end = after[0][1]
    out["ba_attack_end"], out["ba_mean_after"] = ba_end, sum(v for _, v in after) / len(after)

    def rounds_until(condition) -> tuple[float, float]:
        hit = next((r for r, v in after if condition(v)), None)
        return (float((hit if hit is not None else rounds[-1]) - end), float(hit is None))

    if ba_end < threshold:
        out["lifespan"], out["lifespan_censored"] = nan, nan
    else:
        out["lifespan"], out["lifespan_censored"] = rounds_until(lambda v: v < threshold)
    if ba_end > 0:
        out["half_life"], out["half_life_censored"] = rounds_until(lambda v: v / ba_end < half_life_ratio)
    else:
        out["half_life"], out["half_life_censored"] = nan, nan
    return out


def _spans(rounds: list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive integers: ``[1, 2, 3, 7]`` -> ``[(1, 3), (7, 7)]``."""
    spans: list[tuple[int, int]] = []
    for r in rounds:
        if spans and r == spans[-1][1] + 1:
            spans[-1] = (spans[-1][0], r)
        else:
            spans.append((r, r))
    return spans


class RoundCurves(pl.Callback):
    """Records MA (``val/acc``) and BA (``val/asr``) after every validation, indexed by rounds completed, and the
    rounds in which the attack was active (``round/attack_active``); writes ``<log dir>/<stem>.json`` (the record
    and its :func:`curve_summary`: peak BA, BA when the attack window closed, backdoor lifespan and half-life,
    mean BA after the window, final MA/BA) and
    a PNG plot with the attack window shaded, at the end of fit and, if ``every_validation``, after every
    validation. The record is part of the checkpoint, so a resumed run continues the same curve.

    Args:
        stem: File name stem of the JSON record and the PNG plot.
        every_validation: Rewrite both files after every validation, not only at the end of fit.
        title: Plot title (default: the run directory's name).
        lifespan_threshold: BA level below which the backdoor counts as gone (default 0.5: the backdoor no
            longer fires on most triggered inputs; Neurotoxin and Chameleon report lifespans against a fixed BA
            level, and a clean MNIST model's BA for our triggers is below 1%). Neither the official Chameleon
            code (it logs the mean BA over rounds, ``MEAN_ACCURACY``) nor the parts of the paper readable here
            state the level, so it is a setting.
        half_life_ratio: the normalised decay level: the half-life is reached when BA falls below this fraction
            of its value when the window closed.
    """

    def __init__(
        self, stem: str = "curves", every_validation: bool = True, title: str | None = None,
        lifespan_threshold: float = 0.5, half_life_ratio: float = 0.5,
    ) -> None:  # fmt: skip
        self.stem, self.every_validation, self.title = stem, every_validation, title
        self.lifespan_threshold, self.half_life_ratio = lifespan_threshold, half_life_ratio
        self.record: dict[str, list] = {"rounds": [], "ma": [], "ba": [], "attack_rounds": []}
        self.out_dir: Path | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        active = trainer.callback_metrics.get("round/attack_active")
        if active is not None and float(active) > 0:
            self.record["attack_rounds"].append(trainer.global_step - 1)  # the round that just ran
            ba = trainer.callback_metrics.get("round/ba_global")  # measured when the window may close early
            if ba is not None and math.isfinite(float(ba)):
                self.record.setdefault("ba_at", {})[str(trainer.global_step)] = float(ba)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        step = trainer.global_step
        if self.record["rounds"] and self.record["rounds"][-1] == step:  # validated twice at one step
            for key in ("rounds", "ma", "ba"):
                self.record[key].pop()
        self.record["rounds"].append(step)
        self.record["ma"].append(float(m["val/acc"]) if "val/acc" in m else None)
        self.record["ba"].append(float(m["val/asr"]) if "val/asr" in m else None)
        if self.every_validation:
            self.write(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer)

    def summary(self) -> dict[str, float]:
        """The numbers written beside the curves (:func:`curve_summary`)."""
        return curve_summary(self.record, self.lifespan_threshold, self.half_life_ratio)

    def write(self, trainer: pl.Trainer) -> None:
        out = Path(trainer.log_dir or trainer.default_root_dir)  # log_dir is a collective under DDP: every rank
        if not trainer.is_global_zero or not self.record["rounds"]:
            return
        self.out_dir = out
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / f"{self.stem}.json", json.dumps({**self.record, "summary": self.summary()}))
        plot_curves({"": self.record}, out / f"{self.stem}.png", self.title or out.name, self.lifespan_threshold)

    def state_dict(self) -> dict[str, Any]:
        return {"record": self.record}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.record = state_dict["record"]
