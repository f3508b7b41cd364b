"""Sign-in for the web app: a gate in front of every route, and slowed-down failed logins.

Gradio's own `launch(auth=...)` protects most routes with its `login_check`, but a few answer
without a session (`/gradio_api/heartbeat/...`, `/gradio_api/cancel`, `/gradio_api/startup-events`,
`/gradio_api/stream/...`, static assets), and its login page embeds the full API description.
`AuthGate` is an ASGI middleware that sees every request before Gradio does: without a valid
session only the sign-in form (`GET /`), `POST /login` and `/logout` answer (plus the one
startup-events call `launch()` makes before anyone can connect); everything else gets 401.
It also attaches the user's role to the request for `require_role`, refuses a session whose
user was removed from the users file, and refuses cross-site POSTs (CSRF: another site making
a signed-in admin's browser start training).

With `share_sign_in` (the app does it), sessions and failed sign-ins live in the database
(`SharedSessions`, `SharedLoginThrottle`), so replicas behind one proxy share them: Gradio's
login flow is kept, the new session is stored before its cookie is sent, a session found in
the database is put into this replica's `app.tokens` so Gradio's own checks agree, and
`/logout` ends it in the database for every replica.
"""

from __future__ import annotations

import asyncio
import hashlib
import html
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware import Middleware

from app.asgi import Receive, Scope, Send, read_body, send_bytes, send_json
from app.auth.users import ROLE_STATE_KEY, USER_STATE_KEY, AuthFileError, User, UserStore
from storage import sessions

logger = logging.getLogger(__name__)


LOGIN_PATHS = ("/login", "/login/")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STARTUP_PATH = "/gradio_api/startup-events"
MAX_LOGIN_BODY = 64 * 1024
# Shared sessions: how long a replica trusts its cached answer, and when an unused one ends.
SESSION_CACHE_TTL_S = 2.0
MAX_CACHED_SESSIONS = 10_000
SESSION_IDLE = timedelta(days=30)


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


@dataclass
class LoginThrottle:
    """Exponential back-off after repeated failed sign-ins, per user name and per client IP.

    After `free` failures for a key, the next attempt must wait `base * 2**(k - free)`
    seconds (k = failures so far), capped at `cap`. Every attempt counts as a failure until
    it succeeds, so a burst of parallel guesses is throttled too. A success clears the
    user's and the IP's record; records are forgotten `forget_after` seconds after the last
    failure. IPs get more free attempts than names (an office behind one NAT address).
    """

    user_free: int = 5
    ip_free: int = 20
    base: float = 1.0
    cap: float = 60.0
    forget_after: float = 900.0
    max_keys: int = 10_000
    now: Callable[[], float] = time.monotonic
    _failures: dict[str, _Failures] = field(default_factory=dict)

    def _keys(self, ip: str, username: str) -> list[tuple[str, int]]:
        keys = [(f"ip:{ip}", self.ip_free)]
        if username:
            keys.append((f"user:{username.lower()}", self.user_free))
        return keys

    def wait_seconds(self, ip: str, username: str) -> float:
        """Seconds until this (IP, user) may try again; 0 when allowed now."""
        now = self.now()
        wait = 0.0
        keys = self._keys(ip, username)
        records = self._records([key for key, _ in keys])
        for key, free in keys:
            rec = records.get(key)
            if rec is None or now - rec.last > self.forget_after or rec.count < free:
                continue
            delay = min(self.cap, self.base * 2 ** (rec.count - free))
            wait = max(wait, rec.last + delay - now)
        return wait

    def attempt(self, ip: str, username: str) -> None:
        """Count an attempt as a failure until `success` says otherwise."""
        now = self.now()
        self._prune(now)
        for key, _ in self._keys(ip, username):
            rec = self._failures.get(key)
            if rec is None or now - rec.last > self.forget_after:
                rec = self._failures[key] = _Failures()
            rec.count += 1
            rec.last = now

    def success(self, ip: str, username: str) -> None:
        for key, _ in self._keys(ip, username):
            self._failures.pop(key, None)

    def _records(self, keys: list[str]) -> dict[str, _Failures]:
        return {key: self._failures[key] for key in keys if key in self._failures}

    def _prune(self, now: float) -> None:
        if len(self._failures) < self.max_keys:
            return
        stale = [k for k, r in self._failures.items() if now - r.last > self.forget_after]
        for key in stale:
            del self._failures[key]
        if len(self._failures) >= self.max_keys:  # under attack: keep the newest half
            newest = sorted(self._failures.items(), key=lambda kv: kv[1].last)
            self._failures = dict(newest[len(newest) // 2 :])


@dataclass(kw_only=True)
class SharedLoginThrottle(LoginThrottle):
    """`LoginThrottle` with its failures in the database: the back-off counts every replica's
    failed sign-ins (wall-clock times, so hosts must keep their clocks in sync, e.g. NTP)."""

    sm: sessionmaker[Session]
    now: Callable[[], float] = time.time

    def _records(self, keys: list[str]) -> dict[str, _Failures]:
        with self.sm.begin() as s:
            found = sessions.failures(s, keys)
        return {k: _Failures(f.count, f.last.timestamp()) for k, f in found.items()}

    def attempt(self, ip: str, username: str) -> None:
        keys = [key for key, _ in self._keys(ip, username)]
        forget = timedelta(seconds=self.forget_after)
        with self.sm.begin() as s:
            sessions.add_failure(s, keys, forget)
            sessions.forget_failures(s, forget)

    def success(self, ip: str, username: str) -> None:
        with self.sm.begin() as s:
            sessions.clear_failures(s, [key for key, _ in self._keys(ip, username)])


def user_stamp(user: User) -> str:
    """A fingerprint of the user's password hash: changes with the password, and when a removed
    user is added again, so sessions made before stop working."""
    return hashlib.sha256(user.password_hash.encode("utf-8")).hexdigest()[:32]


class SharedSessions:
    """Sign-in sessions in the database (`storage.sessions`), so a session made on one replica
    works on all of them and a sign-out on one ends it everywhere.

    Lookups are cached in this process for `ttl_s` (default 2 s): a sign-out or a removed
    user takes effect on the other replicas within that time (at once on this one).
    """

    def __init__(self, sm: sessionmaker[Session], ttl_s: float = SESSION_CACHE_TTL_S) -> None:
        self.sm = sm
        self.ttl_s = ttl_s
        self._cache: dict[str, tuple[float, sessions.SignIn | None]] = {}
        self._cookie_id: str | None = None

    @property
    def cookie_id(self) -> str:
        if self._cookie_id is None:
            with self.sm.begin() as s:
                self._cookie_id = sessions.cookie_id(s)
        return self._cookie_id

    def lookup(self, token: str) -> sessions.SignIn | None:
        now = time.monotonic()
        hit = self._cache.get(token)
        if hit is not None and hit[0] > now:
            return hit[1]
        with self.sm.begin() as s:
            found = sessions.find_session(s, token)
        if len(self._cache) >= MAX_CACHED_SESSIONS:
            self._cache.clear()
        self._cache[token] = (now + self.ttl_s, found)
        return found

    def add(self, token: str, user: User) -> None:
        with self.sm.begin() as s:
            sessions.add_session(s, token, user.name, user_stamp(user))
            sessions.end_idle_sessions(s, SESSION_IDLE)
        self._cache.pop(token, None)

    def end(self, token: str) -> None:
        with self.sm.begin() as s:
            sessions.end_session(s, token)
        self._cache.pop(token, None)

    def end_user(self, username: str) -> None:
        with self.sm.begin() as s:
            sessions.end_user_sessions(s, username)
        self._cache = {
            t: v for t, v in self._cache.items() if v[1] is None or v[1].username != username
        }


async def _send_json(send: Send, status: int, detail: str, headers: list | None = None) -> None:
    await send_json(send, status, {"detail": detail}, headers)


def _cross_site(scope: Scope) -> bool:
    """A state-changing request that a browser sent from another site (CSRF): its Origin
    names a different host than the one it was sent to. Scripts send no Origin."""
    if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
        return False
    headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", [])}
    origin = headers.get("origin")
    if origin is None:
        return False
    hosts = {headers.get("host", ""), headers.get("x-forwarded-host", "").split(",")[0].strip()}
    return urlsplit(origin).netloc not in hosts - {""}


def _cookies(scope: Scope) -> dict[str, str]:
    from starlette.requests import cookie_parser

    for name, value in scope.get("headers", []):
        if name == b"cookie":
            return cookie_parser(value.decode("latin-1"))
    return {}


class AuthGate:
    """ASGI middleware; see the module docstring. Installed by `launch_options`."""

    def __init__(
        self,
        app: Any,
        users: UserStore,
        throttle: LoginThrottle,
        title: str,
        sessions: SharedSessions | None = None,
    ) -> None:
        self.app = app
        self.users = users
        self.throttle = throttle
        self.title = title
        self.sessions = sessions

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = self._token(scope)
        user = self._session_user(scope, token) if token else None
        if user is not None:
            if _cross_site(scope):
                await _send_json(send, 403, "Cross-site request refused.")
                return
            if scope["path"] == "/logout" and self.sessions is not None:
                self._end_shared(scope, token, user)
            state = scope.setdefault("state", {})
            state[ROLE_STATE_KEY], state[USER_STATE_KEY] = user.role, user.name
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008, "reason": "not signed in"})
            return
        path, method = scope["path"], scope["method"]
        if path in LOGIN_PATHS and method == "POST":
            await self._login(scope, receive, send)
        elif path == "/logout" or self._is_launch_probe(scope):
            await self.app(scope, receive, send)
        elif path == "/" and method in ("GET", "HEAD"):
            page = login_page(self.title).encode()
            await send_bytes(send, 200, b"" if method == "HEAD" else page, "text/html")
        else:
            await _send_json(send, 401, "Not signed in. Sign in at / first.")

    @staticmethod
    def _is_launch_probe(scope: Scope) -> bool:
        """`launch()` itself calls startup-events once, without a session; after that the
        route is closed like every other."""
        gradio_app = scope.get("app")
        return scope["path"] == STARTUP_PATH and not getattr(
            gradio_app, "startup_events_triggered", True
        )

    def _token(self, scope: Scope) -> str | None:
        gradio_app = scope.get("app")
        if self.sessions is not None and gradio_app is not None:
            gradio_app.cookie_id = self.sessions.cookie_id  # one cookie name on every replica
        cookie_id = getattr(gradio_app, "cookie_id", None)
        if cookie_id is None:
            return None
        cookies = _cookies(scope)
        # Same precedence as Gradio's get_current_user, so both agree on who is signed in.
        return cookies.get(f"access-token-{cookie_id}") or cookies.get(
            f"access-token-unsecure-{cookie_id}"
        )

    def _session_user(self, scope: Scope, token: str) -> User | None:
        tokens = scope["app"].tokens
        if self.sessions is None:
            username, stamp = tokens.get(token), None
        else:
            found = self.sessions.lookup(token)
            username, stamp = (found.username, found.user_stamp) if found else (None, None)
        if username is None:
            tokens.pop(token, None)  # ended on another replica
            return None
        user = self.users.get(username)
        if user is None or (stamp is not None and stamp != user_stamp(user)):
            # removed from the users file (or its password changed) since signing in
            tokens.pop(token, None)
            if self.sessions is not None and user is None:
                self.sessions.end_user(username)
            elif self.sessions is not None:
                self.sessions.end(token)
            return None
        tokens[token] = username  # a session from another replica: Gradio's checks agree
        return user

    def _end_shared(self, scope: Scope, token: str, user: User) -> None:
        """`/logout` ends the session on every replica; like Gradio's, all of the user's
        sessions unless `?all_session=false`."""
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if query.get("all_session", ["true"])[0].lower() == "false":
            self.sessions.end(token)
        else:
            self.sessions.end_user(user.name)

    def _new_token(self, scope: Scope, headers: list[tuple[bytes, bytes]]) -> str | None:
        """The session token in a successful `/login` response's cookies."""
        name = f"access-token-unsecure-{scope['app'].cookie_id}"
        for key, value in headers:
            if key.lower() != b"set-cookie":
                continue
            cookie: SimpleCookie = SimpleCookie()
            try:
                cookie.load(value.decode("latin-1"))
            except CookieError:
                continue
            if name in cookie:
                return cookie[name].value
        return None

    async def _login(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive, MAX_LOGIN_BODY)
        if body is None:
            await _send_json(send, 413, "Sign-in request too large.")
            return
        username = parse_qs(body.decode("latin-1")).get("username", [""])[0].strip()
        ip = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_seconds(ip, username)
        if wait > 0:
            secs = math.ceil(wait)
            logger.warning("sign-in throttled for %r from %s (%d s)", username, ip, secs)
            await _send_json(
                send,
                429,
                f"Too many failed sign-ins. Try again in {secs} s.",
                [(b"retry-after", str(secs).encode())],
            )
            return
        self.throttle.attempt(ip, username)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        status = 0

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                if status == 200:  # stored before the browser gets its cookie
                    self._share_session(scope, username, message.get("headers", []))
            await send(message)

        await self.app(scope, replay, capture)
        if status == 200:
            self.throttle.success(ip, username)
        else:
            logger.warning("failed sign-in for %r from %s", username, ip)

    def _share_session(self, scope: Scope, username: str, headers: list) -> None:
        token = self._new_token(scope, headers)
        user = self.users.get(username)
        if self.sessions is not None and token and user is not None:
            self.sessions.add(token, user)


def login_page(title: str) -> str:
    """A self-contained sign-in form (no API description, no component tree)."""
    t = html.escape(title)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{t}: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{{font-family:system-ui,sans-serif;display:flex;justify-content:center;margin-top:12vh}}
form{{display:flex;flex-direction:column;gap:.6em;width:18em}}
label{{display:flex;flex-direction:column;gap:.2em}}
input,button{{font-size:1em;padding:.45em}} #msg{{color:#b00020;min-height:1.2em}}
</style></head><body>
<form id="login"><h1>{t}</h1><p>Sign in to continue.</p>
<label>User name <input name="username" autocomplete="username" required autofocus></label>
<label>Password <input name="password" type="password" autocomplete="current-password"
 required></label>
<button type="submit">Sign in</button><div id="msg" role="alert"></div></form>
<script>
document.getElementById("login").addEventListener("submit", async (e) => {{
  e.preventDefault();
  const msg = document.getElementById("msg");
  msg.textContent = "";
  const r = await fetch("./login", {{method: "POST",
    body: new URLSearchParams(new FormData(e.target))}});
  if (r.ok) {{ location.reload(); return; }}
  let detail = "Wrong user name or password.";
  if (r.status === 429) {{ try {{ detail = (await r.json()).detail; }} catch (_) {{}} }}
  msg.textContent = detail;
}});
</script></body></html>
"""


def launch_options(users: UserStore, title: str = "DPO Studio") -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` that turn sign-in on for every route."""

    async def authenticate(username: str, password: str) -> bool:
        # scrypt takes ~0.25 s of CPU: keep it off the event loop.
        return await asyncio.to_thread(users.check, username, password) is not None

    gate = Middleware(AuthGate, users=users, throttle=LoginThrottle(), title=title)
    return {
        "auth": authenticate,
        "app_kwargs": {"middleware": [gate]},
        # With SSR a Node server would sit in front of the gate; keep Python in front.
        "ssr_mode": False,
    }


def share_sign_in(options: dict[str, Any], sm: sessionmaker[Session]) -> None:
    """Keep the sessions and failed sign-ins of `launch_options` in the database, so that
    replicas behind one proxy share them (no-op with sign-in off)."""
    middleware = options.get("app_kwargs", {}).get("middleware", [])
    for i, item in enumerate(middleware):
        if item.cls is AuthGate:
            throttle = SharedLoginThrottle(sm=sm)
            sessions_ = SharedSessions(sm)
            middleware[i] = Middleware(
                AuthGate, **{**item.kwargs, "throttle": throttle, "sessions": sessions_}
            )


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def warn_if_exposed(host: str, auth_enabled: bool) -> bool:
    """Log a loud warning when serving beyond this machine with no sign-in; True if warned."""
    if auth_enabled or is_loopback(host):
        return False
    bar = "!" * 78
    logger.warning(
        "\n%s\n!! DPO Studio is listening on %s WITHOUT SIGN-IN.\n"
        "!! Anyone who can reach this address can label, export your data and start training.\n"
        "!! Create users with `python -m app users add NAME --role admin` and pass\n"
        "!! `--auth-file users.toml`, or bind to 127.0.0.1.\n%s",
        bar,
        host,
        bar,
    )
    return True


def sign_in_options(auth_file: Path | None, host: str, title: str = "DPO Studio") -> dict[str, Any]:
    """`launch` kwargs for `--auth-file` ({} with sign-in off, after warning if exposed).

    Raises `AuthFileError` when the file is missing, malformed or has no users.
    """
    if auth_file is None:
        warn_if_exposed(host, auth_enabled=False)
        return {}
    if not Path(auth_file).is_file():
        raise AuthFileError(
            f"users file {auth_file} not found; create it with "
            f"`python -m app users --auth-file {auth_file} add NAME --role admin`"
        )
    users = UserStore(Path(auth_file))
    if not users.users():
        raise AuthFileError(
            f"users file {auth_file} has no users; add one with "
            f"`python -m app users --auth-file {auth_file} add NAME --role admin`"
        )
    logger.info("sign-in on: %d users from %s", len(users.users()), auth_file)
    return launch_options(users, title)
