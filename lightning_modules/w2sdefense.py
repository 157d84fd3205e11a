"""W2SDefense (Zhao, Wu, Nguyen, Jia, Jia, Feng, Luu, "Unlearning Backdoor Attacks for LLMs with Weak-to-Strong
Knowledge Distillation", Findings of ACL 2025, arXiv:2410.14425; official code ``shuaizhao95/w2sdefense``).

A large poisoned classifier (the *strong student*) is unlearned with parameter-efficient fine-tuning on clean data,
guided by a *weak teacher*: a small model fully fine-tuned on the same clean task, whose features are projected
to the student's hidden size. The student (LoRA adapters on top of the poisoned weights) minimises

    L = a * CE(student, y) + b * KD_T(student || teacher) + c * FA(student features, teacher features)

(official defaults a = 5, b = c = 0.001, T = 2). The teacher never saw poisoned data, so matching it on clean
inputs pulls the student's features and outputs away from what the backdoor relies on, at the cost of a LoRA run.

- :class:`ProjectedTeacher` is the weak teacher: an encoder (MiniLM-L6 here, BERT-base in the paper), its
  ``[CLS]`` vector through ``Linear(h, d_student) + ReLU`` (the features FA aligns to), then ``Linear(d_student,
  classes)``. Train it with :class:`~lightning_modules.classifier.ClassifierRecipe` on clean data.
- :class:`PEFTUnlearning` loads the poisoned artifact into the student, merges any LoRA adapters it was poisoned
  with, adds fresh LoRA adapters (peft) and fine-tunes them with cross-entropy on clean data: the paper's
  LoRA-only ablation, and the base of W2SDefense.
- :class:`W2SDefense` adds the frozen teacher and the KD and feature-alignment terms
  (:mod:`lightning_modules.ops.distill`).

The feature-alignment term is the official one, the mean *squared* distance (``contrastive_loss`` in
``shuaizhao95/w2sdefense`` at commit 628478cf73ed55d1fddfc03ca75a5fb3976f3a68, ``word/unlearning.py`` lines 72-75;
quoted in :mod:`lightning_modules.ops.distill`). What it is computed between comes in two named forms:

- :class:`W2SDefense` (per-sample, pooled): each sample's final-layer student feature, pooled at the token the
  classification head reads (``pooling``; by default the last non-padding token, under left or right padding),
  against that sample's own teacher feature. This is the paper's description.
- :class:`W2SDefenseBroadcast` (official broadcast): what the official lines compute. The teacher returns its
  projected features ``[B, d]`` under the key ``'hidden_states'`` (``word/bert_plus.py`` line 31, ``output =
  {'logits': logits, 'hidden_states': transformed_hidden_output}``), and ``unlearning.py`` line 95,
  ``teacher_hidden_states = teacher_logits_out['hidden_states'][-1]``, takes its *last row*, the last sample's
  ``[d]`` vector; line 98 keeps the student's unpooled ``hidden_states[-1]`` ``[B, T, d]``, and
  ``F.pairwise_distance`` broadcasts one against the other for any ``T``. Every token of every sample, padding
  included, is pulled toward that one teacher vector.

Both models read the same text: each training batch of student tokens is decoded with the DataModule's tokenizer
and re-tokenized with the teacher's (so the teacher sees the student's truncated text, nothing more).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import nn

from lightning_modules.classifier import ClassifierRecipe
from lightning_modules.nets.hf import HFSequenceClassifier, LoraSpec, load_hf_model
from lightning_modules.ops import distill
from lightning_modules.suspect_finetuning import refuse_poisoned_training_set
from foundation import assets
from foundation.artifacts import load_artifact, parent_record


def _load_net_weights(net: nn.Module, path: str, sha256: str | None, what: str) -> dict:
    """Load the ``net.*`` tensors of a ClassifierRecipe artifact into ``net`` (strict); return its parent record."""
    artifact = load_artifact(path, sha256)
    weights = {k.removeprefix("net."): v for k, v in artifact.state_dict.items() if k.startswith("net.")}
    missing, unexpected = net.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"the {what} artifact {path} does not fit the configured network (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}): configure the {what} network exactly as in the run that exported it (same backbone, "
            "same LoRA spec)"
        )
    return parent_record(artifact)


class ProjectedTeacher(nn.Module):
    """W2SDefense's weak teacher: encoder ``[CLS]`` -> ``Linear(h, student_hidden_size)`` -> ReLU -> ``Linear``.

    The ReLU output is the teacher's feature that the student's pooled final-layer feature is aligned to, so
    ``student_hidden_size`` must be the student's hidden size (576 for SmolLM2-135M, 4096 for Llama-3-8B).

    Args:
        pretrained: encoder asset name (``minilm-l6``), local directory or hub id (``bert-base-uncased``).
        student_hidden_size: width of the projection, the student's hidden size.
        num_labels: classes of the head.
        random_init: build the encoder from its config with random weights (tests).
        config_overrides: encoder config fields to override (tiny test twins; needs ``random_init``).
        dtype: parameter dtype.
    """

    def __init__(
        self,
        pretrained: str = "minilm-l6",
        student_hidden_size: int = 576,
        num_labels: int = 2,
        random_init: bool = False,
        config_overrides: dict | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
    ):
        super().__init__()
        if config_overrides and not random_init:
            raise ValueError("config_overrides change the architecture; they need random_init: true")
        if student_hidden_size < 1 or num_labels < 2:
            raise ValueError(f"need student_hidden_size >= 1 and num_labels >= 2, got {student_hidden_size}, {num_labels}")
        self.pretrained, self.student_hidden_size, self.num_labels = pretrained, student_hidden_size, num_labels
        self.random_init, self.config_overrides, self.dtype = random_init, dict(config_overrides or {}), dtype
        self.encoder: nn.Module | None = None

    def build(self) -> None:
        """Load (or initialise) the encoder and create the projection and head; idempotent."""
        if self.encoder is not None:
            return
        from transformers import AutoConfig, AutoModel

        path, dtype = assets.resolve(self.pretrained), getattr(torch, self.dtype)
        config = AutoConfig.from_pretrained(path, **self.config_overrides)
        self.encoder = load_hf_model(AutoModel, path, config, self.random_init, dtype).train()
        self.project = nn.Linear(config.hidden_size, self.student_hidden_size, dtype=dtype)
        self.head = nn.Linear(self.student_hidden_size, self.num_labels, dtype=dtype)

    def features_and_logits(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, student_hidden_size], logits [B, num_labels])``."""
        if self.encoder is None:
            raise RuntimeError("ProjectedTeacher.build() was not called (recipes call it in configure_model)")
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        features = F.relu(self.project(distill.pool_features(hidden, attention_mask, "first")))
        return features, self.head(features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.features_and_logits(input_ids, attention_mask)[1]


class PEFTUnlearning(ClassifierRecipe):
    """LoRA fine-tuning of a poisoned classifier on clean data with cross-entropy only: W2SDefense's "PEFT
    without distillation" ablation (official ``lora.py``), and the base of :class:`W2SDefense`.

    ``configure_model`` builds ``net``, loads the suspect artifact into it, merges the adapters it was poisoned
    with (if any, so the suspect is one plain set of weights), freezes it and adds fresh LoRA adapters (peft; for
    sequence classification peft also trains the head in full). Only adapters and head change.

    Args:
        net: the student network, configured as in the run that exported ``suspect`` (same backbone, same
            LoRA spec if it was poisoned with LoRA).
        suspect: artifact of the poisoned classifier (``net.*`` keys, as ``ClassifierRecipe`` exports);
            ``None``: ``net``'s built weights are the suspect.
        suspect_sha256: pinned SHA-256 of the suspect's ``model.safetensors`` (checked if given).
        lora: the unlearning adapters; ``None``: ``LoraSpec()`` (r 8, alpha 16, peft's default target modules).
        require_clean_data: refuse a DataModule whose training set is poisoned (set the poisoning rate to 0:
            the trigger then only builds the triggered evaluation set).
        optimizer: optimizer factory (called with the adapters and head; AdamW here, Adam in ``ClassifierRecipe``).
        restore_best_val: keep the trainable weights (adapters and head) of the epoch with the highest clean
            validation accuracy and restore them when training ends, before testing and export: the official
            best-dev checkpoint (``word/unlearning.py`` at 628478c, lines 128-130: ``if dev_clean_acc >
            best_dev_acc: torch.save(model.state_dict(), ...)``). Needs validation every epoch.

    The other arguments of :class:`~lightning_modules.classifier.ClassifierRecipe` pass through (``scheduler``,
    ``label_smoothing``).
    """

    def __init__(
        self,
        net: HFSequenceClassifier,
        suspect: str | None = None,
        suspect_sha256: str | None = None,
        lora: LoraSpec | None = None,
        require_clean_data: bool = True,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        restore_best_val: bool = False,
        **kwargs,
    ):
        super().__init__(net=net, optimizer=optimizer, **kwargs)
        self.suspect, self.suspect_sha256, self.require_clean_data = suspect, suspect_sha256, require_clean_data
        self.lora = lora if lora is not None else LoraSpec()
        self.restore_best_val = restore_best_val
        self._best: dict | None = None  # {"val_acc", "epoch", "state"} of the best validation epoch so far
        self._parents: list[dict] = []
        self._adapted = False

    def configure_model(self) -> None:
        if self._adapted:  # Lightning calls this at every fit/test
            return
        from peft import PeftModel, get_peft_model

        self.net.build()
        if self.suspect is not None:
            self._parents.append(_load_net_weights(self.net, self.suspect, self.suspect_sha256, "suspect"))
        model = self.net.model
        if isinstance(model, PeftModel):
            model = model.merge_and_unload()
        self.net.model = get_peft_model(model, self.lora.to_peft())
        self._adapted = True

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.require_clean_data:
            refuse_poisoned_training_set(self, "unlearns")

    def on_validation_end(self) -> None:
        if not self.restore_best_val or self.trainer.sanity_checking:
            return
        acc = self.trainer.callback_metrics.get("val/acc")
        if acc is None:
            raise RuntimeError("restore_best_val needs the clean validation accuracy val/acc: give the DataModule a "
                               "validation set and do not set limit_val_batches: 0")  # fmt: skip
        if self._best is None or float(acc) > self._best["val_acc"]:
            state = {n: p.detach().clone() for n, p in self.named_parameters() if p.requires_grad}
            self._best = {"val_acc": float(acc), "epoch": self.current_epoch, "state": state}

    def on_train_end(self) -> None:  # before on_fit_end, where ExportArtifact writes the weights
        if self._best is None:
            return
        params = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in self._best["state"].items():
                params[name].copy_(value)

    def artifact_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith("net.")}

    def artifact_metadata(self) -> dict:
        defense = {"type": type(self).__name__}
        if self._best is not None:
            defense["restored_best_val"] = {"val_acc": self._best["val_acc"], "epoch": self._best["epoch"]}
        return {**super().artifact_metadata(), "defense": defense}

    def artifact_parents(self) -> list[dict]:
        return list(self._parents)


class W2SDefense(PEFTUnlearning):
    """W2SDefense: LoRA unlearning of a poisoned student guided by a small clean teacher (see the module docstring).

    The teacher is loaded from its artifact, frozen and kept in eval mode. Per training batch the loss is
    ``ce_weight * CE + kd_weight * KD_T + feature_weight * FA`` with KD the soft-target KL divergence at
    ``temperature`` and FA the official mean squared distance, here between the student's pooled final-layer
    features and each sample's projected teacher features (:meth:`feature_term`; :class:`W2SDefenseBroadcast` is the
    official code's broadcast form). Each term is logged (``train/ce``, ``train/kd``, ``train/fa``).

    Args:
        net: see :class:`PEFTUnlearning`.
        teacher: the weak teacher network (its ``student_hidden_size`` must be the student's hidden size).
        teacher_artifact: artifact of the teacher's clean training run (``ClassifierRecipe`` with this network);
            ``None``: the teacher's built weights (tests only: an untrained projection teaches nothing).
        teacher_sha256: pinned SHA-256 of the teacher's ``model.safetensors`` (checked if given).
        teacher_tokenizer: tokenizer of the teacher (``None``: its ``pretrained``); the student's is the DataModule's.
        teacher_max_length: truncation length of the teacher's tokens.
        ce_weight: ``a``, weight of the cross-entropy on clean labels (official 5.0).
        kd_weight: ``b``, weight of the distillation loss (official 0.001).
        feature_weight: ``c``, weight of the feature alignment (official 0.001).
        temperature: distillation temperature ``T`` (official 2.0).
        pooling: how the student's final-layer token features become one vector: ``last`` non-padding token
            (decoders, left or right padding), ``mean`` over tokens, or ``first`` token (encoders).

    The arguments of :class:`PEFTUnlearning` pass through (``suspect``, ``lora``, ``optimizer``, ``restore_best_val``,
    ...).
    """

    def __init__(
        self,
        net: HFSequenceClassifier,
        teacher: ProjectedTeacher,
        teacher_artifact: str | None = None,
        teacher_sha256: str | None = None,
        teacher_tokenizer: str | None = None,
        teacher_max_length: int = 128,
        ce_weight: float = 5.0,
        kd_weight: float = 0.001,
        feature_weight: float = 0.001,
        temperature: float = 2.0,
        pooling: distill.Pooling = "last",
        **kwargs,
    ):
        super().__init__(net=net, **kwargs)
        if min(ce_weight, kd_weight, feature_weight) < 0 or not temperature > 0:
            raise ValueError(
                f"loss weights must be >= 0 and temperature > 0, got a={ce_weight}, b={kd_weight}, c={feature_weight}, "
                f"T={temperature}"
            )
        self.teacher = teacher
        self.teacher_artifact, self.teacher_sha256 = teacher_artifact, teacher_sha256
        self.teacher_tokenizer_name = teacher_tokenizer or teacher.pretrained
        self.teacher_max_length = teacher_max_length
        self.ce_weight, self.kd_weight, self.feature_weight = ce_weight, kd_weight, feature_weight
        self.temperature, self.pooling = temperature, pooling
        self.teacher_tokenizer = None

    def configure_model(self) -> None:
        if self._adapted:
            return
        super().configure_model()
        self.teacher.build()
        if self.teacher_artifact is not None:
            self._parents.append(_load_net_weights(self.teacher, self.teacher_artifact, self.teacher_sha256, "teacher"))
        self.teacher.requires_grad_(False).eval()
        student_width = self.net.model.config.hidden_size
        if self.teacher.student_hidden_size != student_width or self.teacher.num_labels != self.net.num_labels:
            raise ValueError(
                f"the teacher projects to {self.teacher.student_hidden_size} features and {self.teacher.num_labels} "
                f"classes, the student has hidden size {student_width} and {self.net.num_labels} classes: set "
                f"teacher.init_args.student_hidden_size: {student_width} (and retrain the teacher)"
            )

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # frozen: no dropout, whatever Lightning toggles
        return self

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.teacher_tokenizer is None:
            from datamodules.text import load_tokenizer

            self.teacher_tokenizer = load_tokenizer(self.teacher_tokenizer_name, "right")

    def teacher_inputs(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's tokens for a batch of student tokens (decoded with the DataModule's tokenizer)."""
        student_tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        if student_tokenizer is None:
            raise TypeError("W2SDefense needs a text DataModule with a `tokenizer` to give the teacher the same text")
        texts = student_tokenizer.batch_decode(input_ids.tolist(), skip_special_tokens=True)
        enc = self.teacher_tokenizer(
            texts, padding=True, truncation=True, max_length=self.teacher_max_length, return_tensors="pt"
        )
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    def feature_term(
        self, student_tokens: torch.Tensor, attention_mask: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        """FA of one batch: each sample's pooled student feature against its own teacher feature, squared distance."""
        student_features = distill.pool_features(student_tokens, attention_mask, self.pooling)
        return distill.feature_alignment(student_features, teacher_features)

    def distillation_losses(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``{"ce", "kd", "fa", "loss"}`` of one batch of student tokens."""
        out = self.net.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        losses = {"ce": F.cross_entropy(out.logits, labels, label_smoothing=self.label_smoothing)}
        with torch.no_grad():
            teacher_features, teacher_logits = self.teacher.features_and_logits(*self.teacher_inputs(input_ids))
        losses["kd"] = distill.kd_loss(out.logits, teacher_logits, self.temperature)
        losses["fa"] = self.feature_term(out.hidden_states[-1], attention_mask, teacher_features)
        losses["loss"] = self.ce_weight * losses["ce"] + self.kd_weight * losses["kd"] + self.feature_weight * losses["fa"]
        losses["acc"] = (out.logits.argmax(-1) == labels).float().mean()
        return losses

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        losses = self.distillation_losses(input_ids, attention_mask, labels)
        self.log("train/loss", losses["loss"], prog_bar=True)
        self.log_dict({f"train/{k}": losses[k].detach() for k in ("ce", "kd", "fa", "acc")})
        return losses["loss"]


class W2SDefenseBroadcast(W2SDefense):
    """W2SDefense with the official code's feature term as its shapes make it (see the module docstring): the last
    sample's teacher feature broadcast against every final-layer token state of every student sequence, padding
    included (:func:`~lightning_modules.ops.distill.broadcast_feature_alignment`). ``pooling`` is not used.
    """

    def feature_term(
        self, student_tokens: torch.Tensor, attention_mask: torch.Tensor, teacher_features: torch.Tensor
    ) -> torch.Tensor:
        return distill.broadcast_feature_alignment(student_tokens, teacher_features)
