"""Fixed merge rules: task vectors ``tau_k = theta_k - theta_0`` in, one merged task vector out. Injected into
:class:`~lightning_modules.merging.MergeRecipe` as its ``rule``; the tensor math is :mod:`lightning_modules.ops.merging`
(which uses ``peft.utils.merge_utils``).

- :class:`TaskArithmetic` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023),
- :class:`Ties` (Yadav et al., "TIES-Merging", NeurIPS 2023; per task vector or per tensor trimming),
- :class:`Dare` (Yu et al., "Language Models are Super Mario", ICML 2024).

A new rule subclasses :class:`MergeRule` and implements :meth:`MergeRule.merge`.
"""

from __future__ import annotations

from typing import Literal

import torch

from lightning_modules.ops import merging as ops


class MergeRule:
    """A fixed merge rule: task vectors in, one merged task vector out."""

    def merge(self, task_vectors: list[ops.StateDict]) -> ops.StateDict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"rule": type(self).__name__, **vars(self)}


class TaskArithmetic(MergeRule):
    """``tau = lambda * sum_k tau_k`` (Ilharco et al., 2023; lambda ~0.3 for 8 CLIP tasks).

    Args:
        scaling: the coefficient ``lambda`` of every task vector.
    """

    def __init__(self, scaling: float = 0.3):
        self.scaling = float(scaling)

    def merge(self, task_vectors: list[ops.StateDict]) -> ops.StateDict:
        return ops.task_arithmetic(task_vectors, torch.full((len(task_vectors),), self.scaling))


class Ties(MergeRule):
    """TIES-Merging: trim to the top ``density`` magnitudes, elect signs, disjoint mean, times ``scaling``.

    Args:
        density: fraction of entries kept by the trim (the paper's k = 20%).
        scaling: ``lambda`` applied to the disjoint mean (the paper tunes it on validation data; 1 is its default).
        trim: ``task`` trims over the whole task vector (the paper, fusion_bench); ``tensor`` per tensor (peft).
        majority_sign_method: ``total`` (sign of the summed mass, the paper) or ``frequency`` (sign count).
    """

    def __init__(
        self,
        density: float = 0.2,
        scaling: float = 1.0,
        trim: Literal["task", "tensor"] = "task",
        majority_sign_method: Literal["total", "frequency"] = "total",
    ):
        self.density, self.scaling, self.trim = float(density), float(scaling), trim
        self.majority_sign_method = majority_sign_method

    def merge(self, task_vectors: list[ops.StateDict]) -> ops.StateDict:
        weights = torch.full((len(task_vectors),), self.scaling)
        return ops.ties(task_vectors, weights, self.density, self.trim, self.majority_sign_method)


class Dare(MergeRule):
    """DARE: drop entries with probability ``1 - density`` and rescale by ``1/density``, then task arithmetic
    (``linear``) or TIES (``ties``).

    Args:
        density: keep probability (the paper drops 90% of LLM deltas; small CNN deltas tolerate less).
        scaling: coefficient of every task vector.
        merge: ``linear`` (DARE + task arithmetic) or ``ties`` (DARE + TIES' sign election).
        seed: seed of the random drop.
    """

    def __init__(
        self, density: float = 0.5, scaling: float = 0.3, merge: Literal["linear", "ties"] = "linear", seed: int = 0
    ):
        self.density, self.scaling, self.merge_with, self.seed = float(density), float(scaling), merge, int(seed)

    def merge(self, task_vectors: list[ops.StateDict]) -> ops.StateDict:
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            return ops.dare(task_vectors, torch.full((len(task_vectors),), self.scaling), self.density, self.merge_with)
