"""Robustness fixtures: a database URL on SQLite, and on PostgreSQL too when
`DPO_STUDIO_TEST_PG_URL` names a database the tests may wipe (`.ci/run` starts one)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine

PG_URL = os.environ.get("DPO_STUDIO_TEST_PG_URL")
BACKENDS = ["sqlite", "postgresql"] if PG_URL else ["sqlite"]


@pytest.fixture(params=BACKENDS)
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'studio.db'}"
    engine = create_engine(PG_URL)
    with engine.begin() as conn:  # the test database is for tests only: start empty
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()
    return PG_URL
