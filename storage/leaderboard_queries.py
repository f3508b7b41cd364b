"""The blind comparison votes between versions of one base model, one row per vote, for the
Compare tab's Bradley-Terry leaderboard (which resamples individual votes). Takes a session,
never commits."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session, aliased

from storage.models import ComparisonVote, ModelVersion, Response


@dataclass(frozen=True)
class VersionVote:
    """One blind vote: the versions shown left and right, and `left`, `right` or `tie`."""

    left: str
    right: str
    winner: str


def version_votes(session: Session, base_model: str) -> list[VersionVote]:
    """Every blind vote between two versions of `base_model`, oldest first."""
    left_answer, right_answer = aliased(Response), aliased(Response)
    left_version, right_version = aliased(ModelVersion), aliased(ModelVersion)
    rows = session.execute(
        select(left_version.name, right_version.name, ComparisonVote.winner)
        .join(left_answer, left_answer.id == ComparisonVote.response_left_id)
        .join(right_answer, right_answer.id == ComparisonVote.response_right_id)
        .join(left_version, left_version.id == left_answer.model_version_id)
        .join(right_version, right_version.id == right_answer.model_version_id)
        .where(left_version.base_model == base_model, right_version.base_model == base_model)
        .order_by(ComparisonVote.id)
    )
    return [VersionVote(left, right, winner) for left, right, winner in rows]
