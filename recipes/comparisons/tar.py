"""``python -m recipes.reproduce tar``: TAR against no safeguard, gradient-ascent unlearning and Random Mapping, each
followed by the whole tampering-attack harness (Tamirisa et al., ICLR 2025, arXiv 2408.00761, Table 1 in spirit).

Besides the summary table (``docs/results/tar.md``), the plot step writes every attack's row per safeguard to
``docs/results/tar-attacks.md`` and a bar chart of forget accuracy after each attack to ``docs/results/tar.png``.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from foundation.artifacts import atomic_write_text
from recipes.reproduce import COMPARISONS, Comparison, Stage

GROUP = "SmolLM2-135M, forget: capitals, retain: language + currency (top 4 blocks)"
SAFEGUARDS = {"none": "no safeguard", "gradient_ascent": "gradient ascent", "random_mapping": "Random Mapping",
              "tar": "TAR (from Random Mapping)", "rm_strong": "Random Mapping, lr 1e-3, weight 10",
              "tar_strong": "TAR (from the stronger RM)", "tar_long": "TAR, 200 outer steps, K = 16, strong adversaries",
              "tar_long_norep": "the same TAR without the representation term"}  # fmt: skip
STRONG_RM = ["--model.init_args.optimizer.init_args.lr=1e-3", "--model.init_args.mapping_weight=10"]
# A longer TAR run whose training adversaries span the harness's learning-rate range (1e-4 to 1e-3, AdamW and SGD,
# retain-then-forget); K = 16 inner steps with TR every 4 (4 evaluations, as the official subsample), 200 outer steps.
LONG_ADVERSARIES = (
    "[{name: adamw_lr1e-4, optimizer: adamw, lr: 1.0e-4, steps: 16},"
    " {name: adamw_lr3e-4, optimizer: adamw, lr: 3.0e-4, steps: 16},"
    " {name: adamw_lr1e-3, optimizer: adamw, lr: 1.0e-3, steps: 16},"
    " {name: sgd_lr1e-2, optimizer: sgd, lr: 1.0e-2, steps: 16},"
    " {name: switch_lr3e-4, optimizer: adamw, lr: 3.0e-4, steps: 16, data: retain_then_forget}]"
)
LONG_TAR = ["--trainer.max_steps=200", "--trainer.val_check_interval=200", "--model.init_args.tr_every=4",
            f"--model.init_args.adversaries={LONG_ADVERSARIES}"]


def _attack_rows(runs: list[dict]) -> dict[str, dict[str, float]]:
    """Per attack, the mean over seeds of its forget/retain accuracy (from the runs' ``tamper/...`` metrics)."""
    rows: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        for key, value in run["metrics"].items():
            parts = key.split("/")
            if len(parts) == 3 and parts[0] == "tamper":
                rows.setdefault(parts[1], {}).setdefault(parts[2], []).append(value)
    return {name: {k: statistics.fmean(v) for k, v in m.items()} for name, m in rows.items()}


def tar_report(results: dict, path: Path) -> None:
    """Per-attack markdown table (``<stem>-attacks.md``) and bars of forget accuracy after each attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    per = {key: _attack_rows(results.get(key, [])) for key in SAFEGUARDS}
    attacks = list(dict.fromkeys(a for rows in per.values() for a in rows))
    head = "| attack | " + " | ".join(f"{SAFEGUARDS[k]}: forget / retain (%)" for k in SAFEGUARDS) + " |"
    lines = [head, "|---|" + "---|" * len(SAFEGUARDS)]

    def cell(key: str, metrics: dict | None) -> str:
        return "—" if not metrics else f"{100 * metrics['forget_acc']:.1f} / {100 * metrics['retain_acc']:.1f}"

    before = {k: {"forget_acc": statistics.fmean(r["metrics"]["test/forget_acc"] for r in results[k]),
                  "retain_acc": statistics.fmean(r["metrics"]["test/retain_acc"] for r in results[k])}
              for k in SAFEGUARDS if results.get(k)}  # fmt: skip
    lines.append("| before attack | " + " | ".join(cell(k, before.get(k)) for k in SAFEGUARDS) + " |")
    for a in attacks:
        lines.append(f"| {a} | " + " | ".join(cell(k, per[k].get(a)) for k in SAFEGUARDS) + " |")
    settings = {}
    for runs in results.values():
        for run in runs:
            tamper = Path(run.get("log_dir", "")) / "tamper.json"
            if tamper.exists():
                settings.update({r["attack"]: r["settings"] for r in json.loads(tamper.read_text())})
    doc = "# TAR: forget / retain accuracy after every attack of the harness\n\n" + "\n".join(lines)
    doc += "\n\nChance is 25% (4 options). Attack settings:\n\n```\n" + json.dumps(settings, indent=1) + "\n```\n"
    atomic_write_text(path.with_name(path.stem + "-attacks.md"), doc)

    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(SAFEGUARDS)
    labels = ["before", *attacks]
    for j, key in enumerate(SAFEGUARDS):
        vals = [100 * (before.get(key, {}).get("forget_acc", float("nan")))]
        vals += [100 * per[key].get(a, {}).get("forget_acc", float("nan")) for a in attacks]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=SAFEGUARDS[key])
    ax.axhline(25, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks([i + width * (len(SAFEGUARDS) - 1) / 2 for i in range(len(labels))], labels, rotation=25,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("forget accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below the axes, off the bars
    ax.set_title("Forget (capital) MCQ accuracy before and after each tampering attack", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


COMPARISONS["tar"] = Comparison(
    title="Tamper-resistant unlearning of country capitals in SmolLM2-135M: TAR vs baselines under 8 attacks",
    stages=[
        Stage("none", "tar/smollm2_none.yaml", ["--data.init_args.seed={seed}"], GROUP, SAFEGUARDS["none"]),
        Stage("gradient_ascent", "tar/smollm2_gradient_ascent.yaml", ["--data.init_args.seed={seed}"], GROUP,
              SAFEGUARDS["gradient_ascent"]),
        Stage("random_mapping", "tar/smollm2_random_mapping.yaml", ["--data.init_args.seed={seed}"], GROUP,
              SAFEGUARDS["random_mapping"]),
        Stage("tar", "tar/smollm2_tar.yaml",
              ["--data.init_args.seed={seed}", "--model.init_args.init_from={artifact:random_mapping}"], GROUP,
              SAFEGUARDS["tar"]),
        # a stronger Random Mapping (the config's lr 1e-4 left the mapping loss at its start), and TAR from it
        Stage("rm_strong", "tar/smollm2_random_mapping.yaml",
              ["--data.init_args.seed={seed}", *STRONG_RM], GROUP, SAFEGUARDS["rm_strong"]),
        Stage("tar_strong", "tar/smollm2_tar.yaml",
              ["--data.init_args.seed={seed}", "--model.init_args.init_from={artifact:rm_strong}"], GROUP,
              SAFEGUARDS["tar_strong"]),
        Stage("tar_long", "tar/smollm2_tar.yaml",
              ["--data.init_args.seed={seed}", "--model.init_args.init_from={artifact:rm_strong}", *LONG_TAR], GROUP,
              SAFEGUARDS["tar_long"]),
        # ablation: the representation term pulls the retain features back to the undefended model's
        Stage("tar_long_norep", "tar/smollm2_tar.yaml",
              ["--data.init_args.seed={seed}", "--model.init_args.init_from={artifact:rm_strong}", *LONG_TAR,
               "--model.init_args.representation_weight=0"], GROUP, SAFEGUARDS["tar_long_norep"]),
    ],
    columns={"test/forget_acc": "forget acc before (%)", "test/retain_acc": "retain acc before (%)",
             "tamper/mean_forget_acc": "forget acc after, mean over attacks (%)",
             "tamper/max_forget_acc": "forget acc after, worst attack (%)",
             "tamper/mean_retain_acc": "retain acc after, mean (%)"},
    seeds=(0, 1),
    notes="Forget: 40 cloze multiple-choice questions (4 options, chance 25%) on the capitals of the 40 most populous "
    "countries; retain: 60 questions on official languages and currencies. The defender trains on the capitals of 60 "
    "other countries (TAR's held-out TR set: 30 more); every attack fine-tunes a fresh copy on the capitals of 40 "
    "further countries (answer tokens), so no evaluated fact is ever trained on. Only the top 4 of 30 blocks are "
    "trained and attacked (configs/tar/attacks/all_layers.yaml, an attacker of every weight, was not run for lack of CPU time). rm_strong: Random Mapping with lr 1e-3 and mapping weight 10 (the config: 1e-4, 1). The TAR rows run 30 outer steps with K = 8 against "
    "AdamW adversaries at lr 3e-5/1e-4 (the config), or 200 outer steps with K = 16 (TR every 4) against AdamW at "
    "lr 1e-4/3e-4/1e-3, SGD at 1e-2 and a retain-then-forget AdamW at 3e-4 (LONG_ADVERSARIES), with and without the "
    "representation term. Every attack's row: tar-attacks.md.",
    plot=tar_report,
)
