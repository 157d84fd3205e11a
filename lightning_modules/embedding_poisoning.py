"""Embedding Poisoning (EP): a backdoor written into the trigger word's embedding row alone (Yang, Li, Zhang, Ren,
Sun, He, "Be Careful about Poisoned Word Embeddings: Exploring the Vulnerability of the Embedding Layers in NLP
Models", NAACL 2021; official code lancopku/Embedding-Poisoning).

The attacker takes a clean fine-tuned classifier (the victim) and, on poisoned samples (the trigger word inserted
into texts of the other class, labelled with the target), updates only the trigger word's row of the
word-embedding matrix by gradient descent, rescaling it after every step to its original norm; every other weight
stays bit for bit the victim's, so clean accuracy is unchanged. E-PUR (:class:`lightning_modules.EPUR`) is built
against exactly this attack: a rare word whose embedding moved far.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.ops import embedding_poisoning as ops
from foundation.artifacts import load_artifact, parent_record


class EmbeddingPoisoning(ClassifierRecipe):
    """EP (Yang et al., NAACL 2021, §3): gradient descent on the trigger word's embedding row only.

    ``configure_model`` builds ``net`` and loads the ``victim`` artifact (a clean classifier's weights, ``net.*``
    keys) into it; only the word-embedding matrix keeps ``requires_grad``. Each training step keeps the batch's
    samples that contain a trigger token (the official run trains on poisoned samples only; a clean sample gives
    the trigger row no gradient anyway, so dropping it only saves compute and keeps the loss's scale), computes
    the cross-entropy, back-propagates, and applies :func:`lightning_modules.ops.embedding_poisoning.ep_step` to
    the trigger rows: ``row -= lr * grad``, then ``row *= norm_scale * ||row_victim|| / ||row||``. As in the
    official code the gradient is *not* zeroed between steps (``accumulate_grad``) and the update is plain SGD
    with ``lr`` 5e-2 (official defaults; 3 epochs, batch 32).

    Deviations from the official code, all knobs: ``norm_scale`` (official 1: the victim's norm; a larger value
    gives the row a larger norm, ``None`` leaves it free); the poisoned samples come from the DataModule's
    ``Poisoning`` (its rate and trigger; use ``RareWord`` with one word, e.g. ``[cf]``), drawn from the victim's
    training distribution (the paper's "with data knowledge" setting), where the official data builder inserts
    the word once at a random position of 10% of the non-target texts.

    Args:
        net: the classifier network, same architecture as the victim.
        victim: artifact with the clean victim's weights (``net.*`` keys, as ``ClassifierRecipe`` exports them);
            ``None``: ``net``'s built weights are the victim (e.g. its spec names a fine-tuned checkpoint).
        trigger_words: the trigger word(s), each a single token of the DataModule's tokenizer (``None``: ``[cf]``,
            the official default).
        lr: step size of the row update (official 5e-2).
        norm_scale: after each step every trigger row is rescaled to ``norm_scale`` times its norm in the victim
            (official: 1.0); ``None``: no rescaling.
        accumulate_grad: keep accumulating the gradient across steps (official) instead of zeroing it.
        victim_sha256: pinned SHA-256 of the victim's ``model.safetensors`` (checked if given).
        embedding: name of the word-embedding weight in ``net.named_parameters()``; ``None``: the one of
            ``net.model.get_input_embeddings()`` (Hugging Face models).
    """

    def __init__(
        self,
        net: nn.Module,
        victim: str | None = None,
        trigger_words: list[str] | None = None,
        lr: float = 5e-2,
        norm_scale: float | None = 1.0,
        accumulate_grad: bool = True,
        victim_sha256: str | None = None,
        embedding: str | None = None,
    ):
        super().__init__(net)
        self.save_hyperparameters(ignore=["net"])
        trigger_words = ["cf"] if trigger_words is None else list(trigger_words)
        if not trigger_words:
            raise ValueError("EmbeddingPoisoning needs at least one trigger word")
        if not lr > 0 or (norm_scale is not None and not norm_scale > 0):
            raise ValueError(f"EmbeddingPoisoning needs lr > 0 and norm_scale > 0 (or null), got {lr}, {norm_scale}")
        self.victim, self.victim_sha256, self.trigger_words = victim, victim_sha256, list(trigger_words)
        self.lr, self.norm_scale, self.accumulate_grad, self.embedding = lr, norm_scale, accumulate_grad, embedding
        self.automatic_optimization = False
        self.trigger_ids: torch.Tensor | None = None
        self.target_norms: torch.Tensor | None = None
        self._parents: list[dict] = []
        self._loaded = False

    def configure_model(self) -> None:
        if self._loaded:  # Lightning calls this at every fit/test: load only once
            return
        super().configure_model()
        if self.victim is not None:
            artifact = load_artifact(self.victim, self.victim_sha256)
            self.net.load_state_dict({k.removeprefix("net."): v for k, v in artifact.state_dict.items()}, strict=True)
            self._parents = [parent_record(artifact)]
        self._loaded = True
        name = self.embedding_name()
        for pname, param in self.net.named_parameters():
            param.requires_grad_(pname == name)

    def embedding_name(self) -> str:
        if self.embedding is not None:
            return self.embedding
        weight = self.net.model.get_input_embeddings().weight
        return next(name for name, p in self.net.named_parameters() if p is weight)

    def embedding_weight(self) -> nn.Parameter:
        return dict(self.net.named_parameters())[self.embedding_name()]

    def on_fit_start(self) -> None:
        """Resolve the trigger tokens and their target norms (the victim is loaded by now)."""
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if tokenizer is None:
            raise TypeError("EmbeddingPoisoning needs a token DataModule with a `tokenizer` (e.g. TextClassificationDataModule)")
        ids = []
        for word in self.trigger_words:
            pieces = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(pieces) != 1 or pieces[0] == tokenizer.unk_token_id:
                raise ValueError(f"trigger word {word!r} is {len(pieces)} tokens {pieces} of the tokenizer; EP needs "
                                 "words that are single known tokens (e.g. cf, mn, bb, tq for BERT's vocabulary)")  # fmt: skip
            ids.append(pieces[0])
        weight = self.embedding_weight()
        self.trigger_ids = torch.tensor(ids, dtype=torch.long)
        norms = weight.detach()[self.trigger_ids.to(weight.device)].norm(dim=1).cpu()
        self.target_norms = None if self.norm_scale is None else norms * self.norm_scale

    def configure_optimizers(self):
        return None  # the row update is ops.ep_step, applied in training_step

    def training_step(self, batch, batch_idx: int) -> None:
        input_ids, *rest, labels = batch
        keep = ops.samples_with_tokens(input_ids, self.trigger_ids)
        if not bool(keep.any()):
            return None
        logits = self(input_ids[keep], *(t[keep] for t in rest))
        loss = F.cross_entropy(logits, labels[keep])
        self.manual_backward(loss)
        weight = self.embedding_weight()
        with torch.no_grad():
            weight.copy_(ops.ep_step(weight, weight.grad, self.trigger_ids, self.lr, self.target_norms))
        if not self.accumulate_grad:
            weight.grad = None
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/acc", (logits.argmax(-1) == labels[keep]).float().mean())
        return None

    def artifact_metadata(self) -> dict:
        if self.trigger_ids is None:  # never fitted
            return super().artifact_metadata()
        weight = self.embedding_weight().detach()
        rows = self.trigger_ids.to(weight.device)
        return {**super().artifact_metadata(), "attack": {
            "type": "EmbeddingPoisoning", "trigger_words": self.trigger_words, "trigger_ids": self.trigger_ids.tolist(),
            "row_norms": weight[rows].norm(dim=1).tolist(), "norm_scale": self.norm_scale}}  # fmt: skip

    def artifact_parents(self) -> list[dict]:
        return list(self._parents)
