"""Knowledge-distillation terms of W2SDefense (Zhao et al., "Unlearning Backdoor Attacks for LLMs with
Weak-to-Strong Knowledge Distillation", Findings of ACL 2025, arXiv:2410.14425), as pure tensor functions.

- :func:`pool_features` turns a student's token features ``[B, T, D]`` into one vector per sequence; ``last``
  picks the last non-padding token, which is where a decoder classifier reads its label, under left *and*
  right padding alike.
- :func:`kd_loss` is Hinton et al.'s soft-target loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``,
  averaged over the batch (official ``distillation_loss``, same file and commit as below, lines 77-81:
  ``nn.functional.kl_div(p_student, p_teacher, reduction='batchmean') * temperature ** 2``).
- :func:`feature_alignment` is the official feature-alignment term, the mean *squared* Euclidean distance between
  per-sample features, here between the student's pooled features and the teacher's projected features.
- :func:`broadcast_feature_alignment` is what the official code computes with its shapes: the last sample's
  teacher vector against every token of every student sequence, padding included (see below).

The official loss (``shuaizhao95/w2sdefense`` at commit 628478cf73ed55d1fddfc03ca75a5fb3976f3a68,
``word/unlearning.py``, lines 72-75, 95, 98 and 104)::

    def contrastive_loss(repr1, repr2):
        distance = F.pairwise_distance(repr1, repr2)
        loss = torch.mean(torch.pow(distance, 2))
        return loss
    ...
    teacher_hidden_states = teacher_logits_out['hidden_states'][-1]
    ...
    student_hidden_states = logits_out.hidden_states[-1]
    ...
    con_loss = contrastive_loss(teacher_hidden_states, student_hidden_states)

and the teacher's output (same commit, ``word/bert_plus.py``, lines 22-31)::

    sequence_output = outputs.hidden_states[-1][:, 0]
    hidden_output = self.hidden_layer(sequence_output)
    transformed_hidden_output = self.activation(hidden_output)
    ...
    output = {'logits': logits, 'hidden_states': transformed_hidden_output}

So the teacher's ``'hidden_states'`` is already the ``[B, d]`` projected ``[CLS]`` feature, and ``[-1]`` picks its
*last row*: the feature ``[d]`` of the batch's last sample. The student's ``hidden_states[-1]`` is the final layer's
token states ``[B, T, d]``. ``F.pairwise_distance`` broadcasts ``[d]`` against ``[B, T, d]`` for any ``T``, so the
official term is the mean over all ``B * T`` positions, padding included, of the squared distance to that one
teacher vector (:func:`broadcast_feature_alignment`). :func:`feature_alignment` is the per-sample reading of the
paper (each sample's pooled student feature against its own teacher feature), with the same squared distance.
``F.pairwise_distance`` adds ``eps = 1e-6`` to the difference before the norm; both functions call it, as the
official code does, with the teacher first.

No Lightning imports; tested on hand-computed tensors in ``tests/test_ops_distill.py``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Pooling = Literal["last", "mean", "first"]


def pool_features(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: Pooling = "last") -> torch.Tensor:
    """One feature vector per sequence from token features.

    Args:
        hidden: token features ``[B, T, D]`` (e.g. a decoder's last hidden states).
        attention_mask: ``[B, T]``, 1 on tokens and 0 on padding, padding on either side (``None``: no padding).
        mode: ``last`` non-padding token (decoders: the token the classification head reads), masked ``mean``
            over tokens, or ``first`` non-padding token (encoders' ``[CLS]`` under right padding).

    Returns:
        ``[B, D]`` pooled features.
    """
    if hidden.dim() != 3:
        raise ValueError(f"pool_features expects token features [B, T, D], got shape {tuple(hidden.shape)}")
    if attention_mask is None:
        attention_mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not match the features' [B, T] {tuple(hidden.shape[:2])}"
        )
    mask = attention_mask.to(torch.long)
    if bool((mask.sum(1) == 0).any()):
        raise ValueError("a sequence has no token (its attention_mask is all zeros): drop empty texts before pooling")
    if mode == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if mode == "last":  # the largest position holding a token: T-1 under left padding, length-1 under right
        index = (positions * mask).argmax(1)
    elif mode == "first":  # the smallest position holding a token
        index = torch.where(mask.bool(), positions, mask.shape[1]).argmin(1)
    else:
        raise ValueError(f"unknown pooling {mode!r}: use 'last', 'mean' or 'first'")
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Soft-target distillation loss ``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, batch mean.

    Args:
        student_logits: ``[B, C]``.
        teacher_logits: ``[B, C]`` (treated as constants: detach them or compute them under ``no_grad``).
        temperature: softening temperature ``T > 0``; the ``T^2`` factor keeps gradient scales comparable.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.dim() != 2:
        raise ValueError(
            f"kd_loss needs student and teacher logits of the same shape [B, C], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}: the teacher's head must have the student's number of classes"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits / temperature, dim=-1)
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    return kl.mean() * temperature**2


def feature_alignment(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """Mean squared distance ``mean_b ||f_teacher[b] - f_student[b] + eps||^2`` between per-sample features: the
    official ``contrastive_loss`` applied to matching ``[B, D]`` features.

    Args:
        student_features: pooled student features ``[B, D]`` (see :func:`pool_features`).
        teacher_features: the teacher's projected features ``[B, D]``, ``D`` the student's hidden size.
    """
    if student_features.dim() != 2 or student_features.shape != teacher_features.shape:
        raise ValueError(
            f"feature_alignment needs [B, D] features of equal shape, got student {tuple(student_features.shape)} "
            f"and teacher {tuple(teacher_features.shape)}: pool the student's token features first "
            "(pool_features) and project the teacher to the student's hidden size"
        )
    return F.pairwise_distance(teacher_features, student_features).pow(2).mean()


def broadcast_feature_alignment(student_tokens: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """The official code's feature term as its shapes make it: the *last* sample's teacher feature
    ``teacher_features[-1]`` broadcast against every token of every student sequence, padding included,
    ``mean_{b,t} ||f_teacher[B-1] - h_student[b, t] + eps||^2``.

    Args:
        student_tokens: the student's final-layer token states ``[B, T, D]`` (unpooled, unmasked).
        teacher_features: the teacher's projected features ``[B, D]`` (only the last row is used, as officially).
    """
    if student_tokens.dim() != 3 or teacher_features.dim() != 2 or student_tokens.shape[-1] != teacher_features.shape[-1]:
        raise ValueError(
            f"broadcast_feature_alignment needs student token states [B, T, D] and teacher features [B, D], got "
            f"{tuple(student_tokens.shape)} and {tuple(teacher_features.shape)}: project the teacher to the "
            "student's hidden size"
        )
    return F.pairwise_distance(teacher_features[-1], student_tokens).pow(2).mean()
