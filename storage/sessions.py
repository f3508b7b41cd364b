"""Sign-in sessions and failed sign-ins in the database, so every app replica sees the same.

A session is stored as the SHA-256 of its token (a leaked database does not sign anyone in),
with the user name, a fingerprint of the user's password hash and when it was last used.
Failed sign-ins are counted per key (`ip:...`, `user:...`) with wall-clock times, so the
back-off holds whichever replica a guess goes to. Functions take a session and never commit.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from storage.models import LoginFailure, SignInCookie, SignInSession, now_utc

# A session's last use is written at most this often (not on every request).
TOUCH_EVERY = timedelta(minutes=1)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SignIn:
    username: str
    user_stamp: str


def cookie_id(session: Session) -> str:
    """The sign-in cookie's name suffix for this database, drawn once by whichever replica
    asks first."""
    _insert_ignore(session, SignInCookie, {"id": 1, "cookie_id": secrets.token_urlsafe(24)}, ["id"])
    return session.scalar(select(SignInCookie.cookie_id).where(SignInCookie.id == 1))


def add_session(session: Session, token: str, username: str, user_stamp: str) -> None:
    session.add(
        SignInSession(token_hash=token_hash(token), username=username, user_stamp=user_stamp)
    )


def find_session(session: Session, token: str) -> SignIn | None:
    """The session for `token`, or None when it was never made or has ended."""
    row = session.get(SignInSession, token_hash(token))
    if row is None:
        return None
    now = now_utc()
    if now - row.last_seen_at > TOUCH_EVERY:
        row.last_seen_at = now
    return SignIn(row.username, row.user_stamp)


def end_session(session: Session, token: str) -> int:
    """End one session; returns how many ended (0 or 1)."""
    stmt = delete(SignInSession).where(SignInSession.token_hash == token_hash(token))
    return session.execute(stmt).rowcount


def end_user_sessions(session: Session, username: str) -> int:
    """End every session of `username` (sign-out everywhere, or the user was removed)."""
    return session.execute(delete(SignInSession).where(SignInSession.username == username)).rowcount


def end_idle_sessions(session: Session, idle: timedelta) -> int:
    cutoff = now_utc() - idle
    return session.execute(
        delete(SignInSession).where(SignInSession.last_seen_at < cutoff)
    ).rowcount


@dataclass(frozen=True)
class FailureCount:
    count: int
    last: datetime


def failures(session: Session, keys: list[str]) -> dict[str, FailureCount]:
    rows = session.scalars(select(LoginFailure).where(LoginFailure.key.in_(keys)))
    return {r.key: FailureCount(r.count, r.last_at) for r in rows}


def add_failure(session: Session, keys: list[str], forget_after: timedelta) -> None:
    """Count one failed attempt for each key; a record older than `forget_after` restarts at 1.
    Row locks keep counts exact when replicas record failures for one key at once."""
    now = now_utc()
    for key in keys:
        _insert_ignore(session, LoginFailure, {"key": key, "count": 0, "last_at": now}, ["key"])
        row = session.get(LoginFailure, key, with_for_update=True, populate_existing=True)
        row.count = 1 if now - row.last_at > forget_after else row.count + 1
        row.last_at = now


def clear_failures(session: Session, keys: list[str]) -> None:
    session.execute(delete(LoginFailure).where(LoginFailure.key.in_(keys)))


def forget_failures(session: Session, older_than: timedelta) -> int:
    cutoff = now_utc() - older_than
    return session.execute(delete(LoginFailure).where(LoginFailure.last_at < cutoff)).rowcount


def _insert_ignore(session: Session, model: type, row: dict, key: list[str]) -> None:
    insert = sqlite_insert if session.get_bind().dialect.name == "sqlite" else postgresql_insert
    session.execute(
        insert(model.__table__).values(**row).on_conflict_do_nothing(index_elements=key)
    )
