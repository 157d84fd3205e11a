"""Pure tensor math of TAR (Tamirisa et al., "Tamper-Resistant Safeguards for Open-Weight LLMs", ICLR 2025,
arXiv 2408.00761) and its Random Mapping safeguard, as in the official code (``rishub-tamirisa/tamper-resistance``,
``modules/objectives.py`` and ``modules/training.py``). No Lightning imports.

- :func:`entropy_loss`: the tamper-resistance loss ``L_TR = -H(softmax(logits))`` ("max_entropy"); minimising it
  after an attack pushes the attacked model's predictions on held-out forget data towards uniform.
- :func:`inner_step_weights`: the weights of the TR evaluations along the adversary's K inner steps,
  ``w_k = exp(lambda (k - (K - 1)))`` at every ``every``-th step, so late (most-tampered) steps count most.
- :func:`representation_distance`: the retain representation term: the L2 norm (not squared) of the
  hidden-state difference to a frozen reference model, averaged over tokens, then over layers.
- :func:`random_mapping_loss`: Random Mapping's ``1 - |cos(h, H[token])|`` towards fixed random vectors.
- :func:`token_mean`: per-sequence mean of per-token values (multiple-choice scores, mean NLL).
"""

from __future__ import annotations

import math

import torch


def _check_mask(mask: torch.Tensor | None, shape: torch.Size) -> None:
    if mask is not None and mask.shape != shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the token dims {tuple(shape)}")


def entropy_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Negative mean entropy (nats) of ``softmax(logits)`` over positions (TAR's ``max_entropy`` TR loss).

    Args:
        logits: ``[..., V]`` next-token logits.
        mask: ``[...]`` booleans selecting the positions averaged (``None``: all; the official code uses all
            positions, pads included).
    """
    _check_mask(mask, logits.shape[:-1])
    logp = logits.float().log_softmax(-1)
    neg_entropy = (logp.exp() * logp).sum(-1)
    if mask is None:
        return neg_entropy.mean()
    mask = mask.to(neg_entropy.dtype)
    if not mask.any():
        raise ValueError("entropy_loss: the mask selects no position")
    return (neg_entropy * mask).sum() / mask.sum()


def inner_step_weights(num_steps: int, every: int, lam: float) -> dict[int, float]:
    """``{k: w_k}`` for the inner steps ``k`` (0-based) at which TAR evaluates the TR loss: every ``every``-th step
    (``(k + 1) % every == 0``), weighted ``exp(lam * (k - (num_steps - 1)))`` (``use_weighting_schedule``;
    ``lam = 0`` gives equal weights). The official defaults are K = 64, every = 4, lambda = 0.0625."""
    if num_steps < 1 or every < 1:
        raise ValueError(f"num_steps ({num_steps}) and every ({every}) must be >= 1")
    if every > num_steps:
        raise ValueError(f"every={every} > num_steps={num_steps}: no TR evaluation would run; lower every")
    return {k: math.exp(lam * (k - (num_steps - 1))) for k in range(num_steps) if (k + 1) % every == 0}


def token_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values[..., t]`` over the positions where ``mask[..., t]`` is true, per sequence (0 if none)."""
    _check_mask(mask, values.shape)
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def representation_distance(
    hidden: list[torch.Tensor] | tuple[torch.Tensor, ...],
    reference: list[torch.Tensor] | tuple[torch.Tensor, ...],
    mask: torch.Tensor | None = None,
    num_states: int | None = None,
) -> torch.Tensor:
    """``mean_layers mean_tokens ||h - h_ref||_2`` (TAR's ``retain_representations`` term, not squared).

    Args:
        hidden: per-layer hidden states ``[B, T, d]`` of the trained model.
        reference: the same layers of the frozen reference model (no gradient flows into them).
        mask: ``[B, T]`` real tokens (``None``: every position, as the official code).
        num_states: the number of hidden states the mean runs over, when ``hidden`` holds only the trained ones of
            more (``None``: ``len(hidden)``). The official mean runs over every hidden state, the embeddings' included
            (``output_hidden_states=True``); a frozen layer's distance to the reference is exactly 0, so that mean
            is the sum over the trained layers divided by ``num_states``.
    """
    if len(hidden) != len(reference) or not hidden:
        raise ValueError(f"{len(hidden)} hidden-state layers vs {len(reference)} reference layers")
    per_layer = []
    for h, r in zip(hidden, reference):
        if h.shape != r.shape:
            raise ValueError(f"hidden state {tuple(h.shape)} vs reference {tuple(r.shape)}")
        dist = (h.float() - r.detach().float()).norm(dim=-1)
        _check_mask(mask, dist.shape)
        per_layer.append(dist.mean() if mask is None else (dist * mask).sum() / mask.sum().clamp_min(1))
    return _layer_mean(per_layer, num_states)


def _layer_mean(per_layer: list[torch.Tensor], num_states: int | None) -> torch.Tensor:
    if num_states is None:
        return torch.stack(per_layer).mean()
    if num_states < len(per_layer):
        raise ValueError(f"num_states={num_states} < the {len(per_layer)} layers given")
    return torch.stack(per_layer).sum() / num_states


def random_mapping_loss(
    hidden: list[torch.Tensor] | tuple[torch.Tensor, ...],
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    num_states: int | None = None,
) -> torch.Tensor:
    """Random Mapping (TAR's initial safeguard): ``mean_layers mean_tokens (1 - |cos(h, H[token])|)``.

    Args:
        hidden: per-layer hidden states ``[B, T, d]`` on forget data.
        targets: ``[B, T, d]`` the fixed random vector of each token (``H[input_ids]``).
        mask: ``[B, T]`` positions that count (``None``: all, as the official code).
        num_states: divide the sum over ``hidden`` by this many hidden states (``None``: ``len(hidden)``). The
            official loss averages over every hidden state (``outputs.hidden_states``, embeddings included); the
            frozen ones add a constant, so the gradient of that mean is this one's exactly.
    """
    if not hidden:
        raise ValueError("random_mapping_loss needs at least one layer of hidden states")
    per_layer = []
    for h in hidden:
        if h.shape != targets.shape:
            raise ValueError(f"hidden state {tuple(h.shape)} vs random targets {tuple(targets.shape)}")
        loss = 1 - torch.cosine_similarity(h.float(), targets.float(), dim=-1).abs()
        _check_mask(mask, loss.shape)
        per_layer.append(loss.mean() if mask is None else (loss * mask).sum() / mask.sum().clamp_min(1))
    return _layer_mean(per_layer, num_states)
