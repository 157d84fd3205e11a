"""Federated image data: a dataset partitioned into clients, held in memory, with the global clean and
triggered test sets that measure main accuracy (MA) and backdoor accuracy (BA).

Lightning sees one training "batch" per federated round. :meth:`FederatedDataModule.train_dataloader`
yields ``rounds_per_epoch`` round placeholders, so an epoch is one evaluation period: validation (MA as
``val/acc``, BA as ``val/asr``) runs at every epoch end, i.e. every ``rounds_per_epoch`` rounds, and
``trainer.max_steps`` is the number of rounds (the recipe's server step is one optimizer step per round, so
``global_step`` counts rounds). The placeholders carry no information: the recipe takes the round index
from ``global_step``, which a resumed run restores exactly.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch

from datamodules.base import BackdoorDataModule, TensorBatchDataset
from datamodules.sources import load_image_dataset
from datamodules.triggers import ImageTrigger
from datamodules.partition import class_partition, dirichlet_partition, iid_partition, shard_partition


class FederatedDataModule(BackdoorDataModule):
    """An image dataset (grayscale, or CIFAR-10 colour) split into ``num_clients`` clients, each with a train and
    a test split.

    Partitions (see :mod:`datamodules.partition`): ``iid`` (McMahan et al. 2017), ``dirichlet``
    label skew (Hsu et al. 2019), ``shards`` (McMahan et al.'s pathological non-IID) and ``classes`` (exactly
    ``classes_per_client`` distinct classes per client, the pathological split of LG-FedAvg, FedRep and
    FedSelect). Clients' data is
    clean; a malicious client poisons its own batches with :meth:`poison_batch`. Images are scaled to
    ``[0, 1]`` (pixel space, where triggers are stamped) and standardised with the mean and std of the
    training pixels, as in :class:`~datamodules.images.ImageClassificationDataModule` (for colour images one mean
    and std over all channels: CIFAR-10's per-channel means, 0.49/0.48/0.45, and stds, 0.25/0.24/0.26, differ
    little).

    Args:
        dataset: ``mnist``, ``fashion-mnist``, ``digits`` (scikit-learn 8x8) or ``cifar10`` (3x32x32; a cluster
            asset: ``python -m foundation.assets download cifar10``).
        num_clients: Number of clients the training split is partitioned into.
        partition: ``iid``, ``dirichlet``, ``shards`` or ``classes``.
        alpha: Dirichlet concentration for ``partition="dirichlet"`` (0.5: moderate skew; must be > 0).
        shards_per_client: Shards per client for ``partition="shards"``.
        min_samples_per_client: Smallest client (train + test) a Dirichlet draw may give; draws are repeated
            until every client has this many.
        client_test_fraction: Fraction of each client's samples held out as its own test split (for
            personalised FL such as FedSelect); 0 keeps all for training.
        train_size: Samples drawn (seeded) from the fixed training split before partitioning (``None``: all).
        test_size: Samples of the fixed test split used as the global test set (``None``: all).
        rounds_per_epoch: Rounds per Lightning epoch, i.e. the evaluation period in rounds.
        eval_batch_size: Batch size of the evaluation loaders.
        classes_per_client: Distinct classes per client for ``partition="classes"``.

    ``poisoning`` (the backdoor whose trigger and target label build the triggered global test set (BA) and that
    attacks stamp into their batches; its ``rate`` is not used: client data stays clean) and ``seed`` (of the
    training subset, the partition and the client test splits) pass through to
    :class:`~datamodules.base.BackdoorDataModule`; the training loader settings do not apply.
    """

    def __init__(
        self,
        dataset: Literal["mnist", "fashion-mnist", "digits", "cifar10"] = "mnist",
        num_clients: int = 100,
        partition: Literal["iid", "dirichlet", "shards", "classes"] = "dirichlet",
        alpha: float = 0.5,
        shards_per_client: int = 2,
        min_samples_per_client: int = 10,
        client_test_fraction: float = 0.0,
        train_size: int | None = None,
        test_size: int | None = None,
        rounds_per_epoch: int = 5,
        eval_batch_size: int = 1000,
        classes_per_client: int = 2,
        **kwargs,
    ):
        super().__init__(batch_size=eval_batch_size, eval_batch_size=eval_batch_size, shuffle=False, num_workers=0,
                         **kwargs)  # fmt: skip
        trigger = None if self.poisoning is None else self.poisoning.trigger
        if trigger is not None and not isinstance(trigger, ImageTrigger):
            raise ValueError(f"{type(trigger).__name__} is a text trigger; image data needs an image trigger")
        if partition not in ("iid", "dirichlet", "shards", "classes"):
            raise ValueError(f"partition must be 'iid', 'dirichlet', 'shards' or 'classes', got {partition!r}")
        if partition == "dirichlet" and not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}; e.g. 0.5, or use partition='iid'")
        if num_clients < 1 or rounds_per_epoch < 1:
            raise ValueError(f"need num_clients >= 1 and rounds_per_epoch >= 1, got {num_clients}, {rounds_per_epoch}")
        if not 0.0 <= client_test_fraction < 1.0:
            raise ValueError(f"client_test_fraction must be in [0, 1), got {client_test_fraction}")
        self.dataset, self.num_clients, self.partition = dataset, num_clients, partition
        self.alpha, self.shards_per_client, self.min_samples_per_client = alpha, shards_per_client, min_samples_per_client
        self.client_test_fraction, self.train_size, self.test_size = client_test_fraction, train_size, test_size
        self.classes_per_client = classes_per_client
        self.rounds_per_epoch = rounds_per_epoch
        self.num_classes = 10
        self.mean, self.std = 0.0, 1.0
        self.train_x: torch.Tensor | None = None
        self.train_y: torch.Tensor | None = None
        self.client_train_idx: list[torch.Tensor] = []
        self.client_test_idx: list[torch.Tensor] = []
        self.holdout: tuple[torch.Tensor, torch.Tensor] | None = None  # test images beyond test_size (server data)

    def setup(self, stage: str | None = None) -> None:
        if self.train_x is not None:
            return
        raw = load_image_dataset(self.dataset)
        self.num_classes = raw.num_classes
        (train_idx,) = self.split(len(raw.train_y), [self.train_size])
        x = self.pixels(raw.train_x[train_idx])
        self.mean, self.std = float(x.mean()), float(x.std())
        self.train_x, self.train_y = self.normalize(x), raw.train_y[train_idx]
        gen = torch.Generator().manual_seed(self.seed)
        if self.partition == "iid":
            parts = iid_partition(len(self.train_y), self.num_clients, gen)
        elif self.partition == "dirichlet":
            parts = dirichlet_partition(self.train_y, self.num_clients, self.alpha, gen, self.min_samples_per_client)
        elif self.partition == "shards":
            parts = shard_partition(self.train_y, self.num_clients, self.shards_per_client, gen)
        else:
            parts = class_partition(self.train_y, self.num_clients, self.classes_per_client, gen)
        self.client_train_idx, self.client_test_idx = [], []
        for i, part in enumerate(parts):
            part = part[torch.randperm(len(part), generator=gen)]
            n_test = int(self.client_test_fraction * len(part))
            if len(part) - n_test < 1:
                raise ValueError(f"client {i} has no training sample left; lower client_test_fraction or num_clients")
            self.client_test_idx.append(part[:n_test].sort().values)
            self.client_train_idx.append(part[n_test:].sort().values)

        n_test = self.head(self.test_size, len(raw.test_y))
        x_test, y_test = self.pixels(raw.test_x[:n_test]), raw.test_y[:n_test]
        self.val_sets = [TensorBatchDataset(self.normalize(x_test), y_test)]
        self.holdout = (self.normalize(self.pixels(raw.test_x[n_test:])), raw.test_y[n_test:])
        if self.poisoning is not None:
            xt, yt = self.poisoning.triggered_images(x_test, y_test)
            self.val_sets.append(TensorBatchDataset(self.normalize(xt), yt))
        self.test_sets = self.val_sets

    @staticmethod
    def pixels(images: torch.Tensor) -> torch.Tensor:
        """uint8 images ``[N, H, W]`` (grayscale) or ``[N, C, H, W]`` -> float ``[N, C, H, W]`` in ``[0, 1]``."""
        x = images.float().div_(255.0)
        return x.unsqueeze(1) if x.dim() == 3 else x

    # ----------------------------------------------------------------------------------- clients
    def client_data(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``i``'s clean training images (normalised, ``[n_i, C, H, W]``) and labels."""
        idx = self.client_train_idx[i]
        return self.client_view(i, self.train_x[idx]), self.train_y[idx]

    def client_test(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Client ``i``'s own test split (empty when ``client_test_fraction`` is 0)."""
        idx = self.client_test_idx[i]
        return self.client_view(i, self.train_x[idx]), self.train_y[idx]

    def client_view(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """How client ``i`` sees normalised images ``x`` (its train and test splits alike): the hook for a
        per-client feature shift (:class:`FeatureShiftFederatedDataModule`); here unchanged."""
        return x

    def num_samples(self, i: int) -> int:
        """Number of training samples of client ``i`` (FedAvg's weight)."""
        return len(self.client_train_idx[i])

    def server_clean_set(self, per_class: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """A small clean set held by the server: ``per_class`` images of every class (seeded) from the test images
        beyond ``test_size``, so it overlaps neither the clients' data nor the evaluation set. A class with fewer
        held-out images gives all it has (a warning says so); a class with none is an error."""
        x, y = self.holdout
        gen = torch.Generator().manual_seed(seed)
        picks, short = [], []
        for c in range(self.num_classes):
            idx = (y == c).nonzero().flatten()
            if len(idx) == 0:
                raise ValueError(
                    f"the server's clean set needs images of class {c} beyond the {self.test_size} evaluation "
                    f"images, found none; lower data.test_size"
                )
            short += [f"{c}: {len(idx)}"] if len(idx) < per_class else []
            picks.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
        if short:
            warnings.warn(f"the server's clean set has fewer than {per_class} held-out images of some classes "
                          f"({', '.join(short)}); lower data.test_size for more", stacklevel=2)  # fmt: skip
        idx = torch.cat(picks).sort().values
        return x[idx], y[idx]

    # ------------------------------------------------------------------------------ poisoning
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Pixel space ``[0, 1]`` -> model input space."""
        return (x - self.mean) / self.std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input space -> pixel space ``[0, 1]``."""
        return x * self.std + self.mean

    def apply_trigger(self, x: torch.Tensor) -> torch.Tensor:
        """Stamp the trigger into normalised images: un-normalise, stamp in pixel space, re-normalise."""
        if self.poisoning is None:
            raise ValueError("this FederatedDataModule has no poisoning; set data.init_args.poisoning for attacks")
        return self.normalize(self.poisoning.trigger(self.denormalize(x)))

    def poison_batch(
        self, x: torch.Tensor, y: torch.Tensor, fraction: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BadNets poisoning of one normalised batch: the first ``round(fraction * len(x))`` samples get the
        trigger and the target label (the batch is already shuffled; Chameleon replaces the first
        ``poison_batch_len`` samples the same way). Returns new tensors."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"poison fraction must be in [0, 1], got {fraction}")
        k = round(fraction * len(x))
        if k == 0:
            return x, y
        x, y = x.clone(), y.clone()
        x[:k] = self.apply_trigger(x[:k])
        y[:k] = self.target_label
        return x, y

    def describe(self) -> dict:
        out = super().describe()
        out["federated"] = {
            "dataset": self.dataset, "num_clients": self.num_clients, "partition": self.partition,
            "alpha": self.alpha, "shards_per_client": self.shards_per_client, "seed": self.seed,
            "classes_per_client": self.classes_per_client,
        }  # fmt: skip
        return out

    # ----------------------------------------------------------------------------- loaders
    def train_dataloader(self) -> RoundLoader:
        """``rounds_per_epoch`` round placeholders, the same on every rank (each rank runs every round and
        trains its share of the round's clients); resumable mid-epoch (see :class:`RoundLoader`)."""
        return RoundLoader(self.rounds_per_epoch)


class RoundLoader:
    """An epoch of ``rounds`` placeholder batches (``tensor([i])``) that Lightning can checkpoint and resume.

    It implements ``state_dict``/``load_state_dict``, so a run preempted in the middle of an evaluation period
    resumes with the rest of that period (validation stays on the same rounds as in an uninterrupted run).
    Not a ``DataLoader``, so Lightning never shards it under DDP.
    """

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self._start = 0  # where the next iteration begins (set by load_state_dict)
        self._position = 0  # placeholders yielded in the current epoch

    def __len__(self) -> int:
        return self.rounds

    def __iter__(self):
        start, self._start = self._start, 0
        for i in range(start, self.rounds):
            self._position = i + 1
            yield torch.tensor([i])

    def state_dict(self) -> dict[str, int]:
        return {"position": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._start = state["position"] % self.rounds


SHIFTS = ("none", "rot90", "rot180", "rot270", "invert", "hflip")


def shift_pixels(x: torch.Tensor, shift: str) -> torch.Tensor:
    """One feature shift of pixel-space images ``[N, C, H, W]`` in ``[0, 1]``: a rotation by 90/180/270 degrees,
    inversion (``1 - x``), a horizontal flip, or ``none``."""
    if shift == "none":
        return x
    if shift.startswith("rot"):
        return torch.rot90(x, int(shift[3:]) // 90, dims=(-2, -1))
    if shift == "invert":
        return 1.0 - x
    if shift == "hflip":
        return x.flip(-1)
    raise ValueError(f"unknown shift {shift!r}; choose from {SHIFTS}")


class FeatureShiftFederatedDataModule(FederatedDataModule):
    """:class:`FederatedDataModule` whose clients fall into groups that see the images differently: client ``i``
    belongs to group ``i % len(shifts)`` and sees every image (train and own test split) through that group's
    :func:`shift_pixels`. Label skew (the partition) and feature shift together leave no fixed split into shared
    and personal layers right for every client: a personal head fits the label skew, a personal body the shift
    (the setting FedSelect's per-parameter selection is built for; cf. its CIFAR-10C experiments). The global
    test set stays unshifted.

    Args:
        shifts: one shift per group, from ``none``, ``rot90``, ``rot180``, ``rot270``, ``invert``, ``hflip``.

    The arguments of :class:`FederatedDataModule` pass through.
    """

    def __init__(self, shifts: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.shifts = list(shifts or ["none", "rot90", "invert", "rot180"])
        bad = [s for s in self.shifts if s not in SHIFTS]
        if bad:
            raise ValueError(f"unknown shifts {bad}; choose from {list(SHIFTS)}")

    def client_shift(self, i: int) -> str:
        """The shift of client ``i``'s group."""
        return self.shifts[i % len(self.shifts)]

    def client_view(self, i: int, x: torch.Tensor) -> torch.Tensor:
        shift = self.client_shift(i)
        return x if shift == "none" else self.normalize(shift_pixels(self.denormalize(x), shift))

    def describe(self) -> dict:
        out = super().describe()
        out["federated"]["shifts"] = self.shifts
        return out
