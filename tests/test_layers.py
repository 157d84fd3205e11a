"""Imports run one way: foundation -> ops -> nets/data -> methods -> callbacks -> recipes.

Every ``import``/``from ... import`` of the project's packages, module-level or inside a function (a lazy import
still runs back up), is read with ``ast`` and checked against the layer of the importing file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("foundation", "lightning_modules", "datamodules", "callbacks", "recipes")
LAYERS = ["foundation", "ops", "nets/data", "methods", "callbacks", "recipes"]

PENDING: set[str] = set()  # files allowed to import upward (none)


def layer_of(module: str) -> str | None:
    """The layer of a dotted module name (``None``: not part of the layered packages)."""
    parts = module.split(".")
    top = parts[0]
    if top == "foundation":
        return "foundation"
    if top == "lightning_modules":
        if len(parts) > 1 and parts[1] == "ops":
            return "ops"
        if len(parts) > 1 and parts[1] == "nets":
            return "nets/data"
        return "methods"
    if top == "datamodules":
        return "nets/data"
    if top in ("callbacks", "recipes"):
        return top
    return None


def module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[int, str]]:
    """``(line, imported module)`` of every absolute or relative import in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the submodule pkg.mod when there is one
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").exists() or (
                    REPO / Path(*sub.split(".")) / "__init__.py").exists()  # fmt: skip
                out.append((node.lineno, sub if is_module else base))
    return out


FILES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def test_layer_of_names_every_package():
    assert [layer_of(m) for m in ("foundation.artifacts", "lightning_modules.ops.tar", "lightning_modules.nets.hf",
                                  "datamodules.partition", "lightning_modules.tar", "callbacks.tamper",
                                  "recipes.cli", "torch")] == [*LAYERS[:3], "nets/data", *LAYERS[3:], None]  # fmt: skip


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_imports_never_run_back_up(path):
    rel = str(path.relative_to(REPO))
    if rel in PENDING:
        pytest.skip("owned by another issue's branch; its imports move to foundation on merge")
    own = LAYERS.index(layer_of(module_name(path)))
    upward = [f"line {line}: {mod} ({layer_of(mod)})" for line, mod in imports(path)
              if layer_of(mod) is not None and LAYERS.index(layer_of(mod)) > own]  # fmt: skip
    assert not upward, f"{rel} ({LAYERS[own]}) imports a higher layer: {upward}"


def test_recipes_is_only_the_cli_and_the_reproduction_runner():
    modules = {p.stem for p in (REPO / "recipes").glob("*.py")} - {"__init__", "__main__"}
    aliases: set[str] = set()
    gpu_check = {"gpu_check", "gpu_plan", "standins"}  # the GPU check's command, its config planner and stand-ins
    assert modules - aliases - gpu_check == {  # the CLI's parts; parallel: reproduce --jobs
        "cli", "errors", "overview", "parallel", "quiet", "renamed_keys", "reproduce", "resume", "tamper"}
    assert (REPO / "recipes" / "comparisons").is_dir()
