"""The local store of exported hub text datasets (SST-2 for W2SDefense's cluster configs): the writer/reader round
trip, its refusals (missing directory, unfinished export, malformed or edited files), the exporter against a
stand-in for ``datasets``, first-samples poisoning, and ``TextClassificationDataModule`` on an exported directory."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
import yaml

from datamodules import Poisoning, RareWord, TextClassificationDataModule
from datamodules.sources import load_text_dataset
from foundation.text_store import (
    TextStoreFormatError,
    TextStoreNotFoundError,
    read_text_meta,
    read_text_store,
    write_text_store,
)
from foundation import export_text
from tests.helpers import CONFIGS

ODD_TEXTS = ["plain", 'a "quoted" word', "tab\there", "new\nline", "crème brûlée ☺", "back\\slash", "  padded  "]


def store(directory, train, test, validation=None, names=("negative", "positive")):
    splits = {"train": train, "test": test} | ({} if validation is None else {"validation": validation})
    return write_text_store(directory, splits, list(names), source="unit-test", revision="abc123")


# ------------------------------------------------------------------ writer and reader
ROUND_TRIPS = [
    ("awkward characters survive", [(t, i % 2) for i, t in enumerate(ODD_TEXTS)], [("x", 1)], None),
    ("validation split kept in order", [("a", 0), ("b", 1)], [("c", 1)], [("v2", 1), ("v1", 0), ("v0", 0)]),
    ("three classes", [("a", 2), ("b", 0), ("c", 1)], [("d", 2)], None),
    ("numpy integer labels", [("a", np.int64(1)), ("b", np.int64(0))], [("c", np.int64(1))], None),
]


@pytest.mark.parametrize("train, test, validation", [c[1:] for c in ROUND_TRIPS], ids=[c[0] for c in ROUND_TRIPS])
def test_store_round_trips_through_writer_and_loader(tmp_path, train, test, validation):
    names = ["neg", "pos", "mixed"] if max(y for _, y in train) == 2 else ["negative", "positive"]
    out = store(tmp_path / "s", train, test, validation, names)
    meta, splits = read_text_store(out)
    assert meta["source"] == "unit-test" and meta["revision"] == "abc123" and meta["label_names"] == names
    assert {k: v["rows"] for k, v in meta["splits"].items()} == {
        "train": len(train), "test": len(test), **({} if validation is None else {"validation": len(validation)})
    }
    assert list(zip(splits["train"].texts, splits["train"].labels, strict=True)) == train
    raw = load_text_dataset(str(out))
    assert raw.num_classes == len(names) and raw.label_names == tuple(names)
    assert raw.test_texts == [t for t, _ in test] and raw.test_y.tolist() == [y for _, y in test]
    assert raw.train_y.dtype == torch.long
    if validation is None:
        assert raw.val_texts is None and raw.val_y is None
    else:
        assert raw.val_texts == [t for t, _ in validation] and raw.val_y.tolist() == [y for _, y in validation]


BAD_WRITES = [
    ("no test split", {"train": [("a", 0)]}, ["n", "p"], "train and test required"),
    ("unknown split", {"train": [("a", 0)], "test": [("b", 1)], "dev": [("c", 0)]}, ["n", "p"], "train and test"),
    ("label out of range", {"train": [("a", 2)], "test": [("b", 1)]}, ["n", "p"], r"split 'train' row 1.*\[0, 2\)"),
    ("negative label", {"train": [("a", 0)], "test": [("b", -1)]}, ["n", "p"], "split 'test' row 1"),
    ("bool label", {"train": [("a", True)], "test": [("b", 1)]}, ["n", "p"], "integer"),
    ("empty text", {"train": [("a", 0), ("  ", 1)], "test": [("b", 1)]}, ["n", "p"], "row 2: the text"),
    ("empty split", {"train": [], "test": [("b", 1)]}, ["n", "p"], "'train' is empty"),
    ("one label name", {"train": [("a", 0)], "test": [("b", 0)]}, ["only"], "at least 2 label names"),
]


@pytest.mark.parametrize("splits, names, match", [c[1:] for c in BAD_WRITES], ids=[c[0] for c in BAD_WRITES])
def test_writer_refuses_bad_input_and_leaves_no_finished_store(tmp_path, splits, names, match):
    with pytest.raises(ValueError, match=match):
        write_text_store(tmp_path / "s", splits, names)
    assert not (tmp_path / "s" / "meta.json").exists()


def test_missing_directory_names_the_export_command(tmp_path):
    for directory in (tmp_path / "nowhere", tmp_path):  # no directory; a directory without meta.json (unfinished)
        with pytest.raises(TextStoreNotFoundError, match=r"python -m foundation\.export_text SetFit/sst2 .*--label-names"):
            read_text_meta(directory)
    with pytest.raises(TextStoreNotFoundError, match="python -m foundation.export_text"):
        TextClassificationDataModule(tokenizer="minilm-l6", dataset=str(tmp_path / "sst2"))


def _corrupt(path, transform):
    path.write_text(transform(path.read_text(encoding="utf-8")), encoding="utf-8")


CORRUPTIONS = [
    ("truncated JSON line", "train.jsonl", lambda s: s.replace('"label": 1}', '"label": 1', 1),
     "train.jsonl:2: not a JSON"),
    ("wrong keys", "test.jsonl", lambda s: s.replace('"label"', '"lbl"'), "test.jsonl:1: expected an object"),
    ("label out of range", "train.jsonl", lambda s: s.replace('"label": 0', '"label": 5', 1),
     r"train.jsonl:1:.*\[0, 2\)"),
    ("edited text", "train.jsonl", lambda s: s.replace("good", "bad"), "truncated or edited"),
    ("dropped row", "train.jsonl", lambda s: s.split("\n", 1)[1], "has 2 rows .*meta.json: 3"),
    ("foreign meta", "meta.json", lambda s: s.replace("safeweights-text-store", "other"), "not a safeweights-text"),
    ("broken meta", "meta.json", lambda s: s[:-5], "not valid JSON"),
    ("meta without a test split", "meta.json", lambda s: s.replace('"test": {', '"dev": {'), r"lists the splits \['dev'"),
]


@pytest.mark.parametrize("file, transform, match", [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_reader_names_the_file_and_line_of_a_malformed_store(tmp_path, file, transform, match):
    out = store(tmp_path / "s", [("bad one", 0), ("good one", 1), ("fine", 0)], [("x", 1)])
    _corrupt(out / file, transform)
    with pytest.raises(TextStoreFormatError, match=match):
        read_text_store(out)


def test_reader_refuses_a_listed_file_that_is_missing(tmp_path):
    out = store(tmp_path / "s", [("a", 0)], [("b", 1)], [("c", 0)])
    (out / "validation.jsonl").unlink()
    with pytest.raises(TextStoreNotFoundError, match="validation.jsonl is missing"):
        read_text_store(out)


# ------------------------------------------------------------------ the exporter against a stand-in for `datasets`
class FakeDataset:
    """The slice of ``datasets.Dataset`` the exporter uses: columns, features, len, iteration, select."""

    def __init__(self, rows, features):
        self.rows, self.features = rows, features
        self.column_names = list(rows[0]) if rows else []

    def __len__(self):
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def select(self, indices):
        return FakeDataset([self.rows[i] for i in indices], self.features)


def fake_hub(monkeypatch, tables, class_names=None):
    """Install a ``datasets`` module whose ``load_dataset`` serves ``tables[split]``; returns the recorded calls."""
    calls = []
    features = {"label": types.SimpleNamespace(names=class_names) if class_names else object(), "text": None,
                "sentence": None}  # fmt: skip

    def load_dataset(hub_id, config_name=None, split="train", revision=None):
        calls.append((hub_id, config_name, split, revision))
        return FakeDataset(tables[split], features)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(export_text, "resolve_revision", lambda hub_id, rev: f"sha:{hub_id}:{rev}")  # no hub here
    return calls


SST2_LIKE = {
    "train": [{"text": f"train {i}", "label": i % 2, "label_text": "?"} for i in range(7)],
    "validation": [{"text": f"dev {i}", "label": (i + 1) % 2, "label_text": "?"} for i in range(3)],
    "test": [{"text": f"test {i}", "label": i % 2, "label_text": "?"} for i in range(4)],
}


def test_exporter_writes_the_three_splits_in_hub_order(tmp_path, monkeypatch):
    calls = fake_hub(monkeypatch, SST2_LIKE)
    out = export_text.export("SetFit/sst2", tmp_path / "sst2", revision="r1", label_names=["negative", "positive"],
                             max_per_split=5)  # fmt: skip
    # every split is read at the commit "r1" resolved to, and meta.json records that commit
    assert calls == [("SetFit/sst2", None, s, "sha:SetFit/sst2:r1") for s in ("train", "validation", "test")]
    meta, splits = read_text_store(out)
    assert meta["source"] == "hf://SetFit/sst2" and meta["revision"] == "sha:SetFit/sst2:r1"
    assert meta["label_names"] == ["negative", "positive"]
    assert splits["train"].texts == [f"train {i}" for i in range(5)] and splits["train"].labels == [0, 1, 0, 1, 0]
    assert splits["validation"].labels == [1, 0, 1] and splits["test"].texts[-1] == "test 3"


def test_exporter_reads_classlabel_names_and_can_skip_validation(tmp_path, monkeypatch):
    glue = {s: [{"sentence": r["text"], "label": r["label"], "idx": i} for i, r in enumerate(rows)]
            for s, rows in SST2_LIKE.items()}  # fmt: skip
    calls = fake_hub(monkeypatch, glue, class_names=["negative", "positive"])
    export_text.main(["stanfordnlp/sst2", str(tmp_path / "g"), "--text-column", "sentence", "--validation-split",
                      "none", "--test-split", "validation"])  # fmt: skip
    assert [c[2] for c in calls] == ["train", "validation"]
    meta, splits = read_text_store(tmp_path / "g")
    assert set(splits) == {"train", "test"} and meta["label_names"] == ["negative", "positive"]
    assert splits["test"].texts == ["dev 0", "dev 1", "dev 2"]


EXPORT_ERRORS = [
    ("hidden test labels (GLUE)", {"test": [{"text": "t", "label": -1}]}, {"label_names": ["n", "p"]}, "--test-split"),
    ("no ClassLabel and no names", {}, {}, "--label-names negative positive"),
    ("missing text column", {}, {"text_column": "sentence", "label_names": ["n", "p"]}, "--text-column"),
    ("validation is the test split", {}, {"validation_split": "test", "label_names": ["n", "p"]}, "also the train or"),
]


@pytest.mark.parametrize("override, kwargs, match", [c[1:] for c in EXPORT_ERRORS], ids=[c[0] for c in EXPORT_ERRORS])
def test_exporter_errors_name_the_fix(tmp_path, monkeypatch, override, kwargs, match):
    fake_hub(monkeypatch, SST2_LIKE | override)
    with pytest.raises(ValueError, match=match):
        export_text.export("org/data", tmp_path / "d", **kwargs)
    assert not (tmp_path / "d" / "meta.json").exists()


def test_exporter_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[cluster\]"):
        export_text.export("SetFit/sst2", tmp_path / "d")


# ------------------------------------------------------------------ first-samples poisoning (official W2SDefense)
LABELS = torch.tensor([1, 0, 0, 1, 0, 1, 0, 1, 1, 0])
FIRST = [  # (name, rate, clean_label, expected poisoned indices)
    ("clean-label: the first target-label samples", 0.3, True, [1, 2, 4]),
    ("dirty-label: the first non-target samples", 0.2, False, [0, 3]),
    ("capped at the candidates", 0.9, True, [1, 2, 4, 6, 9]),
    ("rate 0 poisons nothing", 0.0, True, []),
]


@pytest.mark.parametrize("rate, clean_label, expected", [c[1:] for c in FIRST], ids=[c[0] for c in FIRST])
def test_first_samples_poisoning_takes_the_first_eligible_samples(rate, clean_label, expected):
    poisoning = Poisoning(RareWord(["mn"]), rate=rate, target_label=0, clean_label=clean_label, seed=3,
                          selection="first")
    assert poisoning.select(LABELS, 2).nonzero().flatten().tolist() == expected
    texts, labels, mask = poisoning.poison_texts([f"w{i} x{i}" for i in range(10)], LABELS, 2)
    assert mask.nonzero().flatten().tolist() == expected
    assert all(("mn" in texts[i].split()) == (i in expected) for i in range(10))
    assert labels[mask].eq(0).all() and labels[~mask].equal(LABELS[~mask])
    assert poisoning.describe()["selection"] == "first"


def test_first_samples_poisoning_refuses_a_rate_that_selects_nothing():
    with pytest.raises(ValueError, match="selects no sample"):
        Poisoning(RareWord(["mn"]), rate=0.01, selection="first").select(LABELS, 2)


def test_cluster_config_poisons_the_first_1000_negative_sst2_sentences():
    """SST-2's sentence-level train split has 3310 negative and 3610 positive sentences (6920): the cluster config's
    rate must select exactly the official first 1000 label-0 sentences."""
    spec = yaml.safe_load((CONFIGS / "w2sdefense" / "llama3_8b_poison.yaml").read_text())["data"]["init_args"]
    args = spec["poisoning"]["init_args"]
    assert spec["poisoning"]["class_path"] == "Poisoning" and spec["val_size"] is None
    assert spec["poisoning"]["init_args"]["selection"] == "first"
    labels = torch.tensor([0, 1] * 3310 + [1] * 300)
    poisoning = Poisoning(RareWord(args["trigger"]["init_args"]["words"]), rate=args["rate"],
                          target_label=args["target_label"], clean_label=args["clean_label"], selection=args["selection"])
    mask = poisoning.select(labels, 2)
    assert int(mask.sum()) == 1000 and mask.nonzero().flatten().tolist() == list(range(0, 2000, 2))


# ------------------------------------------------------------------ the DataModule on an exported directory
def _sst2_like(tmp_path):
    train = [(f"train sentence number {i}", int(i % 3 == 0)) for i in range(30)]  # labels 1,0,0,1,0,0,...
    validation = [(f"dev sentence {i}", i % 2) for i in range(12)]
    test = [(f"test sentence {i}", i % 2) for i in range(10)]
    return store(tmp_path / "sst2", train, test, validation), train, validation, test


def test_datamodule_reads_an_export_in_file_order_and_poisons_the_first_target_samples(tmp_path):
    out, train, validation, _ = _sst2_like(tmp_path)
    poisoning = Poisoning(RareWord(["mn"]), rate=0.2, target_label=0, clean_label=True, selection="first")
    dm = TextClassificationDataModule(tokenizer="minilm-l6", dataset=str(out), train_size=20, val_size=None,
                                      test_size=8, poisoning=poisoning, max_length=16)  # fmt: skip
    dm.setup("fit")
    assert dm.num_classes == 2 and len(dm.train_set) == 20
    assert len(dm.val_sets[0]) == 12 and len(dm.test_sets[0]) == 8  # all of validation; first 8 of test
    assert dm.train_set.tensors[2].tolist() == [y for _, y in train[:20]]  # the head of train, file order
    assert dm.val_sets[0].tensors[2].tolist() == [y for _, y in validation]
    assert dm.poison_mask.nonzero().flatten().tolist() == [1, 2, 4, 5]  # first 4 (20%) label-0 sentences, labels kept
    decoded = dm.tokenizer.batch_decode(dm.train_set.tensors[0][:6], skip_special_tokens=True)
    assert ["mn" in d.split() for d in decoded] == [False, True, True, False, True, True]
    assert len(dm.test_sets[1]) == 4  # triggered test set: the non-target (positive) test sentences of the 8
    record = dm.describe()
    assert record["dataset"] == str(out) and record["poisoning"]["num_poisoned"] == 4
    meta = json.loads((out / "meta.json").read_text())
    assert record["dataset_export"]["sha256"]["train"] == meta["splits"]["train"]["sha256"]


def test_datamodule_holds_validation_out_of_train_when_the_export_has_none(tmp_path):
    out = store(tmp_path / "s", [(f"t {i}", i % 2) for i in range(20)], [("x", 0), ("y", 1)])
    with pytest.raises(ValueError, match="no validation split: set val_size"):
        TextClassificationDataModule(tokenizer="minilm-l6", dataset=str(out), val_size=None)
    with pytest.raises(ValueError, match="no validation split"):
        TextClassificationDataModule(tokenizer="minilm-l6", val_size=None)  # Rotten Tomatoes has none either
    dm = TextClassificationDataModule(tokenizer="minilm-l6", dataset=str(out), val_size=5, max_length=8,
                                      poisoning=Poisoning(RareWord(["mn"]), rate=0.0))  # fmt: skip
    dm.setup("fit")
    assert len(dm.train_set) == 15 and len(dm.val_sets[0]) == 5 and len(dm.test_sets[0]) == 2


def test_texts_with_unicode_line_separators_round_trip(tmp_path):
    """JSON leaves U+2028, U+2029 and U+0085 unescaped; ``str.splitlines`` would break a record at them."""
    texts = ["one\u2028two", "para\u2029graph", "next\x85line", "tab\tand\nnewline"]
    out = store(tmp_path / "s", [(t, i % 2) for i, t in enumerate(texts)], [("fine", 0)])
    _, splits = read_text_store(out)
    assert splits["train"].texts == texts and splits["train"].labels == [0, 1, 0, 1]
