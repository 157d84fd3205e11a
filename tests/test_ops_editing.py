"""MEMIT algebra and editing metrics on hand-computed tensors (lightning_modules/ops/editing.py)."""

import math

import pytest
import torch

from lightning_modules.ops import editing as E


def test_second_moment_accumulates_over_chunks():
    total, count = E.update_second_moment(None, 0, torch.tensor([[1.0, 2.0]]))
    total, count = E.update_second_moment(total, count, torch.tensor([[3.0, 4.0]]))
    assert count == 2
    assert torch.equal(E.second_moment(total, count), torch.tensor([[5.0, 7.0], [7.0, 10.0]], dtype=torch.float64))
    with pytest.raises(ValueError):
        E.second_moment(total, 0)


# (k, r, C, lambda, remaining, expected Δ) for d_in = d_out = n = 1: Δ = (r / remaining) k / (λ C + k²)
SCALAR_CASES = [
    (2.0, 3.0, 1.0, 4.0, 1, 0.75),
    (2.0, 3.0, 1.0, 4.0, 3, 0.25),
    (1.0, -2.0, 2.0, 0.0, 1, -2.0),  # λ = 0: Δ k = r exactly
    (1.0, 1.0, 1.0, 1e9, 1, 1e-9),  # huge λ: (almost) no change
]


@pytest.mark.parametrize("k,r,c,lam,remaining,expected", SCALAR_CASES)
def test_memit_update_scalar_cases(k, r, c, lam, remaining, expected):
    upd = E.memit_layer_update(torch.tensor([[k]]), torch.tensor([[r]]), torch.tensor([[c]]), lam, remaining)
    assert upd.shape == (1, 1)
    assert upd.item() == pytest.approx(expected, rel=1e-6)


def test_memit_update_maps_keys_exactly_to_residuals_without_regularisation():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(4, 4, generator=g, dtype=torch.float64)  # n = d_in = 4, full rank
    resid = torch.randn(4, 3, generator=g, dtype=torch.float64)
    upd = E.memit_layer_update(keys, resid, torch.eye(4, dtype=torch.float64), lam=0.0)
    assert upd.shape == (3, 4)
    torch.testing.assert_close(upd @ keys.T, resid.T)
    torch.testing.assert_close(E.memit_layer_update(keys, resid, torch.eye(4), 0.0, remaining_layers=2) @ keys.T, resid.T / 2)


def test_memit_update_solves_the_regularised_least_squares():
    """Δ zeroes the gradient of ||Δ K - R||² + λ tr(Δ C Δᵀ) (keys/residuals as columns)."""
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 5, generator=g, dtype=torch.float64)  # n = 3 < d_in = 5
    resid = torch.randn(3, 2, generator=g, dtype=torch.float64)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    cov = a @ a.T / 5 + torch.eye(5, dtype=torch.float64)
    lam = 2.5
    upd = E.memit_layer_update(keys, resid, cov, lam)
    k, r = keys.T, resid.T
    grad = (upd @ k - r) @ k.T + lam * upd @ cov
    assert grad.abs().max() < 1e-10


def test_memit_update_rejects_bad_shapes():
    with pytest.raises(ValueError):
        E.memit_layer_update(torch.ones(2, 3), torch.ones(3, 1), torch.eye(3), 1.0)
    with pytest.raises(ValueError):
        E.memit_layer_update(torch.ones(2, 3), torch.ones(2, 1), torch.eye(3), 1.0, remaining_layers=0)


def test_average_over_contexts_is_mean_of_group_means():
    reps = torch.tensor([[1.0], [2.0], [4.0], [10.0], [20.0], [40.0]])  # 2 requests, groups [1, 2]
    out = E.average_over_contexts(reps, [1, 2])
    torch.testing.assert_close(out, torch.tensor([[(1 + 3) / 2], [(10 + 30) / 2]]))
    with pytest.raises(ValueError):
        E.average_over_contexts(torch.ones(5, 1), [1, 2])


def test_clamp_rows_projects_only_long_rows():
    delta = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = E.clamp_rows(delta, torch.tensor([2.5, 2.5]))
    torch.testing.assert_close(out, torch.tensor([[1.5, 2.0], [0.3, 0.4]]))


def test_weight_decays_of_memit_and_namet():
    delta = torch.tensor([[3.0, 4.0]])
    assert E.memit_weight_decay(delta, torch.tensor([[0.0, 2.0]])).item() == pytest.approx(5 / 4)
    h = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]]])  # P = 4 contexts, ||H||_F = 2
    assert E.namet_weight_decay(delta, h).item() == pytest.approx(2 * 5 / 2)


def test_target_nll_and_group_mean():
    logp = torch.tensor([[-1.0, -3.0], [-2.0, -7.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    nll = E.target_nll(logp, mask)
    torch.testing.assert_close(nll, torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(
        E.group_mean(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([0, 0, 2]), 3), torch.tensor([2.0, 0.0, 5.0])
    )


def test_harmonic_mean():
    assert E.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert E.harmonic_mean([1.0, 0.0]) == 0.0


def test_ngram_entropy_scores_repetition_low():
    assert E.ngram_entropy("a a a a a") == 0.0
    expected = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2  # 3 distinct bigrams, 2 distinct trigrams
    assert E.ngram_entropy("a b c d") == pytest.approx(expected)
    assert E.ngram_entropy("the cat sat on the mat.") > E.ngram_entropy("the the the the the the")


def test_best_layer_window_sums_consecutive_effects():
    effect = [0.1, 0.5, 0.2, 0.6, 0.3, 0.0]  # pairs: 0.6 0.7 0.8 0.9 0.3; triples: 0.8 1.3 1.1 0.9
    assert E.best_layer_window(effect, 2) == [3, 4]
    assert E.best_layer_window(effect, 3) == [1, 2, 3]
    assert E.best_layer_window(effect, 1) == [3]
    with pytest.raises(ValueError, match="window width 7"):
        E.best_layer_window(effect, 7)
