"""TrojanDam's tensor math (lightning_modules/ops/trojandam.py) on hand-computed tensors, and the magnitude
importance against torch's structured pruning (``torch.nn.utils.prune.ln_structured``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from lightning_modules.ops.trojandam import (
    fresh_labels,
    random_block_images,
    redundant_units,
    unit_importance,
    unit_mask,
)

W = torch.tensor([[1.0, -2.0], [3.0, 0.0], [0.5, 0.5]])


@pytest.mark.parametrize(
    "weight, dim, bias, expected",
    [
        (W, 0, None, [3.0, 3.0, 1.0]),  # rows: output neurons
        (W, 1, None, [4.5, 2.5]),  # columns: input features
        (W, 0, torch.tensor([1.0, -1.0, 0.0]), [4.0, 4.0, 1.0]),  # |bias| joins its neuron
        (torch.arange(8.0).view(2, 1, 2, 2) - 4, 0, None, [10.0, 6.0]),  # conv kernels: |−4|+3+2+1, 0+1+2+3
    ],
)
def test_unit_importance_hand_computed(weight, dim, bias, expected):
    assert unit_importance(weight, dim, bias).tolist() == expected


@pytest.mark.parametrize(
    "importance, fraction, expected",
    [
        ([3.0, 1.0, 2.0, 1.0], 0.5, [False, True, False, True]),
        ([3.0, 1.0, 2.0, 1.0], 0.25, [False, True, False, False]),  # tie: the lower index
        ([3.0, 1.0, 2.0, 1.0], 0.75, [False, True, True, True]),
        ([3.0, 1.0, 2.0, 1.0], 0.0, [False] * 4),
        ([3.0, 1.0, 2.0, 1.0], 1.0, [True] * 4),
        ([5.0, 4.0, 3.0], 0.5, [False, True, True]),  # round(1.5) = 2
    ],
)
def test_redundant_units_are_the_least_important(importance, fraction, expected):
    assert redundant_units(torch.tensor(importance), fraction).tolist() == expected


def test_unit_mask_selects_rows_or_columns():
    units = torch.tensor([True, False])
    assert unit_mask(units, (2, 3), 0).tolist() == [[True] * 3, [False] * 3]
    assert unit_mask(units, (3, 2), 1).tolist() == [[True, False]] * 3
    conv = unit_mask(units, (2, 4, 3, 3), 0)
    assert conv[0].all() and not conv[1].any()


@pytest.mark.parametrize("dim", [0, 1])
def test_weight_importance_matches_torch_l1_structured_pruning(dim):
    """With ``|w|`` as score, the redundant units are exactly the ones L1 structured pruning would remove."""
    torch.manual_seed(0)
    layer = nn.Linear(12, 10)
    redundant = redundant_units(unit_importance(layer.weight.detach(), dim), 0.3)
    prune.ln_structured(layer, "weight", amount=0.3, n=1, dim=dim)
    pruned = unit_mask(redundant, layer.weight.shape, dim)
    assert torch.equal(pruned, layer.weight_mask == 0)


def test_fresh_labels_change_every_label_and_stay_in_range():
    g = torch.Generator().manual_seed(0)
    previous = torch.randint(0, 10, (5000,), generator=g)
    new = fresh_labels(10, g, previous)
    assert (new != previous).all() and new.min() >= 0 and new.max() < 10
    # uniform over the other nine classes: each shift 1..9 about 1/9 of the time
    shares = torch.bincount((new - previous) % 10, minlength=10)[1:].float() / 5000
    assert torch.allclose(shares, torch.full((9,), 1 / 9), atol=0.02)
    # seeded, and a first mapping without a previous one
    assert torch.equal(fresh_labels(10, torch.Generator().manual_seed(3), n=7),
                       fresh_labels(10, torch.Generator().manual_seed(3), n=7))  # fmt: skip
    with pytest.raises(ValueError, match="num_classes >= 2"):
        fresh_labels(1, g, n=3)
    with pytest.raises(ValueError, match="in \\[0, 3\\)"):
        fresh_labels(3, g, torch.tensor([0, 5]))


def test_random_block_images_are_constant_on_blocks():
    x = random_block_images(3, (2, 5, 5), 2, torch.Generator().manual_seed(0))
    assert x.shape == (3, 2, 5, 5) and x.min() >= 0 and x.max() <= 1
    assert torch.equal(x[:, :, 0, 0], x[:, :, 1, 1]) and torch.equal(x[:, :, 2, 2], x[:, :, 3, 3])
    assert torch.equal(x[:, :, 0, 4], x[:, :, 1, 4]) and not torch.equal(x[:, :, 0, 0], x[:, :, 2, 2])
    pixels = random_block_images(1, (1, 4, 4), 1, torch.Generator().manual_seed(0))
    assert pixels.unique().numel() == 16


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: unit_importance(torch.ones(3), 0), "dims"),
        (lambda: unit_importance(torch.ones(2, 2), 1, torch.ones(2)), "unit_dim 0"),
        (lambda: redundant_units(torch.ones(3), 1.5), "in \\[0, 1\\]"),
        (lambda: unit_mask(torch.ones(3, dtype=torch.bool), (2, 2), 0), "does not fit"),
        (lambda: random_block_images(1, (1, 2, 2), 0, torch.Generator()), "block"),
    ],
)
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
