"""The Label tab's API over HTTP (gradio_client) against a running app on the tiny model:
generate a pair, vote, the database rows; double votes; empty and huge prompts; the queue; the
plain `POST /api/vote` route."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from sqlalchemy import func, select

from storage.db import open_db
from storage.models import ModelVersion, Preference, Prompt, Response
from tests.app.server import start_app

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("label")
    server = start_app(str(tiny_model_dir), data_dir, "--dtype", "fp32", "--device", "cpu")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(app) -> Client:
    return Client(app.url, verbose=False)


@pytest.fixture(scope="module")
def sm(app):
    return open_db(app.db_url)


def _pair(client: Client, prompt: str | None = None, annotator: str = "ann") -> dict:
    return client.predict(prompt, annotator, api_name="/generate_pair")


def _ids(pair: dict) -> tuple[int, int]:
    a, b = pair["answers"]
    return a["response_id"], b["response_id"]


ENDPOINTS = [  # every tab's API names, used by scripts, bench/ and the README
    *("/generate_pair", "/vote", "/label_progress", "/generate_answer", "/verdict"),
    *("/train_start", "/train_status", "/train_cancel", "/train_history"),
    *("/list_versions", "/activate_version"),
    *("/compare", "/blind_pair", "/blind_vote", "/win_rates", "/compare_batch"),
    "/reward_accuracy",
    *("/data_stats", "/import_prompts", "/import_pairs", "/export_preferences"),
]


def test_every_endpoint_keeps_its_name(client):
    # Gradio names private UI events after their function too: a handler named `vote` would
    # take `/vote`, and the endpoint would silently become `/vote_4`.
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert [name for name in ENDPOINTS if name not in names] == []


def test_default_prompts_fill_the_queue_on_first_start(sm):
    with sm.begin() as s:
        sources = s.execute(select(Prompt.source, func.count()).group_by(Prompt.source)).all()
    assert dict(sources)["default"] >= 50


def test_generate_then_vote_stores_responses_and_the_preference(client, sm):
    pair = _pair(client, annotator="alice")
    assert pair["done"] and pair["version"] == "base"
    answers = pair["answers"]
    assert {a["temperature"] for a in answers} == {0.7, 1.0}  # one temperature per answer
    assert answers[0]["seed"] != answers[1]["seed"]
    with sm.begin() as s:
        rows = [s.get(Response, a["response_id"]) for a in answers]
        for row, shown in zip(rows, answers, strict=True):
            assert row.prompt_id == pair["prompt_id"]
            assert row.text == shown["text"]
            assert (row.temperature, row.top_p, row.seed) == (
                shown["temperature"],
                0.95,
                shown["seed"],
            )
            assert row.num_tokens == shown["num_tokens"]
            # the tiny random model (a few dozen tokens) may end an answer at once: 0 tokens
            assert row.num_tokens > 0 or row.text == ""
            assert row.max_new_tokens == 256 and row.latency_s > 0
            assert s.get(ModelVersion, row.model_version_id).name == "base"
    result = client.predict(*_ids(pair), "b", "alice", "", 4.5, api_name="/vote")
    assert result["new"] is True
    assert result["progress"]["mine"] == 1 and result["progress"]["by_choice"]["b"] == 1
    with sm.begin() as s:
        vote = s.get(Preference, result["preference_id"])
        assert vote.annotator == "alice" and vote.seconds_spent == 4.5
        winner = vote.response_b_id if vote.choice == "b" else vote.response_a_id
        assert winner == answers[1]["response_id"]  # "B is better" means the answer shown as B


def test_double_vote_and_retry_are_one_row(client, sm):
    pair = _pair(client, annotator="bob")
    a, b = _ids(pair)
    results: list[dict] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(client.predict(a, b, "a", "bob", api_name="/vote"))
        )
        for _ in range(2)
    ]  # a double click: two requests at once
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    retry = client.predict(b, a, "b", "bob", api_name="/vote")  # the same vote, other order
    assert sorted(r["new"] for r in results) == [False, True]
    assert retry["new"] is False
    assert len({r["preference_id"] for r in [*results, retry]}) == 1
    with sm.begin() as s:
        votes = s.scalars(select(Preference).where(Preference.annotator == "bob")).all()
    assert len(votes) == 1


def test_next_prompt_is_one_this_annotator_has_not_labeled(client):
    first = _pair(client, annotator="carol")
    client.predict(*_ids(first), "tie", "carol", api_name="/vote")
    second = _pair(client, annotator="carol")
    assert second["prompt_id"] != first["prompt_id"]


def test_empty_prompt_gets_a_clear_message(client):
    for prompt in ("", "   \n"):
        with pytest.raises(Exception, match="The prompt is empty"):
            _pair(client, prompt)


def test_bad_votes_get_clear_messages(client):
    pair = _pair(client)
    with pytest.raises(Exception, match="unknown choice 'maybe'"):
        client.predict(*_ids(pair), "maybe", "ann", api_name="/vote")
    with pytest.raises(Exception, match="no response with id 999999"):
        client.predict(_ids(pair)[0], 999_999, "a", "ann", api_name="/vote")
    with pytest.raises(Exception, match="name is too long"):
        client.predict(*_ids(pair), "a", "x" * 300, api_name="/vote")


def test_huge_prompt_is_cut_to_the_context_with_a_notice(client, sm):
    huge = "Tell me a story about the sea. " * 3300  # ~100,000 characters
    pair = _pair(client, huge)
    assert pair["done"]
    assert f"({len(huge.strip()):,} characters) is longer" in pair["notice"]
    assert "only its first" in pair["notice"]
    with sm.begin() as s:
        assert len(s.get(Prompt, pair["prompt_id"]).text) == len(huge.strip())  # kept whole


def test_typed_prompt_is_stored_as_typed_and_streams(client, sm):
    job = client.submit("Write a poem about <b>bold</b> moss.", "dave", api_name="/generate_pair")
    updates = list(job)
    assert len(updates) >= 2 and updates[-1]["done"]
    assert not updates[0]["done"] and updates[0]["answers"] == []
    with sm.begin() as s:
        prompt = s.get(Prompt, updates[-1]["prompt_id"])
    assert prompt.source == "typed" and prompt.text.startswith("Write a poem about <b>")


def test_progress_counts_mine_everyone_and_usable(client):
    progress = client.predict("alice", api_name="/label_progress")
    assert progress["mine"] == 1
    assert progress["everyone"] >= 3
    # a, b count as one usable pair each; the tie does not
    by = progress["by_choice"]
    assert progress["usable_pairs"] == by["a"] + by["b"]


def _post_vote(app, **body) -> httpx.Response:
    with httpx.Client(base_url=app.url, timeout=30) as http:
        return http.post("api/vote", json=body)


def test_plain_vote_route_stores_the_vote_once(app, client, sm):
    a, b = _ids(_pair(client, annotator="erin"))
    first = _post_vote(app, response_a_id=a, response_b_id=b, choice="a", annotator="erin")
    again = _post_vote(app, response_a_id=b, response_b_id=a, choice="b", annotator="erin")
    assert first.status_code == again.status_code == 200
    assert first.json()["new"] is True and again.json()["new"] is False
    assert first.json()["preference_id"] == again.json()["preference_id"]
    assert first.json()["progress"]["mine"] == 1
    with sm.begin() as s:
        vote = s.scalars(select(Preference).where(Preference.annotator == "erin")).one()
    assert (vote.response_a_id, vote.response_b_id, vote.choice) == (a, b, "a")


def test_plain_vote_route_answers_bad_requests_clearly(app, client, sm):
    a, b = _ids(_pair(client, annotator="frank"))
    cases = [
        ({"response_a_id": a, "response_b_id": b, "choice": "maybe"}, 400, "unknown choice"),
        ({"response_a_id": a, "response_b_id": 999_999, "choice": "a"}, 400, "999999"),
        ({"response_a_id": str(a), "response_b_id": b, "choice": "a"}, 400, "must be an integer"),
        ({"response_a_id": a, "response_b_id": b}, 400, "choice must be one of"),
    ]
    for body, status, message in cases:
        r = _post_vote(app, **body, annotator="frank")
        assert (r.status_code, message in r.json()["detail"]) == (status, True), (body, r.text)
    with httpx.Client(base_url=app.url, timeout=30) as http:
        not_json = http.post("api/vote", content=b"\xff\xfe not json")
        huge = http.post("api/vote", content=b"x" * 100_000)
        wrong_method = http.get("api/vote")
    assert not_json.status_code == 400 and "not JSON" in not_json.json()["detail"]
    assert huge.status_code == 413
    assert wrong_method.status_code == 405
    with sm.begin() as s:
        stored = s.scalars(select(Preference).where(Preference.annotator == "frank")).all()
    assert stored == []
