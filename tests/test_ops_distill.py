"""W2SDefense's distillation terms (lightning_modules/ops/distill.py) on hand-computed tensors and against torch."""

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.ops.distill import broadcast_feature_alignment, feature_alignment, kd_loss, pool_features

# token t of sequence b has feature [10 b + t, -(10 b + t)], so the pooled value names the token it came from
HIDDEN = torch.tensor([[[10.0 * b + t, -(10.0 * b + t)] for t in range(4)] for b in range(2)])

POOLING_CASES = [
    # (name, attention mask, mode, expected token index per sequence, or "mean" rows)
    ("right padding, last", [[1, 1, 0, 0], [1, 1, 1, 1]], "last", [1, 3]),
    ("left padding, last", [[0, 0, 1, 1], [0, 1, 1, 1]], "last", [3, 3]),
    ("right padding, first", [[1, 1, 0, 0], [1, 1, 1, 1]], "first", [0, 0]),
    ("left padding, first", [[0, 0, 1, 1], [0, 1, 1, 1]], "first", [2, 1]),
    ("no mask, last", None, "last", [3, 3]),
    ("single token, left", [[0, 0, 0, 1], [1, 1, 1, 1]], "last", [3, 3]),
    ("single token, right", [[1, 0, 0, 0], [1, 1, 1, 1]], "last", [0, 3]),
]


@pytest.mark.parametrize("name,mask,mode,tokens", POOLING_CASES, ids=[c[0] for c in POOLING_CASES])
def test_pooling_picks_the_right_token(name, mask, mode, tokens):
    mask = None if mask is None else torch.tensor(mask)
    pooled = pool_features(HIDDEN, mask, mode)
    expected = torch.stack([HIDDEN[b, t] for b, t in enumerate(tokens)])
    torch.testing.assert_close(pooled, expected)


@pytest.mark.parametrize(
    "mask,expected",
    [
        ([[1, 1, 0, 0], [1, 1, 1, 1]], [[0.5, -0.5], [11.5, -11.5]]),  # tokens 0-1 and 10-13
        ([[0, 0, 1, 1], [0, 1, 1, 1]], [[2.5, -2.5], [12.0, -12.0]]),  # tokens 2-3 and 11-13
    ],
    ids=["right", "left"],
)
def test_mean_pooling_ignores_padding(mask, expected):
    torch.testing.assert_close(pool_features(HIDDEN, torch.tensor(mask), "mean"), torch.tensor(expected))


@pytest.mark.parametrize(
    "hidden,mask,match",
    [
        (torch.zeros(2, 3), None, r"\[B, T, D\]"),
        (torch.zeros(2, 3, 4), torch.ones(2, 5), "does not match"),
        (torch.zeros(2, 3, 4), torch.tensor([[1, 1, 1], [0, 0, 0]]), "no token"),
    ],
    ids=["2d", "mask shape", "empty row"],
)
def test_pooling_rejects_bad_input(hidden, mask, match):
    with pytest.raises(ValueError, match=match):
        pool_features(hidden, mask)


def test_pooling_rejects_unknown_mode():
    with pytest.raises(ValueError, match="unknown pooling"):
        pool_features(HIDDEN, None, "max")


KD_CASES = [
    # (student logits, teacher logits, temperature, expected T^2 * KL(p_t || p_s)), hand-computed:
    # T = 1: p_t = (3/4, 1/4), p_s = (1/2, 1/2): 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812
    ([[0.0, 0.0]], [[math.log(3.0), 0.0]], 1.0, 0.130812036),
    # T = 2: p_t = (sqrt3, 1) / (sqrt3 + 1), times T^2 = 4
    ([[0.0, 0.0]], [[math.log(3.0), 0.0]], 2.0, 0.145363131),
    # batch mean: the second row contributes 0
    ([[0.0, 0.0], [1.0, 2.0]], [[math.log(3.0), 0.0], [1.0, 2.0]], 1.0, 0.130812036 / 2),
    # equal up to a constant shift: softmax is shift-invariant
    ([[1.0, -1.0, 0.5]], [[4.0, 2.0, 3.5]], 3.0, 0.0),
]


@pytest.mark.parametrize("student,teacher,temperature,expected", KD_CASES)
def test_kd_loss_hand_computed(student, teacher, temperature, expected):
    value = kd_loss(torch.tensor(student), torch.tensor(teacher), temperature)
    assert value.item() == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_kd_loss_matches_torch_kldiv_batchmean(temperature):
    """The official code's formula: T^2 * KLDivLoss(batchmean)(log_softmax(s / T), softmax(t / T))."""
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(5, 3, generator=g) * 3, torch.randn(5, 3, generator=g) * 3
    reference = torch.nn.KLDivLoss(reduction="batchmean")(
        F.log_softmax(student / temperature, -1), F.softmax(teacher / temperature, -1)
    ) * temperature**2
    torch.testing.assert_close(kd_loss(student, teacher, temperature), reference)


@pytest.mark.parametrize("shape", [(1, 2), (4, 2), (3, 7)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_and_feature_terms_vanish_when_student_equals_teacher(shape, temperature):
    g = torch.Generator().manual_seed(0)
    logits, features = torch.randn(*shape, generator=g), torch.randn(shape[0], 16, generator=g)
    assert kd_loss(logits, logits.clone(), temperature).item() == pytest.approx(0.0, abs=1e-7)
    # F.pairwise_distance's eps (1e-6, added to the difference) leaves 16 * 1e-12
    assert feature_alignment(features, features.clone()).item() == pytest.approx(0.0, abs=1e-10)


def test_kd_loss_is_positive_and_its_gradient_reaches_only_the_student():
    student = torch.tensor([[2.0, -1.0]], requires_grad=True)
    teacher = torch.tensor([[-1.0, 2.0]])
    loss = kd_loss(student, teacher, 2.0)
    loss.backward()
    assert loss.item() > 0
    assert student.grad[0, 0] > 0 > student.grad[0, 1]  # pushes the student towards the teacher's class 1


@pytest.mark.parametrize(
    "student,teacher,temperature,match",
    [
        (torch.zeros(2, 2), torch.zeros(2, 3), 2.0, "same shape"),
        (torch.zeros(2), torch.zeros(2), 2.0, "same shape"),
        (torch.zeros(2, 2), torch.zeros(2, 2), 0.0, "temperature"),
    ],
    ids=["classes", "1d", "temperature"],
)
def test_kd_loss_rejects_bad_input(student, teacher, temperature, match):
    with pytest.raises(ValueError, match=match):
        kd_loss(student, teacher, temperature)


FA_CASES = [
    # squared distances 25 (3-4-5 triangle) and 0: mean 12.5
    ([[0.0, 0.0], [1.0, 1.0]], [[3.0, 4.0], [1.0, 1.0]], 12.5),
    # 1 + 4 + 4 = 9
    ([[1.0, 2.0, 2.0]], [[0.0, 0.0, 0.0]], 9.0),
    # (2^2) and (4^2): mean 10
    ([[-1.0, 0.0], [0.0, 2.0]], [[1.0, 0.0], [0.0, -2.0]], 10.0),
]


@pytest.mark.parametrize("student,teacher,expected", FA_CASES)
def test_feature_alignment_is_the_mean_squared_distance(student, teacher, expected):
    assert feature_alignment(torch.tensor(student), torch.tensor(teacher)).item() == pytest.approx(expected, rel=1e-5)


BROADCAST_CASES = [
    # (student tokens [B, T, D], teacher features [B, D], expected): only the teacher's LAST row counts, and every
    # token position of every sequence (padding too: no mask is read) is one term of the mean.
    # teacher[-1] = (0, 0): squared norms 0, 25 | 2, 4 -> 31 / 4
    ([[[0.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [0.0, 2.0]]], [[9.0, 9.0], [0.0, 0.0]], 7.75),
    # teacher[-1] = (1, 1) against 3 tokens of one sequence: 0, 1, 8 -> 3
    ([[[1.0, 1.0], [1.0, 2.0], [3.0, 3.0]]], [[1.0, 1.0]], 3.0),
    # T = 1 and B = 3: teacher[-1] = (2,) against 1, 2, 5 -> (1 + 0 + 9) / 3
    ([[[1.0]], [[2.0]], [[5.0]]], [[100.0], [-7.0], [2.0]], 10.0 / 3),
]


@pytest.mark.parametrize("student,teacher,expected", BROADCAST_CASES)
def test_broadcast_feature_alignment_pulls_every_token_to_the_last_teacher_vector(student, teacher, expected):
    got = broadcast_feature_alignment(torch.tensor(student), torch.tensor(teacher))
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_broadcast_alignment_is_the_official_expression():
    """The official lines, written out: contrastive_loss(teacher['hidden_states'][-1], student.hidden_states[-1])."""
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 7, 5, generator=g), torch.randn(4, 5, generator=g)
    official = torch.mean(torch.pow(F.pairwise_distance(teacher[-1], student), 2))
    torch.testing.assert_close(broadcast_feature_alignment(student, teacher), official)
    # it differs from the per-sample pooled term: a different teacher row for the first samples changes nothing
    changed = teacher.clone()
    changed[:-1] += 10.0
    torch.testing.assert_close(broadcast_feature_alignment(student, changed), official)
    assert feature_alignment(student[:, -1], changed) != feature_alignment(student[:, -1], teacher)


def test_feature_alignment_matches_torch_pairwise_distance_squared():
    g = torch.Generator().manual_seed(2)
    student, teacher = torch.randn(6, 9, generator=g), torch.randn(6, 9, generator=g)
    reference = (teacher - student + 1e-6).pow(2).sum(-1).mean()  # pairwise_distance's eps is added to the difference
    torch.testing.assert_close(feature_alignment(student, teacher), reference)


def test_feature_alignment_refuses_unpooled_student_states():
    """The per-sample term needs pooled [B, D] student features (broadcast_feature_alignment takes [B, T, D])."""
    with pytest.raises(ValueError, match="pool the student"):
        feature_alignment(torch.zeros(2, 2, 8), torch.zeros(2, 8))
    with pytest.raises(ValueError, match="hidden size"):
        feature_alignment(torch.zeros(2, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="hidden size"):
        broadcast_feature_alignment(torch.zeros(2, 3, 8), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"\[B, T, D\]"):
        broadcast_feature_alignment(torch.zeros(2, 8), torch.zeros(2, 8))
