"""``python -m recipes.reproduce tar``: TAR against no safeguard, gradient-ascent unlearning, Random Mapping and the
floor control (the trained blocks randomly re-initialised), each followed by the whole tampering-attack harness
(Tamirisa et al., ICLR 2025, arXiv 2408.00761, Table 1 in spirit), plus the ablations that locate where tamper
resistance is lost.

The design (issue 28): SmolLM2-135M with its top 12 of 30 blocks trained and attacked, a retain corpus unrelated to
the forget facts (Rotten Tomatoes snippets; the language/currency facts are the retain evaluation only), the official
Random-Mapping warm start (schedule-free AdamW, lr 2e-5, 750 steps of 16 sentences, every hidden state), and TAR as
official (schedule-free AdamW lr 2e-5 with 32 warm-up steps, 750 outer steps, TR entropy over every token, one
adversary per outer step drawn as data type x learning rate) except K = 24 inner steps (official 64), with training
adversaries that span the harness's optimizers and learning rates. Ablations, each from the same Random Mapping
artifact: the TR entropy and the adversaries' loss over answer tokens only (``ablation/answer_tokens``), no
representation term (``ablation/no_representation``), the weak adversaries of the first reproduction
(``ablation/weak_adversaries``), the first reproduction's Random Mapping that did forget, on this span
(``ablation/strong_random_mapping``: AdamW 1e-3, mapping weight 10, 40 steps; the official warm start leaves the
mapping loss where it started here), and floor, Random Mapping and TAR at the first reproduction's depth, the top 4
blocks (``top4/...``). ``--only none floor gradient_ascent random_mapping tar`` runs the main comparison alone,
``--only ablation`` or ``--only top4`` the rest (the TAR ablations read the ``random_mapping`` stage's artifact).

Besides the summary table (``docs/results/tar.md``), the plot step writes every attack's row per safeguard to
``docs/results/tar-attacks.md``, a bar chart of forget accuracy after each attack to ``docs/results/tar.png``, and
for every run that trained against adversaries, how each kind of training adversary fared along the outer steps
(``tar-adversaries.md``/``.png``, from the run's ``metrics.csv``): where tamper resistance holds during training.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

from foundation.artifacts import atomic_write_text
from recipes.reproduce import COMPARISONS, Comparison, Stage

GROUP = "SmolLM2-135M, forget: capitals, retain corpus: Rotten Tomatoes, top 12 of 30 blocks trained and attacked"
GROUP_TOP4 = "the same, top 4 blocks (the first reproduction's depth)"
SAFEGUARDS = {"none": "no safeguard", "floor": "floor: trained blocks re-initialised (no training)",
              "gradient_ascent": "gradient ascent", "random_mapping": "Random Mapping (official warm start)",
              "tar": "TAR (from Random Mapping; official but K = 24)",
              "ablation/answer_tokens": "TAR, TR entropy and adversary loss on answer tokens only",
              "ablation/no_representation": "TAR without the representation term",
              "ablation/weak_adversaries": "TAR against the first design's adversaries (AdamW 3e-5 / 1e-4, K = 8)",
              "ablation/strong_random_mapping": "Random Mapping as the first reproduction's rm_strong (AdamW 1e-3, "
                                                "weight 10, 40 steps)",
              "top4/floor": "floor, top 4 blocks", "top4/random_mapping": "Random Mapping, top 4 blocks",
              "top4/tar": "TAR, top 4 blocks"}  # fmt: skip
SEED = "--data.init_args.seed={seed}"
FROM_RM = "--model.init_args.init_from={artifact:random_mapping}"
# the training adversaries of smollm2_tar.yaml with answer-token losses (the space must be given whole: a partial
# override of one field would replace the others by their defaults)
ANSWER_SPACE = ("--model.init_args.adversary_space={learning_rates: {adamw: [1.0e-5, 1.0e-4, 1.0e-3], adam: [3.0e-4],"
                " sgd: [1.0e-2]}, data: {forget: 2.0, retain_then_forget: 1.0}, steps: 24, batch_size: 8,"
                " completion_only: true}")  # fmt: skip
# the first reproduction's training adversaries (K = 8, AdamW 3e-5 / 1e-4), with the design's every-token loss
WEAK = ["--model.init_args.adversary_space=null",
        "--model.init_args.adversaries=[{name: adamw_lr3e-5, optimizer: adamw, lr: 3.0e-5, steps: 8,"
        " completion_only: false}, {name: adamw_lr1e-4, optimizer: adamw, lr: 1.0e-4, steps: 8,"
        " completion_only: false}, {name: switch_lr1e-4, optimizer: adamw, lr: 1.0e-4, steps: 8,"
        " data: retain_then_forget, completion_only: false}]"]  # fmt: skip
TOP4 = "--model.init_args.model.init_args.trainable_layers=4"
# the first reproduction's rm_strong (AdamW lr 1e-3, mapping weight 10, 40 steps): a Random Mapping that forgets there
STRONG_RM = ["--model.init_args.optimizer={class_path: torch.optim.AdamW, init_args: {lr: 1.0e-3}}",
             "--model.init_args.mapping_weight=10", "--trainer.max_steps=40", "--trainer.val_check_interval=40"]


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

    keys = [k for k in SAFEGUARDS if results.get(k)]
    per = {key: _attack_rows(results.get(key, [])) for key in keys}
    attacks = list(dict.fromkeys(a for rows in per.values() for a in rows))
    head = "| attack | " + " | ".join(f"{SAFEGUARDS[k]}: forget / retain (%)" for k in keys) + " |"
    lines = [head, "|---|" + "---|" * len(keys)]

    def cell(metrics: dict | None) -> str:
        return "—" if not metrics else f"{100 * metrics['forget_acc']:.1f} / {100 * metrics['retain_acc']:.1f}"

    before = {k: {"forget_acc": statistics.fmean(r["metrics"]["test/forget_acc"] for r in results[k]),
                  "retain_acc": statistics.fmean(r["metrics"]["test/retain_acc"] for r in results[k])}
              for k in keys}  # fmt: skip
    lines.append("| before attack | " + " | ".join(cell(before.get(k)) for k in keys) + " |")
    for a in attacks:
        lines.append(f"| {a} | " + " | ".join(cell(per[k].get(a)) for k in keys) + " |")
    settings = {}
    for runs in results.values():
        for run in runs:
            tamper = Path(run.get("log_dir", "")) / "tamper.json"
            if tamper.exists():
                settings.update({r["attack"]: r["settings"] for r in json.loads(tamper.read_text())})
    doc = "# TAR: forget / retain accuracy after every attack of the harness\n\n" + "\n".join(lines)
    doc += ("\n\nChance is 25% (4 options). The floor rows are the trained blocks re-initialised and attacked: no "
            "safeguard of the same span can be expected to end below them. Attack settings:\n\n```\n"
            + json.dumps(settings, indent=1) + "\n```\n")  # fmt: skip
    atomic_write_text(path.with_name(path.stem + "-attacks.md"), doc)

    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / max(len(keys), 1)
    labels = ["before", *attacks]
    for j, key in enumerate(keys):
        vals = [100 * (before.get(key, {}).get("forget_acc", float("nan")))]
        vals += [100 * per[key].get(a, {}).get("forget_acc", float("nan")) for a in attacks]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=SAFEGUARDS[key])
    ax.axhline(25, color="k", ls="--", lw=1, label="chance")
    ax.set_xticks([i + width * (len(keys) - 1) / 2 for i in range(len(labels))], labels, rotation=25,
                  ha="right", fontsize=7)  # fmt: skip
    ax.set_ylabel("forget accuracy (%)")
    ax.set_ylim(0, 105)
    ax.legend(fontsize=7, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.3))  # below the axes, off the bars
    ax.set_title("Forget (capital) MCQ accuracy before and after each tampering attack", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    adversary_report(results, path)


def adversary_rows(metrics_csv: Path) -> list[tuple[int, float, str, float]]:
    """``(outer step, learning rate, data, loss)`` of every logged training adversary in a run's ``metrics.csv``:
    the adversary's loss on its last inner batch, after K - 1 of its K updates (``train/adversary_loss``; high: the
    safeguard held against it). Data is ``retain->forget`` when the adversary took retain steps first."""
    with open(metrics_csv, newline="") as f:
        return [(int(r["step"]), float(r["train/adversary_lr"]),
                 "retain->forget" if float(r.get("train/adversary_retain_steps") or 0) > 0 else "forget",
                 float(r["train/adversary_loss"]))
                for r in csv.DictReader(f)
                if r.get("train/adversary_lr") and r.get("train/adversary_loss")]  # fmt: skip


def adversary_outcomes(
    rows: list[tuple[int, float, str, float]], window: int = 125
) -> dict[tuple[float, str], dict[int, list[float]]]:
    """:func:`adversary_rows` grouped per (learning rate, data) by window of outer steps:
    ``{(lr, data): {window index: [losses]}}``."""
    out: dict[tuple[float, str], dict[int, list[float]]] = {}
    for step, lr, data, loss in rows:
        out.setdefault((lr, data), {}).setdefault(step // window, []).append(loss)
    return out


def adversary_table(outcomes: dict[tuple[float, str], dict[int, list[float]]], window: int = 125) -> str:
    """Markdown: one row per training adversary, one column per window of outer steps, mean ± SE (n) of its loss."""
    cols = sorted({w for by in outcomes.values() for w in by})
    lines = ["| adversary lr | data | " + " | ".join(f"steps {w * window}-{(w + 1) * window - 1}" for w in cols) + " |",
             "|---|---|" + "---|" * len(cols)]  # fmt: skip
    for (lr, data), by in sorted(outcomes.items()):
        cells = []
        for w in cols:
            v = by.get(w, [])
            se = statistics.stdev(v) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
            cells.append(f"{statistics.fmean(v):.2f} ± {se:.2f} ({len(v)})" if v else "—")
        lines.append(f"| {lr:g} | {data} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adversary_report(results: dict, path: Path) -> None:
    """``<stem>-adversaries.md`` and ``.png``: every TAR run's training adversaries along its outer steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    runs = [(key, run) for key in SAFEGUARDS for run in results.get(key, [])
            if (Path(run.get("log_dir", "")) / "metrics.csv").exists()]  # fmt: skip
    found = [(key, run, adversary_rows(Path(run["log_dir"]) / "metrics.csv")) for key, run in runs]
    found = [(key, run, rows) for key, run, rows in found if rows]
    if not found:
        return
    doc = ["# TAR's training adversaries: the adversary's loss after its inner steps, by outer step\n",
           "Cross-entropy of the adversary's last inner batch after K - 1 of its K updates, on the outer steps the "
           "run logged (`log_every_n_steps`: every 5th in configs/tar/smollm2_tar.yaml); high: the safeguard held "
           "against that adversary. Mean ± standard error (number of logged outer steps)."]
    fig, axes = plt.subplots(1, len(found), figsize=(6 * len(found), 4), squeeze=False)
    for ax, (key, run, rows) in zip(axes[0], found):
        doc += [f"\n## {SAFEGUARDS[key]}, seed {run.get('seed', '?')}\n", adversary_table(adversary_outcomes(rows))]
        for lr in sorted({r[1] for r in rows}):
            ax.scatter(*zip(*[(step, loss) for step, r_lr, _, loss in rows if r_lr == lr]), s=10, label=f"lr {lr:g}")
        ax.set_xlabel("outer step")
        ax.set_ylabel("adversary loss after its inner steps")
        ax.set_title(f"{SAFEGUARDS[key]}, seed {run.get('seed', '?')}", fontsize=8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path.with_name(path.stem + "-adversaries.png"))
    atomic_write_text(path.with_name(path.stem + "-adversaries.md"), "\n".join(doc) + "\n")


def _stage(key: str, config: str, *overrides: str, group: str = GROUP) -> Stage:
    return Stage(key, f"tar/{config}.yaml", [SEED, *overrides], group, SAFEGUARDS[key])


COMPARISONS["tar"] = Comparison(
    title="Tamper-resistant unlearning of country capitals in SmolLM2-135M: TAR vs baselines and the floor, 8 attacks",
    stages=[
        _stage("none", "smollm2_none"),
        _stage("floor", "smollm2_floor"),
        _stage("gradient_ascent", "smollm2_gradient_ascent"),
        _stage("random_mapping", "smollm2_random_mapping"),
        _stage("tar", "smollm2_tar", FROM_RM),
        # ablations: where is tamper resistance lost? (each from the same Random Mapping artifact)
        _stage("ablation/answer_tokens", "smollm2_tar", FROM_RM, "--model.init_args.tr_tokens=answer", ANSWER_SPACE),
        _stage("ablation/no_representation", "smollm2_tar", FROM_RM, "--model.init_args.representation_weight=0"),
        _stage("ablation/weak_adversaries", "smollm2_tar", FROM_RM, *WEAK),
        _stage("ablation/strong_random_mapping", "smollm2_random_mapping", *STRONG_RM),
        # the first reproduction's depth: a floor that one attack already lifts to ~50%
        _stage("top4/floor", "smollm2_floor", TOP4, group=GROUP_TOP4),
        _stage("top4/random_mapping", "smollm2_random_mapping", TOP4, group=GROUP_TOP4),
        _stage("top4/tar", "smollm2_tar", TOP4, "--model.init_args.init_from={artifact:top4/random_mapping}",
               group=GROUP_TOP4),
    ],
    columns={"test/forget_acc": "forget acc before (%)", "test/retain_acc": "retain acc before (%)",
             "tamper/mean_forget_acc": "forget acc after, mean over attacks (%)",
             "tamper/max_forget_acc": "forget acc after, worst attack (%)",
             "tamper/mean_retain_acc": "retain acc after, mean (%)"},
    seeds=(0, 1),
    notes="Forget: 40 cloze multiple-choice questions (4 options, chance 25%) on the capitals of the 40 most populous "
    "countries; retain: 60 questions on official languages and currencies, never trained on (the retain corpus is "
    "2,000 Rotten Tomatoes snippets). The defender trains on the capitals of 60 other countries (TAR's held-out TR "
    "set: 30 more); every attack fine-tunes a fresh copy on the capitals of 40 further countries (answer tokens), so "
    "no evaluated fact is ever trained on. The top 12 of 30 blocks (+ final norm) are trained and attacked; the floor "
    "re-initialises exactly those and trains nothing. Random Mapping: schedule-free AdamW lr 2e-5 (50 warm-up steps), "
    "750 steps of 16 sentences, every hidden state (official settings). TAR: 750 outer steps, schedule-free AdamW lr "
    "2e-5 (32 warm-up steps), K = 24 (official 64), TR every 4, lambda 0.0625, TR scale 4, representation term, "
    "entropy over every token; one adversary per outer step: forget (2/3) or retain-then-forget (1/3) x AdamW "
    "1e-5 / 1e-4 / 1e-3, Adam 3e-4 or SGD 1e-2, every token of the sentence in its loss, batch 8. TAR's ablations "
    "start from the same Random Mapping; ablation/strong_random_mapping is the first reproduction's rm_strong (AdamW "
    "lr 1e-3, mapping weight 10, 40 steps) on this span; top4/* repeat floor, Random Mapping and TAR with the top 4 "
    "blocks. Every attack's row: tar-attacks.md.",
    plot=tar_report,
)
