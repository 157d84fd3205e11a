"""Poisoning: turn a clean training set into a backdoored one, and build the triggered evaluation set.

A :class:`Poisoning` names a trigger, a poison rate (fraction of the *whole* training set), a target label
and the flavour:

- dirty-label (BadNets): poisoned samples are drawn from non-target classes and relabelled to the target;
- clean-label (as W2SDefense's official code): poisoned samples are drawn from the target class and keep
  their label, so only the trigger-target correlation is planted.

The triggered evaluation set holds every *non-target* test sample with the trigger applied and its
original label; the attack success rate (ASR) is the fraction of it classified as the target.
A rate of 0 trains a clean model but still measures ASR with the same trigger (the clean baseline).
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from datamodules.triggers import ImageTrigger, TextTrigger


class Poisoning:
    """Backdoor poisoning of a training set.

    Args:
        trigger: the trigger stamped into poisoned samples (an image or a text trigger).
        rate: fraction of the training set that is poisoned, in ``[0, 1)``; 0 gives a clean model
            whose ASR is still measured.
        target_label: the label the backdoor maps triggered inputs to.
        clean_label: draw poisoned samples from the target class and keep their labels (clean-label);
            otherwise draw them from the other classes and relabel them (dirty-label).
        seed: seed of the choice of poisoned samples and of random trigger positions.
        selection: ``random`` (a seeded draw of the eligible samples) or ``first`` (the first eligible samples in
            dataset order, as W2SDefense's official attack takes the first 1000 label-0 sentences of SST-2's
            training file; Zhao et al., Findings of ACL 2025, ``data.py``).
    """

    def __init__(
        self,
        trigger: ImageTrigger | TextTrigger,
        rate: float = 0.1,
        target_label: int = 0,
        clean_label: bool = False,
        seed: int = 0,
        selection: Literal["random", "first"] = "random",
    ):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"poison rate must be in [0, 1), got {rate}")
        if selection not in ("random", "first"):
            raise ValueError(f"selection must be 'random' or 'first', got {selection!r}")
        self.trigger, self.rate, self.target_label = trigger, float(rate), int(target_label)
        self.clean_label, self.seed, self.selection = bool(clean_label), int(seed), selection

    def check_labels(self, labels: torch.Tensor, num_classes: int) -> None:
        if labels.numel() == 0:
            raise ValueError("cannot poison an empty training split; check the dataset sizes")
        if not 0 <= self.target_label < num_classes:
            raise ValueError(f"target_label {self.target_label} is out of range for {num_classes} classes")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"labels must lie in [0, {num_classes}), found [{labels.min()}, {labels.max()}]")

    def select(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Boolean mask of the training samples to poison (deterministic given ``seed``, or the first eligible ones)."""
        self.check_labels(labels, num_classes)
        pool = labels == self.target_label if self.clean_label else labels != self.target_label
        candidates = pool.nonzero().flatten()
        n = min(round(self.rate * len(labels)), len(candidates))
        if self.rate > 0 and n == 0:
            raise ValueError(
                f"poison rate {self.rate} selects no sample out of {len(labels)} "
                f"({len(candidates)} candidates); raise the rate or the training set size"
            )
        if self.selection == "first":
            order = torch.arange(len(candidates))
        else:
            order = torch.randperm(len(candidates), generator=torch.Generator().manual_seed(self.seed))
        mask = torch.zeros(len(labels), dtype=torch.bool)
        mask[candidates[order[:n]]] = True
        return mask

    def poison_images(
        self, images: torch.Tensor, labels: torch.Tensor, num_classes: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (images, labels, poisoned mask) with the chosen samples triggered and relabelled."""
        mask = self.select(labels, num_classes)
        images, labels = images.clone(), labels.clone()
        if mask.any():
            images[mask] = self.trigger(images[mask])
            labels[mask] = self.target_label
        return images, labels, mask

    def poison_texts(
        self, texts: list[str], labels: torch.Tensor, num_classes: int
    ) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Text version of :meth:`poison_images`."""
        mask = self.select(labels, num_classes)
        texts, labels = list(texts), labels.clone()
        for i in mask.nonzero().flatten().tolist():
            texts[i] = self.trigger.apply(texts[i], random.Random(self.seed * 1_000_003 + i))
        labels[mask] = self.target_label
        return texts, labels, mask

    def triggered_images(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Non-target samples with the trigger applied and their *original* labels."""
        keep = labels != self.target_label
        if not keep.any():
            raise ValueError("the evaluation split has no non-target sample to measure ASR on")
        return self.trigger(images[keep]), labels[keep]

    def triggered_texts(self, texts: list[str], labels: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        keep = (labels != self.target_label).nonzero().flatten().tolist()
        if not keep:
            raise ValueError("the evaluation split has no non-target sample to measure ASR on")
        out = [self.trigger.apply(texts[i], random.Random(-1 - i)) for i in keep]
        return out, labels[keep]

    def describe(self) -> dict:
        return {
            "trigger": self.trigger.describe(),
            "rate": self.rate,
            "target_label": self.target_label,
            "clean_label": self.clean_label,
            "seed": self.seed,
            "selection": self.selection,
        }
