"""``python -m recipes.reproduce chameleon``: Chameleon (Dai & Li, ICML 2023) against the official baselines in the
testbed of ``configs/chameleon/mnist_testbed.yaml`` (issue 22): how long each backdoor survives after the attacker
leaves, on MNIST and Fashion-MNIST.

Per dataset and seed: a clean warm-up (``configs/chameleon/mnist_testbed_warmup.yaml``) exported once as an
artifact; from it, a clean continuation and one run per attack, each a 40-round window (official) followed by 80
decay rounds at the benign clients' post-attack lr. Attacks: the official "Baseline" (``configs/fl/attacks/
baseline.yaml``), PGD at the benign lr (``pgd.yaml``), Neurotoxin with the official clean-client mask
(``neurotoxin_official.yaml``) and Chameleon (the testbed config itself). The clean continuation keeps the schedule
with no malicious client, so its lr schedule and length equal the attack runs'.

``chameleon-planted`` is the same with each attack's window closed as soon as the global BA reaches 90%
(``schedule.stop_at_ba``, at most 80 rounds), so every backdoor enters the decay phase equally planted, followed by
the same 80 decay rounds (``decay_rounds``); it shares the ``chameleon`` comparison's warm-up artifacts and clean
continuations (stage keys ``../chameleon/...``: they run once for both comparisons).

The federation (training subset, Dirichlet partition) is drawn with data seed 0 for every run seed, so the attacker
(client 0) and its data stay the same; the run seed draws the initialisation, the client sampling and the SGD
noise. The table gives mean ± standard error over seeds (``≥``: a seed's backdoor outlived the decay phase, so its
number is a lower bound; ``k/n``: only k of n seeds planted a backdoor, BA_end ≥ 50%, so only k have a lifespan).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from recipes.comparisons.fl import curves_plot, mean_curves
from recipes.reproduce import COMPARISONS, Comparison, Stage

ATTACK_CFG, WARMUP_CFG = "chameleon/mnist_testbed.yaml", "chameleon/mnist_testbed_warmup.yaml"
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
ATTACKS = {"Baseline (official)": "baseline", "PGD": "pgd", "Neurotoxin (official mask)": "neurotoxin_official",
           "Chameleon": None}  # fmt: skip  (None: the testbed config's own attacker)
SCHEDULE = "--model.init_args.attack.init_args.schedule"
COLUMNS = {"test/acc": "final MA (%)", "curve/window_length": "window (rounds)",
           "curve/ba_attack_end": "BA at window end (%)", "curve/lifespan": "lifespan (rounds, BA ≥ 50%)",
           "curve/half_life": "half-life (rounds, BA/BA_end ≥ 0.5)", "curve/ba_mean_after": "mean BA after (%)",
           "test/asr": "final BA (%)"}  # fmt: skip
PLAIN = ("curve/window_length", "curve/lifespan", "curve/half_life")


def testbed_stages(dataset: str, planted: float | None = None, warmup_root: str = "") -> list[Stage]:
    """Warm-up, clean continuation and every attack on ``dataset``; ``planted``: close each window once BA reaches
    it (up to 80 rounds); ``warmup_root``: prefix of the warm-up and clean stage keys (``../chameleon/`` shares the
    ``chameleon`` comparison's runs)."""
    name = DATASETS[dataset]
    data = [f"--data.init_args.dataset={dataset}", "--data.init_args.seed=0"]  # one federation for every run seed
    warm_key = f"{warmup_root}{dataset}/warmup"
    warm = f"--model.init_args.init_from={{artifact:{warm_key}}}"
    window = [f"{SCHEDULE}.stop_at_ba={planted}", f"{SCHEDULE}.end_round=80", "--trainer.max_steps=160"]
    window = window if planted else []
    stages = [Stage(warm_key, WARMUP_CFG, data, name, "clean warm-up"),
              Stage(f"{warmup_root}{dataset}/clean", ATTACK_CFG, [f"{SCHEDULE}.malicious_clients=[]", warm, *data],
                    name, "no attack (clean continuation)")]  # fmt: skip
    for label, overlay in ATTACKS.items():
        cfg = [f"--config=configs/fl/attacks/{overlay}.yaml"] if overlay else []
        key = f"{dataset}/{overlay or 'chameleon'}"
        stages.append(Stage(key, ATTACK_CFG, [*cfg, *window, warm, *data], name, label))
    return stages


# ------------------------------------------------------------------------------------------------ the table
def _finite(values: list[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def mean_se(values: list[float], scale: float = 1.0) -> str:
    """``mean ± standard error`` (std over sqrt(n)) of the finite values; ``—`` when there are none."""
    vals = [v * scale for v in _finite(values)]
    if not vals:
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.fmean(vals):.1f} ± {statistics.stdev(vals) / math.sqrt(len(vals)):.1f}"


def se_table(comp: Comparison, results: dict[str, list[dict]]) -> str:
    """One row per stage, mean ± SE over seeds; durability cells marked ``≥`` when censored and ``k/n`` when only
    k of n seeds define them; the durability of the warm-up and the clean continuation is not shown."""
    head = ["dataset", "condition", *comp.columns.values(), "seeds", "time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in comp.stages:
        runs = results.get(stage.key, [])
        cells = []
        for metric in comp.columns:
            values = [r["metrics"].get(metric, math.nan) for r in runs]
            no_backdoor = stage.key.endswith(("warmup", "clean"))
            if no_backdoor and metric.startswith("curve/") and metric != "curve/ba_mean_after":
                cells.append("—")
                continue
            cell = mean_se(values, 1.0 if metric in comp.plain else 100.0)
            censored = [r["metrics"].get(f"{metric}_censored", 0.0) for r in runs]
            if any(c == 1.0 for c in censored):
                cell = f"≥ {cell}"
            if cell != "—" and len(_finite(values)) < len(runs):
                cell += f" ({len(_finite(values))}/{len(runs)})"
            cells.append(cell)
        secs = statistics.fmean(r["seconds"] for r in runs) if runs else 0.0
        lines.append(f"| {stage.group} | {stage.label} | " + " | ".join(cells) + f" | {len(runs)} | {secs:.0f} s |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- the plot
def aligned_ba(runs: list[dict]) -> dict[int, float]:
    """BA against rounds since each seed's window closed, averaged over the seeds that reach each offset."""
    import json

    by_offset: dict[int, list[float]] = {}
    for r in runs:
        path = Path(r.get("log_dir", "")) / "curves.json"
        if not path.exists():
            continue
        rec = json.loads(path.read_text())
        if not rec.get("attack_rounds"):
            continue
        end = max(rec["attack_rounds"]) + 1
        for rnd, ba in zip(rec["rounds"], rec["ba"]):
            if rnd >= end and ba is not None:
                by_offset.setdefault(rnd - end, []).append(ba)
    return {k: statistics.fmean(v) for k, v in sorted(by_offset.items())}


def durability_plot(comp: Comparison, results: dict[str, list[dict]], path: Path) -> None:
    """Per dataset one column: every attack's MA and BA per round on one panel (top, the clean continuation too),
    and every attack's BA against rounds since its window closed (bottom), means over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.round_curves import plot_curves, save_figure

    stages = [s for s in comp.stages if not s.key.endswith("warmup")]
    groups = list(dict.fromkeys(s.group for s in stages if results.get(s.key)))
    if not groups:
        return curves_plot(comp, results, path, 0.5)
    fig, axes = plt.subplots(2, len(groups), figsize=(9 * len(groups), 8.4), squeeze=False)
    for col, group in enumerate(groups):
        members = [s for s in stages if s.group == group]
        runs = {s.label: mean_curves(results.get(s.key, [])) for s in members}
        runs = {k: v for k, v in runs.items() if v is not None}
        plot_curves(runs, None, group, 0.5, ax=axes[0, col])
        color = {label: f"C{i % 10}" for i, label in enumerate(runs)}  # plot_curves' colours, so both panels agree
        ax = axes[1, col]
        for s in members:
            curve = aligned_ba(results.get(s.key, []))
            if curve and not s.key.endswith("clean"):
                ax.plot(list(curve), [100 * v for v in curve.values()], color=color.get(s.label, "gray"), lw=1.8,
                        label=s.label)
        ax.axhline(50, color="gray", lw=0.8, ls=":")
        ax.set_xlabel("rounds after the attack window")
        ax.set_ylabel("BA (%)")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(comp.title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


NOTES = (
    "configs/chameleon/mnist_testbed.yaml after configs/chameleon/mnist_testbed_warmup.yaml (200 clean rounds, its own "
    "row): 100 clients, Dirichlet 0.9 (data seed 0 for every run seed), 10 per round, 2 local epochs, MNIST CNN "
    "32/64 channels with a 256-d feature layer; norm clipping at M = 1, unweighted, server lr 0.5; client 0 attacks "
    "in rounds 0-39 on a fixed IID sample of 1,600 training images, 7 of 64 samples poisoned (+ N(0, 0.01) noise), "
    "every attacker projected onto radius 5/3 (official s_norm 5 vs norm_bound 3), then 80 decay rounds with the "
    "benign clients' lr at persistence_diff 0.03 (official, pixel trigger). Baseline: the official one (5 epochs, lr "
    "0.1, milestones [3, 5], gamma 0.01); PGD: 5 epochs at the benign lr; Neurotoxin: the Baseline on the 99% of "
    "coordinates with the smallest clean gradient over 30 benign clients. BA on the triggered non-target test images "
    "(5,000 test images) every 2 rounds. Lifespan: rounds after the window until BA < 50% (no value for a backdoor "
    "never planted); half-life: until BA falls below half its value at the window's end; ≥: censored at the end of "
    "the decay phase. Mean ± standard error over seeds."
)

COMPARISONS["chameleon"] = Comparison(
    title="Chameleon vs. the official baselines: backdoor durability after a 40-round window (official server)",
    stages=[*testbed_stages("mnist"), *testbed_stages("fashion-mnist")],
    columns=COLUMNS, seeds=(0, 1, 2), plain=PLAIN, notes=NOTES, table=se_table,
    plot=lambda results, path: durability_plot(COMPARISONS["chameleon"], results, path),
)  # fmt: skip

COMPARISONS["chameleon-planted"] = Comparison(
    title="Chameleon vs. the official baselines, each window closed once BA reaches 90% (official server)",
    stages=[*testbed_stages("mnist", 0.9, "../chameleon/"), *testbed_stages("fashion-mnist", 0.9, "../chameleon/")],
    columns=COLUMNS, seeds=(0, 1, 2), plain=PLAIN, table=se_table,
    notes=NOTES.replace("client 0 attacks in rounds 0-39", "client 0 attacks from round 0 until the global BA "
                        "reaches 90% (at most 80 rounds)"),
    plot=lambda results, path: durability_plot(COMPARISONS["chameleon-planted"], results, path),
)  # fmt: skip
