"""``python -m recipes.reproduce fl``: a naive federated backdoor (Gu et al. 2017 in FL, Bagdasaryan et al. 2020)
against FedAvg and robust aggregators on MNIST, and the helpers every federated comparison shares: per-round
MA/BA curves averaged over seeds (:func:`curves_plot`) and the (attack, defense) overlay grid (:func:`fl_stages`).
Attack studies that start from a clean warm-up artifact share the Chameleon testbed's (stage
``../chameleon/<dataset>/warmup``, as ``recipes/comparisons/trojandam.py`` does)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from recipes.reproduce import COMPARISONS, Comparison, Stage


def mean_curves(runs: list[dict]) -> dict | None:
    """Average the ``curves.json`` records (written by ``callbacks.RoundCurves``) of one stage's seeds."""
    records = [json.loads((Path(r["log_dir"]) / "curves.json").read_text()) for r in runs
               if "log_dir" in r and (Path(r["log_dir"]) / "curves.json").exists()]  # fmt: skip
    if not records:
        return None
    # seeds may stop at different rounds (an early-closing window with decay_rounds): average each round over the
    # seeds that evaluated it
    rounds = sorted({r for rec in records for r in rec["rounds"]})

    def avg(key: str) -> list:
        at = [dict(zip(rec["rounds"], rec[key])) for rec in records]
        cols = [[a[r] for a in at if r in a] for r in rounds]
        return [None if any(v is None for v in col) else statistics.fmean(col) for col in cols]

    return {"rounds": rounds, "ma": avg("ma"), "ba": avg("ba"), "attack_rounds": records[0]["attack_rounds"]}


def curves_plot(
    comp: Comparison, results: dict[str, list[dict]], path: Path, threshold: float | None = None,
    skip: tuple[str, ...] = ("warmup",),
) -> None:
    """One panel per group: every stage's MA and BA per round (mean over seeds), attack window shaded. Stages whose
    key contains one of ``skip`` (the clean warm-ups that attack runs start from) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from callbacks.round_curves import plot_curves, save_figure

    stages = [s for s in comp.stages if not any(k in s.key for k in skip)]
    groups = list(dict.fromkeys(s.group for s in stages if results.get(s.key)))  # skip groups not run
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(9 * max(len(groups), 1), 4.4), squeeze=False)
    for ax, group in zip(axes[0], groups):
        runs = {s.label or s.key: mean_curves(results.get(s.key, [])) for s in stages if s.group == group}
        plot_curves({k: v for k, v in runs.items() if v is not None}, None, group, threshold, ax=ax)
    fig.suptitle(comp.title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def fl_stages(dataset: str, group: str, config: str, attacks: dict[str, str], defenses: dict[str, str]) -> list[Stage]:
    """Every (attack, defense) pair of overlay configs on one federated experiment config."""
    stages = []
    for attack, attack_cfg in attacks.items():
        for defense, defense_cfg in defenses.items():
            overrides = [f"--config=configs/fl/defenses/{defense_cfg}.yaml", "--data.init_args.seed={seed}"]
            if attack_cfg:
                overrides.insert(0, f"--config=configs/fl/attacks/{attack_cfg}.yaml")
            key = f"{dataset}/{attack_cfg or 'naive'}/{defense_cfg}"
            stages.append(Stage(key, config, overrides, group, f"{attack}, {defense}"))
    return stages


FL_COLUMNS = {"test/acc": "final MA (%)", "curve/ba_attack_end": "BA at attack end (%)",
               "curve/ba_peak": "peak BA (%)", "test/asr": "final BA (%)", "curve/lifespan": "lifespan (rounds)"}


COMPARISONS["fl"] = Comparison(
    title="Federated backdoor on MNIST: a naive attacker against FedAvg and robust aggregators",
    stages=[
        *fl_stages("mnist", "MNIST, 100 clients, Dirichlet 0.5, 10/round", "fl/mnist_fedavg_naive.yaml",
                    {"no attack": "none"}, {"FedAvg": "fedavg"}),
        *fl_stages("mnist", "MNIST, 100 clients, Dirichlet 0.5, 10/round", "fl/mnist_fedavg_naive.yaml",
                    {"naive": ""}, {"FedAvg": "fedavg", "norm clip": "normclip", "Multi-Krum": "multikrum",
                                    "FLAME": "flame", "median": "median"}),
    ],
    columns=FL_COLUMNS,
    seeds=(0, 1),
    plain=("curve/lifespan",),
    notes="60 rounds; client 0 attacks in rounds 30-39 (every round, half of each local batch triggered and "
    "relabelled to 0, 2 local epochs). MA: accuracy of the global model on the clean MNIST test set; BA: share of "
    "triggered non-target test digits classified as 0, evaluated every 5 rounds. Lifespan: rounds after the "
    "attack window until BA < 50% (if it never falls below, the rounds observed, a lower bound). 'no attack' "
    "shows the trigger's base rate.",
    plot=lambda results, path: curves_plot(COMPARISONS["fl"], results, path, 0.5),
)
