"""``python -m recipes.reproduce trojandam``: TrojanDam (Dai, Li, Gan, Gong, arXiv 2504.15674, 2025) against
FedAvg, norm clipping, Multi-Krum and FLAME under a continuous backdoor attack (naive, Neurotoxin, Chameleon) on
MNIST and Fashion-MNIST.

Each attack run starts from a clean warm-up artifact (``fl_warmup_stage``: 60 clean rounds of
``configs/chameleon/mnist_normclip.yaml``, the same net and partition), then the attacker (client 0) takes part in
every one of the ``configs/trojandam/mnist_continuous.yaml`` rounds. The federation (partition, client test
splits) is drawn with data seed 0 for every run seed, so the attacker's data stay the same (see the chameleon
comparison); the run seed draws the initialisation, client sampling and SGD noise. Stages are ordered by priority
(MNIST naive and Neurotoxin, then Chameleon, then Fashion-MNIST), so ``--only`` prefixes such as ``mnist/naive`` run
the most important first.
"""

from __future__ import annotations

from recipes.comparisons.fl import curves_plot, fl_warmup_stage
from recipes.reproduce import COMPARISONS, Comparison, Stage

CONFIG = "trojandam/mnist_continuous.yaml"
DEFENSES = {"FedAvg": "fedavg", "norm clip": "normclip", "Multi-Krum": "multikrum", "FLAME": "flame",
            "TrojanDam": "trojandam", "TrojanDam, stable mapping": "trojandam_stable"}  # fmt: skip
ATTACKS = {"naive": "naive", "Neurotoxin": "neurotoxin", "Chameleon": "chameleon"}
POISON_RATE = "--model.init_args.attack.init_args.poison_fraction=0.109375"  # 7 of 64, as the chameleon comparison
DATASETS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


def trojandam_stages(dataset: str, attacks: dict[str, str], warmup_rounds: int = 60) -> list[Stage]:
    """Warm-up, the clean continuations (FedAvg, TrojanDam), then every (attack, defense) pair on ``dataset``."""
    name = DATASETS[dataset]
    data = [f"--data.init_args.dataset={dataset}", "--data.init_args.seed=0"]  # one federation for every run seed
    warm = f"--model.init_args.init_from={{artifact:{dataset}/warmup}}"
    none = "--config=configs/fl/attacks/none.yaml"
    stages = [
        fl_warmup_stage(dataset, data, warmup_rounds, f"{name}, no attack", "clean warm-up (norm clip)"),
        *[Stage(f"{dataset}/none/{cfg}", CONFIG, [none, f"--config=configs/fl/defenses/{cfg}.yaml", warm, *data],
                f"{name}, no attack", label) for label, cfg in (("FedAvg", "fedavg"), ("TrojanDam", "trojandam"))],
    ]  # fmt: skip
    for attack, attack_cfg in attacks.items():
        for defense, cfg in DEFENSES.items():
            overrides = [f"--config=configs/fl/attacks/{attack_cfg}.yaml",
                         *([POISON_RATE] if attack_cfg != "chameleon" else []),
                         f"--config=configs/fl/defenses/{cfg}.yaml", warm, *data]  # fmt: skip
            stages.append(Stage(f"{dataset}/{attack_cfg}/{cfg}", CONFIG, overrides, f"{name}, {attack}", defense))
    return stages


COMPARISONS["trojandam"] = Comparison(
    title="TrojanDam vs. robust aggregation under a continuous FL backdoor (attacker in every round)",
    stages=[*trojandam_stages("mnist", ATTACKS), *trojandam_stages("fashion-mnist", ATTACKS)],
    columns={"test/acc": "final MA (%)", "curve/ma_mean_attack": "mean MA (%)", "test/asr": "final BA (%)",
             "curve/ba_mean_attack": "mean BA (%)", "curve/ba_peak": "peak BA (%)"},  # fmt: skip
    seeds=(0, 1),
    notes="configs/trojandam/mnist_continuous.yaml: 100 clients, Dirichlet 0.5, 10 per round, server lr 1, MNIST "
    "CNN, warm-started from the 60-round clean warm-up (norm clipping, its own row); then 30 rounds in which client "
    "0 attacks every round: naive poisoning (2 local epochs), Neurotoxin (keep 99%, radius 1), both with 7 of 64 "
    "samples per batch poisoned, or Chameleon (configs/fl/attacks/chameleon.yaml). Defenses: FedAvg, norm clipping "
    "(M = 1), Multi-Krum (f = 1, 5 selected), FLAME (lambda = 0.001), TrojanDam (configs/fl/defenses/trojandam.yaml: "
    "norm clipping M = 1 plus OOD injection into the redundant half of each layer: 800 Fashion-MNIST/MNIST images, "
    "a fresh mapping every round, 10 steps at lr 0.01; 'stable mapping': 128 images, a mapping kept 10 rounds, lr "
    "0.02, configs/fl/defenses/trojandam_stable.yaml). MA: clean test accuracy; BA: "
    "triggered non-target test images classified as the target, on 5,000 test images every 3 rounds; mean: over "
    "the evaluations during the attack. 'no attack' rows are the clean continuations (BA = the trigger's base rate).",
    plot=lambda results, path: curves_plot(COMPARISONS["trojandam"], results, path),
)
