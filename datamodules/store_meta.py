"""``meta.json`` of the local exports of hub data (:mod:`datamodules.image_store`, :mod:`datamodules.text_store`,
:mod:`datamodules.wmdp_store`).

An exporter writes its data files first and ``meta.json`` last, atomically, so a directory with a ``meta.json`` is a
finished export. Reading checks the format name and version, and a missing or unfinished export raises an error
that names the export command to run.
"""

from __future__ import annotations

import json
from pathlib import Path

from recipes.artifacts import atomic_write_text


class StoreNotFoundError(FileNotFoundError):
    """An exported directory is missing or unfinished; the message names the export command."""


class StoreFormatError(ValueError):
    """A file of an exported directory is malformed; the message names the file (and line) and the fix."""


def write_meta(directory: str | Path, meta: dict) -> None:
    """Write ``directory/meta.json`` atomically (call it after every data file is in place)."""
    atomic_write_text(Path(directory) / "meta.json", json.dumps(meta, indent=2) + "\n")


def read_meta(
    directory: str | Path,
    fmt: str,
    version: int,
    what: str,
    hint: str,
    not_found: type[StoreNotFoundError] = StoreNotFoundError,
    bad_format: type[Exception] = StoreFormatError,
) -> dict:
    """The ``meta.json`` of an export of format ``fmt`` v``version``.

    Args:
        directory: the exported directory.
        fmt: the format name the file must carry.
        version: the format version the file must carry.
        what: what the store holds, for messages (``exported image dataset``).
        hint: how to (re-)export it, for messages.
        not_found: error raised when the directory or its ``meta.json`` is missing.
        bad_format: error raised when ``meta.json`` is not valid JSON or names another format or version.
    """
    path = Path(directory) / "meta.json"
    if not path.is_file():
        why = "no such directory" if not Path(directory).is_dir() else "meta.json missing: an unfinished export"
        raise not_found(f"no {what} at {directory} ({why}): {hint}")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise bad_format(f"{path} is not valid JSON ({err}); re-export it: {hint}") from err
    if not isinstance(meta, dict) or meta.get("format") != fmt or meta.get("version") != version:
        raise bad_format(f"{path} is not a {fmt} v{version} file; re-export it: {hint}")
    return meta
