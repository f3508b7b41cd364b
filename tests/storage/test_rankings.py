"""Rankings of 3-4 answers: the stored order, its implied pairs (ordinary votes that selection,
agreement and training read unchanged), the errors for a bad order, the schema-2 upgrade and
pairs per minute in `python -m storage stats`."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.__main__ import main
from storage.agreement import load_judgements
from storage.db import open_db
from storage.models import SCHEMA_VERSION, Preference, Ranking, SchemaInfo
from storage.rankings import (
    PAIR_SCREEN,
    RANKING_SCREEN,
    implied_pairs,
    labeling_rates,
    record_ranking,
)
from storage.repo import preference_pairs, record_preference
from storage.selection import VoteSelection
from tests.storage.test_db import downgrade
from tests.storage.test_repo import answers


def test_implied_pairs_are_every_two_answers_best_first():
    assert implied_pairs([7, 5, 9]) == [(7, 5), (7, 9), (5, 9)]
    assert len(implied_pairs([1, 2, 3, 4])) == 6


def test_a_ranking_stores_its_order_and_its_pairs_as_votes(session: Session):
    best, worst, middle = answers(session, "Name a planet.", "Mars.", "A banana.", "Pluto?")
    recorded = record_ranking(
        session, response_ids=[best, middle, worst], annotator=" ann ", seconds_spent=9.0
    )
    assert (recorded.created, recorded.pairs) == (True, 3)
    ranking = session.get_one(Ranking, recorded.ranking_id)
    assert (ranking.annotator, ranking.response_ids) == ("ann", [best, middle, worst])
    assert ranking.prompt_id == recorded.prompt_id and ranking.seconds_spent == 9.0
    votes = session.scalars(select(Preference).order_by(Preference.id)).all()
    assert {v.ranking_id for v in votes} == {ranking.id}
    assert [v.seconds_spent for v in votes] == [3.0, 3.0, 3.0]  # 9 s over 3 pairs
    assert all(v.left_response_id is None for v in votes)  # no sides were shown
    won = {(v.response_a_id, v.response_b_id, v.choice) for v in votes}
    # stored with the lower id as `a`: best (lowest id) beats both, middle beats worst
    assert won == {(best, worst, "a"), (best, middle, "a"), (worst, middle, "b")}
    pairs = preference_pairs(session, selection=VoteSelection(votes="every")).pairs
    assert {(p.chosen, p.rejected) for p in pairs} == {
        ("Mars.", "A banana."),
        ("Mars.", "Pluto?"),
        ("Pluto?", "A banana."),
    }
    assert {j.value for j in load_judgements(session)} <= {"first", "second"}


def test_four_answers_give_six_pairs(session: Session):
    ids = answers(session, "Say hi.", "Hi!", "Hello.", "Hey.", "Yo.")
    recorded = record_ranking(session, response_ids=ids[::-1], annotator="ann")
    assert recorded.pairs == 6
    assert len(preference_pairs(session).pairs) == 6


def test_ranking_twice_is_one_ranking_and_a_voted_pair_keeps_its_vote(session: Session):
    x, y, z = answers(session, "Name a colour.", "Red.", "Blue.", "Seven.")
    record_preference(session, response_a_id=z, response_b_id=x, choice="a", annotator="ann")
    first = record_ranking(session, response_ids=[x, y, z], annotator="ann")
    again = record_ranking(session, response_ids=[z, y, x], annotator="ann")  # a retry
    assert (first.created, first.pairs) == (True, 2)  # (x, z) was voted on before
    assert (again.created, again.pairs, again.ranking_id) == (False, 0, first.ranking_id)
    assert session.get_one(Ranking, first.ranking_id).response_ids == [x, y, z]
    [earlier] = session.scalars(select(Preference).where(Preference.ranking_id.is_(None))).all()
    assert earlier.choice == "b"  # z (shown as A, the higher id) won: the vote stays
    other = record_ranking(session, response_ids=[y, x, z], annotator="bob")
    assert (other.created, other.pairs) == (True, 3)  # someone else ranks the same answers


@pytest.mark.parametrize(
    ("order", "message"),
    [
        ("two", "a ranking orders 3 or 4 answers, got 2"),
        ("five", "a ranking orders 3 or 4 answers, got 5"),
        ("repeat", "is ranked twice: name each answer once"),
        ("unknown", "no response with id 999"),
        ("other prompt", "the ranked answers answer different prompts"),
    ],
)
def test_a_bad_order_is_refused_and_nothing_is_stored(session: Session, order: str, message: str):
    ids = answers(session, "Count to three.", "1 2 3", "one two three", "3 2 1", "1", "2")
    [elsewhere] = answers(session, "Another prompt.", "Other.")
    orders = {
        "two": ids[:2],
        "five": ids,
        "repeat": [ids[0], ids[1], ids[0]],
        "unknown": [ids[0], ids[1], 999],
        "other prompt": [ids[0], ids[1], elsewhere],
    }
    with pytest.raises(ValueError, match=message):
        record_ranking(session, response_ids=orders[order], annotator="ann")
    assert session.scalars(select(Preference)).all() == []
    assert session.scalars(select(Ranking)).all() == []


def test_answers_to_another_prompt_than_the_one_shown_are_refused(session: Session):
    ids = answers(session, "Name a river.", "Nile.", "Thames.", "Banana.")
    with pytest.raises(ValueError, match="not answers to prompt 12345"):
        record_ranking(session, response_ids=ids, annotator="ann", prompt_id=12345)
    with pytest.raises(ValueError, match="annotator name is empty"):
        record_ranking(session, response_ids=ids, annotator="  ")
    with pytest.raises(ValueError, match="seconds_spent must be >= 0"):
        record_ranking(session, response_ids=ids, annotator="ann", seconds_spent=-1)


def test_pairs_per_minute_of_each_screen(db: sessionmaker[Session], db_url: str, capsys):
    with db.begin() as s:
        a, b = answers(s, "Pick one.", "This.", "That.")
        record_preference(
            s, response_a_id=a, response_b_id=b, choice="a", annotator="ann", seconds_spent=30
        )
        c, d = answers(s, "Pick again.", "Here.", "There.")
        record_preference(
            s, response_a_id=c, response_b_id=d, choice="tie", annotator="ann", seconds_spent=30
        )
        ids = answers(s, "Rank these.", "One.", "Two.", "Three.", "Four.")
        record_ranking(s, response_ids=ids, annotator="ann", seconds_spent=90)
        record_ranking(s, response_ids=ids[:3], annotator="judge:bot", seconds_spent=1)
        rates = {r.screen: r for r in labeling_rates(s)}
    pair, ranked = rates[PAIR_SCREEN], rates[RANKING_SCREEN]
    assert (pair.labels, pair.pairs, pair.usable_pairs, pair.seconds) == (2, 2, 1, 60.0)
    assert (pair.pairs_per_minute, pair.usable_per_minute) == (2.0, 1.0)
    assert (ranked.labels, ranked.pairs, ranked.seconds) == (1, 6, 90.0)  # the judge left out
    assert ranked.pairs_per_minute == 4.0
    assert main(["stats", "--db", db_url]) == 0
    out = capsys.readouterr().out
    assert "pairs per minute, 2 answers: 2.0 (1.0 usable for training; 2 pairs" in out
    assert "pairs per minute, rankings: 4.0 (4.0 usable for training; 6 pairs from 1" in out


def test_a_schema_2_database_gains_the_ranking_column_and_keeps_its_votes(db_url: str):
    """A database from before rankings (schema 2) opens, gains `preferences.ranking_id` and
    the rankings table, keeps its votes, and takes rankings."""
    sm = open_db(db_url)
    with sm.begin() as s:
        x, y, z = answers(s, "Name a planet.", "Mars.", "A banana.", "Venus.")
        record_preference(s, response_a_id=x, response_b_id=y, choice="a", annotator="old")
    sm.kw["bind"].dispose()
    downgrade(db_url, 2, drop_tables=("rankings",))  # back to schema 2
    sm = open_db(db_url)
    with sm.begin() as s:
        assert s.get_one(SchemaInfo, 1).version == SCHEMA_VERSION == 4
        [old] = s.scalars(select(Preference)).all()
        assert (old.annotator, old.choice, old.ranking_id) == ("old", "a", None)
        recorded = record_ranking(s, response_ids=[z, x, y], annotator="new")
        assert recorded.pairs == 3
    sm.kw["bind"].dispose()
