"""Callbacks: evaluation that spans runs, plots, artifact export, preemption."""

from callbacks.artifact import ExportArtifact
from callbacks.attack_curves import AttackCurves
from callbacks.preemption import CheckpointOnPreemption
from callbacks.round_curves import RoundCurves, plot_curves

__all__ = ["AttackCurves", "CheckpointOnPreemption", "ExportArtifact", "RoundCurves", "plot_curves"]

from callbacks.tamper import TamperingHarness  # noqa: E402

__all__ += ["TamperingHarness"]
