"""Durability metrics of callbacks.round_curves on hand-made curves: lifespan (NaN for a backdoor never planted),
normalised half-life, mean BA after the window, censoring, and the plot with windows that close apart."""

from __future__ import annotations

import math

import pytest

from callbacks.round_curves import curve_summary, plot_curves

ROUNDS = [2, 4, 6, 8, 10, 12]
WINDOW = [0, 1, 2, 3]  # attack rounds: the window closes at round 4
NAN = math.nan


@pytest.mark.parametrize(
    "ba, expected",
    [
        # planted to 0.9, decays: BA < 0.5 first at round 10 (6 rounds after), BA/0.9 < 0.5 first at 12 (0.45/0.9 = 0.5)
        ([0.5, 0.9, 0.8, 0.6, 0.45, 0.3], dict(ba_attack_end=0.9, lifespan=6, lifespan_censored=0, half_life=8,
                                               half_life_censored=0, ba_mean_after=0.61)),
        # never planted (0.3 < 0.5 when the window closes): no lifespan; still halves by round 8
        ([0.2, 0.3, 0.2, 0.1, 0.05, 0.0], dict(ba_attack_end=0.3, lifespan=NAN, half_life=4, ba_mean_after=0.13)),
        # durable: never below either level within the 8 rounds observed (lower bounds, censored)
        ([0.9, 0.95, 0.9, 0.85, 0.8, 0.9], dict(lifespan=8, lifespan_censored=1, half_life=8, half_life_censored=1)),
        # BA 0 at the window's end: the half-life is undefined too
        ([0.0, 0.0, 0.0, 0.0, 0.0, 0.0], dict(lifespan=NAN, half_life=NAN, ba_mean_after=0.0)),
    ],
)
def test_durability_metrics_on_hand_made_curves(ba, expected):
    out = curve_summary({"rounds": ROUNDS, "ma": [0.9] * 6, "ba": ba, "attack_rounds": WINDOW}, threshold=0.5)
    assert out["window_end"] == 4 and out["window_length"] == 4 and out["ba_peak"] == max(ba)
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, nan_ok=True), key


def test_half_life_ratio_and_threshold_are_settings():
    rec = {"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [0.5, 0.9, 0.8, 0.6, 0.45, 0.3], "attack_rounds": WINDOW}
    out = curve_summary(rec, threshold=0.7, half_life_ratio=0.75)
    assert out["lifespan"] == 4 and out["half_life"] == 4  # 0.6 < 0.7; 0.6 / 0.9 < 0.75


def test_no_window_or_no_evaluation_after_it():
    clean = curve_summary({"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [0.01] * 6, "attack_rounds": []})
    assert "lifespan" not in clean and clean["ma_final"] == 0.9 and clean["ba_final"] == 0.01
    late = curve_summary({"rounds": [2, 4], "ma": [0.9, 0.9], "ba": [0.5, 0.9], "attack_rounds": [0, 1, 2, 3, 4]})
    assert math.isnan(late["lifespan"]) and math.isnan(late["half_life"]) and math.isnan(late["ba_attack_end"])


def test_plot_marks_windows_that_close_apart(tmp_path):
    runs = {"a": {"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [0.5, 0.9, 0.8, 0.6, 0.45, 0.3], "attack_rounds": WINDOW},
            "b": {"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [0.9] * 6, "attack_rounds": [0, 1]},
            "clean": {"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [None] * 6, "attack_rounds": []}}  # fmt: skip
    plot_curves(runs, tmp_path / "p.png", "t", 0.5)
    assert (tmp_path / "p.png").stat().st_size > 5000


def test_ba_measured_when_an_early_window_closed_is_ba_end():
    """An early-closing window (schedule.stop_at_ba) between evaluations: BA right after its last round counts."""
    rec = {"rounds": ROUNDS, "ma": [0.9] * 6, "ba": [0.5, 0.8, 0.6, 0.45, 0.3, 0.2], "attack_rounds": [0, 1, 2],
           "ba_at": {"3": 0.95}}  # fmt: skip
    out = curve_summary(rec)
    assert out["window_end"] == 3 and out["ba_attack_end"] == 0.95
    assert out["lifespan"] == 8 - 3 and out["half_life"] == 8 - 3  # 0.45 < 0.5 and 0.45 / 0.95 < 0.5
