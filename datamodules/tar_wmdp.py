"""WMDP-bio forget/retain domains from a hub export, for TAR (Tamirisa et al., "Tamper-Resistant Safeguards for
Open-Weight LLMs", ICLR 2025, arXiv 2408.00761) and its tampering attacks at the paper's scale.

The paper's biosecurity setting: the safeguard must remove hazardous biology knowledge, measured by WMDP-bio
accuracy (Li et al., arXiv 2403.03218; 4 options, chance 25%), while keeping general knowledge, measured by MMLU
without its biology subjects. Its training text is the official TAR-bio data (``modules/dataloaders.py``): forget =
bio-labelled Pile chunks (``lapisrocks/biology-pile-labeled``, ``label == True``) plus CAMEL-AI biology, of which a
seeded 20% is held out as TAR's ``x_TR`` ("meta"); retain = the Pile chunks labelled not-bio plus instruction data.
``python -m foundation.export_wmdp`` writes those (hub ids are flags) to a local directory
(:mod:`foundation.wmdp_store`); this DataModule reads it offline and gives TAR, the baselines and the
``TamperingHarness`` the splits of :mod:`datamodules.tamper_data`:

- the forget corpus (deduplicated, shuffled with ``seed``) is cut into disjoint ``forget_meta`` (``meta_fraction``),
  ``attack`` (``attack_fraction``; only the tampering harness trains on it) and ``forget_train`` (the rest);
- the retain corpus is ``retain_train``;
- ``forget_eval`` are the WMDP-bio questions, ``retain_eval`` the retain benchmark's questions.

Texts are cut to ``max_length`` tokens (official: 256) and every token counts as 'answer' (the attacks' LM loss
and TAR's entropy run over all of it, as in the official code). Questions are scored like lm-evaluation-harness's
``wmdp``/``mmlu`` tasks: the prompt ``question / A. ... / B. ... / Answer:`` followed by each letter, and the option
with the highest mean answer-token log-probability wins (``question_format: letters``); ``cloze`` instead appends
each choice's text to ``question / Answer:``. Memory: each split is padded to its own longest row (at most
``max_length``), ``N x T x 10`` bytes for a sentence split and ``Q x O x T x 10`` for a question split;
``max_texts``, ``forget_eval_size`` and ``retain_eval_size`` bound ``N`` and ``Q``.

Differences from the official code: no padding to ``max_length`` and pads never count in the losses; instruction
data (magpie) is stored as plain text, not in the chat template; the paper's MMLU is 5-shot, here zero-shot.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from datamodules.base import TensorBatchDataset
from datamodules.tamper_data import (
    TamperDataModule,
    encode_completion,
    encode_text,
    longest,
    pad_rows,
    question_set,
)
from foundation.wmdp_store import Question, read_meta, read_questions, read_texts

LETTERS = "ABCDEFGHIJ"


def letters_prompt(q: Question) -> str:
    """lm-evaluation-harness's WMDP/MMLU prompt: the question, one ``X. choice`` line per choice, ``Answer:``."""
    lines = [q.question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)), "Answer:"]
    return "\n".join(lines)


class TamperWMDPDataModule(TamperDataModule):
    """Forget/retain texts and WMDP-bio/retain multiple-choice questions from an exported directory (see the module
    docstring); the same interface as :class:`datamodules.tar_facts.TamperFactsDataModule`.

    Args:
        data_dir: the directory written by ``python -m foundation.export_wmdp``.
        tokenizer: asset name, local path or hub id of the tokenizer (the model's).
        bos_token: token put before every text (``None``: only what the tokenizer adds itself, e.g. Llama-3's
            ``<|begin_of_text|>``).
        max_length: tokens per text or question (official TAR-bio: 256); a longer question loses the start of its
            prompt.
        meta_fraction: share of the forget corpus held out as TAR's ``x_TR`` (official: 0.2).
        attack_fraction: share of the forget corpus held out for the tampering attacks.
        max_texts: cap on the texts of each corpus (forget, retain) after shuffling (``None``: all).
        forget_eval_size: forget questions (the first of the file; ``None``: all).
        retain_eval_size: retain questions (a seeded sample; ``None``: all).
        question_format: ``letters`` (choices listed, the letter scored) or ``cloze`` (each choice's text scored).
        batch_size: texts per training batch (forget and retain each).
        eval_batch_size: questions per evaluation batch.
        seed: seed of the corpus splits and of the retain-question sample.
    """

    def __init__(
        self,
        data_dir: str,
        tokenizer: str = "smollm2-135m",
        bos_token: str | None = None,
        max_length: int = 256,
        meta_fraction: float = 0.2,
        attack_fraction: float = 0.2,
        max_texts: int | None = None,
        forget_eval_size: int | None = None,
        retain_eval_size: int | None = None,
        question_format: Literal["letters", "cloze"] = "letters",
        batch_size: int = 8,
        eval_batch_size: int = 32,
        seed: int = 0,
    ):
        super().__init__(tokenizer, bos_token, batch_size, eval_batch_size, seed)
        if not (0 < meta_fraction and 0 < attack_fraction and meta_fraction + attack_fraction < 1):
            raise ValueError(f"meta_fraction={meta_fraction} and attack_fraction={attack_fraction} must be positive "
                             "and leave part of the forget corpus for forget_train (sum < 1)")  # fmt: skip
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too short for a question and its answer")
        for name, value in (("max_texts", max_texts), ("forget_eval_size", forget_eval_size),
                            ("retain_eval_size", retain_eval_size)):  # fmt: skip
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null (all), got {value}")
        if question_format not in ("letters", "cloze"):
            raise ValueError(f"question_format must be 'letters' or 'cloze', got {question_format!r}")
        self.data_dir, self.max_length = data_dir, max_length
        self.meta_fraction, self.attack_fraction, self.max_texts = meta_fraction, attack_fraction, max_texts
        self.forget_eval_size, self.retain_eval_size = forget_eval_size, retain_eval_size
        self.question_format = question_format
        self.meta = read_meta(data_dir)  # fails early, naming the export command

    # --- splitting (strings; no tokenizer) --------------------------------------------------------------
    def split_texts(self) -> dict[str, list[str]]:
        """The sentence splits as texts: disjoint, deduplicated, seeded."""
        rng = random.Random(self.seed)
        corpora = {}
        for stem in ("forget", "retain"):
            texts = list(dict.fromkeys(read_texts(self.data_dir, stem)))  # exact duplicates would cross splits
            rng.shuffle(texts)
            corpora[stem] = texts[: self.max_texts]
        shared = set(corpora["forget"]) & set(corpora["retain"])  # neither forgotten nor kept: dropped from both
        forget, retain = ([t for t in corpora[stem] if t not in shared] for stem in ("forget", "retain"))
        n_meta, n_attack = round(self.meta_fraction * len(forget)), round(self.attack_fraction * len(forget))
        if min(n_meta, n_attack, len(forget) - n_meta - n_attack) < 1:
            raise ValueError(f"{self.data_dir}: {len(forget)} forget texts are too few for meta_fraction="
                             f"{self.meta_fraction} and attack_fraction={self.attack_fraction}")  # fmt: skip
        return {"forget_meta": forget[:n_meta], "attack": forget[n_meta : n_meta + n_attack],
                "forget_train": forget[n_meta + n_attack :], "retain_train": retain}  # fmt: skip

    def split_questions(self) -> dict[str, list[Question]]:
        """``forget_eval`` (WMDP-bio, file order) and ``retain_eval`` (a seeded sample of the retain benchmark)."""
        forget = read_questions(self.data_dir, "forget_questions", self.forget_eval_size)
        retain = read_questions(self.data_dir, "retain_questions")
        if self.retain_eval_size is not None and self.retain_eval_size < len(retain):
            retain = random.Random(self.seed).sample(retain, self.retain_eval_size)
        sizes = {len(q.choices) for q in forget + retain}
        if len(sizes) != 1:
            raise ValueError(f"{self.data_dir}: questions have {sorted(sizes)} choices; the evaluation stacks options "
                             "into one tensor and needs the same number everywhere")  # fmt: skip
        if self.question_format == "letters" and max(sizes) > len(LETTERS):
            raise ValueError(f"{max(sizes)} choices exceed the {len(LETTERS)} letters: use question_format: cloze")
        return {"retain_eval": retain, "forget_eval": forget}

    def options(self, q: Question) -> tuple[str, list[str]]:
        """The prompt and the scored option strings of a question."""
        if self.question_format == "letters":
            return letters_prompt(q), list(LETTERS[: len(q.choices)])
        return f"{q.question.strip()}\nAnswer:", list(q.choices)

    # --- tokenising -------------------------------------------------------------------------------------
    def build(self, tok, bos_id: int | None) -> dict[str, TensorBatchDataset]:
        self.texts, self.questions = self.split_texts(), self.split_questions()
        sets = {}
        for name, texts in self.texts.items():
            rows = [encode_text(tok, bos_id, t, self.max_length) for t in texts]
            sets[name] = TensorBatchDataset(*pad_rows(rows, longest(rows), tok.pad_token_id))
        for name, questions in self.questions.items():
            encoded = []
            for i, q in enumerate(questions):
                prompt, options = self.options(q)
                try:
                    encoded.append([encode_completion(tok, bos_id, prompt, o, self.max_length) for o in options])
                except ValueError as err:
                    raise ValueError(f"{name} question {i} ({q.subject or 'no subject'}): {err}") from None
            sets[name] = question_set(encoded, [q.answer for q in questions], longest(*encoded), tok.pad_token_id)
        return sets

    def describe(self) -> dict:
        """What an artifact manifest records about the data (with the export's sources and revisions)."""
        return {**super().describe(), "data_dir": str(Path(self.data_dir)), "sources": self.meta.get("sources", {}),
                "max_length": self.max_length, "question_format": self.question_format}  # fmt: skip
