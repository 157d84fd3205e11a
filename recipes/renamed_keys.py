"""Config keys that moved: a config or command line that still uses an old key gets one line naming the new one
(jsonargparse alone would only say that the old key "is not accepted")."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

_SCHEDULE = ("malicious_clients", "attack_rounds", "start_round", "end_round", "force_participation", "scale")

#: (key of the injected object, old init argument) -> its new place under that object's ``init_args``
RENAMED: dict[tuple[str, str], str] = {("attack", k): f"schedule.{k}" for k in _SCHEDULE}
WHY = {"schedule": "AttackSchedule: who attacks, when and how hard"}


def _walk(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield (*path, str(k)), v
            yield from _walk(v, (*path, str(k)))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, (*path, str(i)))


def renamed_in(keys: Sequence[tuple[str, ...]]) -> list[str]:
    """One message per old key among ``keys`` (dotted config paths split into parts)."""
    out = []
    for parts in keys:
        for i in range(len(parts) - 2):
            owner, init, old = parts[i], parts[i + 1], parts[i + 2]
            if init == "init_args" and (owner, old) in RENAMED and i + 3 == len(parts):
                new = RENAMED[owner, old]
                prefix = ".".join(parts[: i + 2])
                why = WHY.get(new.split(".")[0], "")
                out.append(f"config key {prefix}.{old} moved to {prefix}.{new}" + (f" ({why})" if why else ""))
    return out


def check_renamed_keys(args: Sequence[str] | None) -> None:
    """Exit with status 2 and a message naming the new key if ``args`` (a CLI argument list, default
    ``sys.argv[1:]``) or a ``--config`` file it names uses a key listed in :data:`RENAMED`."""
    args = list(sys.argv[1:] if args is None else args)
    keys: list[tuple[str, ...]] = []
    for i, arg in enumerate(args):
        if not isinstance(arg, str) or not arg.startswith("--"):
            continue
        name, _, value = arg[2:].partition("=")
        if name == "config":
            path = value or (args[i + 1] if i + 1 < len(args) else "")
            if path and Path(path).is_file():
                data = yaml.safe_load(Path(path).read_text())
                keys += [p for p, _ in _walk(data)]
        else:
            keys.append(tuple(name.split(".")))
    messages = renamed_in(keys)
    if messages:
        print("error: " + "; ".join(dict.fromkeys(messages)), file=sys.stderr)
        raise SystemExit(2)
