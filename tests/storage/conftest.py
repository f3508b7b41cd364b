"""Storage fixtures: every test that takes `db` runs on SQLite, and on PostgreSQL too when
`DPO_STUDIO_TEST_PG_URL` names a database the tests may wipe (`.ci/run` starts one)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker

from storage.db import open_db

PG_ENV = "DPO_STUDIO_TEST_PG_URL"
PG_URL = os.environ.get(PG_ENV)
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


def wipe_postgres(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty database (a new SQLite file, or the wiped PostgreSQL test database)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studio.db'}"
    wipe_postgres(PG_URL)
    return PG_URL


@pytest.fixture
def db(db_url: str) -> Iterator[sessionmaker[Session]]:
    factory = open_db(db_url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture
def session(db: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction for the whole test, committed at the end."""
    with db.begin() as s:
        yield s
