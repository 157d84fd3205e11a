"""Save a resumable checkpoint when the job is preempted (SIGTERM, SLURM requeue)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class CheckpointOnPreemption(pl.Callback):
    """On SIGTERM, write ``last.ckpt`` (where ``--ckpt_path last`` finds it) before the process exits.

    Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary (for federated recipes, the
    next round boundary), on every rank; this callback then saves the full training state, which the
    trainer's checkpoint IO (:class:`~recipes.checkpoint_io.SafeCheckpointIO` under ``python -m recipes``)
    writes atomically. Under SLURM with ``--signal=SIGUSR1@90`` Lightning's own handler also saves an
    ``hpc_ckpt_*.ckpt`` and requeues the job, which resumes from it. Any other exception (a NaN global model,
    a bug) saves nothing, so the last good checkpoint stays the newest one. ``python -m recipes`` installs
    this callback on every trainer.

    Args:
        filename: Checkpoint file name, in the ``ModelCheckpoint`` directory (``<log dir>/checkpoints``).
    """

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved_path: Optional[Path] = None

    def checkpoint_dir(self, trainer: pl.Trainer) -> Path:
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                return Path(cb.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or not trainer.training:
            return
        path = self.checkpoint_dir(trainer) / self.filename
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(f"SIGTERM: saved {path} at step {trainer.global_step}; resume with --ckpt_path last")
