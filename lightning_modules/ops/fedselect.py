"""FedSelect's tensor math: growing a client's personal-parameter mask and averaging each entry over the clients
that share it. Pure functions, no Lightning.

Tamirisa, Xie, Bao, Wang, Wang & Zhao, "FedSelect: Personalized Federated Learning with Customized Selection of
Parameters for Fine-Tuning", CVPR 2024 (arXiv 2404.02478); official code ``lapisrocks/fedselect``
(``lottery_ticket.get_mask_from_delta``, ``broadcast.py``). A mask entry ``True`` marks a *personal* parameter
(trained and kept by the client), ``False`` a *shared* one (averaged by the server and broadcast).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["broadcast", "grow_personal_mask", "masked_average", "restore_inactive"]


def grow_personal_mask(personal: Tensor, delta: Tensor, rate: float, cap: float) -> Tensor:
    """Turn the shared entries that moved most into personal ones ("GradSelect", FedSelect Alg. 1).

    Among the entries of one parameter tensor that are still shared, the ``round(rate * #shared)`` with the
    largest ``|delta|`` (the weight change since the last mask update, as in the official code) become personal,
    but never so many that more than ``floor(cap * numel)`` entries are personal: a mask only grows, and never
    past its cap. (The official code checks the cap only before growing, so a tensor may overshoot it by one
    step; here the step is cut at the cap. Ties at the cut-off are broken by ``torch.topk``, where the official
    ``>= cutoff`` takes every tied entry.)

    Args:
        personal: Boolean mask of one tensor, ``True`` = personal.
        delta: Weight change of that tensor (same shape); only its magnitude is used.
        rate: Growth rate p in ``[0, 1]``: the fraction of the shared entries turned personal per update.
        cap: Personalization limit alpha in ``[0, 1]``: the largest fraction of the tensor that may be personal.

    Returns:
        The new mask, a superset of ``personal``.
    """
    if personal.dtype != torch.bool:
        raise ValueError(f"personal must be a boolean mask, got {personal.dtype}; pass mask.bool()")
    if personal.shape != delta.shape:
        raise ValueError(f"mask {tuple(personal.shape)} and delta {tuple(delta.shape)} must have the same shape")
    if not (0.0 <= rate <= 1.0 and 0.0 <= cap <= 1.0):
        raise ValueError(f"rate and cap must be in [0, 1], got rate={rate}, cap={cap}")
    flat = personal.flatten()
    shared = int((~flat).sum())
    room = math.floor(cap * flat.numel() + 1e-9) - int(flat.sum())
    k = min(round(rate * shared), max(room, 0))
    if k <= 0:
        return personal.clone()
    score = delta.detach().abs().flatten().float().masked_fill(flat, -1.0)  # personal entries are never chosen
    out = flat.clone()
    out[score.topk(k).indices] = True
    return out.view_as(personal)


def masked_average(values: Tensor, shared: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Average each entry over the clients that share it (FedSelect's server step).

    ``out[j] = sum_i w_i s_ij v_ij / sum_i w_i s_ij``: the official code sums the shared entries of the client
    models and divides by the number of contributors per entry (``add_server_weights`` / ``div_server_weights``,
    unweighted). Entries no client shares are 0 with count 0 (pass updates, not weights, so 0 means "keep the
    server value"). With every entry shared this is FedAvg (weighted by ``weights``, or a plain mean).

    Args:
        values: Client updates (or weights) ``[n, d]``.
        shared: Boolean ``[n, d]``, ``True`` where client ``i`` shares entry ``j``.
        weights: Non-negative client weights ``[n]`` (e.g. sample counts); ``None``: every client counts 1.

    Returns:
        The average ``[d]`` and the number of contributing clients per entry ``[d]`` (int64).
    """
    if values.ndim != 2 or shared.shape != values.shape:
        raise ValueError(f"values [n, d] and shared [n, d] must match, got {tuple(values.shape)}, {tuple(shared.shape)}")
    if shared.dtype != torch.bool:
        raise ValueError(f"shared must be a boolean mask, got {shared.dtype}")
    if weights is None:
        weights = values.new_ones(values.shape[0])
    if weights.shape != values.shape[:1] or (weights < 0).any():
        raise ValueError(f"weights must be {values.shape[0]} non-negative numbers, got {weights.tolist()}")
    w = shared.to(values.dtype) * weights.to(values.dtype)[:, None]
    total = w.sum(0)
    out = (w * values).sum(0) / total.clamp_min(torch.finfo(values.dtype).tiny)
    return out.masked_fill(total == 0, 0.0), shared.sum(0)


def broadcast(server: Tensor, own: Tensor, personal: Tensor) -> Tensor:
    """The model a client holds after the server's broadcast: its own value on personal entries, the server's on
    shared ones (``broadcast_server_to_client_initialization``). Personal entries are never overwritten."""
    if not server.shape == own.shape == personal.shape:
        raise ValueError(f"server {tuple(server.shape)}, own {tuple(own.shape)} and mask {tuple(personal.shape)} differ")
    return torch.where(personal, own, server)


def restore_inactive(model: nn.Module, active: Tensor) -> Callable[[nn.Module], None]:
    """A hook for after each optimizer step that puts the entries of ``model``'s parameters outside ``active`` (a
    flat ``bool`` mask in ``model.parameters()`` order) back to their values now, so one LocalAlt pass trains only
    the active entries. Tensors whose entries are all active are left alone, and only the inactive tensors' start
    values are copied, once (per step, no flatten of the whole model)."""
    if active.numel() != sum(p.numel() for p in model.parameters()):
        raise ValueError(f"the mask has {active.numel()} entries, the model {sum(p.numel() for p in model.parameters())}")
    kept = []
    for p, mask in zip(model.parameters(), torch.split(active, [p.numel() for p in model.parameters()])):
        if not bool(mask.all()):
            kept.append((p, mask.view_as(p), p.detach().clone()))

    def hook(_: nn.Module) -> None:
        with torch.no_grad():
            for p, mask, start in kept:
                p.copy_(torch.where(mask, p, start))

    return hook
