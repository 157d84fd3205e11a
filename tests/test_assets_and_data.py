"""Offline assets resolve or fail with the setup command; DataModules split deterministically and reject bad input."""

import pytest
import torch

from datamodules import ImageClassificationDataModule, PixelPattern, Poisoning, RareWord, TextClassificationDataModule
from foundation import assets


def test_missing_asset_names_the_setup_command(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFEWEIGHTS_CACHE", str(tmp_path))
    with pytest.raises(assets.AssetNotFoundError, match="scripts/setup.sh"):
        assets.mnist_files("mnist")
    with pytest.raises(assets.AssetNotFoundError, match="scripts/setup.sh"):
        assets.resolve("smollm2-135m")


def test_resolve_passes_paths_and_hub_ids_through():
    assert assets.resolve("meta-llama/Meta-Llama-3-8B") == "meta-llama/Meta-Llama-3-8B"
    assert assets.resolve("/some/local/dir") == "/some/local/dir"


def test_read_idx_rejects_non_idx(tmp_path):
    bad = tmp_path / "x-idx"
    bad.write_bytes(b"\x00\x00\x09\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="IDX"):
        assets.read_idx(bad)


def test_mnist_is_the_real_dataset():
    dm = ImageClassificationDataModule(dataset="mnist", val_size=1000, train_size=2000, test_size=500)
    dm.setup("fit")
    from datamodules.sources import load_image_dataset

    raw = load_image_dataset("mnist")
    assert raw.train_x.shape == (60000, 28, 28) and raw.test_x.shape == (10000, 28, 28)
    assert raw.train_y[:5].tolist() == [5, 0, 4, 1, 9]  # the canonical first labels
    assert len(dm.train_set) == 2000 and len(dm.val_sets[0]) == 1000 and len(dm.test_sets[0]) == 500


def test_splits_are_deterministic_and_disjoint():
    a = ImageClassificationDataModule(dataset="digits", val_size=200, seed=3)
    b = ImageClassificationDataModule(dataset="digits", val_size=200, seed=3)
    val_a, train_a = a.split(1497, [200, None])
    val_b, _ = b.split(1497, [200, None])
    assert torch.equal(val_a, val_b)
    assert set(val_a.tolist()).isdisjoint(train_a.tolist()) and len(val_a) + len(train_a) == 1497


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dataset="digits", val_size=5000), "exceed"),
        (dict(dataset="digits", val_size=1497), "empty"),
        (dict(dataset="digits", val_size=200, poisoning=Poisoning(RareWord())), "text trigger"),
        (dict(dataset="digits", val_size=200, poisoning=Poisoning(PixelPattern(), target_label=12)), "target_label"),
        (dict(dataset="digits", val_size=200, poisoning=Poisoning(PixelPattern(offsets=[(9, 9)]))), "outside"),
    ],
)
def test_image_datamodule_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassificationDataModule(**kwargs).setup("fit")


def test_text_datamodule_rejects_image_trigger():
    with pytest.raises(ValueError, match="image trigger"):
        TextClassificationDataModule(poisoning=Poisoning(PixelPattern()))


def test_text_batches_are_trimmed_on_the_padding_side():
    dm = TextClassificationDataModule(tokenizer="minilm-l6", train_size=64, val_size=16, test_size=16, padding_side="left")
    dm.setup("fit")
    ids, mask, y = next(iter(dm.val_dataloader()[0]))
    assert mask[:, -1].all() and mask.sum(1).max() == mask.shape[1]  # left padding: last column is real text
    assert y.dtype == torch.long and set(y.tolist()) <= {0, 1}
