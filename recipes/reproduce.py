"""``python -m recipes.reproduce <name>``: run one paper's headline comparison and write its table and plot.

A comparison is a list of stages; each stage is one config run through the same CLI code as
``python -m recipes fit`` (then tested on the test split), for several seeds. Stages may consume earlier
stages' artifacts through ``{artifact:<stage key>}`` in their overrides. Finished runs are cached in
``<root>/<stage>/seed<k>/result.json``, so an interrupted reproduction resumes where it stopped
(``--force`` reruns; ``--cached`` only tabulates what is on disk; ``--jobs N`` runs the stages as N parallel processes,
:mod:`recipes.parallel`). The table (mean ± std over seeds) goes to ``<out>/<name>.md`` and the plot to
``<out>/<name>.png`` (``--out`` defaults to ``--root``, i.e. under ``runs/``; ``--out docs/results`` refreshes the
committed tables), and the table is printed.

Method issues add their own entry to :data:`COMPARISONS`, in a module of ``recipes/comparisons/``
(imported on first use by :func:`load_comparisons`; it registers with ``COMPARISONS["name"] = Comparison(...)``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from foundation.artifacts import atomic_write_text


@dataclass
class Stage:
    """One run of a comparison.

    Args:
        key: unique name, also the run directory (``<root>/<key>/seed<k>``), e.g. ``mnist/poisoned``.
        config: config path relative to the config root (``configs/`` or ``tests/configs/`` with ``--tiny``).
        overrides: extra CLI arguments; ``{seed}`` and ``{artifact:<key>}`` are substituted (a key may start with
            ``../<comparison>/`` to use another comparison's stage).
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
    table: Callable[[Comparison, dict[str, list[dict]]], str] | None = None  # replaces summarize() (e.g. mean ± SE)


ARTIFACT = re.compile(r"\{artifact:([^}]+)\}")  # a stage override that reads another stage's artifact


def _substitute(arg: str, seed: int, root: Path) -> str:
    arg = arg.replace("{seed}", str(seed))
    return ARTIFACT.sub(lambda m: str(_stage_dir(root, m.group(1)) / f"seed{seed}" / "artifact"), arg)


def dependencies(stage: Stage) -> list[str]:
    """The keys of the stages whose artifacts ``stage`` reads (``{artifact:<key>}``), in order of first use."""
    return list(dict.fromkeys(key for arg in stage.overrides for key in ARTIFACT.findall(arg)))


def result_path(root: Path, key: str, seed: int) -> Path:
    """Where stage ``key``'s run for ``seed`` keeps its result (``root``: the comparison's root); it exists once the
    run has finished."""
    return _stage_dir(root, key) / f"seed{seed}" / "result.json"


def check_dependencies(stages: list[Stage], seeds: list[int], root: Path, force: bool = False) -> None:
    """One clear error, before anything runs, for a stage to be run whose artifact source is neither among
    ``stages`` nor finished under ``root``."""
    keys = {s.key for s in stages}
    for seed in seeds:
        for stage in stages:
            if result_path(root, stage.key, seed).exists() and not force:
                continue
            for key in dependencies(stage):
                if key not in keys and not result_path(root, key, seed).exists():
                    raise SystemExit(f"stage {stage.key!r} (seed {seed}) reads the artifact of {key!r}, which has no "
                                     f"result under {root} and is not among the stages to run: run it first "
                                     f"(--only {key})")  # fmt: skip


def _stage_dir(root: Path, key: str) -> Path:
    """``root / key`` with ``..`` resolved, so a key such as ``../chameleon/mnist/warmup`` shares another
    comparison's stage (its run and artifact are made once)."""
    from os.path import normpath

    return Path(normpath(root / key))


def run_stage(stage: Stage, seed: int, root: Path, config_root: Path, force: bool = False) -> dict:
    """Run (or load the cached result of) one stage for one seed; return ``{"metrics": ..., "seconds": ...}``."""
    from recipes.cli import main
    from recipes.resume import resume_candidates

    result_file = result_path(root, stage.key, seed)
    run_dir = result_file.parent
    if result_file.exists() and not force:
        return json.loads(result_file.read_text())
    args = [
        "fit",
        f"--config={config_root / stage.config}",
        f"--seed_everything={seed}",
        f"--trainer.default_root_dir={_stage_dir(root, stage.key)}",
        f"--run_name=seed{seed}",
        *[_substitute(a, seed, root) for a in stage.overrides],
    ]
    if force and run_dir.exists():
        shutil.rmtree(run_dir)  # --force: a fresh run (the CLI never starts one over a run's checkpoints)
    elif resume_candidates(run_dir):
        args.append("--ckpt_path=last")  # a stage that was interrupted (no result yet) continues
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
    values = [v for v in values if v == v]  # NaN: undefined for that seed (e.g. the lifespan of no backdoor)
    scale = 100.0 if percent else 1.0
    if not values:
        return "—"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def mean_se(values: list[float]) -> str:
    """``mean ± standard error`` (the standard deviation over ``sqrt(n)``) with one decimal; ``–`` when empty."""
    if not values:
        return "–"
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{mean:.1f} ± {se:.1f}"


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


COMPARISONS: dict[str, Comparison] = {}


def load_comparisons() -> dict[str, Comparison]:
    """Import every module of ``recipes.comparisons`` (each registers its entries in :data:`COMPARISONS`)."""
    import importlib
    import pkgutil

    import recipes.comparisons as package

    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"recipes.comparisons.{module.name}")
    return COMPARISONS


def select_stages(name: str, only: list[str] | None) -> list[Stage]:
    """The stages of comparison ``name`` whose key starts with one of ``only`` (all without ``only``); an entry that
    is a whole stage key selects that stage alone, not its extensions."""
    load_comparisons()
    stages = COMPARISONS[name].stages
    if not only:
        return list(stages)
    keys = {s.key for s in stages}
    chosen = [s for s in stages if any(s.key == o if o in keys else s.key.startswith(o) for o in only)]
    if not chosen:
        raise SystemExit(f"no stage of {name!r} starts with {only}: {[s.key for s in stages]}")
    return chosen


def reproduce(
    name: str,
    seeds: list[int] | None = None,
    root: Path = Path("runs/reproduce"),
    out: Path = Path("runs/reproduce"),
    tiny: bool = False,
    force: bool = False,
    only: list[str] | None = None,
    cached: bool = False,
) -> str:
    """Run comparison ``name`` and write ``<out>/<name>.md`` and ``<out>/<name>.png``; return the table.

    ``only`` keeps the stages whose key starts with one of its prefixes (e.g. ``mnist``), or, for an entry that is a
    whole stage key, that stage alone (``mnist/pgd/trojandam`` leaves out ``mnist/pgd/trojandam_fresh``); their
    table goes to ``<out>/<name>-<prefixes>.md`` so a partial run never overwrites the full one. ``cached`` runs
    nothing: the table and plot are made from the results already under ``root`` (a stage and seed without one is
    reported and left out), e.g. to tabulate runs made on other machines or by several ``--only`` calls.
    """
    load_comparisons()
    if name not in COMPARISONS:
        raise SystemExit(f"unknown comparison {name!r}; choose one of: {', '.join(COMPARISONS)}")
    comp = COMPARISONS[name]
    if only:
        if isinstance(only, str):
            only = [only]
        comp = replace(comp, stages=select_stages(name, only))
        name_out = "-".join([name, *(o.replace("/", "_") for o in only)])
        if len(name_out) > 120:  # many keys: keep the file name under the file system's 255 bytes, and unique
            name_out = f"{name_out[:96]}-{len(only)}-keys-{hashlib.sha1(name_out.encode()).hexdigest()[:8]}"
    else:
        name_out = name
    seeds = list(seeds if seeds is not None else comp.seeds)
    config_root = Path("tests/configs" if tiny else "configs")
    root = root / name
    results: dict[str, list[dict]] = {}
    if not cached:
        check_dependencies(comp.stages, seeds, root, force)
    start = time.perf_counter()
    for seed in seeds:
        for stage in comp.stages:
            if cached and not result_path(root, stage.key, seed).exists():
                print(f"[reproduce {name}] seed {seed}: {stage.key}: no result (left out: --cached)", flush=True)
                continue
            print(f"[reproduce {name}] seed {seed}: {stage.key}", flush=True)
            results.setdefault(stage.key, []).append(run_stage(stage, seed, root, config_root, force))
    if cached and not results:
        raise SystemExit(f"--cached: no stage of {name!r} has a result under {root} for seeds {seeds}")
    total = time.perf_counter() - start
    table = (comp.table or summarize)(comp, results)
    out.mkdir(parents=True, exist_ok=True)
    doc = (
        f"# {comp.title}\n\n`python -m recipes.reproduce {name}`{' --tiny' if tiny else ''}"
        f"{' --only ' + ' '.join(only) if only else ''}{' --cached' if cached else ''}, seeds {seeds}; "
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
    parser.add_argument("--out", type=Path, default=None,
                        help="where the table and plot go (default: --root, beside the runs; "
                             "`--out docs/results` refreshes the committed results)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny twins in tests/configs (a smoke run)")
    parser.add_argument("--force", action="store_true", help="rerun stages that already have a result")
    parser.add_argument("--jobs", type=int, default=1,
                        help="run the stages as this many parallel processes, each stage once the stages whose "
                             "artifacts it reads have a result (recipes/parallel.py); then tabulate (--cached)")
    parser.add_argument("--cached", action="store_true",
                        help="run nothing: tabulate and plot the results already under --root (missing ones left out)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the stages whose key starts with one of these (e.g. mnist); a whole stage key "
                             "selects that stage alone")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.root
    if args.cached and args.force:
        parser.error("--cached runs nothing and --force reruns every stage: pass one of them")
    if args.jobs != 1:
        if args.cached:
            parser.error("--cached runs nothing: leave out --jobs")
        from recipes.parallel import run_parallel

        seeds = args.seeds if args.seeds is not None else list(COMPARISONS[args.name].seeds)
        states = run_parallel(args.name, select_stages(args.name, args.only), seeds, args.root, args.jobs,
                              args.tiny, args.force)  # fmt: skip
        failed = sorted(f"{key} seed {seed}: {state}" for (key, seed), state in states.items()
                        if state in ("failed", "skipped"))  # fmt: skip
        if failed:
            print("not finished:\n  " + "\n  ".join(failed), file=sys.stderr)
        reproduce(args.name, args.seeds, args.root, out, args.tiny, False, args.only, cached=True)
        return 1 if failed else 0
    reproduce(args.name, args.seeds, args.root, out, args.tiny, args.force, args.only, args.cached)
    return 0


if __name__ == "__main__":
    # run the importable module, not this ``__main__`` copy, so that recipes.comparisons.* register into the
    # same COMPARISONS dict that main() reads
    from recipes import reproduce as _module

    sys.exit(_module.main())

