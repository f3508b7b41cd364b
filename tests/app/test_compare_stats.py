"""Win rate and Wilson interval against hand-computed values."""

from __future__ import annotations

import pytest

from app.compare.stats import WinRate, format_rate, tally, wilson_interval


@pytest.mark.parametrize(
    ("p_hat", "n", "expected"),
    [
        # Reference values of the Wilson score interval (z = 1.96).
        (0.5, 10, (0.2366, 0.7634)),
        (0.8, 10, (0.4902, 0.9433)),
        (0.0, 10, (0.0, 0.2775)),
        (1.0, 10, (0.7225, 1.0)),
        (0.5, 100, (0.4038, 0.5962)),
    ],
)
def test_wilson_interval_matches_reference_values(p_hat, n, expected):
    low, high = wilson_interval(p_hat, n)
    assert low == pytest.approx(expected[0], abs=1e-4)
    assert high == pytest.approx(expected[1], abs=1e-4)


def test_wilson_interval_without_votes_is_vacuous():
    assert wilson_interval(0.0, 0) == (0.0, 1.0)


def test_wilson_interval_rejects_impossible_inputs():
    with pytest.raises(ValueError, match="p_hat"):
        wilson_interval(1.5, 3)


def test_ties_and_both_bad_count_half():
    record = tally(["x", "x", "x", "y", "tie", "both_bad"])
    assert record == WinRate(wins=3, ties=1, both_bad=1, losses=1)
    assert record.votes == 6
    assert record.rate == pytest.approx(4 / 6)
    assert record.interval == pytest.approx(wilson_interval(4 / 6, 6))


def test_no_votes_has_no_rate():
    record = tally([])
    assert record.rate is None and record.interval is None
    assert format_rate(record) == ("—", "—")


def test_format_rate():
    assert format_rate(WinRate(wins=5, ties=0, both_bad=0, losses=5)) == ("50.0%", "23.7–76.3%")


def test_unknown_vote_is_rejected():
    with pytest.raises(ValueError, match="unknown vote"):
        tally(["x", "left"])
