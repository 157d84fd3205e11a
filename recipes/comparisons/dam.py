"""``python -m recipes.reproduce dam``: merge rules and DAM on a pool of small-CNN task models with 1 or 2 backdoors.

The pool is built once per seed (stages ``pool/*``, cached artifacts): a rotation-pretrained backbone and task
models fine-tuned from it (MNIST backdoored; Fashion-MNIST clean and backdoored; digits; MNIST parity). Then every
merge method runs on the pool with one backdoored model (MNIST) and with two (MNIST and Fashion-MNIST).
"""

from __future__ import annotations

import statistics
from pathlib import Path

from recipes.reproduce import COMPARISONS, Comparison, Stage

_FT = "merging/task_finetune.yaml"
_PRE = "--model.init_args.pretrained={artifact:pool/pretrained}"
_DATA = ["--data.init_args.seed={seed}"]


def _task(name: str, dataset: str, labels: str, classes: int, poisoning: list[str]) -> list[str]:
    task = "--data.init_args.task.init_args."
    return [_PRE, *_DATA, f"{task}name={name}", f"{task}dataset={dataset}", f"{task}labels={labels}",
            f"--model.init_args.net.init_args.num_classes={classes}", *poisoning]  # fmt: skip


_CLEAN = ["--data.init_args.task.init_args.poisoning.init_args.rate=0.0"]  # clean; the trigger only builds an ASR set
_FASHION_BD = ["--data.init_args.task.init_args.poisoning.init_args.trigger=Patch",
               "--data.init_args.task.init_args.poisoning.init_args.trigger.init_args.size=4",
               "--data.init_args.task.init_args.poisoning.init_args.trigger.init_args.location=top_left"]  # fmt: skip

POOL = [
    Stage("pool/pretrained", "merging/mnist_rotation_pretrain.yaml", _DATA, "pool", "backbone (rotation)"),
    Stage("pool/mnist_badnets", _FT, _task("mnist", "mnist", "class", 10, []), "pool", "MNIST, backdoored"),
    Stage("pool/fashion_clean", _FT, _task("fashion", "fashion-mnist", "class", 10, _CLEAN), "pool", "Fashion, clean"),
    Stage("pool/fashion_badnets", _FT, _task("fashion", "fashion-mnist", "class", 10, _FASHION_BD), "pool",
          "Fashion, backdoored"),
    Stage(
        "pool/digits",
        _FT,
        [*_task("digits", "digits", "class", 10, _CLEAN), "--data.init_args.task.init_args.val_size=300",
         "--trainer.max_epochs=10", "--model.init_args.linear_probe_epochs=5"],  # 1.2k images: more epochs
        "pool",
        "digits",
    ),
    Stage("pool/parity", _FT, _task("parity", "mnist", "parity", 2, _CLEAN), "pool", "MNIST parity"),
]

METHODS = {
    "task_arithmetic": ("pool4_task_arithmetic.yaml", [], "task arithmetic"),
    "ties": ("pool4_ties.yaml", [], "TIES (trim per task)"),
    "ties_tensor": ("pool4_ties.yaml", ["--model.init_args.rule.init_args.trim=tensor"], "TIES (trim per tensor, peft)"),
    "dare": ("pool4_dare.yaml", [], "DARE + TA"),
    "adamerging": ("pool4_adamerging.yaml", [], "AdaMerging (layer)"),
    "dam": ("pool4_dam.yaml", [], "DAM (two masks)"),
    "dam_code": ("pool4_dam.yaml", ["--model.init_args.detection_mask=false", "--model.init_args.safe_loss=entropy",
                                    "--model.init_args.safety_weight=0.1", "--model.init_args.trigger_norm=null",
                                    "--model.init_args.trigger_optimizer.init_args.lr=0.0001",
                                    "--model.init_args.reset_merge_weights=true"],
                 "DAM (released code: one mask)"),
    "dam_random_mask": ("pool4_dam.yaml", ["--model.init_args.detection_mask=false",
                                           "--model.init_args.mask_optimizer.init_args.lr=0.0"],
                        "control: DAM's random initial mask, never trained"),
}


def _merges(backdoors: int) -> list[Stage]:
    fashion = "fashion_badnets" if backdoors == 2 else "fashion_clean"
    models = ",".join(f"{{artifact:pool/{m}}}" for m in ("mnist_badnets", fashion, "digits", "parity"))
    pool = ["--model.init_args.pretrained={artifact:pool/pretrained}", f"--model.init_args.task_models=[{models}]"]
    group = f"{backdoors} backdoored model{'s' if backdoors > 1 else ''} in the pool"
    return [Stage(f"bd{backdoors}/{key}", f"merging/{cfg}", [*pool, *_DATA, *extra], group, label)
            for key, (cfg, extra, label) in METHODS.items()]  # fmt: skip


def dam_plot(results: dict, path: Path) -> None:
    """Average accuracy against average ASR per merge method (mean over seeds), one panel per pool."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from callbacks.round_curves import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, backdoors in zip(axes, (1, 2)):
        for key, (_, _, label) in METHODS.items():
            runs = results.get(f"bd{backdoors}/{key}", [])
            if runs:
                acc = statistics.fmean(r["metrics"]["test/acc"] * 100 for r in runs)
                asr = statistics.fmean(r["metrics"]["test/asr"] * 100 for r in runs)
                ax.scatter(asr, acc, s=40, marker="*" if key == "dam" else "o", label=label)
        ax.set_xlabel("average ASR of the backdoored tasks (%)")
        ax.set_title(f"{backdoors} backdoored model{'s' if backdoors > 1 else ''} in the pool", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("average accuracy over 4 tasks (%)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=4)
    fig.suptitle("Merging a pool with backdoored task models: up and to the left is better", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    save_figure(fig, path)


COMPARISONS["dam"] = Comparison(
    title="Model merging with backdoored task models: task arithmetic, TIES, DARE, AdaMerging and DAM",
    stages=[*POOL, *_merges(1), *_merges(2)],
    columns={
        "test/acc": "avg acc (%)", "test/asr": "avg ASR (%)", "test/mnist/acc": "MNIST", "test/mnist/asr": "MNIST ASR",
        "test/fashion/acc": "Fashion", "test/fashion/asr": "Fashion ASR", "test/digits/acc": "digits",
        "test/parity/acc": "parity",
    },
    seeds=(0, 1, 2),
    notes="Pool rows: each model on its own task (test/acc, test/asr of its DataModule; the backbone's acc is its "
    "rotation accuracy). Merge rows: the merged shared weights with each task's own head, on 2,000 test images per "
    "task (digits: 300). avg acc: mean over the 4 tasks; avg ASR: mean over the backdoored task models (MNIST in the "
    "1-backdoor pool, MNIST and Fashion in the 2-backdoor pool); the Fashion ASR of the 1-backdoor pool is the "
    "trigger's base rate on a clean model. Learned merges (AdaMerging, DAM) see only unlabelled validation images.",
    plot=dam_plot,
)
