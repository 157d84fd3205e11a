"""``python -m recipes.reproduce w2sdefense``: a fully fine-tuned backdoored SmolLM2-135M classifier, then LoRA-only
unlearning (the paper's ablation) and W2SDefense (Zhao et al., Findings of ACL 2025, arXiv:2410.14425) on clean
data, in a paired design.

Per trigger (BadNet rare word, InSent sentence, subordinate-clause template) and seed: one poisoned student, then
every defense row starts from that same student with the same seed, hence the same clean snippets, data order,
LoRA initialisation and dropout draws; the rows differ only in the loss:

- ``lora``: cross-entropy only (official ``lora.py``);
- ``official``: W2SDefense with the official loss, 5 CE + 0.001 KD(T = 2) + 0.001 FA, FA the official mean squared
  distance, per sample (each student's last-token feature against its own teacher feature);
- ``broadcast``: the same weights with the official code's broadcast FA (:class:`W2SDefenseBroadcast`: the batch's
  last teacher vector against every student token, padding included).

One clean MiniLM-L6 teacher serves all triggers. The defenses run at :data:`CPU_BUDGET`, a scaled-down step count
of the configs' budget (which is itself the official budget scaled to this model).

``python -m recipes.reproduce w2sdefense-budget`` runs the same three defenses at the configs' own budget (3 epochs on
the poisoning's 1,000 snippets, best-dev epoch on 200 validation snippets: 189 steps, about 1/6 of the official
~1,085), starting from ``w2sdefense``'s poisoned students and teacher (run those first), so each of its rows is
paired with the scaled-down rows of the same seed.
"""

from __future__ import annotations

from recipes.reproduce import COMPARISONS, Comparison, Stage

TRIGGERS = {  # key: (table group, trigger override)
    "badnet": ("BadNet (rare word)", "--data.init_args.poisoning.init_args.trigger=RareWord"),
    "insent": ("InSent (sentence)", "--data.init_args.poisoning.init_args.trigger=InsertSentence"),
    "clause": ("Subordinate clause (syntactic template)", "--data.init_args.poisoning.init_args.trigger=SubordinateClause"),
}
DATA_SEED = "--data.init_args.seed={seed}"
# The configs unlearn for 3 epochs on the poisoning's 1,000 snippets (the official 5 epochs on all of SST-2, scaled);
# on the shared 2-core machine one such defense takes about an hour, so the reproduction runs 2 epochs on the first
# 320 of those snippets (40 steps of batch 16, official about 1,080 of batch 32), linear decay over the 2 epochs,
# the best-dev epoch chosen on 64 validation snippets.
CPU_BUDGET = ["--data.init_args.train_size=320", "--trainer.max_epochs=2",
              "--model.init_args.scheduler.init_args.total_iters=2", "--trainer.limit_val_batches=1"]  # fmt: skip


def _defense_stages(key: str, budget: list[str], source: str = "", suffix: str = "") -> list[Stage]:
    """LoRA-only, W2SDefense per-sample and W2SDefense broadcast for trigger ``key``, from the poisoned student and
    teacher of the comparison ``source`` (``""``: this one; e.g. ``"../w2sdefense/"``), at ``budget``."""
    group, trigger = TRIGGERS[key]
    suspect = f"--model.init_args.suspect={{artifact:{source}{key}/poisoned}}"
    defense = [trigger, DATA_SEED, suspect, *budget]
    teacher = f"--model.init_args.teacher_artifact={{artifact:{source}teacher}}"
    return [
        Stage(f"{key}/lora", "w2sdefense/rt_smollm2_lora.yaml", defense, group, f"LoRA only{suffix}"),
        Stage(f"{key}/official", "w2sdefense/rt_smollm2_w2sdefense.yaml", [*defense, teacher], group,
              f"W2SDefense, official loss, per-sample FA{suffix}"),
        Stage(f"{key}/broadcast", "w2sdefense/rt_smollm2_w2sdefense.yaml",
              [*defense, teacher, "--model.class_path=W2SDefenseBroadcast"], group,
              f"W2SDefense, official loss, official broadcast FA{suffix}"),
    ]  # fmt: skip


def _trigger_stages(key: str) -> list[Stage]:
    group, trigger = TRIGGERS[key]
    return [
        Stage(f"{key}/poisoned", "w2sdefense/rt_smollm2_poison.yaml", [trigger, DATA_SEED], group,
              "poisoned (full fine-tuning)"),
        *_defense_stages(key, CPU_BUDGET),
    ]


COMPARISONS["w2sdefense"] = Comparison(
    title="W2SDefense vs LoRA-only unlearning of a fully fine-tuned backdoored SmolLM2-135M classifier (Rotten Tomatoes)",
    stages=[
        Stage("teacher", "w2sdefense/rt_minilm_teacher.yaml", [DATA_SEED], "Teacher (clean MiniLM-L6, rare word)",
              "clean teacher"),
        *[stage for key in TRIGGERS for stage in _trigger_stages(key)],
    ],
    columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
    seeds=(0, 1, 2),
    notes="Student: SmolLM2-135M-Instruct (offline Q4_1-dequantized copy) as a sequence classifier, fully fine-tuned "
    "on 1,000 snippets with 10% dirty-label poisoning (target negative, 1 epoch, lr 5e-5, 48 tokens). Defenses start "
    "from it, add LoRA r 64 = alpha on q/v (dropout 0.1, head in full), AdamW lr 2e-4 with linear decay, 2 epochs on "
    "320 of the poisoning's snippets, clean, best-dev epoch restored. W2SDefense: 5 CE + 0.001 KD(T=2) + 0.001 FA "
    "(official), FA = mean squared distance to the clean MiniLM-L6 teacher's features projected to 576. CA: 560 clean "
    "test snippets; ASR: their 312 triggered positive snippets classified as negative (standard error <= 2.8 points).",
)
COMPARISONS["w2sdefense-budget"] = Comparison(
    title="W2SDefense vs LoRA-only at the configs' own unlearning budget (3 epochs on 1,000 snippets), SmolLM2-135M",
    stages=[stage for key in TRIGGERS for stage in _defense_stages(key, [], "../w2sdefense/", ", config budget")],
    columns=COMPARISONS["w2sdefense"].columns,
    seeds=(0, 1, 2),
    notes="The poisoned students and the teacher of `w2sdefense` (same seed), unlearned as there but at the configs' "
    "budget: 3 epochs on all 1,000 of the poisoning's snippets (189 steps of batch 16, linear decay over the 3 "
    "epochs), the best-dev epoch chosen on 200 clean validation snippets. CA: 560 clean test snippets; ASR: their 312 "
    "triggered positive snippets classified as negative.",
)
