"""Readable output of a run: plain progress lines when stdout is not a terminal, and a table of the final metrics.

Lightning's default progress bar (rich or tqdm) redraws one terminal line; redirected to a file or a CI log it
prints nothing for minutes and then a garbled line (``Epoch 11/-2``). :class:`LineProgress` prints one line
per epoch (each federated epoch is ``rounds_per_epoch`` rounds) with the elapsed time and the epoch's
metrics, and one line every ``interval_s`` seconds inside a long epoch. :class:`FinalMetrics` prints the
metrics at the end of every ``fit`` (the last validation and training values) and of every ``validate`` /
``test`` whose Lightning table is switched off (``verbose=False``, as in each reproduction stage).
:func:`install` puts both on a Trainer; :class:`recipes.cli.RecipeCLI` calls it for every run.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, TQDMProgressBar


def scalar_metrics(trainer: pl.Trainer) -> dict[str, float]:
    """The Trainer's scalar ``callback_metrics`` as floats, sorted by name (``v_num`` and friends excluded)."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        try:
            if getattr(value, "numel", lambda: 1)() == 1:
                out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def _fmt(value: float) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


def metrics_table(metrics: dict[str, float], title: str) -> str:
    """A two-column plain-text table under a title line."""
    if not metrics:
        return f"{title}: no metrics logged"
    width = max(len("metric"), *(len(k) for k in metrics))
    lines = [title, f"  {'metric':<{width}}  value", f"  {'-' * width}  {'-' * 10}"]
    lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in metrics.items()]
    return "\n".join(lines)


class LineProgress(ProgressBar):
    """One plain line per training epoch, and one per ``interval_s`` seconds inside an epoch.

    A line reads ``epoch 3/10 | round 15/60 | 42 s | val/acc 0.95 val/asr 0.012 ...``: the epoch (and the
    maximum, when ``max_epochs`` sets it), the step count (called ``round`` for a model whose class sets
    ``progress_step_name = "round"``) and its maximum, the time since ``fit`` started, and up to
    ``max_metrics`` of the scalar metrics (validation metrics first).

    Args:
        interval_s: seconds between two lines inside one epoch (0 turns the mid-epoch lines off).
        max_metrics: most metrics on one line; the rest are counted (``+4 more``). The final table has all.
    """

    def __init__(self, interval_s: float = 60.0, max_metrics: int = 6) -> None:
        super().__init__()
        self.interval_s, self.max_metrics = interval_s, max_metrics
        self._enabled = True
        self._start = self._last = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, trainer: pl.Trainer, text: str) -> None:
        if self._enabled and trainer.is_global_zero:
            print(text, flush=True)

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, epoch_done: bool) -> str:
        unit = getattr(pl_module, "progress_step_name", "step")
        epoch = f"epoch {trainer.current_epoch + 1}" + (f"/{trainer.max_epochs}" if (trainer.max_epochs or 0) > 0 else "")
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        step = f"{unit} {trainer.global_step}" + (f"/{int(total)}" if math.isfinite(total) else "")
        parts = [epoch, step, _duration(time.monotonic() - self._start)]
        if not epoch_done:
            parts[0] += " (running)"
        metrics = scalar_metrics(trainer)
        keys = sorted(metrics, key=lambda k: (not k.startswith("val"), k))
        shown = " ".join(f"{k} {_fmt(metrics[k])}" for k in keys[: self.max_metrics])
        if len(keys) > self.max_metrics:
            shown += f" (+{len(keys) - self.max_metrics} more)"
        return " | ".join(parts + ([shown] if shown else []))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.monotonic()
        self._print(trainer, f"fit: {type(pl_module).__name__} on {type(trainer.datamodule).__name__ if trainer.datamodule else 'dataloaders'}")

    def on_train_batch_end(self, trainer, pl_module, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.monotonic()
        if self.interval_s > 0 and now - self._last >= self.interval_s:
            self._last = now
            self._print(trainer, self._line(trainer, pl_module, epoch_done=False))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last = time.monotonic()
        self._print(trainer, self._line(trainer, pl_module, epoch_done=True))


class FinalMetrics(pl.Callback):
    """Print :func:`metrics_table` of the final metrics after ``fit``, and after ``validate`` / ``test`` when
    Lightning's own table is off (``verbose=False``). Rank zero only."""

    def __init__(self) -> None:
        self._start = time.monotonic()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = time.monotonic()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = trainer.log_dir  # a broadcast under DDP: every rank must call it, not rank 0 alone
        if trainer.is_global_zero and not trainer.sanity_checking:
            unit = getattr(pl_module, "progress_step_name", "step")
            title = (f"final metrics of fit ({trainer.current_epoch} epochs, {trainer.global_step} {unit}s, "
                     f"{_duration(time.monotonic() - self._start)}; logs in {log_dir})")  # fmt: skip
            print(metrics_table(scalar_metrics(trainer), title), flush=True)

    def _eval_end(self, trainer: pl.Trainer, loop: Any, stage: str) -> None:
        if trainer.is_global_zero and not trainer.sanity_checking and not getattr(loop, "verbose", True):
            print(metrics_table(scalar_metrics(trainer), f"final metrics after {stage}"), flush=True)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._eval_end(trainer, trainer.validate_loop, "validate")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end(trainer, trainer.test_loop, "test")


def install(trainer: pl.Trainer, stream: Any = None) -> pl.Trainer:
    """Swap Lightning's default progress bar for :class:`LineProgress` when ``stream`` (stdout) is not a
    terminal, and add :class:`FinalMetrics`; a config that sets its own progress bar or ``FinalMetrics`` wins."""
    stream = sys.stdout if stream is None else stream
    bar = trainer.progress_bar_callback
    if type(bar) in (RichProgressBar, TQDMProgressBar) and not (hasattr(stream, "isatty") and stream.isatty()):
        trainer.callbacks[trainer.callbacks.index(bar)] = LineProgress()
    if not any(isinstance(c, FinalMetrics) for c in trainer.callbacks):
        trainer.callbacks.append(FinalMetrics())
    return trainer
