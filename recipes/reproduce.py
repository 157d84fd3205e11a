"""``python -m recipes.reproduce <name>``: run one paper's headline comparison and write its table and plot.

A comparison is a list of stages; each stage is one config run through the same CLI code as
``python -m recipes fit`` (then tested on the test split), for several seeds. Stages may consume earlier
stages' artifacts through ``{artifact:<stage key>}`` in their overrides. Finished runs are cached in
``<root>/<stage>/seed<k>/result.json``, so an interrupted reproduction resumes where it stopped
(``--force`` reruns). The table (mean ± std over seeds) goes to ``docs/results/<name>.md``, the plot to
``docs/results/<name>.png``, and the table is printed.

Method issues add their own entry to :data:`COMPARISONS`, here or in a module of ``recipes/comparisons/``
(imported on first use by :func:`load_comparisons`; it registers with ``COMPARISONS["name"] = Comparison(...)``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from recipes.artifacts import atomic_write_text


@dataclass
class Stage:
    """One run of a comparison.

    Args:
        key: unique name, also the run directory (``<root>/<key>/seed<k>``), e.g. ``mnist/poisoned``.
        config: config path relative to the config root (``configs/`` or ``tests/configs/`` with ``--tiny``).
        overrides: extra CLI arguments; ``{seed}`` and ``{artifact:<key>}`` are substituted.
        group: table group (e.g. the dataset); label: the row's condition (e.g. ``poisoned``).
    """

    key: str
    config: str
    overrides: list[str] = field(default_factory=list)
    group: str = ""
    label: str = ""


@dataclass
class Comparison:
    """A named comparison: its stages, the metrics shown (metric key -> column title) and the default seeds."""

    title: str
    stages: list[Stage]
    columns: dict[str, str]
    seeds: tuple[int, ...] = (0, 1, 2)
    notes: str = ""
    plot: Callable[[dict, Path], None] | None = None
    plain: tuple[str, ...] = ()  # metric keys shown as numbers, not percentages (e.g. a lifespan in rounds)


def _substitute(arg: str, seed: int, root: Path) -> str:
    arg = arg.replace("{seed}", str(seed))
    while "{artifact:" in arg:
        start = arg.index("{artifact:")
        stop = arg.index("}", start)
        key = arg[start + len("{artifact:") : stop]
        arg = arg[:start] + str(root / key / f"seed{seed}" / "artifact") + arg[stop + 1 :]
    return arg


def run_stage(stage: Stage, seed: int, root: Path, config_root: Path, force: bool = False) -> dict:
    """Run (or load the cached result of) one stage for one seed; return ``{"metrics": ..., "seconds": ...}``."""
    from recipes.cli import main

    run_dir = root / stage.key / f"seed{seed}"
    result_file = run_dir / "result.json"
    if result_file.exists() and not force:
        return json.loads(result_file.read_text())
    args = [
        "fit",
        f"--config={config_root / stage.config}",
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={root / stage.key}",
        f"--run_name=seed{seed}",
        *[_substitute(a, seed, root) for a in stage.overrides],
    ]
    start = time.perf_counter()
    cli = main(args)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    seconds = time.perf_counter() - start
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    log_dir = Path(cli.trainer.log_dir or run_dir)
    if (log_dir / "curves.json").exists():  # federated runs: peak BA, lifespan, ... (callbacks.RoundCurves)
        summary = json.loads((log_dir / "curves.json").read_text()).get("summary", {})
        metrics.update({f"curve/{k}": v for k, v in summary.items()})
    result = {"stage": stage.key, "seed": seed, "metrics": metrics, "seconds": seconds, "args": args,
              "log_dir": str(log_dir)}  # fmt: skip
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(result_file, json.dumps(result, indent=2))
    return result


def _fmt(values: list[float], percent: bool = True) -> str:
    scale = 100.0 if percent else 1.0
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def summarize(comp: Comparison, results: dict[str, list[dict]]) -> str:
    """Markdown table: one row per stage, mean ± std over seeds of each metric (in %), and wall time."""
    head = ["group", "condition", *comp.columns.values(), "seeds", "time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for stage in comp.stages:
        runs = results.get(stage.key, [])
        cells = [_fmt([r["metrics"][m] for r in runs if m in r["metrics"]], m not in comp.plain) for m in comp.columns]
        secs = statistics.fmean(r["seconds"] for r in runs) if runs else 0.0
        lines.append(
            f"| {stage.group} | {stage.label or stage.key} | " + " | ".join(cells) + f" | {len(runs)} | {secs:.0f} s |"
        )
    return "\n".join(lines)


def bar_plot(comp: Comparison, results: dict[str, list[dict]], path: Path) -> None:
    """Grouped horizontal bars of each metric per stage (one panel per group, stacked; stage labels on the y axis,
    so long labels stay readable), with the seeds' standard deviation as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    groups = list(dict.fromkeys(s.group for s in comp.stages))
    counts = [sum(s.group == g for s in comp.stages) for g in groups]
    per_bar = 0.22 * max(len(comp.columns), 1)
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 0.9 + sum(0.5 + per_bar * n for n in counts)),
                             gridspec_kw={"height_ratios": [0.5 + per_bar * n for n in counts]}, squeeze=False)  # fmt: skip
    for ax, group in zip(axes[:, 0], groups):
        stages = [s for s in comp.stages if s.group == group]
        height = 0.8 / max(len(comp.columns), 1)
        for j, (metric, title) in enumerate(comp.columns.items()):
            vals = [[r["metrics"].get(metric, float("nan")) * 100 for r in results.get(s.key, [])] for s in stages]
            means = [statistics.fmean(v) if v else 0.0 for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ys = [i + j * height for i in range(len(stages))]
            ax.barh(ys, means, height, xerr=errs, capsize=3, label=title)
        ax.set_yticks([i + height * (len(comp.columns) - 1) / 2 for i in range(len(stages))])
        ax.set_yticklabels([s.label or s.key for s in stages], fontsize=8)
        ax.invert_yaxis()  # stages top to bottom in comparison order
        ax.set_xlim(0, 105)
        ax.set_xlabel("%")
        ax.set_title(group, fontsize=9)
    fig.suptitle(comp.title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="upper right", ncol=len(comp.columns), fontsize=7,
               frameon=False, bbox_to_anchor=(1.0, 0.975))  # fmt: skip
    save_figure(fig, path)


def mean_curves(runs: list[dict]) -> dict | None:
    """Average the ``curves.json`` records (written by ``callbacks.RoundCurves``) of one stage's seeds."""
    records = [json.loads((Path(r["log_dir"]) / "curves.json").read_text()) for r in runs
               if "log_dir" in r and (Path(r["log_dir"]) / "curves.json").exists()]  # fmt: skip
    if not records:
        return None
    rounds = records[0]["rounds"]
    records = [rec for rec in records if rec["rounds"] == rounds]

    def avg(key: str) -> list:
        cols = list(zip(*[rec[key] for rec in records]))
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


def _fl_stages(dataset: str, group: str, config: str, attacks: dict[str, str], defenses: dict[str, str]) -> list[Stage]:
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


_FL_COLUMNS = {"test/acc": "final MA (%)", "curve/ba_attack_end": "BA at attack end (%)",
               "curve/ba_peak": "peak BA (%)", "test/asr": "final BA (%)", "curve/lifespan": "lifespan (rounds)"}


COMPARISONS: dict[str, Comparison] = {
    "backdoor": Comparison(
        title="BadNets backdoors: clean vs poisoned training (test split)",
        stages=[
            Stage("mnist/clean", "backdoor/mnist_badnets.yaml",
                  ["--data.init_args.poisoning.init_args.rate=0.0", "--data.init_args.seed={seed}"], "MNIST, CNN, pixel pattern", "clean"),
            Stage("mnist/poisoned", "backdoor/mnist_badnets.yaml",
                  ["--data.init_args.seed={seed}"], "MNIST, CNN, pixel pattern", "poisoned 10%"),
            Stage("rt/clean", "backdoor/rt_minilm_badnet.yaml",
                  ["--data.init_args.poisoning.init_args.rate=0.0", "--data.init_args.seed={seed}"], "Rotten Tomatoes, MiniLM-L6, rare word", "clean"),
            Stage("rt/poisoned", "backdoor/rt_minilm_badnet.yaml",
                  ["--data.init_args.seed={seed}"], "Rotten Tomatoes, MiniLM-L6, rare word", "poisoned 10%"),
        ],
        columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
        seeds=(0, 1, 2),
        notes="CA: accuracy on the clean test split. ASR: share of triggered non-target test inputs classified "
        "as the target. A clean model's ASR is the trigger's baseline rate.",
    ),
}


COMPARISONS["fl"] = Comparison(
    title="Federated backdoor on MNIST: a naive attacker against FedAvg and robust aggregators",
    stages=[
        *_fl_stages("mnist", "MNIST, 100 clients, Dirichlet 0.5, 10/round", "fl/mnist_fedavg_naive.yaml",
                    {"no attack": "none"}, {"FedAvg": "fedavg"}),
        *_fl_stages("mnist", "MNIST, 100 clients, Dirichlet 0.5, 10/round", "fl/mnist_fedavg_naive.yaml",
                    {"naive": ""}, {"FedAvg": "fedavg", "norm clip": "normclip", "Multi-Krum": "multikrum",
                                    "FLAME": "flame", "median": "median"}),
    ],
    columns=_FL_COLUMNS,
    seeds=(0, 1),
    plain=("curve/lifespan",),
    notes="60 rounds; client 0 attacks in rounds 30-39 (every round, half of each local batch triggered and "
    "relabelled to 0, 2 local epochs). MA: accuracy of the global model on the clean MNIST test set; BA: share of "
    "triggered non-target test digits classified as 0, evaluated every 5 rounds. Lifespan: rounds after the "
    "attack window until BA < 50% (if it never falls below, the rounds observed, a lower bound). 'no attack' "
    "shows the trigger's base rate.",
    plot=None,
)
COMPARISONS["fl"].plot = lambda results, path: curves_plot(COMPARISONS["fl"], results, path, 0.5)


def fl_warmup_stage(dataset: str, data: list[str], rounds: int, group: str, label: str = "clean warm-up") -> Stage:
    """The clean warm-up (norm clipping, no attack, ``rounds`` rounds) that the chameleon and trojandam comparisons'
    attack runs start from, as ``{artifact:<dataset>/warmup}``."""
    return Stage(f"{dataset}/warmup", "chameleon/mnist_normclip.yaml",
                 ["--config=configs/fl/attacks/none.yaml", f"--trainer.max_steps={rounds}", *data], group, label)


def _chameleon_stages(dataset: str, name: str, warmup_rounds: int, partition_seed: int = 0) -> list[Stage]:
    """A clean warm-up (cached artifact), then the same attack window for each attack, warm-started from it.

    The federation (training subset, Dirichlet partition, client test splits) is drawn with ``partition_seed`` for
    every run seed, so the attacker (client 0) holds the same data in all of them; the run seed varies the model
    initialisation, the client sampling and the SGD noise. Tying the partition to the run seed gave the attacker
    178 MNIST images under seed 1 (1,042 under seed 0), and no attack landed at all."""
    cfg, group = "chameleon/mnist_normclip.yaml", f"{name}, norm clipping (M = 1)"
    data = [f"--data.init_args.dataset={dataset}", f"--data.init_args.seed={partition_seed}"]
    warm = f"--model.init_args.init_from={{artifact:{dataset}/warmup}}"
    stages = [fl_warmup_stage(dataset, data, warmup_rounds, group),
              Stage(f"{dataset}/clean", cfg, ["--config=configs/fl/attacks/none.yaml", warm, *data], group, "no attack")]
    rate = "--model.init_args.attack.init_args.poison_fraction=0.109375"  # 7 of 64, as Chameleon (official)
    for attack in ("naive", "pgd", "neurotoxin"):
        stages.append(Stage(f"{dataset}/{attack}", cfg, [f"--config=configs/fl/attacks/{attack}.yaml", rate, warm,
                                                         *data], group, attack))  # fmt: skip
    stages.append(Stage(f"{dataset}/chameleon", cfg, [warm, *data], group, "chameleon"))
    return stages


COMPARISONS["chameleon"] = Comparison(
    title="Chameleon vs. baseline attacks: backdoor lifespan after the attacker leaves (norm-clipping server)",
    stages=[*_chameleon_stages("mnist", "MNIST", 60), *_chameleon_stages("fashion-mnist", "Fashion-MNIST", 60)],
    columns={**_FL_COLUMNS, "curve/ba_mean_after": "mean BA after attack (%)"},
    seeds=(0, 1),
    plain=("curve/lifespan",),
    notes="configs/chameleon/mnist_normclip.yaml: 100 clients, Dirichlet 0.5 (the same partition, data seed 0, for "
    "every run seed; the run seed draws the initialisation, client sampling and SGD noise), 10 per round, FedAvg with norm "
    "clipping at M = 1, server lr 1. Each attack run starts from the same clean warm-up (60 rounds, its own row), "
    "client 0 attacks in rounds 0-19 (every round), then 40 benign rounds. Baselines: naive poisoning (2 epochs), PGD "
    "(radius 1) and Neurotoxin (keep 99%, radius 1), at the clipping bound like Chameleon and, as in the official "
    "code, with 7 of every 64 samples poisoned. "
    "Lifespan: rounds after the window until BA < 50%, evaluated every 2 rounds on 5,000 test images (a lower bound "
    "when BA never falls below). 'no attack' is the clean continuation (its BA is the trigger's base rate).",
)
COMPARISONS["chameleon"].plot = lambda results, path: curves_plot(COMPARISONS["chameleon"], results, path, 0.5)


def finemixing_plot(results: dict, path: Path) -> None:
    """Fine-mixing comparison: CA and ASR per defense and clean-set size, one column per trigger; dashed line:
    the poisoned model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    triggers = {"badnet": "BadNet (rare word)", "insent": "InSent (sentence)"}
    methods = {"finetune": "FT", "epur": "E-PUR+FT", "finemixing": "FM", "finemixing_epur": "FM+E-PUR"}
    sizes = sorted({int(k.split("/")[1][1:]) for k in results if k.count("/") == 2})
    width = 0.8 / max(len(sizes), 1)

    def mean(key: str, metric: str) -> float:
        runs = [r["metrics"][metric] * 100 for r in results.get(key, []) if metric in r["metrics"]]
        return statistics.fmean(runs) if runs else float("nan")

    fig, axes = plt.subplots(2, len(triggers), figsize=(5 * len(triggers), 6), squeeze=False)
    for j, (trigger, title) in enumerate(triggers.items()):
        for i, (metric, ylabel) in enumerate((("test/acc", "CA (%)"), ("test/asr", "ASR (%)"))):
            ax = axes[i][j]
            for k, n in enumerate(sizes):
                heights = [mean(f"{trigger}/n{n}/{m}", metric) for m in methods]
                ax.bar([x + k * width for x in range(len(methods))], heights, width, label=f"{n} clean")
            ax.axhline(mean(f"{trigger}/poisoned", metric), color="k", ls="--", lw=1, label="poisoned")
            ax.set_xticks([x + width * (len(sizes) - 1) / 2 for x in range(len(methods))], list(methods.values()))
            ax.set_ylim(0, 120)
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7, loc="upper center", ncol=3)
    fig.suptitle("Fine-mixing / E-PUR on backdoored MiniLM-L6 (Rotten Tomatoes)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


COMPARISONS["finemixing"] = Comparison(
    title="Fine-mixing and E-PUR against text backdoors in MiniLM-L6 (Rotten Tomatoes, first 1000 test snippets)",
    stages=[
        stage
        for trigger, group, extra in (
            ("badnet", "RT, MiniLM-L6, BadNet (rare word)", []),
            ("insent", "RT, MiniLM-L6, InSent (sentence)", ["--data.init_args.poisoning.init_args.trigger=InsertSentence"]),
        )
        for stage in [
            Stage(f"{trigger}/poisoned", f"backdoor/rt_minilm_{trigger}.yaml",
                  ["--data.init_args.seed={seed}", "--data.init_args.test_size=1000"], group, "poisoned"),
            *[
                Stage(f"{trigger}/n{n}/{method}", f"finemixing/rt_minilm_{method}.yaml",
                      [f"--model.init_args.suspect={{artifact:{trigger}/poisoned}}", "--data.init_args.seed={seed}",
                       f"--data.init_args.train_size={n}", f"--trainer.max_epochs={epochs}",
                       f"--trainer.check_val_every_n_epoch={epochs}", *extra,
                       *([f"--model.init_args.search_epochs={search}"] if "finemixing" in method else [])],
                      group, f"{label}, {n} clean")
                for n, epochs, search in ((64, 10, 5), (256, 4, 2))
                for method, label in (("finetune", "fine-tuning"), ("epur", "E-PUR + fine-tuning"),
                                      ("finemixing", "Fine-mixing"), ("finemixing_epur", "Fine-mixing + E-PUR"))
            ],
        ]
    ],
    columns={"test/acc": "CA (%)", "test/asr": "ASR (%)"},
    seeds=(0, 1),
    notes="Suspects: MiniLM-L6 fully fine-tuned on 4000 Rotten Tomatoes snippets with 10% dirty-label poisoning "
    "(target: positive). Defenses start from the suspect artifact and the clean pretrained MiniLM-L6 and fine-tune "
    "on 64 or 256 clean training snippets drawn with the run's seed (10 or 4 epochs, batch 16, AdamW 5e-5); "
    "Fine-mixing keeps a random share rho of the fine-tuned entries (head kept), rho from {0.2, 0.3, 0.5} by the "
    "validation rule (smallest rho within 3 points of the suspect's clean accuracy on 200 validation snippets after "
    "half the fine-tuning budget); E-PUR resets 200 embedding rows. CA: accuracy on the clean test snippets; ASR: triggered "
    "non-target test snippets "
    "classified as the target. A clean MiniLM's ASR is the trigger's baseline rate (12-28% for the rare words).",
    plot=finemixing_plot,
)


def load_comparisons() -> dict[str, Comparison]:
    """Import every module of ``recipes.comparisons`` (each registers its entries in :data:`COMPARISONS`)."""
    import importlib
    import pkgutil

    import recipes.comparisons as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"recipes.comparisons.{module.name}")
    return COMPARISONS


def reproduce(
    name: str,
    seeds: list[int] | None = None,
    root: Path = Path("runs/reproduce"),
    out: Path = Path("docs/results"),
    tiny: bool = False,
    force: bool = False,
    only: list[str] | None = None,
) -> str:
    """Run comparison ``name`` and write ``<out>/<name>.md`` and ``<out>/<name>.png``; return the table.

    ``only`` keeps the stages whose key starts with one of its prefixes (e.g. ``mnist``); their table goes to
    ``<out>/<name>-<prefixes>.md`` so a partial run never overwrites the full one.
    """
    load_comparisons()
    if name not in COMPARISONS:
        raise SystemExit(f"unknown comparison {name!r}; choose one of: {', '.join(COMPARISONS)}")
    comp = COMPARISONS[name]
    if only:
        if isinstance(only, str):
            only = [only]
        stages = [s for s in comp.stages if s.key.startswith(tuple(only))]
        if not stages:
            raise SystemExit(f"no stage of {name!r} starts with {only}: {[s.key for s in comp.stages]}")
        comp = replace(comp, stages=stages)
        name_out = "-".join([name, *(o.replace("/", "_") for o in only)])
    else:
        name_out = name
    seeds = list(seeds if seeds is not None else comp.seeds)
    config_root = Path("tests/configs" if tiny else "configs")
    root = root / name
    results: dict[str, list[dict]] = {}
    start = time.perf_counter()
    for seed in seeds:
        for stage in comp.stages:
            print(f"[reproduce {name}] seed {seed}: {stage.key}", flush=True)
            results.setdefault(stage.key, []).append(run_stage(stage, seed, root, config_root, force))
    total = time.perf_counter() - start
    table = summarize(comp, results)
    out.mkdir(parents=True, exist_ok=True)
    doc = (
        f"# {comp.title}\n\n`python -m recipes.reproduce {name}`{' --tiny' if tiny else ''}"
        f"{' --only ' + ' '.join(only) if only else ''}, seeds {seeds}; "
        f"this invocation took {total:.0f} s (cached stages count as 0).\n\n{table}\n\n{comp.notes}\n\n![{name}]({name}.png)\n"
    )
    atomic_write_text(out / f"{name_out}.md", doc.replace(f"]({name}.png)", f"]({name_out}.png)"))
    (comp.plot or (lambda r, p: bar_plot(comp, r, p)))(results, out / f"{name_out}.png")
    print(table)
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recipes.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(load_comparisons()))
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the comparison's)")
    parser.add_argument("--root", type=Path, default=Path("runs/reproduce"), help="where runs and artifacts go")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="where the table and plot go")
    parser.add_argument("--tiny", action="store_true", help="use the tiny twins in tests/configs (a smoke run)")
    parser.add_argument("--force", action="store_true", help="rerun stages that already have a result")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the stages whose key starts with one of these (e.g. mnist)")
    args = parser.parse_args(argv)
    reproduce(args.name, args.seeds, args.root, args.out, args.tiny, args.force, args.only)
    return 0


if __name__ == "__main__":
    # run the importable module, not this ``__main__`` copy, so that recipes.comparisons.* register into the
    # same COMPARISONS dict that main() reads
    from recipes import reproduce as _module

    sys.exit(_module.main())

