"""Text classification DataModules (Rotten Tomatoes or an exported hub dataset such as SST-2), clean or backdoored,
tokenized once in memory."""

from __future__ import annotations

from typing import Literal

import torch

from datamodules.base import BackdoorDataModule, TensorBatchDataset
from datamodules.sources import TEXT_DATASETS, load_text_dataset
from foundation.text_store import read_text_meta
from datamodules.triggers import TextTrigger
from foundation import assets


def load_tokenizer(name_or_path: str, padding_side: Literal["right", "left"] | None = None):
    """Tokenizer of an asset name (``minilm-l6``, ``smollm2-135m``), a local path or a hub id.

    Decoder tokenizers without a pad token get ``eos`` as pad (as Llama/SmolLM sequence classifiers expect).
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(assets.resolve(name_or_path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if padding_side is not None:
        tok.padding_side = padding_side
    return tok


class TextClassificationDataModule(BackdoorDataModule):
    """Text classification (Rotten Tomatoes sentiment, or an exported hub dataset) with an optional text backdoor.

    A dataset without a validation split (Rotten Tomatoes) gives ``val_size`` seeded random texts of its training
    split to validation and draws ``train_size`` of the rest at random. An exported directory with a validation
    split (SST-2) keeps its fixed splits *in file order*: the first ``train_size``/``val_size``/``test_size`` texts,
    so order-based poisoning (:class:`~datamodules.poisoning.Poisoning` with ``selection: first``) picks the same sentences
    as the official code. A missing export directory fails here, at construction, with the command that creates it.

    Texts are tokenized once with the model's tokenizer, padded to ``max_length``; every batch is then cut to
    its longest sequence on the padding side.

    Args:
        tokenizer: asset name (``minilm-l6``, ``smollm2-135m``), local path or hub id of the tokenizer;
            use the same one as the model.
        dataset: ``rotten-tomatoes`` (12.7k deduplicated snippets, fixed 2000-snippet test split) or the directory
            of a text export (``python -m foundation.export_text SetFit/sst2 data/sst2 --label-names negative
            positive``: SST-2's 6920/872/1821 sentences).
        max_length: truncation length in tokens.
        padding_side: ``right`` for encoders; ``left`` is usual for decoders (``None``: the tokenizer's own).
        train_size: training texts taken from the training split (``None``: all but validation).
        val_size: validation texts: the first ones of the dataset's validation split (``None``: all of it), or, if
            it has none, texts held out of the training split (then an integer is required).
        test_size: texts of the fixed test split used (``None``: all of it, 2000 for Rotten Tomatoes).
        batch_size: batch size per process.
        eval_batch_size: batch size of evaluation loaders (``None``: ``batch_size``).

    The arguments of :class:`~datamodules.base.BackdoorDataModule` pass through (``poisoning``: a text trigger,
    which also builds the triggered eval sets; ``seed``: of subsetting and of the validation split).
    """

    def __init__(
        self,
        tokenizer: str = "minilm-l6",
        dataset: str = "rotten-tomatoes",
        max_length: int = 64,
        padding_side: Literal["right", "left"] | None = None,
        train_size: int | None = None,
        val_size: int | None = 500,
        test_size: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int | None = 128,
        **kwargs,
    ):
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, **kwargs)
        trigger = None if self.poisoning is None else self.poisoning.trigger
        if trigger is not None and not isinstance(trigger, TextTrigger):
            raise ValueError(f"{type(trigger).__name__} is an image trigger; text data needs a text trigger")
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        self.tokenizer_name, self.dataset, self.max_length = tokenizer, dataset, max_length
        self.padding_side = padding_side
        self.train_size, self.val_size, self.test_size = train_size, val_size, test_size
        self.num_classes, self.store_meta = 2, None
        if dataset not in TEXT_DATASETS:  # an exported directory: fail now if it is missing, not after model loading
            self.store_meta = read_text_meta(dataset)
            self.num_classes = self.store_meta["num_classes"]
        has_val_split = self.store_meta is not None and "validation" in self.store_meta["splits"]
        if val_size is None and not has_val_split:
            raise ValueError(f"dataset {dataset!r} has no validation split: set val_size to the number of training "
                             "texts to hold out for validation")  # fmt: skip
        self.tokenizer = None

    def describe(self) -> dict:
        """The manifest's data record, with the export's hub source, revision and file hashes for an exported
        dataset."""
        out = {**super().describe(), "dataset": self.dataset}
        if self.store_meta is not None:
            meta = self.store_meta
            out["dataset_export"] = {"source": meta["source"], "revision": meta["revision"],
                                     "sha256": {split: r["sha256"] for split, r in meta["splits"].items()}}  # fmt: skip
        return out

    def encode(self, texts: list[str], labels: torch.Tensor) -> TensorBatchDataset:
        enc = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return TensorBatchDataset(
            enc["input_ids"], enc["attention_mask"], labels.clone(), pad_trim=self.tokenizer.padding_side
        )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_name, self.padding_side)
        raw = load_text_dataset(self.dataset)
        self.num_classes = raw.num_classes
        if raw.val_texts is not None:  # fixed splits, kept in file order
            n_train, n_val = self.head(self.train_size, len(raw.train_y)), self.head(self.val_size, len(raw.val_y))
            train_texts, y_train = raw.train_texts[:n_train], raw.train_y[:n_train]
            val_texts, y_val = raw.val_texts[:n_val], raw.val_y[:n_val]
        else:
            val_idx, train_idx = self.split(len(raw.train_y), [self.val_size, self.train_size])
            pick = lambda idx: ([raw.train_texts[i] for i in idx.tolist()], raw.train_y[idx])  # noqa: E731
            (train_texts, y_train), (val_texts, y_val) = pick(train_idx), pick(val_idx)
        n_test = self.head(self.test_size, len(raw.test_y))
        test_texts, y_test = raw.test_texts[:n_test], raw.test_y[:n_test]

        if self.poisoning is not None:
            train_texts, y_train, self.poison_mask = self.poisoning.poison_texts(train_texts, y_train, self.num_classes)
        self.train_set = self.encode(train_texts, y_train)
        self.val_sets = [self.encode(val_texts, y_val)]
        self.test_sets = [self.encode(test_texts, y_test)]
        if self.poisoning is not None:
            self.val_sets.append(self.encode(*self.poisoning.triggered_texts(val_texts, y_val)))
            self.test_sets.append(self.encode(*self.poisoning.triggered_texts(test_texts, y_test)))
