"""What the hub exporters (:mod:`foundation.export_images`, :mod:`foundation.export_text`, :mod:`foundation.export_wmdp`)
share: ``datasets`` as a cluster-only dependency, pinning a revision to the commit it resolves to, and loading one
split with its columns checked. Training never imports this module; it reads the exported directories offline.
"""

from __future__ import annotations

INSTALL_HINT = "exporting hub datasets needs `datasets`: pip install -e .[cluster]"


def require_datasets():
    """``datasets.load_dataset``, or an ImportError that says how to install it."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return load_dataset


def resolve_revision(hub_id: str, revision: str | None) -> str:
    """The commit that the hub dataset ``hub_id`` at ``revision`` (default: its main branch) points at now, so an
    export's ``meta.json`` names the exact data it holds; ``revision`` as given (or ``main``) when the hub's API cannot
    be asked (offline, gated or unknown)."""
    try:
        from huggingface_hub import HfApi

        return HfApi().dataset_info(hub_id, revision=revision).sha or (revision or "main")
    except Exception:  # noqa: BLE001 (offline, gated or unknown: record what was asked for)
        return revision or "main"


def load_split(hub_id: str, config: str | None, split: str, commit: str, columns: list[str], fix: str,
               max_rows: int | None = None):  # fmt: skip
    """Split ``split`` of ``hub_id`` at ``commit``, cut to its first ``max_rows`` rows; a missing column raises an
    error that lists the split's columns and ends with ``fix`` (the flag to pass)."""
    ds = require_datasets()(hub_id, config, split=split, revision=commit)
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ValueError(f"{hub_id} [{split}] has no column {missing}; its columns are {ds.column_names}: {fix}")
    return ds.select(range(min(max_rows, len(ds)))) if max_rows is not None else ds


def class_label_names(ds, column: str, hub_id: str, fix: str) -> list[str]:
    """The names of ``column``'s ``ClassLabel`` feature; an error ending with ``fix`` if it is not one."""
    names = getattr(ds.features[column], "names", None)
    if names is None:
        raise ValueError(f"{hub_id}'s {column!r} column is not a ClassLabel: {fix}")
    return list(names)


def source_uri(hub_id: str, config: str | None) -> str:
    """``hf://<hub id>[/<config>]``, as ``meta.json`` records the source."""
    return f"hf://{hub_id}" + (f"/{config}" if config else "")
