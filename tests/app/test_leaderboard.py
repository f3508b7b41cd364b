"""The Bradley-Terry leaderboard against hand-worked examples, and the votes it reads."""

from __future__ import annotations

import math

import numpy as np
import pytest

from app.compare.leaderboard import ELO_PER_THETA, Vote, fit_leaderboard, fit_strengths
from app.compare.leaderboard_tab import current_leaderboard, leaderboard_rows, summary_markdown
from storage import repo, runs
from storage.db import open_db
from storage.leaderboard_queries import version_votes


def votes(left: str, right: str, left_wins: int, ties: int = 0, right_wins: int = 0) -> list:
    """A record between two versions as individual votes (left/right as shown)."""
    return (
        [Vote(left, right, "left")] * left_wins
        + [Vote(left, right, "tie")] * ties
        + [Vote(right, left, "left")] * right_wins  # shown the other way round
    )


def scores(board) -> dict[str, float]:
    return {r.version: r.score for r in board.ratings}


def test_hand_worked_three_versions():
    """v2 beats v1 2:1, v1 beats base 2:1, v2 beats base 4:1. These counts are exactly what
    strengths (ln 4, ln 2, 0) predict (2/3, 2/3, 4/5), so the likelihood equations hold there:
    v1 = 1000 + 400·log10(2) = 1120.41, v2 = 1000 + 400·log10(4) = 1240.82."""
    data = votes("v2", "v1", 2, 0, 1) + votes("v1", "base", 2, 0, 1) + votes("v2", "base", 4, 0, 1)
    board = fit_leaderboard(data, ["base", "v1", "v2"], l2=0, rounds=0)
    assert [r.version for r in board.ratings] == ["v2", "v1", "base"]
    assert scores(board) == pytest.approx(
        {"base": 1000.0, "v1": 1120.412, "v2": 1240.824}, abs=1e-3
    )
    assert board.anchor == "base = 1000" and board.total_votes == 11
    v2 = board.ratings[0]
    assert (v2.votes, v2.wins, v2.ties, v2.losses) == (8, 6, 0, 2)


def test_a_tie_counts_half_a_win_to_each():
    """1 win, 2 ties, 0 losses = 2 : 1 in half-wins, so v1 - base = ln 2 = 120.41 points."""
    board = fit_leaderboard(votes("v1", "base", 1, 2, 0), l2=0, rounds=0)
    assert scores(board)["v1"] - scores(board)["base"] == pytest.approx(400 * math.log10(2))


def test_without_base_the_mean_is_anchored():
    board = fit_leaderboard(votes("v1", "v2", 3, 0, 1), l2=0, rounds=0)
    half_gap = 400 * math.log10(3) / 2
    assert scores(board) == pytest.approx({"v1": 1000 + half_gap, "v2": 1000 - half_gap})
    assert board.anchor == "mean = 1000"


def test_the_prior_keeps_a_clean_sweep_finite():
    """5-0 has no maximum-likelihood answer. With the ridge term (l2/2)(a² + a²) at theta = ±a
    the optimum solves 5·sigmoid(-2a) = l2·a; bisection finds it by hand."""
    l2 = 0.25
    lo, hi = 0.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 5 / (1 + math.exp(2 * mid)) > l2 * mid else (lo, mid)
    board = fit_leaderboard(votes("v1", "base", 5), l2=l2, rounds=0)
    assert scores(board)["v1"] - 1000 == pytest.approx(ELO_PER_THETA * 2 * lo, abs=1e-6)


def test_newton_fit_matches_plain_gradient_ascent():
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    keep = first != second
    first, second = first[keep], second[keep]
    score = rng.choice([0.0, 0.5, 1.0], size=len(first))
    theta = fit_strengths(4, first, second, score, l2=0.1)
    slow = np.zeros(4)
    for _ in range(20000):
        p = 1 / (1 + np.exp(-(slow[first] - slow[second])))
        grad = np.zeros(4)
        np.add.at(grad, first, score - p)
        np.add.at(grad, second, p - score)
        slow += 0.002 * (grad - 0.1 * slow)
    assert theta == pytest.approx(slow, abs=1e-6)


def test_bootstrap_interval_holds_the_estimate_and_narrows_with_votes():
    few = fit_leaderboard(votes("v1", "base", 6, 2, 4), rounds=300)
    many = fit_leaderboard(votes("v1", "base", 24, 8, 16), rounds=300)
    for board in (few, many):
        v1 = next(r for r in board.ratings if r.version == "v1")
        assert v1.low <= v1.score <= v1.high
    width = {
        id(b): next(r.high - r.low for r in b.ratings if r.version == "v1") for b in (few, many)
    }
    assert width[id(many)] < 0.7 * width[id(few)]
    base = next(r for r in many.ratings if r.version == "base")
    assert base.low == base.high == 1000.0  # the anchor


def test_suggests_the_pair_whose_order_is_least_certain():
    data = (
        votes("v1", "base", 30, 0, 2) + votes("v2", "base", 30, 0, 2) + votes("v2", "v1", 5, 0, 5)
    )
    board = fit_leaderboard(data, ["base", "v1", "v2"], rounds=300)
    s = board.suggestion
    assert {s.first, s.second} == {"v1", "v2"} and 0.5 <= s.p_first_above < 0.8
    with_new = fit_leaderboard(data, ["base", "v1", "v2", "v3"], rounds=50)
    assert with_new.unrated == ["v3"]
    assert (with_new.suggestion.first, with_new.suggestion.p_first_above) == ("v3", None)
    assert with_new.suggestion.second == with_new.ratings[0].version


def test_no_votes_and_bad_winner():
    board = fit_leaderboard([], ["base", "v1"], rounds=10)
    assert board.ratings == [] and board.unrated == ["base", "v1"]
    assert (board.suggestion.first, board.suggestion.second) == ("v1", "base")
    assert "No blind votes yet" in summary_markdown(board)
    with pytest.raises(ValueError, match="unknown winner"):
        fit_leaderboard([Vote("v1", "base", "both")])


@pytest.fixture
def sm(tmp_path):
    return open_db(f"sqlite:///{tmp_path / 'studio.db'}")


def add_votes(sm, base_model: str, record: dict[tuple[str, str], str]) -> None:
    """One blind vote per (left, right) -> winner, on answers the two versions wrote."""
    with sm.begin() as s:
        base = runs.ensure_base_version(s, base_model)
        ids = {"base": base.id}
        for name in ("v1", "v2"):
            v = runs.register_adapter_version(
                s, base_model=base_model, adapter_path=f"/a/{name}", parent_id=base.id
            )
            ids[name] = v.id
        for n, ((left, right), winner) in enumerate(record.items()):
            prompt = repo.add_prompt(s, f"prompt {n}").id
            answer = {
                side: repo.record_response(
                    s, prompt_id=prompt, model_version_id=ids[side], text=side
                )
                for side in (left, right)
            }
            repo.record_comparison_vote(
                s,
                response_left_id=answer[left].id,
                response_right_id=answer[right].id,
                winner=winner,
                annotator="ann",
            )


def test_reads_the_votes_of_one_base_model(sm):
    add_votes(sm, "model-a", {("v1", "base"): "left", ("base", "v2"): "tie", ("v2", "v1"): "right"})
    add_votes(sm, "model-b", {("v1", "base"): "right"})
    with sm.begin() as s:
        got = [(v.left, v.right, v.winner) for v in version_votes(s, "model-a")]
    assert got == [("v1", "base", "left"), ("base", "v2", "tie"), ("v2", "v1", "right")]
    board = current_leaderboard(sm, "model-a")
    assert board.total_votes == 3 and {r.version for r in board.ratings} == {"base", "v1", "v2"}
    rows = leaderboard_rows(board)
    assert rows[0]["rank"] == 1 and rows[0]["version"] == "v1"
    assert list(rows[0]) == [
        "rank",
        "version",
        "score (Elo)",
        "95% CI",
        "votes",
        "wins",
        "ties",
        "losses",
    ]
    assert next(r for r in rows if r["version"] == "base")["95% CI"] == "anchor"
    text = summary_markdown(board)
    assert "3** blind votes" in text and "base = 1000" in text and "Compare next" in text
