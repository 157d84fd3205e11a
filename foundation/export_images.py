"""``python -m foundation.export_images <hub dataset id> <out dir>``: export an image classification dataset from the
Hugging Face hub into the local store that the image tasks read (:mod:`foundation.image_store`).

Run it once per dataset on a machine with hub access and ``pip install -e .[cluster]`` (``datasets`` is a
cluster-only dependency); training then needs only the exported directory, offline. The fixed train and test splits
are the dataset's own (``--train-split``/``--test-split``); images are resized once (CLIP's shorter-side bicubic
resize and centre crop, 224 by default) and stored as ``uint8`` RGB. Class names come from the label column's
``ClassLabel`` feature (or ``--class-names``). The 8 tasks of task arithmetic / AdaMerging / DAM, with the hub
copies fusion_bench evaluates on, are in :data:`CLIP8` (``python -m foundation.export_images --clip8 data/clip``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from foundation.image_store import write_image_store
from foundation.hub_export import (
    class_label_names,
    load_split,
    require_datasets,
    resolve_revision,
    source_uri,
)

# task name -> (hub id, config name or None): the 8 tasks of Ilharco et al. (2023), as fusion_bench loads them.
CLIP8 = {
    "sun397": ("tanganke/sun397", None),
    "cars": ("tanganke/stanford_cars", None),
    "resisc45": ("tanganke/resisc45", None),
    "eurosat": ("tanganke/eurosat", None),
    "svhn": ("ufldl-stanford/svhn", "cropped_digits"),
    "gtsrb": ("tanganke/gtsrb", None),
    "mnist": ("ylecun/mnist", None),
    "dtd": ("tanganke/dtd", None),
}


def export(
    hub_id: str,
    out_dir: str | Path,
    config_name: str | None = None,
    revision: str | None = None,
    train_split: str = "train",
    test_split: str = "test",
    image_column: str = "image",
    label_column: str = "label",
    image_size: int = 224,
    class_names: list[str] | None = None,
    max_per_split: int | None = None,
) -> Path:
    """Load ``hub_id`` with ``datasets`` and write it to ``out_dir`` (see the module docstring)."""
    require_datasets()
    commit = resolve_revision(hub_id, revision)  # both splits from one commit, and meta.json names it
    splits = {}
    for name, split in (("train", train_split), ("test", test_split)):
        ds = load_split(hub_id, config_name, split, commit, [image_column, label_column],
                        "pass --image-column/--label-column", max_per_split)  # fmt: skip
        if class_names is None:
            class_names = class_label_names(ds, label_column, hub_id, "pass --class-names")
        splits[name] = ((row[image_column] for row in ds), ds[label_column], len(ds))
    return write_image_store(out_dir, splits, class_names, image_size, source=source_uri(hub_id, config_name),
                             revision=commit)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundation.export_images", description=__doc__.split("\n\n")[0])
    parser.add_argument("hub_id", nargs="?", help="hub dataset id, e.g. tanganke/eurosat (omit with --clip8)")
    parser.add_argument("out_dir", type=Path, help="output directory (with --clip8: the parent of one per task)")
    parser.add_argument("--clip8", action="store_true", help="export the 8 CLIP tasks into out_dir/<task>")
    parser.add_argument("--config-name", default=None, help="dataset configuration (e.g. cropped_digits for SVHN)")
    parser.add_argument("--revision", default=None, help="hub revision (commit, tag or branch) to pin; meta.json "
                        "records the commit it resolves to")  # fmt: skip
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--image-size", type=int, default=224, help="side of the stored images (CLIP ViT-B/32: 224)")
    parser.add_argument("--class-names", nargs="+", default=None, help="class names if the label is not a ClassLabel")
    parser.add_argument("--max-per-split", type=int, default=None, help="export only the first N images per split")
    args = parser.parse_args(argv)
    if args.clip8 == (args.hub_id is not None):
        parser.error("give either a hub_id or --clip8")
    jobs = ({task: (hub, cfg, args.out_dir / task) for task, (hub, cfg) in CLIP8.items()} if args.clip8
            else {args.hub_id: (args.hub_id, args.config_name, args.out_dir)})  # fmt: skip
    for hub, cfg, out in jobs.values():
        path = export(hub, out, cfg, args.revision, args.train_split, args.test_split, args.image_column, args.label_column,
                      args.image_size, args.class_names, args.max_per_split)  # fmt: skip
        print(f"exported {hub} -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
