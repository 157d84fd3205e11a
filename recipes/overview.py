"""The top of ``python -m recipes --help``: the subcommands, the methods, where configs live, ``recipes.reproduce``.

Built from the code (the LightningModules exported by :mod:`lightning_modules`, the folders of ``configs/``,
the registered comparisons), so it never lists something that is not there.
"""

from __future__ import annotations

import inspect
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _methods() -> list[str]:
    import lightning as L

    import lightning_modules

    names = []
    for name in lightning_modules.__all__:
        obj = getattr(lightning_modules, name, None)
        if inspect.isclass(obj) and issubclass(obj, L.LightningModule) and name != "BaseRecipe":
            names.append(name)
    return sorted(names)


def _comparisons() -> list[str]:
    try:
        from recipes.reproduce import load_comparisons

        return sorted(load_comparisons())
    except ImportError:  # pragma: no cover - the runner is part of the package
        return []


def _wrap(label: str, items: list[str]) -> str:
    return textwrap.fill(", ".join(items), width=100, initial_indent=f"  {label}: ", subsequent_indent="    ")


def cli_description() -> str:
    configs = ROOT / "configs"
    folders = sorted(p.name for p in configs.iterdir() if p.is_dir()) if configs.is_dir() else []
    return "\n".join([
        "SafeWeights recipes: LightningCLI for research on the integrity of model weights.",
        "",
        "  python -m recipes fit --config configs/<family>/<config>.yaml     train (then test: the `test` subcommand)",
        "  python -m recipes fit --config configs/trainer/gpu.yaml --config ...   stack a trainer overlay first",
        "  python -m recipes fit --config ... --print_config                 the full resolved config",
        "  python -m recipes.reproduce <name> [--tiny] [--out docs/results]  a paper's comparison (runs/ by default)",
        "",
        _wrap("methods (model.class_path)", _methods()),
        _wrap(f"configs ({configs.relative_to(ROOT)}/<family>/, tiny twins in tests/configs/)", folders),
        _wrap("trainer overlays (configs/trainer/)",
              sorted(p.stem for p in (configs / "trainer").glob("*.yaml")) if configs.is_dir() else []),
        _wrap("reproductions (python -m recipes.reproduce <name>)", _comparisons()),
        "",
        "`python -m recipes fit --help` lists every trainer option;",
        "`python -m recipes fit --model.help <Class>` (or --data.help) shows one class's arguments.",
    ])


def parser_kwargs() -> dict:
    """Top-level parser settings for :func:`recipes.cli.main`: program name, this description kept as written."""
    import argparse

    from jsonargparse import DefaultHelpFormatter

    class RawDescription(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
        pass

    return {"prog": "python -m recipes", "description": cli_description(), "formatter_class": RawDescription}
