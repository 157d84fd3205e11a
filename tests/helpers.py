"""Shared test helpers: running the CLI in-process and reading what a run exported."""

from __future__ import annotations

from pathlib import Path

from foundation.artifacts import load_artifact
from recipes.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
TINY = REPO / "tests" / "configs"


def run_cli(*args: str, root: Path, name: str = "run"):
    """``python -m recipes fit ...`` in-process, with the run dir under ``root``; returns the CLI object."""
    return main(["fit", *args, f"--trainer.default_root_dir={root}", f"--run_name={name}"])


def artifact_of(root: Path, name: str = "run"):
    return load_artifact(root / name / "artifact")
