"""Image tasks for model merging: one task for fine-tuning a task model (:class:`TaskImageDataModule`), all of
them at once for merging and its per-task evaluation (:class:`MultiTaskDataModule`).

A task is a dataset (MNIST, Fashion-MNIST, scikit-learn digits) resized to one common size, a label rule and an
optional backdoor. Label rules: ``class`` (the dataset's labels), ``parity`` (digit labels mod 2) and
``rotation`` (each image rotated by a seeded multiple of 90 degrees, the label is that multiple: the pretext
task of Gidaris et al., "Unsupervised Representation Learning by Predicting Image Rotations", ICLR 2018, used
to pretrain the pool's backbone on unlabelled images). Triggers are stamped in pixel space after resizing, then
images are standardised with the mean and std of the first 10,000 training images of the dataset. Both
DataModules build a task through :func:`build_task`, so a task model and the merge see the same data and the
same trigger.

A task's ``dataset`` may also be the directory of a hub dataset exported by ``python -m foundation.export_images``
(:mod:`foundation.image_store`: ``uint8`` RGB images, memory-mapped). Such a task keeps its images ``uint8`` and
turns each batch into normalised floats when it is fetched (CLIP's mean and std with ``normalize: clip``), and
stamps its trigger per batch on the poisoned rows, so eight 224 x 224 tasks fit in a few MB of RAM.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from foundation import image_store
from datamodules.base import BackdoorDataModule, TensorBatchDataset, _already_batched
from datamodules.poisoning import Poisoning
from datamodules.sources import load_image_dataset

Dataset = Literal["mnist", "fashion-mnist", "digits"]
BUILTIN_DATASETS = ("mnist", "fashion-mnist", "digits")
Labels = Literal["class", "parity", "rotation"]


class ImageTask:
    """One image task of a merge pool.

    Args:
        name: the task's name in logs (``test/<name>/acc``) and tables.
        dataset: source images (``digits`` are 8x8 and get resized), or the directory of an exported hub dataset
            (``python -m foundation.export_images``; a path, e.g. ``data/clip/sun397``).
        labels: ``class``, ``parity`` (digits mod 2) or ``rotation`` (0/90/180/270 degrees); exported datasets
            have ``class`` labels only.
        poisoning: the task's backdoor; with ``rate: 0`` only the triggered evaluation set is built.
        train_size: training images (``None``: all but validation).
        val_size: validation images held out of the training split (also the unlabelled merge data).
        test_size: images of the fixed test split (``None``: all).
        normalize: ``dataset`` (standardise with the dataset's own statistics) or ``clip`` (CLIP's per-channel mean
            and std, for CLIP backbones; exported RGB datasets only).
    """

    def __init__(
        self,
        name: str,
        dataset: Dataset | str = "mnist",
        labels: Labels = "class",
        poisoning: Poisoning | None = None,
        train_size: int | None = None,
        val_size: int = 1000,
        test_size: int | None = None,
        normalize: Literal["dataset", "clip"] = "dataset",
    ):
        if labels == "parity" and dataset == "fashion-mnist":
            raise ValueError("parity labels are defined for digit datasets (mnist, digits), not fashion-mnist")
        if dataset in BUILTIN_DATASETS and normalize != "dataset":
            raise ValueError(f"normalize={normalize!r} needs an exported RGB dataset directory, not {dataset!r}")
        self.name, self.dataset, self.labels, self.poisoning = name, dataset, labels, poisoning
        self.train_size, self.val_size, self.test_size, self.normalize = train_size, val_size, test_size, normalize

    @property
    def exported(self) -> bool:
        """Whether ``dataset`` names an exported directory rather than a built-in dataset."""
        return self.dataset not in BUILTIN_DATASETS

    def describe(self) -> dict:
        out = {"task": self.name, "dataset": self.dataset, "labels": self.labels}
        if self.poisoning is not None:
            out["poisoning"] = self.poisoning.describe()
        return out


@dataclass
class TaskSplits:
    """Standardised tensors of one task: ``train``/``val``/``test`` = (x, y); ``*_triggered`` when poisoned."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    val_triggered: tuple[torch.Tensor, torch.Tensor] | None
    test_triggered: tuple[torch.Tensor, torch.Tensor] | None
    num_classes: int
    poison_mask: torch.Tensor | None


def _relabel(x: torch.Tensor, y: torch.Tensor, labels: str, seed: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    if labels == "class":
        return x, y, 10
    if labels == "parity":
        return x, y % 2, 2
    turns = torch.randint(0, 4, (len(y),), generator=torch.Generator().manual_seed(seed))
    x = x.clone()
    for k in range(1, 4):
        x[turns == k] = torch.rot90(x[turns == k], k, dims=(-2, -1))
    return x, turns, 4


def build_task(task: ImageTask, image_size: int, seed: int) -> TaskSplits:
    """Load, resize, relabel, poison (training split) and standardise one task; deterministic given ``seed``."""
    if task.exported:
        return build_exported_task(task, image_size, seed)
    raw = load_image_dataset(task.dataset)

    def prep(images: torch.Tensor) -> torch.Tensor:  # uint8 [N, H, W] -> float [N, 1, S, S] in [0, 1]
        x = images.float().div(255.0).unsqueeze(1)
        if x.shape[-1] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False).clamp(0, 1)
        return x

    perm = torch.randperm(len(raw.train_y), generator=torch.Generator().manual_seed(seed))
    n_val = min(task.val_size, len(perm) - 1)
    n_train = len(perm) - n_val if task.train_size is None else min(task.train_size, len(perm) - n_val)
    val_idx, train_idx = perm[:n_val], perm[n_val : n_val + n_train]
    n_test = BackdoorDataModule.head(task.test_size, len(raw.test_y))
    splits = {}
    for i, (name, images, y) in enumerate((("train", raw.train_x[train_idx], raw.train_y[train_idx]),
                                           ("val", raw.train_x[val_idx], raw.train_y[val_idx]),
                                           ("test", raw.test_x[:n_test], raw.test_y[:n_test]))):  # fmt: skip
        x, y, num_classes = _relabel(prep(images), y, task.labels, seed * 3 + i)
        splits[name] = (x, y)
    reference = prep(raw.train_x[:10000])  # fixed statistics: the same for every seed and training size
    mean, std = float(reference.mean()), float(reference.std())

    def norm(pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return (pair[0] - mean) / std, pair[1]

    poison_mask, triggered = None, {"val": None, "test": None}
    if task.poisoning is not None:
        x, y, poison_mask = task.poisoning.poison_images(*splits["train"], num_classes)
        splits["train"] = (x, y)
        triggered = {s: norm(task.poisoning.triggered_images(*splits[s])) for s in ("val", "test")}
    return TaskSplits(norm(splits["train"]), norm(splits["val"]), norm(splits["test"]), triggered["val"],
                      triggered["test"], num_classes, poison_mask)  # fmt: skip


def build_exported_task(task: ImageTask, image_size: int, seed: int) -> TaskSplits:
    """:func:`build_task` for an exported directory: the same seeded train/validation split of the training images
    and the same poisoning choice (:meth:`Poisoning.select`), but the splits are lazy
    :class:`~foundation.image_store.ImageArray` views (``uint8`` on disk, decoded, triggered and normalised per
    batch) instead of float tensors."""
    if "/" not in task.dataset and not task.dataset.startswith("."):
        raise ValueError(f"unknown image dataset {task.dataset!r}: use one of {BUILTIN_DATASETS} or the path of a "
                         "directory exported by `python -m foundation.export_images`")  # fmt: skip
    meta = image_store.read_meta(task.dataset)
    if task.labels != "class":
        raise ValueError(f"labels={task.labels!r} is defined for the built-in datasets; {task.dataset} has class "
                         "labels only (labels: class)")  # fmt: skip
    files = {s: f"{task.dataset}/{s}_images.npy" for s in image_store.SPLITS}
    train_y, test_y = image_store.read_labels(task.dataset, "train"), image_store.read_labels(task.dataset, "test")
    perm = torch.randperm(len(train_y), generator=torch.Generator().manual_seed(seed))
    n_val = min(task.val_size, len(perm) - 1)
    n_train = len(perm) - n_val if task.train_size is None else min(task.train_size, len(perm) - n_val)
    val_idx, train_idx = perm[:n_val], perm[n_val : n_val + n_train]
    test_idx = torch.arange(BackdoorDataModule.head(task.test_size, len(test_y)))
    if task.normalize == "clip":
        mean, std = image_store.CLIP_MEAN, image_store.CLIP_STD
    else:  # fixed statistics: the same for every seed and training size
        mean, std = image_store.channel_stats(files["train"])

    def view(split: str, rows: torch.Tensor) -> image_store.ImageArray:
        return image_store.ImageArray(files[split], rows, mean, std, image_size)

    train_x, labels = view("train", train_idx), train_y[train_idx].clone()
    val, test = (view("train", val_idx), train_y[val_idx]), (view("test", test_idx), test_y[test_idx])
    num_classes, poison_mask, triggered = int(meta["num_classes"]), None, {"val": None, "test": None}
    if task.poisoning is not None:  # BadNets: flag the chosen rows (stamped when fetched) and relabel them
        p = task.poisoning
        p.trigger.check(tuple(train_x.shape[1:]))
        poison_mask = p.select(labels, num_classes)
        train_x = train_x.subset(slice(None), p.trigger, poison_mask)
        labels[poison_mask] = p.target_label
        for name, (x, y) in (("val", val), ("test", test)):
            keep = y != p.target_label
            if not keep.any():
                raise ValueError(f"the {name} split of {task.name!r} has no non-target sample to measure ASR on")
            triggered[name] = (x.subset(keep, p.trigger, torch.ones(int(keep.sum()), dtype=torch.bool)), y[keep])
    return TaskSplits((train_x, labels), val, test, triggered["val"], triggered["test"], num_classes, poison_mask)


class TaskImageDataModule(BackdoorDataModule):
    """One :class:`ImageTask` as an ordinary (possibly backdoored) classification DataModule, for training a
    task model (or the backbone) with ``ClassifierRecipe``.

    Args:
        task: the task (its ``poisoning`` backdoors the training split).
        image_size: side every image is resized to (the pool shares one backbone, so one size).
        eval_batch_size: batch size of evaluation loaders.

    The arguments of :class:`~datamodules.base.BackdoorDataModule` pass through (``batch_size``, ``shuffle``,
    ``num_workers``, ``seed``: of subsetting, the validation split and rotations), all but ``poisoning``: the
    task's.
    """

    def __init__(self, task: ImageTask, image_size: int = 28, eval_batch_size: int | None = 1000, **kwargs):
        super().__init__(poisoning=task.poisoning, eval_batch_size=eval_batch_size, **kwargs)
        self.task, self.image_size = task, image_size
        # an exported task's class count is in its meta.json (read in setup, which also names a missing export)
        self.num_classes = 0 if task.exported else {"class": 10, "parity": 2, "rotation": 4}[task.labels]

    def describe(self) -> dict:
        return {**super().describe(), **self.task.describe()}

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        s = build_task(self.task, self.image_size, self.seed)
        self.num_classes, self.poison_mask = s.num_classes, s.poison_mask
        self.train_set = TensorBatchDataset(*s.train)
        self.val_sets = [TensorBatchDataset(*s.val)]
        self.test_sets = [TensorBatchDataset(*s.test)]
        if s.test_triggered is not None:
            self.val_sets.append(TensorBatchDataset(*s.val_triggered))
            self.test_sets.append(TensorBatchDataset(*s.test_triggered))


class MultiTaskDataModule(L.LightningDataModule):
    """Every task of a merge pool: unlabelled adaptation images for learned merges and per-task evaluation.

    Training batches are ``{task name: (images,)}``, one batch per task (Lightning's ``CombinedLoader``,
    ``max_size_cycle``): the *unlabelled* validation images of each task (the merge never sees a label or a
    trigger; AdaMerging and DAM use unlabelled test images, we keep the test split for evaluation only).
    Validation and test loaders are, per task in order, the clean loader and, if the task has a poisoning,
    its triggered non-target loader; :attr:`eval_index` maps a dataloader index to ``(task index, kind)``.

    Args:
        tasks: the pool's tasks, in the order of the merge recipe's task models.
        image_size: common image side.
        batch_size: unlabelled images per task and step.
        eval_batch_size: batch size of evaluation loaders.
        num_workers: DataLoader worker processes.
        seed: seed of subsetting, validation splits and rotations (use the task models' seed, so the merge's
            unlabelled images are held out of their training sets).
        shuffle_seed: seed of the order of the unlabelled batches (``None``: ``seed``); a paired design varies
            it as the merge seed on one pool.
    """

    def __init__(
        self,
        tasks: list[ImageTask],
        image_size: int = 28,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_seed: int | None = None,
    ):
        super().__init__()
        names = [t.name for t in tasks]
        if not tasks or len(set(names)) != len(names):
            raise ValueError(f"tasks need distinct names, got {names}")
        self.tasks, self.image_size, self.batch_size = tasks, image_size, batch_size
        self.eval_batch_size, self.num_workers, self.seed = eval_batch_size, num_workers, seed
        self.shuffle_seed = seed if shuffle_seed is None else shuffle_seed
        self.splits: list[TaskSplits] = []
        self.eval_index: list[tuple[int, str]] = []

    @property
    def num_classes(self) -> list[int]:
        return [s.num_classes for s in self.splits]

    def describe(self) -> dict:
        return {"datamodule": type(self).__name__, "tasks": [t.describe() for t in self.tasks]}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        for task in self.tasks:
            poisoning = task.poisoning
            if poisoning is not None and poisoning.rate > 0:  # the merge only needs the trigger's eval sets
                poisoning = copy.copy(poisoning)
                poisoning.rate = 0.0
            clean = copy.copy(task)
            clean.poisoning = poisoning
            self.splits.append(build_task(clean, self.image_size, self.seed))
        self.eval_index = [(k, kind) for k, s in enumerate(self.splits)
                           for kind in ("clean", "triggered")[: 2 if s.test_triggered is not None else 1]]  # fmt: skip

    def _loader(self, tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.shuffle_seed) if shuffle else None
        return DataLoader(TensorBatchDataset(*tensors), batch_size=batch_size, shuffle=shuffle, generator=generator,
                          collate_fn=_already_batched, num_workers=self.num_workers, drop_last=shuffle)  # fmt: skip

    def train_dataloader(self) -> dict[str, DataLoader]:
        return {t.name: self._loader((s.val[0],), self.batch_size, True) for t, s in zip(self.tasks, self.splits)}

    def _eval(self, split: str) -> list[DataLoader]:
        out = []
        for k, kind in self.eval_index:
            s = self.splits[k]
            pair = getattr(s, split) if kind == "clean" else getattr(s, f"{split}_triggered")
            out.append(self._loader(pair, self.eval_batch_size, False))
        return out

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval("test")
