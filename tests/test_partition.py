"""Tests for datamodules.partition: disjoint, complete, deterministic splits and clear errors."""

from __future__ import annotations

import pytest
import torch

from datamodules.partition import dirichlet_partition, iid_partition, shard_partition

LABELS = torch.arange(1000) % 10  # 100 samples of each of 10 classes


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


PARTITIONS = {
    "iid": lambda g: iid_partition(1000, 7, g),
    "dirichlet-0.1": lambda g: dirichlet_partition(LABELS, 7, 0.1, g, min_size=5),
    "dirichlet-0.5": lambda g: dirichlet_partition(LABELS, 20, 0.5, g),
    "shards": lambda g: shard_partition(LABELS, 7, 3, g),
}


@pytest.mark.parametrize("name", PARTITIONS)
def test_disjoint_sorted_and_deterministic(name):
    parts = PARTITIONS[name](gen(0))
    union = torch.cat(parts)
    assert union.unique().numel() == union.numel(), "a sample was given to two clients"
    assert all(torch.equal(p, p.sort().values) and p.dtype == torch.long for p in parts)
    again = PARTITIONS[name](gen(0))
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = PARTITIONS[name](gen(1))
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("name, covered", [("iid", 1000), ("dirichlet-0.1", 1000), ("dirichlet-0.5", 1000),
                                           ("shards", 1000 // 21 * 21)])  # fmt: skip
def test_coverage(name, covered):
    assert torch.cat(PARTITIONS[name](gen(0))).numel() == covered


def test_iid_sizes_differ_by_at_most_one():
    sizes = [len(p) for p in iid_partition(1000, 7, gen())]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1000


@pytest.mark.parametrize("num_clients, spc", [(5, 2), (10, 2), (7, 3), (50, 2)])
def test_shards_give_each_client_few_classes(num_clients, spc):
    parts = shard_partition(LABELS, num_clients, spc, gen())
    shard = 1000 // (num_clients * spc)
    assert all(len(p) == spc * shard for p in parts)
    # label-sorted shards no larger than a class (100 samples) span at most 2 classes, aligned ones exactly 1
    classes = [LABELS[p].unique().numel() for p in parts]
    assert max(classes) <= (spc if 100 % shard == 0 else 2 * spc)


def test_dirichlet_large_alpha_is_near_iid_and_small_alpha_is_skewed():
    def mean_share_error(alpha):
        parts = dirichlet_partition(LABELS, 10, alpha, gen(), min_size=1)
        shares = torch.stack([torch.bincount(LABELS[p], minlength=10) / len(p) for p in parts])
        return (shares - 0.1).abs().mean().item()

    assert mean_share_error(1e4) < 0.02
    assert mean_share_error(0.1) > 0.08


def test_dirichlet_min_size_holds():
    parts = dirichlet_partition(LABELS, 20, 0.3, gen(), min_size=15)
    assert min(len(p) for p in parts) >= 15


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: dirichlet_partition(LABELS, 10, 0.0), "alpha must be finite and > 0"),
        (lambda: dirichlet_partition(LABELS, 10, -1.0), "alpha must be finite and > 0"),
        (lambda: dirichlet_partition(LABELS, 10, 0.5, min_size=200), "lower min_size"),
        (lambda: dirichlet_partition(LABELS, 10, 0.01, gen(), min_size=99, max_retries=3), "no Dirichlet"),
        (lambda: dirichlet_partition(LABELS.float(), 10, 0.5), "integer"),
        (lambda: iid_partition(10, 11), "cannot split 10 samples over 11 clients"),
        (lambda: iid_partition(10, 0), "num_clients must be >= 1"),
        (lambda: shard_partition(LABELS, 10, 0), "shards_per_client must be >= 1"),
        (lambda: shard_partition(LABELS, 600, 2), "exceed the 1000 samples"),
    ],
)
def test_bad_inputs_raise_with_the_fix(call, match):
    with pytest.raises(ValueError, match=match):
        call()
