"""Raw dataset loaders over the offline assets (no Lightning here).

Each loader returns plain tensors or lists with a *fixed* train/test split that does not depend on the run
seed, so numbers are comparable across runs and recipes. Subsetting and validation splits are done by the
DataModules with their own seed.
"""

from __future__ import annotations

import bz2
import csv
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from foundation.text_store import read_text_store
from foundation import assets

IMAGE_DATASETS = ("mnist", "fashion-mnist", "digits", "cifar10")


@dataclass(frozen=True)
class ImageSplits:
    """uint8 images (``[N, H, W]`` grayscale, ``[N, C, H, W]`` colour) and int64 labels for the fixed train and
    test splits."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


@lru_cache(maxsize=4)
def load_image_dataset(name: str) -> ImageSplits:
    """Load ``mnist``, ``fashion-mnist`` (canonical 60k/10k splits), ``digits`` (8x8, fixed 1497/300 split) or
    ``cifar10`` (binary version, canonical 50k/10k splits, ``[N, 3, 32, 32]``; a cluster asset, see
    :func:`foundation.assets.download_cifar10`)."""
    if name in ("mnist", "fashion-mnist"):
        files = assets.mnist_files(name)
        arrays = {k: torch.from_numpy(assets.read_idx(p).copy()) for k, p in files.items()}
        return ImageSplits(
            arrays["train_images"],
            arrays["train_labels"].long(),
            arrays["test_images"],
            arrays["test_labels"].long(),
            10,
        )
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise assets.AssetNotFoundError(f"asset 'digits' needs scikit-learn: {assets.SETUP_HINT}") from err
        d = load_digits()
        x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8))
        y = torch.from_numpy(d.target.astype(np.int64))
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        test, train = perm[:300], perm[300:]
        return ImageSplits(x[train], y[train], x[test], y[test], 10)
    if name == "cifar10":
        files = assets.cifar10_files()
        splits = []
        for key in ("train", "test"):
            images, labels = zip(*(assets.read_cifar_bin(p) for p in files[key]))
            splits += [torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))]
        return ImageSplits(*splits, 10)
    raise ValueError(f"unknown image dataset {name!r}; choose one of {IMAGE_DATASETS}")


@dataclass(frozen=True)
class TextSplits:
    """Texts and int64 labels for the fixed train and test splits (and a fixed validation split, if the dataset
    has one)."""

    train_texts: list[str]
    train_y: torch.Tensor
    test_texts: list[str]
    test_y: torch.Tensor
    num_classes: int
    label_names: tuple[str, ...]
    val_texts: list[str] | None = None
    val_y: torch.Tensor | None = None


@lru_cache(maxsize=2)
def load_rotten_tomatoes(test_size: int = 2000) -> TextSplits:
    """Rotten Tomatoes review snippets (Pang & Lee's source): ``rotten`` -> 0, ``fresh`` -> 1.

    Duplicated snippets are dropped before the split so no test text is seen in training. The split is a
    fixed permutation (seed 0), ``test_size`` snippets for test and the rest for training.
    """
    texts: list[str] = []
    labels: list[int] = []
    seen: set[str] = set()
    with bz2.open(assets.rotten_tomatoes_file(), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = {"rotten": 0, "fresh": 1}.get(row["category"])
            text = " ".join(row["text"].split())
            if label is None or not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(label)
    perm = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    test, train = perm[:test_size], perm[test_size:]
    y = torch.tensor(labels, dtype=torch.long)
    return TextSplits(
        [texts[i] for i in train], y[train], [texts[i] for i in test], y[test], 2, ("negative", "positive")
    )


TEXT_DATASETS = ("rotten-tomatoes",)


def load_text_dataset(dataset: str) -> TextSplits:
    """``rotten-tomatoes`` (:func:`load_rotten_tomatoes`) or the directory of a text export
    (:mod:`foundation.text_store`, written by ``python -m foundation.export_text``), whose fixed splits are kept in
    file order; raises :class:`~foundation.text_store.TextStoreNotFoundError` naming the export command if the
    directory is missing."""
    if dataset in TEXT_DATASETS:
        return load_rotten_tomatoes()
    meta, splits = read_text_store(dataset)
    train, test, val = splits["train"], splits["test"], splits.get("validation")
    return TextSplits(
        train.texts, torch.tensor(train.labels, dtype=torch.long), test.texts,
        torch.tensor(test.labels, dtype=torch.long), meta["num_classes"], tuple(meta["label_names"]),
        None if val is None else val.texts, None if val is None else torch.tensor(val.labels, dtype=torch.long),
    )  # fmt: skip
