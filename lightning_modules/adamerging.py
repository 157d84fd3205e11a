"""AdaMerging (Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024): a merge recipe
whose coefficients are learned by minimising the prediction entropy on unlabelled images. DAM builds on it
(:mod:`lightning_modules.dam`).
"""

from __future__ import annotations

from typing import Literal

import torch
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.merging import MergeRecipe
from lightning_modules.ops import merging as ops


class AdaMerging(MergeRecipe):
    """AdaMerging: learn the merge coefficients by entropy minimisation on unlabelled data (Yang et al., ICLR 2024).

    ``theta = theta_0 + sum_k lambda_{k(,l)} tau_{k(,l)}``; each step takes one batch of unlabelled images per
    task and minimises ``sum_k H(softmax(head_k(f_theta(x_k))))``. Coefficients start at ``init`` (0.3, the
    paper and fusion_bench) and are clamped to ``[0, 1]`` when used (fusion_bench's ``clamp_weights``).

    Args:
        net: the pool's architecture (see :class:`~lightning_modules.merging.MergeRecipe`).
        granularity: ``task`` (one coefficient per task) or ``layer`` (one per task and tensor, the paper's best).
        init: initial coefficient.
        clamp: clamp the coefficients to ``[0, 1]``.
        optimizer: optimizer of the coefficients (the paper: Adam, lr 1e-3).

    The arguments of :class:`~lightning_modules.merging.MergeRecipe` pass through (``pretrained``, ``task_models``,
    ``head_prefix``), all but its fixed ``rule``: the learned coefficients are the rule.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        granularity: Literal["task", "layer"] = "layer",
        init: float = 0.3,
        clamp: bool = True,
        optimizer: OptimizerCallable = torch.optim.Adam,
        **kwargs,
    ):
        super().__init__(net=net, rule=None, **kwargs)
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.granularity, self.init, self.clamp, self.optimizer = granularity, float(init), clamp, optimizer
        self.merge_weights: nn.Parameter | None = None

    def configure_model(self) -> None:
        if self.merge_weights is not None:
            return
        super().configure_model()
        num_tasks = len(self.task_vectors)
        shape = (num_tasks,) if self.granularity == "task" else (num_tasks, len(self.pretrained_state))
        self.merge_weights = nn.Parameter(torch.full(shape, self.init))
        for p in [*self.net.parameters(), *self.heads.parameters()]:
            p.requires_grad_(False)

    def coefficients(self) -> torch.Tensor:
        return self.merge_weights.clamp(0.0, 1.0) if self.clamp else self.merge_weights

    def merged_state(self, masks: list[ops.StateDict | None] | None = None) -> ops.StateDict:
        return ops.weighted_merge(self.pretrained_state, self.task_vectors, self.coefficients(), masks)

    def entropy_loss(
        self, batch: dict, state: ops.StateDict, perturbations: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``sum_k H(head_k(f_state(x_k (+ delta_k))))`` over the tasks of one unlabelled batch."""
        total = 0.0
        for k, name in enumerate(self.task_names):
            x = batch[name][0]
            if perturbations is not None:
                x = x + perturbations[k]
            total = total + ops.entropy(self.forward_merged(x, k, state))
        return total

    def configure_optimizers(self):
        return self.optimizer([self.merge_weights])

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        opt = opt[0] if isinstance(opt, list) else opt  # subclasses add optimizers after the coefficients'
        loss = self.entropy_loss(batch, self.merged_state())
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        self.log("train/entropy", loss, prog_bar=True)
        return loss

    def describe_merge(self) -> dict:
        return {"rule": type(self).__name__, "granularity": self.granularity,
                "coefficients": self.coefficients().detach().cpu().tolist()}  # fmt: skip
