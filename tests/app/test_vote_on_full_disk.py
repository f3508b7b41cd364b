"""A vote the database cannot store (the disk is full) gets a clear message, and nothing that
was stored before is lost. Real SQLite: its file is capped with `max_page_count`, which makes
writes fail with SQLITE_FULL ("database or disk is full") as a full disk does."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from app.label.service import LabelService
from storage import repo
from storage.db import WriteError, open_db
from storage.models import Preference


def _answers(sm, prompt: str, text: str = "answer") -> tuple[int, int]:
    with sm.begin() as s:
        prompt_id = repo.add_prompt(s, prompt).id
        a = repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=text + " A")
        b = repo.record_response(s, prompt_id=prompt_id, model_version_id=None, text=text + " B")
        return a.id, b.id


def _cap_file_size(sm) -> None:
    """From now on the database file may not grow (new connections get the cap)."""
    engine = sm.kw["bind"]
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    @event.listens_for(engine, "connect")
    def cap(dbapi_connection, _record) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    engine.dispose()


def test_a_vote_on_a_full_disk_says_so_and_loses_nothing(tmp_path: Path):
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    service = LabelService(sm, models=None, base_model="tiny")  # voting needs no model
    first = _answers(sm, "Name a fruit.")
    assert service.vote("ann", *first, "a").new
    big = _answers(sm, "Describe the sea.", "waves " * 2000)
    _cap_file_size(sm)

    with pytest.raises(WriteError) as caught:
        service.vote("ann", *big, "b", rewrite="a much better answer " * 5000)
    message = str(caught.value)
    assert message.startswith("Your vote could not be saved: the disk is full.")
    assert "Traceback" not in message and len(message) < 300

    with sm.begin() as s:  # the earlier vote is intact, the failed one left nothing behind
        assert s.scalar(select(func.count()).select_from(Preference)) == 1
    sm.kw["bind"].dispose()
    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")  # room again: the same vote goes in
    assert LabelService(sm, models=None, base_model="tiny").vote("ann", *big, "b").new


def test_the_plain_vote_route_answers_503_with_the_message(tmp_path: Path):
    from starlette.responses import PlainTextResponse
    from starlette.testclient import TestClient

    from app.label.route import VoteRoute

    sm = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    big = _answers(sm, "Describe the sea.", "waves " * 2000)
    _cap_file_size(sm)
    route = VoteRoute(PlainTextResponse("not here", 404), LabelService(sm, None, "tiny"))
    body = {"response_a_id": big[0], "response_b_id": big[1], "choice": "a"}
    http = TestClient(route)  # no `with`: the stand-in app has no lifespan events
    r = http.post("/api/vote", json={**body, "rewrite": "a much better answer " * 3000})
    other = http.get("/somewhere")
    assert r.status_code == 503
    assert r.json()["detail"].startswith("Your vote could not be saved: the disk is full.")
    assert other.status_code == 404  # everything else passes through
    with sm.begin() as s:
        assert s.scalar(select(func.count()).select_from(Preference)) == 0
