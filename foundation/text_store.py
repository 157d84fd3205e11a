"""A local store of text classification datasets exported from the hub (no Lightning, no ``datasets``).

Cluster configs name hub datasets (W2SDefense's SST-2), but ``datasets`` is a cluster-only dependency and training
nodes may have no hub access. ``python -m foundation.export_text`` therefore writes each dataset once into a directory
of this format, and :func:`datamodules.sources.load_text_dataset` reads it with the standard library alone:

``<dir>/<split>.jsonl``
    one ``{"text": str, "label": int}`` object per line, in the hub split's own order, for the fixed splits
    ``train`` and ``test`` and, when the dataset has one, ``validation``.
``<dir>/meta.json``
    ``{"format": "safeweights-text-store", "version": 1, "source", "revision", "num_classes", "label_names",
    "splits": {split: {"file", "rows", "sha256"}}}``; written last, so a directory without it is an unfinished
    export. The reader checks each file's row count and SHA-256, so a truncated or edited file is refused.

Every file is written atomically (:func:`foundation.artifacts.atomic_open`): an interrupted export never leaves a
half-written file under its final name, and re-exporting removes ``meta.json`` first.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from foundation import store_meta

FORMAT = "safeweights-text-store"
VERSION = 1
SPLITS = ("train", "validation", "test")
REQUIRED_SPLITS = ("train", "test")
EXPORT_HINT = (
    "export it on a machine with hub access: `python -m foundation.export_text SetFit/sst2 {dir} --label-names "
    "negative positive` (SST-2 as W2SDefense uses it; needs `pip install -e .[cluster]`; see docs/cluster.md)"
)


class TextStoreNotFoundError(store_meta.StoreNotFoundError):
    """An exported text directory is missing or unfinished; the message names the export command."""


class TextStoreFormatError(store_meta.StoreFormatError):
    """A file of an exported text directory is malformed; the message names the file and line."""


@dataclass(frozen=True)
class TextSplit:
    """The texts and integer labels of one split, in file order."""

    texts: list[str]
    labels: list[int]


def write_text_store(
    directory: str | Path,
    splits: dict[str, Iterable[tuple[str, int]]],
    label_names: list[str],
    source: str = "",
    revision: str | None = None,
) -> Path:
    """Write a store: ``splits`` maps ``train``, ``test`` (and optionally ``validation``) to ``(text, label)`` pairs,
    streamed one line at a time. Labels must lie in ``[0, len(label_names))`` and texts must be non-empty strings.
    ``meta.json`` (with each file's row count and SHA-256) is written last."""
    directory = Path(directory)
    unknown, missing = set(splits) - set(SPLITS), set(REQUIRED_SPLITS) - set(splits)
    if unknown or missing:
        raise ValueError(f"a text store holds the splits {SPLITS} (train and test required); got {sorted(splits)}")
    if len(label_names) < 2:
        raise ValueError(f"a classification dataset needs at least 2 label names, got {label_names}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)
    records = {}
    for split in (s for s in SPLITS if s in splits):

        def rows(split: str = split):
            for n, (text, label) in enumerate(splits[split], start=1):
                _check_row(text, label, len(label_names), f"split {split!r} row {n}")
                yield {"text": text, "label": int(label)}

        file = f"{split}.jsonl"
        written = store_meta.write_jsonl(directory / file, rows())
        if written["rows"] == 0:
            raise ValueError(f"split {split!r} is empty; a text store needs at least one row per split")
        records[split] = {"file": file, **written}
    meta = {"format": FORMAT, "version": VERSION, "source": source, "revision": revision,
            "num_classes": len(label_names), "label_names": list(label_names), "splits": records}  # fmt: skip
    store_meta.write_meta(directory, meta)
    return directory


def _check_row(text, label, num_classes: int, where: str) -> None:
    if not isinstance(text, str) or not text.strip():
        raise TextStoreFormatError(f"{where}: the text must be a non-empty string, got {text!r}")
    if isinstance(label, bool) or not isinstance(label, numbers.Integral) or not 0 <= label < num_classes:
        raise TextStoreFormatError(f"{where}: the label must be an integer in [0, {num_classes}), got {label!r}")


def read_text_meta(directory: str | Path) -> dict:
    """The store's ``meta.json``; raises :class:`TextStoreNotFoundError` (naming the export command) if absent."""
    meta = store_meta.read_meta(directory, FORMAT, VERSION, "exported text dataset", EXPORT_HINT.format(dir=directory),
                                TextStoreNotFoundError, TextStoreFormatError)
    path = Path(directory) / "meta.json"
    splits = set(meta.get("splits", {}))
    if not set(REQUIRED_SPLITS) <= splits <= set(SPLITS):
        raise TextStoreFormatError(f"{path} lists the splits {sorted(splits)}; a text store holds {SPLITS} (train and "
                                   "test required): re-export with foundation.export_text")  # fmt: skip
    return meta


def read_text_store(directory: str | Path) -> tuple[dict, dict[str, TextSplit]]:
    """``(meta, {split: TextSplit})`` of a store, every line checked (see the module docstring)."""
    directory = Path(directory)
    meta = read_text_meta(directory)
    num_classes = meta["num_classes"]
    out = {}
    for split, record in meta["splits"].items():
        path = directory / record["file"]
        if not path.is_file():
            raise TextStoreNotFoundError(f"{path} is missing but {directory}/meta.json lists it: "
                                         + EXPORT_HINT.format(dir=directory))  # fmt: skip
        def check(row, number: int, path=path) -> tuple[str, int]:
            where = f"{path}:{number}"
            if not isinstance(row, dict) or set(row) != {"text", "label"}:
                raise TextStoreFormatError(f"{where}: expected an object with keys 'text' and 'label', "
                                           f"got {str(row)[:80]!r}")  # fmt: skip
            _check_row(row["text"], row["label"], num_classes, where)
            return row["text"], row["label"]

        rows = store_meta.read_jsonl(path, record, "re-export it with foundation.export_text", TextStoreFormatError, check)
        texts, labels = [t for t, _ in rows], [y for _, y in rows]
        out[split] = TextSplit(texts, labels)
    return meta, out
