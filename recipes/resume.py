"""Resuming a named run with nothing lost: which checkpoint, checked before anything is written, metrics appended.

``python -m recipes fit --config C --run_name NAME --ckpt_path last`` continues the run in
``<trainer.default_root_dir>/NAME``. Under SLURM the run name defaults to the job id, so a requeued job (same id)
finds its own run. What happens, in order, before any file of the run is touched:

1. :func:`resume_candidates` lists what Lightning itself would resume from -- ``checkpoints/last*.ckpt``
   (``ModelCheckpoint(save_last=True)``), ``checkpoints/preempted.ckpt`` (:class:`~callbacks.CheckpointOnPreemption`,
   an ``OnExceptionCheckpoint``) and ``hpc_ckpt_<n>.ckpt`` (Lightning's SLURM requeue checkpoint, written to the
   trainer's ``default_root_dir``, which the CLI points at the run directory) -- and ``last`` becomes the newest of
   them by modification time, the rule of Lightning's own ``ckpt_path="last"``, which leaves out ``hpc_ckpt``.
2. :func:`check_checkpoint` reads the file the way the trainer will (sidecar hash, ``torch.load(weights_only=True)``)
   and turns every failure into one :class:`~foundation.artifacts.ArtifactError` line naming the file and the fix.
3. :func:`hparams_differences` compares the hyper-parameters stored in the checkpoint with the config's model;
   LightningCLI would otherwise let the checkpoint's values win silently. The CLI refuses a difference unless
   ``--ckpt_hparams`` says which side wins.

While the run trains, :class:`ResumableCSVLogger` keeps ``metrics.csv`` (Lightning's ``CSVLogger`` deletes it when
the directory is reused) and :class:`MetricsResumePoint` stores in every checkpoint how many rows ``metrics.csv`` had
when it was written; resuming from that checkpoint cuts the file back to those rows, so each epoch or round that
the resumed run repeats is logged once.
"""

from __future__ import annotations

import csv
import io
import os
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import yaml
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_info

from foundation.artifacts import ArtifactError, atomic_write_text
from foundation.checkpoint_io import SafeCheckpointIO

PREEMPTED = "preempted"  # CheckpointOnPreemption's file name (without .ckpt), beside last.ckpt
HPARAM_MODES = ("refuse", "config", "checkpoint")


class ResumeError(ValueError):
    """A resume request that cannot be honoured; the message is one line naming the problem and the fix."""


def slurm_run_name() -> Optional[str]:
    """The SLURM job id (``<array job>_<task>`` for array jobs) when Lightning detects a SLURM job, else ``None``."""
    if not SLURMEnvironment.detect():
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array is not None and os.environ.get("SLURM_ARRAY_TASK_ID") is not None:
        return f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


def resume_candidates(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoints of ``run_dir`` that a resume may continue from, newest first."""
    run_dir = Path(run_dir)
    found = [p for p in (run_dir / "checkpoints").glob("*.ckpt") if re.fullmatch(r"last(-v\d+)?", p.stem)]
    found += [p for p in [run_dir / "checkpoints" / f"{PREEMPTED}.ckpt"] if p.is_file()]
    found += [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if re.fullmatch(r"hpc_ckpt_\d+", p.stem)]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def check_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Loads ``path`` as the trainer will (:class:`SafeCheckpointIO`); every failure is one ArtifactError line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"checkpoint {path} not found: pass an existing .ckpt file, or --ckpt_path last with --run_name")
    try:
        checkpoint = SafeCheckpointIO().load_checkpoint(path)
    except ArtifactError as err:
        raise ArtifactError(" ".join(str(err).split())) from None
    except Exception as err:  # truncated zip (OSError), garbage (UnpicklingError), ...: never a traceback
        raise ArtifactError(
            f"{path} is not a readable checkpoint ({type(err).__name__}: {' '.join(str(err).split())[:200]}): it is "
            "truncated or corrupted; resume from another checkpoint of the run"
        ) from None
    missing = [k for k in ("state_dict", "pytorch-lightning_version") if not isinstance(checkpoint, dict) or k not in checkpoint]
    if missing:
        raise ArtifactError(f"{path} is a torch file but not a Lightning checkpoint (no {', '.join(missing)}): pass a .ckpt")
    return checkpoint


def hparams_differences(stored: dict[str, Any], model_config: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{key: (config value, checkpoint value)}`` for hyper-parameters the checkpoint stores differently.

    ``stored`` is a checkpoint's ``hyper_parameters`` (LightningCLI's: the init args as plain data, plus
    ``_class_path`` and ``_instantiator``); ``model_config`` is the config's ``model`` section as plain data
    (``class_path`` / ``init_args``). Keys the checkpoint does not store are not compared.
    """
    stored = {k: v for k, v in stored.items() if k != "_instantiator"}
    init_args = model_config.get("init_args") or {}
    diffs = {}
    if "_class_path" in stored and stored.pop("_class_path") != model_config.get("class_path"):
        diffs["class_path"] = (model_config.get("class_path"), stored.get("_class_path"))
    for key, value in stored.items():
        if key in init_args and _plain(init_args[key]) != _plain(value):
            diffs[key] = (init_args[key], value)
    return diffs


def _plain(value: Any) -> Any:
    """Tuples and lists compare equal (YAML has only lists)."""
    return yaml.safe_load(yaml.safe_dump(value)) if isinstance(value, (list, tuple, dict)) else value


# --- metrics.csv that survives a resume -----------------------------------------------------------------------


def metrics_rows(path: str | os.PathLike) -> int:
    """Number of data rows (header excluded) of a CSV file; 0 if it does not exist."""
    if not os.path.isfile(path):
        return 0
    with open(path, newline="") as f:
        return max(sum(1 for _ in csv.reader(f)) - 1, 0)


def truncate_metrics(path: str | os.PathLike, rows: int) -> None:
    """Keeps the header and the first ``rows`` data rows of ``path`` (atomically); nothing if it has no more."""
    if metrics_rows(path) <= rows:
        return
    with open(path, newline="") as f:
        kept = [row for _, row in zip(range(rows + 1), csv.reader(f))]
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(kept)
    atomic_write_text(path, out.getvalue())


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, minus the deletion of an existing ``metrics.csv``; its columns are kept."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to the run's ``metrics.csv`` instead of deleting it when the run is resumed.

    Use it with :class:`MetricsResumePoint` (the CLI installs both), which cuts rows written after the resumed
    checkpoint. A fresh run never reuses a directory with checkpoints (the CLI refuses), so appending is safe.

    Args:
        save_dir: Root directory of the runs.
        name: Sub-directory of ``save_dir`` (``""``: none).
        version: The run's directory name. A string, always: CSVLogger's ``Union[int, str]`` would turn a SLURM job
            id such as ``4242`` into ``version_4242``.
        **kwargs: Other ``CSVLogger`` arguments.
    """

    def __init__(self, save_dir: str, name: str = "lightning_logs", version: Optional[str] = None, **kwargs: Any):
        super().__init__(save_dir=save_dir, name=name, version=version, **kwargs)

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


class MetricsResumePoint(pl.Callback):
    """Records in each checkpoint how many rows ``metrics.csv`` holds; on resume, drops the rows written after it.

    Saving flushes the CSV logger first, so the count covers every row logged before the checkpoint. Rows written
    after it (the rest of an interrupted epoch, a validation the resumed run repeats) are cut when the run
    resumes from that checkpoint, and the resumed run writes them again: every epoch/round appears once.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def _csv(self, trainer: Optional[pl.Trainer]) -> Optional[CSVLogger]:
        loggers = trainer.loggers if trainer is not None else []
        return next((lg for lg in loggers if isinstance(lg, ResumableCSVLogger)), None)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        logger = self._csv(trainer)
        if logger is None or not trainer.is_global_zero:
            return
        logger.save()
        rows = metrics_rows(os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE))
        checkpoint.setdefault("callbacks", {})[self.state_key] = {"metrics_rows": rows}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        trainer = getattr(self, "_trainer", None)
        logger = self._csv(trainer)
        if logger is None or not trainer.is_global_zero or "metrics_rows" not in state_dict:
            return
        truncate_metrics(os.path.join(logger.log_dir, ExperimentWriter.NAME_METRICS_FILE), int(state_dict["metrics_rows"]))


def quiet_lightning_resume_hints() -> None:
    """Silences two Lightning warnings that mislead under this CLI: with an ``OnExceptionCheckpoint`` installed, a
    fresh ``fit`` is turned into ``ckpt_path="last"`` ("The last model of the previous `fit` call will be used"),
    then finds nothing ("no last checkpoint available ... HINT: Set save_last=True"). :func:`plan_resume` has
    already decided: a fresh run never meets a checkpoint of its own, and ``last`` was resolved or reported."""
    warnings.filterwarnings("ignore", message=r"`\.fit\(ckpt_path=None\)` was called without a model")
    warnings.filterwarnings("ignore", message=r'\.fit\(ckpt_path="last"\) is set, but there is no last checkpoint')


# --- the CLI's resume plan ------------------------------------------------------------------------------------


def run_directory(trainer_config: Any, run_name: str) -> Path:
    """``<trainer.default_root_dir>/<run_name>`` (``runs/<run_name>`` without a root)."""
    return Path(trainer_config.get("default_root_dir") or "runs") / run_name


def plan_resume(parser: Any, config: Any, subcommand: str, manages_logger: bool) -> Optional[dict[str, Any]]:
    """Resolves and checks ``ckpt_path`` of the parsed ``config`` in place, before anything is instantiated.

    Returns the checkpoint's hyper-parameters when ``--ckpt_hparams checkpoint`` asks LightningCLI to apply them,
    else ``None``. Raises :class:`ResumeError` or :class:`~foundation.artifacts.ArtifactError` (one line each).

    Args:
        parser: The LightningCLI parser (dumps the config as LightningCLI stores it in a checkpoint).
        config: The parsed config (top level, with ``subcommand``).
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        manages_logger: Whether the CLI builds the run's logger (no ``trainer.logger`` in the config), so the run
            directory is ``<default_root_dir>/<run_name>``.
    """
    cfg = config[subcommand]
    ckpt, name = cfg.get("ckpt_path"), cfg.get("run_name")
    run_dir = run_directory(cfg["trainer"], name) if (manages_logger and name) else None
    if ckpt == "last" and manages_logger:
        if run_dir is None:
            raise ResumeError(
                "--ckpt_path last resumes a named run: add --run_name NAME (the run directory under "
                f"{cfg['trainer'].get('default_root_dir') or 'runs'}/ to continue; under SLURM it is the job id)"
            )
        found = resume_candidates(run_dir)
        if not found:
            rank_zero_info(f"resume: no checkpoint in {run_dir}: starting run {name!r} from the beginning")
            cfg["ckpt_path"] = ckpt = None
        else:
            cfg["ckpt_path"] = ckpt = str(found[0])
            rank_zero_info(f"resume: run {name!r} continues from {found[0]}")
    elif ckpt is None and run_dir is not None and subcommand == "fit":
        found = resume_candidates(run_dir)
        if found:
            raise ResumeError(
                f"{run_dir} already holds checkpoints ({found[0].name}): resume it with --ckpt_path last, or start a "
                "new run with another --run_name (or delete the directory)"
            )
    if ckpt is None or ckpt in ("best", "hpc") or str(ckpt).startswith("registry:"):
        return None
    checkpoint = check_checkpoint(ckpt)
    mode = cfg.get("ckpt_hparams") or "refuse"
    stored = checkpoint.get("hyper_parameters") or {}
    if mode == "refuse" and stored:
        dumped = yaml.safe_load(parser.dump(config, skip_link_targets=False, skip_none=False, format="yaml"))
        diffs = hparams_differences(dict(stored), dumped[subcommand].get("model") or {})
        if diffs:
            listed = ", ".join(f"{k}: config {ours!r} vs checkpoint {theirs!r}" for k, (ours, theirs) in diffs.items())
            raise ResumeError(
                f"{ckpt} was trained with other hyper-parameters ({listed}): make the config match, or pass "
                "--ckpt_hparams config (keep the config's) or --ckpt_hparams checkpoint (use the checkpoint's)"
            )
    return stored if mode == "checkpoint" else None
