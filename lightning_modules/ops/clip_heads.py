"""Classification heads over CLIP's unit-norm image embedding (pure tensor math, no Lightning).

CLIP classifies zero-shot by the cosine similarity of the image embedding to the text embedding of a prompt per
class, times its learned logit scale (Radford et al., ICML 2021, section 3.1.4); with several prompt templates per
class the class weight is the renormalised mean of the normalised prompt embeddings ("prompt ensembling", section
3.1.4). Task arithmetic (Ilharco et al., ICLR 2023), AdaMerging and DAM fine-tune the image tower under this frozen
head. Both heads here are weight matrices ``[C, D]`` of a bias-free linear layer on the unit-norm embedding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def zero_shot_head(text_embeds: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """Zero-shot class weights ``[C, D]`` from prompt embeddings ``[C, T, D]`` (C classes, T templates):
    normalise each prompt embedding, average over the templates, renormalise, multiply by ``logit_scale``."""
    if text_embeds.dim() != 3 or text_embeds.shape[1] == 0:
        raise ValueError(f"text_embeds must be [classes, templates, dim] with templates >= 1, got {tuple(text_embeds.shape)}")
    if logit_scale <= 0:
        raise ValueError(f"logit_scale must be > 0, got {logit_scale}")
    return F.normalize(F.normalize(text_embeds.float(), dim=-1).mean(dim=1), dim=-1) * logit_scale


def random_unit_head(
    num_classes: int, dim: int, logit_scale: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random class directions ``[C, D]`` (Gaussian rows normalised) of norm ``logit_scale``: a head with the scale of
    a zero-shot head when no text tower is at hand."""
    if num_classes < 1 or dim < 1 or logit_scale <= 0:
        raise ValueError(f"need num_classes, dim >= 1 and logit_scale > 0, got {num_classes}, {dim}, {logit_scale}")
    return F.normalize(torch.randn(num_classes, dim, generator=generator), dim=-1) * logit_scale
