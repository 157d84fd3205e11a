"""``python -m recipes.reproduce fedselect``: FedSelect against PFL baselines and a local-only control on MNIST and
Fashion-MNIST with label skew (3 shards per client) and a per-group feature shift, compute-matched (30 local passes
a round for every method), scored as the official code does (each client's model after its local training) and
after the server's broadcast; personalized accuracy per client (mean, spread, worst) and over rounds, and FedSelect's
paired differences to every other method (same partition, shift groups and initialisation per seed)."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

from foundation.artifacts import atomic_write_text
from recipes.reproduce import COMPARISONS, Comparison, Stage, mean_se

METHODS = {"local": "Local only (control)", "fedavg": "FedAvg", "fedavg_ft": "FedAvg + FT",
           "fedper": "FedPer (personal head)", "lgfedavg": "LG-FedAvg (personal body)", "ditto": "Ditto",
           "fedselect": "FedSelect"}  # fmt: skip
LOCAL = "--model.init_args.local.init_args.local_epochs"
# the budget ablation: 2 passes a round (FedSelect 1 LocalAlt alternation, Ditto 1 + 1 epochs, the others 2), issue
# 6's budget, which leaves each client's local training far from converged ("*": every other method)
TWO_PASSES = {"fedselect": [f"{LOCAL}=1"], "ditto": [f"{LOCAL}=1", "--model.init_args.personal_epochs=1"],
              "*": [f"{LOCAL}=2"]}  # fmt: skip
# the data ablation: 125 images per client of which 100 stay its test split, so each client trains on 25
SCARCE = {"*": ["--data.init_args.train_size=2500", "--data.init_args.client_test_fraction=0.8"]}
# key prefix -> (table name, dataset, extra overrides per method): the two datasets at the official budget (30
# passes a round) and the two ablations
GROUPS = {"mnist": ("MNIST", "mnist", {}), "fashion-mnist": ("Fashion-MNIST", "fashion-mnist", {}),
          "fashion-mnist-2pass": ("Fashion-MNIST, 2 passes a round (budget ablation)", "fashion-mnist", TWO_PASSES),
          "fashion-mnist-25img": ("Fashion-MNIST, 25 training images per client (data ablation)", "fashion-mnist",
                                  SCARCE)}  # fmt: skip


def _stages() -> list[Stage]:
    return [
        Stage(f"{key}/{method}", f"fedselect/mnist_{method}.yaml",
              [f"--data.init_args.dataset={dataset}", "--data.init_args.seed={seed}",
               *extra.get(method, extra.get("*", []))],
              f"{name}, 20 clients, 3 shards, 4 shift groups", label)
        for key, (name, dataset, extra) in GROUPS.items() for method, label in METHODS.items()
    ]  # fmt: skip


def metric_curve(log_dir: str, key: str) -> dict[int, float]:
    """``key`` per round completed, from a run's ``metrics.csv`` (CSVLogger). Lightning writes a metric logged
    after round ``t``'s training step or at the validation that follows it with step ``t - 1``."""
    path = Path(log_dir) / "metrics.csv"
    if not path.exists():
        return {}
    with path.open() as f:
        return {int(row["step"]) + 1: float(row[key]) for row in csv.DictReader(f) if row.get(key)}


SCORES = {"test/pacc_local": "after local training (official)", "test/pacc_broadcast": "after broadcast"}


def paired_table(results: dict[str, list[dict]]) -> str:
    """Markdown: per group and score, every method's mean ± standard error over seeds and FedSelect's paired
    difference to it (FedSelect − method per seed: the same partition, shift groups and initialisation), with the
    number of clients (over all seeds) where FedSelect's accuracy is above / below the method's (per client, the
    logged score is the configured one: counted where both rows are scored after local training)."""
    rows = ["| group | score | method | seeds | pers. acc (%) | FedSelect − method (pp) | clients FedSelect ▲ / ▼ |",
            "|---|---|---|---|---|---|---|"]
    for group, (name, _, _) in GROUPS.items():
        ours = {r["seed"]: r["metrics"] for r in results.get(f"{group}/fedselect", [])}
        for score, score_name in SCORES.items():
            for method, label in METHODS.items():
                runs = {r["seed"]: r["metrics"] for r in results.get(f"{group}/{method}", []) if score in r["metrics"]}
                if not runs:
                    continue
                seeds = sorted(set(runs) & set(ours))
                diff = [100 * (ours[s][score] - runs[s][score]) for s in seeds if score in ours[s]]
                local = all(abs(m["test/pacc"] - m["test/pacc_local"]) < 1e-9 for m in runs.values())
                up = down = 0
                for s in seeds:
                    clients = [k for k in runs[s] if k.startswith("test/pacc_client")]
                    up += sum(ours[s].get(k, 0.0) > runs[s][k] for k in clients)
                    down += sum(ours[s].get(k, 0.0) < runs[s][k] for k in clients)
                paired = "–" if method == "fedselect" else mean_se(diff)
                counted = method != "fedselect" and score == "test/pacc_local" and local
                rows.append(f"| {name} | {score_name} | {label} | {len(runs)} | "
                            f"{mean_se([100 * m[score] for m in runs.values()])} | {paired} | "
                            f"{f'{up} / {down}' if counted else '–'} |")  # fmt: skip
    return "\n".join(rows)


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
    atomic_write_text(path.with_name(path.stem + "-paired.md"), paired_table(results) + "\n")


COMPARISONS["fedselect"] = Comparison(
    title="FedSelect vs PFL baselines: label skew + feature shift, compute-matched, personalized accuracy",
    stages=_stages(),
    columns={"test/pacc_local": "pers. acc, official: after local training (%)",
             "test/pacc_broadcast": "pers. acc after broadcast (%)", "test/pacc_std": "spread over clients (pp)",
             "test/pacc_min": "worst client (%)", "test/acc": "global model, global test (%)",
             "test/personal_fraction": "personal share of params (%)"},  # fmt: skip
    seeds=(0, 1, 2),
    plot=pacc_plot,
    notes="configs/fedselect/mnist_<method>.yaml (Fashion-MNIST: the same with --data.init_args.dataset=fashion-mnist): "
    "20 clients in 4 groups that see the images differently (none, rotated 90 degrees, inverted, rotated 180), each "
    "with 3 label shards (at most 3 classes) and 200 images of which half is its own test split (100 train, 100 "
    "test), all 20 clients every round, 12 rounds, MNIST CNN (0.2M parameters), plain SGD lr 0.05, batch 32, "
    "unweighted averaging. Compute-matched: every method makes 30 passes over the client's data a round (FedSelect: "
    "15 LocalAlt alternations, the official la_epochs; Ditto: 15 global + 15 personal; the others: 30 epochs). "
    "FedSelect: official growth (25% of the still-shared weights every 3 rounds, cap 80%). FedAvg + FT: 5 epochs of "
    "fine-tuning before scoring. Local only: every parameter personal (the control a PFL method must beat). "
    "Official score: each client's model right after its local training, on its own test split (FedAvg + FT: the "
    "fine-tuned model); after broadcast: its personal entries with the server's new shared ones. Spread and worst "
    "client refer to the row's configured score (official; FedAvg + FT: after broadcast + FT). Ablations on "
    "Fashion-MNIST: '2 passes a round' (FedSelect 1 alternation, Ditto 1 + 1 epochs, the others 2 epochs) and '25 "
    "training images per client' (125 images each, 100 of them its test split). The table's ± is the "
    "std over seeds; fedselect-paired.md gives FedSelect's paired differences (mean ± standard error over seeds).",
)
