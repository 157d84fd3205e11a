"""lightning_modules.ops.fedselect on hand-computed tensors: mask growth (only grows, never past the cap),
per-entry averaging over the sharing clients (FedAvg / Flower's weighted average when every entry is shared),
and the broadcast that never overwrites personal entries."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_modules.ops.aggregation import fedavg
from lightning_modules.ops.fedselect import broadcast, grow_personal_mask, masked_average, restore_inactive

T, F = True, False


@pytest.mark.parametrize(
    "personal, delta, rate, cap, expected",
    [
        # 2 of 4 shared entries (rate 0.5) with the largest |delta|: indices 2 (0.9) and 1 (0.5)
        ([F, F, F, F], [0.1, 0.5, -0.9, 0.2], 0.5, 1.0, [F, T, T, F]),
        # an already personal entry's delta does not count; round(0.5 * 3) = 2 of the 3 shared entries
        ([T, F, F, F], [9.0, 0.1, 0.3, 0.2], 0.5, 1.0, [T, F, T, T]),
        # the cap (2 of 4) leaves room for one more entry although the rate asks for all three
        ([T, F, F, F], [0.0, 1.0, 3.0, 2.0], 1.0, 0.5, [T, F, T, F]),
        ([T, T, F, F], [0.0, 0.0, 5.0, 5.0], 1.0, 0.5, [T, T, F, F]),  # at the cap: unchanged
        ([T, T, T, F], [0.0, 0.0, 0.0, 5.0], 1.0, 0.5, [T, T, T, F]),  # above the cap: never shrinks
        ([F, F, F, F], [1.0, 2.0, 3.0, 4.0], 0.0, 1.0, [F, F, F, F]),  # rate 0
        ([F, F, F, F], [1.0, 2.0, 3.0, 4.0], 0.25, 0.8, [F, F, F, T]),  # official p = 25%, alpha = 80%
        # 7 of 10 personal, cap 8: only the largest shared |delta| (index 7) joins
        ([T, T, T, T, T, T, T, F, F, F], [0.0] * 7 + [3.0, 1.0, 2.0], 1.0, 0.8, [T, T, T, T, T, T, T, T, F, F]),
    ],
)
def test_grow_personal_mask(personal, delta, rate, cap, expected):
    out = grow_personal_mask(torch.tensor(personal), torch.tensor(delta), rate, cap)
    assert out.tolist() == expected


def test_grow_keeps_the_shape_and_the_input():
    personal = torch.zeros(2, 3, dtype=torch.bool)
    delta = torch.tensor([[0.0, 4.0, 1.0], [3.0, 0.0, 2.0]])
    out = grow_personal_mask(personal, delta, 1 / 3, 1.0)
    assert out.shape == (2, 3) and out.tolist() == [[F, T, F], [T, F, F]]
    assert not personal.any(), "the input mask must not be edited in place"


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rate, cap", [(0.25, 0.8), (0.5, 0.3), (1.0, 0.55)])
def test_repeated_growth_only_grows_and_stops_at_the_cap(seed, rate, cap):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(37, dtype=torch.bool)
    sizes = []
    for _ in range(12):
        new = grow_personal_mask(mask, torch.randn(37, generator=g), rate, cap)
        assert (new | mask).equal(new), "a personal entry became shared"
        mask = new
        sizes.append(int(mask.sum()))
    assert max(sizes) == int(cap * 37 + 1e-9) and sizes == sorted(sizes)


@pytest.mark.parametrize(
    "personal, delta, rate, cap, match",
    [
        (torch.zeros(3), torch.zeros(3), 0.5, 0.8, "boolean"),
        (torch.zeros(3, dtype=torch.bool), torch.zeros(4), 0.5, 0.8, "same shape"),
        (torch.zeros(3, dtype=torch.bool), torch.zeros(3), 1.5, 0.8, r"\[0, 1\]"),
        (torch.zeros(3, dtype=torch.bool), torch.zeros(3), 0.5, -0.1, r"\[0, 1\]"),
    ],
)
def test_grow_bad_inputs(personal, delta, rate, cap, match):
    with pytest.raises(ValueError, match=match):
        grow_personal_mask(personal, delta, rate, cap)


@pytest.mark.parametrize(
    "shared, weights, expected, count",
    [
        ([[T, T, F], [T, F, F]], None, [2.0, 2.0, 0.0], [2, 1, 0]),  # entry 1: client 0 only; entry 2: nobody
        ([[T, T, F], [T, F, F]], [1.0, 3.0], [2.5, 2.0, 0.0], [2, 1, 0]),  # (1·1 + 3·3) / 4
        ([[F, T, T], [T, T, T]], [1.0, 3.0], [3.0, 3.5, 4.5], [1, 2, 2]),
        ([[F, F, F], [F, F, F]], None, [0.0, 0.0, 0.0], [0, 0, 0]),  # all personal: the server keeps its values
        ([[T, T, T], [T, T, T]], [1.0, 0.0], [1.0, 2.0, 3.0], [2, 2, 2]),  # a zero-weight client counts for nothing
    ],
)
def test_masked_average(shared, weights, expected, count):
    values = torch.tensor([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    w = None if weights is None else torch.tensor(weights)
    out, n = masked_average(values, torch.tensor(shared), w)
    torch.testing.assert_close(out, torch.tensor(expected))
    assert n.tolist() == count


def _flower_aggregate(results: list[tuple[list[np.ndarray], int]]) -> list[np.ndarray]:
    """Flower's weighted average (``flwr.server.strategy.aggregate.aggregate``, flwr 1.42), restated in NumPy."""
    total = sum(n for _, n in results)
    weighted = [[layer * n for layer in layers] for layers, n in results]
    return [sum(layer) / total for layer in zip(*weighted)]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("weighted", [True, False])
def test_all_shared_is_fedavg_and_flowers_weighted_average(seed, weighted):
    rng = np.random.default_rng(seed)
    values = torch.tensor(rng.normal(size=(6, 11)))
    counts = rng.integers(1, 100, size=6)
    weights = torch.tensor(counts, dtype=torch.float64) if weighted else None
    out, n = masked_average(values, torch.ones(6, 11, dtype=torch.bool), weights)
    torch.testing.assert_close(out, fedavg(values, weights), rtol=1e-12, atol=1e-12)
    assert (n == 6).all()
    if weighted:
        results = [([v[:5].numpy(), v[5:].numpy()], int(c)) for v, c in zip(values, counts)]
        theirs = np.concatenate(_flower_aggregate(results))
        np.testing.assert_allclose(out.numpy(), theirs, rtol=1e-10, atol=1e-12)
        aggregate = pytest.importorskip(
            "flwr.server.strategy.aggregate", reason="the Flower cross-check needs flwr: pip install -e '.[test]'"
        ).aggregate
        np.testing.assert_allclose(out.numpy(), np.concatenate(aggregate(results)), rtol=1e-10, atol=1e-12)


def test_masked_average_equals_fedavg_of_the_sharing_clients_per_entry():
    g = torch.Generator().manual_seed(0)
    values, shared = torch.randn(5, 40, generator=g), torch.rand(5, 40, generator=g) > 0.4
    weights = torch.rand(5, generator=g) + 0.1
    out, n = masked_average(values, shared, weights)
    for j in range(40):
        rows = shared[:, j]
        expected = fedavg(values[rows, j : j + 1], weights[rows])[0] if rows.any() else torch.tensor(0.0)
        torch.testing.assert_close(out[j], expected)
        assert n[j] == rows.sum()


@pytest.mark.parametrize(
    "values, shared, weights, match",
    [
        (torch.zeros(3), torch.zeros(3, dtype=torch.bool), None, r"\[n, d\]"),
        (torch.zeros(2, 3), torch.zeros(2, 3), None, "boolean"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1.0, -1.0]), "non-negative"),
        (torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([1.0]), "2 non-negative"),
    ],
)
def test_masked_average_bad_inputs(values, shared, weights, match):
    with pytest.raises(ValueError, match=match):
        masked_average(values, shared, weights)


def test_broadcast_keeps_personal_entries():
    server, own = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([7.0, 8.0, 9.0])
    assert broadcast(server, own, torch.tensor([T, F, T])).tolist() == [7.0, 2.0, 9.0]
    assert broadcast(server, own, torch.zeros(3, dtype=torch.bool)).tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="differ"):
        broadcast(server, own[:2], torch.zeros(3, dtype=torch.bool))


def test_restore_inactive_puts_back_only_the_inactive_entries():
    net = torch.nn.Linear(2, 2)  # weight [2, 2] (entries 0-3), bias [2] (entries 4-5)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net.bias.copy_(torch.tensor([5.0, 6.0]))
    hook = restore_inactive(net, torch.tensor([True, False, False, True, True, True]))
    with torch.no_grad():  # an optimizer step moves every entry
        net.weight.add_(10.0)
        net.bias.add_(10.0)
    hook(net)
    assert net.weight.tolist() == [[11.0, 2.0], [3.0, 14.0]] and net.bias.tolist() == [15.0, 16.0]
    with pytest.raises(ValueError, match="5 entries, the model 6"):
        restore_inactive(net, torch.ones(5, dtype=torch.bool))
