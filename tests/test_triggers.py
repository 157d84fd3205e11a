"""Triggers, poisoning and the ASR metric on hand-built tensors."""

import random

import pytest
import torch

from datamodules import Blend, InsertSentence, Patch, PixelPattern, Poisoning, RareWord
from lightning_modules import AttackSuccessRate


def test_pixel_pattern_sets_exactly_the_chameleon_pixels():
    x = torch.zeros(2, 1, 28, 28)
    out = PixelPattern()(x)
    expected = {(25, 25), (26, 24), (24, 26), (26, 26)}  # (h-3,w-3), (h-2,w-4), (h-4,w-2), (h-2,w-2)
    assert {tuple(ix.tolist()) for ix in out[0, 0].nonzero()} == expected
    assert torch.equal(out[0], out[1]) and x.sum() == 0  # input untouched


@pytest.mark.parametrize(
    "trigger, changed",
    [
        (Patch(size=3, location="top_left", pattern="white", margin=0), 9),
        (Patch(size=2, location="bottom_right", pattern="checkerboard", margin=1), 2),
        (PixelPattern(offsets=[(1, 1)]), 1),
    ],
)
def test_patch_pixel_counts(trigger, changed):
    out = trigger(torch.zeros(1, 1, 8, 8))
    assert int((out != 0).sum()) == changed


def test_patch_location_top_left_margin_zero():
    out = Patch(size=2, location="top_left", pattern="white", margin=0)(torch.zeros(1, 1, 4, 4))
    assert out[0, 0, :2, :2].eq(1).all() and out[0, 0, 2:, :].eq(0).all()


def test_blend_is_alpha_mix_of_fixed_pattern():
    x = torch.rand(3, 1, 8, 8)
    trig = Blend(alpha=0.25, seed=3)
    out = trig(x)
    pattern = (out - 0.75 * x) / 0.25
    assert torch.allclose(pattern[0], pattern[2], atol=1e-6)  # same pattern on every image
    assert torch.allclose(trig(x), out)  # deterministic


@pytest.mark.parametrize(
    "trigger, shape",
    [(Patch(size=8, margin=1), (1, 1, 8, 8)), (PixelPattern(offsets=[(9, 1)]), (1, 1, 8, 8))],
)
def test_trigger_larger_than_image_is_a_clear_error(trigger, shape):
    with pytest.raises(ValueError, match="does not fit|outside"):
        trigger(torch.zeros(shape))


def test_text_triggers_insert_at_word_boundaries():
    rng = random.Random(0)
    out = RareWord(words=["cf"], num_insertions=2).apply("the movie was fine", rng)
    assert out.split().count("cf") == 2 and [w for w in out.split() if w != "cf"] == "the movie was fine".split()
    assert InsertSentence("I watched this 3D movie.", position="start").apply("great", rng) == "I watched this 3D movie. great"
    assert InsertSentence("Boom.", position="end").apply("great film", rng) == "great film Boom."


@pytest.mark.parametrize("clean_label", [False, True])
def test_poisoning_selects_rate_from_the_right_pool(clean_label):
    labels = torch.tensor([0, 1, 2, 3] * 25)
    p = Poisoning(PixelPattern(offsets=[(1, 1)]), rate=0.1, target_label=2, clean_label=clean_label, seed=1)
    mask = p.select(labels, 4)
    assert int(mask.sum()) == 10
    assert (labels[mask] == 2).all() if clean_label else (labels[mask] != 2).all()
    assert torch.equal(mask, p.select(labels, 4))  # deterministic
    x, y, m = p.poison_images(torch.zeros(100, 1, 4, 4), labels, 4)
    assert (y[m] == 2).all() and x[m][:, 0, 3, 3].eq(1).all() and x[~m].eq(0).all()
    assert torch.equal(y[~m], labels[~m])


def test_poisoning_bad_inputs():
    with pytest.raises(ValueError, match="target_label"):
        Poisoning(RareWord(), target_label=5).select(torch.tensor([0, 1]), 2)
    with pytest.raises(ValueError, match="labels must lie"):
        Poisoning(RareWord(), target_label=0).select(torch.tensor([0, 7]), 2)
    with pytest.raises(ValueError, match="empty"):
        Poisoning(RareWord()).select(torch.tensor([], dtype=torch.long), 2)
    with pytest.raises(ValueError, match="rate"):
        Poisoning(RareWord(), rate=1.5)


def test_triggered_eval_set_excludes_target_class():
    p = Poisoning(PixelPattern(offsets=[(1, 1)]), target_label=1)
    x, y = p.triggered_images(torch.zeros(4, 1, 4, 4), torch.tensor([0, 1, 2, 1]))
    assert y.tolist() == [0, 2] and x[:, 0, 3, 3].eq(1).all()
    texts, y = Poisoning(RareWord(words=["cf"]), target_label=0).triggered_texts(["a b", "c d", "e"], torch.tensor([0, 1, 1]))
    assert y.tolist() == [1, 1] and all("cf" in t.split() for t in texts)


@pytest.mark.parametrize(
    "preds, labels, expected",
    [
        ([0, 0, 1, 2], [1, 2, 3, 0], 2 / 3),  # the target-class sample (label 0) is ignored
        ([1, 1, 1], [1, 2, 3], 0.0),
        ([0, 0], [0, 0], 0.0),  # nothing to measure -> 0, no division by zero
    ],
)
def test_attack_success_rate(preds, labels, expected):
    m = AttackSuccessRate(target_label=0)
    m.update(torch.tensor(preds), torch.tensor(labels))
    assert m.compute().item() == pytest.approx(expected)


def test_attack_success_rate_accepts_logits_and_accumulates():
    m = AttackSuccessRate(target_label=1)
    m.update(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([0, 0]))
    m.update(torch.tensor([1]), torch.tensor([0]))
    assert m.compute().item() == pytest.approx(2 / 3)
