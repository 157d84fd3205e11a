"""Callbacks: evaluation that spans runs, plots, artifact export, preemption."""

from callbacks.artifact import ExportArtifact

__all__ = ["ExportArtifact"]
