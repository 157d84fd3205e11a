"""Tests for lightning_modules.ops.finemixing: Fine-mixing masks and E-PUR scoring.

Hand-computed literal cases first, then oracle tests against peft's pruning of the update
(``peft.utils.merge_utils``), which is the same rule as mixing: ``w_pre + prune(w_ft - w_pre, rho)``.
"""

from __future__ import annotations

import math

import pytest
import torch

from lightning_modules.ops.finemixing import (
    choose_rho,
    epur_scores,
    mix,
    mix_state_dicts,
    mixing_mask,
    reset_rows,
    token_frequencies,
    top_rows,
)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


PRE = t([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
FT = t([[0.5, 1.0, 1.0], [3.0, 7.0, 5.25]])  # update: [[0.5, 0, -1], [0, 3, 0.25]]


# --------------------------------------------------------------------- mixing
@pytest.mark.parametrize("selection", ["random", "magnitude"])
@pytest.mark.parametrize(("rho", "expected"), [(1.0, FT), (0.0, PRE)])
def test_rho_one_gives_finetuned_and_rho_zero_pretrained_exactly(selection, rho, expected):
    pre, ft = torch.randn(64, 33), torch.randn(64, 33)
    out = mix(pre, ft, mixing_mask(pre, ft, rho, selection, torch.Generator().manual_seed(1)))
    assert torch.equal(out, ft if rho == 1.0 else pre)  # bit for bit, not approximately
    assert torch.equal(mix(PRE, FT, mixing_mask(PRE, FT, rho, selection)), expected)


@pytest.mark.parametrize(
    ("rho", "expected"),
    [
        (0.5, [[0.5, 1.0, 1.0], [3.0, 7.0, 5.0]]),  # 3 largest |update|: 3, -1, 0.5
        (1 / 6, [[0.0, 1.0, 2.0], [3.0, 7.0, 5.0]]),  # 1 entry: the 3
        (4 / 6, [[0.5, 1.0, 1.0], [3.0, 7.0, 5.25]]),  # 4 entries: all non-zero updates
    ],
)
def test_magnitude_selection_keeps_the_largest_updates(rho, expected):
    assert torch.equal(mix(PRE, FT, mixing_mask(PRE, FT, rho, "magnitude")), t(expected))


def test_random_selection_is_seeded_and_keeps_about_rho():
    pre, ft = torch.zeros(200, 100), torch.ones(200, 100)
    a = mixing_mask(pre, ft, 0.3, "random", torch.Generator().manual_seed(7))
    b = mixing_mask(pre, ft, 0.3, "random", torch.Generator().manual_seed(7))
    c = mixing_mask(pre, ft, 0.3, "random", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.float().mean().item() - 0.3) < 0.01  # 20,000 Bernoulli(0.3) draws: std 0.003


@pytest.mark.parametrize("rho", [0.25, 0.5, 0.75])
def test_matches_peft_pruning_of_the_update(rho):
    peft_merge = pytest.importorskip("peft.utils.merge_utils")
    pre, ft = torch.randn(16, 8), torch.randn(16, 8)  # float32: masks are drawn as float32 Bernoulli
    delta = ft - pre
    expected = pre + peft_merge.magnitude_based_pruning(delta, rho)
    torch.testing.assert_close(mix(pre, ft, mixing_mask(pre, ft, rho, "magnitude")), expected)
    torch.manual_seed(3)  # peft draws from the global generator; ours from a generator with the same seed
    expected = pre + peft_merge.random_pruning(delta, rho, rescale=False)
    mask = mixing_mask(pre, ft, rho, "random", torch.Generator().manual_seed(3))
    torch.testing.assert_close(mix(pre, ft, mask), expected)


def test_mixing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="rho"):
        mixing_mask(PRE, FT, 1.5)
    with pytest.raises(ValueError, match="shapes"):
        mixing_mask(PRE, FT[:1], 0.5)
    with pytest.raises(ValueError, match="selection"):
        mixing_mask(PRE, FT, 0.5, "largest")


def test_mix_state_dicts_keeps_integer_buffers_and_listed_tensors():
    pre = {"w": PRE, "ids": torch.arange(3)}
    ft = {"w": FT, "ids": torch.arange(3) + 1, "head": t([1.0, 2.0])}
    out = mix_state_dicts(pre, ft, 0.0, keep={"head"})
    assert torch.equal(out["w"], PRE) and torch.equal(out["ids"], ft["ids"]) and torch.equal(out["head"], ft["head"])
    with pytest.raises(KeyError, match="head"):
        mix_state_dicts(pre, ft, 0.5)


# --------------------------------------------------------------------- E-PUR
def test_token_frequencies_count_only_real_tokens():
    ids = torch.tensor([[1, 2, 2, 0], [3, 1, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    assert token_frequencies(ids, mask, 5).tolist() == [0, 2, 2, 1, 0]
    assert token_frequencies(ids, None, 5).tolist() == [3, 2, 2, 1, 0]
    with pytest.raises(ValueError, match="token ids"):
        token_frequencies(ids, mask, 3)


def test_epur_scores_hand_computed():
    pre = torch.zeros(4, 2)
    ft = t([[3.0, 4.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    freqs = torch.tensor([100, 0, 1, 20])
    expected = [5 / math.log(100), 0.0, 1 / math.log(20), 2 / math.log(20)]  # f < 20 counts as 20
    torch.testing.assert_close(epur_scores(pre, ft, freqs, floor=20), t(expected))
    torch.testing.assert_close(epur_scores(pre, ft, freqs, score="delta"), t([5.0, 0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="floor"):
        epur_scores(pre, ft, freqs, floor=1.0)
    with pytest.raises(ValueError, match="frequencies"):
        epur_scores(pre, ft, freqs[:3])


def test_rare_moved_token_outranks_frequent_moved_token():
    # a trigger word (never in clean data, moved 1.0) against a common word moved 1.5 (seen 10,000 times)
    pre = torch.zeros(3, 4)
    ft = t([[1.5, 0, 0, 0], [1.0, 0, 0, 0], [0.1, 0, 0, 0]])
    scores = epur_scores(pre, ft, torch.tensor([10_000, 0, 0]))
    assert top_rows(scores, 1).tolist() == [1]
    assert top_rows(epur_scores(pre, ft, torch.tensor([10_000, 0, 0]), score="delta"), 1).tolist() == [0]


@pytest.mark.parametrize(
    ("scores", "top_n", "expected"),
    [
        ([0.1, 0.5, 0.0, 0.3], 2, [1, 3]),
        ([0.1, 0.5, 0.0, 0.3], 10, [1, 3, 0]),  # unchanged rows (score 0) are never reset
        ([0.1, 0.5, 0.0, 0.3], 0, []),
    ],
)
def test_top_rows(scores, top_n, expected):
    assert top_rows(t(scores), top_n).tolist() == expected


def test_reset_rows_touches_only_the_chosen_rows():
    pre, ft = torch.zeros(5, 3), torch.arange(15.0).reshape(5, 3)
    out = reset_rows(pre, ft, torch.tensor([1, 3]))
    assert torch.equal(out[[1, 3]], pre[[1, 3]]) and torch.equal(out[[0, 2, 4]], ft[[0, 2, 4]])
    assert torch.equal(ft, torch.arange(15.0).reshape(5, 3)), "the input must not be modified"


# --------------------------------------------------------------------- the validation rule
@pytest.mark.parametrize(
    ("tried", "baseline", "drop", "expected"),
    [
        ([(0.2, 0.70), (0.4, 0.77), (0.6, 0.79)], 0.80, 0.02, 0.6),  # smallest within 2 points
        ([(0.6, 0.79), (0.2, 0.70), (0.4, 0.78)], 0.80, 0.02, 0.4),  # order does not matter
        ([(0.2, 0.79), (0.4, 0.80)], 0.80, 0.02, 0.2),
        ([(0.2, 0.60), (0.4, 0.65), (0.6, 0.65)], 0.80, 0.02, 0.6),  # none qualifies: best, larger rho on ties
    ],
)
def test_choose_rho(tried, baseline, drop, expected):
    assert choose_rho(tried, baseline, drop) == expected
