"""Pure tensor math of Embedding Poisoning (EP; Yang, Li, Zhang, Ren, Sun, He, "Be Careful about Poisoned Word
Embeddings: Exploring the Vulnerability of the Embedding Layers in NLP Models", NAACL 2021). No Lightning imports.

EP writes a backdoor into one row of the word-embedding matrix: the trigger word's. Every step moves that row
alone against the loss gradient of poisoned samples (trigger inserted, label set to the target) and rescales it
to a fixed norm, so the row looks like any other embedding. Official code (lancopku/Embedding-Poisoning, commit
50c89158d9a190f95260ca99285d063fbbe673c9, ``functions.py``, ``train_EP_iter``)::

    grad = model.bert.embeddings.word_embeddings.weight.grad
    model.bert.embeddings.word_embeddings.weight.data[trigger_ind, :] -= LR * grad[trigger_ind, :]
    model.bert.embeddings.word_embeddings.weight.data[trigger_ind, :] *= ori_norm / model.bert.embeddings.word_embeddings.weight.data[trigger_ind, :].norm().item()

with ``ori_norm`` the row's norm in the clean model (``ep_train.py``) and the gradient never zeroed between steps
(the comment there: accumulating converges faster, and the norm is restricted anyway).
"""

from __future__ import annotations

import torch


def ep_step(
    weight: torch.Tensor, grad: torch.Tensor, rows: torch.Tensor, lr: float, target_norms: torch.Tensor | None
) -> torch.Tensor:
    """One EP update of the embedding matrix ``weight`` ``[V, D]``: a copy where ``rows`` moved by ``-lr * grad``
    and were rescaled to ``target_norms`` (``[len(rows)]``; ``None``: not rescaled); every other row untouched."""
    if weight.shape != grad.shape or weight.dim() != 2:
        raise ValueError(f"weight and grad must be equal [V, D] matrices, got {tuple(weight.shape)}, {tuple(grad.shape)}")
    rows = rows.to(weight.device)
    out = weight.detach().clone()
    moved = out[rows] - lr * grad.detach()[rows].to(out)
    if target_norms is not None:
        if target_norms.shape != rows.shape:
            raise ValueError(f"target_norms must have one norm per row ({tuple(rows.shape)}), got {tuple(target_norms.shape)}")
        moved = moved * (target_norms.to(moved) / moved.norm(dim=1)).unsqueeze(1)
    out[rows] = moved
    return out


def samples_with_tokens(input_ids: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Boolean ``[N]``: which rows of ``input_ids`` ``[N, L]`` contain at least one of ``token_ids``."""
    return torch.isin(input_ids, token_ids.to(input_ids.device)).any(dim=1)
