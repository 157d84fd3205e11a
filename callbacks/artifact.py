"""Export the trained model as a safe artifact (safetensors + manifest) at the end of fit or test."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from foundation.artifacts import save_artifact


class ExportArtifact(pl.Callback):
    """Writes ``<log_dir>/<dirname>/{model.safetensors,manifest.json}`` with :func:`foundation.artifacts.save_artifact`.

    The manifest holds ``recipe`` (the module's import path), ``config`` (the ``config.yaml`` LightningCLI saved in
    the log dir, as text), ``metrics`` (``trainer.callback_metrics``), whatever ``pl_module.artifact_metadata()``
    returns (e.g. trigger and target), and ``parents`` from ``pl_module.artifact_parents()`` (a list of
    :func:`foundation.artifacts.parent_record` dicts). The tensors are ``pl_module.artifact_state_dict()`` if the module
    defines it, else ``pl_module.state_dict()``, copied to the CPU; it is computed on every rank and rank zero
    writes it, so it must hold whole (unsharded) tensors there.

    Args:
        dirname: Name of the artifact directory inside the trainer's log dir (``default_root_dir`` without logger).
        on: When to export: ``"fit_end"`` after training, or ``"test_end"`` after testing.
    """

    def __init__(self, dirname: str = "artifact", on: Literal["fit_end", "test_end"] = "fit_end") -> None:
        if on not in ("fit_end", "test_end"):
            raise ValueError(f"ExportArtifact(on={on!r}) is not supported: use on='fit_end' or on='test_end'")
        self.dirname = dirname
        self.on = on
        self.last_path: Optional[Path] = None

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "fit_end":
            self.export(trainer, pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.on == "test_end":
            self.export(trainer, pl_module)

    def export(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Optional[Path]:
        """Writes the artifact now; returns its path on rank zero, ``None`` elsewhere. Call it on all ranks."""
        # Both on every rank: log_dir broadcasts, and a sharded module's state_dict() gathers collectively.
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        state_dict = getattr(pl_module, "artifact_state_dict", pl_module.state_dict)()
        if not trainer.is_global_zero:
            return None
        config_file = log_dir / "config.yaml"  # written there by LightningCLI's SaveConfigCallback
        manifest: dict[str, Any] = {
            "recipe": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "config": config_file.read_text(encoding="utf-8") if config_file.is_file() else None,
            "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1},
        }
        if hasattr(pl_module, "artifact_metadata"):
            manifest.update(pl_module.artifact_metadata())
        if hasattr(pl_module, "artifact_parents"):
            manifest["parents"] = list(pl_module.artifact_parents())
        self.last_path = save_artifact(log_dir / self.dirname, state_dict, manifest)
        rank_zero_info(f"Exported artifact to {self.last_path}")
        return self.last_path
