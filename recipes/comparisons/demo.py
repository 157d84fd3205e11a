"""``python -m recipes.reproduce demo`` (what ``make demo`` runs): the ``fl`` comparison's two headline arms,
shortened so that both runs finish in a few minutes on a 2-core machine.

The job is ``configs/fl/mnist_fedavg_naive.yaml`` (MNIST, 100 clients, Dirichlet 0.5, 10 per round, the naive
BadNets attacker, client 0) with 30 rounds instead of 60 and the attack window moved from rounds 30-39 to
rounds 15-24 (still 10 attack rounds, still 5 rounds after it). Two arms: plain FedAvg and norm clipping
(``configs/fl/defenses/normclip.yaml``, M = 1). The full-length comparison is ``python -m recipes.reproduce fl``.
"""

from __future__ import annotations

from recipes.comparisons.fl import curves_plot
from recipes.reproduce import COMPARISONS, Comparison, Stage

ROUNDS, ATTACK = 30, (15, 25)  # attack rounds 15..24 (end exclusive)
_SHORT = [
    f"--trainer.max_steps={ROUNDS}",
    f"--model.init_args.attack.init_args.schedule.start_round={ATTACK[0]}",
    f"--model.init_args.attack.init_args.schedule.end_round={ATTACK[1]}",
    "--data.init_args.seed={seed}",
]
_GROUP = f"MNIST, 100 clients, Dirichlet 0.5, 10/round, {ROUNDS} rounds"

COMPARISONS["demo"] = Comparison(
    title="Demo: a naive federated backdoor against FedAvg and norm clipping (MNIST, 30 rounds)",
    stages=[
        Stage("mnist/naive/fedavg", "fl/mnist_fedavg_naive.yaml",
              ["--config=configs/fl/defenses/fedavg.yaml", *_SHORT], _GROUP, "naive, FedAvg"),
        Stage("mnist/naive/normclip", "fl/mnist_fedavg_naive.yaml",
              ["--config=configs/fl/defenses/normclip.yaml", *_SHORT], _GROUP, "naive, norm clip"),
    ],
    columns={"test/acc": "final MA (%)", "curve/ba_attack_end": "BA at attack end (%)",
             "curve/ba_peak": "peak BA (%)", "test/asr": "final BA (%)", "curve/lifespan": "lifespan (rounds)"},
    seeds=(0,),
    plot=lambda results, path: curves_plot(COMPARISONS["demo"], results, path, 0.5),  # MA/BA per round, window shaded
    plain=("curve/lifespan",),
    notes=f"{ROUNDS} rounds; client 0 attacks in rounds {ATTACK[0]}-{ATTACK[1] - 1} (every round, half of each local "
    "batch triggered and relabelled to 0, 2 local epochs). MA: accuracy on the clean MNIST test set; BA: share of "
    "triggered non-target test digits classified as 0, evaluated every 5 rounds. A shortened form of "
    "`python -m recipes.reproduce fl`.",
)

