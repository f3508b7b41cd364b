"""Rankings: one person orders 3 or 4 answers to one prompt, best first.

A ranking r1 > r2 > ... > rk is stored twice over: as one `Ranking` row (the order, who, how long)
and as its k(k-1)/2 implied pairs (ri chosen over rj for every i < j), each an ordinary
`Preference` row with `ranking_id` set. 3 answers give 3 pairs, 4 answers give 6.

Why implied pairs rather than a listwise loss (the Plackett-Luce form of DPO, Rafailov et al.
2023, appendix A.3; LiPO, Liu et al. 2024): every part of the product already works on pairs.
The DPO-family losses, the vote selection (majority / unanimous / every), agreement (alpha, AC1,
agreement with the majority), the export and the Train tab's pair count read implied pairs
unchanged, and a pair from a ranking can agree or disagree with someone's 2-answer vote on the
same two answers. A listwise loss would need its own batch layout, selection and agreement
rules, for a gain nobody here has measured.

A caveat: the implied pairs of one ranking are correlated. They are one judgement of k answers,
not k(k-1)/2 independent votes: one misread answer flips up to k-1 pairs at once, and agreement
statistics count each pair as if it were a vote. Read "pairs per minute" (`labeling_rates`) as
pairs for the loss, not as independent evidence.

Time: a ranking's `seconds_spent` (its answers complete -> its order complete) is split evenly
over its pairs, so the seconds of an annotator's votes still add up to the time they spent.

Functions take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.annotators import person_filter
from storage.models import Preference, Ranking, Response, now_utc
from storage.repo import _usable_pairs, insert_ignore

MIN_ANSWERS, MAX_ANSWERS = 3, 4
PAIR_SCREEN, RANKING_SCREEN = "2 answers", "rankings"


@dataclass(frozen=True)
class RecordedRanking:
    """`record_ranking`'s result."""

    ranking_id: int
    created: bool  # False: this annotator had already ranked these answers (first order kept)
    pairs: int  # implied pairs stored by this call (0 for a repeat)
    prompt_id: int


@dataclass(frozen=True)
class LabelingRate:
    """What one labeling screen gave per minute of annotator time (votes with a time only)."""

    screen: str  # PAIR_SCREEN or RANKING_SCREEN
    labels: int  # votes, or rankings
    pairs: int  # pairs judged: one per vote, k(k-1)/2 per ranking
    usable_pairs: int  # training pairs they give on their own
    seconds: float

    @property
    def pairs_per_minute(self) -> float | None:
        return self.pairs * 60 / self.seconds if self.seconds > 0 else None

    @property
    def usable_per_minute(self) -> float | None:
        return self.usable_pairs * 60 / self.seconds if self.seconds > 0 else None


def implied_pairs(response_ids: Sequence[int]) -> list[tuple[int, int]]:
    """(winner, loser) for every two answers of an order, best first: k(k-1)/2 pairs."""
    return list(combinations(response_ids, 2))


def check_ranking(
    session: Session, response_ids: Sequence[int], prompt_id: int | None = None
) -> int:
    """The prompt the ranked answers answer; ValueError saying what is wrong with the order:
    not 3-4 answers, an answer twice, an unknown answer, answers to different prompts (or not
    to `prompt_id`)."""
    ids = list(response_ids)
    if not MIN_ANSWERS <= len(ids) <= MAX_ANSWERS:
        raise ValueError(
            f"a ranking orders {MIN_ANSWERS} or {MAX_ANSWERS} answers, got {len(ids)}: "
            "name every answer shown, best first"
        )
    repeated = sorted({rid for rid in ids if ids.count(rid) > 1})
    if repeated:
        raise ValueError(f"answer {repeated[0]} is ranked twice: name each answer once")
    found = dict(
        session.execute(select(Response.id, Response.prompt_id).where(Response.id.in_(ids))).all()
    )
    missing = [rid for rid in ids if rid not in found]
    if missing:
        raise ValueError(f"no response with id {missing[0]}")
    prompts = set(found.values())
    if len(prompts) > 1:
        raise ValueError("the ranked answers answer different prompts: rank answers to one prompt")
    if prompt_id is not None and prompts != {prompt_id}:
        raise ValueError(f"the ranked answers are not answers to prompt {prompt_id}")
    return prompts.pop()


def record_ranking(
    session: Session,
    *,
    response_ids: Sequence[int],
    annotator: str,
    seconds_spent: float | None = None,
    prompt_id: int | None = None,
) -> RecordedRanking:
    """Record an order of 3-4 answers (best first) and its implied pairs.

    Idempotent: the same annotator ranking the same answers again (double click, retry) leaves
    the first ranking as it is. An implied pair this annotator had already voted on keeps that
    vote (one vote per person and pair), so `pairs` may be fewer than k(k-1)/2.
    """
    ids = [int(rid) for rid in response_ids]
    prompt = check_ranking(session, ids, prompt_id)
    annotator = annotator.strip()
    if not annotator:
        raise ValueError("the annotator name is empty")
    if seconds_spent is not None and not seconds_spent >= 0:
        raise ValueError(f"seconds_spent must be >= 0, got {seconds_spent}")
    key = {"annotator": annotator, "answers_key": ",".join(map(str, sorted(ids)))}
    row = {
        **key,
        "prompt_id": prompt,
        "response_ids": ids,
        "seconds_spent": seconds_spent,
        "created_at": now_utc(),
    }
    created = insert_ignore(session, Ranking, [row], list(key)) == 1
    ranking = session.scalars(select(Ranking).filter_by(**key)).one()
    pairs = _store_pairs(session, ranking) if created else 0
    return RecordedRanking(ranking.id, created, pairs, prompt)


def _store_pairs(session: Session, ranking: Ranking) -> int:
    """The ranking's implied pairs as votes, in stored order (lower response id as `a`); no
    side was shown, so `left_response_id` stays NULL (position bias does not apply)."""
    pairs = implied_pairs(ranking.response_ids)
    seconds = None if ranking.seconds_spent is None else ranking.seconds_spent / len(pairs)
    rows = [
        {
            "annotator": ranking.annotator,
            "response_a_id": min(winner, loser),
            "response_b_id": max(winner, loser),
            "prompt_id": ranking.prompt_id,
            "choice": "a" if winner < loser else "b",
            "rewrite": None,
            "seconds_spent": seconds,
            "created_at": ranking.created_at,
            "left_response_id": None,
            "ranking_id": ranking.id,
        }
        for winner, loser in pairs
    ]
    return insert_ignore(session, Preference, rows, ["annotator", "response_a_id", "response_b_id"])


def labeling_rates(session: Session) -> list[LabelingRate]:
    """Pairs per minute of annotator time on the 2-answer screen and in rankings, from people's
    timed votes (models' votes and imported ones are left out)."""
    people = person_filter(Preference.annotator)
    votes = session.execute(
        select(func.count(), func.sum(_usable_pairs()), func.sum(Preference.seconds_spent)).where(
            people, Preference.ranking_id.is_(None), Preference.seconds_spent.is_not(None)
        )
    ).one()
    ranked = session.execute(
        select(func.count(), func.sum(Ranking.seconds_spent)).where(
            person_filter(Ranking.annotator), Ranking.seconds_spent.is_not(None)
        )
    ).one()
    implied = session.scalar(
        select(func.count())
        .select_from(Preference)
        .join(Ranking, Ranking.id == Preference.ranking_id)
        .where(people, Ranking.seconds_spent.is_not(None))
    )
    return [
        LabelingRate(PAIR_SCREEN, votes[0], votes[0], int(votes[1] or 0), float(votes[2] or 0)),
        LabelingRate(RANKING_SCREEN, ranked[0], implied or 0, implied or 0, float(ranked[1] or 0)),
    ]
