"""Knowledge-distillation terms of W2SDefense (Zhao et al., "Unlearning Backdoor Attacks for LLMs with
Weak-to-Strong Knowledge Distillation", Findings of ACL 2025, arXiv:2410.14425), as pure tensor functions.

- :func:`pool_features` turns a student's token features ``[B, T, D]`` into one vector per sequence; ``last``
  picks the last non-padding token, which is where a decoder classifier reads its label, under left *and*
  right padding alike.
- :func:`kd_loss` is Hinton et al.'s soft-target loss ``T^2 * KL(softmax(t / T) || softmax(s / T))``,
  averaged over the batch (the official code's ``KLDivLoss(reduction="batchmean")``).
- :func:`feature_alignment` is the mean Euclidean distance between pooled student features and the teacher's
  projected features (the official code's ``F.pairwise_distance(...).mean()``), defined only for matching
  ``[B, D]`` shapes: the official code passed the unpooled ``[B, T, D]`` student states, which broadcasts against
  ``[B, D]`` only by accident (``T == B`` or ``T == 1``).

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
    """Mean Euclidean distance ``mean_b ||f_student[b] - f_teacher[b]||_2`` between per-sequence features.

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
    return (student_features - teacher_features).norm(dim=-1).mean()
