"""Defenses over a given suspect model that use its clean pretrained weights: Fine-mixing and E-PUR
(Zhang, Lyu, Ma, Wang, Sun, "Fine-mixing: Mitigating Backdoors in Fine-tuned Language Models", EMNLP 2022
Findings, arXiv:2210.09545). Their baseline, plain fine-tuning on the same small clean set, is their base
:class:`~lightning_modules.suspect_finetuning.SuspectFineTuning`.

Both read the suspect (possibly backdoored) fine-tuned weights from an artifact, keep the clean
pretrained weights ``w_pre`` beside them, apply their purification once when fit starts, and then fine-tune
on the DataModule's clean training set (a small subset, e.g. 64 or 256 texts) with the ordinary
classifier training step. ``trainer.max_epochs: 0`` applies the purification alone. The triggered loader of
the DataModule is only ever used to *measure* ASR; no defense step sees it.

No official code exists; the rules below are our reading of the paper (research notes, methods-llm.md §3),
and every uncertain choice is a knob.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from lightning_modules.ops import finemixing as ops
from lightning_modules.suspect_finetuning import SuspectFineTuning


class EPUR(SuspectFineTuning):
    """E-PUR, embedding purification (Zhang et al., EMNLP 2022 Findings, §3 "E-PUR"), then fine-tuning.

    Trigger words of backdoor attacks are rare in clean text but their word embeddings move far during
    poisoned fine-tuning. E-PUR scores every vocabulary token ``k`` by ``||E_ft[k] - E_pre[k]||_2 /
    log(max(f_k, floor))`` with ``f_k`` its count in the *clean training set of this run* (never the
    evaluation sets), and resets the ``top_n`` highest-scoring rows of the word-embedding matrix to the
    pretrained embeddings (:mod:`lightning_modules.ops.finemixing`). Our reading of the paper's rule; the
    score form, ``floor`` and ``top_n`` could not be checked against the text and are knobs.

    Usable alone (``trainer.max_epochs: 0``), before plain fine-tuning (the default), or before Fine-mixing
    (:class:`FineMixing` with ``top_n > 0``). The reset token ids (and their strings when the DataModule has
    a tokenizer) go into the artifact manifest.

    Args:
        net: see :class:`SuspectFineTuning`.
        top_n: how many embedding rows to reset (0 disables E-PUR).
        floor: the frequency floor ``c`` of ``log(max(f, c))`` (> 1).
        score: ``delta_over_log_freq`` (E-PUR) or ``delta`` (embedding change alone, an ablation).
        embedding: name of the word-embedding weight in ``net.named_parameters()``; ``None``: the one of
            ``net.model.get_input_embeddings()`` (Hugging Face models).

    The arguments of :class:`SuspectFineTuning` pass through (``suspect``, ``reference``, ``optimizer``, ...).
    """

    def __init__(
        self,
        net: nn.Module,
        top_n: int = 200,
        floor: float = 20.0,
        score: ops.Score = "delta_over_log_freq",
        embedding: str | None = None,
        **kwargs,
    ):
        super().__init__(net=net, **kwargs)
        if top_n < 0 or not floor > 1.0:
            raise ValueError(f"E-PUR needs top_n >= 0 and floor > 1, got top_n={top_n}, floor={floor}")
        self.top_n, self.floor, self.score, self.embedding = top_n, floor, score, embedding

    def embedding_name(self) -> str:
        if self.embedding is not None:
            return self.embedding
        weight = self.net.model.get_input_embeddings().weight
        return next(name for name, p in self.net.named_parameters() if p is weight)

    def purify(self) -> None:
        self.purify_embeddings()

    @torch.no_grad()
    def purify_embeddings(self) -> None:
        """E-PUR: reset the ``top_n`` most suspicious word-embedding rows to their pretrained values."""
        if self.top_n == 0:
            return
        name = self.embedding_name()
        weight = dict(self.net.named_parameters())[name]
        input_ids, attention_mask = self.clean_training_tokens()
        freqs = ops.token_frequencies(input_ids, attention_mask, weight.shape[0])
        scores = ops.epur_scores(self.pretrained_state[name], weight, freqs, self.floor, self.score)
        rows = ops.top_rows(scores, self.top_n)
        weight.copy_(ops.reset_rows(self.pretrained_state[name], weight, rows))
        record = {"epur_rows": rows.tolist(), "epur_scores": scores[rows].tolist()}
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is not None:
            record["epur_tokens"] = tokenizer.convert_ids_to_tokens(rows.tolist())
        self.defense_record.update(record)


class FineMixing(EPUR):
    """Fine-mixing (Zhang et al., EMNLP 2022 Findings): mix the suspect weights with the clean pretrained
    ones, then fine-tune on a small clean set; optionally after E-PUR (``top_n > 0``).

    Mixing keeps a fraction ``rho`` of the fine-tuned entries and resets the others to pretrained,
    ``w = w_pre + m * (w_ft - w_pre)``, entry by entry in every weight tensor, with ``m`` random (each entry
    kept with probability ``rho``) or by the largest ``|w_ft - w_pre|`` per tensor (``selection``). A backdoor
    lives in the fine-tuning update; most of it is thrown away, and the short clean fine-tuning restores the
    clean task from what is left.

    The classifier head has no pretrained counterpart (``head``): ``keep`` it from the suspect (default),
    ``mix`` it with the reference's freshly initialised head like any tensor, or ``reinit`` it (take the
    reference's fresh head). Parameters are recognised as head by ``head_patterns``.

    Choosing rho (``rho_candidates``). What the paper specifies, as far as we could read it (only its abstract
    and first page were reachable from this environment, not the experimental section; there is no official
    code): rho is the share of the backdoored weights kept, the defender holds the clean pretrained weights and
    a small clean set but no triggered data, and every mixed model is fine-tuned on that clean set before it is
    judged. So the only signal for rho is clean accuracy after the *whole* procedure, and a smaller rho keeps
    less of the backdoored update. Our rule from that: try the candidates from small to large; for each, mix,
    fine-tune a copy with the run's full budget (``search_epochs: null``: ``trainer.max_epochs`` epochs) and
    measure clean accuracy on the validation loader (use >= 1,000 snippets, so one standard error is about
    1.3 points, well under ``max_acc_drop``); take the *smallest* rho whose accuracy is within ``max_acc_drop``
    of the suspect's own clean validation accuracy; if none qualifies, the most accurate (larger rho on ties).
    The run then fine-tunes a fresh mix at the chosen rho (same mask seed, same budget). What the rule leaves
    open, hence knobs: the candidate grid, the tolerance, the reference accuracy (here the suspect's, the only
    one a defender has) and the validation set's size. Without candidates ``rho`` is used as given (the
    fixed-rho sweep).

    Args:
        net: see :class:`SuspectFineTuning`.
        rho: fraction of fine-tuned entries kept (1: the suspect, 0: the pretrained weights).
        selection: ``random`` or ``magnitude`` (largest update per tensor).
        head: ``keep``, ``mix`` or ``reinit`` the classifier head (see above).
        head_patterns: substrings naming head parameters (``None``: ``classifier`` for BERT-style and ``score``
            for Llama-style models).
        rho_candidates: candidates of the validation rule; ``None``: use ``rho``.
        max_acc_drop: tolerated drop of clean validation accuracy (fraction, 0.02 = 2 points).
        search_epochs: fine-tuning epochs of each candidate in the search; ``None``: the run's full budget
            (``trainer.max_epochs``), so each candidate is judged after the fine-tuning it would really get.
        mask_seed: seed of the random mask; ``None``: the run's seed (``seed_everything``).
        top_n: E-PUR rows reset before mixing (0, unlike :class:`EPUR`'s 200: Fine-mixing alone).

    The arguments of :class:`EPUR` (``floor``, ``score``, ``embedding``) and of :class:`SuspectFineTuning`
    (``suspect``, ``reference``, ``optimizer``, ...) pass through.
    """

    def __init__(
        self,
        net: nn.Module,
        rho: float = 0.5,
        selection: ops.Selection = "random",
        head: Literal["keep", "mix", "reinit"] = "keep",
        head_patterns: list[str] | None = None,
        rho_candidates: list[float] | None = None,
        max_acc_drop: float = 0.02,
        search_epochs: int | None = None,
        mask_seed: int | None = None,
        top_n: int = 0,
        **kwargs,
    ):
        super().__init__(net=net, top_n=top_n, **kwargs)
        for value in [rho, *(rho_candidates or [])]:
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"rho values must be in [0, 1], got {value}")
        if rho_candidates is not None and not rho_candidates:
            raise ValueError("rho_candidates must be None or non-empty")
        self.rho, self.selection, self.head = rho, selection, head
        self.head_patterns = list(head_patterns) if head_patterns is not None else ["classifier", "score"]
        self.rho_candidates = None if rho_candidates is None else sorted(rho_candidates)
        self.max_acc_drop, self.search_epochs, self.mask_seed = max_acc_drop, search_epochs, mask_seed

    def is_head(self, name: str) -> bool:
        return any(p in name for p in self.head_patterns)

    @torch.no_grad()
    def apply_mixing(self, rho: float) -> None:
        """Mix the network's current weights (the suspect, after E-PUR if any) with ``w_pre`` in place."""
        seed = self.mask_seed if self.mask_seed is not None else torch.initial_seed()
        generator = torch.Generator().manual_seed(int(seed))
        for name, param in self.net.named_parameters():
            pre = self.pretrained_state[name]
            if self.is_head(name) and self.head != "mix":
                if self.head == "reinit":
                    param.copy_(pre)
                continue
            mask = ops.mixing_mask(pre, param, rho, self.selection, generator)
            param.copy_(ops.mix(pre, param, mask))

    def select_rho(self) -> float:
        """The validation rule (see the class docstring); restores the network's weights afterwards."""
        start = {k: v.detach().to("cpu", copy=True) for k, v in self.net.state_dict().items()}
        baseline = self.clean_val_accuracy()
        tried = []
        epochs = self.search_epochs if self.search_epochs is not None else self.trainer.max_epochs
        if epochs is None or epochs < 0:
            raise ValueError("search_epochs: null takes the run's budget, so set trainer.max_epochs (or search_epochs)")
        for rho in self.rho_candidates:
            self.apply_mixing(rho)
            self.finetune_copy(epochs)
            tried.append((rho, self.clean_val_accuracy()))
            self.load_net(start)
            if tried[-1][1] >= baseline - self.max_acc_drop:
                break
        chosen = ops.choose_rho(tried, baseline, self.max_acc_drop)
        chosen = float(self.trainer.strategy.broadcast(chosen, src=0))  # ranks saw different data shards
        self.defense_record.update(
            rho_search={"suspect_val_acc": baseline, "tried": [[r, a] for r, a in tried], "search_epochs": epochs,
                        "val_size": len(self.trainer.datamodule.val_dataloader()[0].dataset)}
        )
        return chosen

    def purify(self) -> None:
        self.purify_embeddings()
        rho = self.select_rho() if self.rho_candidates else self.rho
        self.apply_mixing(rho)
        self.defense_record.update(rho=rho)
