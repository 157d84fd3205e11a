"""TrojanDam's tensor math: neuron importance, redundant-neuron masks and fresh OOD label mappings.

TrojanDam (Dai, Li, Gan, Gong, "TrojanDam: Detection-Free Backdoor Defense in Federated Learning through Proactive
Model Robustification utilizing OOD Data", arXiv 2504.15674, 2025) has the server keep injecting *fresh* OOD
mappings (out-of-distribution inputs with labels of the main task) into the *redundant* neurons of the global model.
Pure torch, no Lightning; the defense that uses it is :mod:`lightning_modules.trojandam`.

Conventions. A *unit* of a weight tensor is a slice along one dimension: ``unit_dim=0`` makes units the output
neurons (rows of a ``Linear`` weight, output channels, i.e. kernels, of a ``Conv``), ``unit_dim=1`` the input
features (columns of the classifier head: the hidden neurons' outgoing weights). A unit's importance is the sum of
a per-entry score over its entries (and over the matching bias entry for output units).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fresh_labels", "random_block_images", "redundant_units", "unit_importance", "unit_mask"]


def unit_importance(weight_score: Tensor, unit_dim: int = 0, bias_score: Tensor | None = None) -> Tensor:
    """Importance of each unit: ``Σ |score|`` over the unit's entries (plus ``|bias score|`` for output units).

    Args:
        weight_score: per-entry score of a weight tensor ``[out, in, *kernel]`` (e.g. the weight itself, or an
            average of recent server updates).
        unit_dim: 0 (output neurons / conv kernels) or 1 (input features).
        bias_score: per-entry score of the bias ``[out]``; only with ``unit_dim=0``.

    Returns:
        ``[weight_score.shape[unit_dim]]``.
    """
    if weight_score.dim() < 2 or unit_dim not in (0, 1):
        raise ValueError(
            f"need a weight of >= 2 dims and unit_dim 0 or 1, got shape {tuple(weight_score.shape)}, unit_dim {unit_dim}"
        )
    dims = [d for d in range(weight_score.dim()) if d != unit_dim]
    out = weight_score.abs().sum(dim=dims)
    if bias_score is not None:
        if unit_dim != 0 or bias_score.shape != out.shape:
            raise ValueError(
                f"bias score {tuple(bias_score.shape)} must match {tuple(out.shape)} output units (unit_dim 0)"
            )
        out = out + bias_score.abs()
    return out


def redundant_units(importance: Tensor, fraction: float) -> Tensor:
    """Boolean mask of the ``round(fraction · n)`` least important units (ties: the lower index first).

    Args:
        importance: ``[n]`` unit importances.
        fraction: share of units counted as redundant, in ``[0, 1]``.
    """
    if importance.dim() != 1:
        raise ValueError(f"importance must be 1-D, got shape {tuple(importance.shape)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"redundant fraction must be in [0, 1], got {fraction}")
    k = round(fraction * importance.numel())
    mask = torch.zeros(importance.numel(), dtype=torch.bool, device=importance.device)
    if k > 0:
        order = torch.sort(importance, stable=True).indices  # ascending, stable: ties keep index order
        mask[order[:k]] = True
    return mask


def unit_mask(units: Tensor, shape: torch.Size | tuple[int, ...], unit_dim: int = 0) -> Tensor:
    """Broadcast a ``[n]`` unit mask to a parameter of ``shape`` whose dimension ``unit_dim`` has ``n`` units."""
    shape = tuple(shape)
    if units.dim() != 1 or unit_dim >= len(shape) or shape[unit_dim] != units.numel():
        raise ValueError(f"a mask over {units.numel()} units does not fit dim {unit_dim} of shape {shape}")
    view = [1] * len(shape)
    view[unit_dim] = units.numel()
    return units.view(view).expand(shape)


def fresh_labels(num_classes: int, generator: torch.Generator, previous: Tensor | None = None,
                 n: int | None = None) -> Tensor:  # fmt: skip
    """A fresh OOD mapping: one label in ``[0, num_classes)`` per OOD sample.

    Without ``previous``: ``n`` uniform labels. With ``previous`` (the last mapping of the same samples): every
    sample gets a label *different* from its previous one, ``(previous + U{1, …, C−1}) mod C``, uniform over the
    other ``C − 1`` classes, so the new mapping contradicts the old one on every sample.
    """
    if num_classes < 2:
        raise ValueError(f"a fresh mapping needs num_classes >= 2, got {num_classes}")
    if previous is None:
        if n is None or n < 1:
            raise ValueError("give the number of samples n (>= 1) or the previous mapping")
        return torch.randint(0, num_classes, (n,), generator=generator)
    if previous.dim() != 1 or (n is not None and n != previous.numel()):
        raise ValueError(f"previous mapping must be 1-D with n={n} entries, got shape {tuple(previous.shape)}")
    if previous.numel() and not (0 <= int(previous.min()) and int(previous.max()) < num_classes):
        raise ValueError(f"previous labels must be in [0, {num_classes})")
    shift = torch.randint(1, num_classes, previous.shape, generator=generator)
    return (previous.cpu() + shift) % num_classes


def random_block_images(n: int, shape: tuple[int, int, int], block: int, generator: torch.Generator) -> Tensor:
    """``n`` images of ``shape`` (C, H, W) in ``[0, 1]`` made of ``block × block`` patches of one random
    intensity each (per channel): low-frequency OOD inputs, unlike pixel noise (``block=1``)."""
    c, h, w = shape
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    gh, gw = -(-h // block), -(-w // block)  # ceil
    coarse = torch.rand(n, c, gh, gw, generator=generator)
    return coarse.repeat_interleave(block, dim=2).repeat_interleave(block, dim=3)[:, :, :h, :w].contiguous()
