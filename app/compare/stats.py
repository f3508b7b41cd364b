"""Blind-comparison statistics: win / tie / loss counts and a win rate with a Wilson interval.

Pure functions over counts (no database, no UI), so the numbers shown in the Compare tab can be
checked against hand-computed values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

Z_95 = 1.959963984540054  # two-sided 95% normal quantile


@dataclass(frozen=True)
class WinRate:
    """Head-to-head record of version `a` against version `b`.

    A tie and a "both bad" vote each count as half a win for both sides (the Chatbot Arena
    convention), so `rate` is (wins + (ties + both_bad) / 2) / votes.
    """

    wins: int
    ties: int
    both_bad: int
    losses: int

    @property
    def votes(self) -> int:
        return self.wins + self.ties + self.both_bad + self.losses

    @property
    def rate(self) -> float | None:
        if self.votes == 0:
            return None
        return (self.wins + 0.5 * (self.ties + self.both_bad)) / self.votes

    @property
    def interval(self) -> tuple[float, float] | None:
        rate = self.rate
        return None if rate is None else wilson_interval(rate, self.votes)


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval for a proportion `p_hat` observed over `n` trials.

    Wilson (1927): centre (p + z²/2n) / (1 + z²/n), half-width
    z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n). Unlike the normal approximation it stays inside
    [0, 1] and is sensible for small n and p near 0 or 1. n = 0 gives the vacuous (0, 1).
    """
    if n < 0 or not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"need n >= 0 and 0 <= p_hat <= 1, got n={n}, p_hat={p_hat}")
    if n == 0:
        return 0.0, 1.0
    denom = 1.0 + z * z / n
    centre = (p_hat + z * z / (2 * n)) / denom
    half = z * math.sqrt(p_hat * (1 - p_hat) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def tally(winners: list[str]) -> WinRate:
    """Count blind votes for side `x` against side `y` (`'x'`, `'y'`, `'tie'`, `'both_bad'`)."""
    counts = {"x": 0, "y": 0, "tie": 0, "both_bad": 0}
    for winner in winners:
        if winner not in counts:
            raise ValueError(f"unknown vote {winner!r}; expected x, y, tie or both_bad")
        counts[winner] += 1
    return WinRate(
        wins=counts["x"], ties=counts["tie"], both_bad=counts["both_bad"], losses=counts["y"]
    )


def format_rate(record: WinRate) -> tuple[str, str]:
    """Win rate and its 95% interval as short strings for a table ("62.5%", "40.9–80.4%")."""
    rate, interval = record.rate, record.interval
    if rate is None or interval is None:
        return "—", "—"
    low, high = interval
    return f"{100 * rate:.1f}%", f"{100 * low:.1f}–{100 * high:.1f}%"
