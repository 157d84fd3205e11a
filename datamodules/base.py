"""Shared DataModule machinery: in-memory tensor datasets fetched a batch at a time, and the
clean + triggered evaluation contract of every backdoor DataModule.
"""

from __future__ import annotations

from typing import Literal

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from datamodules.poisoning import Poisoning


class TensorBatchDataset(Dataset):
    """Tensors indexed along dim 0, fetched a whole batch at once (``__getitems__``), which is several
    times faster than per-sample collation for small images and pre-tokenized text.

    Args:
        tensors: equally long tensors (inputs..., labels).
        pad_trim: for token tensors ``(input_ids, attention_mask, labels)``: cut each batch to its longest
            sequence, keeping the ``right`` or ``left`` end of the padding side (``None``: no trimming).
    """

    def __init__(self, *tensors: torch.Tensor, pad_trim: Literal["right", "left"] | None = None):
        if not tensors or any(len(t) != len(tensors[0]) for t in tensors):
            raise ValueError("TensorBatchDataset needs tensors of equal length")
        self.tensors, self.pad_trim = tensors, pad_trim

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, index: int):
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]):
        idx = torch.as_tensor(indices, dtype=torch.long)
        batch = [t[idx] for t in self.tensors]
        if self.pad_trim is not None:
            ids, mask = batch[0], batch[1]
            length = max(int(mask.sum(1).max()), 1)
            sl = slice(0, length) if self.pad_trim == "right" else slice(mask.shape[1] - length, None)
            batch[0], batch[1] = ids[:, sl], mask[:, sl]
        return tuple(batch)


def _already_batched(batch):
    return batch


class _EpochRandomSampler(RandomSampler):
    """``RandomSampler`` that records the epoch Lightning announces (``set_epoch``, which Lightning calls on every
    sampler that has it); the order is still drawn from the generator, exactly as a plain ``shuffle=True``."""

    epoch: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch


class ResumableDataLoader(DataLoader):
    """A DataLoader that continues an interrupted pass where it stopped. Lightning saves its :meth:`state_dict` in
    every checkpoint: the generator state from before the current pass drew its order and at the save, how many
    batches the pass has yielded, and the epoch. After :meth:`load_state_dict`, the next pass of the same epoch
    replays the interrupted one, skipping the batches already yielded (a pass that had yielded its last batch ends
    there, drawing what the sampler draws at its end, and a loader that cycles starts its next pass as the
    uninterrupted one would); a pass of a later epoch (the checkpoint fell at an epoch's end, or
    ``limit_train_batches`` cut the pass) draws afresh from the generator state at the save. Without
    it a run resumed mid-epoch starts a fresh shuffle (and Lightning warns that the dataloader is not resumable). The
    skipped batches are loaded and dropped, which is cheap for in-memory tensors. ``shuffle=True`` draws the same
    orders as a plain DataLoader's.
    """

    def __init__(self, dataset, *args, shuffle: bool | None = None, sampler=None, generator=None, **kwargs) -> None:
        if shuffle and sampler is None:
            sampler, shuffle = _EpochRandomSampler(dataset, generator=generator), None
        super().__init__(dataset, *args, shuffle=shuffle, sampler=sampler, generator=generator, **kwargs)
        self._pass_start: torch.Tensor | None = None
        self._yielded = 0
        self._restored: dict | None = None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    def __iter__(self):
        restored, self._restored = self._restored, None
        skip = 0
        if restored is not None:
            same_pass = restored["epoch"] == self._epoch()
            state = restored["generator_start"] if same_pass else restored["generator_now"]
            if state is not None and self.generator is not None:
                self.generator.set_state(state)
            skip = restored["yielded"] if same_pass else 0
        self._pass_start = self.generator.get_state() if self.generator is not None else None
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1
            if self._yielded > skip:
                yield batch

    def state_dict(self) -> dict:
        now = self.generator.get_state() if self.generator is not None else None
        start = self._pass_start if self._pass_start is not None else now  # not iterated yet: it starts here
        return {"generator_start": start, "generator_now": now, "yielded": self._yielded, "epoch": self._epoch()}

    def load_state_dict(self, state: dict) -> None:
        self._restored = dict(state)


class BackdoorDataModule(L.LightningDataModule):
    """Base of classification DataModules with an optional backdoor.

    Subclasses fill ``self.train_set``, ``self.val_sets`` and ``self.test_sets`` (lists of
    :class:`TensorBatchDataset`: clean first, then triggered when a poisoning is configured) in ``setup``.
    Validation and test return ``[clean, triggered]`` loaders; recipes log ``acc`` on the first and
    ``asr`` on the second.

    Args:
        poisoning: the backdoor (trigger, rate, target, clean/dirty label); ``None`` for plain training.
        batch_size: batch size per process.
        eval_batch_size: batch size of evaluation loaders (default: ``batch_size``).
        shuffle: shuffle the training set every epoch.
        num_workers: DataLoader worker processes (the data is in memory, 0 is usually fastest).
        seed: seed of subsetting and validation splits (the fixed test split never changes).
    """

    num_classes: int = 0

    def __init__(
        self,
        poisoning: Poisoning | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.poisoning, self.batch_size = poisoning, batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.shuffle, self.num_workers, self.seed = shuffle, num_workers, seed
        self.train_set: TensorBatchDataset | None = None
        self.val_sets: list[TensorBatchDataset] = []
        self.test_sets: list[TensorBatchDataset] = []
        self.poison_mask: torch.Tensor | None = None

    @property
    def target_label(self) -> int | None:
        return None if self.poisoning is None else self.poisoning.target_label

    def describe(self) -> dict:
        """What an artifact manifest records about the data."""
        out = {"datamodule": type(self).__name__}
        if self.poisoning is not None:
            out["poisoning"] = self.poisoning.describe()
            if self.poison_mask is not None:
                out["poisoning"]["num_poisoned"] = int(self.poison_mask.sum())
        return out

    @staticmethod
    def head(size: int | None, total: int) -> int:
        """How many of the first samples of a fixed split to use: ``size`` capped at ``total`` (``None``: all)."""
        return total if size is None else min(size, total)

    def split(self, n: int, sizes: list[int | None]) -> list[torch.Tensor]:
        """Seeded disjoint index sets of the given sizes (``None``: all that remains) out of ``range(n)``."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed))
        out, start = [], 0
        for size in sizes:
            stop = n if size is None else start + size
            if size is not None and stop > n:
                raise ValueError(f"requested split sizes {sizes} exceed the {n} available samples")
            if stop <= start:
                raise ValueError(f"split sizes {sizes} leave an empty split out of {n} samples")
            out.append(perm[start:stop])
            start = stop
        return out

    def _loader(self, dataset: TensorBatchDataset, train: bool) -> DataLoader:
        sampler = None
        if train:
            # The DataModule owns the distributed sampler (Lightning keeps a DistributedSampler it is given):
            # one permutation drawn from (seed, epoch), each rank taking perm[rank::world]. So 2 processes with
            # batch B see exactly the global batches of 1 process with batch 2B, and epoch e has the same order
            # whether or not the run was resumed. torch.initial_seed() is the run's seed_everything value.
            trainer = self.trainer
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            sampler = DistributedSampler(
                dataset, num_replicas=world, rank=rank, shuffle=self.shuffle,
                seed=self.seed * 7919 + torch.initial_seed(), drop_last=False,
            )
        # the training loader continues an interrupted epoch where it stopped (a resume mid-epoch is exact)
        return (ResumableDataLoader if train else DataLoader)(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=False,
            num_workers=self.num_workers,
            collate_fn=_already_batched,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, train=False) for d in self.val_sets]

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(d, train=False) for d in self.test_sets]

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_sets[0], train=False)
