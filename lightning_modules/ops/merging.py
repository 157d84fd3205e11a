"""Model-merging math on state dicts (no Lightning): task vectors, task arithmetic, TIES, DARE, entropy, and
the relaxed Bernoulli (Concrete) masks of DAM.

A *task vector* is ``tau_k = theta_k - theta_0`` (Ilharco et al., "Editing Models with Task Arithmetic", ICLR
2023); a merge returns one merged task vector ``tau`` and the merged model is ``theta_0 + tau``. Task vectors
are dicts ``{name: tensor}`` with the same keys.

- Task arithmetic: ``tau = sum_k w_k tau_k``.
- TIES (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023): trim each
  task vector to its ``density`` largest-magnitude entries, elect a sign per entry (the sign of the summed
  trimmed mass, ``total``; or of the sign count, ``frequency``), average the entries that agree with it
  (disjoint mean), scaled by the weights. The paper trims over the whole flattened task vector
  (``trim="task"``, as fusion_bench); peft's ``ties`` trims each tensor on its own (``trim="tensor"``).
- DARE (Yu et al., "Language Models are Super Mario", ICML 2024): drop each entry with probability
  ``1 - density``, rescale the rest by ``1 / density``, then task arithmetic (``dare_linear``) or TIES'
  sign election and disjoint mean (``dare_ties``). Dropping is element-wise, so per tensor and per task agree.

The per-tensor variants call :mod:`peft.utils.merge_utils` directly; the per-task trim is written here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from peft.utils import merge_utils

StateDict = dict[str, torch.Tensor]


def _check_vectors(task_vectors: Sequence[StateDict], weights: torch.Tensor | None = None) -> list[str]:
    if not task_vectors:
        raise ValueError("merging needs at least one task vector")
    keys = list(task_vectors[0])
    for k, tv in enumerate(task_vectors[1:], start=1):
        if set(tv) != set(keys):
            raise ValueError(f"task vector {k} has keys {sorted(set(tv) ^ set(keys))[:5]} that task vector 0 "
                             "lacks or has: merge models of the same architecture")
    if weights is not None and weights.shape[0] != len(task_vectors):
        raise ValueError(f"got {weights.shape[0]} weights for {len(task_vectors)} task vectors: give one per task")
    return keys


def _check_density(density: float) -> None:
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density is the fraction of entries kept and must be in (0, 1], got {density}")


def task_vectors(pretrained: StateDict, finetuned: Sequence[StateDict]) -> list[StateDict]:
    """``tau_k = theta_k - theta_0`` for every fine-tuned state dict (keys of ``pretrained``)."""
    out = []
    for k, model in enumerate(finetuned):
        missing = [n for n in pretrained if n not in model or model[n].shape != pretrained[n].shape]
        if missing:
            raise ValueError(f"model {k} lacks or reshapes {missing[:5]}: task models must be fine-tuned from the "
                             "pretrained model")
        out.append({n: model[n] - p for n, p in pretrained.items()})
    return out


def add(pretrained: StateDict, tau: StateDict) -> StateDict:
    """``theta_0 + tau``."""
    return {n: p + tau[n].to(p) for n, p in pretrained.items()}


def task_arithmetic(task_vectors: Sequence[StateDict], weights: torch.Tensor) -> StateDict:
    """``sum_k w_k tau_k`` per tensor (peft's ``task_arithmetic``)."""
    keys = _check_vectors(task_vectors, weights)
    return {
        n: merge_utils.task_arithmetic([tv[n] for tv in task_vectors], weights.to(task_vectors[0][n])) for n in keys
    }


def trim_task(tau: StateDict, density: float) -> StateDict:
    """Keep the ``int(density * numel)`` largest-magnitude entries of the *whole* task vector (TIES' trim)."""
    _check_density(density)
    if density >= 1.0:
        return dict(tau)
    flat = torch.cat([t.reshape(-1) for t in tau.values()])
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k=int(density * flat.numel()), largest=True).indices] = True
    out, start = {}, 0
    for n, t in tau.items():
        out[n] = t * keep[start : start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def _elect_and_merge(stacked: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    sign = merge_utils.calculate_majority_sign_mask(stacked, method=method)
    weighted = stacked * merge_utils.reshape_weight_task_tensors(stacked, weights.to(stacked))
    return merge_utils.disjoint_merge(weighted, sign)


def ties(
    task_vectors: Sequence[StateDict],
    weights: torch.Tensor,
    density: float,
    trim: Literal["task", "tensor"] = "task",
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> StateDict:
    """TIES-Merging: trim (per task vector or per tensor), elect sign, disjoint mean of the weighted entries.

    As peft, the weights multiply the trimmed entries before the disjoint mean, so equal weights ``w`` give the
    paper's ``lambda = w``. ``trim="tensor"`` is exactly peft's ``ties``.
    """
    keys = _check_vectors(task_vectors, weights)
    _check_density(density)
    if trim == "tensor":
        return {n: merge_utils.ties([tv[n] for tv in task_vectors], weights.to(task_vectors[0][n]), density,
                                    majority_sign_method) for n in keys}  # fmt: skip
    if trim != "task":
        raise ValueError(f"trim must be 'task' (the TIES paper) or 'tensor' (peft), got {trim!r}")
    trimmed = [trim_task(tv, density) for tv in task_vectors]
    return {n: _elect_and_merge(torch.stack([tv[n] for tv in trimmed]), weights, majority_sign_method) for n in keys}


def dare(
    task_vectors: Sequence[StateDict],
    weights: torch.Tensor,
    density: float,
    merge: Literal["linear", "ties"] = "linear",
    majority_sign_method: Literal["total", "frequency"] = "total",
) -> StateDict:
    """DARE: random drop with keep probability ``density`` and rescale by ``1/density``, then task arithmetic
    (``linear``, peft's ``dare_linear``) or TIES' election and disjoint mean (``ties``, peft's ``dare_ties``).

    Draws from the global torch RNG, tensor by tensor in key order, as peft does (seed it for reproducibility).
    """
    keys = _check_vectors(task_vectors, weights)
    _check_density(density)
    if merge == "linear":
        return {n: merge_utils.dare_linear([tv[n] for tv in task_vectors], weights.to(task_vectors[0][n]), density)
                for n in keys}  # fmt: skip
    if merge == "ties":
        return {n: merge_utils.dare_ties([tv[n] for tv in task_vectors], weights.to(task_vectors[0][n]), density,
                                         majority_sign_method) for n in keys}  # fmt: skip
    raise ValueError(f"merge must be 'linear' or 'ties', got {merge!r}")


def weighted_merge(
    pretrained: StateDict,
    task_vectors: Sequence[StateDict],
    weights: torch.Tensor,
    masks: Sequence[StateDict | None] | None = None,
) -> StateDict:
    """Differentiable ``theta = theta_0 + sum_k w_{k,l} (m_k ⊙ tau_k)`` (AdaMerging, DAM).

    Args:
        pretrained: ``theta_0``.
        task_vectors: ``tau_k`` (same keys as ``pretrained``).
        weights: ``[K]`` task-wise or ``[K, L]`` layer-wise coefficients, ``L`` = number of tensors, in key order.
        masks: per task a dict of masks (same shapes as the tensors; missing keys: no mask) or ``None``.
    """
    keys = list(pretrained)
    _check_vectors(task_vectors, weights)
    if weights.dim() == 2 and weights.shape[1] != len(keys):
        raise ValueError(f"layer-wise weights have {weights.shape[1]} columns for {len(keys)} tensors")
    out = {}
    for layer, n in enumerate(keys):
        total = pretrained[n]
        for k, tv in enumerate(task_vectors):
            w = weights[k] if weights.dim() == 1 else weights[k, layer]
            m = masks[k].get(n) if masks is not None and masks[k] is not None else None
            total = total + w * (tv[n] if m is None else m * tv[n])
        out[n] = total
    return out


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy (nats) of ``softmax(logits)`` over the batch: AdaMerging's unsupervised objective."""
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def relaxed_bernoulli(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A reparameterised sample of a relaxed Bernoulli (Concrete / Gumbel-sigmoid, Maddison et al. 2017):
    ``sigmoid((logits + log u - log(1 - u)) / temperature)``, ``u ~ U(0, 1)``; in ``[0, 1]``, differentiable in
    ``logits``, and a hard Bernoulli(sigmoid(logits)) as ``temperature -> 0``."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp(torch.finfo(u.dtype).tiny, 1.0 - torch.finfo(u.dtype).eps)
    return torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / temperature)


def discrete_mask(
    logits: torch.Tensor,
    mode: Literal["threshold", "sample", "topk"] = "threshold",
    generator: torch.Generator | None = None,
    keep_fraction: float = 0.5,
) -> torch.Tensor:
    """The final 0/1 mask: ``sigmoid(logits) > 0.5`` (``threshold``), one Bernoulli draw (``sample``, the
    released DAM code's ``discrete`` evaluation) or the ``round(keep_fraction * numel)`` largest logits (``topk``,
    at least one; ties broken by position)."""
    probs = torch.sigmoid(logits)
    if mode == "threshold":
        return (probs > 0.5).to(logits.dtype)
    if mode == "sample":
        return torch.bernoulli(probs, generator=generator)
    if mode == "topk":
        if not 0.0 < keep_fraction <= 1.0:
            raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
        k = max(1, round(keep_fraction * logits.numel()))
        mask = torch.zeros(logits.numel(), dtype=logits.dtype, device=logits.device)
        mask[torch.topk(logits.flatten(), k, sorted=False).indices] = 1.0
        return mask.view_as(logits)
    raise ValueError(f"mode must be 'threshold', 'sample' or 'topk', got {mode!r}")


def mean_rescale(mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``m / mean(m)``: keeps the expected size of the masked task vector (the released DAM/Concrete code)."""
    return mask / mask.mean().clamp(min=eps)
