"""``python -m recipes fit|validate|test|predict --config ...``: LightningCLI in subclass mode.

Models and DataModules are chosen by ``class_path`` (short class names work for everything in
``lightning_modules``, ``datamodules`` and ``callbacks``, or a full import path for a researcher's
subclass). Optimizers are injected (``auto_configure_optimizers=False``): each recipe takes one named
``OptimizerCallable`` per role. Configs stack: ``--config configs/trainer/ddp.yaml --config configs/...``.
"""

from __future__ import annotations

import os

# Hub access is never needed at run time here: assets are local (see recipes/assets.py).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
from lightning.pytorch.cli import ArgsType, LightningCLI  # noqa: E402
from lightning.pytorch.plugins.io import TorchCheckpointIO  # noqa: E402

from recipes.quiet import silence  # noqa: E402

silence()  # Lightning's adverts and the known warnings, in one place (recipes/quiet.py)

import callbacks  # noqa: E402,F401  (registers short class names)
from callbacks.progress import install as install_progress  # noqa: E402
from callbacks.preemption import CheckpointOnPreemption  # noqa: E402
import datamodules  # noqa: E402,F401
import lightning_modules  # noqa: E402,F401
from recipes import __version__  # noqa: E402
from recipes.overview import parser_kwargs  # noqa: E402
from foundation.checkpoint_io import SafeCheckpointIO  # noqa: E402
from recipes.renamed_keys import check_renamed_keys  # noqa: E402


class RecipeCLI(LightningCLI):
    """The project's LightningCLI: every CLI customisation lives here."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="name of the run directory under trainer.default_root_dir (the logger's version)",
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        name = cfg.get("run_name")
        if name:
            trainer = cfg["trainer"]
            logger = trainer.get("logger")
            if logger is None or logger is True:
                root = trainer.get("default_root_dir") or "runs"
                trainer["logger"] = {
                    "class_path": "lightning.pytorch.loggers.CSVLogger",
                    "init_args": {"save_dir": root, "name": "", "version": name},
                }
        loggers = cfg["trainer"].get("logger")
        for entry in loggers if isinstance(loggers, list) else []:  # configs/trainer/tensorboard.yaml
            args = entry.get("init_args")
            if args is not None and args.get("save_dir") == "{default_root_dir}":
                args["save_dir"] = cfg["trainer"].get("default_root_dir") or "runs"
                args["version"] = args.get("version") if args.get("version") is not None else name

    def instantiate_trainer(self, **kwargs):
        """Checkpoints are written atomically with a sha256 sidecar and read back with ``weights_only=True``
        (:class:`~recipes.checkpoint_io.SafeCheckpointIO`), ``last.ckpt`` is kept so ``--ckpt_path last``
        resumes an interrupted run, and SIGTERM saves it first (:class:`~callbacks.CheckpointOnPreemption`).
        A config that sets its own checkpoint plugin, ``save_last`` or preemption callback wins."""
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = SafeCheckpointIO()
        for callback in trainer.checkpoint_callbacks:
            if callback.save_last is None:
                callback.save_last = True
        if trainer.checkpoint_callbacks and not any(isinstance(c, CheckpointOnPreemption) for c in trainer.callbacks):
            trainer.callbacks.append(CheckpointOnPreemption())
        return install_progress(trainer)  # plain lines when stdout is not a terminal; final metrics table


def main(args: ArgsType = None, run: bool = True) -> RecipeCLI:
    """Entry point; ``main(["fit", "--config", path])`` runs from Python (tests, the reproduce runner)."""
    check_renamed_keys(args)
    return RecipeCLI(
        L.LightningModule,
        L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"version": __version__, "default_env": False, **parser_kwargs()},
        args=args,
        run=run,
    )
