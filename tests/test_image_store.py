"""The local store of exported hub image datasets: CLIP-style preprocessing on hand-built images, the writer/reader
round trip, the exporter against a stand-in for ``datasets``, the lazy uint8 loader (normalised per batch), and
image tasks built from a store (splits, BadNets poisoning with a 3-channel patch, triggered test set, errors)."""

from __future__ import annotations

import json
import pickle
import sys
import types

import numpy as np
import pytest
import torch

from datamodules import (
    ImageTask,
    MultiTaskDataModule,
    Patch,
    Poisoning,
    TaskImageDataModule,
)
from foundation.image_store import (
    CLIP_MEAN,
    CLIP_STD,
    ImageArray,
    ImageStoreNotFoundError,
    channel_stats,
    prepare_image,
    read_labels,
    read_meta,
    write_image_store,
)
from datamodules.multitask import build_task
from foundation import export_images


def synthetic_store(directory, n_train: int = 40, n_test: int = 12, size: int = 16, classes: int = 4):
    """Random RGB images whose label is ``i % classes``; returns the path."""
    rng = np.random.default_rng(0)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
        splits[split] = (images, [i % classes for i in range(n)], n)
    return write_image_store(directory, splits, [f"c{k}" for k in range(classes)], size, source="synthetic")


# ------------------------------------------------------------------ preprocessing (CLIP: resize shorter side, crop)
STRIPES = np.array([[0, 0, 100, 200, 0, 0]] * 2, dtype=np.uint8)  # 2 x 6: the centre 2 x 2 crop is [100, 200]
PREPARE = [
    ("constant gray survives a resize", np.full((5, 7), 9, np.uint8), 3, np.full((3, 3, 3), 9, np.uint8)),
    ("wide image: centre crop, no resize", STRIPES, 2, np.repeat(np.array([[100, 200]] * 2, np.uint8)[..., None], 3, -1)),
    ("tall image: centre crop", STRIPES.T.copy(), 2, np.repeat(np.array([[100, 100], [200, 200]], np.uint8)[..., None], 3, -1)),
    ("RGB stays RGB", np.stack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3)], -1), 2,
     np.stack([np.full((2, 2), v, np.uint8) for v in (1, 2, 3)], -1)),
]


@pytest.mark.parametrize("image, size, expected", [c[1:] for c in PREPARE], ids=[c[0] for c in PREPARE])
def test_prepare_image_resizes_the_shorter_side_and_centre_crops(image, size, expected):
    out = prepare_image(image, size)
    assert out.dtype == np.uint8 and out.shape == (size, size, 3)
    np.testing.assert_array_equal(out, expected)


def test_prepare_image_accepts_pil_and_rejects_float_arrays():
    from PIL import Image

    assert prepare_image(Image.new("L", (10, 4), 50), 4).shape == (4, 4, 3)
    with pytest.raises(ValueError, match="uint8"):
        prepare_image(np.zeros((4, 4), np.float32), 4)


# ------------------------------------------------------------------ writer / reader
def test_store_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    train = rng.integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    write_image_store(tmp_path / "s", {"train": (train, [0, 1, 2, 1, 0], 5), "test": (test, [2, 2, 0], 3)},
                      ["a", "b", "c"], 8, source="unit")  # fmt: skip
    meta = read_meta(tmp_path / "s")
    assert meta["num_classes"] == 3 and meta["class_names"] == ["a", "b", "c"]
    assert meta["splits"] == {"train": 5, "test": 3} and meta["image_size"] == 8 and meta["source"] == "unit"
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "train_images.npy"), train)  # same size: stored as is
    np.testing.assert_array_equal(np.load(tmp_path / "s" / "test_images.npy"), test)
    assert read_labels(tmp_path / "s", "test").tolist() == [2, 2, 0]


@pytest.mark.parametrize(
    "splits, match",
    [
        ({"train": (np.zeros((2, 4, 4), np.uint8), [0, 0], 3), "test": (np.zeros((1, 4, 4), np.uint8), [0], 1)},
         "yielded 2 images, 3 announced"),
        ({"train": (np.zeros((2, 4, 4), np.uint8), [0, 5], 2), "test": (np.zeros((1, 4, 4), np.uint8), [0], 1)},
         "outside"),
        ({"train": (np.zeros((2, 4, 4), np.uint8), [0, 0], 2)}, "exactly the splits"),
    ],
    ids=["count", "label range", "missing split"],
)
def test_writer_rejects_inconsistent_input_and_leaves_no_meta(tmp_path, splits, match):
    with pytest.raises(ValueError, match=match):
        write_image_store(tmp_path / "s", splits, ["a", "b"], 4)
    assert not (tmp_path / "s" / "meta.json").exists()


def test_missing_store_names_the_export_command(tmp_path):
    with pytest.raises(ImageStoreNotFoundError, match="python -m foundation.export_images"):
        read_meta(tmp_path / "nowhere")


def test_exporter_writes_a_store_from_a_hub_dataset(tmp_path, monkeypatch):
    """``export`` against a stand-in for ``datasets.load_dataset`` (columns, ClassLabel names, lazy PIL images)."""
    from PIL import Image

    class FakeDataset:
        def __init__(self, n, offset=0):
            self.rows = [{"img": Image.new("L", (20, 10), 10 * (i + offset)), "y": (i + offset) % 3} for i in range(n)]
            self.column_names = ["img", "y"]
            self.features = {"y": types.SimpleNamespace(names=["cat", "dog", "eel"]), "img": None}

        def __len__(self):
            return len(self.rows)

        def __iter__(self):
            return iter(self.rows)

        def __getitem__(self, column):
            return [r[column] for r in self.rows]

        def select(self, indices):
            out = FakeDataset(0)
            out.rows = [self.rows[i] for i in indices]
            return out

    calls = []

    def load_dataset(hub_id, config_name=None, split="train", revision=None):
        calls.append((hub_id, config_name, split, revision))
        return FakeDataset(6) if split == "train" else FakeDataset(4, offset=6)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(export_images, "resolve_revision", lambda hub_id, rev: f"sha:{hub_id}:{rev}")  # no hub here
    out = export_images.export("org/pets", tmp_path / "pets", image_column="img", label_column="y", image_size=8,
                               max_per_split=5)  # fmt: skip
    meta = read_meta(out)
    # both splits are read at the commit the default branch resolved to, and meta.json records it
    assert calls == [("org/pets", None, "train", "sha:org/pets:None"), ("org/pets", None, "test", "sha:org/pets:None")]
    assert meta["class_names"] == ["cat", "dog", "eel"] and meta["splits"] == {"train": 5, "test": 4}
    assert meta["source"] == "hf://org/pets" and meta["revision"] == "sha:org/pets:None"
    images = np.load(out / "train_images.npy")
    assert images.shape == (5, 8, 8, 3) and images[3].max() == images[3].min() == 30  # constant images stay constant
    assert read_labels(out, "test").tolist() == [0, 1, 2, 0]
    with pytest.raises(ValueError, match="--image-column"):
        export_images.export("org/pets", tmp_path / "bad", image_column="image", label_column="y")


def test_exporter_cli_needs_a_hub_id_or_clip8(tmp_path):
    with pytest.raises(SystemExit):
        export_images.main([str(tmp_path)])
    assert set(export_images.CLIP8) == {"sun397", "cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"}


# ------------------------------------------------------------------ the lazy loader
def test_image_array_keeps_uint8_and_normalises_per_batch(tmp_path):
    store = synthetic_store(tmp_path / "s")
    raw = np.load(store / "train_images.npy")
    view = ImageArray(store / "train_images.npy", torch.tensor([7, 3, 11]))
    assert view.array.dtype == np.uint8 and view.shape == (3, 3, 16, 16) and len(view) == 3
    batch = view[torch.tensor([2, 0])]
    expected = torch.from_numpy(raw[[11, 7]]).permute(0, 3, 1, 2).float() / 255
    expected = (expected - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)
    torch.testing.assert_close(batch, expected)
    torch.testing.assert_close(view[2], expected[0])  # an int index gives one image [3, S, S]
    state = pickle.loads(pickle.dumps(view))  # DataLoader workers reopen the file instead of copying the pixels
    assert state._array is None and torch.equal(state[torch.tensor([0])], view[torch.tensor([0])])
    small = ImageArray(store / "train_images.npy", torch.arange(4), image_size=8)
    assert small[torch.arange(2)].shape == (2, 3, 8, 8)


def test_channel_stats_are_per_channel(tmp_path):
    images = np.zeros((4, 2, 2, 3), np.uint8)
    images[..., 0], images[:2, ..., 1] = 255, 255  # red always on, green on in half the images, blue off
    write_image_store(tmp_path / "s", {"train": (images, [0] * 4, 4), "test": (images[:1], [0], 1)}, ["a"], 2)
    mean, std = channel_stats(tmp_path / "s" / "train_images.npy", chunk=3)
    np.testing.assert_allclose(mean, [1.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(std, [0.0, 0.5, 0.0], atol=1e-5)


# ------------------------------------------------------------------ image tasks from a store
def patch_task(store, rate: float = 0.25, **kwargs) -> ImageTask:
    poisoning = Poisoning(Patch(size=3, location="bottom_right", margin=1), rate=rate, target_label=0)
    return ImageTask("syn", str(store), poisoning=poisoning, val_size=8, normalize="clip", **kwargs)


def test_store_task_splits_poisons_lazily_and_builds_the_triggered_test_set(tmp_path):
    store = synthetic_store(tmp_path / "s")
    s = build_task(patch_task(store), image_size=16, seed=0)
    train_x, train_y = s.train
    assert isinstance(train_x, ImageArray) and len(train_x) == 32 and len(s.val[0]) == 8 and len(s.test[0]) == 12
    assert not set(train_x.rows.tolist()) & set(s.val[0].rows.tolist())
    assert s.num_classes == 4 and int(s.poison_mask.sum()) == 8  # 25% of 32, drawn from non-target classes
    original = read_labels(store, "train")[train_x.rows]
    assert (original[s.poison_mask] != 0).all() and (train_y[s.poison_mask] == 0).all()
    assert torch.equal(train_y[~s.poison_mask], original[~s.poison_mask])
    pixels = train_x.pixels(torch.arange(len(train_x)))
    corner = pixels[:, :, 12:15, 12:15]  # 3x3 checkerboard, margin 1, on every channel of the poisoned rows only
    checker = ((torch.arange(3)[:, None] + torch.arange(3)[None, :]) % 2 == 0).float()
    assert torch.equal(corner[s.poison_mask], checker.expand(8, 3, 3, 3))
    assert not any(torch.equal(c, checker.expand(3, 3, 3)) for c in corner[~s.poison_mask])
    test_x, test_y = s.test_triggered
    assert (test_y != 0).all() and len(test_y) == 9  # the 3 target-class test images are left out
    assert torch.equal(test_x.pixels(torch.arange(9))[:, :, 12:15, 12:15], checker.expand(9, 3, 3, 3))


def test_store_tasks_feed_both_datamodules_with_float_batches(tmp_path):
    store = synthetic_store(tmp_path / "s")
    dm = TaskImageDataModule(patch_task(store), image_size=16, batch_size=5, eval_batch_size=6)
    assert dm.num_classes == 0  # unknown (not a guessed 10) until setup reads meta.json
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (5, 3, 16, 16) and y.shape == (5,)
    assert dm.num_classes == 4 and len(dm.val_dataloader()) == 2
    multi = MultiTaskDataModule([patch_task(store, rate=0.0), ImageTask("b", str(store), val_size=8)], image_size=16,
                                batch_size=4, eval_batch_size=6)  # fmt: skip
    multi.setup("fit")
    batch = next(iter(multi.train_dataloader()["syn"]))
    assert batch[0].shape == (4, 3, 16, 16) and multi.eval_index == [(0, "clean"), (0, "triggered"), (1, "clean")]
    assert isinstance(multi.splits[0].val[0], ImageArray)  # nothing float is held for the whole split


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"dataset": "mnst"}, ValueError, "unknown image dataset"),
        ({"dataset": "missing/dir"}, ImageStoreNotFoundError, "foundation.export_images"),
        ({"labels": "parity"}, ValueError, "class labels only"),
    ],
    ids=["typo", "missing directory", "labels"],
)
def test_store_task_errors_name_the_fix(tmp_path, kwargs, error, match):
    store = synthetic_store(tmp_path / "s")
    task = ImageTask("t", **{"dataset": str(store), **kwargs})
    with pytest.raises(error, match=match):
        build_task(task, 16, 0)


def test_clip_normalisation_needs_an_exported_rgb_dataset():
    with pytest.raises(ValueError, match="exported RGB dataset"):
        ImageTask("m", "mnist", normalize="clip")


def test_patch_too_large_for_the_store_images_fails_at_setup(tmp_path):
    store = synthetic_store(tmp_path / "s", size=8)
    task = ImageTask("t", str(store), poisoning=Poisoning(Patch(size=9), 0.1), val_size=4)
    with pytest.raises(ValueError, match="does not fit"):
        build_task(task, 8, 0)


def test_meta_json_is_plain_json(tmp_path):
    store = synthetic_store(tmp_path / "s")
    assert json.loads((store / "meta.json").read_text())["format"] == "safeweights-image-store"


def test_worker_processes_read_the_same_batches(tmp_path):
    store = synthetic_store(tmp_path / "s")
    batches = []
    for workers in (0, 1):
        dm = TaskImageDataModule(patch_task(store), image_size=16, batch_size=6, eval_batch_size=6, num_workers=workers)
        dm.setup("test")
        batches.append(next(iter(dm.test_dataloader()[1])))  # the triggered test set
    torch.testing.assert_close(batches[0], batches[1])


@pytest.mark.parametrize("location, rows, cols", [("bottom_right", slice(201, 223), slice(201, 223)),
                                                  ("top_left", slice(1, 23), slice(1, 23))])
def test_the_cluster_patch_stamps_224_rgb_images_on_every_channel(location, rows, cols):
    """configs/merging/clip's BadNets trigger: a 22x22 checkerboard with margin 1 on 224x224 RGB images."""
    images = torch.full((2, 3, 224, 224), 0.5)
    out = Patch(size=22, location=location)(images)
    checker = ((torch.arange(22)[:, None] + torch.arange(22)[None, :]) % 2 == 0).float()
    assert torch.equal(out[:, :, rows, cols], checker.expand(2, 3, 22, 22))
    assert int((out != images).sum()) == 2 * 3 * 22 * 22  # 0.5 -> 0 or 1 everywhere inside the patch, nowhere else
