"""The label queue's order, a team-wide setting, and the uncertainty scores it reads.

- "least-labeled" (the default): each annotator gets the prompts they labeled least, then the
  prompts labeled least by everyone (`repo.next_prompt`).
- "uncertain-first": the same, but among prompts labeled equally often, those where the active
  version is least sure come first (smallest margin, `UncertaintyScore`); unscored prompts
  follow in the default order, so a labeler never waits for a score.

The order lives in the `settings` table, so every app replica uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Preference, Prompt, UncertaintyScore, now_utc
from storage.repo import insert_ignore
from storage.team_settings import read_setting, write_setting

QUEUE_ORDER_KEY = "queue_order"
LEAST_LABELED, UNCERTAIN_FIRST = "least-labeled", "uncertain-first"
QUEUE_ORDERS = (LEAST_LABELED, UNCERTAIN_FIRST)


@dataclass(frozen=True)
class PromptScore:
    """One prompt's margin for one version (>= 0, small = unsure), and which measure it is."""

    prompt_id: int
    margin: float
    measure: str


@dataclass(frozen=True)
class Candidate:
    prompt_id: int
    text: str


def queue_order(session: Session) -> str:
    """The label queue's order: LEAST_LABELED unless an admin chose otherwise."""
    value = read_setting(session, QUEUE_ORDER_KEY)
    return str(value) if value is not None else LEAST_LABELED


def set_queue_order(session: Session, order: str) -> None:
    """Set the queue order for every annotator (and every replica). ValueError for an unknown
    order, naming the known ones."""
    if order not in QUEUE_ORDERS:
        raise ValueError(f"unknown queue order {order!r}; choose one of {', '.join(QUEUE_ORDERS)}")
    write_setting(session, QUEUE_ORDER_KEY, order)


def record_scores(session: Session, version_id: int, scores: list[PromptScore]) -> int:
    """Store scores of `version_id`; a prompt already scored for it keeps its first score (two
    replicas scoring at once store one). Returns how many were new."""
    for score in scores:
        if not score.margin >= 0:
            raise ValueError(f"a margin is >= 0, got {score.margin} for prompt {score.prompt_id}")
    rows = [
        {
            "model_version_id": version_id,
            "prompt_id": s.prompt_id,
            "margin": s.margin,
            "measure": s.measure,
            "scored_at": now_utc(),
        }
        for s in scores
    ]
    return insert_ignore(session, UncertaintyScore, rows, ["model_version_id", "prompt_id"])


def unscored_window(
    session: Session, version_id: int, window: int, *, split: str = "train"
) -> list[Candidate]:
    """The prompts among the `window` least labeled overall (fewest votes, then oldest) that
    `version_id` has no score for: what the scorer should score next."""
    votes = (
        select(Preference.prompt_id, func.count().label("n"))
        .group_by(Preference.prompt_id)
        .subquery()
    )
    least_labeled = (
        select(Prompt.id, Prompt.text)
        .outerjoin(votes, votes.c.prompt_id == Prompt.id)
        .where(Prompt.split == split)
        .order_by(func.coalesce(votes.c.n, 0), Prompt.id)
        .limit(window)
    )
    rows = session.execute(least_labeled).all()
    scored = set(version_scores(session, version_id, [row.id for row in rows]))
    return [Candidate(row.id, row.text) for row in rows if row.id not in scored]


def version_scores(
    session: Session, version_id: int, prompt_ids: list[int] | None = None
) -> dict[int, float]:
    """Prompt id -> margin for the prompts scored for `version_id` (among `prompt_ids`)."""
    query = select(UncertaintyScore.prompt_id, UncertaintyScore.margin).where(
        UncertaintyScore.model_version_id == version_id
    )
    if prompt_ids is not None:
        query = query.where(UncertaintyScore.prompt_id.in_(prompt_ids))
    return dict(session.execute(query).tuples().all())
