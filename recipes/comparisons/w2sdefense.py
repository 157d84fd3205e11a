"""``python -m recipes.reproduce w2sdefense``: backdoored SmolLM2-135M classifiers, then LoRA-only unlearning
(the paper's ablation) and W2SDefense (Zhao et al., Findings of ACL 2025, arXiv:2410.14425) on clean data.

Stages per trigger (BadNet rare word, InSent sentence, subordinate-clause template), in that order: the poisoned
student, LoRA-only, W2SDefense (official loss weights 5 / 0.001 / 0.001, T = 2); one clean MiniLM-L6 teacher
serves all three. Three last rows re-run W2SDefense on each trigger with the terms balanced (a 1, b 1, c 0.02: each
term about 1 at the start of training, read from the official-weights run's training log), since with the official
weights the distillation terms are about 1.5% of the loss. The BadNet rows under ``badnet/large`` repeat LoRA-only
and both W2SDefense weightings with larger adapters (:data:`LARGE_LORA`).
"""

from __future__ import annotations

from recipes.reproduce import COMPARISONS, Comparison, Stage

TRIGGERS = {  # key: (table group, trigger override)
    "badnet": ("BadNet (rare word)", "--data.init_args.poisoning.init_args.trigger=RareWord"),
    "insent": ("InSent (sentence)", "--data.init_args.poisoning.init_args.trigger=InsertSentence"),
    "clause": ("Subordinate clause (syntactic template)", "--data.init_args.poisoning.init_args.trigger=SubordinateClause"),
}
DATA_SEED = "--data.init_args.seed={seed}"


def _trigger_stages(key: str) -> list[Stage]:
    group, trigger = TRIGGERS[key]
    suspect = f"--model.init_args.suspect={{artifact:{key}/poisoned}}"
    teacher = "--model.init_args.teacher_artifact={artifact:teacher}"
    return [
        Stage(f"{key}/poisoned", "w2sdefense/rt_smollm2_poison.yaml", [trigger, DATA_SEED], group, "poisoned"),
        Stage(f"{key}/lora", "w2sdefense/rt_smollm2_lora.yaml", [trigger, DATA_SEED, suspect], group, "LoRA only"),
        Stage(f"{key}/w2sdefense", "w2sdefense/rt_smollm2_w2sdefense.yaml", [trigger, DATA_SEED, suspect, teacher],
              group, "W2SDefense"),
    ]


BALANCED = ["--model.init_args.ce_weight=1.0", "--model.init_args.kd_weight=1.0", "--model.init_args.feature_weight=0.02"]
# closer to the official unlearning run (r 512 on every projection, lr 2e-4, 5 epochs): r 64 on all 7 linear
# projections of each block, the official lr 2e-4, 2 epochs; the same adapters for LoRA-only and W2SDefense. (At the
# small adapters' lr 1e-3 these adapters collapsed LoRA-only to one class: CA 57.5, seed 0.)
LARGE_LORA = ["--model.init_args.lora.init_args.r=64", "--model.init_args.lora.init_args.alpha=128",
              "--model.init_args.lora.init_args.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
              "--model.init_args.optimizer.init_args.lr=2e-4", "--trainer.max_epochs=2"]  # fmt: skip


def _balanced_stage(key: str) -> Stage:
    group, trigger = TRIGGERS[key]
    return Stage(f"{key}/w2sdefense_balanced", "w2sdefense/rt_smollm2_w2sdefense.yaml",
                 [trigger, DATA_SEED, f"--model.init_args.suspect={{artifact:{key}/poisoned}}",
                  "--model.init_args.teacher_artifact={artifact:teacher}", *BALANCED],
                 group, "W2SDefense, a 1 / b 1 / c 0.02")  # fmt: skip


def _large_lora_stages(key: str) -> list[Stage]:
    group, trigger = TRIGGERS[key]
    suspect = f"--model.init_args.suspect={{artifact:{key}/poisoned}}"
    teacher = "--model.init_args.teacher_artifact={artifact:teacher}"
    return [
        Stage(f"{key}/large/lora", "w2sdefense/rt_smollm2_lora.yaml", [trigger, DATA_SEED, suspect, *LARGE_LORA],
              group, "LoRA only, r 64 all projections, lr 2e-4, 2 epochs"),
        Stage(f"{key}/large/w2sdefense", "w2sdefense/rt_smollm2_w2sdefense.yaml",
              [trigger, DATA_SEED, suspect, teacher, *LARGE_LORA], group, "W2SDefense, r 64 all projections, lr 2e-4, 2 epochs"),
        Stage(f"{key}/large/w2sdefense_balanced", "w2sdefense/rt_smollm2_w2sdefense.yaml",
              [trigger, DATA_SEED, suspect, teacher, *LARGE_LORA, *BALANCED], group,
              "W2SDefense, a 1 / b 1 / c 0.02, r 64 all projections, lr 2e-4, 2 epochs"),
    ]  # fmt: skip


COMPARISONS["w2sdefense"] = Comparison(
    title="W2SDefense vs LoRA-only unlearning of backdoored SmolLM2-135M classifiers (Rotten Tomatoes)",
    stages=[
        Stage("teacher", "w2sdefense/rt_minilm_teacher.yaml", [DATA_SEED], "Teacher (clean MiniLM-L6, rare word)",
              "clean teacher"),
        *[stage for key in TRIGGERS for stage in _trigger_stages(key)],
        *[_balanced_stage(key) for key in TRIGGERS],
        *_large_lora_stages("badnet"),
    ],
    columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
    seeds=(0, 1, 2),
    notes="Student: SmolLM2-135M-Instruct (offline Q4_1-dequantized copy) as a sequence classifier, poisoned with "
    "LoRA (r 16 on q/v, head in full; 1000 snippets, 20% dirty-label, target negative, 1 epoch, 48 tokens). "
    "Defenses start from the poisoned artifact (adapters merged), add fresh LoRA adapters (r 8 on q/v, head in "
    "full) and train 1 epoch on 480 clean snippets (AdamW 1e-3): LoRA only = cross-entropy; W2SDefense = "
    "a*CE + b*KD(T=2) + c*FA against the clean MiniLM-L6 teacher projected to 576 features, student feature = "
    "last non-pad token of the final layer; official weights a 5 / b 0.001 / c 0.001, and a balanced variant a 1 / b 1 / "
    "c 0.02 (at the start of training CE is about 0.6, KD 0.2, FA 45). CA: 200 clean test snippets (teacher: 250); ASR: their triggered non-target "
    "(positive) snippets classified as negative. The teacher's ASR is the rare-word trigger's base rate. The 'r 64 all projections' rows (BadNet) "
    "give LoRA-only and W2SDefense larger adapters, closer to the official run: r 64 on q/k/v/o/gate/up/down, lr 2e-4, "
    "2 epochs.",
)
