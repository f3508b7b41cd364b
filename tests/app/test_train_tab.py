"""The Train tab's plot frames (the browser test checks that Vega draws them)."""

from __future__ import annotations

import math

from app.train.tab import PLOTS, metric_frames


def test_every_curve_is_in_the_first_frame_so_the_plot_can_colour_it():
    # Vega keeps the colour domain of the first frame: a curve missing from it is never drawn.
    frames = metric_frames([])
    for title, names in PLOTS.items():
        assert list(frames[title]["metric"]) == list(names)
        assert frames[title]["value"].isna().all()


def test_metrics_become_points_of_their_curves_and_non_finite_values_are_left_out():
    metrics = [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.0},
        {"step": 2, "loss": 0.5, "rewards/margins": math.inf, "eval/loss": 0.6},
    ]
    frames = metric_frames(metrics)
    loss = frames["Loss"].dropna()
    assert loss.values.tolist() == [[1, 0.69, "loss"], [2, 0.5, "loss"], [2, 0.6, "eval/loss"]]
    rewards = frames["Rewards"].dropna()
    assert rewards.values.tolist() == [[1, 0.0, "rewards/margins"]]
    assert str(frames["Loss"]["step"].dtype) == "int64"
    assert str(frames["Loss"]["value"].dtype) == "float64"
