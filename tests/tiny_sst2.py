"""The tiny SST-2 stand-in that the twins of configs/w2sdefense/llama3_8b_*.yaml read from
tests/assets/.cache/sst2-tiny (git-ignored): Rotten Tomatoes snippets (SST's source corpus, offline here) written
through the exporter's own writer (:func:`foundation.text_store.write_text_store`), with train, validation and test
splits like the SST-2 export."""

from __future__ import annotations

from pathlib import Path

from datamodules.sources import load_rotten_tomatoes
from foundation.text_store import write_text_store

ROOT = Path(__file__).resolve().parents[1]
TINY_SST2 = Path("tests/assets/.cache/sst2-tiny")  # relative to the repository root, as in the twins (git-ignored)
SIZES = {"train": 96, "validation": 48, "test": 48}


def write_tiny_sst2(root: Path = ROOT) -> Path:
    """The first 96 + next 48 Rotten Tomatoes training snippets as train/validation and its first 48 test snippets,
    once (skipped if the export is complete)."""
    directory = root / TINY_SST2
    if (directory / "meta.json").exists():
        return directory
    raw = load_rotten_tomatoes()
    n_train, n_val, n_test = SIZES["train"], SIZES["validation"], SIZES["test"]
    pairs = lambda texts, y: list(zip(texts, y.tolist(), strict=True))  # noqa: E731
    splits = {
        "train": pairs(raw.train_texts[:n_train], raw.train_y[:n_train]),
        "validation": pairs(raw.train_texts[n_train : n_train + n_val], raw.train_y[n_train : n_train + n_val]),
        "test": pairs(raw.test_texts[:n_test], raw.test_y[:n_test]),
    }
    return write_text_store(directory, splits, list(raw.label_names), source="offline:rotten-tomatoes")
