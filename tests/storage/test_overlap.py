"""Overlap: a judged pair goes to k different annotators and no more."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from storage.overlap import next_shared_pair, overlap_k, set_overlap_k
from storage.repo import record_preference
from tests.storage.test_repo import answers


def vote(session: Session, ids: tuple[int, int], who: str, choice: str = "a") -> None:
    record_preference(
        session, response_a_id=ids[0], response_b_id=ids[1], choice=choice, annotator=who
    )


def test_a_pair_goes_to_k_annotators_and_no_more(session: Session):
    x, y = answers(session, "Name a planet.", "Mars.", "A banana.")
    vote(session, (x, y), "ann")  # ann's own new pair: one vote
    handed = {}
    for who in ("bob", "cy", "dee"):
        handed[who] = next_shared_pair(session, who, k=3)
    assert handed["bob"] is not None and handed["bob"].response_ids == (x, y)
    assert handed["cy"] is not None  # 1 vote + bob's claim = 2 < 3
    assert handed["dee"] is None  # 1 vote + 2 claims: the pair is spoken for
    assert next_shared_pair(session, "ann", k=3) is None  # never your own pair again
    vote(session, (y, x), "bob", "b")  # bob votes, sides swapped: his claim becomes a vote
    assert next_shared_pair(session, "dee", k=3) is None
    vote(session, (x, y), "cy")
    assert next_shared_pair(session, "dee", k=3) is None  # three votes: done


def test_no_overlap_by_default_and_judges_do_not_count(session: Session):
    x, y = answers(session, "Name a planet.", "Mars.", "A banana.")
    vote(session, (x, y), "judge:embedded")
    assert overlap_k(session) == 1
    assert next_shared_pair(session, "bob", k=overlap_k(session)) is None
    assert next_shared_pair(session, "bob", k=2) is None  # a judge's vote starts no shared pair
    vote(session, (x, y), "ann")
    shared = next_shared_pair(session, "bob", k=2)
    assert shared is not None and shared.votes == 1 and shared.texts == ("Mars.", "A banana.")


def test_the_pair_closest_to_k_comes_first(session: Session):
    p = answers(session, "One?", "1a", "1b")
    q = answers(session, "Two?", "2a", "2b")
    vote(session, (p[0], p[1]), "ann")
    vote(session, (q[0], q[1]), "ann")
    vote(session, (q[0], q[1]), "bob")
    assert next_shared_pair(session, "cy", k=3).prompt == "Two?"


@pytest.mark.parametrize(
    ("k", "annotators", "message"),
    [(0, None, "1 or more"), (3, 2, "only 2 can label: choose at most 2"), (1.5, None, "whole")],
)
def test_a_bad_overlap_is_refused_with_a_reason(session: Session, k, annotators, message):
    with pytest.raises(ValueError, match=message):
        set_overlap_k(session, k, annotators)
    assert overlap_k(session) == 1


def test_overlap_is_a_team_setting(db):
    with db.begin() as s:
        set_overlap_k(s, 3, annotators=5)
    with db.begin() as s:
        assert overlap_k(s) == 3
