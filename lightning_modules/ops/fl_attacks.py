"""Attacker-side tensor helpers for federated-learning backdoor attacks.

Pure torch: projections that keep a poisoned model close to the global model
(to evade norm-bounding defenses) and the Neurotoxin coordinate mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["neurotoxin_mask", "project_l2_ball", "project_params_l2_"]


def _check_radius(radius: float) -> None:
    if not (radius >= 0 and radius < float("inf")):
        raise ValueError(f"radius must be finite and >= 0, got {radius}")


def project_l2_ball(vector: Tensor, center: Tensor, radius: float) -> Tensor:
    """Euclidean projection of ``vector`` onto the L2 ball ``B(center, radius)``.

    The PGD step of norm-constrained poisoning: Sun et al., "Can You Really
    Backdoor Federated Learning?", 2019; Wang et al., "Attack of the Tails:
    Yes, You Really Can Backdoor Federated Learning", NeurIPS 2020.

    Args:
        vector: Flattened (or any-shaped) parameters.
        center: Ball center, same shape (typically the global model).
        radius: Ball radius ``>= 0``.

    Returns:
        ``center + (vector − center) · min(1, radius / ‖vector − center‖)``; a
        copy of ``vector`` when it already lies inside the ball.
    """
    if vector.shape != center.shape:
        raise ValueError(
            f"vector and center shapes differ: {tuple(vector.shape)} vs {tuple(center.shape)}"
        )
    _check_radius(radius)
    diff = vector - center
    dist = torch.linalg.vector_norm(diff)
    if dist <= radius:
        return vector.clone()
    return center + diff * (radius / dist)


@torch.no_grad()
def project_params_l2_(
    params: Sequence[Tensor], center: Sequence[Tensor], radius: float
) -> float:
    """In-place :func:`project_l2_ball` over a list of parameter tensors.

    The distance is the global L2 norm over all tensors (as if they were
    concatenated into one flat vector), so the projection is identical to
    flattening, projecting and unflattening.

    Args:
        params: Parameter tensors, modified in place (e.g. ``model.parameters()``
            materialised as a list).
        center: Matching tensors of the ball center (e.g. the global model).
        radius: Ball radius ``>= 0``.

    Returns:
        The distance ``‖params − center‖`` before projection.
    """
    params, center = list(params), list(center)
    if len(params) != len(center):
        raise ValueError(f"got {len(params)} params but {len(center)} center tensors")
    for i, (p, c) in enumerate(zip(params, center)):
        if p.shape != c.shape:
            raise ValueError(
                f"tensor {i}: param shape {tuple(p.shape)} != center shape {tuple(c.shape)}"
            )
    _check_radius(radius)
    if not params:
        return 0.0
    sq = [torch.linalg.vector_norm(p - c).square() for p, c in zip(params, center)]
    dist = torch.stack(sq).sum().sqrt().item()
    if dist > radius:
        scale = radius / dist
        for p, c in zip(params, center):
            p.sub_(c).mul_(scale).add_(c)
    return dist


def neurotoxin_mask(benign_update: Tensor, keep_ratio: float) -> Tensor:
    """Neurotoxin coordinate mask: keep the smallest-magnitude benign coordinates.

    Zhang et al., "Neurotoxin: Durable Backdoors in Federated Learning", ICML
    2022. The attacker estimates the benign update (the official code uses the
    gradient on the attacker's clean data) and restricts its own update to the
    coordinates that benign clients change least, so the backdoor is not
    overwritten. The official ``gradmask_ratio=0.99`` corresponds to
    ``keep_ratio=0.99``: the top 1% coordinates by ``|benign_update|`` are
    removed, the other 99% are kept. The selection is global over all elements
    (for a per-layer mask, call this per tensor).

    Args:
        benign_update: Estimated benign update/gradient, any shape.
        keep_ratio: Fraction of coordinates kept, in ``[0, 1]``. Exactly
            ``round(keep_ratio * numel)`` coordinates are kept (the official
            code uses ``int(...)``, which differs only when ``keep_ratio *
            numel`` is not an integer); ties keep lower flat indices first.

    Returns:
        Bool mask of ``benign_update``'s shape, True on kept coordinates.
    """
    if not 0.0 <= keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in [0, 1], got {keep_ratio}")
    flat = benign_update.detach().abs().flatten()
    if not torch.isfinite(flat).all():
        raise ValueError("benign_update contains NaN or Inf")
    k = round(keep_ratio * flat.numel())
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[flat.argsort(stable=True)[:k]] = True
    return mask.view(benign_update.shape)
