"""MEMIT algebra and editing metrics as pure tensor functions (no Lightning, no models).

MEMIT (Meng et al., "Mass-Editing Memory in a Transformer", ICLR 2023, arXiv 2210.07229) treats an MLP output
projection ``W`` (``d_out x d_in``, as stored by ``nn.Linear``) as a linear associative memory that maps keys
``k`` (the projection's input at the subject's last token) to values. To insert ``n`` new associations it solves

    min_Δ  ||(W + Δ) K - V||²  +  λ · tr(Δ C Δᵀ)       (C = E[k kᵀ] over a text corpus)

whose closed form is ``Δ = R Kᵀ (λ C + K Kᵀ)⁻¹`` with residuals ``R = V - W K``. Over several layers, layer
``i`` of ``|𝓛|`` takes ``1 / (|𝓛| - i)`` of the residual that is still left ("spreading"). NAMET (Dai et al.,
"NAMET: Robust Massive Model Editing via Noise-Aware Memory Optimization", arXiv 2505.11876) keeps this algebra
and changes how the values are extracted (see :func:`namet_weight_decay` and ``lightning_modules.editing``).

Conventions: keys and residuals are row-major, ``[n, d_in]`` and ``[n, d_out]``; updates are ``[d_out, d_in]``.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence

import torch


def update_second_moment(total: torch.Tensor | None, count: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Accumulate the uncentered second moment of the rows of ``x`` (``[m, d]``) in float64.

    Returns the new running ``(Σ x xᵀ, number of rows)``; :func:`second_moment` turns it into ``E[x xᵀ]``.
    """
    x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
    outer = x.T @ x
    return (outer if total is None else total + outer), count + x.shape[0]


def second_moment(total: torch.Tensor, count: int) -> torch.Tensor:
    """``E[x xᵀ]`` from a running sum of outer products over ``count`` rows."""
    if count <= 0:
        raise ValueError("second moment of zero samples")
    return total / count


def memit_layer_update(
    keys: torch.Tensor,
    residuals: torch.Tensor,
    cov: torch.Tensor,
    lam: float,
    remaining_layers: int = 1,
) -> torch.Tensor:
    """MEMIT's closed-form update of one layer: ``Δ = (R / remaining) Kᵀ (λ C + K Kᵀ)⁻¹``, solved in float64.

    Args:
        keys: ``[n, d_in]`` keys of the edits at this layer.
        residuals: ``[n, d_out]`` residuals ``v - W k`` still to be written.
        cov: ``[d_in, d_in]`` second moment ``C`` of the layer's keys over a corpus.
        lam: ``λ`` (``mom2_update_weight``), how strongly the corpus keys keep their current values.
        remaining_layers: ``|𝓛| - i``: this layer writes ``1/remaining_layers`` of the residual.

    Returns:
        ``[d_out, d_in]`` update in the keys' dtype. With ``λ = 0`` and ``n = d_in`` independent keys,
        ``Δ K = R / remaining`` exactly; in general ``Δ`` zeroes the gradient of the objective above.
    """
    if keys.shape[0] != residuals.shape[0]:
        raise ValueError(f"{keys.shape[0]} keys but {residuals.shape[0]} residuals")
    if remaining_layers < 1:
        raise ValueError("remaining_layers must be >= 1")
    k = keys.to(torch.float64).T  # d_in x n
    r = residuals.to(torch.float64).T / remaining_layers  # d_out x n
    a = lam * cov.to(torch.float64) + k @ k.T
    adj_k = torch.linalg.solve(a, k)  # (λC + KKᵀ)⁻¹ K, d_in x n
    return (r @ adj_k.T).to(keys.dtype)


def average_over_contexts(reps: torch.Tensor, group_sizes: Sequence[int]) -> torch.Tensor:
    """MEMIT's key averaging: ``reps`` holds, for each of ``n`` requests in turn, one row per context template,
    templates grouped as ``group_sizes`` (e.g. ``[1, 5]``: the bare prompt, then 5 prefixed ones). Rows are
    averaged within each group, then the group means are averaged. Returns ``[n, d]``."""
    per_request = sum(group_sizes)
    if reps.shape[0] % per_request:
        raise ValueError(f"{reps.shape[0]} rows is not a multiple of {per_request} contexts per request")
    reps = reps.reshape(-1, per_request, reps.shape[-1])
    means, start = [], 0
    for size in group_sizes:
        means.append(reps[:, start : start + size].mean(1))
        start += size
    return torch.stack(means, 1).mean(1)


def clamp_rows(delta: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """Project every row ``δ_i`` into the L2 ball of radius ``max_norm[i]`` (MEMIT's ``clamp_norm_factor``)."""
    norms = delta.norm(dim=-1, keepdim=True)
    scale = torch.where(norms > max_norm.unsqueeze(-1), max_norm.unsqueeze(-1) / norms.clamp_min(1e-12), 1.0)
    return delta * scale


def memit_weight_decay(delta: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """MEMIT's penalty per request, ``||δ|| / ||h₀||²`` (as in ``memit/compute_z.py``; the norm is not squared)."""
    return delta.norm(dim=-1) / h0.norm(dim=-1).pow(2)


def namet_weight_decay(delta: torch.Tensor, h_init: torch.Tensor) -> torch.Tensor:
    """NAMET's penalty per request, ``||δ 1ᵀ||_F / ||H||_F``: ``δ`` is added to each of the ``P`` columns of the
    hidden states ``H`` (``[n, P, d]``) it was extracted from, so the numerator is ``√P ||δ||``."""
    p = h_init.shape[-2]
    return math.sqrt(p) * delta.norm(dim=-1) / h_init.flatten(-2).norm(dim=-1)


def target_nll(log_probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence negative log-likelihood of the target tokens, divided by the target length.

    Args:
        log_probs: ``[S, T]`` log-probabilities of the target tokens (teacher forcing); padding anywhere.
        mask: ``[S, T]`` 1 where a target token is, 0 on padding.
    """
    mask = mask.to(log_probs.dtype)
    return -(log_probs * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def group_mean(values: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Mean of ``values`` (``[S]``) per group id in ``groups`` (``[S]``, values in ``[0, num_groups)``)."""
    sums = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(0, groups, values)
    counts = torch.zeros(num_groups, dtype=values.dtype, device=values.device).index_add(
        0, groups, torch.ones_like(values)
    )
    return sums / counts.clamp_min(1)


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (CounterFact's overall score ``S`` of efficacy, paraphrase and neighborhood)."""
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


_WORD = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """MEMIT's fluency measure of one generation: the weighted mean over ``n`` of the entropy (bits) of the
    text's word ``n``-gram distribution. Repetitive, degenerate text scores low."""
    words = _WORD.findall(text.lower())
    out = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        out.append(w * ent)
    return sum(out) / len(out)


def best_layer_window(effect: Sequence[float] | torch.Tensor, width: int) -> list[int]:
    """The ``width`` consecutive layers with the largest summed causal effect (MEMIT picks its edited layers
    around the peak of the MLP's indirect effect at the subject's last token)."""
    effect = torch.as_tensor(effect, dtype=torch.float64)
    if not 1 <= width <= effect.numel():
        raise ValueError(f"window width {width} for {effect.numel()} layers")
    sums = effect.unfold(0, width, 1).sum(-1)
    start = int(sums.argmax())
    return list(range(start, start + width))
