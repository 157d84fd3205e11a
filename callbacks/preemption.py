"""Save a resumable checkpoint when the job is preempted (SIGTERM, SLURM's SIGUSR1 + requeue)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

#: Exit status after a preemption: 128 + SIGTERM, what a shell reports for a process killed by SIGTERM, so a
#: scheduler (or ``$?``) never reads a preempted run as a success.
PREEMPTED_EXIT = 128 + signal.SIGTERM


class CheckpointOnPreemption(OnExceptionCheckpoint):
    """Lightning's ``OnExceptionCheckpoint``, for preemption only: on SIGTERM it saves ``checkpoints/preempted.ckpt``.

    Lightning turns SIGTERM into ``SIGTERMException`` at the next batch boundary -- of a training batch (for
    federated recipes: a round), or of a validation batch -- on every rank; this callback then saves the full
    training state wherever that lands in ``fit`` (training, validation, between rounds). ``--ckpt_path last``
    takes the newest of ``last.ckpt``, this file and Lightning's SLURM ``hpc_ckpt_<n>.ckpt``
    (:func:`recipes.resume.resume_candidates`; Lightning's own ``"last"`` also counts this file). Any other
    exception (a NaN global model, a bug) saves nothing, so the last good checkpoint stays the newest, unlike the
    parent class, which saves on every exception. As in the parent, a ``fit`` that finishes removes the file. ``python -m recipes`` installs this callback on every trainer that
    checkpoints, and exits with status :data:`PREEMPTED_EXIT` (143) after the save.

    Under SLURM with ``#SBATCH --signal=SIGUSR1@90 --requeue``, Lightning's ``SLURMEnvironment`` handler saves
    ``hpc_ckpt_<n>.ckpt`` and runs ``scontrol requeue``; SLURM then sends SIGTERM, which lands here.

    Args:
        dirpath: Where to save; ``None``: the first ``ModelCheckpoint``'s directory, else ``<log dir>/checkpoints``
            (resolved when the trainer is built, see :meth:`resolve_dirpath`, or at setup).
        filename: File name without ``.ckpt``.
    """

    def __init__(self, dirpath: Optional[str] = None, filename: str = "preempted") -> None:
        super().__init__(dirpath=dirpath or "", filename=filename)
        self._auto_dir = dirpath is None
        self.saved_path: Optional[Path] = None

    def resolve_dirpath(self, trainer: pl.Trainer) -> None:
        """Sets ``dirpath`` beside the run's checkpoints (needed before ``fit`` resolves ``ckpt_path="last"``)."""
        if not self._auto_dir:
            return
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is not None:
                self.dirpath = str(cb.dirpath)
                return
        self.dirpath = str(Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A save during validation restarts that validation from its first batch on resume.

        The progress counters say "batch 0 started, not processed": Lightning's own restart stage
        ``RESTARTED_MID_EVALUATION`` then goes back and runs the validation again, from a fresh iterator. As saved,
        they would say "k batches done": Lightning would skip the validation of that epoch (its metrics were not
        logged yet, and torchmetrics' partial states are not in the checkpoint), losing that epoch's row.
        """
        if not getattr(self, "_in_validation", False):
            return
        progress = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_loop.val_loop.batch_progress")
        if not progress:
            return
        total, current = progress["total"], progress["current"]
        before = total["completed"] - current["completed"]  # batches of earlier validations
        progress["total"] = {"ready": before + 1, "started": before + 1, "processed": before, "completed": before}
        progress["current"] = {"ready": 1, "started": 1, "processed": 0, "completed": 0}
        progress["is_last_batch"] = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.dirpath:
            self.resolve_dirpath(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING or not self.dirpath:
            return
        self._in_validation = trainer.validating
        try:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the full training state, said explicitly
        finally:
            self._in_validation = False
        self.saved_path = Path(self.ckpt_path)
        rank_zero_info(f"SIGTERM: saved {self.ckpt_path} at step {trainer.global_step}; resume with --ckpt_path last")
