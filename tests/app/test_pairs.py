"""The pairs a run reads from storage."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.train.pairs import stored_pairs
from storage.repo import record_preference
from tests.storage.conftest import db, db_url, session  # noqa: F401 - fixtures
from tests.storage.test_repo import answers


def test_a_vote_beside_an_empty_answer_is_counted_not_trained(session: Session):  # noqa: F811
    """The model can answer with nothing; a vote against it is stored, but the pair cannot
    train (every later run would fail at the pair check), so it is counted apart."""
    for i, texts in enumerate([("Mars.", ""), ("Venus.", "A banana."), ("  ", "Earth.")]):
        x, y = answers(session, f"Question {i}?", *texts)
        record_preference(session, response_a_id=x, response_b_id=y, choice="a", annotator="a")
    pairs = stored_pairs(session, heldout_fraction=0.0, min_heldout=1)
    assert [p["chosen"] for p in pairs.train] == ["Venus."]
    assert pairs.empty == 2
