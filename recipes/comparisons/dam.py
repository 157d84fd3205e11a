"""``python -m recipes.reproduce dam``: merge rules and DAM on one pool per seed, in a paired design.

The run seed is the *pool* seed: stages ``pool/*`` build, once per seed (cached artifacts), a rotation-pretrained
backbone, a clean linear probe per task, and three task models on disjoint inputs fine-tuned from the backbone
under their probe's frozen head (MNIST backdoored, Fashion-MNIST and digits clean), so the backdoor lives in the
shared weights that merging combines, as under CLIP's frozen zero-shot heads. Stages ``merge/<method>/m<s>`` then
merge that pool with every rule, for merge seeds ``s`` (the order of the unlabelled batches, the relaxed-mask
noise, DARE's drop), all on the same pool: the differences between rules are paired per (pool, merge seed).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from foundation.artifacts import atomic_write_text
from recipes.reproduce import COMPARISONS, Comparison, Stage, mean_se

_FT = "merging/task_finetune.yaml"
_PRE = "--model.init_args.pretrained={artifact:pool/pretrained}"
_DATA = ["--data.init_args.seed={seed}"]
MERGE_SEEDS = (0, 1, 2)


def _task(name: str, dataset: str, classes: int, extra: list[str]) -> list[str]:
    task = "--data.init_args.task.init_args."
    return [_PRE, *_DATA, f"{task}name={name}", f"{task}dataset={dataset}",
            f"--model.init_args.net.init_args.num_classes={classes}", *extra]  # fmt: skip


_CLEAN = ["--data.init_args.task.init_args.poisoning.init_args.rate=0.0"]  # clean; the trigger only builds an ASR set
_DIGITS = ["--data.init_args.task.init_args.val_size=300"]  # 1.2k training images: more epochs


def _probe(name: str, epochs: int) -> list[str]:
    """A clean linear probe of the frozen backbone (its head is every task model's frozen head)."""
    return [*_CLEAN, f"--trainer.max_epochs={epochs}", f"--model.init_args.linear_probe_epochs={epochs}"]


def _frozen(name: str, epochs: int) -> list[str]:
    """Fine-tune the shared weights under the clean probe's frozen head."""
    return [f"--model.init_args.head={{artifact:pool/probe_{name}}}", "--model.init_args.freeze_head=true",
            "--model.init_args.linear_probe_epochs=0", f"--trainer.max_epochs={epochs}"]  # fmt: skip


POOL = [
    Stage("pool/pretrained", "merging/mnist_rotation_pretrain.yaml", _DATA, "pool", "backbone (rotation)"),
    Stage("pool/probe_mnist", _FT, _task("mnist", "mnist", 10, _probe("mnist", 1)), "pool", "MNIST, clean probe"),
    Stage("pool/probe_fashion", _FT, _task("fashion", "fashion-mnist", 10, _probe("fashion", 1)), "pool",
          "Fashion, clean probe"),
    Stage("pool/probe_digits", _FT, _task("digits", "digits", 10, [*_DIGITS, *_probe("digits", 5)]), "pool",
          "digits, clean probe"),
    Stage("pool/mnist_badnets", _FT, _task("mnist", "mnist", 10, _frozen("mnist", 2)), "pool", "MNIST, backdoored"),
    Stage("pool/fashion_clean", _FT, _task("fashion", "fashion-mnist", 10, [*_CLEAN, *_frozen("fashion", 2)]),
          "pool", "Fashion, clean"),
    Stage("pool/digits", _FT, _task("digits", "digits", 10, [*_CLEAN, *_DIGITS, *_frozen("digits", 5)]), "pool",
          "digits"),
]

_FINAL_EPOCHS = 8  # pool_dam.yaml: 20 epochs, the last 8 AdaMerging with the discrete masks fixed
# the control: DAM's own learned logits of the same (pool, merge seed), permuted within each tensor, then the same
# final AdaMerging stage; it reads them from the DAM stage's run directory
_PERMUTED = ["--model.class_path=DAMPermutedMasks", "--model.init_args.mask_epochs=0",
             "--model.init_args.masks_from={artifact:merge/dam/m{merge_seed}}/../dam_masks.safetensors",
             f"--trainer.max_epochs={_FINAL_EPOCHS}", f"--trainer.check_val_every_n_epoch={_FINAL_EPOCHS}"]  # fmt: skip
# key -> (config, extra overrides, label, whether the merge seed changes it); the order is the run order
METHODS = {
    "task_arithmetic": ("pool_task_arithmetic.yaml", [], "task arithmetic", False),
    "ties": ("pool_ties.yaml", [], "TIES (trim per task)", False),
    "dare": ("pool_dare.yaml", ["--model.init_args.rule.init_args.seed={merge_seed}"], "DARE + TA", True),
    "adamerging": ("pool_adamerging.yaml", [], "AdaMerging (layer)", True),
    "dam": ("pool_dam.yaml", [], "DAM (two masks)", True),
    "dam_permuted": ("pool_dam.yaml", _PERMUTED,
                     "control: DAM's learned masks permuted within each tensor (same kept fractions)", True),
}


def merge_stages(methods: dict, pool: list[str], config_dir: str, group: str, title: str) -> list[Stage]:
    """One stage per (method, merge seed) on the same pool: the merge seed sets the run seed, the data order
    (``shuffle_seed``) and DAM's mask seed; ``{merge_seed}`` and ``{group}`` in a method's overrides are filled in.
    A method the merge seed does not change (``seeded`` False) runs once. Shared by ``dam`` and ``dam_clip``."""
    stages = []
    for key, (cfg, extra, label, seeded) in methods.items():
        for s in MERGE_SEEDS if seeded else MERGE_SEEDS[:1]:
            seed = [f"--seed_everything={s}", f"--data.init_args.shuffle_seed={s}"]
            if Path(cfg).stem.split("_")[-1] == "dam":  # DAM and its control take the mask seed
                seed.append(f"--model.init_args.mask_seed={s}")
            extra_s = [e.replace("{merge_seed}", str(s)).replace("{group}", group) for e in extra]
            stages.append(Stage(f"{group}/{key}/m{s}", f"{config_dir}/{cfg}", [*pool, *seed, *extra_s], title,
                                f"{label}, merge seed {s}"))  # fmt: skip
    return stages


def _merges() -> list[Stage]:
    models = ",".join(f"{{artifact:pool/{m}}}" for m in ("mnist_badnets", "fashion_clean", "digits"))
    pool = [_PRE, f"--model.init_args.task_models=[{models}]", *_DATA]
    return merge_stages(METHODS, pool, "merging", "merge", "merges of one pool (run seed = pool seed)")


def _runs(results: dict, key: str) -> dict[tuple[int, int], dict]:
    """``(pool seed, merge seed) -> metrics`` of one method; a method the merge seed does not change is repeated
    for every merge seed (its value is the same), so every method is paired on the same (pool, merge seed)."""
    out = {}
    _, _, _, seeded = METHODS[key]
    for s in MERGE_SEEDS:
        for run in results.get(f"merge/{key}/m{s if seeded else MERGE_SEEDS[0]}", []):
            out[(run["seed"], s)] = run["metrics"]
    return out


def paired_table(results: dict) -> str:
    """Markdown: per method, mean ± standard error of accuracy, ASR and DAM's mask statistics over its runs (pool x
    merge seed; once per pool for a rule the merge seed does not change), and DAM's paired difference to the
    method (DAM - method, per (pool, merge seed); the standard error treats the pairs as independent)."""
    dam = _runs(results, "dam")
    rows = ["| method | runs | avg acc (%) | ASR (%) | DAM − method: acc | DAM − method: ASR | kept | |logit| > 1 |",
            "|---|---|---|---|---|---|---|---|"]
    for key, (_, _, label, _) in METHODS.items():
        runs = _runs(results, key)
        if not runs:
            continue
        seeded = METHODS[key][3]
        own = list(runs.values()) if seeded else [r["metrics"] for r in results.get(f"merge/{key}/m0", [])]
        acc = [m["test/acc"] * 100 for m in own]  # a rule the merge seed does not change: once per pool
        asr = [m["test/asr"] * 100 for m in own]
        pairs = sorted(set(runs) & set(dam))
        d_acc = [(dam[p]["test/acc"] - runs[p]["test/acc"]) * 100 for p in pairs]
        d_asr = [(dam[p]["test/asr"] - runs[p]["test/asr"]) * 100 for p in pairs]
        kept = [m["mask/kept"] * 100 for m in runs.values() if "mask/kept" in m]
        moved = [m["mask/shared_moved"] * 100 for m in runs.values() if "mask/shared_moved" in m]
        rows.append(f"| {label} | {len(own)} | {mean_se(acc)} | {mean_se(asr)} | "
                    f"{mean_se(d_acc) if key != 'dam' else '–'} | {mean_se(d_asr) if key != 'dam' else '–'} | "
                    f"{mean_se(kept)} | {mean_se(moved)} |")  # fmt: skip
    return "\n".join(rows)


def dam_plot(results: dict, path: Path) -> None:
    """Average accuracy against ASR per merge method (mean ± standard error over pools and merge seeds); the paired
    table goes beside the plot (``<name>-paired.md``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    atomic_write_text(path.with_name(path.stem + "-paired.md"), paired_table(results) + "\n")
    fig, ax = plt.subplots(figsize=(7, 5))
    for key, (_, _, label, _) in METHODS.items():
        runs = list(_runs(results, key).values())
        if len(runs) < 2:
            continue
        acc, asr = [m["test/acc"] * 100 for m in runs], [m["test/asr"] * 100 for m in runs]
        se = [statistics.stdev(v) / math.sqrt(len(v)) for v in (asr, acc)]
        ax.errorbar(statistics.fmean(asr), statistics.fmean(acc), xerr=se[0], yerr=se[1], fmt="*" if key == "dam"
                    else "o", capsize=3, label=label)  # fmt: skip
    ax.set_xlabel("ASR of the backdoored MNIST task (%)")
    ax.set_ylabel("average accuracy over 3 tasks (%)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    ax.set_title("Merging a pool with a backdoored task model (mean ± s.e. over pools x merge seeds)", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


COMPARISONS["dam"] = Comparison(
    title="Model merging with a backdoored task model: task arithmetic, TIES, DARE, AdaMerging and DAM, paired",
    stages=[*POOL, *_merges()],
    columns={
        "test/acc": "avg acc (%)", "test/asr": "ASR (%)", "test/mnist/acc": "MNIST", "test/fashion/acc": "Fashion",
        "test/digits/acc": "digits", "mask/kept": "kept", "mask/shared_moved": "|logit|>1",
    },
    seeds=(0, 1),
    notes="Run seed = pool seed. Pool rows: each model on its own task (the probes: clean linear probes of the "
    "backbone; the backbone's acc is its rotation accuracy). Merge rows: the merged shared weights with each task's "
    "own frozen clean head, on 2,000 test images per task (digits: 300); one row per merge seed. avg acc: mean over "
    "the 3 tasks; ASR: the backdoored MNIST model's trigger on non-target MNIST test images. Learned merges see only "
    "unlabelled validation images. kept: DAM's kept fraction of task-vector entries; |logit|>1: the fraction of "
    "shared-mask logits that left (-1, 1). The paired table (dam-paired.md) gives mean ± standard error over "
    "(pool, merge seed) and DAM's paired differences.",
    plot=dam_plot,
)
