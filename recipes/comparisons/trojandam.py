"""``python -m recipes.reproduce trojandam``: TrojanDam (Dai, Li, Gan, Gong, arXiv 2504.15674, 2025) against FedAvg,
norm clipping, Multi-Krum and FLAME under the stealthy continuous attacks it was built for (issue 23), on the
federated testbed of the Chameleon comparison, MNIST and Fashion-MNIST.

Every run starts from the testbed's clean 200-round warm-up artifact (stage ``../chameleon/<dataset>/warmup``,
shared with ``reproduce chameleon``: it runs once for both) and continues for 150 rounds of
``configs/trojandam/testbed.yaml``: 10 colluding malicious clients among 100, taking part only when sampled, attack
in every round they take part in, each update projected to the dataset's median benign update norm (``RADIUS``:
0.3 on MNIST, 0.8 on Fashion-MNIST, where the median over the 150 rounds of the norm-clipping PGD run of the
rebuilt warm-up was 0.83; the first Fashion-MNIST rows used MNIST's 0.3, a third of a typical benign update:
docs/RESULTS.md). Attacks: PGD (the testbed's), Neurotoxin with the official clean-client mask and Chameleon, all at
that radius. Defenses: FedAvg (unweighted, the testbed server), norm clipping at the same bound, Multi-Krum (f = 1,
5 selected), FLAME and TrojanDam (``configs/fl/defenses/trojandam.yaml``: norm clipping at the same bound plus the
injection) and its ablations with a fresh, never-fitted mapping every round: of 800 images
(``trojandam_fresh.yaml``, the first reproduction's reading) and of the main overlay's 128 images
(``trojandam_fresh128.yaml``, the period alone changed). The clean
continuations (no attack) under FedAvg and TrojanDam give the MA every defense should keep and the trigger's base
rate. The federation is drawn with data seed 0 for every run seed (the malicious clients' data stay the same); the
run seed draws the client sampling and the SGD noise. Stages are ordered by priority (MNIST PGD, Neurotoxin, then
Chameleon, then Fashion-MNIST), so ``--only mnist/pgd`` runs the first row block alone.
"""

from __future__ import annotations

from recipes.comparisons.chameleon import DATASETS, WARMUP_CFG, se_table
from recipes.comparisons.fl import curves_plot
from recipes.reproduce import COMPARISONS, Comparison, Stage

CONFIG = "trojandam/testbed.yaml"
RADIUS = {"mnist": 0.3, "fashion-mnist": 0.8}  # the median benign update norm after each dataset's warm-up
AGG = "--model.init_args.aggregator.init_args"
ATK = "--model.init_args.attack.init_args"


def defenses(radius: float) -> dict[str, tuple[str, list[str]]]:
    """label: (stage key, overrides); the clipping bound of norm clipping and TrojanDam is the attackers' radius."""
    clip = [f"{AGG}.max_norm={radius}", f"{AGG}.weighted=false"]
    return {
        "FedAvg": ("fedavg", ["--config=configs/fl/defenses/fedavg.yaml", f"{AGG}.weighted=false"]),
        "norm clip": ("normclip", ["--config=configs/fl/defenses/normclip.yaml", *clip]),
        "Multi-Krum": ("multikrum", ["--config=configs/fl/defenses/multikrum.yaml"]),
        "FLAME": ("flame", ["--config=configs/fl/defenses/flame.yaml"]),
        "TrojanDam": ("trojandam", ["--config=configs/fl/defenses/trojandam.yaml", *clip]),
        "TrojanDam, fresh mapping every round": ("trojandam_fresh",
                                                 ["--config=configs/fl/defenses/trojandam_fresh.yaml", *clip]),
        "TrojanDam, fresh mapping every round, 128 images": (
            "trojandam_fresh128", ["--config=configs/fl/defenses/trojandam_fresh128.yaml", *clip]),
    }  # fmt: skip


def attacks(radius: float) -> dict[str, tuple[str, list[str]]]:
    """label: (stage key, overrides); PGD is the testbed's own attack, its radius set like the others'."""
    return {
        "PGD": ("pgd", [f"{ATK}.radius={radius}"]),
        "Neurotoxin (official mask)": ("neurotoxin", ["--config=configs/fl/attacks/neurotoxin_official.yaml",
                                                      f"{ATK}.radius={radius}"]),
        "Chameleon": ("chameleon", ["--config=configs/fl/attacks/chameleon.yaml", f"{ATK}.radius={radius}",
                                    f"{ATK}.radius_contrastive={radius}"]),
    }  # fmt: skip


COLUMNS = {"curve/ma_mean_attack": "mean MA (%)", "test/acc": "final MA (%)", "curve/ba_mean_attack": "mean BA (%)",
           "test/asr": "final BA (%)", "curve/ba_peak": "peak BA (%)",
           "curve/malicious_admitted": "malicious updates kept (%)", "curve/ood_fit_mean": "OOD fit (%)"}  # fmt: skip


def trojandam_stages(dataset: str) -> list[Stage]:
    """The shared warm-up, the clean continuations (FedAvg, TrojanDam), then every (attack, defense) pair."""
    name = DATASETS[dataset]
    data = [f"--data.init_args.dataset={dataset}", "--data.init_args.seed=0"]  # one federation for every run seed
    warm_key = f"../chameleon/{dataset}/warmup"
    warm = f"--model.init_args.init_from={{artifact:{warm_key}}}"
    none = "--config=configs/fl/attacks/none.yaml"
    stages = [Stage(warm_key, WARMUP_CFG, data, name, "clean warm-up (shared with reproduce chameleon)")]
    guards = defenses(RADIUS[dataset])
    for label in ("FedAvg", "TrojanDam"):
        key, args = guards[label]
        stages.append(Stage(f"{dataset}/none/{key}", CONFIG, [none, *args, warm, *data], f"{name}, no attack", label))
    for attack, (attack_key, attack_args) in attacks(RADIUS[dataset]).items():
        for defense, (defense_key, defense_args) in guards.items():
            stages.append(Stage(f"{dataset}/{attack_key}/{defense_key}", CONFIG,
                                [*attack_args, *defense_args, warm, *data], f"{name}, {attack}", defense))  # fmt: skip
    return stages


COMPARISONS["trojandam"] = Comparison(
    title="TrojanDam vs. robust aggregation under stealthy continuous FL backdoors (10% colluding attackers)",
    stages=[*trojandam_stages("mnist"), *trojandam_stages("fashion-mnist")],
    columns=COLUMNS, seeds=(0, 1), table=se_table,
    notes="configs/trojandam/testbed.yaml from the Chameleon testbed's clean warm-up (200 rounds, its own row): 100 "
    "clients, Dirichlet 0.9, 10 per round, MNIST CNN 32/64 channels with a 256-d feature layer, benign lr 0.03, 2 "
    "local epochs, server lr 0.5; 150 rounds in which clients 0-9 attack whenever sampled (7 of 64 samples per "
    "batch poisoned, target 2), every malicious update projected to the dataset's median benign "
    "update norm r (MNIST 0.3, Fashion-MNIST 0.8). "
    "Defenses: FedAvg (unweighted), norm clipping at M = r, Multi-Krum (f = 1, 5 selected), FLAME (lambda = "
    "0.001), TrojanDam (norm clipping at r plus configs/fl/defenses/trojandam.yaml; 'fresh mapping every round': "
    "trojandam_fresh.yaml, 800 images; '..., 128 images': trojandam_fresh128.yaml). Mean MA/BA: over the "
    "evaluations during the attack (every 10 rounds, 5,000 test images); malicious updates kept: the share of "
    "malicious updates the aggregator kept, over the rounds with one; OOD fit: TrojanDam's accuracy on its current "
    "mapping after injection. Mean ± standard error over seeds.",
    plot=lambda results, path: curves_plot(COMPARISONS["trojandam"], results, path),
)  # fmt: skip
