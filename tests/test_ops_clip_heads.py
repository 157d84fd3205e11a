"""CLIP heads on hand-computed tensors: zero-shot prompt ensembling and random unit heads."""

import math

import pytest
import torch

from lightning_modules.ops.clip_heads import random_unit_head, zero_shot_head

ZERO_SHOT = [
    # (name, text_embeds [C, T, D], logit_scale, expected [C, D])
    ("one template: the unit embedding times the scale", [[[3.0, 4.0]]], 1.0, [[0.6, 0.8]]),
    ("scale multiplies", [[[0.0, 5.0]]], 100.0, [[0.0, 100.0]]),
    # normalise (0.6, 0.8) and (0, 1), mean (0.3, 0.9), renormalise: (1, 3) / sqrt(10)
    ("templates: mean of unit vectors, renormalised", [[[3.0, 4.0], [0.0, 2.0]]], 2.0,
     [[2 / math.sqrt(10), 6 / math.sqrt(10)]]),
    ("a template's length does not weigh in", [[[1.0, 0.0], [0.0, 100.0]]], 1.0,
     [[1 / math.sqrt(2), 1 / math.sqrt(2)]]),
    ("classes are independent", [[[2.0, 0.0]], [[0.0, -3.0]]], 1.0, [[1.0, 0.0], [0.0, -1.0]]),
]


@pytest.mark.parametrize("embeds, scale, expected", [c[1:] for c in ZERO_SHOT], ids=[c[0] for c in ZERO_SHOT])
def test_zero_shot_head(embeds, scale, expected):
    torch.testing.assert_close(zero_shot_head(torch.tensor(embeds), scale), torch.tensor(expected))


@pytest.mark.parametrize(
    "embeds, scale, match",
    [(torch.ones(2, 3), 1.0, "templates"), (torch.ones(2, 0, 3), 1.0, "templates"), (torch.ones(1, 1, 2), 0.0, "logit_scale")],
)
def test_zero_shot_head_rejects_bad_input(embeds, scale, match):
    with pytest.raises(ValueError, match=match):
        zero_shot_head(embeds, scale)


def test_random_unit_head_rows_have_the_scale_and_follow_the_generator():
    head = random_unit_head(5, 8, 100.0, torch.Generator().manual_seed(3))
    torch.testing.assert_close(head.norm(dim=-1), torch.full((5,), 100.0))
    torch.testing.assert_close(head, random_unit_head(5, 8, 100.0, torch.Generator().manual_seed(3)))
    assert not torch.allclose(head, random_unit_head(5, 8, 100.0, torch.Generator().manual_seed(4)))
    with pytest.raises(ValueError, match="num_classes"):
        random_unit_head(0, 8, 1.0)
