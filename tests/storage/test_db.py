"""Engine/session factory: SQLite pragmas, schema creation and versioning, the constraints."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import SchemaVersionError, StorageError, default_url, open_db
from storage.models import (
    SCHEMA_VERSION,
    ModelVersion,
    Preference,
    Prompt,
    Response,
    SchemaInfo,
    text_hash,
)
from storage.repo import add_prompt, record_preference, record_response
from storage.runs import ensure_base_version
from tests.storage.conftest import PG_ENV, PG_URL
from tests.storage.test_repo import answers


def test_postgresql_is_tested_in_ci():
    """CI must prove both back ends: `.ci/run` starts PostgreSQL and sets the URL."""
    if not PG_URL:
        if os.environ.get("CI"):
            pytest.fail(f"{PG_ENV} is not set in CI: the PostgreSQL server did not start")
        pytest.skip(f"{PG_ENV} is not set: the storage tests ran on SQLite only")


def test_sqlite_pragmas(tmp_path: Path):
    db = open_db(f"sqlite:///{tmp_path / 'studio.db'}")
    with db() as session:
        pragmas = {
            name: session.execute(text(f"PRAGMA {name}")).scalar()
            for name in ("journal_mode", "foreign_keys", "busy_timeout", "synchronous")
        }
    assert pragmas == {
        "journal_mode": "wal",
        "foreign_keys": 1,
        "busy_timeout": 30_000,
        "synchronous": 1,
    }
    db.kw["bind"].dispose()


def test_default_url_is_studio_db_in_the_data_dir(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("DPO_STUDIO_DATA", str(tmp_path / "somewhere"))
    assert default_url() == f"sqlite:///{tmp_path / 'somewhere' / 'studio.db'}"
    db = open_db(data_dir=tmp_path / "new" / "dir")  # the directory is created
    assert (tmp_path / "new" / "dir" / "studio.db").is_file()
    db.kw["bind"].dispose()


def test_schema_is_created_once_and_versioned(db_url: str):
    first = open_db(db_url)
    with first.begin() as session:
        add_prompt(session, "survives a reopen")
    first.kw["bind"].dispose()
    again = open_db(db_url)
    with again() as session:
        assert session.get_one(SchemaInfo, 1).version == SCHEMA_VERSION
        assert [p.text for p in session.query(Prompt)] == ["survives a reopen"]
    again.kw["bind"].dispose()


@pytest.mark.parametrize(("found", "words"), [(0, "no migration"), (SCHEMA_VERSION + 1, "newer")])
def test_other_schema_version_is_refused_with_a_clear_message(db_url: str, found: int, words: str):
    open_db(db_url).kw["bind"].dispose()
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(update(SchemaInfo).values(version=found))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match=words) as err:
        open_db(db_url)
    assert f"schema version {found}" in str(err.value)


# What each schema added to `preferences` (tables need no entry: they are created on open).
ADDED_COLUMNS = {
    2: ("left_response_id", "suggested_choice", "suggested_by"),
    3: ("ranking_id",),
    4: ("weight", "scorer", "margin"),
}


def downgrade(db_url: str, version: int, *, drop_tables: tuple[str, ...] = ()) -> None:
    """Make the database at `db_url` look written by schema `version`: drop the columns the
    later schemas added to `preferences` (and `drop_tables`), and record that version."""
    engine = create_engine(db_url)
    with engine.begin() as conn:
        for later in range(version + 1, SCHEMA_VERSION + 1):
            for column in ADDED_COLUMNS[later]:
                conn.execute(text(f"ALTER TABLE preferences DROP COLUMN {column}"))
        for table in drop_tables:
            conn.execute(text(f"DROP TABLE {table}"))
        conn.execute(update(SchemaInfo).values(version=version))
    engine.dispose()


def test_a_schema_1_database_is_upgraded_in_place_and_keeps_its_votes(db_url: str):
    """A team's database from before schema 2 (no side, no judge columns) opens, gains the
    columns, and keeps every vote; new votes record their side."""
    sm = open_db(db_url)
    with sm.begin() as session:
        x, y = answers(session, "Name a planet.", "Mars.", "A banana.")
        record_preference(session, response_a_id=y, response_b_id=x, choice="b", annotator="old")
    sm.kw["bind"].dispose()
    downgrade(db_url, 1)  # back to schema 1: drop what schemas 2, 3 and 4 added
    sm = open_db(db_url)
    with sm.begin() as session:
        assert session.get_one(SchemaInfo, 1).version == SCHEMA_VERSION
        [old] = session.scalars(select(Preference)).all()
        assert (old.annotator, old.choice, old.left_response_id) == ("old", "a", None)
        new, _ = record_preference(
            session, response_a_id=y, response_b_id=x, choice="a", annotator="new"
        )
        assert new.left_response_id == y
    sm.kw["bind"].dispose()


def test_studio_tables_without_a_version_are_refused(db_url: str):
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE preferences (id INTEGER PRIMARY KEY)"))
    engine.dispose()
    with pytest.raises(SchemaVersionError, match="no schema version"):
        open_db(db_url)


def test_unusable_location_is_a_storage_error(tmp_path: Path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(StorageError, match="cannot create the database directory"):
        open_db(f"sqlite:///{blocker / 'studio.db'}")


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://localhost/studio", "SQLite or PostgreSQL, not mysql"),
        ("studio.db", "not a database URL: 'studio.db'"),
    ],
)
def test_unsupported_urls_are_refused(url: str, message: str):
    with pytest.raises(StorageError, match=message):
        open_db(url)


def test_unreachable_server_is_a_storage_error():
    with pytest.raises(StorageError, match="cannot open the database"):
        open_db("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


def _response(session: Session) -> Response:
    prompt = add_prompt(session, "p")
    base = ensure_base_version(session, "m")
    return record_response(session, prompt_id=prompt.id, model_version_id=base.id, text="r")


def test_foreign_keys_are_enforced(session: Session):
    session.add(Response(prompt_id=12345, text="orphan", text_hash=text_hash("orphan")))
    with pytest.raises(IntegrityError):
        session.flush()


def test_enums_are_check_constraints(session: Session):
    r1, r2 = _response(session), _response(session)
    session.add(
        Preference(
            prompt_id=r1.prompt_id,
            response_a_id=r1.id,
            response_b_id=r2.id,
            choice="maybe",
            annotator="x",
        )
    )
    with pytest.raises(IntegrityError):
        session.flush()


def test_same_prompt_text_cannot_be_stored_twice(session: Session):
    add_prompt(session, "twice")
    session.add(Prompt(text="twice", text_hash=text_hash("twice")))
    with pytest.raises(IntegrityError):
        session.flush()


def test_one_active_version_per_base_model(session: Session):
    ensure_base_version(session, "m")
    session.add(ModelVersion(base_model="m", name="v1", kind="adapter", adapter_path="/a"))
    session.flush()
    with pytest.raises(IntegrityError):
        session.execute(update(ModelVersion).values(is_active=True))


def test_an_adapter_version_needs_its_directory(session: Session):
    session.add(ModelVersion(base_model="m", name="v1", kind="adapter", adapter_path=None))
    with pytest.raises(IntegrityError):
        session.flush()


def test_a_schema_3_database_gains_the_self_label_columns_and_keeps_its_votes(db_url: str):
    """A database from before self-labels (schema 3) opens, gains `preferences.weight`,
    `scorer` and `margin` (NULL on the votes it had), and takes a version's own labels."""
    from storage.runs import register_adapter_version
    from storage.self_labels import SelfLabel, add_self_labels

    sm = open_db(db_url)
    with sm.begin() as session:
        x, y = answers(session, "Name a planet.", "Mars.", "A banana.")
        record_preference(session, response_a_id=x, response_b_id=y, choice="a", annotator="old")
    sm.kw["bind"].dispose()
    downgrade(db_url, 3)  # back to schema 3: drop what schema 4 added
    sm = open_db(db_url)
    with sm.begin() as session:
        assert session.get_one(SchemaInfo, 1).version == SCHEMA_VERSION == 4
        [old] = session.scalars(select(Preference)).all()
        assert (old.annotator, old.weight, old.scorer, old.margin) == ("old", None, None, None)
        register_adapter_version(session, base_model="m", adapter_path="/a/v1")
        label = SelfLabel("Name a planet.", "Mars.", "A banana.", 1.0, "implicit", weight=0.5)
        assert add_self_labels(session, "v1", [label]).added == 1
    with pytest.raises(IntegrityError), sm.begin() as session:  # the weight's check came too
        session.execute(update(Preference).values(weight=0.0))
    sm.kw["bind"].dispose()
