"""``python -m recipes.reproduce dam_clip``: merge rules and DAM on the CLIP ViT-B/32 pool of the merging papers, 8 hub
image tasks with 1 or 2 BadNets-backdoored task models. A cluster comparison: it needs a GPU and the 8 datasets
exported to ``data/clip/<task>`` first (``python -m foundation.export_images --clip8 data/clip``, docs/merging-clip.md).

Stages ``pool/*`` build the pool once per seed (cached artifacts): theta_0 (configs/merging/clip/pretrained.yaml)
and a task model per task fine-tuned from it under CLIP's frozen zero-shot head (task_finetune.yaml with the task,
its classes and class names and Ilharco et al.'s per-task epochs): GTSRB backdoored (patch bottom right -> 0), EuroSAT clean and backdoored (patch top left -> 0), the
rest clean. Then task arithmetic, TIES, DARE, AdaMerging, DAM and the permuted-mask control run on the pool with one
backdoored model (GTSRB) and with two (GTSRB and EuroSAT), for merge seeds 0, 1 and 2 where the merge seed matters: the
paired design of the ``dam`` comparison (run seed = pool seed, at least 2 pools; ``paired_table`` in
recipes/comparisons/dam.py). ``--tiny`` is not supported (the twins' pool is tests/clip_pool.py's, 3 tasks).
"""

from __future__ import annotations

from recipes.comparisons.dam import merge_stages
from recipes.reproduce import COMPARISONS, Comparison, Stage


DATA = "data/clip"
# task -> (classes, epochs): Ilharco et al.'s epochs for about 2,000 steps of batch 128 (task_vectors' finetune.py).
TASKS = {"sun397": (397, 14), "cars": (196, 35), "resisc45": (45, 15), "eurosat": (10, 12), "svhn": (10, 4),
         "gtsrb": (43, 11), "mnist": (10, 5), "dtd": (47, 76)}  # fmt: skip
_FT = "merging/clip/task_finetune.yaml"
_T = "--data.init_args.task.init_args."
_CLEAN = [f"{_T}poisoning.init_args.rate=0.0"]  # clean; the trigger only builds the triggered test set
_TOP_LEFT = [f"{_T}poisoning.init_args.trigger.init_args.location=top_left"]


def _task(task: str, poisoning: list[str]) -> list[str]:
    classes, epochs = TASKS[task]
    return ["--model.init_args.pretrained={artifact:pool/pretrained}", "--data.init_args.seed={seed}",
            f"{_T}name={task}", f"{_T}dataset={DATA}/{task}", f"--model.init_args.net.init_args.num_classes={classes}",
            f"--model.init_args.net.init_args.class_names={DATA}/{task}",
            f"--trainer.max_epochs={epochs}", f"--model.init_args.scheduler.init_args.T_max={epochs}", *poisoning]  # fmt: skip


POOL = [
    Stage("pool/pretrained", "merging/clip/pretrained.yaml", ["--data.init_args.seed={seed}"], "pool",
          "CLIP ViT-B/32 (linear probe on MNIST)"),
    *[Stage(f"pool/{t}", _FT, _task(t, _CLEAN), "pool", t) for t in TASKS if t != "gtsrb"],
    Stage("pool/gtsrb_badnets", _FT, _task("gtsrb", []), "pool", "gtsrb, backdoored"),
    Stage("pool/eurosat_badnets", _FT, _task("eurosat", _TOP_LEFT), "pool", "eurosat, backdoored"),
]

_FINAL_EPOCHS = 16  # dam.yaml: 32 epochs, the last 16 AdaMerging with the discrete masks fixed
# key -> (config, extra overrides, label, whether the merge seed changes it)
METHODS = {
    "task_arithmetic": ("task_arithmetic.yaml", [], "task arithmetic", False),
    "ties": ("ties.yaml", [], "TIES", False),
    "dare": ("dare.yaml", ["--model.init_args.rule.init_args.seed={merge_seed}"], "DARE + TA", True),
    "adamerging": ("adamerging.yaml", [], "AdaMerging (layer)", True),
    "dam": ("dam.yaml", [], "DAM (two masks, masks that move, top-50% final mask)", True),
    "dam_permuted": ("dam.yaml", ["--model.class_path=DAMPermutedMasks", "--model.init_args.mask_epochs=0",
                                  "--model.init_args.masks_from={artifact:{group}/dam/m{merge_seed}}/../dam_masks.safetensors",
                                  f"--trainer.max_epochs={_FINAL_EPOCHS}",
                                  f"--trainer.check_val_every_n_epoch={_FINAL_EPOCHS}"],
                     "control: DAM's learned masks permuted within each tensor", True),
    "dam_code": ("dam.yaml", ["--model.init_args.detection_mask=false", "--model.init_args.safe_loss=entropy",
                              "--model.init_args.safety_weight=0.1", "--model.init_args.reset_merge_weights=true",
                              "--model.init_args.mask_optimizer.init_args.lr=0.001",
                              "--model.init_args.trigger_optimizer.init_args.lr=0.0001",
                              "--model.init_args.discrete=sample"],
                 "DAM, the released code's settings (one mask, lr 1e-3, sampled final mask)", True),
}  # fmt: skip


def _merges(backdoors: int) -> list[Stage]:
    names = {"gtsrb": "gtsrb_badnets", "eurosat": "eurosat_badnets" if backdoors == 2 else "eurosat"}
    models = ",".join(f"{{artifact:pool/{names.get(t, t)}}}" for t in TASKS)
    pool = ["--model.init_args.pretrained={artifact:pool/pretrained}", f"--model.init_args.task_models=[{models}]",
            "--data.init_args.seed={seed}"]  # fmt: skip
    group = f"merge/bd{backdoors}"
    title = f"{backdoors} backdoored model{'s' if backdoors > 1 else ''} in the pool"
    return merge_stages(METHODS, pool, "merging/clip", group, title)


COMPARISONS["dam_clip"] = Comparison(
    title="Merging CLIP ViT-B/32 task models on 8 image tasks with backdoored members: TA, TIES, DARE, AdaMerging, DAM",
    stages=[*POOL, *_merges(1), *_merges(2)],
    columns={"test/acc": "avg acc (%)", "test/asr": "avg ASR (%)", "test/gtsrb/acc": "GTSRB",
             "test/gtsrb/asr": "GTSRB ASR", "test/eurosat/acc": "EuroSAT", "test/eurosat/asr": "EuroSAT ASR",
             "mask/kept": "kept", "mask/shared_moved": "|logit|>1"},
    seeds=(0, 1),
    notes="Pool rows: each model on its own task (the pretrained row: a linear probe of the frozen tower on MNIST). "
    "Merge rows: the merged CLIP tower with each task's own head, on every task's full test split; avg acc over the 8 "
    "tasks, avg ASR over the backdoored task models (GTSRB; GTSRB and EuroSAT). Learned merges see only 1,000 "
    "unlabelled held-out training images per task. Run seed = pool seed; one row per merge seed (the paired "
    "differences: recipes.comparisons.dam.paired_table). kept: DAM's kept fraction; |logit|>1: the fraction of "
    "shared-mask logits that left (-1, 1).",
)
