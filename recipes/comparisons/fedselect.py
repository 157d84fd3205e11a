"""``python -m recipes.reproduce fedselect``: FedSelect against PFL baselines on pathological non-IID MNIST and
Fashion-MNIST (2 classes per client), personalized accuracy per client (mean and spread) and over rounds."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from recipes.reproduce import COMPARISONS, Comparison, Stage

METHODS = {"fedavg": "FedAvg", "fedavg_ft": "FedAvg + FT", "fedper": "FedPer (personal head)",
           "lgfedavg": "LG-FedAvg (personal body)", "ditto": "Ditto", "fedselect": "FedSelect"}  # fmt: skip
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def _stages() -> list[Stage]:
    return [
        Stage(f"{dataset}/{method}", f"fedselect/mnist_{method}.yaml",
              [f"--data.init_args.dataset={dataset}", "--data.init_args.seed={seed}"],
              f"{name}, 10 clients x 2 classes", label)
        for dataset, name in DATASETS.items() for method, label in METHODS.items()
    ]  # fmt: skip


def metric_curve(log_dir: str, key: str) -> dict[int, float]:
    """``key`` per round completed, from a run's ``metrics.csv`` (CSVLogger). Lightning writes a metric logged
    after round ``t``'s training step or at the validation that follows it with step ``t - 1``."""
    path = Path(log_dir) / "metrics.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        return {int(row["step"]) + 1: float(row[key]) for row in csv.DictReader(f) if row.get(key)}


def pacc_plot(results: dict[str, list[dict]], path: Path) -> None:
    """One panel per dataset: mean personalized accuracy over rounds for each method (mean over seeds), and the
    growth of FedSelect's masks (first seed; right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.round_curves import save_figure

    stages = COMPARISONS["fedselect"].stages
    groups = list(dict.fromkeys(s.group for s in stages if results.get(s.key)))
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6.5 * max(len(groups), 1), 4.2), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for i, stage in enumerate(s for s in stages if s.group == group):
            curves = [metric_curve(r["log_dir"], "val/pacc") for r in results.get(stage.key, []) if "log_dir" in r]
            rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
            if rounds:
                ys = [100 * statistics.fmean(c[t] for c in curves) for t in rounds]
                ax.plot(rounds, ys, "o-" if "FedSelect" in stage.label else ".--", color=f"C{i}", label=stage.label,
                        lw=2.0 if "FedSelect" in stage.label else 1.0, ms=4)  # fmt: skip
            if "FedSelect" in stage.label and curves:
                share = metric_curve(results[stage.key][0]["log_dir"], "round/personal_fraction_eligible")
                twin = ax.twinx()
                twin.step(sorted(share), [100 * share[t] for t in sorted(share)], where="post", color="gray", lw=0.8)
                twin.set_ylim(0, 100)
                twin.set_ylabel("FedSelect: personal share of weights (%, gray)", fontsize=8)
        ax.set_xlabel("round")
        ax.set_ylabel("mean personalized accuracy (%)")
        ax.set_title(group, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(COMPARISONS["fedselect"].title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


COMPARISONS["fedselect"] = Comparison(
    title="FedSelect vs PFL baselines: pathological non-IID (2 classes per client), personalized accuracy",
    stages=_stages(),
    columns={"test/pacc": "mean pers. acc (%)", "test/pacc_std": "spread: std over clients (pp)",
             "test/pacc_min": "worst client (%)", "test/acc": "global model, global test (%)",
             "test/personal_fraction": "personal share of params (%)"},  # fmt: skip
    seeds=(0, 1, 2),
    plot=pacc_plot,
    notes="configs/fedselect/mnist_<method>.yaml (Fashion-MNIST: the same with --data.init_args.dataset=fashion-mnist): "
    "10 clients, each with exactly 2 classes and 600 training images of which a quarter is its own test split, all "
    "10 clients every round, 30 rounds, MNIST CNN (0.2M parameters), plain SGD lr 0.05, batch 32. Baselines: 2 local "
    "epochs per round; FedSelect: 1 LocalAlt alternation (a personal pass, then a shared pass), growth rate 25% every "
    "3 rounds up to 80% of each weight tensor (official defaults), so its mask grows in rounds 3-18; Ditto: lambda "
    "0.1, 2 more epochs for the personal model; FedAvg + FT: 2 epochs of fine-tuning before evaluation. Personalized "
    "accuracy: each client's model on its own test split (after the server's broadcast), mean over the 10 clients; "
    "spread: their standard deviation (percentage points); worst client: the minimum. 'global model': the "
    "server model on the dataset's global test set (2000 images). 'personal share': the fraction of all parameters "
    "that are client-owned at the end. The table's ± is over seeds where several ran.",
)
