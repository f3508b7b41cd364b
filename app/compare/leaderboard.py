"""A Bradley-Terry leaderboard of versions from blind comparison votes.

Bradley & Terry (1952): P(i beats j) = sigmoid(theta_i - theta_j). The strengths theta maximise
sum_ij W_ij log sigmoid(theta_i - theta_j) - (l2 / 2) |theta|^2, where W_ij counts i's wins
over j and a tie counts half a win to each side (as the win-rate table does). That is a
logistic regression over pairs, solved by Newton's method in a few lines of numpy (no new
dependency). The small ridge term (a Gaussian prior, sd 1/sqrt(l2) in log-odds) keeps a 5-0
record finite; `l2=0` gives the plain maximum-likelihood fit.

Scores are on the Elo scale Chatbot Arena shows: 400 / ln(10) points per unit of theta, so a
100-point gap means the higher version wins 64% of votes. `base` is anchored at 1000 (when it
has votes; else the mean is 1000). 95% intervals come from refitting on votes resampled with
replacement. Pure functions over votes: no database, no UI.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_PER_THETA = 400 / math.log(10)  # Elo points per log-odds unit
ANCHOR_SCORE = 1000.0
BASE = "base"
DEFAULT_L2 = 0.25
BOOTSTRAP_ROUNDS = 1000
SCORES = {"left": 1.0, "tie": 0.5, "right": 0.0}  # the left version's share of one vote


@dataclass(frozen=True)
class Vote:
    """One blind vote between versions `left` and `right`: `left`, `right` or `tie`."""

    left: str
    right: str
    winner: str


@dataclass(frozen=True)
class Rating:
    version: str
    score: float  # Elo scale
    low: float  # 95% bootstrap interval
    high: float
    votes: int
    wins: int
    ties: int
    losses: int


@dataclass(frozen=True)
class Suggestion:
    """The pair to compare next. `p_first_above` is the share of bootstrap refits that rank
    `first` above `second` (None when one of them has no votes yet)."""

    first: str
    second: str
    p_first_above: float | None


@dataclass(frozen=True)
class Leaderboard:
    ratings: list[Rating]  # best first
    unrated: list[str]  # versions without votes
    anchor: str  # `base = 1000` or `mean = 1000`
    total_votes: int
    suggestion: Suggestion | None


def fit_strengths(
    n: int, first: np.ndarray, second: np.ndarray, score: np.ndarray, l2: float = DEFAULT_L2
) -> np.ndarray:
    """Bradley-Terry strengths theta (n,) from votes: `first[k]` met `second[k]` and took
    `score[k]` (1 win, 0.5 tie, 0 loss) of vote k. Newton's method on the penalised
    log-likelihood; with `l2=0` theta is centred (only differences are identified)."""
    wins = np.zeros((n, n))  # wins[i, j]: i's (half-)wins over j
    np.add.at(wins, (first, second), score)
    np.add.at(wins, (second, first), 1.0 - score)
    met = wins + wins.T
    theta = np.zeros(n)
    for _ in range(100):
        p = 0.5 * (1.0 + np.tanh((theta[:, None] - theta[None, :]) / 2))  # sigmoid, no overflow
        grad = (wins - met * p).sum(axis=1) - l2 * theta
        w = met * p * (1 - p)
        neg_hessian = np.diag(w.sum(axis=1) + l2) - w
        step = np.linalg.lstsq(neg_hessian, grad, rcond=None)[0]
        theta = theta + step
        if l2 == 0:
            theta -= theta.mean()
        if np.abs(step).max() < 1e-10:
            break
    return theta


def elo_scores(theta: np.ndarray, anchor: int | None) -> np.ndarray:
    """Elo-scale scores: the anchor version (or, with none, the mean) at 1000."""
    zero = theta[anchor] if anchor is not None else theta.mean()
    return ANCHOR_SCORE + ELO_PER_THETA * (theta - zero)


def fit_leaderboard(
    votes: Sequence[Vote],
    versions: Sequence[str] = (),
    *,
    l2: float = DEFAULT_L2,
    rounds: int = BOOTSTRAP_ROUNDS,
    seed: int = 0,
) -> Leaderboard:
    """Rate every version that has votes; list `versions` without votes as unrated."""
    for vote in votes:
        if vote.winner not in SCORES:
            raise ValueError(f"unknown winner {vote.winner!r}; expected left, right or tie")
    names = sorted({v.left for v in votes} | {v.right for v in votes}, key=_version_order)
    if not votes:
        unrated = list(dict.fromkeys(versions))
        suggestion = suggest_pair([], unrated, np.empty((0, 0)), [], votes)
        return Leaderboard([], unrated, f"{BASE} = 1000", 0, suggestion)
    index = {name: i for i, name in enumerate(names)}
    first = np.array([index[v.left] for v in votes], dtype=int)
    second = np.array([index[v.right] for v in votes], dtype=int)
    score = np.array([SCORES[v.winner] for v in votes])
    anchor = index.get(BASE)
    point = elo_scores(fit_strengths(len(names), first, second, score, l2), anchor)
    rng = np.random.default_rng(seed)
    samples = np.empty((rounds, len(names)))
    for r in range(rounds):
        k = rng.integers(0, len(votes), len(votes))
        samples[r] = elo_scores(
            fit_strengths(len(names), first[k], second[k], score[k], l2), anchor
        )
    low, high = np.percentile(samples, [2.5, 97.5], axis=0) if rounds else (point, point)
    ratings = [
        Rating(name, float(point[i]), float(low[i]), float(high[i]), *_record(votes, name))
        for i, name in enumerate(names)
    ]
    ratings.sort(key=lambda r: -r.score)
    unrated = [v for v in dict.fromkeys(versions) if v not in index]
    return Leaderboard(
        ratings=ratings,
        unrated=unrated,
        anchor=f"{BASE} = 1000" if anchor is not None else "mean = 1000",
        total_votes=len(votes),
        suggestion=suggest_pair(ratings, unrated, samples, names, votes),
    )


def _record(votes: Sequence[Vote], name: str) -> tuple[int, int, int, int]:
    """(votes, wins, ties, losses) of one version."""
    wins = ties = losses = 0
    for v in votes:
        if name not in (v.left, v.right):
            continue
        if v.winner == "tie":
            ties += 1
        elif (v.winner == "left") == (v.left == name):
            wins += 1
        else:
            losses += 1
    return wins + ties + losses, wins, ties, losses


def _version_order(name: str) -> tuple[int, int, str]:
    """base, v1, v2, ..., v10 (numeric), then any other name."""
    if name == BASE:
        return (0, 0, name)
    if name[:1] == "v" and name[1:].isdigit():
        return (1, int(name[1:]), name)
    return (2, 0, name)


def suggest_pair(
    ratings: list[Rating],
    unrated: list[str],
    samples: np.ndarray,
    names: list[str],
    votes: Sequence[Vote],
) -> Suggestion | None:
    """The pair whose order is least certain: a version with no votes against the leader;
    else the pair ranked the same way in closest to half of the bootstrap refits (fewest
    direct votes between them breaks a tie)."""
    if unrated:
        rival = ratings[0].version if ratings else (unrated[0] if len(unrated) > 1 else None)
        newest = unrated[-1]
        return Suggestion(newest, rival, None) if rival and rival != newest else None
    best: tuple[float, int, int, int] | None = None
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            p = float(np.mean(samples[:, a] > samples[:, b])) if len(samples) else 0.5
            direct = sum(1 for v in votes if {v.left, v.right} == {names[a], names[b]})
            key = (abs(p - 0.5), direct, a, b)
            best = key if best is None or key < best else best
    if best is None:
        return None
    _, _, a, b = best
    p_a = float(np.mean(samples[:, a] > samples[:, b])) if len(samples) else 0.5
    if p_a < 0.5:
        return Suggestion(names[b], names[a], 1.0 - p_a)
    return Suggestion(names[a], names[b], p_a)
