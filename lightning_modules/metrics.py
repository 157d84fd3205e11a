"""Backdoor metrics as torchmetrics objects (synchronised across processes under DDP)."""

from __future__ import annotations

import torch
from torchmetrics import Metric


class AttackSuccessRate(Metric):
    """Attack success rate: the fraction of triggered inputs whose true label is *not* the target that the
    model classifies as the target (Gu et al., 2017). Samples of the target class are ignored, so a
    triggered evaluation set may include them.

    Args:
        target_label: the backdoor's target class.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, target_label: int):
        super().__init__()
        self.target_label = int(target_label)
        self.add_state("hits", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Args: ``preds`` class indices ``[N]`` or logits ``[N, C]``; ``labels`` the original labels ``[N]``."""
        if preds.dim() == 2:
            preds = preds.argmax(-1)
        if preds.shape != labels.shape:
            raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} differ in shape")
        keep = labels != self.target_label
        self.hits += (preds[keep] == self.target_label).sum()
        self.total += keep.sum()

    def compute(self) -> torch.Tensor:
        return self.hits.float() / self.total.clamp(min=1)
