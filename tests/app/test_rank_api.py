"""Rankings over HTTP (gradio_client) against a running app on the tiny model: `/generate_answers`
writes 3 stored answers, `/rank` stores the order and its implied pairs; a retry is one ranking;
a bad order is a clear error that stores nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from gradio_client import Client
from sqlalchemy import func, select

from storage.db import open_db
from storage.models import Preference, Ranking, Response
from tests.app.server import start_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("rank")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def sm(app):
    return open_db(app.db_url)


def _ids(answers: dict) -> list[int]:
    return [a["response_id"] for a in answers["answers"]]


def test_the_ranking_endpoints_keep_their_names(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/generate_answers", "/rank", "/generate_pair", "/vote"} <= names


def test_three_answers_then_a_ranking_stores_the_order_and_its_pairs(client, sm):
    answers = client.predict(None, 3, "carol", api_name="/generate_answers")
    assert answers["done"] and len(answers["answers"]) == 3
    assert sorted(a["temperature"] for a in answers["answers"]) == [0.7, 0.85, 1.0]
    a, b, c = _ids(answers)
    result = client.predict([b, c, a], "carol", 12.0, api_name="/rank")
    assert (result["new"], result["pairs"]) == (True, 3)
    assert result["progress"]["mine"] == 3  # three implied pairs count as three votes
    with sm.begin() as s:
        ranking = s.get_one(Ranking, result["ranking_id"])
        assert (ranking.response_ids, ranking.seconds_spent) == ([b, c, a], 12.0)
        assert ranking.prompt_id == answers["prompt_id"] == s.get_one(Response, a).prompt_id
        votes = s.scalars(select(Preference).where(Preference.ranking_id == ranking.id)).all()
        winners = {v.response_a_id if v.choice == "a" else v.response_b_id for v in votes}
        assert len(votes) == 3 and winners == {b, c}
        assert {v.seconds_spent for v in votes} == {4.0}
    retry = client.predict([b, c, a], "carol", 12.0, api_name="/rank")
    assert (retry["new"], retry["pairs"], retry["ranking_id"]) == (False, 0, result["ranking_id"])


def test_a_bad_order_is_a_clear_error_and_stores_nothing(client, sm):
    answers = client.predict("Name four seas.", 4, "dan", api_name="/generate_answers")
    ids = _ids(answers)
    assert len(ids) == 4
    with pytest.raises(Exception, match="a ranking orders 3 or 4 answers, got 2"):
        client.predict(ids[:2], "dan", api_name="/rank")
    with pytest.raises(Exception, match="is ranked twice"):
        client.predict([ids[0], ids[1], ids[0]], "dan", api_name="/rank")
    with pytest.raises(Exception, match="rank 3 or 4 answers, not 5"):
        client.predict(None, 5, "dan", api_name="/generate_answers")
    with sm.begin() as s:
        assert s.scalar(select(func.count()).where(Ranking.annotator == "dan")) == 0
        assert s.scalar(select(func.count()).where(Preference.annotator == "dan")) == 0
