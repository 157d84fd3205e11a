"""The one place that silences Lightning's adverts and the known, harmless warnings of a run.

:func:`silence` is called once when :mod:`recipes.cli` is imported (so ``python -m recipes ...``, the
reproduction runner and the tests all get it); ``tests/conftest.py`` hands :data:`KNOWN_WARNINGS` to pytest,
whose own warning capture would otherwise show them again. A warning that is not listed here still prints.
"""

from __future__ import annotations

import logging
import warnings

# Message regexes, matched from the start of the message as ``warnings.filterwarnings`` does; ``(?s)`` where the
# message starts with a line break (jsonargparse's deprecations do).
KNOWN_WARNINGS: tuple[str, ...] = (
    # torch 2.13 deprecates LeafSpec; Lightning's _pytree still uses it (one line per run, nothing to act on).
    r".*LeafSpec.*",
    # jsonargparse 4.49 deprecations raised by LightningCLI's own code (lightning/pytorch/cli.py), not ours.
    r"(?s).*skip_none parameter was deprecated",
    r"(?s).*``ArgumentParser.add_instantiator`` was deprecated",
    r"(?s).*``instantiate_classes`` was deprecated",
    r"(?s).*By default only one JsonargparseDeprecationWarning per type is shown",
    # Federated runs and short tiny twins log every step of epochs shorter than the logging interval.
    r".*is smaller than the logging interval.*",
    # In-memory datasets on CPU are loaded with num_workers=0 on purpose.
    r".*does not have many workers.*",
    # The reproduction runner and the tests call the CLI from Python with args=[...] on purpose.
    r".*args parameter is intended to run from within Python.*",
    # Frozen sub-modules (teachers, reference models) are kept in eval mode on purpose.
    r".*module(s|\(s\))? in eval mode.*",
    # jsonargparse fills peft.LoraConfig's LoftQ default, which peft then reports as ignored.
    r".*loftq_config. specified but will be ignored.*",
)

# Lightning's info-level adverts (litlogger / litmodels), logged on every Trainer start.
ADVERT_PREFIXES: tuple[str, ...] = ("💡 Tip:",)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(ADVERT_PREFIXES)


def silence() -> None:
    """Ignore :data:`KNOWN_WARNINGS` and drop Lightning's adverts from its rank-zero loggers (idempotent)."""
    for pattern in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)  # re-adding an identical filter replaces it
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropAdverts) for f in logger.filters):
            logger.addFilter(_DropAdverts())
