"""TAR's pure tensor math on hand-computed cases (lightning_modules/ops/tar.py)."""

import math

import pytest
import torch

from lightning_modules.ops import tar as ops

LN3 = math.log(3.0)
H_QUARTER = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # entropy of (1/4, 3/4)


@pytest.mark.parametrize(
    "logits, mask, expected",
    [
        ([[0.0, 0.0, 0.0, 0.0]], None, -math.log(4)),  # uniform over 4: entropy ln 4
        ([[0.0, LN3]], None, -H_QUARTER),  # probabilities 1/4, 3/4
        ([[100.0, 0.0, 0.0]], None, 0.0),  # (almost) one-hot: entropy 0
        ([[0.0, 0.0], [0.0, LN3]], None, -(math.log(2) + H_QUARTER) / 2),  # mean over positions
        ([[0.0, 0.0], [0.0, LN3]], [True, False], -math.log(2)),  # the mask keeps the first position only
    ],
)
def test_entropy_loss(logits, mask, expected):
    mask = None if mask is None else torch.tensor(mask)
    assert ops.entropy_loss(torch.tensor(logits), mask).item() == pytest.approx(expected, abs=1e-6)


def test_entropy_loss_matches_torch_distributions_and_has_gradient():
    logits = torch.randn(3, 5, 11, requires_grad=True)
    ref = -torch.distributions.Categorical(logits=logits).entropy().mean()
    loss = ops.entropy_loss(logits)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_entropy_loss_rejects_empty_or_misshapen_masks():
    with pytest.raises(ValueError, match="selects no position"):
        ops.entropy_loss(torch.zeros(2, 3), torch.tensor([False, False]))
    with pytest.raises(ValueError, match="mask shape"):
        ops.entropy_loss(torch.zeros(2, 3), torch.tensor([True]))


@pytest.mark.parametrize(
    "steps, every, lam, expected",
    [
        (8, 4, 0.0, {3: 1.0, 7: 1.0}),
        (4, 1, 0.5, {0: math.exp(-1.5), 1: math.exp(-1.0), 2: math.exp(-0.5), 3: 1.0}),
        (64, 4, 0.0625, {k: math.exp(0.0625 * (k - 63)) for k in range(3, 64, 4)}),  # official: 16 evaluations
        (6, 4, 1.0, {3: math.exp(-2.0)}),  # the last step is not a multiple of every: no evaluation there
    ],
)
def test_inner_step_weights(steps, every, lam, expected):
    got = ops.inner_step_weights(steps, every, lam)
    assert got.keys() == expected.keys()
    for k in expected:
        assert got[k] == pytest.approx(expected[k])


@pytest.mark.parametrize("steps, every", [(0, 1), (4, 0), (4, 8)])
def test_inner_step_weights_rejects_bad_schedules(steps, every):
    with pytest.raises(ValueError):
        ops.inner_step_weights(steps, every, 0.1)


@pytest.mark.parametrize(
    "hidden, reference, mask, expected",
    [
        ([[[[3.0, 4.0]]]], [[[[0.0, 0.0]]]], None, 5.0),  # one token, ||(3, 4)|| = 5
        ([[[[3.0, 4.0]]], [[[1.0, 1.0]]]], [[[[0.0, 0.0]]], [[[1.0, 1.0]]]], None, 2.5),  # mean over layers: (5 + 0) / 2
        ([[[[3.0, 4.0], [6.0, 8.0]]]], [[[[0.0, 0.0], [0.0, 0.0]]]], None, 7.5),  # mean over tokens: (5 + 10) / 2
        ([[[[3.0, 4.0], [6.0, 8.0]]]], [[[[0.0, 0.0], [0.0, 0.0]]]], [[True, False]], 5.0),  # padding ignored
        ([[[[1.0, 2.0]]]], [[[[1.0, 2.0]]]], None, 0.0),  # the reference itself: distance 0
    ],
)
def test_representation_distance(hidden, reference, mask, expected):
    hidden = [torch.tensor(h) for h in hidden]
    reference = [torch.tensor(r) for r in reference]
    mask = None if mask is None else torch.tensor(mask)
    assert ops.representation_distance(hidden, reference, mask).item() == pytest.approx(expected)


def test_representation_distance_is_not_squared_and_sends_no_gradient_to_the_reference():
    h = torch.tensor([[[0.0, 2.0]]], requires_grad=True)
    r = torch.tensor([[[0.0, 0.0]]], requires_grad=True)
    d = ops.representation_distance([h], [r])
    assert d.item() == pytest.approx(2.0)  # squared would be 4
    d.backward()
    assert r.grad is None and torch.allclose(h.grad, torch.tensor([[[0.0, 1.0]]]))


def test_representation_distance_rejects_mismatched_layers():
    with pytest.raises(ValueError, match="layers"):
        ops.representation_distance([torch.zeros(1, 1, 2)], [])
    with pytest.raises(ValueError, match="reference"):
        ops.representation_distance([torch.zeros(1, 1, 2)], [torch.zeros(1, 2, 2)])


@pytest.mark.parametrize(
    "h, target, expected",
    [
        ([2.0, 0.0], [1.0, 0.0], 0.0),  # parallel
        ([-2.0, 0.0], [1.0, 0.0], 0.0),  # anti-parallel counts as mapped (|cos|, as the official code)
        ([0.0, 3.0], [1.0, 0.0], 1.0),  # orthogonal
        ([1.0, 1.0], [1.0, 0.0], 1 - 1 / math.sqrt(2)),
    ],
)
def test_random_mapping_loss(h, target, expected):
    got = ops.random_mapping_loss([torch.tensor([[h]])], torch.tensor([[target]]))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_random_mapping_loss_averages_layers_and_masked_tokens():
    target = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    layer1 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # token losses 0, 1
    layer2 = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # token losses 1, 1
    assert ops.random_mapping_loss([layer1, layer2], target).item() == pytest.approx(0.75)
    mask = torch.tensor([[True, False]])
    assert ops.random_mapping_loss([layer1, layer2], target, mask).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "values, mask, expected",
    [
        ([[1.0, 2.0, 3.0]], [[True, True, False]], [1.5]),
        ([[1.0, 2.0], [4.0, 8.0]], [[False, True], [True, True]], [2.0, 6.0]),
        ([[5.0, 5.0]], [[False, False]], [0.0]),  # nothing selected: 0, not NaN
    ],
)
def test_token_mean(values, mask, expected):
    got = ops.token_mean(torch.tensor(values), torch.tensor(mask))
    torch.testing.assert_close(got, torch.tensor(expected))


def test_layer_means_over_every_hidden_state_equal_the_official_mean_with_frozen_layers():
    """Official TAR averages Random Mapping and the representation term over every hidden state
    (output_hidden_states=True); passing only the trained layers with num_states gives the same gradient (and, for the
    representation term, whose frozen layers are exactly 0, the same value)."""
    torch.manual_seed(0)
    frozen = [torch.randn(2, 3, 4) for _ in range(3)]  # embeddings + trunk: no gradient
    trained = [torch.randn(2, 3, 4, requires_grad=True) for _ in range(2)]
    targets, mask = torch.randn(2, 3, 4), torch.tensor([[True, True, False], [True, False, False]])

    official = ops.random_mapping_loss(frozen + trained, targets, mask)
    ours = ops.random_mapping_loss(trained, targets, mask, num_states=5)
    g_official = torch.autograd.grad(official, trained)
    g_ours = torch.autograd.grad(ours, trained)
    for a, b in zip(g_official, g_ours):
        torch.testing.assert_close(a, b)

    reference = frozen + [t.detach() + 0.5 for t in trained]
    official = ops.representation_distance(frozen + trained, reference, mask)
    ours = ops.representation_distance(trained, reference[3:], mask, num_states=5)
    torch.testing.assert_close(official, ours)
    assert ops.representation_distance(trained, reference[3:], mask).item() == pytest.approx(official.item() * 5 / 2)
    with pytest.raises(ValueError, match="num_states"):
        ops.representation_distance(trained, reference[3:], mask, num_states=1)
