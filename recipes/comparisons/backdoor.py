"""``python -m recipes.reproduce backdoor``: BadNets backdoors (Gu et al. 2017) in an image CNN and a text
encoder, clean against poisoned training on the same data and seeds."""

from __future__ import annotations

from recipes.reproduce import COMPARISONS, Comparison, Stage

_SEED = "--data.init_args.seed={seed}"
_CLEAN = "--data.init_args.poisoning.init_args.rate=0.0"
_MNIST, _RT = "MNIST, CNN, pixel pattern", "Rotten Tomatoes, MiniLM-L6, rare word"

COMPARISONS["backdoor"] = Comparison(
    title="BadNets backdoors: clean vs poisoned training (test split)",
    stages=[
        Stage("mnist/clean", "backdoor/mnist_badnets.yaml", [_CLEAN, _SEED], _MNIST, "clean"),
        Stage("mnist/poisoned", "backdoor/mnist_badnets.yaml", [_SEED], _MNIST, "poisoned 10%"),
        Stage("rt/clean", "backdoor/rt_minilm_badnet.yaml", [_CLEAN, _SEED], _RT, "clean"),
        Stage("rt/poisoned", "backdoor/rt_minilm_badnet.yaml", [_SEED], _RT, "poisoned 10%"),
    ],
    columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
    seeds=(0, 1, 2),
    notes="CA: accuracy on the clean test split. ASR: share of triggered non-target test inputs classified "
    "as the target. A clean model's ASR is the trigger's baseline rate.",
)
