"""Tests for lightning_modules.ops.aggregation and lightning_modules.ops.fl_attacks.

Hand-computed literal cases first, then oracle tests against Flower's
``flwr.server.strategy.aggregate`` (``flwr`` is in the ``test`` extra; without it they skip with a printed reason).
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from lightning_modules.ops.aggregation import (
    add_gaussian_noise,
    clip_by_norm,
    coordinate_median,
    fedavg,
    finite_rows,
    flame,
    krum,
    krum_scores,
    trimmed_mean,
)
from lightning_modules.ops.fl_attacks import (
    neurotoxin_mask,
    project_l2_ball,
    project_params_l2_,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, t(expected), rtol=1e-12, atol=1e-12)


U4 = [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 0.0, 0.0], [4.0, 4.0, 4.0]]


# --------------------------------------------------------------------- fedavg
@pytest.mark.parametrize(
    ("weights", "expected"),
    [
        (None, [2.0, 2.0, 2.0]),
        ([1.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0]),
        ([3, 1, 0, 0], [1.5, 2.0, 2.5]),  # (3*(1,2,3) + (3,2,1)) / 4
        ([0.0, 0.0, 0.0, 5.0], [4.0, 4.0, 4.0]),
    ],
)
def test_fedavg(weights, expected):
    w = None if weights is None else torch.tensor(weights)
    close(fedavg(t(U4), w), expected)


@pytest.mark.parametrize(
    ("updates", "weights", "match"),
    [
        (t(U4), t([1.0, -1.0, 1.0, 1.0]), "non-negative"),
        (t(U4), t([0.0, 0.0, 0.0, 0.0]), "sum to 0"),
        (t(U4), t([1.0, 1.0, 1.0]), "shape"),
        (t(U4), t([1.0, float("nan"), 1.0, 1.0]), "finite"),
        (t([1.0, 2.0]), None, "2-D"),
        (torch.ones(3, 2, dtype=torch.int64), None, "floating"),
        (torch.ones(0, 3), None, "empty"),
    ],
)
def test_fedavg_bad_inputs(updates, weights, match):
    with pytest.raises(ValueError, match=match):
        fedavg(updates, weights)


# ------------------------------------------------------------ clip and noise
def test_clip_by_norm():
    clipped, norms = clip_by_norm(t([[6.0, 8.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), 3.0)
    close(clipped, [[1.8, 2.4, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    close(norms, [10.0, 1.0, 0.0])
    assert torch.linalg.vector_norm(clipped[0]).item() == pytest.approx(3.0)


@pytest.mark.parametrize("max_norm", [-1.0, float("nan"), float("inf")])
def test_clip_by_norm_bad_bound(max_norm):
    with pytest.raises(ValueError, match="max_norm"):
        clip_by_norm(t(U4), max_norm)


def test_add_gaussian_noise():
    x = torch.zeros(20_000, dtype=torch.float64)
    close(add_gaussian_noise(t([1.0, 2.0]), 0.0), [1.0, 2.0])
    a = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(0))
    b = add_gaussian_noise(x, 0.5, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert a.std().item() == pytest.approx(0.5, rel=0.03)
    with pytest.raises(ValueError, match="std"):
        add_gaussian_noise(x, -0.1)


# ----------------------------------------------------------- median, trimmed
@pytest.mark.parametrize(
    ("updates", "expected"),
    [
        ([[1.0, 5.0, -1.0], [2.0, 0.0, 7.0], [9.0, 3.0, 0.0]], [2.0, 3.0, 0.0]),
        # even n: mean of the two middles (torch.median would give [2, 3, 0])
        (
            [[1.0, 5.0, -1.0], [2.0, 0.0, 7.0], [9.0, 3.0, 0.0], [4.0, 4.0, 4.0]],
            [3.0, 3.5, 2.0],
        ),
        ([[7.0, -2.0]], [7.0, -2.0]),
    ],
)
def test_coordinate_median(updates, expected):
    close(coordinate_median(t(updates)), expected)
    close(coordinate_median(t(updates)), np.median(np.array(updates), axis=0).tolist())


U5 = [[1.0, -10.0], [2.0, 0.0], [3.0, 1.0], [4.0, 2.0], [100.0, 3.0]]


@pytest.mark.parametrize(
    ("trim_ratio", "expected"),
    [
        (0.0, [22.0, -0.8]),  # k = 0: plain mean
        (0.1, [22.0, -0.8]),  # k = int(0.5) = 0
        (0.2, [3.0, 1.0]),  # k = 1: mean of the 3 middle values
        (0.4, [3.0, 1.0]),  # k = 2: the median
    ],
)
def test_trimmed_mean(trim_ratio, expected):
    close(trimmed_mean(t(U5), trim_ratio), expected)


@pytest.mark.parametrize("trim_ratio", [0.5, -0.1, 0.7])
def test_trimmed_mean_bad_ratio(trim_ratio):
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean(t(U5), trim_ratio)


# ---------------------------------------------------------------------- Krum
# a, b, c, d are close together, e is an outlier. With f = 1 each score sums the
# n - f - 2 = 2 smallest squared distances to the others:
#   a: {b:1, c:4, d:2, e:200} -> 3      b: {a:1, c:5, d:1, e:181} -> 2
#   c: {a:4, b:5, d:2, e:164} -> 6      d: {a:2, b:1, c:2, e:162} -> 3
#   e: {a:200, b:181, c:164, d:162} -> 326
K5 = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def test_krum_scores():
    close(krum_scores(t(K5), 1), [3.0, 2.0, 6.0, 3.0, 326.0])


@pytest.mark.parametrize(
    ("num_selected", "weights", "expected", "selected"),
    [
        (1, None, [1.0, 0.0], [1]),  # Krum: b
        (3, None, [2 / 3, 1 / 3], [1, 0, 3]),  # Multi-Krum: mean of b, a, d
        (3, [1.0, 2.0, 1.0, 1.0, 1.0], [0.75, 0.25], [1, 0, 3]),  # weighted (Flower)
        (4, None, [0.5, 0.75], [1, 0, 3, 2]),
    ],
)
def test_krum(num_selected, weights, expected, selected):
    w = None if weights is None else t(weights)
    agg, idx = krum(t(K5), num_malicious=1, num_selected=num_selected, weights=w)
    close(agg, expected)
    assert idx.tolist() == selected
    assert 4 not in idx.tolist()  # the outlier is rejected


@pytest.mark.parametrize(("n", "f"), [(4, 1), (2, 0), (6, 2)])
def test_krum_too_few_clients(n, f):
    with pytest.raises(ValueError, match=r"n > 2f \+ 2.*lower num_malicious or sample more"):
        krum(torch.randn(n, 3, dtype=torch.float64), num_malicious=f)


@pytest.mark.parametrize(("f", "m", "match"), [(-1, 1, "num_malicious"), (1, 0, "num_selected"),
                                               (1, 6, "num_selected")])
def test_krum_bad_args(f, m, match):
    with pytest.raises(ValueError, match=match):
        krum(t(K5), num_malicious=f, num_selected=m)


# --------------------------------------------------------------------- FLAME
E = torch.eye(11, dtype=torch.float64)
SCALES = [1.0, 1.0, 1.0, 2.0, 4.0, 1.0, 1.0]  # powers of 2 keep cosines exact
# 7 benign updates with equal pairwise cosine 25/26 (norms sqrt(26) * scale) and
# 3 boosted opposite-direction (backdoor-like) updates of norm 10 * sqrt(26).
BENIGN = torch.stack([s * (5 * E[0] + E[1 + i]) for i, s in enumerate(SCALES)])
MALICIOUS = torch.stack([10 * (-5 * E[0] + E[8 + j]) for j in range(3)])
FLAME_UPDATES = torch.cat([BENIGN, MALICIOUS])


def _flame_expected(factors: list[float]) -> torch.Tensor:
    """Mean over the benign clients of factor_i * (5 e0 + e_{1+i})."""
    return sum(f * (5 * E[0] + E[1 + i]) for i, f in enumerate(factors)) / 7


@pytest.mark.parametrize(
    ("clip_bound_from", "factors"),
    [
        ("admitted", [1.0] * 7),  # S = sqrt(26): the 2x and 4x updates are clipped to 1x
        ("all", [1.0, 1.0, 1.0, 1.5, 1.5, 1.0, 1.0]),  # S = median of 10 norms = 1.5 sqrt(26)
    ],
)
def test_flame_admits_benign_majority(clip_bound_from, factors):
    agg, admitted = flame(FLAME_UPDATES, noise_lambda=0.0, clip_bound_from=clip_bound_from)
    assert admitted.tolist() == list(range(7))
    torch.testing.assert_close(agg, _flame_expected(factors), rtol=1e-12, atol=1e-12)


def test_flame_norm_bounded_with_noise():
    gen = torch.Generator().manual_seed(0)
    agg, admitted = flame(FLAME_UPDATES, generator=gen)
    assert admitted.tolist() == list(range(7))
    median_norm = torch.linalg.vector_norm(BENIGN, dim=1).median().item()
    assert torch.linalg.vector_norm(agg).item() <= median_norm


@pytest.mark.parametrize("seed", range(5))
def test_flame_random_benign_spread(seed):
    # Generic spread: HDBSCAN's root-cluster labelling may also drop a benign
    # client, but never admits an attacker and always keeps a strict majority.
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(50, generator=g, dtype=torch.float64)
    updates = torch.cat([
        base + 0.3 * torch.randn(7, 50, generator=g, dtype=torch.float64),
        -5 * base + 0.3 * torch.randn(3, 50, generator=g, dtype=torch.float64),
    ])
    agg, admitted = flame(updates, generator=g)
    assert set(admitted.tolist()) <= set(range(7)) and admitted.numel() >= 6
    median_norm = torch.linalg.vector_norm(updates[admitted], dim=1).median().item()
    assert torch.linalg.vector_norm(agg).item() <= median_norm * 1.01


def test_flame_all_noise_admits_everyone(monkeypatch):
    import sklearn.cluster

    class AllNoise:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

        def fit(self, dist):
            self.labels_ = np.full(len(dist), -1)
            return self

    monkeypatch.setattr(sklearn.cluster, "HDBSCAN", AllNoise)
    agg, admitted = flame(FLAME_UPDATES, noise_lambda=0.0)
    assert admitted.tolist() == list(range(10))


def test_flame_cluster_on_models():
    zeros = torch.zeros(11, dtype=torch.float64)
    agg, admitted = flame(FLAME_UPDATES, zeros, noise_lambda=0.0, cluster_on="models")
    assert admitted.tolist() == list(range(7))
    torch.testing.assert_close(agg, _flame_expected([1.0] * 7))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cluster_on": "models"}, "global_params"),
        ({"cluster_on": "weights"}, "cluster_on"),
        ({"clip_bound_from": "median"}, "clip_bound_from"),
        ({"min_cluster_size": 1}, "min_cluster_size"),
        ({"noise_lambda": -1.0}, "noise_lambda"),
    ],
)
def test_flame_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        flame(FLAME_UPDATES, **kwargs)


# --------------------------------------------------------------- finite_rows
def test_finite_rows():
    x = t([[1.0, 2.0], [float("nan"), 0.0], [0.0, float("inf")], [-float("inf"), 1.0], [0.0, 0.0]])
    assert finite_rows(x).tolist() == [True, False, False, False, True]


# ------------------------------------------------------------ L2 projections
@pytest.mark.parametrize(
    ("vector", "radius", "expected"),
    [
        ([1.0, 4.0, 5.0], 2.0, [1.0, 2.2, 2.6]),  # diff (0, 3, 4), norm 5 -> scaled by 2/5
        ([1.0, 4.0, 5.0], 5.0, [1.0, 4.0, 5.0]),  # on the sphere: unchanged
        ([1.5, 1.0, 0.5], 2.0, [1.5, 1.0, 0.5]),  # inside: unchanged
        ([1.0, 4.0, 5.0], 0.0, [1.0, 1.0, 1.0]),  # radius 0: the center
    ],
)
def test_project_l2_ball(vector, radius, expected):
    center = t([1.0, 1.0, 1.0])
    out = project_l2_ball(t(vector), center, radius)
    close(out, expected)
    assert torch.linalg.vector_norm(out - center).item() <= radius + 1e-12


def test_project_l2_ball_random_inside():
    g = torch.Generator().manual_seed(0)
    center = torch.randn(100, generator=g)
    for _ in range(20):
        v = center + 3 * torch.randn(100, generator=g)
        out = project_l2_ball(v, center, 1.5)
        assert torch.linalg.vector_norm(out - center).item() <= 1.5 * (1 + 1e-5)
        inside = center + 0.01 * torch.randn(100, generator=g)
        assert torch.equal(project_l2_ball(inside, center, 1.5), inside)


@pytest.mark.parametrize("radius", [0.5, 3.0, 100.0])
def test_project_params_l2_matches_flat(radius):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 4), (5,), (2, 1, 2)]
    center = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    params = [c + torch.randn(s, generator=g, dtype=torch.float64) for c, s in zip(center, shapes)]
    flat = torch.cat([p.flatten() for p in params])
    flat_c = torch.cat([c.flatten() for c in center])
    expected = project_l2_ball(flat, flat_c, radius)
    dist = project_params_l2_(params, center, radius)
    assert dist == pytest.approx(torch.linalg.vector_norm(flat - flat_c).item())
    torch.testing.assert_close(torch.cat([p.flatten() for p in params]), expected)


def test_project_bad_inputs():
    with pytest.raises(ValueError, match="radius"):
        project_l2_ball(t([1.0]), t([0.0]), -1.0)
    with pytest.raises(ValueError, match="shape"):
        project_l2_ball(t([1.0, 2.0]), t([0.0]), 1.0)
    with pytest.raises(ValueError, match="center tensors"):
        project_params_l2_([t([1.0])], [], 1.0)


# ---------------------------------------------------------------- Neurotoxin
NT = [0.5, -3.0, 0.1, 2.0, -0.2, 0.0, 4.0, -1.0]


@pytest.mark.parametrize(
    ("keep_ratio", "kept"),
    [
        (0.5, [0, 2, 4, 5]),  # |.| = 0.5, 0.1, 0.2, 0
        (0.75, [0, 2, 3, 4, 5, 7]),  # + 1.0 and 2.0
        (0.875, [0, 1, 2, 3, 4, 5, 7]),  # drops only |4.0|
        (0.0, []),
        (1.0, list(range(8))),
    ],
)
def test_neurotoxin_mask(keep_ratio, kept):
    mask = neurotoxin_mask(t(NT), keep_ratio)
    assert mask.dtype == torch.bool
    assert sorted(torch.nonzero(mask).flatten().tolist()) == sorted(kept)


@pytest.mark.parametrize("keep_ratio", [0.99, 0.9, 0.37, 0.5])
def test_neurotoxin_mask_random(keep_ratio):
    g = torch.Generator().manual_seed(0)
    update = torch.randn(10, 123, generator=g)
    mask = neurotoxin_mask(update, keep_ratio)
    assert mask.shape == update.shape
    assert mask.sum().item() == round(keep_ratio * update.numel())
    assert update.abs()[mask].max() <= update.abs()[~mask].min()


@pytest.mark.parametrize("keep_ratio", [-0.1, 1.5])
def test_neurotoxin_bad_ratio(keep_ratio):
    with pytest.raises(ValueError, match="keep_ratio"):
        neurotoxin_mask(t(NT), keep_ratio)


# ------------------------------------------------------- Flower oracle tests
def _flower_results(n: int, seed: int) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Random Flower ``results`` and the matching (updates, weights) tensors."""
    rng = np.random.default_rng(seed)
    results = [
        ([rng.normal(size=(3, 4)), rng.normal(size=(5,))], int(rng.integers(1, 100)))
        for _ in range(n)
    ]
    updates = torch.tensor(np.stack([_flat(layers) for layers, _ in results]))
    weights = torch.tensor([float(k) for _, k in results], dtype=torch.float64)
    return results, updates, weights


def _flat(layers) -> np.ndarray:
    return np.concatenate([np.asarray(x).ravel() for x in layers])


@pytest.fixture(scope="module")
def flower():
    pytest.importorskip("flwr", reason="the Flower cross-checks need flwr: pip install -e '.[test]'")
    from flwr.server.strategy import aggregate

    return aggregate


def _assert_flower(ours: torch.Tensor, theirs) -> None:
    np.testing.assert_allclose(ours.numpy(), _flat(theirs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n", [5, 10])
def test_flower_fedavg_median(flower, n, seed):
    results, updates, weights = _flower_results(n, seed)
    _assert_flower(fedavg(updates, weights), flower.aggregate(results))
    _assert_flower(coordinate_median(updates), flower.aggregate_median(results))


@pytest.mark.parametrize("trim_ratio", [0.0, 0.1, 0.2, 0.3, 0.45])
@pytest.mark.parametrize("n", [7, 10])
def test_flower_trimmed_mean(flower, n, trim_ratio):
    results, updates, _ = _flower_results(n, 3)
    expected = flower.aggregate_trimmed_avg(results, trim_ratio)
    _assert_flower(trimmed_mean(updates, trim_ratio), expected)


@pytest.mark.parametrize(("f", "to_keep"), [(1, 0), (2, 0), (3, 0), (1, 3), (2, 5), (3, 1)])
@pytest.mark.parametrize("seed", range(3))
def test_flower_krum(flower, f, to_keep, seed):
    results, updates, weights = _flower_results(10, seed)
    agg, selected = krum(updates, f, num_selected=max(1, to_keep), weights=weights)
    _assert_flower(agg, flower.aggregate_krum(results, f, to_keep))
    assert len(set(selected.tolist())) == max(1, to_keep)


@pytest.mark.parametrize("seed", range(3))
def test_engine_krum_weighted_is_flowers_multikrum_unweighted_is_the_papers(flower, seed):
    """The engine's ``Krum`` aggregator passes the round's sample counts only with ``weighted=True``."""
    from lightning_modules.federated import Krum

    results, updates, weights = _flower_results(10, seed)
    out, diag = Krum(num_malicious=2, num_selected=4, weighted=True).aggregate(updates, weights)
    _assert_flower(out, flower.aggregate_krum(results, 2, 4))
    plain, diag_plain = Krum(num_malicious=2, num_selected=4).aggregate(updates, weights)
    torch.testing.assert_close(plain, updates[diag["admitted"]].mean(dim=0), rtol=1e-12, atol=1e-12)
    assert torch.equal(diag["admitted"], diag_plain["admitted"])
    assert not torch.allclose(plain, out)  # the counts differ, so the two averages do
