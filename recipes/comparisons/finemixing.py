"""``python -m recipes.reproduce finemixing``: Fine-mixing and E-PUR (Zhang et al., EMNLP 2022 Findings,
arXiv:2210.09545) against text backdoors in MiniLM-L6 on Rotten Tomatoes, measured against same-pipeline floors.

Groups (stage-key prefixes, so ``--only badnet clean ep`` runs a subset):

- ``badnet``: the BadNet rare-word suspect (10% dirty-label poisoning of 4000 snippets), then plain fine-tuning, the
  fixed-rho sweep of Fine-mixing (:data:`SWEEP`), Fine-mixing with the validation rule (each candidate fine-tuned
  with the full budget, scored on 1000 validation snippets), and the rule after E-PUR.
- ``clean``: the floor. The same model trained on the same 4000 snippets unpoisoned (the "clean suspect"), put
  through the very same defenses: its ASR is the share of triggered negative snippets that any model of this
  pipeline calls positive, the figure a defense can at best reach.
- ``ep``: Embedding Poisoning (Yang et al., NAACL 2021) of the clean suspect with the word ``cf``, then plain
  fine-tuning, E-PUR alone and before fine-tuning, Fine-mixing (rule) alone and after E-PUR.
- ``insent``: the InSent sentence suspect, fine-tuning, the sweep and the rule.

Every defense fine-tunes on 256 clean training snippets (4 epochs, batch 16, AdamW 5e-5), drawn with the run's
seed; ASR uses the stage's trigger on the non-target snippets among the first 1000 test snippets. The plot draws
ASR against CA for the sweep (one curve per suspect) with fine-tuning, the rule and the floor marked, and writes
``<plot>-se.md``: every figure with its standard error over test inputs (binomial, and over seeds when > 1).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from foundation.artifacts import atomic_write_text
from recipes.reproduce import COMPARISONS, Comparison, Stage

SWEEP = (0.0, 0.1, 0.2, 0.3, 0.5)
DATA_SEED = "--data.init_args.seed={seed}"
TEST = "--data.init_args.test_size=1000"
# the suspects hold out the same 1000 validation snippets as the defenses (the seeded split puts validation first), so
# the rule's reference, the suspect's validation accuracy, is never measured on the suspect's own training snippets
SUSPECT_VAL = "--data.init_args.val_size=1000"
INSENT = "--data.init_args.poisoning.init_args.trigger=InsertSentence"
CF = ["--data.init_args.poisoning.init_args.trigger=RareWord",
      "--data.init_args.poisoning.init_args.trigger.init_args.words=[cf]"]  # fmt: skip
FIXED = "--model.init_args.rho_candidates=null"
NO_VAL = "--trainer.limit_val_batches=0"  # the defenses' end-of-run validation is not reported (the rule reads val itself)
GROUPS = {"badnet": "BadNet rare words (cf mn bb tq)", "clean": "Clean suspect (floor), rare-word ASR",
          "ep": "Embedding Poisoning (cf)", "insent": "InSent sentence"}  # fmt: skip


def _defense(group: str, key: str, config: str, label: str, trigger: list[str], *extra: str) -> Stage:
    suspect = {"badnet": "badnet/poisoned", "clean": "clean/suspect", "ep": "ep/poisoned", "insent": "insent/poisoned"}
    return Stage(f"{group}/{key}", f"finemixing/rt_minilm_{config}.yaml",
                 [f"--model.init_args.suspect={{artifact:{suspect[group]}}}", DATA_SEED, NO_VAL, *trigger, *extra],
                 GROUPS[group], label)  # fmt: skip


def _sweep_and_rule(group: str, trigger: list[str]) -> list[Stage]:
    return [
        _defense(group, "finetune", "finetune", "fine-tuning", trigger),
        *[_defense(group, f"rho{rho:g}", "finemixing", f"Fine-mixing, rho {rho:g}", trigger, FIXED,
                   f"--model.init_args.rho={rho}") for rho in SWEEP],  # fmt: skip
        _defense(group, "rule", "finemixing", "Fine-mixing, rho by the rule", trigger),
    ]


STAGES = [
    Stage("badnet/poisoned", "backdoor/rt_minilm_badnet.yaml", [DATA_SEED, TEST, SUSPECT_VAL], GROUPS["badnet"],
          "poisoned suspect"),
    *_sweep_and_rule("badnet", []),
    _defense("badnet", "rule_epur", "finemixing_epur", "E-PUR + Fine-mixing (rule)", []),
    Stage("clean/suspect", "backdoor/rt_minilm_badnet.yaml",
          [DATA_SEED, TEST, SUSPECT_VAL, "--data.init_args.poisoning.init_args.rate=0"],
          GROUPS["clean"], "clean suspect"),  # fmt: skip
    *_sweep_and_rule("clean", []),
    Stage("ep/poisoned", "finemixing/rt_minilm_embedding_poisoning.yaml",
          ["--model.init_args.victim={artifact:clean/suspect}", DATA_SEED, TEST], GROUPS["ep"], "EP suspect"),
    _defense("ep", "finetune", "finetune", "fine-tuning", CF),
    _defense("ep", "epur_alone", "epur", "E-PUR alone", CF, "--trainer.max_epochs=0"),
    _defense("ep", "epur", "epur", "E-PUR + fine-tuning", CF),
    _defense("ep", "rule", "finemixing", "Fine-mixing, rho by the rule", CF),
    _defense("ep", "rule_epur", "finemixing_epur", "E-PUR + Fine-mixing (rule)", CF),
    _defense("ep", "rho0.2", "finemixing", "Fine-mixing, rho 0.2", CF, FIXED, "--model.init_args.rho=0.2"),
    _defense("ep", "rho0.2_epur", "finemixing_epur", "E-PUR + Fine-mixing, rho 0.2", CF, FIXED, "--model.init_args.rho=0.2"),
    Stage("insent/poisoned", "backdoor/rt_minilm_badnet.yaml", [DATA_SEED, TEST, SUSPECT_VAL, INSENT], GROUPS["insent"],
          "poisoned suspect"),
    *_sweep_and_rule("insent", [INSENT]),
]


def eval_sizes(test_size: int = 1000, target_label: int = 1, dataset: str = "rotten-tomatoes") -> dict[str, int]:
    """Test inputs behind CA (the first ``test_size`` test snippets) and ASR (their non-target ones)."""
    from datamodules.sources import load_text_dataset

    labels = load_text_dataset(dataset).test_y[:test_size]
    return {"test/acc": len(labels), "test/asr": int((labels != target_label).sum())}


def standard_error(runs: list[dict], metric: str, sizes: dict[str, int]) -> tuple[float, float]:
    """``(mean, standard error)`` in %: the binomial SE over the ``sizes[metric]`` test inputs of each run, combined
    over seeds as the SE of their mean; with > 1 seed, the larger of that and the seeds' own SE (std / sqrt(seeds))."""
    values = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
    if not values:
        return float("nan"), float("nan")
    within = math.sqrt(sum(p * (1 - p) / sizes[metric] for p in values)) / len(values)
    between = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return 100 * statistics.fmean(values), 100 * max(within, between)


def chosen_rho(run: dict) -> float | None:
    """The rho a Fine-mixing run used (its artifact manifest's defense record)."""
    args = dict(a.split("=", 1) for a in run.get("args", []) if a.startswith("--") and "=" in a)
    manifest = Path(args.get("--trainer.default_root_dir", "")) / args.get("--run_name", "") / "artifact" / "manifest.json"
    if not manifest.exists():
        return None
    return json.loads(manifest.read_text()).get("defense", {}).get("rho")


def se_table(results: dict, sizes: dict[str, int]) -> str:
    lines = ["| group | condition | CA (%) | ASR (%) | rho chosen | seeds |", "|---|---|---|---|---|---|"]
    for stage in STAGES:
        runs = results.get(stage.key, [])
        if not runs:
            continue
        cells = []
        for metric in ("test/acc", "test/asr"):
            mean, se = standard_error(runs, metric, sizes)
            cells.append(f"{mean:.1f} ± {se:.1f}")
        rhos = [chosen_rho(r) for r in runs]
        rho = ", ".join(f"{v:g}" for v in rhos if v is not None) or "—"
        lines.append(f"| {stage.group} | {stage.label} | {cells[0]} | {cells[1]} | {rho} | {len(runs)} |")
    return "\n".join(lines)


def finemixing_plot(results: dict, path: Path) -> None:
    """ASR against CA: the fixed-rho sweep as one curve per suspect (points labelled with rho), fine-tuning (x), the
    rule (*) and the clean suspect's sweep (the floor, dashed); error bars: standard errors. Writes the SE table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    first = next(runs[0] for runs in results.values() if runs)
    test_size = next((int(a.split("=")[1]) for a in first.get("args", []) if a.startswith("--data.init_args.test_size=")), 1000)
    sizes = eval_sizes(test_size)
    atomic_write_text(path.with_name(path.stem + "-se.md"), se_table(results, sizes) + "\n")
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    for group, color in (("badnet", "C0"), ("insent", "C1"), ("clean", "0.4")):
        points = [(rho, results.get(f"{group}/rho{rho:g}", [])) for rho in SWEEP]
        points = [(rho, standard_error(runs, "test/acc", sizes), standard_error(runs, "test/asr", sizes))
                  for rho, runs in points if runs]  # fmt: skip
        if not points:
            continue
        xs, ys = [p[1][0] for p in points], [p[2][0] for p in points]
        ax.errorbar(xs, ys, xerr=[p[1][1] for p in points], yerr=[p[2][1] for p in points], color=color, marker="o",
                    ls="--" if group == "clean" else "-", capsize=2, label=f"{GROUPS[group]}: Fine-mixing, fixed rho")
        for rho, x, y in zip([p[0] for p in points], xs, ys):
            ax.annotate(f"{rho:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
        for key, marker, name in (("finetune", "x", "fine-tuning"), ("rule", "*", "rule")):
            runs = results.get(f"{group}/{key}", [])
            if runs:
                (x, dx), (y, dy) = standard_error(runs, "test/acc", sizes), standard_error(runs, "test/asr", sizes)
                ax.errorbar([x], [y], xerr=[dx], yerr=[dy], color=color, marker=marker, ms=10, ls="none", capsize=2,
                            label=f"{GROUPS[group]}: {name}")
    ax.set_xlabel("clean accuracy CA (%)")
    ax.set_ylabel("attack success rate ASR (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=6.5, loc="center left")
    ax.set_title("Fine-mixing on MiniLM-L6 (Rotten Tomatoes): ASR vs CA, 256 clean snippets", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


COMPARISONS["finemixing"] = Comparison(
    title="Fine-mixing and E-PUR against text backdoors in MiniLM-L6 (Rotten Tomatoes, first 1000 test snippets)",
    stages=STAGES,
    columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
    seeds=(0, 1, 2),
    notes="Suspects: MiniLM-L6 fully fine-tuned on 4000 Rotten Tomatoes snippets (1 epoch, batch 32, AdamW 5e-5), "
    "10% dirty-label poisoning with the rare words cf/mn/bb/tq (BadNet) or the sentence 'I watched this 3D movie.' "
    "(InSent), target positive; the clean suspect is the same run unpoisoned; the EP suspect is the clean suspect "
    "with only the embedding row of `cf` trained on poisoned snippets (3 epochs, SGD 5e-2, norm kept). Defenses "
    "start from the suspect artifact and the clean pretrained MiniLM-L6 and fine-tune on 256 clean snippets (4 "
    "epochs, batch 16, AdamW 5e-5). Fine-mixing keeps a random share rho of the fine-tuned entries (head kept); the "
    "rule tries rho in {0, 0.1, 0.2, 0.3, 0.5}, each mixed and fine-tuned with the full budget and scored on 1000 "
    "validation snippets, and takes the smallest within 3 points of the suspect's validation accuracy. E-PUR resets "
    "the 200 embedding rows with the largest ||E_ft - E_pre|| / log(max(f, 20)). CA: the 1000 clean test snippets; "
    "ASR: their triggered non-target snippets classified as the target. ± in the table: std over seeds; the "
    "standard errors over test inputs are in finemixing-se.md.",
    plot=finemixing_plot,
)
