"""Short errors for ``python -m recipes``: a bad config or checkpoint ends in one line naming the problem.

* Parse errors (a typo, a wrong type, a missing config file): :class:`ShortErrorParser` prints a one-line tip and
  ``error: <key>: <jsonargparse's message>`` instead of 40 lines of usage and nested Union reports.
* Errors raised while the classes are built (``rate: 1.5`` -> ``Poisoning.__init__`` raises) reach the user through
  several jsonargparse wrappers, each repeating the config; :func:`root_message` keeps the innermost message.
* :func:`run_main` (the ``python -m recipes`` entry) prints :data:`ONE_LINE` errors -- refused checkpoints and
  resumes, missing assets, bad values -- as ``error: ...`` and exits with status 2; ``SAFEWEIGHTS_TRACEBACK=1``
  shows the traceback instead. Other exceptions (bugs) keep their traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from typing import Callable, NoReturn, Optional

from lightning.pytorch.cli import LightningArgumentParser

from foundation.artifacts import ArtifactError
from foundation.assets import AssetNotFoundError

TRACEBACK_ENV = "SAFEWEIGHTS_TRACEBACK"


class ConfigError(ValueError):
    """A config value that the recipe's classes refused while being built; the message is the class's own."""


ONE_LINE = (ConfigError, ArtifactError, AssetNotFoundError)  # recipes.resume.ResumeError is a ValueError: see below

_NOISE = (
    "Does not validate against any of the",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Expected a <class 'NoneType'>",
)


def condense(message: str) -> str:
    """One line from a (nested) jsonargparse error: the dotted key path, then the innermost messages."""
    keys, parts, given = [], [], None
    for raw in message.splitlines():
        line = raw.strip().lstrip("- ").strip()
        if not line or any(line.startswith(n) or n in line for n in _NOISE):
            continue
        if m := re.fullmatch(r'Parser key "([^"]+)":\s*(.*)', line):
            keys.append(m.group(1))
            if m.group(2):
                parts.append(m.group(2))
        elif line.startswith("Given value:"):
            value = line.removeprefix("Given value:").strip()
            given = value if len(value) < 80 and not value.startswith(("Namespace(", "NestedArg(")) else given
        elif not line.startswith("Problem with given class_path"):
            parts.append(line)
    if not parts:
        return " ".join(message.split())
    text = "; ".join(dict.fromkeys(parts))
    if given is not None and "Got value" not in text:
        text += f" (got {given!r})"
    return f"{'.'.join(keys)}: {text}" if keys else text


class ShortErrorParser(LightningArgumentParser):
    """LightningCLI's parser; a parse error prints a tip and one ``error:`` line (the message last), exit 2."""

    def error(self, message: str, ex: Optional[Exception] = None) -> NoReturn:
        if not self.exit_on_error:
            super().error(message, ex)
        prog = (getattr(ex, "subcommand_parser", None) or self).prog.replace(" [options]", "")
        sys.stderr.write(f"tip: `{prog} --help` lists every option\nerror: {condense(message)}\n")
        raise SystemExit(2)


def root_message(err: BaseException) -> str:
    """The innermost exception's message of a ``raise ... from`` chain, on one line."""
    seen = set()
    while err.__cause__ is not None and id(err) not in seen:
        seen.add(id(err))
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def run_main(main: Callable[[], object]) -> None:
    """Runs ``main()``; project errors become ``error: <one line>`` on stderr and exit status 2."""
    from recipes.resume import ResumeError

    try:
        main()
    except (*ONE_LINE, ResumeError) as err:
        if os.environ.get(TRACEBACK_ENV):
            raise
        sys.stderr.write(f"error: {root_message(err)}\n")
        raise SystemExit(2) from None


def missing_dirs(path: str | os.PathLike) -> list[str]:
    """``path`` and those of its parents that do not exist yet, deepest first (see :func:`remove_new_run_dirs`)."""
    out, path = [], os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        out.append(path)
        path = os.path.dirname(path)
    return out


def remove_new_run_dirs(dirs: list[str]) -> None:
    """Removes the directories of ``dirs`` (from :func:`missing_dirs`, deepest first) after a launch that failed
    before it trained: whatever is in them (an empty log dir, a logger's first event file, a config) was written
    by that launch alone and describes no run. A directory holding a checkpoint is kept."""
    for d in dirs:
        if os.path.isdir(d) and not any(f.endswith(".ckpt") for _, _, files in os.walk(d) for f in files):
            shutil.rmtree(d)
