"""``meta.json`` of the local exports of hub data (:mod:`foundation.image_store`, :mod:`foundation.text_store`,
:mod:`foundation.wmdp_store`).

An exporter writes its data files first and ``meta.json`` last, atomically, so a directory with a ``meta.json`` is a
finished export. Reading checks the format name and version, and a missing or unfinished export raises an error
that names the export command to run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from foundation.artifacts import atomic_open, atomic_write_text


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


def write_jsonl(path: Path, records: Iterable[dict]) -> dict:
    """Write ``records`` to ``path`` as JSON lines, atomically, streamed; return ``{"rows", "sha256"}`` for
    ``meta.json``. Non-ASCII text is kept as UTF-8; newlines inside strings are escaped by JSON, so every record is
    one line."""
    digest, rows = hashlib.sha256(), 0
    with atomic_open(path) as out:
        for rows, record in enumerate(records, start=1):
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
            out.write(line)
            digest.update(line)
    return {"rows": rows, "sha256": digest.hexdigest()}


def read_jsonl(
    path: Path,
    expected: dict,
    hint: str,
    bad_format: type[Exception] = StoreFormatError,
    check: Callable[[object, int], object] = lambda record, number: record,
) -> list:
    """``check(record, line_number)`` of every record of a JSON-lines file written by :func:`write_jsonl`, then the
    file checked against its ``meta.json`` entry ``expected`` (``rows``, ``sha256``): a line that is not JSON, or a
    truncated or edited file, raises ``bad_format`` naming the file (and line); ``check`` raises for a bad record.

    Lines are split in the bytes, not with ``str.splitlines``, which also breaks at U+2028, U+2029 and
    U+0085: characters that JSON leaves unescaped inside strings and that web text contains."""
    data, records = path.read_bytes(), []
    lines = data.splitlines()  # bytes: \n and \r only, both escaped by JSON inside strings
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise bad_format(f"{path}:{number}: not a JSON line ({err.msg}); {hint}") from None
        records.append(check(record, number))
    if len(lines) != expected["rows"] or hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise bad_format(f"{path} has {len(lines)} rows (meta.json: {expected['rows']}) or a SHA-256 other than "
                         f"meta.json's: the file was truncated or edited; {hint}")  # fmt: skip
    return records
