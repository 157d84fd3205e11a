"""Base class of every recipe: the hooks that the artifact export and the reproduction runner rely on."""

from __future__ import annotations

import lightning as L
import torch


class BaseRecipe(L.LightningModule):
    """A LightningModule that knows what it exports.

    Subclasses override :meth:`artifact_state_dict` (what a later stage loads), :meth:`artifact_metadata`
    (trigger, target, ... for the manifest) and :meth:`artifact_parents` (the artifacts it started from).
    ``monitor``/``mode`` tell callbacks which metric says "better".
    """

    monitor: str = "val/acc"
    mode: str = "max"

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def artifact_metadata(self) -> dict:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        return dm.describe() if hasattr(dm, "describe") else {}

    def artifact_parents(self) -> list[dict]:
        return []
