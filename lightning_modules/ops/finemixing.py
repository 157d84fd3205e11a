"""Pure tensor math of Fine-mixing and E-PUR (Zhang, Lyu, Ma, Wang, Sun, "Fine-mixing: Mitigating Backdoors in
Fine-tuned Language Models", EMNLP 2022 Findings, arXiv:2210.09545). No Lightning imports.

Fine-mixing mixes a suspect fine-tuned weight tensor ``w_ft`` with its clean pretrained counterpart ``w_pre``::

    w_mix = w_pre + m * (w_ft - w_pre)          m in {0, 1}, a fraction rho of entries kept from w_ft

computed as ``where(m, w_ft, w_pre)`` so that rho = 1 gives ``w_ft`` and rho = 0 gives ``w_pre`` bit for bit.
The mask is random (every entry kept independently with probability rho: peft's ``random_pruning`` of the
update without rescaling, i.e. DARE without the 1/rho) or by magnitude (the ``round(rho * n)`` entries whose
update ``|w_ft - w_pre|`` is largest: peft's ``magnitude_based_pruning`` of the update).

E-PUR (embedding purification) scores each vocabulary row ``k`` of the word-embedding matrix by how far
fine-tuning moved it against how often token ``k`` occurs in the clean data::

    score_k = ||E_ft[k] - E_pre[k]||_2 / log(max(f_k, floor))

Trigger words are rare in clean text yet move far during poisoned fine-tuning, so they score high; the
``top_n`` rows are reset to ``E_pre``. The paper's exact formula and constants could not be verified
(no official code; see the docstring of :class:`lightning_modules.EPUR`): ``score`` and ``floor`` are knobs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

Selection = Literal["random", "magnitude"]
Score = Literal["delta_over_log_freq", "delta"]


def _check_rho(rho: float) -> None:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho (the fraction of fine-tuned entries kept) must be in [0, 1], got {rho}")


def mixing_mask(
    pretrained: torch.Tensor,
    finetuned: torch.Tensor,
    rho: float,
    selection: Selection = "random",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Boolean mask, ``True`` where the fine-tuned entry is kept.

    Args:
        pretrained: ``w_pre``.
        finetuned: ``w_ft``, same shape.
        rho: fraction of entries kept from ``w_ft``, in ``[0, 1]``.
        selection: ``random`` (independent Bernoulli(rho) per entry, drawn from ``generator`` on the CPU) or
            ``magnitude`` (exactly ``round(rho * numel)`` entries with the largest ``|w_ft - w_pre|``).
        generator: CPU random generator of the ``random`` selection (``None``: torch's global one).
    """
    _check_rho(rho)
    if pretrained.shape != finetuned.shape:
        raise ValueError(f"cannot mix tensors of shapes {tuple(pretrained.shape)} and {tuple(finetuned.shape)}")
    if selection == "random":
        probs = torch.full(finetuned.shape, float(rho), dtype=torch.float32)
        return torch.bernoulli(probs, generator=generator).bool().to(finetuned.device)
    if selection == "magnitude":
        delta = (finetuned.detach().float() - pretrained.detach().to(finetuned.device).float()).abs().reshape(-1)
        k = round(rho * delta.numel())
        mask = torch.zeros(delta.numel(), dtype=torch.bool, device=finetuned.device)
        mask[torch.topk(delta, k, largest=True, sorted=False).indices] = True
        return mask.reshape(finetuned.shape)
    raise ValueError(f"unknown selection {selection!r}: use 'random' or 'magnitude'")


def mix(pretrained: torch.Tensor, finetuned: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``w_pre + mask * (w_ft - w_pre)``, exactly ``w_ft`` where ``mask`` and ``w_pre`` elsewhere."""
    return torch.where(mask, finetuned, pretrained.to(finetuned))


def mix_state_dicts(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, torch.Tensor],
    rho: float,
    selection: Selection = "random",
    generator: torch.Generator | None = None,
    keep: set[str] | frozenset[str] = frozenset(),
) -> dict[str, torch.Tensor]:
    """Fine-mixing of whole state dicts: every floating tensor is mixed with its own mask (masks are drawn in
    the order of ``finetuned``); integer buffers and the names in ``keep`` are taken from ``finetuned``."""
    missing = [k for k in finetuned if k not in pretrained and k not in keep]
    if missing:
        raise KeyError(f"no pretrained counterpart for {missing[:5]}: list such tensors in `keep`")
    out = {}
    for name, ft in finetuned.items():
        if name in keep or not ft.is_floating_point():
            out[name] = ft.clone()
        else:
            out[name] = mix(pretrained[name], ft, mixing_mask(pretrained[name], ft, rho, selection, generator))
    return out


def token_frequencies(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Occurrences of every vocabulary id in a tokenized corpus ``[N, L]``; padding (mask 0) is not counted."""
    ids = input_ids.reshape(-1) if attention_mask is None else input_ids[attention_mask.bool()]
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), found [{int(ids.min())}, {int(ids.max())}]")
    return torch.bincount(ids.long().cpu(), minlength=vocab_size)


def epur_scores(
    pretrained_embeddings: torch.Tensor,
    finetuned_embeddings: torch.Tensor,
    frequencies: torch.Tensor,
    floor: float = 20.0,
    score: Score = "delta_over_log_freq",
) -> torch.Tensor:
    """Suspicion score of every embedding row ``[V]``.

    Args:
        pretrained_embeddings: ``E_pre`` ``[V, D]``.
        finetuned_embeddings: ``E_ft`` ``[V, D]``.
        frequencies: clean-data count of every token ``[V]`` (:func:`token_frequencies`).
        floor: the frequency floor ``c`` in ``log(max(f, c))``; must exceed 1 so the logarithm is positive.
        score: ``delta_over_log_freq`` (``||delta|| / log(max(f, c))``) or ``delta`` (``||delta||`` alone,
            frequency ignored: an ablation).
    """
    if pretrained_embeddings.shape != finetuned_embeddings.shape or pretrained_embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be two equal [V, D] matrices, got {tuple(pretrained_embeddings.shape)} "
            f"and {tuple(finetuned_embeddings.shape)}"
        )
    vocab = pretrained_embeddings.shape[0]
    if frequencies.shape != (vocab,):
        raise ValueError(f"frequencies must have shape [{vocab}], got {tuple(frequencies.shape)}")
    pretrained = pretrained_embeddings.detach().double().to(finetuned_embeddings.device)
    norms = (finetuned_embeddings.detach().double() - pretrained).norm(dim=1).cpu()
    if score == "delta":
        return norms
    if score == "delta_over_log_freq":
        if not floor > 1.0:
            raise ValueError(f"floor must be > 1 so that log(max(f, floor)) > 0, got {floor}")
        return norms / torch.log(frequencies.double().cpu().clamp(min=floor))
    raise ValueError(f"unknown score {score!r}: use 'delta_over_log_freq' or 'delta'")


def top_rows(scores: torch.Tensor, top_n: int) -> torch.Tensor:
    """Indices of the ``top_n`` highest scores, highest first; rows scoring 0 (unchanged) are never picked."""
    if top_n < 0:
        raise ValueError(f"top_n must be >= 0, got {top_n}")
    k = min(top_n, int((scores > 0).sum()))
    return torch.topk(scores, k, largest=True, sorted=True).indices


def reset_rows(pretrained: torch.Tensor, finetuned: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A copy of ``finetuned`` whose ``rows`` are taken from ``pretrained``; every other row is untouched."""
    out = finetuned.clone()
    rows = rows.to(finetuned.device)
    out[rows] = pretrained.to(finetuned)[rows]
    return out


def choose_rho(tried: list[tuple[float, float]], baseline_acc: float, max_acc_drop: float) -> float:
    """Fine-mixing's validation rule over ``(rho, clean validation accuracy)`` pairs: the smallest rho whose
    accuracy is at least ``baseline_acc - max_acc_drop``; if none is, the most accurate (larger rho on ties)."""
    if not tried:
        raise ValueError("choose_rho needs at least one (rho, accuracy) pair")
    ok = sorted(rho for rho, acc in tried if acc >= baseline_acc - max_acc_drop)
    return ok[0] if ok else max(tried, key=lambda t: (t[1], t[0]))[0]
