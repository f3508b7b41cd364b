"""The real app (`python -m app --auth-file ...` on the tiny model) with sign-in: every named
endpoint refuses a request without a session, annotators are refused the admin-only ones with a
message saying so, and a vote (through Gradio's `/vote` or the plain `POST /api/vote`) is
recorded under the signed-in user's name."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from sqlalchemy import func, select

from app.auth.users import UserStore
from storage.db import open_db
from storage.models import Preference
from tests.app.server import start_app

pytestmark = pytest.mark.slow

ACCOUNTS = {"boss": ("admin", "boss-password-1"), "ann": ("annotator", "ann-password-1")}
# Endpoint -> keyword arguments for a harmless call. Every one must be in the app's API.
A_FILE = str(Path(__file__).resolve().parents[2] / "app" / "label" / "default_prompts.txt")
ADMIN_ONLY = {
    "/train_start": {"epochs": 1},
    "/train_cancel": {},
    "/import_prompts": {"file": handle_file(A_FILE)},
    "/import_pairs": {"file": handle_file(A_FILE)},
    "/export_preferences": {},
    "/activate_version": {"name": "base"},
    "/set_overlap": {"k": 2},
    "/export_version": {"name": "base", "fmt": "merged"},
}


@pytest.fixture(scope="module")
def app(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("auth-app")
    store = UserStore(work / "users.toml")
    for name, (role, password) in ACCOUNTS.items():
        store.add(name, role, password)
    server = start_app(
        str(tiny_model_dir), work / "data", "--dtype", "fp32", "--device", "cpu",
        "--auth-file", str(work / "users.toml"),
    )  # fmt: skip
    yield server
    server.stop()


def _client(app, name: str) -> Client:
    return Client(app.url, auth=(name, ACCOUNTS[name][1]), verbose=False)


@pytest.fixture(scope="module")
def named_endpoints(app) -> dict:
    return _client(app, "boss").view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_every_named_endpoint_refuses_a_request_without_session(app, named_endpoints):
    assert set(ADMIN_ONLY) <= set(named_endpoints)
    with httpx.Client(base_url=app.url, timeout=10) as http:
        for name in named_endpoints:
            for path in (f"gradio_api/call{name}", f"gradio_api/run{name}"):
                r = http.post(path, json={"data": []})
                assert r.status_code == 401, (path, r.status_code, r.text[:200])
        assert http.get("config").status_code == 401
        assert http.get("gradio_api/info").status_code == 401
        assert "Sign in" in http.get("").text


@pytest.mark.parametrize("endpoint", sorted(ADMIN_ONLY))
def test_annotator_is_refused_admin_only_endpoints(app, endpoint):
    with pytest.raises(AppError, match=r"Only an admin can .*'ann' \(annotator\)"):
        _client(app, "ann").predict(**ADMIN_ONLY[endpoint], api_name=endpoint)


def test_admin_may_call_them(app):
    result = _client(app, "boss").predict(**ADMIN_ONLY["/train_start"], api_name="/train_start")
    assert result["ok"] is False and "No usable preference pairs" in result["message"]
    assert "No training run" in _client(app, "boss").predict(api_name="/train_cancel")["message"]
    result = _client(app, "boss").predict("base", api_name="/activate_version")
    assert result == {
        "ok": True,
        "message": "base is already the active version.",
        "active": "base",
    }
    with pytest.raises(AppError, match="no usable preference pairs to export yet"):
        _client(app, "boss").predict(api_name="/export_preferences")


def test_overlap_is_bounded_by_the_team_and_everyone_reads_agreement(app):
    boss = _client(app, "boss")
    with pytest.raises(AppError, match="overlap 3 needs 3 annotators, but only 2 can label"):
        boss.predict(3, api_name="/set_overlap")
    with pytest.raises(AppError, match="1 or more"):
        boss.predict(0, api_name="/set_overlap")
    assert "judged by 2 annotators" in boss.predict(2, api_name="/set_overlap")
    report = _client(app, "ann").predict(api_name="/agreement")
    assert report["overlap_k"] == 2 and report["alpha"] is None
    assert boss.predict(1, api_name="/set_overlap").startswith("Overlap off")


def test_annotator_reads_the_counts_and_the_versions(app):
    stats = _client(app, "ann").predict(api_name="/data_stats")
    assert set(stats) == {"prompts", "responses", "votes", "by_annotator"}
    versions = _client(app, "ann").predict(api_name="/list_versions")
    assert [(v["version"], v["active"]) for v in versions] == [("base", True)]


def test_a_vote_is_recorded_under_the_signed_in_user_not_the_claimed_name(app):
    ann = _client(app, "ann")
    pairs = [ann.predict("Name a river.", "", api_name="/generate_pair") for _ in range(2)]
    ids = [tuple(a["response_id"] for a in pair["answers"]) for pair in pairs]
    ann.predict(*ids[0], "a", "mallory", api_name="/vote")  # Gradio's endpoint
    with httpx.Client(base_url=app.url, cookies=ann.cookies, timeout=30) as http:
        body = {"response_a_id": ids[1][0], "response_b_id": ids[1][1], "choice": "b"}
        r = http.post("api/vote", json={**body, "annotator": "mallory"})  # the plain route
    assert r.status_code == 200, r.text
    assert r.json()["new"] is True and r.json()["progress"]["mine"] == 2
    with open_db(app.db_url).begin() as s:
        voters = s.scalars(select(Preference.annotator)).all()
    assert voters == ["ann", "ann"]


def test_the_plain_vote_route_refuses_a_request_without_session(app):
    with httpx.Client(base_url=app.url, timeout=10) as http:
        r = http.post("api/vote", json={"response_a_id": 1, "response_b_id": 2, "choice": "a"})
    assert r.status_code == 401
    with open_db(app.db_url).begin() as s:
        assert s.scalar(select(func.count()).select_from(Preference).where(
            Preference.annotator != "ann")) == 0  # fmt: skip
