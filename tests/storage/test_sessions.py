"""Sign-in sessions and failed sign-ins in the database (shared by app replicas)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import create_engine, inspect, select

from storage import sessions
from storage.db import open_db
from storage.models import SignInSession

FORGET = timedelta(minutes=15)


def test_a_session_is_found_by_token_and_only_its_hash_is_stored(db):
    with db.begin() as s:
        sessions.add_session(s, "tok-1", "ann", "stamp-a")
    with db.begin() as s:
        assert sessions.find_session(s, "tok-1") == sessions.SignIn("ann", "stamp-a")
        assert sessions.find_session(s, "tok-2") is None
        assert s.scalars(select(SignInSession.token_hash)).all() == [sessions.token_hash("tok-1")]


def test_ending_one_session_or_all_of_a_users(db):
    with db.begin() as s:
        for token, user in [("t1", "ann"), ("t2", "ann"), ("t3", "bob")]:
            sessions.add_session(s, token, user, "x")
    with db.begin() as s:
        assert sessions.end_session(s, "t1") == 1
        assert sessions.end_session(s, "t1") == 0
        assert sessions.find_session(s, "t2") is not None
        assert sessions.end_user_sessions(s, "ann") == 1
        assert sessions.find_session(s, "t2") is None
        assert sessions.find_session(s, "t3") is not None
        assert sessions.end_idle_sessions(s, timedelta(days=30)) == 0
        assert sessions.end_idle_sessions(s, timedelta(seconds=-1)) == 1


def test_failures_count_per_key_restart_after_forgetting_and_clear(db):
    keys = ["ip:1.2.3.4", "user:ann"]
    for _ in range(3):
        with db.begin() as s:
            sessions.add_failure(s, keys, FORGET)
    with db.begin() as s:
        sessions.add_failure(s, ["ip:1.2.3.4"], FORGET)
    with db.begin() as s:
        found = sessions.failures(s, [*keys, "user:bob"])
        assert {k: f.count for k, f in found.items()} == {"ip:1.2.3.4": 4, "user:ann": 3}
        sessions.add_failure(s, ["user:ann"], timedelta(seconds=-1))  # the old record expired
        assert sessions.failures(s, ["user:ann"])["user:ann"].count == 1
        sessions.clear_failures(s, keys)
        assert sessions.failures(s, keys) == {}


def test_two_processes_share_one_cookie_name(db_url):
    first, second = open_db(db_url), open_db(db_url)  # two replicas' sessionmakers
    with first.begin() as s:
        name = sessions.cookie_id(s)
    with second.begin() as s:
        assert sessions.cookie_id(s) == name and len(name) >= 24
    for sm in (first, second):
        sm.kw["bind"].dispose()


def test_tables_added_since_are_created_on_an_existing_database(db_url):
    sm = open_db(db_url)
    engine = sm.kw["bind"]
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE sign_in_sessions")
    engine.dispose()
    open_db(db_url).kw["bind"].dispose()  # same schema version: the missing table is added
    engine = create_engine(db_url)
    assert "sign_in_sessions" in inspect(engine).get_table_names()
    engine.dispose()
