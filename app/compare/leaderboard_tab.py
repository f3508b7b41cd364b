"""The leaderboard in the Compare tab and `/leaderboard`: every version of the served base
model rated by a Bradley-Terry fit over all blind votes (`app.compare.leaderboard`)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import gradio as gr
import pandas as pd
from sqlalchemy.orm import Session, sessionmaker

from app.compare.leaderboard import Leaderboard, Vote, fit_leaderboard
from storage import runs
from storage.leaderboard_queries import version_votes

COLUMNS = ["rank", "version", "score (Elo)", "95% CI", "votes", "wins", "ties", "losses"]
FEW_VOTES = 10  # below this a bootstrap interval understates the uncertainty


def current_leaderboard(sm: sessionmaker[Session], base_model: str) -> Leaderboard:
    """Fit the leaderboard on every stored blind vote between versions of `base_model`."""
    with sm.begin() as s:
        votes = [Vote(v.left, v.right, v.winner) for v in version_votes(s, base_model)]
        names = [v.name for v in runs.list_versions(s, base_model)]
    return fit_leaderboard(votes, names)


def leaderboard_rows(board: Leaderboard) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank,
            "version": r.version,
            "score (Elo)": round(r.score),
            "95% CI": "anchor" if r.low == r.high == r.score else f"{r.low:.0f}–{r.high:.0f}",
            "votes": r.votes,
            "wins": r.wins,
            "ties": r.ties,
            "losses": r.losses,
        }
        for rank, r in enumerate(board.ratings, 1)
    ]


def summary_markdown(board: Leaderboard) -> str:
    """What the table means, and which pair to compare next."""
    if not board.ratings:
        text = "No blind votes yet: vote in the **Blind** tab and the versions get rated here."
    else:
        text = (
            f"Bradley–Terry fit over **{board.total_votes}** blind votes (ties count half). "
            f"Scores on the Elo scale, anchored at **{board.anchor}**: 100 points more means "
            "winning 64% of votes. Intervals: 95% bootstrap over votes."
        )
        if any(r.votes < FEW_VOTES for r in board.ratings):
            text += (
                f" Versions with fewer than {FEW_VOTES} votes have intervals that are too narrow."
            )
    if board.unrated:
        text += f"\n\nNo votes yet: {', '.join(board.unrated)}."
    s = board.suggestion
    if s is not None:
        why = (
            "it has no votes yet"
            if s.p_first_above is None
            else f"{s.first} ranks above {s.second} in only {100 * s.p_first_above:.0f}% "
            "of bootstrap refits"
        )
        text += f"\n\n**Compare next: {s.first} vs {s.second}** ({why})."
    return text


def register_api(sm: sessionmaker[Session], base_model: str) -> None:
    """/leaderboard (anyone signed in)."""

    def leaderboard() -> dict[str, Any]:
        """Bradley-Terry ratings of every version from all blind votes: {anchor, total_votes,
        ratings: [{version, score, low, high, votes, wins, ties, losses}], unrated,
        suggestion: {first, second, p_first_above} | null}. Best first."""
        return asdict(current_leaderboard(sm, base_model))

    gr.api(leaderboard, api_name="leaderboard")


def build_leaderboard(
    sm: sessionmaker[Session], base_model: str, tab_block: gr.Tab | None = None
) -> None:
    """Declare the Leaderboard sub-tab (inside the open Compare tab) and wire its events."""

    def refresh() -> tuple[pd.DataFrame, str]:
        board = current_leaderboard(sm, base_model)
        return pd.DataFrame(leaderboard_rows(board), columns=COLUMNS), summary_markdown(board)

    with gr.Tab("Leaderboard", elem_id="leaderboard-tab") as own_tab:
        summary = gr.Markdown(elem_id="leaderboard-summary")
        table = gr.Dataframe(
            pd.DataFrame([], columns=COLUMNS), interactive=False, elem_id="leaderboard-table"
        )
        button = gr.Button("Refresh", elem_id="leaderboard-refresh")
    private = {"api_visibility": "private", "show_progress": "hidden"}
    for event in (own_tab.select, button.click, *([tab_block.select] if tab_block else [])):
        event(refresh, outputs=[table, summary], **private)
