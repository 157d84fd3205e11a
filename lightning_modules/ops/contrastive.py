"""Supervised contrastive loss with an up-weighted target class (Chameleon's stage-1 objective).

Khosla et al., "Supervised Contrastive Learning", NeurIPS 2020 (the ``L_out`` form), as modified by Dai & Li,
"Chameleon: Adapting to Peer Images for Planting Durable Backdoors in Federated Learning", ICML 2023: the
positive term of every anchor whose label is the backdoor target is multiplied by ``target_weight``, which pulls
poisoned images (relabelled to the target) toward the benign target-class images ("facilitators") harder than
any other pair. No Lightning imports.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def supcon_loss(
    features: Tensor, labels: Tensor, temperature: float = 0.07, base_temperature: float = 0.07,
    target_label: int | None = None, target_weight: float = 1.0,
) -> Tensor:  # fmt: skip
    """Mean over anchors ``i`` of ``-(τ/τ_b) · w_i / |P(i)| · Σ_{p ∈ P(i)} log softmax_{a ≠ i}(z_i·z_a / τ)_p``.

    ``z`` are the L2-normalised ``features`` ``[n, d]``; ``P(i)`` are the other samples with anchor ``i``'s label;
    ``w_i = target_weight`` if ``labels[i] == target_label`` else 1 (the official code scales the positive mask
    of target-label anchors and still divides by the unweighted count). Anchors without positives contribute
    0 and still count in the mean, as in the reference implementation.
    """
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [n, d] and labels [n], got {tuple(features.shape)}, {tuple(labels.shape)}")
    n = features.shape[0]
    z = F.normalize(features, dim=1)
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = ~torch.eye(n, dtype=torch.bool, device=features.device)
    log_prob = logits - torch.logsumexp(logits.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & not_self
    weight = torch.ones(n, device=features.device, dtype=features.dtype)
    if target_label is not None:
        weight = torch.where(labels == target_label, torch.full_like(weight, target_weight), weight)
    count = positives.sum(1).clamp_min(1)
    mean_log_prob_pos = (positives * log_prob).sum(1) * weight / count
    return -(temperature / base_temperature) * mean_log_prob_pos.mean()
