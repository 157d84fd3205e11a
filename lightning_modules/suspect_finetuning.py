"""The base of the defenses over a given suspect model: plain fine-tuning of the suspect on a small clean set, with
the clean pretrained weights ``w_pre`` kept beside it (the baseline of Fine-mixing, Zhang et al., EMNLP 2022 Findings,
arXiv:2210.09545; :mod:`lightning_modules.finemixing` holds Fine-mixing and E-PUR).

The recipe reads the suspect (possibly backdoored) fine-tuned weights from an artifact, applies a subclass's
purification once when fit starts (:meth:`SuspectFineTuning.purify`; none here), and then fine-tunes on the
DataModule's clean training set (a small subset, e.g. 64 or 256 texts) with the ordinary classifier training step.
``trainer.max_epochs: 0`` applies the purification alone. The triggered loader of the DataModule is only ever used
to *measure* ASR; no defense step sees it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from foundation.artifacts import load_artifact, parent_record
from lightning_modules.classifier import ClassifierRecipe


def refuse_poisoned_training_set(recipe: ClassifierRecipe, does: str) -> None:
    """Raise if the recipe's DataModule poisoned training samples: a defense ``does`` (fine-tunes, unlearns) on clean
    data (its ``require_clean_data``)."""
    mask = getattr(recipe.trainer.datamodule, "poison_mask", None)
    if mask is not None and bool(mask.any()):
        raise ValueError(
            f"{type(recipe).__name__} {does} on clean data, but the DataModule poisoned {int(mask.sum())} training "
            "samples: set data.init_args.poisoning.init_args.rate: 0 (the triggered evaluation set is still built), "
            "or require_clean_data: false"
        )


class SuspectFineTuning(ClassifierRecipe):
    """Plain fine-tuning of a suspect model on a small clean set: the baseline of Fine-mixing, and the base of
    every defense that starts from a suspect artifact and the clean pretrained weights.

    ``configure_model`` builds ``net`` (its spec names the *pretrained* backbone, e.g. ``minilm-l6``), keeps
    its weights as ``w_pre`` (or those of ``reference``), then loads the suspect artifact into it. Subclasses
    override :meth:`purify`, which runs once when fit starts (it can use the clean training and validation
    loaders); fine-tuning is :class:`ClassifierRecipe`'s.

    Args:
        net: the classifier network; its built weights are the clean pretrained ones, unless ``reference``.
        suspect: artifact (``foundation.artifacts``) with the suspect fine-tuned weights of the whole recipe
            (``net.*`` keys, as ``ClassifierRecipe`` exports them); ``None``: ``net``'s built weights are
            the suspect (e.g. its spec names a fine-tuned checkpoint), then ``reference`` is needed.
        reference: a network whose built weights are ``w_pre`` (same architecture as ``net``); ``None``:
            ``net``'s own weights before the suspect is loaded. Its head is typically freshly initialised.
        suspect_sha256: pinned SHA-256 of the suspect's ``model.safetensors`` (checked if given).
        require_clean_data: refuse a DataModule whose training set is poisoned (a defense fine-tunes on
            clean data; set ``poisoning.rate: 0`` to keep the triggered evaluation set).
        optimizer: optimizer factory of the fine-tuning (AdamW here; ``ClassifierRecipe``'s default is Adam).

    The other arguments of :class:`~lightning_modules.classifier.ClassifierRecipe` pass through (``scheduler``,
    ``label_smoothing``).
    """

    def __init__(
        self,
        net: nn.Module,
        suspect: str | None = None,
        reference: nn.Module | None = None,
        suspect_sha256: str | None = None,
        require_clean_data: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        **kwargs,
    ):
        super().__init__(net=net, optimizer=optimizer, **kwargs)
        if suspect is None and reference is None:
            raise ValueError("give a suspect artifact, or a reference network when net itself is the suspect")
        self.suspect, self.suspect_sha256, self.require_clean_data = suspect, suspect_sha256, require_clean_data
        self.__dict__["_reference"] = reference  # a spec, built once; not a submodule (never trained or saved)
        self.pretrained_state: dict[str, torch.Tensor] | None = None  # w_pre, CPU, keyed like net.state_dict()
        self.defense_record: dict = {}  # what purify() did, for the artifact manifest
        self._parents: list[dict] = []
        self._purified = False

    # ------------------------------------------------------------------ weights
    def configure_model(self) -> None:
        if self.pretrained_state is not None:  # Lightning calls this at every fit/test: load only once
            return
        super().configure_model()
        reference = self._reference
        if reference is not None:
            if hasattr(reference, "build"):
                reference.build()
            pretrained = reference.state_dict()
            self.__dict__["_reference"] = None  # free it
        else:
            pretrained = self.net.state_dict()
        self.pretrained_state = {k: v.detach().to("cpu", copy=True) for k, v in pretrained.items()}
        ours = self.net.state_dict()
        bad = [k for k in ours if k not in self.pretrained_state or self.pretrained_state[k].shape != ours[k].shape]
        if bad:
            raise ValueError(f"reference and net differ in {bad[:5]}: the reference must have net's architecture")
        if self.suspect is not None:
            artifact = load_artifact(self.suspect, self.suspect_sha256)
            weights = {k.removeprefix("net."): v for k, v in artifact.state_dict.items()}
            self.net.load_state_dict(weights, strict=True)
            self._parents = [parent_record(artifact)]

    def load_net(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (keys of ``net.state_dict()``) into the network in place (optimizers stay valid)."""
        with torch.no_grad():
            for name, tensor in self.net.state_dict(keep_vars=True).items():
                tensor.copy_(state[name])

    # ------------------------------------------------------------------ the defense
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.require_clean_data:
            refuse_poisoned_training_set(self, "fine-tunes")

    def on_fit_start(self) -> None:
        if self._purified:  # resumed from a checkpoint of this defense: already done
            return
        self.purify()
        self._purified = True
        summary = {k: v for k, v in self.defense_record.items() if k not in ("epur_rows", "epur_scores")}
        if "epur_tokens" in summary:
            summary["epur_tokens"] = summary["epur_tokens"][:20]
        if summary:
            rank_zero_info(f"{type(self).__name__}: {summary}")

    def purify(self) -> None:
        """The defense's change to the suspect weights before fine-tuning; none for plain fine-tuning."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["defense"] = {"purified": self._purified, "record": self.defense_record}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("defense", {})
        self._purified, self.defense_record = bool(state.get("purified", False)), dict(state.get("record", {}))

    # ------------------------------------------------------------------ helpers for subclasses
    def clean_training_tokens(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(input_ids, attention_mask)`` of the whole clean training set (never the evaluation sets)."""
        train_set = self.trainer.datamodule.train_set
        tensors = getattr(train_set, "tensors", None)
        if tensors is None or len(tensors) < 3:
            raise TypeError("E-PUR needs a token DataModule whose train_set holds (input_ids, attention_mask, labels)")
        return tensors[0], tensors[1]

    def finetune_copy(self, epochs: int) -> None:
        """A short supervised fine-tuning of ``net`` in place with a fresh optimizer (used to compare
        candidates); the run's scheduler is not used."""
        dm = self.trainer.datamodule
        loader = dm.train_dataloader()
        optimizer = self.optimizer(p for p in self.parameters() if p.requires_grad)
        self.net.train()
        with torch.enable_grad():
            for epoch in range(epochs):
                if hasattr(loader.sampler, "set_epoch"):
                    loader.sampler.set_epoch(epoch)
                for batch in loader:
                    *inputs, labels = (t.to(self.device) for t in batch)
                    loss = F.cross_entropy(self(*inputs), labels, label_smoothing=self.label_smoothing)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def clean_val_accuracy(self) -> float:
        """Accuracy on the clean validation loader (the triggered one is never looked at)."""
        loader = self.trainer.datamodule.val_dataloader()[0]
        was_training = self.net.training
        self.net.eval()
        hits = total = 0
        for batch in loader:
            *inputs, labels = (t.to(self.device) for t in batch)
            hits += int((self(*inputs).argmax(-1) == labels).sum())
            total += len(labels)
        self.net.train(was_training)
        return hits / max(total, 1)

    def artifact_metadata(self) -> dict:
        return {**super().artifact_metadata(), "defense": {"type": type(self).__name__, **self.defense_record}}

    def artifact_parents(self) -> list[dict]:
        return list(self._parents)
