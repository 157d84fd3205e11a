"""Benign local training and what a client sees in a round."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.ops.augment import random_crop_flip
from lightning_modules.ops.schedules import multistep_lr


class LocalTrainer:
    """Benign local training: SGD with momentum and weight decay on cross-entropy, reshuffled every epoch.

    Args:
        lr: learning rate.
        momentum: SGD momentum.
        weight_decay: L2 weight decay.
        local_epochs: passes over the client's data.
        batch_size: local batch size.
        max_steps: stop after this many steps in total (``None``: run all epochs).
        lr_milestones: local epochs at which the learning rate is multiplied by ``lr_gamma`` (a ``MultiStepLR``
            over local epochs, as Chameleon's attacker uses; empty: constant).
        lr_gamma: decay factor at each milestone.
        step_lr_at_epoch_start: ``False``: a milestone ``m`` counts completed epochs (torch's documented use,
            ``scheduler.step()`` after each epoch); ``True``: it counts started epochs, as Chameleon's official
            code, which calls ``scheduler.step()`` before each epoch, so every decay comes one epoch earlier
            (milestones [3, 5] over 5 epochs: lr factors 1, 1, γ, γ, γ²; see
            :func:`~lightning_modules.ops.schedules.multistep_lr`).
        augment: random crop (``crop_padding`` pixels, the fill given to :meth:`train`) and horizontal flip of
            every batch, the CIFAR-10 training transform of Chameleon's official code; off for digits.
        crop_padding: padding of the random crop.
    """

    def __init__(
        self, lr: float = 0.05, momentum: float = 0.9, weight_decay: float = 5e-4, local_epochs: int = 1,
        batch_size: int = 64, max_steps: int | None = None, lr_milestones: list[int] | None = None,
        lr_gamma: float = 0.1, step_lr_at_epoch_start: bool = False, augment: bool = False, crop_padding: int = 4,
    ):  # fmt: skip
        if lr <= 0 or local_epochs < 1 or batch_size < 1 or (max_steps is not None and max_steps < 1):
            raise ValueError("LocalTrainer needs lr > 0, local_epochs >= 1, batch_size >= 1 and max_steps >= 1")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.local_epochs, self.batch_size, self.max_steps = local_epochs, batch_size, max_steps
        self.lr_milestones, self.lr_gamma = sorted(lr_milestones or []), lr_gamma
        self.step_lr_at_epoch_start, self.augment, self.crop_padding = step_lr_at_epoch_start, augment, crop_padding

    def with_overrides(self, **changes: Any) -> LocalTrainer:
        """A copy with some settings replaced (``None`` values keep this trainer's), e.g.
        ``with_overrides(lr=0.1, local_epochs=5)``; an unknown name raises ``TypeError``."""
        out = copy.copy(self)
        for name, value in changes.items():
            if name not in vars(self):
                raise TypeError(f"LocalTrainer has no setting {name!r}")
            if value is not None:
                setattr(out, name, sorted(value) if name == "lr_milestones" else value)
        return out

    def epoch_lr(self, epoch: int) -> float:
        """The learning rate of local epoch ``epoch`` (0-based)."""
        return multistep_lr(self.lr, epoch, self.lr_milestones, self.lr_gamma, self.step_lr_at_epoch_start)

    def train(
        self, model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator,
        transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
        loss_fn: Callable[[nn.Module, Tensor, Tensor], Tensor] | None = None,
        after_epoch: Callable[[nn.Module, int, float], bool] | None = None, pad_value: float = 0.0,
    ) -> None:  # fmt: skip
        """Train ``model``'s trainable parameters in place on ``(x, y)``. Hooks for attacks: ``transform`` edits
        each batch (poisoning; after the augmentation, as the official code stamps the trigger on augmented
        tensors), ``after_step`` runs after every optimizer step (projections), ``loss_fn(model, xb, yb)``
        replaces the cross-entropy (e.g. a contrastive loss), ``after_epoch(model, epoch, mean loss)`` returns
        ``True`` to stop early. ``pad_value``: the random crop's fill (the normalised value of a black pixel)."""
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        model.train()
        steps = 0
        for epoch in range(self.local_epochs):
            for group in opt.param_groups:
                group["lr"] = self.epoch_lr(epoch)
            perm = torch.randperm(len(y), generator=generator).to(y.device)
            total, batches = 0.0, 0
            for start in range(0, len(y), self.batch_size):
                idx = perm[start : start + self.batch_size]
                xb, yb = x[idx], y[idx]
                if self.augment:
                    xb = random_crop_flip(xb, self.crop_padding, generator, pad_value)
                if transform is not None:
                    xb, yb = transform(xb, yb)
                loss = F.cross_entropy(model(xb), yb) if loss_fn is None else loss_fn(model, xb, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if after_step is not None:
                    after_step(model)
                steps += 1
                if after_epoch is not None:  # a host sync per step, only when someone listens
                    total, batches = total + float(loss.detach()), batches + 1
                if self.max_steps is not None and steps >= self.max_steps:
                    return
            if after_epoch is not None and after_epoch(model, epoch, total / max(batches, 1)):
                return


@dataclass
class ClientContext:
    """What a client knows in a round: the broadcast global model and the previous server step."""

    round: int
    client: int
    global_params: list[Tensor]  # the global model's parameters (read-only)
    global_flat: Tensor
    last_server_update: Tensor | None  # G_t − G_{t−1}, None in the first round
    datamodule: Any  # a FederatedDataModule (client data, poison_batch)
    local: LocalTrainer  # the round's benign trainer (its lr may follow the recipe's round schedule)
    generator: torch.Generator
    pad_value: float = 0.0  # the normalised value of a black pixel (the random crop's fill)
    round_seed: int = 0  # shared by every client of the round: draws colluders make together
