"""Tests for lightning_modules.ops.merging: hand-computed cases first, then oracle tests against peft's
``merge_utils`` where the two agree by definition (per-tensor trimming; per-task trimming of a one-tensor task
vector; DARE's element-wise drop under the same RNG state)."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from lightning_modules.ops import merging as ops


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float64)


# ------------------------------------------------------------------ hand-computed cases
TAU_A = {"w": t([1.0, -2.0, 3.0]), "b": t([0.5])}
TAU_B = {"w": t([-3.0, 1.0, 1.0]), "b": t([0.5])}

HAND = [
    # (name, function, expected merged task vector)
    ("task arithmetic", lambda: ops.task_arithmetic([TAU_A, TAU_B], t([1.0, 0.5])),
     {"w": t([-0.5, -1.5, 3.5]), "b": t([0.75])}),
    # TIES, density 1: signs elected by total mass (w: -2, -1, 4 -> -, -, +), disjoint mean of agreeing entries
    ("ties, no trim", lambda: ops.ties([TAU_A, TAU_B], t([1.0, 1.0]), 1.0),
     {"w": t([-3.0, -2.0, 2.0]), "b": t([0.5])}),
    # TIES, per task trim 50% of 4 entries -> 2 kept: A keeps 3, -2; B keeps -3, 1 (first of the tied 1s by topk)
    ("ties, trim per task", lambda: ops.ties([{"w": t([1.0, -2.0, 3.0, 0.5])}, {"w": t([-3.0, 1.0, 0.2, 0.1])}],
                                             t([1.0, 1.0]), 0.5, trim="task"),
     {"w": t([-3.0, -2.0, 3.0, 0.0])}),
    # frequency election: signs (+,-), (-,+), (+,+) -> counts 0, 0, 2 -> ties go to +
    ("ties, frequency", lambda: ops.ties([TAU_A, TAU_B], t([1.0, 1.0]), 1.0, majority_sign_method="frequency"),
     {"w": t([1.0, 1.0, 2.0]), "b": t([0.5])}),
    ("trim whole task vector", lambda: ops.trim_task({"a": t([4.0, -1.0]), "b": t([-3.0, 0.5])}, 0.5),
     {"a": t([4.0, 0.0]), "b": t([-3.0, 0.0])}),
    ("dare, density 1 = task arithmetic", lambda: ops.dare([TAU_A, TAU_B], t([1.0, 0.5]), 1.0),
     {"w": t([-0.5, -1.5, 3.5]), "b": t([0.75])}),
    ("weighted merge with a mask", lambda: ops.weighted_merge({"w": t([1.0, 1.0, 1.0])}, [{"w": t([2.0, 2.0, 2.0])}],
                                                              t([0.5]), [{"w": t([1.0, 0.0, 2.0])}]),
     {"w": t([2.0, 1.0, 3.0])}),
    ("layer-wise weights", lambda: ops.weighted_merge({"a": t([0.0]), "b": t([1.0])}, [{"a": t([2.0]), "b": t([2.0])}],
                                                      t([[0.5, 0.25]])),
     {"a": t([1.0]), "b": t([1.5])}),
]


@pytest.mark.parametrize("name,fn,expected", HAND, ids=[h[0] for h in HAND])
def test_hand_computed(name, fn, expected):
    out = fn()
    assert set(out) == set(expected)
    for k in expected:
        torch.testing.assert_close(out[k], expected[k])


def test_task_vectors_and_add_round_trip():
    pre = {"w": t([1.0, 2.0])}
    fine = [{"w": t([1.5, 1.0])}]
    taus = ops.task_vectors(pre, fine)
    torch.testing.assert_close(taus[0]["w"], t([0.5, -1.0]))
    torch.testing.assert_close(ops.add(pre, taus[0])["w"], fine[0]["w"])


def test_entropy_of_uniform_and_one_hot():
    torch.testing.assert_close(ops.entropy(torch.zeros(3, 4, dtype=torch.float64)), torch.log(t(4.0)))
    assert ops.entropy(t([[100.0, 0.0, 0.0]])) < 1e-6


# ------------------------------------------------------------------ oracle: peft's merge_utils
def _random_vectors(k: int, shapes: dict[str, tuple[int, ...]], seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()} for _ in range(k)]


SHAPES = {"conv": (4, 3, 3, 3), "fc": (7, 5), "bias": (5,)}


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_per_tensor_is_peft(density, method):
    taus = _random_vectors(3, SHAPES)
    w = t([0.3, 0.5, 1.0])
    out = ops.ties(taus, w, density, trim="tensor", majority_sign_method=method)
    for n in SHAPES:
        torch.testing.assert_close(out[n], merge_utils.ties([tv[n] for tv in taus], w, density, method))


@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_per_task_equals_peft_for_a_one_tensor_task_vector(density):
    taus = _random_vectors(4, {"only": (6, 9)}, seed=1)
    w = t([1.0, 1.0, 0.5, 0.5])
    out = ops.ties(taus, w, density, trim="task")
    torch.testing.assert_close(out["only"], merge_utils.ties([tv["only"] for tv in taus], w, density))


def test_ties_per_task_differs_from_per_tensor_when_magnitudes_differ_across_tensors():
    taus = [{"big": torch.full((4,), 10.0) + torch.arange(4.0), "small": torch.arange(1.0, 5.0) / 100}]
    per_task = ops.ties(taus, torch.ones(1), 0.5, trim="task")
    per_tensor = ops.ties(taus, torch.ones(1), 0.5, trim="tensor")
    assert torch.count_nonzero(per_task["small"]) == 0 and torch.count_nonzero(per_task["big"]) == 4
    assert torch.count_nonzero(per_tensor["small"]) == 2 and torch.count_nonzero(per_tensor["big"]) == 2


@pytest.mark.parametrize("merge,peft_fn", [("linear", merge_utils.dare_linear), ("ties", merge_utils.dare_ties)])
def test_dare_is_peft_under_the_same_rng_state(merge, peft_fn):
    taus = _random_vectors(3, SHAPES, seed=2)
    w = t([0.3, 0.3, 0.3])
    torch.manual_seed(7)
    out = ops.dare(taus, w, 0.4, merge=merge)
    torch.manual_seed(7)
    expected = {n: peft_fn([tv[n] for tv in taus], w, 0.4) for n in SHAPES}
    for n in SHAPES:
        torch.testing.assert_close(out[n], expected[n])


def test_task_arithmetic_is_peft():
    taus = _random_vectors(3, SHAPES, seed=3)
    w = t([0.2, -0.4, 1.0])
    out = ops.task_arithmetic(taus, w)
    for n in SHAPES:
        torch.testing.assert_close(out[n], merge_utils.task_arithmetic([tv[n] for tv in taus], w))


# ------------------------------------------------------------------ masks
@pytest.mark.parametrize("temperature", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("logit", [-30.0, 0.0, 30.0])
def test_relaxed_bernoulli_stays_in_unit_interval_and_is_differentiable(temperature, logit):
    logits = torch.full((1000,), logit, requires_grad=True)
    m = ops.relaxed_bernoulli(logits, temperature, torch.Generator().manual_seed(0))
    assert m.min() >= 0.0 and m.max() <= 1.0
    m.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_relaxed_bernoulli_mean_follows_the_logits():
    g = torch.Generator().manual_seed(0)
    m = ops.relaxed_bernoulli(torch.full((20000,), 2.0), 0.1, g)
    assert abs(float((m > 0.5).float().mean()) - float(torch.sigmoid(torch.tensor(2.0)))) < 0.02


def test_discrete_masks_are_binary():
    logits = torch.tensor([-2.0, -0.1, 0.1, 2.0])
    assert ops.discrete_mask(logits, "threshold").tolist() == [0.0, 0.0, 1.0, 1.0]
    sample = ops.discrete_mask(logits, "sample", torch.Generator().manual_seed(0))
    assert set(sample.tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(ops.mean_rescale(t([1.0, 0.0, 1.0, 0.0])), t([2.0, 0.0, 2.0, 0.0]))


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,message", [
    (lambda: ops.ties([TAU_A], t([1.0]), 0.0), "density"),
    (lambda: ops.ties([TAU_A], t([1.0]), 0.5, trim="layer"), "trim"),
    (lambda: ops.task_arithmetic([TAU_A, {"w": t([1.0, 2.0, 3.0])}], t([1.0, 1.0])), "keys"),
    (lambda: ops.task_arithmetic([TAU_A], t([1.0, 1.0])), "one per task"),
    (lambda: ops.task_arithmetic([], t([])), "at least one"),
    (lambda: ops.relaxed_bernoulli(torch.zeros(2), 0.0), "temperature"),
    (lambda: ops.task_vectors({"w": t([1.0])}, [{"w": t([1.0, 2.0])}]), "fine-tuned from"),
])
def test_bad_input_names_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
