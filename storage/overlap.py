"""Overlap: each pair of answers judged by k annotators, so their agreement can be measured.

With k > 1 an annotator's queue first offers pairs that others already judged and that still
have fewer than k votes (the pair closest to k first), then new prompts. Handing a pair out
records a claim: until the person votes (or the claim is older than `CLAIM_TTL`), it counts as
a pending vote, so a pair with k - 1 votes is not handed to two people at once. Votes by models
(AI judges, a version's own labels: storage/annotators.py) neither count towards k nor start a
shared pair.

k is a team-wide setting in the database (`settings` table), so every app replica uses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import and_, case, exists, func, select
from sqlalchemy.orm import Session

from storage.annotators import JUDGE_PREFIX as JUDGE_PREFIX  # app/label/service.py's import
from storage.annotators import person_filter
from storage.models import PairClaim, Preference, Prompt, Response, now_utc
from storage.team_settings import read_setting, write_setting

OVERLAP_KEY = "overlap_k"
CLAIM_TTL = timedelta(minutes=15)  # a claim left by someone who walked away expires


@dataclass(frozen=True)
class SharedPair:
    """A pair of stored answers others judged, to be shown again (sides drawn by the caller)."""

    prompt_id: int
    prompt: str
    response_ids: tuple[int, int]  # (lower id, higher id)
    texts: tuple[str, str]
    votes: int


def overlap_k(session: Session) -> int:
    """How many annotators judge each pair (1: no overlap)."""
    value = read_setting(session, OVERLAP_KEY)
    return int(value) if value is not None else 1


def set_overlap_k(session: Session, k: int, annotators: int | None = None) -> None:
    """Set k; `annotators` (the number of people who can label) bounds it when known.

    Raises ValueError with a message for the admin."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"overlap must be a whole number of annotators, 1 or more; got {k!r}")
    if annotators is not None and k > annotators:
        raise ValueError(
            f"overlap {k} needs {k} annotators, but only {annotators} can label: "
            f"choose at most {annotators}"
        )
    write_setting(session, OVERLAP_KEY, k)


def next_shared_pair(session: Session, annotator: str, k: int) -> SharedPair | None:
    """The pair `annotator` should judge next to bring a pair to k votes, claimed for them;
    None when there is none (or k is 1)."""
    if k <= 1:
        return None
    pref, claim = Preference, PairClaim
    same_unit = and_(
        pref.response_a_id == claim.response_a_id, pref.response_b_id == claim.response_b_id
    )
    pending = (
        select(claim.response_a_id, claim.response_b_id, func.count().label("n"))
        .where(claim.annotator != annotator, claim.claimed_at > now_utc() - CLAIM_TTL)
        .where(~exists().where(same_unit, pref.annotator == claim.annotator))
        .group_by(claim.response_a_id, claim.response_b_id)
        .subquery()
    )
    mine = func.sum(case((pref.annotator == annotator, 1), else_=0))
    votes = func.count()
    query = (
        select(pref.response_a_id, pref.response_b_id, votes.label("votes"))
        .where(person_filter(pref.annotator))
        .outerjoin(
            pending,
            and_(
                pending.c.response_a_id == pref.response_a_id,
                pending.c.response_b_id == pref.response_b_id,
            ),
        )
        .group_by(pref.response_a_id, pref.response_b_id, pending.c.n)
        .having(mine == 0, votes + func.coalesce(pending.c.n, 0) < k)
        .order_by(votes.desc(), func.min(pref.id))
        .limit(1)
    )
    row = session.execute(query).first()
    if row is None:
        return None
    claim_pair(session, annotator, (row.response_a_id, row.response_b_id))
    return _shared_pair(session, (row.response_a_id, row.response_b_id), row.votes)


def claim_pair(session: Session, annotator: str, ids: tuple[int, int]) -> None:
    claim = session.scalars(
        select(PairClaim).filter_by(response_a_id=ids[0], response_b_id=ids[1], annotator=annotator)
    ).first()
    if claim is None:
        claim = PairClaim(response_a_id=ids[0], response_b_id=ids[1], annotator=annotator)
    claim.claimed_at = now_utc()
    session.add(claim)
    session.flush()


def _shared_pair(session: Session, ids: tuple[int, int], votes: int) -> SharedPair:
    first, second = (session.get_one(Response, i) for i in ids)
    prompt = session.get_one(Prompt, first.prompt_id)
    return SharedPair(prompt.id, prompt.text, ids, (first.text, second.text), votes)
