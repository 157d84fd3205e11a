"""``python -m recipes fit|validate|test|predict --config ...``: LightningCLI in subclass mode.

Models and DataModules are chosen by ``class_path`` (short class names work for everything in
``lightning_modules``, ``datamodules`` and ``callbacks``, or a full import path for a researcher's
subclass). Optimizers are injected (``auto_configure_optimizers=False``): each recipe takes one named
``OptimizerCallable`` per role. Configs stack: ``--config configs/trainer/ddp.yaml --config configs/...``.
"""

from __future__ import annotations

import os
from typing import Literal

# Hub access is never needed at run time here: assets are local (see foundation/assets.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402
from lightning.pytorch.utilities.exceptions import SIGTERMException  # noqa: E402

from recipes.quiet import silence  # noqa: E402

silence()  # Lightning's adverts and the known warnings, in one place (recipes/quiet.py)

import callbacks  # noqa: E402,F401  (registers short class names)
from callbacks.progress import install as install_progress  # noqa: E402
from callbacks.preemption import PREEMPTED_EXIT, CheckpointOnPreemption  # noqa: E402
import datamodules  # noqa: E402,F401
import lightning_modules  # noqa: E402,F401
from recipes import __version__  # noqa: E402
from recipes.overview import parser_kwargs  # noqa: E402
from foundation.checkpoint_io import SafeCheckpointIO  # noqa: E402
from recipes.renamed_keys import check_renamed_keys  # noqa: E402
from recipes import errors, resume  # noqa: E402


class RecipeCLI(LightningCLI):
    """The project's LightningCLI: every CLI customisation lives here."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=resume.slurm_run_name(),
            help="name of the run directory under trainer.default_root_dir (the logger's version); "
            "--ckpt_path last resumes the run of this name. Default: the SLURM job id under SLURM, else a new version_N",
        )
        parser.add_argument(
            "--ckpt_hparams",
            type=Literal["refuse", "config", "checkpoint"],
            default="refuse",
            help="when --ckpt_path stores other model hyper-parameters than the config: refuse (default, naming the "
            "keys), keep the config's, or use the checkpoint's (LightningCLI's own behaviour)",
        )

    # --- resume (recipes/resume.py) --------------------------------------------------------------------------

    def _manages_logger(self, cfg) -> bool:
        logger = cfg["trainer"].get("logger")
        return logger is None or logger is True

    def _parse_ckpt_path(self) -> None:
        """Resolves ``--ckpt_path last`` to the named run's newest checkpoint and checks the file (hash, weights-only
        load, stored hyper-parameters) before anything is instantiated or written; see :func:`recipes.resume.plan_resume`.
        LightningCLI's own step (applying the checkpoint's hyper-parameters) runs only with ``--ckpt_hparams checkpoint``."""
        sub = self.config.get("subcommand")
        if not sub:
            return
        if resume.plan_resume(self.parser, self.config, sub, self._manages_logger(self.config[sub])) is not None:
            super()._parse_ckpt_path()

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        name = cfg.get("run_name")
        if name and self._manages_logger(cfg):
            trainer = cfg["trainer"]
            root = trainer.get("default_root_dir") or "runs"
            trainer["logger"] = {
                "class_path": "recipes.resume.ResumableCSVLogger",
                "init_args": {"save_dir": root, "name": "", "version": name},
            }
        loggers = cfg["trainer"].get("logger")
        for entry in loggers if isinstance(loggers, list) else []:  # configs/trainer/tensorboard.yaml
            args = entry.get("init_args")
            if args is not None and args.get("save_dir") == "{default_root_dir}":
                args["save_dir"] = cfg["trainer"].get("default_root_dir") or "runs"
                args["version"] = args.get("version") if args.get("version") is not None else name

    def _install_resume(self, trainer: L.Trainer) -> None:
        """Keeps everything of a named run in its directory: Lightning's SLURM ``hpc_ckpt_<n>.ckpt`` (written to
        ``default_root_dir``) and the preemption checkpoint; rows of ``metrics.csv`` survive a resume."""
        resume.quiet_lightning_resume_hints()
        if isinstance(trainer.logger, resume.ResumableCSVLogger):
            trainer._default_root_dir = trainer.logger.log_dir  # Lightning's hpc_save_path/hpc_resume_path read it
            if not any(isinstance(c, resume.MetricsResumePoint) for c in trainer.callbacks):
                trainer.callbacks.append(resume.MetricsResumePoint())
        for callback in trainer.callbacks:
            if isinstance(callback, CheckpointOnPreemption):
                callback.resolve_dirpath(trainer)

    def _run_subcommand(self, subcommand: str) -> None:
        """A preempted run (SIGTERM; its checkpoint saved by :class:`~callbacks.CheckpointOnPreemption`) exits with
        status 143, not Lightning's 0, so a scheduler never reads it as a success. A launch that fails leaves no
        run directory behind when it fails before its first step (a missing asset fails in ``prepare_data``,
        after the logger made the directory)."""
        new_dirs = errors.missing_dirs(self.trainer.log_dir) if self.trainer.log_dir else []
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise SystemExit(PREEMPTED_EXIT) from None
        except BaseException:
            if self.trainer.is_global_zero and self.trainer.global_step == 0:
                errors.remove_new_run_dirs(new_dirs)
            raise

    # --- errors (recipes/errors.py) ----------------------------------------------------------------------------

    def instantiate_classes(self) -> None:
        """A value that a class refuses while being built (``rate: 1.5``) raises :class:`~recipes.errors.ConfigError`
        with that class's own message, not jsonargparse's chain of wrappers that each repeat the config."""
        try:
            super().instantiate_classes()
        except (ValueError, OSError) as err:
            root = err
            while root.__cause__ is not None:
                root = root.__cause__
            if isinstance(root, errors.ONE_LINE) or not isinstance(root, (ValueError, OSError)):
                raise
            raise errors.ConfigError(errors.root_message(err)) from err

    def instantiate_trainer(self, **kwargs):
        """Checkpoints are written atomically with a sha256 sidecar and read back with ``weights_only=True``
        (:class:`~foundation.checkpoint_io.SafeCheckpointIO`), ``last.ckpt`` is kept so ``--ckpt_path last``
        resumes an interrupted run, and SIGTERM saves ``preempted.ckpt`` (:class:`~callbacks.CheckpointOnPreemption`).
        A config that sets its own checkpoint plugin, ``save_last`` or preemption callback wins."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is None:
                callback.save_last = True
        if trainer.checkpoint_callbacks and not any(isinstance(c, CheckpointOnPreemption) for c in trainer.callbacks):
            trainer.callbacks.append(CheckpointOnPreemption())
        self._install_resume(trainer)
        return install_progress(trainer)  # plain lines when stdout is not a terminal; final metrics table


def close_process_group() -> None:
    """Closes the process group a multi-process run opened, after a barrier so that no rank closes its gloo
    connections while a peer still reads from them. Left to interpreter shutdown, the group's threads can abort a
    run that succeeded (SIGABRT, ``terminate called without an active exception``)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main(args: ArgsType = None, run: bool = True) -> RecipeCLI:
    """Entry point; ``main(["fit", "--config", path])`` runs from Python (tests, the reproduce runner)."""
    check_renamed_keys(args)
    return RecipeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        parser_class=errors.ShortErrorParser,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"version": __version__, "default_env": False, **parser_kwargs()},
        args=args,
        run=run,
    )
