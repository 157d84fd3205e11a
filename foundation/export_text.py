"""``python -m foundation.export_text <hub dataset id> <out dir>``: export a text classification dataset from the Hugging
Face hub into the local store that ``TextClassificationDataModule`` reads (:mod:`foundation.text_store`).

Run it once per dataset on a machine with hub access and ``pip install -e .[cluster]`` (``datasets`` is a
cluster-only dependency); training then needs only the exported directory, offline. The fixed splits are the
dataset's own (``--train-split``/``--validation-split``/``--test-split``), written in the hub's row order. Label
names come from the label column's ``ClassLabel`` feature (or ``--label-names``).

SST-2 for W2SDefense (Zhao et al., Findings of ACL 2025; ``shuaizhao95/w2sdefense``): the official code trains on the
sentence-level SST-2 of its ``data/sst-2/{train,dev,test}.json``, 6920 / 872 / 1821 sentences with *labelled* test
sentences; ``dev`` selects the checkpoint, ``test`` gives CA and ASR. The hub copy with those splits and sizes is
:data:`SST2` (``SetFit/sst2``, columns ``text``/``label``, no ``ClassLabel``)::

    python -m foundation.export_text SetFit/sst2 data/sst2 --label-names negative positive

GLUE's SST-2 (``stanfordnlp/sst2``) instead trains on 67k phrases and hides its test labels (``-1``); exporting it
needs ``--text-column sentence --validation-split none --test-split validation`` (the 872 dev sentences then serve
as the test set, and the DataModule holds validation out of the training phrases); that is not the paper's setup.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from foundation.text_store import write_text_store
from foundation.hub_export import (
    class_label_names,
    load_split,
    require_datasets,
    resolve_revision,
    source_uri,
)

# The W2SDefense SST-2: hub id and label names (SetFit/sst2's label_text column: 0 negative, 1 positive).
SST2 = {"hub_id": "SetFit/sst2", "label_names": ["negative", "positive"]}


def _rows(ds, hub_id: str, split: str, text_column: str, label_column: str) -> Iterator[tuple[str, int]]:
    for i, row in enumerate(ds):
        label = row[label_column]
        if label is None or int(label) < 0:
            raise ValueError(f"{hub_id} [{split}] row {i} has no label ({label!r}): its labels are hidden, as in "
                             "GLUE's test splits; export another split as the test set (e.g. --test-split "
                             "validation)")  # fmt: skip
        yield row[text_column], int(label)


def export(
    hub_id: str,
    out_dir: str | Path,
    config_name: str | None = None,
    revision: str | None = None,
    train_split: str = "train",
    validation_split: str | None = "validation",
    test_split: str = "test",
    text_column: str = "text",
    label_column: str = "label",
    label_names: list[str] | None = None,
    max_per_split: int | None = None,
) -> Path:
    """Load ``hub_id`` with ``datasets`` and write it to ``out_dir`` (see the module docstring); ``validation_split``
    ``None`` exports no validation split."""
    require_datasets()
    if validation_split is not None and validation_split in (train_split, test_split):
        raise ValueError(f"the validation split {validation_split!r} is also the train or test split: pass another "
                         "--validation-split, or 'none'")  # fmt: skip
    commit = resolve_revision(hub_id, revision)  # every split from one commit, and meta.json names it
    wanted = {"train": train_split, "validation": validation_split, "test": test_split}
    splits = {}
    for name, split in wanted.items():
        if split is None:
            continue
        ds = load_split(hub_id, config_name, split, commit, [text_column, label_column],
                        "pass --text-column/--label-column", max_per_split)  # fmt: skip
        if label_names is None:
            label_names = class_label_names(ds, label_column, hub_id, "pass --label-names (for SetFit/sst2: "
                                            "--label-names negative positive)")  # fmt: skip
        splits[name] = _rows(ds, hub_id, split, text_column, label_column)
    return write_text_store(out_dir, splits, list(label_names), source=source_uri(hub_id, config_name), revision=commit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundation.export_text", description=__doc__.split("\n\n")[0])
    parser.add_argument("hub_id", help=f"hub dataset id, e.g. {SST2['hub_id']} (W2SDefense's SST-2)")
    parser.add_argument("out_dir", type=Path, help="output directory")
    parser.add_argument("--config-name", default=None, help="dataset configuration, if the dataset has several")
    parser.add_argument("--revision", default=None, help="hub revision (commit, tag or branch) to pin; meta.json "
                        "records the commit it resolves to")  # fmt: skip
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--validation-split", default="validation", help="'none' to export no validation split")
    parser.add_argument("--test-split", default="test", help="a split with labels (GLUE hides its test labels)")
    parser.add_argument("--text-column", default="text", help="column of the texts (GLUE: sentence)")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--label-names", nargs="+", default=None, help="label names if the label is not a ClassLabel")
    parser.add_argument("--max-per-split", type=int, default=None, help="export only the first N rows per split")
    args = parser.parse_args(argv)
    validation = None if args.validation_split.lower() == "none" else args.validation_split
    path = export(args.hub_id, args.out_dir, args.config_name, args.revision, args.train_split, validation,
                  args.test_split, args.text_column, args.label_column, args.label_names,
                  args.max_per_split)  # fmt: skip
    print(f"exported {args.hub_id} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
