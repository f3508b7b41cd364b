"""Two Gradio apps in this process behind `launch_options` + `share_sign_in` on one database
(two replicas without a model): sessions, sign-out, password changes and the sign-in back-off
are shared through the database. The full app on PostgreSQL is tests/app/test_replicas.py."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import httpx
import pytest

from app.auth.users import UserStore
from app.auth.web import launch_options, share_sign_in
from storage.db import open_db
from tests.app.server import free_port, wait_until

PASSWORDS = {"ann": "ann-password-1", "bob": "bob-password-1"}
CACHE_S = 2.0  # SharedSessions' TTL: the longest another replica may still accept a session


def _replica(users_path: Path, db_url: str) -> tuple[gr.Blocks, str]:
    with gr.Blocks() as demo:
        gr.Textbox()
    options = launch_options(UserStore(users_path))
    share_sign_in(options, open_db(db_url))
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **options,
    )
    return demo, demo.local_url


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("shared-sessions")
    store = UserStore(work / "users.toml")
    for name, password in PASSWORDS.items():
        store.add(name, "annotator", password)
    db_url = f"sqlite:///{work / 'studio.db'}"
    demos = [_replica(work / "users.toml", db_url) for _ in range(2)]
    try:
        yield demos[0][1], demos[1][1], store, demos[1][0]
    finally:
        for demo, _ in demos:
            demo.close()


def _login(url: str, name: str, password: str) -> httpx.Response:
    return httpx.post(f"{url}login", data={"username": name, "password": password})


def _signed_in(url: str, cookies: httpx.Cookies) -> bool:
    return httpx.get(f"{url}config", cookies=cookies).status_code == 200


def test_a_session_made_on_a_works_on_b_and_gradio_agrees(replicas):
    a, b, _, demo_b = replicas
    cookies = _login(a, "ann", PASSWORDS["ann"]).cookies
    assert len(cookies) == 2  # Gradio's two cookies, with the same shared name on both
    assert _signed_in(a, cookies) and _signed_in(b, cookies)
    assert "ann" in demo_b.server_app.tokens.values()  # Gradio's own checks see it too
    assert not _signed_in(b, httpx.Cookies())


def test_sign_out_on_b_ends_the_session_on_a(replicas):
    a, b, _, _ = replicas
    cookies = _login(a, "ann", PASSWORDS["ann"]).cookies
    assert _signed_in(a, cookies)
    httpx.get(f"{b}logout", cookies=cookies)
    assert not _signed_in(b, cookies)  # at once on the replica that signed out
    wait_until(lambda: not _signed_in(a, cookies), 5 * CACHE_S, what="the sign-out on A")


def test_a_changed_password_ends_older_sessions(replicas):
    a, b, store, _ = replicas
    cookies = _login(b, "bob", PASSWORDS["bob"]).cookies
    assert _signed_in(a, cookies)
    store.add("bob", "annotator", "bob-password-2", replace=True)
    for url in (a, b):
        wait_until(lambda url=url: not _signed_in(url, cookies), 5 * CACHE_S, what="refusal")
    assert _signed_in(a, _login(a, "bob", "bob-password-2").cookies)


def test_failed_sign_ins_on_one_replica_slow_down_the_other(replicas):
    a, b, _, _ = replicas
    for _ in range(5):  # LoginThrottle.user_free
        assert _login(a, "ann", "wrong-password").status_code == 400
    r = _login(b, "ann", PASSWORDS["ann"])
    assert r.status_code == 429 and "Too many failed sign-ins" in r.json()["detail"]
