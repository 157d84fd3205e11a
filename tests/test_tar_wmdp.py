"""TAR's WMDP-bio data path: the domain store round-trips and names bad lines, the exporter against a stand-in for
``datasets`` (filters, conversations, excluded subjects, revisions), and the DataModule: the batches TAR and the
attacks read, disjoint held-out splits, truncation, and multiple-choice scoring (an oracle scores 1, a model that
always says one letter scores that letter's share of the answers)."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch

from datamodules import TamperWMDPDataModule
from datamodules.tamper_data import QUESTION_SPLITS, SENTENCE_SPLITS
from datamodules.text import load_tokenizer
from foundation.wmdp_store import (
    DomainStoreNotFoundError,
    Question,
    read_meta,
    read_questions,
    read_texts,
    write_domain_store,
)
from lightning_modules.tamper import TamperAttack, evaluate, run_attack
from foundation import export_wmdp
from foundation.export_wmdp import HubSource
from tests.tar_wmdp_store import ROOT, TINY_WMDP, write_tiny_wmdp_store

COLOURS, ANIMALS = ["red", "green", "blue", "yellow"], ["cat", "dog", "horse", "bird", "fish", "cow"]


def colour_questions(n: int) -> list[dict]:
    """The right answer is a colour at option ``i % 4``; the wrong ones are animals."""
    out = []
    for i in range(n):
        wrong = [ANIMALS[(i + k) % len(ANIMALS)] for k in range(3)]
        label = i % 4
        out.append({"question": f"Question {i}: which word names a colour?", "answer": label, "subject": "s",
                    "choices": [*wrong[:label], COLOURS[i % len(COLOURS)], *wrong[label:]]})  # fmt: skip
    return out


def store(directory, forget=None, retain=None, questions=12):
    forget = forget if forget is not None else [f"Forget text number {i} about pathogens." for i in range(30)]
    retain = retain if retain is not None else [f"Retain text number {i} about cooking." for i in range(20)]
    return write_domain_store(
        directory,
        {"forget": [(t, "unit") for t in forget], "retain": [(t, "unit") for t in retain]},
        {"forget_questions": colour_questions(questions), "retain_questions": colour_questions(questions)},
        sources={"forget": [{"hub_id": "unit"}]},
    )  # fmt: skip


def datamodule(directory, **kw) -> TamperWMDPDataModule:
    args = {"max_length": 64, "batch_size": 4, "eval_batch_size": 4, **kw}
    dm = TamperWMDPDataModule(str(directory), **args)
    dm.setup()
    return dm


# ------------------------------------------------------------------ the store
def test_store_round_trips(tmp_path):
    store(tmp_path / "s", forget=["a b c", "d e"], retain=["f g"], questions=3)
    meta = read_meta(tmp_path / "s")
    assert {k: v["rows"] for k, v in meta["files"].items()} == {"forget": 2, "retain": 1, "forget_questions": 3,
                                                               "retain_questions": 3}  # fmt: skip
    assert meta["sources"] == {"forget": [{"hub_id": "unit"}]}
    assert read_texts(tmp_path / "s", "forget") == ["a b c", "d e"]
    assert read_texts(tmp_path / "s", "forget", limit=1) == ["a b c"]
    back = read_questions(tmp_path / "s", "retain_questions")
    assert back == [Question(q["question"], tuple(q["choices"]), q["answer"], "s") for q in colour_questions(3)]


BAD_RECORDS = [
    ("answer out of range", {"question": "q", "choices": ["a", "b"], "answer": 2}, "answer"),
    ("one choice", {"question": "q", "choices": ["a"], "answer": 0}, "choices"),
    ("empty question", {"question": " ", "choices": ["a", "b"], "answer": 0}, "question"),
    ("boolean answer", {"question": "q", "choices": ["a", "b"], "answer": True}, "answer"),
]


@pytest.mark.parametrize("record, field", [c[1:] for c in BAD_RECORDS], ids=[c[0] for c in BAD_RECORDS])
def test_writer_rejects_bad_questions_naming_the_record(tmp_path, record, field):
    with pytest.raises(ValueError, match=rf"forget_questions record 2: '?{field}"):
        write_domain_store(tmp_path, {"forget": [("t", "u")], "retain": [("t2", "u")]},
                           {"forget_questions": [colour_questions(1)[0], record],
                            "retain_questions": colour_questions(1)})  # fmt: skip
    assert not (tmp_path / "meta.json").exists()  # an unfinished export is never readable


@pytest.mark.parametrize("line, message", [("{not json", "not a JSON line"), ('{"txt": "x"}', "expected")])
def test_reader_names_file_and_line_of_a_malformed_record(tmp_path, line, message):
    store(tmp_path, forget=["one", "two"])
    path = tmp_path / "forget.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], line, lines[1]]) + "\n")
    with pytest.raises(ValueError, match=rf"forget\.jsonl:2: .*{message}"):
        read_texts(tmp_path, "forget")


def test_reader_refuses_a_truncated_file(tmp_path):
    store(tmp_path, forget=["one", "two", "three"])
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ValueError, match="2 rows .meta.json: 3.*truncated or edited"):
        read_texts(tmp_path, "forget")
    assert len(read_texts(tmp_path, "retain")) == 20  # the other files still read


def test_missing_store_names_the_export_command(tmp_path):
    with pytest.raises(DomainStoreNotFoundError, match="python -m foundation.export_wmdp"):
        TamperWMDPDataModule(str(tmp_path / "nowhere"))
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="re-export"):
        read_meta(tmp_path)


# ------------------------------------------------------------------ the exporter against a stand-in for datasets
class FakeSplit:
    def __init__(self, rows):
        self.rows, self.column_names = rows, list(rows[0])

    def __iter__(self):
        return iter(self.rows)


HUB = {
    ("lapisrocks/biology-pile-labeled", None, "train"): FakeSplit(
        [{"txt_chunk": f"pile {i}", "label": i % 2 == 0, "meta": "", "reasoning": ""} for i in range(6)]),
    ("lapisrocks/camel-bio", None, "train"): FakeSplit(
        [{"camel_ai_message_2_text_chunk": "camel 0"}, {"camel_ai_message_2_text_chunk": "  "}]),
    ("lapisrocks/magpie-bio-filtered", None, "train"): FakeSplit(
        [{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}] * 3),
    ("cais/wmdp", "wmdp-bio", "test"): FakeSplit([{"question": "q1", "choices": ["a", "b", "c", "d"], "answer": 1}]),
    ("cais/mmlu", "all", "test"): FakeSplit(
        [{"question": f"m{i}", "subject": s, "choices": ["a", "b", "c", "d"], "answer": 3}
         for i, s in enumerate(["virology", "astronomy", "anatomy", "law"])]),
}  # fmt: skip


@pytest.fixture
def fake_hub(monkeypatch):
    calls = []

    def load_dataset(hub_id, config=None, split=None, revision=None):
        calls.append((hub_id, config, split, revision))
        return HUB[(hub_id, config, split)]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    monkeypatch.setattr(export_wmdp, "resolve_revision", lambda hub_id, rev: f"sha:{hub_id}:{rev}")
    return calls


def test_exporter_writes_the_official_split_of_the_bio_corpora(tmp_path, fake_hub):
    assert export_wmdp.main([str(tmp_path / "out"), "--max-per-source", "2"]) == 0
    out = tmp_path / "out"
    assert read_texts(out, "forget") == ["pile 0", "pile 2", "camel 0"]  # label True only; blank text dropped
    assert read_texts(out, "retain") == ["pile 1", "pile 3", "hi\n\nhello", "hi\n\nhello"]  # capped at 2 per source
    assert [q.question for q in read_questions(out, "retain_questions")] == ["m1", "m3"]  # bio subjects excluded
    assert read_questions(out, "forget_questions") == [Question("q1", ("a", "b", "c", "d"), 1, "")]
    meta = read_meta(out)
    pile = meta["sources"]["forget"][0]
    assert pile["hub_id"] == "lapisrocks/biology-pile-labeled" and pile["where"] == ["label", "True"]
    assert pile["revision"] == "sha:lapisrocks/biology-pile-labeled:None" and pile["rows"] == 2
    assert meta["sources"]["retain_questions"][0]["rows"] == 2 and "virology" in meta["excluded_subjects"]


def test_exporter_passes_revisions_and_names_missing_columns(tmp_path, fake_hub):
    export_wmdp.export(tmp_path / "a", forget_text=["lapisrocks/camel-bio@abc123:train:camel_ai_message_2_text_chunk"],
                       retain_text=["lapisrocks/biology-pile-labeled:train:txt_chunk"])  # fmt: skip
    assert ("lapisrocks/camel-bio", None, "train", "sha:lapisrocks/camel-bio:abc123") in fake_hub  # pinned
    with pytest.raises(ValueError, match=r"no column \['text'\].*txt_chunk"):
        export_wmdp.export(tmp_path / "b", forget_text=["lapisrocks/biology-pile-labeled:train:text"])


def test_exporter_without_datasets_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match=r"pip install -e \.\[cluster\]"):
        export_wmdp.export(tmp_path)


SPECS = [
    ("plain", "org/data:train:text", HubSource("org/data", "train", "text")),
    ("filter", "org/d:train:txt:label=True", HubSource("org/d", "train", "txt", where=("label", "True"))),
    ("revision and config", "org/d@v1#cfg:test:c", HubSource("org/d", "test", "c", "cfg", "v1")),
]


@pytest.mark.parametrize("spec, expected", [c[1:] for c in SPECS], ids=[c[0] for c in SPECS])
def test_source_specs_parse(spec, expected):
    assert HubSource.parse(spec) == expected


@pytest.mark.parametrize("spec, text", [("org/d:train", True), ("org/d:train:c:nofilter", True),
                                        ("org/d:test:question", False), ("org/d::c", True)])  # fmt: skip
def test_bad_source_specs_show_the_expected_form(spec, text):
    with pytest.raises(ValueError, match="bad"):
        HubSource.parse(spec, text=text)


# ------------------------------------------------------------------ the DataModule
BAD_ARGS = [
    ("no forget_train left", {"meta_fraction": 0.5, "attack_fraction": 0.5}, "sum < 1"),
    ("zero meta", {"meta_fraction": 0.0}, "meta_fraction"),
    ("tiny max_length", {"max_length": 4}, "max_length"),
    ("zero max_texts", {"max_texts": 0}, "max_texts"),
]


@pytest.mark.parametrize("kwargs, message", [c[1:] for c in BAD_ARGS], ids=[c[0] for c in BAD_ARGS])
def test_bad_arguments_are_named(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TamperWMDPDataModule(str(store(tmp_path)), **kwargs)


def test_questions_with_different_numbers_of_choices_are_refused(tmp_path):
    three = {"question": "q", "choices": ["a", "b", "c"], "answer": 0}
    directory = write_domain_store(tmp_path, {"forget": [(f"t{i}", "u") for i in range(10)], "retain": [("r", "u")]},
                                   {"forget_questions": colour_questions(2), "retain_questions": [three]})  # fmt: skip
    with pytest.raises(ValueError, match=r"\[3, 4\] choices"):
        datamodule(directory)


def test_batches_have_the_shapes_and_keys_tar_reads(tmp_path):
    dm = datamodule(store(tmp_path))
    assert set(dm.sets) == set(SENTENCE_SPLITS + QUESTION_SPLITS)
    batch = next(iter(dm.train_dataloader()))[0]
    assert set(batch) == {"forget", "retain"}
    for ids, mask, ans in batch.values():
        assert ids.dtype == torch.long and ids.shape == mask.shape == ans.shape and len(ids) == 4
        assert torch.equal(ans, mask)  # free text: every token counts
    ids, mask, ans = dm.sample("forget_meta", 3, torch.Generator().manual_seed(0))
    assert ids.shape[0] == 3 and mask.dtype == torch.bool
    _, forget = dm.val_dataloader()
    ids, mask, ans, label = next(iter(forget))
    assert ids.shape[:2] == (4, 4) and label.tolist() == [0, 1, 2, 3]
    assert not (ans & ~mask).any() and (ans.sum(-1) >= 1).all()
    tok = load_tokenizer("smollm2-135m")
    letters = [tok.decode(ids[0, o][ans[0, o]]).strip() for o in range(4)]
    assert letters == ["A", "B", "C", "D"]
    assert "Answer:" in tok.decode(ids[0, 0][mask[0, 0]]) and COLOURS[0] in tok.decode(ids[0, 0][mask[0, 0]])


def test_held_out_splits_are_disjoint_and_follow_the_fractions(tmp_path):
    forget = [f"Forget text {i}." for i in range(40)] + ["Forget text 0.", "Shared text."]  # a duplicate, a shared one
    dm = datamodule(store(tmp_path, forget=forget, retain=["Shared text.", "Retain."]), meta_fraction=0.25,
                    attack_fraction=0.1)  # fmt: skip
    parts = {k: set(v) for k, v in dm.texts.items()}
    assert sum(len(v) for v in dm.texts.values()) == sum(len(v) for v in parts.values())  # no repeats
    held = ("forget_train", "forget_meta", "attack")
    for i, a in enumerate(held):
        for b in held[i + 1 :]:
            assert not parts[a] & parts[b], (a, b)
    assert set().union(*(parts[k] for k in held)) == {f"Forget text {i}." for i in range(40)}  # shared text dropped
    assert parts["retain_train"] == {"Retain."}
    assert (len(parts["forget_meta"]), len(parts["attack"])) == (10, 4)
    other = datamodule(tmp_path, meta_fraction=0.25, attack_fraction=0.1, seed=1)
    assert other.texts["forget_meta"] != dm.texts["forget_meta"]
    assert datamodule(tmp_path, meta_fraction=0.25, attack_fraction=0.1).texts == dm.texts


def test_max_length_cuts_texts_and_keeps_the_answer_of_long_questions(tmp_path):
    long_question = {"question": "word " * 200 + "which colour?", "choices": COLOURS, "answer": 2, "subject": "s"}
    texts = {"forget": [("x " * 300, "u")] + [(f"t{i}", "u") for i in range(9)], "retain": [("r", "u")]}
    questions = {"forget_questions": [long_question], "retain_questions": [long_question]}
    directory = write_domain_store(tmp_path, texts, questions)
    dm = datamodule(directory, max_length=24)
    assert all(t.shape[-1] <= 24 for s in dm.sets.values() for t in s.tensors[:3])
    ids, mask, _, label = dm.sets["forget_eval"].tensors
    tok = load_tokenizer("smollm2-135m")
    assert mask.sum(-1).max() == 24
    assert tok.decode(ids[0, 2][mask[0, 2]]).endswith("D. yellow\nAnswer: C") and label.tolist() == [2]


class PreferringLM(torch.nn.Module):
    """A stand-in for ``SplitCausalLM`` whose next-token distribution ignores the context and puts most mass on
    ``preferred`` token ids."""

    def __init__(self, preferred: set[int], vocab: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))
        with torch.no_grad():
            self.bias[sorted(preferred)] = 10.0

    def forward(self, ids, mask):
        return torch.zeros(*ids.shape, 1), None

    def logits(self, h):
        return self.bias.expand(*h.shape[:-1], -1)


@pytest.mark.parametrize("letter", ["A", "C"])
def test_a_model_that_always_says_one_letter_scores_that_letters_share(tmp_path, letter):
    dm = datamodule(store(tmp_path, questions=12))
    tok = load_tokenizer("smollm2-135m")
    (token,) = tok(" " + letter, add_special_tokens=False)["input_ids"]
    out = evaluate(PreferringLM({token}, len(tok)), dm)
    for domain in ("forget", "retain"):
        share = sum(q.answer == "ABCD".index(letter) for q in dm.questions[f"{domain}_eval"]) / 12
        assert out[f"{domain}_acc"] == pytest.approx(share) == pytest.approx(0.25)  # chance: answers are balanced


def test_an_oracle_scores_one_and_its_right_answers_have_the_lowest_nll(tmp_path):
    tok = load_tokenizer("smollm2-135m")
    ids = {w: set(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in COLOURS + ANIMALS}
    colours = set().union(*(ids[w] for w in COLOURS))
    assert not colours & set().union(*(ids[w] for w in ANIMALS))  # the test's premise: no shared tokens
    dm = datamodule(store(tmp_path), question_format="cloze")
    animals = set().union(*(ids[w] for w in ANIMALS))
    oracle, contrarian = PreferringLM(colours, len(tok)), PreferringLM(animals, len(tok))
    right, wrong = evaluate(oracle, dm), evaluate(contrarian, dm)
    assert right["forget_acc"] == right["retain_acc"] == 1.0
    assert wrong["forget_acc"] == wrong["retain_acc"] == 0.0
    assert right["forget_nll"] < wrong["forget_nll"]


def test_an_attack_runs_on_the_attack_split(tmp_path):
    """The harness's attack loop reads the held-out attack split and the question loaders of this DataModule."""
    from lightning_modules.nets.split_lm import SplitCausalLM

    net = SplitCausalLM(random_init=True, config_overrides={"num_hidden_layers": 2, "hidden_size": 32,
                        "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1},
                        trainable_layers=None, cache_trunk=False)  # fmt: skip
    net.build()
    dm = datamodule(store(tmp_path))
    seen = []
    attack = TamperAttack(name="a", lr=1e-3, steps=2, batch_size=4)
    out = run_attack(net, attack, dm, on_step=lambda k, loss: seen.append(loss))
    assert len(seen) == 2 and all(torch.isfinite(torch.tensor(seen)))
    assert set(out) >= {"forget_acc", "retain_acc", "forget_nll", "retain_nll"}


def test_the_twins_store_is_readable():
    directory = write_tiny_wmdp_store(ROOT / TINY_WMDP)
    assert read_meta(directory)["files"]["forget_questions"]["rows"] == 16
