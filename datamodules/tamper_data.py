"""The data contract of tamper-resistant safeguards (TAR, arXiv 2408.00761) and their tampering attacks, shared by the
forget/retain DataModules (:mod:`datamodules.tar_facts` offline, :mod:`datamodules.tar_wmdp` on hub exports).

A DataModule of this family holds token tensors for

- four *sentence* splits (:data:`SENTENCE_SPLITS`): ``forget_train`` (the defender's forget corpus, also TAR's
  sampled adversaries' data), ``forget_meta`` (TAR's held-out ``x_TR``), ``attack`` (the tampering attacker's
  corpus) and ``retain_train``; each ``(input_ids, attention_mask, answer_mask)`` ``[N, T]``, right-padded, where
  ``answer_mask`` marks the tokens that the completion-only losses and TAR's entropy count;
- two *question* splits (:data:`QUESTION_SPLITS`): ``retain_eval`` then ``forget_eval``, each
  ``(input_ids, attention_mask, answer_mask)`` ``[Q, O, T]`` (prompt + option ``o``) plus the correct option ``[Q]``.

Recipes use ``sample(split, batch_size, generator)`` (TAR's inner loop, the attacks), ``sentences(split)``,
``train_dataloader()`` (``{"forget", "retain"}`` batches) and ``val_dataloader()`` (retain questions first, so the
recipes' ``acc`` is retain accuracy). Subclasses only implement :meth:`TamperDataModule.build`.
"""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader

from datamodules.base import ResumableDataLoader, TensorBatchDataset, _already_batched
from datamodules.text import load_tokenizer

SENTENCE_SPLITS = ("forget_train", "forget_meta", "attack", "retain_train")
QUESTION_SPLITS = ("retain_eval", "forget_eval")  # retain first: its accuracy is the recipes' "acc"

Row = tuple[list[int], int]  # token ids and how many trailing tokens are the answer


def encode_completion(tok, bos_id: int | None, prompt: str, answer: str, max_length: int | None = None) -> Row:
    """Token ids of ``prompt answer`` (``bos_id`` first if given) and the number of answer tokens. Past
    ``max_length`` the prompt is cut from the left (after the tokenizer's own leading special tokens), so the end
    of the prompt and the whole answer stay."""
    bos = [] if bos_id is None else [bos_id]
    p, full = tok(prompt)["input_ids"], tok(prompt + " " + answer)["input_ids"]
    n = len(full) - len(p) if full[: len(p)] == p else len(tok(" " + answer, add_special_tokens=False)["input_ids"])
    n, seq = max(n, 1), bos + full
    if max_length is not None and len(seq) > max_length:
        keep = len(bos) + len(tok("")["input_ids"])  # leading specials the tokenizer adds by itself
        if keep + n >= max_length:
            raise ValueError(f"an answer of {n} tokens does not fit max_length={max_length} with its prompt "
                             f"({prompt[:60]!r}...): raise max_length")  # fmt: skip
        seq = seq[:keep] + seq[len(seq) - (max_length - keep) :]
    return seq, n


def encode_text(tok, bos_id: int | None, text: str, max_length: int) -> Row:
    """Token ids of a free text (``bos_id`` first if given), its first ``max_length`` tokens; every token is
    'answer' (the completion-only losses and TAR's entropy count all of them, as the official code does)."""
    bos = [] if bos_id is None else [bos_id]
    seq = bos + tok(text, truncation=True, max_length=max_length - len(bos))["input_ids"]
    return seq, len(seq)


def pad_rows(rows: list[Row], width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad encoded rows to ``width``: ``(input_ids, attention_mask, answer_mask)`` ``[N, width]``."""
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask, ans = torch.zeros_like(ids, dtype=torch.bool), torch.zeros_like(ids, dtype=torch.bool)
    for i, (seq, n) in enumerate(rows):
        ids[i, : len(seq)], mask[i, : len(seq)] = torch.tensor(seq), True
        ans[i, len(seq) - n : len(seq)] = True
    return ids, mask, ans


def question_set(questions: list[list[Row]], labels: list[int], width: int, pad_id: int) -> TensorBatchDataset:
    """Questions (each a list of its encoded options, all with the same number of options) as ``[Q, O, width]``
    tensors plus the correct option ``[Q]``."""
    num_options = len(questions[0]) if questions else 0
    flat = pad_rows([row for q in questions for row in q], width, pad_id)
    return TensorBatchDataset(*[t.view(len(questions), num_options, width) for t in flat], torch.tensor(labels))


def longest(*groups: list[Row]) -> int:
    """The longest encoded row in ``groups`` (at least 2 tokens: one to condition on, one to predict)."""
    return max([2, *(len(seq) for rows in groups for seq, _ in rows)])


class TamperDataModule(L.LightningDataModule):
    """Base of the forget/retain DataModules (see the module docstring): tokenizer loading, split access, random
    batches for inner loops and attacks, and the loaders. Subclasses implement :meth:`build`.

    Args:
        tokenizer: asset name, local path or hub id of the tokenizer (the model's).
        bos_token: token put before every text (use the model's ``bos_token``; ``None``: none added beyond what the
            tokenizer adds itself).
        batch_size: sentences per training batch (forget and retain each).
        eval_batch_size: questions per evaluation batch.
        seed: seed of the splits (and of anything else a subclass draws).
    """

    def __init__(self, tokenizer: str, bos_token: str | None, batch_size: int, eval_batch_size: int, seed: int):
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(f"batch_size and eval_batch_size must be positive, got {batch_size}, {eval_batch_size}")
        self.tokenizer_name, self.bos_token = tokenizer, bos_token
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.sets: dict[str, TensorBatchDataset] = {}

    def build(self, tok, bos_id: int | None) -> dict[str, TensorBatchDataset]:
        """Every split of :data:`SENTENCE_SPLITS` and :data:`QUESTION_SPLITS`, tokenised with ``tok``."""
        raise NotImplementedError(f"{type(self).__name__} must define build(tok, bos_id)")

    def setup(self, stage: str | None = None) -> None:
        if self.sets:
            return
        tok = load_tokenizer(self.tokenizer_name)
        bos_id = None
        if self.bos_token is not None:
            bos_id = tok.convert_tokens_to_ids(self.bos_token)
            if tok.convert_ids_to_tokens(bos_id) != self.bos_token:
                raise ValueError(f"bos_token {self.bos_token!r} is not a token of {self.tokenizer_name}")
        sets = self.build(tok, bos_id)
        missing = set(SENTENCE_SPLITS + QUESTION_SPLITS) - set(sets)
        if missing:
            raise RuntimeError(f"{type(self).__name__}.build returned no split {sorted(missing)}")
        self.sets = sets

    def describe(self) -> dict:
        """What an artifact manifest records about the data."""
        sizes = {k: len(v) for k, v in self.sets.items()}
        return {"datamodule": type(self).__name__, "sizes": sizes, "seed": self.seed}

    # --- access -----------------------------------------------------------------------------------------
    def sentences(self, split: str) -> TensorBatchDataset:
        if split not in SENTENCE_SPLITS:
            raise ValueError(f"unknown sentence split {split!r}; choose from {SENTENCE_SPLITS}")
        self.setup()
        return self.sets[split]

    def sample(self, split: str, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """A random batch (without replacement within the batch) of a sentence split."""
        data = self.sentences(split)
        idx = torch.randperm(len(data), generator=generator)[: min(batch_size, len(data))]
        return data.__getitems__(idx.tolist())

    def _loader(self, data: TensorBatchDataset, batch_size: int, shuffle: bool) -> DataLoader:
        gen = torch.Generator().manual_seed(self.seed) if shuffle else None
        cls = ResumableDataLoader if shuffle else DataLoader  # a resumed run continues the interrupted shuffle
        return cls(data, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=_already_batched)

    def train_dataloader(self) -> CombinedLoader:
        """``{"forget": ..., "retain": ...}`` sentence batches (the shorter corpus cycles)."""
        loaders = {k: self._loader(self.sentences(f"{k}_train"), self.batch_size, True) for k in ("forget", "retain")}
        return CombinedLoader(loaders, mode="max_size_cycle")

    def val_dataloader(self) -> list[DataLoader]:
        """``[retain questions, forget questions]``."""
        self.setup()
        return [self._loader(self.sets[n], self.eval_batch_size, False) for n in QUESTION_SPLITS]

    def test_dataloader(self) -> list[DataLoader]:
        return self.val_dataloader()
