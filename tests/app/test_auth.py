"""Sign-in and roles: hashed storage, the users CLI, login throttling, and a live server where
every Gradio route refuses a request without a session."""

from __future__ import annotations

import io
import logging
import re
import socket
import stat
from pathlib import Path

import gradio as gr
import httpx
import pytest
from fastapi.routing import _IncludedRouter
from gradio_client import Client
from gradio_client.exceptions import AppError

from app.__main__ import main as app_main
from app.auth.users import (
    AuthFileError,
    UserStore,
    annotator_name,
    hash_password,
    parse_users,
    require_role,
    verify_password,
)
from app.auth.web import LoginThrottle, is_loopback, launch_options, warn_if_exposed

PASSWORDS = {"alice": "alice-secret-1", "bob": "bob-secret-12", "carol": "carol-secret-3"}
PASSWORDS["dave"] = "dave-secret-44"
ROLES = {"alice": "admin", "bob": "annotator", "carol": "annotator", "dave": "admin"}


# ---- hashed storage ----------------------------------------------------------------------


def test_hash_is_salted_scrypt_with_parameters_and_verifies():
    h1, h2 = hash_password("correct horse"), hash_password("correct horse")
    assert h1 != h2  # per-hash random salt
    scheme, n, r, p, _salt, _digest = h1.split("$")
    assert (scheme, n, r, p) == ("scrypt", "32768", "8", "1")
    assert "correct horse" not in h1
    assert verify_password("correct horse", h1) and verify_password("correct horse", h2)
    assert not verify_password("correct horsE", h1)
    assert not verify_password("", h1)


def test_stored_parameters_are_used_and_malformed_hashes_fail_closed():
    cheap = hash_password("pw-123456", n=2**10, r=4, p=2)
    assert cheap.split("$")[1:4] == ["1024", "4", "2"]
    assert verify_password("pw-123456", cheap)
    tampered = cheap.replace("$1024$", "$2048$")
    assert not verify_password("pw-123456", tampered)
    for bad in ["", "plain", "bcrypt$x", "scrypt$3$8$1$AA==$AA==", "scrypt$1024$8$1$!!$??"]:
        assert not verify_password("pw-123456", bad)


def test_users_file_holds_hashes_only_and_is_private(tmp_path: Path):
    store = UserStore(tmp_path / "users.toml")
    store.add("alice", "admin", PASSWORDS["alice"])
    store.add("bob", "annotator", PASSWORDS["bob"])
    text = (tmp_path / "users.toml").read_text()
    assert PASSWORDS["alice"] not in text and PASSWORDS["bob"] not in text
    assert text.count("scrypt$") == 2
    assert stat.S_IMODE((tmp_path / "users.toml").stat().st_mode) == 0o600
    fresh = UserStore(tmp_path / "users.toml")  # round trip through the file
    roles = {u.name: u.role for u in fresh.users().values()}
    assert roles == {"alice": "admin", "bob": "annotator"}
    assert fresh.check("alice", PASSWORDS["alice"]).role == "admin"
    assert fresh.check("alice", PASSWORDS["bob"]) is None
    assert fresh.check("nobody", PASSWORDS["bob"]) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[users."eve"]\nrole = "admin"\npassword = "hunter2"\n', "must be an scrypt hash"),
        ('[users."eve"]\nrole = "root"\npassword = "scrypt$1$1$1$a$b"\n', "unknown role"),
        ('[users."e v"]\nrole = "admin"\npassword = "scrypt$1$1$1$a$b"\n', "invalid user name"),
        ("[users\n", "not valid TOML"),
    ],
)
def test_bad_users_file_is_a_clear_error(text: str, message: str):
    with pytest.raises(AuthFileError, match=message):
        parse_users(text)


# ---- the users CLI -----------------------------------------------------------------------


def _cli(monkeypatch, capsys, *args: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    rc = app_main(["users", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_users_cli_add_list_remove(tmp_path: Path, monkeypatch, capsys):
    f = str(tmp_path / "users.toml")
    rc, out, _ = _cli(
        monkeypatch, capsys, "--auth-file", f, "add", "alice", "--role", "admin",
        "--password-stdin", stdin="alice-secret-1\n",
    )  # fmt: skip
    assert rc == 0 and "alice: admin" in out
    rc, _, _ = _cli(
        monkeypatch, capsys, "--auth-file", f, "add", "bob", "--password-stdin",
        stdin="bob-secret-12\n",
    )  # fmt: skip
    assert rc == 0
    rc, out, _ = _cli(monkeypatch, capsys, "--auth-file", f, "list")
    assert rc == 0 and out.splitlines() == ["alice\tadmin", "bob\tannotator"]
    assert UserStore(Path(f)).check("alice", "alice-secret-1") is not None

    rc, _, err = _cli(
        monkeypatch, capsys, "--auth-file", f, "add", "alice", "--password-stdin",
        stdin="another-pass\n",
    )  # fmt: skip
    assert rc == 2 and "exists" in err and "Traceback" not in err
    rc, _, err = _cli(
        monkeypatch, capsys, "--auth-file", f, "add", "dave", "--password-stdin", stdin="short\n"
    )
    assert rc == 2 and "at least 8 characters" in err
    rc, _, err = _cli(
        monkeypatch, capsys, "--auth-file", f, "add", "no spaces", "--password-stdin",
        stdin="long-enough-1\n",
    )  # fmt: skip
    assert rc == 2 and "invalid user name" in err

    rc, out, _ = _cli(monkeypatch, capsys, "--auth-file", f, "remove", "bob")
    assert rc == 0
    rc, out, _ = _cli(monkeypatch, capsys, "--auth-file", f, "list")
    assert out.splitlines() == ["alice\tadmin"]
    rc, _, err = _cli(monkeypatch, capsys, "--auth-file", f, "remove", "bob")
    assert rc == 2 and "no user 'bob'" in err


def test_users_cli_rejects_unknown_role(tmp_path: Path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exc:
        _cli(monkeypatch, capsys, "--auth-file", str(tmp_path / "u.toml"), "add", "x", "--role",
             "root")  # fmt: skip
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_serving_with_a_missing_or_empty_auth_file_fails_clearly(tmp_path: Path, capsys):
    assert app_main(["--auth-file", str(tmp_path / "none.toml")]) == 2
    err = capsys.readouterr().err
    assert "not found" in err and "users" in err and "add" in err
    (tmp_path / "empty.toml").write_text("")
    assert app_main(["--auth-file", str(tmp_path / "empty.toml")]) == 2
    assert "has no users" in capsys.readouterr().err


def test_exposed_without_auth_warns_loudly(caplog):
    with caplog.at_level(logging.WARNING, logger="app.auth.web"):
        assert warn_if_exposed("0.0.0.0", auth_enabled=False)
    assert "WITHOUT SIGN-IN" in caplog.text and "--auth-file" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="app.auth.web"):
        assert not warn_if_exposed("0.0.0.0", auth_enabled=True)
        assert not warn_if_exposed("127.0.0.1", auth_enabled=False)
        assert not warn_if_exposed("localhost", auth_enabled=False)
    assert caplog.text == ""
    assert is_loopback("::1") and is_loopback("127.0.0.2")
    assert not is_loopback("::") and not is_loopback("192.168.1.5")
    assert not is_loopback("example.org")


# ---- login throttling --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_throttle_backs_off_exponentially_and_success_clears():
    clock = Clock()
    th = LoginThrottle(user_free=3, ip_free=100, base=1.0, cap=8.0, now=clock)
    for _ in range(3):
        assert th.wait_seconds("1.2.3.4", "bob") == 0
        th.attempt("1.2.3.4", "bob")
    assert th.wait_seconds("1.2.3.4", "bob") == pytest.approx(1.0)
    assert th.wait_seconds("5.6.7.8", "BOB") == pytest.approx(1.0)  # per user, any IP
    assert th.wait_seconds("1.2.3.4", "alice") == 0
    clock.t += 1.0
    th.attempt("1.2.3.4", "bob")
    assert th.wait_seconds("1.2.3.4", "bob") == pytest.approx(2.0)
    for _ in range(10):
        clock.t += 100
        th.attempt("1.2.3.4", "bob")
    assert th.wait_seconds("1.2.3.4", "bob") == pytest.approx(8.0)  # capped
    th.success("1.2.3.4", "bob")
    assert th.wait_seconds("1.2.3.4", "bob") == 0


def test_throttle_counts_parallel_attempts_and_per_ip_and_forgets():
    clock = Clock()
    th = LoginThrottle(user_free=5, ip_free=4, forget_after=60, now=clock)
    for name in ["a", "b", "c", "d"]:  # a burst before any answer: each counts
        th.attempt("9.9.9.9", name)
    assert th.wait_seconds("9.9.9.9", "e") > 0  # password spraying from one IP
    assert th.wait_seconds("8.8.8.8", "e") == 0
    clock.t += 61
    assert th.wait_seconds("9.9.9.9", "e") == 0


# ---- a live server with sign-in ----------------------------------------------------------


def vote(text: str, claimed_name: str, request: gr.Request) -> str:
    return f"{annotator_name(request, claimed_name)}|{text}"


def start_training(text: str, request: gr.Request) -> str:
    return "started by " + require_role(request, "admin", "start training")


def make_file(text: str) -> str:
    path = Path(gr.utils.get_upload_folder()) / "auth-test-export.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def build_demo() -> gr.Blocks:
    with gr.Blocks() as demo:
        text, name, out = gr.Textbox(), gr.Textbox(), gr.Textbox()
        gr.Button("vote").click(vote, [text, name], out, api_name="record_vote")
        gr.Button("train").click(start_training, text, out, api_name="start_training")
        gr.Button("file").click(make_file, text, gr.File(), api_name="make_file")
    return demo


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = tmp_path_factory.mktemp("auth") / "users.toml"
    store = UserStore(path)
    for name, password in PASSWORDS.items():
        store.add(name, ROLES[name], password)
    demo = build_demo()
    demo.queue().launch(
        server_name="127.0.0.1",
        server_port=_free_port(),
        prevent_thread_lock=True,
        quiet=True,
        **launch_options(UserStore(path)),
    )
    try:
        yield demo, demo.local_url.rstrip("/"), store
    finally:
        demo.close()


def _login(url: str, name: str) -> httpx.Cookies:
    r = httpx.post(f"{url}/login", data={"username": name, "password": PASSWORDS[name]})
    assert r.status_code == 200, r.text
    return r.cookies


def _all_routes(app) -> list[tuple[str, str]]:
    """Every (method, path) the running FastAPI app serves, routers included."""

    def walk(routes):
        for r in routes:
            if isinstance(r, _IncludedRouter):
                yield from walk(r.original_router.routes)
            else:
                yield r

    pairs = []
    for route in walk(app.routes):
        path = re.sub(r"\{api_name\}", "record_vote", route.path)
        path = re.sub(r"\{[^}]+\}", "x", path)
        for method in sorted(getattr(route, "methods", None) or ["GET"]):
            pairs.append((method, path))
    return pairs


def test_every_route_refuses_a_request_without_session(server):
    demo, url, _ = server
    routes = _all_routes(demo.server_app)
    assert len(routes) > 60  # the whole Gradio surface, not a hand-picked list
    for expected in [
        ("GET", "/config"),
        ("GET", "/gradio_api/info"),
        ("POST", "/gradio_api/queue/join"),
        ("POST", "/gradio_api/call/record_vote"),
        ("GET", "/gradio_api/file=x"),
        ("POST", "/gradio_api/upload"),
        ("GET", "/gradio_api/heartbeat/x"),
        ("POST", "/gradio_api/cancel"),
    ]:
        assert expected in routes
    public = {("GET", "/"), ("HEAD", "/"), ("POST", "/login"), ("POST", "/login/")}
    public.add(("GET", "/logout"))
    with httpx.Client(base_url=url, timeout=10, follow_redirects=False) as client:
        for method, path in routes:
            if (method, path) in public:
                continue
            r = client.request(method, path, json={})
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        # The sign-in page gives away neither the component tree nor the API.
        page = client.get("/")
        assert page.status_code == 200 and "Sign in" in page.text
        for secret in ["record_vote", "start_training", "gradio_config", "gradio_api_info"]:
            assert secret not in page.text
        wrong = client.post("/login", data={"username": "bob", "password": "nope"})
        assert wrong.status_code == 400
        assert client.get("/logout").status_code in (302, 307)


def test_gradio_client_needs_credentials(server):
    _, url, _ = server
    with pytest.raises(Exception, match=r"credentials|401|login"):
        Client(url, verbose=False)
    with pytest.raises(ValueError, match="Could not login"):
        Client(url, auth=("bob", "wrong-password"), verbose=False)


def test_signed_in_session_reaches_the_app(server):
    _, url, _ = server
    cookies = _login(url, "bob")
    with httpx.Client(base_url=url, cookies=cookies, timeout=30) as client:
        page = client.get("/")
        assert page.status_code == 200 and "gradio_config" in page.text
        assert client.get("/config").json()["components"]
        info = client.get("/gradio_api/info").json()
        assert "/record_vote" in info["named_endpoints"]
        assert client.get("/gradio_api/login_check").status_code == 200
        assert client.get("/gradio_api/user").json() == "bob"
        up = client.post("/gradio_api/upload", files={"files": ("a.txt", b"hello")})
        assert up.status_code == 200
        assert client.get(f"/gradio_api/file={up.json()[0]}").content == b"hello"
        event = client.post("/gradio_api/call/record_vote", json={"data": ["hi", "mallory"]})
        assert event.status_code == 200
        result = client.get(f"/gradio_api/call/record_vote/{event.json()['event_id']}")
        assert "bob|hi" in result.text  # the signed-in user, not the claimed name


def test_annotator_is_the_signed_in_user_and_admin_actions_are_refused(server):
    _, url, _ = server
    bob = Client(url, auth=("bob", PASSWORDS["bob"]), verbose=False)
    assert bob.predict("good", "alice", api_name="/record_vote") == "bob|good"
    with pytest.raises(AppError, match=r"Only an admin can start training.*'bob' \(annotator\)"):
        bob.predict("go", api_name="/start_training")
    alice = Client(url, auth=("alice", PASSWORDS["alice"]), verbose=False)
    assert alice.predict("go", api_name="/start_training") == "started by alice"
    downloaded = Path(alice.predict("exported", api_name="/make_file"))
    assert downloaded.read_text() == "exported"  # fetched through /gradio_api/file= with a session


def test_cross_site_posts_are_refused(server):
    _, url, _ = server
    cookies = _login(url, "alice")
    host = url.split("//", 1)[1]
    body = {"data": ["go"]}
    with httpx.Client(base_url=url, cookies=cookies) as client:
        evil = client.post(
            "/gradio_api/call/start_training", json=body, headers={"Origin": "https://evil.example"}
        )
        assert evil.status_code == 403 and "Cross-site" in evil.json()["detail"]
        same = client.post(
            "/gradio_api/call/start_training", json=body, headers={"Origin": f"http://{host}"}
        )
        assert same.status_code == 200
        assert client.get("/config", headers={"Origin": "https://evil.example"}).status_code == 200


def test_removed_user_loses_their_session(server):
    _, url, store = server
    cookies = _login(url, "carol")
    with httpx.Client(base_url=url, cookies=cookies) as client:
        assert client.get("/config").status_code == 200
        store.remove("carol")
        try:
            assert client.get("/config").status_code == 401
            r = client.post("/login", data={"username": "carol", "password": PASSWORDS["carol"]})
            assert r.status_code == 400
        finally:
            store.add("carol", "annotator", PASSWORDS["carol"])


def test_repeated_failed_logins_are_throttled(server):
    _, url, _ = server
    with httpx.Client(base_url=url) as client:
        codes = [
            client.post("/login", data={"username": "dave", "password": f"guess-{i}"}).status_code
            for i in range(5)
        ]
        assert codes == [400] * 5
        r = client.post("/login", data={"username": "dave", "password": PASSWORDS["dave"]})
        assert r.status_code == 429  # locked even with the right password, for a while
        assert "Too many failed sign-ins" in r.json()["detail"]
        assert int(r.headers["retry-after"]) >= 1
        # Other users are not affected.
        assert (
            client.post(
                "/login", data={"username": "bob", "password": PASSWORDS["bob"]}
            ).status_code
            == 200
        )


def test_require_role_without_auth_is_the_local_admin():
    assert require_role(None, "admin") == "local"
    assert annotator_name(None, " ann ") == "ann"
    assert annotator_name(None, "") == "anonymous"
