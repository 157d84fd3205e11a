"""A local store of image classification datasets exported from the hub, read with bounded memory (no Lightning).

Cluster tasks (the 8 image tasks of task arithmetic, AdaMerging and DAM: SUN397, Stanford Cars, RESISC45, EuroSAT,
SVHN, GTSRB, MNIST, DTD) come from the Hugging Face hub. ``datasets`` is a cluster-only dependency, so
``python -m foundation.export_images`` writes each dataset once into a directory of this format, and training reads
the directory with numpy alone:

``<dir>/meta.json``
    ``{"format": "safeweights-image-store", "version": 1, "source", "revision", "image_size", "num_classes",
    "class_names", "splits": {"train": N, "test": M}}`` (``revision``: the dataset commit exported); written last,
    so a directory without it is an unfinished export.
``<dir>/<split>_images.npy``
    ``uint8 [N, S, S, 3]`` RGB, resized once at export as CLIP's preprocessing does (shorter side to ``S`` with
    bicubic resampling, then the centre ``S x S`` crop; Radford et al., 2021).
``<dir>/<split>_labels.npy``
    ``int64 [N]``.

Images stay ``uint8`` on disk and are memory-mapped: :class:`ImageArray` is indexed like a float tensor and turns
only the requested rows into a normalised float batch (and stamps a backdoor trigger on the rows that carry one).
Memory: a task keeps ``int64`` row indices, labels and a ``bool`` trigger flag in RAM (17 bytes per image, ~1.2 MB
for SVHN's 73k training images, whose pixels are 11 GB on disk at 224 x 224), plus one float batch
(``B x 3 x S x S x 4`` bytes: 77 MB for 128 images at 224) and whatever the OS page cache keeps of the file.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from foundation import store_meta

FORMAT = "safeweights-image-store"
VERSION = 1
SPLITS = ("train", "test")
# CLIP's image normalisation (openai/clip-vit-base-patch32 preprocessor_config.json, OpenAI CLIP's _transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
EXPORT_HINT = (
    "export it on a machine with hub access: `python -m foundation.export_images <hub dataset id> {dir}` "
    "(needs `pip install -e .[cluster]`; the 8 tasks' commands are in docs/merging-clip.md)"
)


class ImageStoreNotFoundError(store_meta.StoreNotFoundError):
    """An exported image directory is missing or unfinished; the message names the export command."""


def prepare_image(image, size: int) -> np.ndarray:
    """One image (a PIL image or a ``uint8`` array ``[H, W]``/``[H, W, C]``) as ``uint8 [size, size, 3]`` RGB:
    shorter side resized to ``size`` (bicubic), then the centre crop, as CLIP's preprocessing."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"array images must be uint8, got {image.dtype}")
        image = Image.fromarray(image)
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8)


def write_image_store(
    directory: str | Path,
    splits: dict[str, tuple[Iterable, Iterable[int], int]],
    class_names: list[str],
    image_size: int = 224,
    source: str = "",
    revision: str | None = None,
) -> Path:
    """Write a store: ``splits`` maps ``train``/``test`` to ``(images, labels, count)``; images are streamed one at a
    time through :func:`prepare_image` into a memory-mapped ``.npy`` file, so exporting needs no more RAM than one
    image. ``meta.json`` is written last."""
    directory = Path(directory)
    if set(splits) != set(SPLITS):
        raise ValueError(f"an image store needs exactly the splits {SPLITS}, got {sorted(splits)}")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "meta.json").unlink(missing_ok=True)
    counts = {}
    for split, (images, labels, count) in splits.items():
        out = np.lib.format.open_memmap(directory / f"{split}_images.npy", mode="w+", dtype=np.uint8,
                                        shape=(count, image_size, image_size, 3))  # fmt: skip
        ys = np.zeros(count, dtype=np.int64)
        n = 0
        for n, (image, label) in enumerate(zip(images, labels), start=1):
            if n > count:
                raise ValueError(f"split {split!r} yields more than the announced {count} images")
            out[n - 1], ys[n - 1] = prepare_image(image, image_size), int(label)
        if n != count:
            raise ValueError(f"split {split!r} yielded {n} images, {count} announced")
        if count and (ys.min() < 0 or ys.max() >= len(class_names)):
            raise ValueError(f"split {split!r} has labels outside [0, {len(class_names)}): check class_names")
        out.flush()
        del out
        np.save(directory / f"{split}_labels.npy", ys)
        counts[split] = count
    meta = {"format": FORMAT, "version": VERSION, "source": source, "revision": revision, "image_size": image_size,
            "num_classes": len(class_names), "class_names": list(class_names), "splits": counts}  # fmt: skip
    store_meta.write_meta(directory, meta)
    return directory


def read_meta(directory: str | Path) -> dict:
    """The store's ``meta.json``; raises :class:`ImageStoreNotFoundError` (naming the export command) if absent."""
    return store_meta.read_meta(directory, FORMAT, VERSION, "exported image dataset", EXPORT_HINT.format(dir=directory),
                                ImageStoreNotFoundError)


def read_labels(directory: str | Path, split: str) -> torch.Tensor:
    return torch.from_numpy(np.load(Path(directory) / f"{split}_labels.npy"))


class ImageArray:
    """The ``uint8`` images of one split, seen as a float tensor ``[N, 3, S, S]`` that is decoded on indexing.

    ``array[idx]`` reads only rows ``idx`` from the memory-mapped file, scales them to ``[0, 1]``, resizes them to
    ``image_size`` if the store holds another size, stamps ``trigger`` on the rows flagged in ``triggered`` (in pixel
    space, as :class:`~datamodules.poisoning.Poisoning` does), and normalises with ``mean``/``std`` per channel.
    So :class:`~datamodules.base.TensorBatchDataset` and the merge DataModules use it in place of a tensor.

    Args:
        path: the split's ``<split>_images.npy``.
        rows: the rows of the file this view holds, in order.
        mean: per-channel mean subtracted after scaling to ``[0, 1]``.
        std: per-channel std divided by.
        image_size: side of the returned images.
        trigger: an image trigger (``ImageTrigger``) stamped on flagged rows.
        triggered: ``bool [len(rows)]``, which rows carry the trigger (``None``: none).
    """

    def __init__(
        self,
        path: str | Path,
        rows: torch.Tensor,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        image_size: int | None = None,
        trigger=None,
        triggered: torch.Tensor | None = None,
    ):
        self.path, self.rows = Path(path), torch.as_tensor(rows, dtype=torch.long)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._array: np.ndarray | None = None
        self.image_size = int(image_size or self.array.shape[1])
        self.trigger = trigger
        self.triggered = None if triggered is None else torch.as_tensor(triggered, dtype=torch.bool)
        if self.triggered is not None and len(self.triggered) != len(self.rows):
            raise ValueError(f"triggered has {len(self.triggered)} flags for {len(self.rows)} rows")
        if self.triggered is not None and trigger is None:
            raise ValueError("rows are flagged as triggered but no trigger was given")

    @property
    def array(self) -> np.ndarray:
        """The memory-mapped ``uint8 [N, S, S, 3]`` file (opened lazily, also in DataLoader workers)."""
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        return self._array

    def __getstate__(self) -> dict:  # pickled into worker processes without the mapping (np.memmap pickles its data)
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self), 3, self.image_size, self.image_size))

    def subset(self, index: torch.Tensor, trigger=None, triggered: torch.Tensor | None = None) -> ImageArray:
        """A view of ``self[index]`` (rows and trigger flags), optionally with a new trigger and flags."""
        keep = torch.arange(len(self))[index]
        flags = triggered if triggered is not None else (None if self.triggered is None else self.triggered[keep])
        return ImageArray(self.path, self.rows[keep], self.mean, self.std, self.image_size,
                          trigger if trigger is not None else self.trigger, flags)  # fmt: skip

    def pixels(self, index) -> torch.Tensor:
        """Rows ``index`` as float ``[n, 3, S, S]`` in ``[0, 1]``, resized and triggered, not yet normalised."""
        keep = torch.arange(len(self))[index]
        single = keep.dim() == 0
        keep = keep.reshape(-1)
        x = torch.from_numpy(np.ascontiguousarray(self.array[self.rows[keep].numpy()]))
        x = x.permute(0, 3, 1, 2).float().div_(255.0)
        if x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 1)  # fmt: skip
        if self.triggered is not None:
            flags = self.triggered[keep]
            if flags.any():
                x[flags] = self.trigger(x[flags])
        return x[0] if single else x

    def __getitem__(self, index) -> torch.Tensor:
        x = self.pixels(index)
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (x - mean) / std


def channel_stats(path: str | Path, count: int = 1000, chunk: int = 100) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the first ``count`` images of a split, in ``[0, 1]`` units (read in chunks)."""
    array = np.load(path, mmap_mode="r")
    n = min(count, len(array))
    if n == 0:
        raise ValueError(f"{path} holds no image to compute statistics from")
    total, total_sq, pixels = np.zeros(3), np.zeros(3), 0
    for start in range(0, n, chunk):
        x = np.asarray(array[start : min(start + chunk, n)], dtype=np.float64) / 255.0
        total += x.sum(axis=(0, 1, 2))
        total_sq += (x**2).sum(axis=(0, 1, 2))
        pixels += x.shape[0] * x.shape[1] * x.shape[2]
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean**2, 1e-12))
    return tuple(mean.tolist()), tuple(std.tolist())
