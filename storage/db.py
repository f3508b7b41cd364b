"""Engine and session factory: one function from a database URL to a sessionmaker.

SQLite (the embedded default) is opened in WAL mode with foreign keys on, a busy timeout and
`synchronous=NORMAL`: a committed vote survives a crash or kill of the app; only a power cut
can undo the last commits (never corrupt the file). FULL would fsync every commit, which costs
~4.6 ms per vote on these machines (7.8 ms vs 3.2 ms), and votes queue behind one another.
Every transaction starts with `BEGIN IMMEDIATE`: a writer waits for the lock up to the busy
timeout instead of failing with "database is locked" when it upgrades a read transaction.
A PostgreSQL URL (`postgresql+psycopg://...`) is used as it is; other back ends are refused.

The schema is created on first use and its version recorded; a database written with another
schema version is refused with a message that says what to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    insert,
    inspect,
    make_url,
    select,
    text,
    update,
)
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.models import SCHEMA_VERSION, Base, SchemaInfo, now_utc

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_S = 30.0
# PostgreSQL advisory lock held while the schema is checked or created (any fixed number).
SCHEMA_LOCK_KEY = 4_770_001
BACKENDS = ("sqlite", "postgresql")


class StorageError(Exception):
    """A problem the user can act on; the message says what it is and what to do."""


class SchemaVersionError(StorageError):
    """The database was written with a schema version this code does not read."""


def default_data_dir() -> Path:
    """`$DPO_STUDIO_DATA`, else ./data: holds the database and adapter versions."""
    return Path(os.environ.get("DPO_STUDIO_DATA", "data"))


def default_url(data_dir: Path | None = None) -> str:
    """`sqlite:///<data-dir>/studio.db` (absolute path)."""
    path = ((data_dir or default_data_dir()) / "studio.db").resolve()
    return f"sqlite:///{path}"


def make_engine(url: str) -> Engine:
    """An engine for `url`; SQLite gets the pragmas and BEGIN IMMEDIATE described above."""
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise StorageError(f"not a database URL: {url!r}") from err
    backend = parsed.get_backend_name()
    if backend not in BACKENDS:
        raise StorageError(
            f"DPO Studio stores its data in SQLite or PostgreSQL, not {backend} "
            "(its constraints rely on partial unique indexes and ON CONFLICT)"
        )
    if backend == "postgresql":
        return create_engine(url, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        directory = Path(parsed.database).parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError(f"cannot create the database directory {directory}: {err}") from err
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S})
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (the sqlite3 module would defer it to the first write).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_db(url: str | None = None, *, data_dir: Path | None = None) -> sessionmaker[Session]:
    """Open (creating on first use) the database at `url` and return its sessionmaker.

    `url` defaults to `default_url(data_dir)`. Use one sessionmaker per process and one
    transaction per user event: `with Session.begin() as session: ...`.
    """
    engine = make_engine(url or default_url(data_dir))
    try:
        ensure_schema(engine)
    except OperationalError as err:
        engine.dispose()
        where = engine.url.render_as_string(hide_password=True)
        raise StorageError(f"cannot open the database {where}: {err.orig}") from err
    except SchemaVersionError:
        engine.dispose()
        raise
    return sessionmaker(engine, expire_on_commit=False)


class WriteError(StorageError):
    """The database refused a write (disk full, read-only file, server gone); nothing was
    half-written: the transaction was rolled back."""


# sqlite3 / psycopg message fragment -> what it means for the person who clicked
_WRITE_CAUSES = (
    ("disk is full", "the disk is full"),
    ("no space left", "the disk is full"),
    ("disk i/o error", "the disk refused the write (full, or failing)"),
    ("file too large", "the disk refused the write (full, or failing)"),
    ("readonly database", "the database file is read-only"),
    ("read-only", "the database is read-only"),
    ("database is locked", "the database stayed locked by another writer"),
)


def write_error_cause(err: DBAPIError) -> str:
    """A short reason for a failed write, in plain words where the driver's text is known."""
    text = str(err.orig).strip()
    for fragment, cause in _WRITE_CAUSES:
        if fragment in text.lower():
            return cause
    return f"the database said: {text.splitlines()[0][:200] if text else type(err).__name__}"


@contextmanager
def transaction(sm: sessionmaker[Session], what: str) -> Iterator[Session]:
    """`sm.begin()`, where a database failure becomes a `WriteError` that says what was not
    saved and why. `what` names the thing, e.g. "Your vote"."""
    try:
        with sm.begin() as session:
            yield session
    except DBAPIError as err:
        raise WriteError(
            f"{what} could not be saved: {write_error_cause(err)}. Everything saved before is "
            "intact; free some space (or ask an admin to fix the database) and try again."
        ) from err


def ensure_schema(engine: Engine) -> None:
    """Create the tables on an empty database; refuse one written with another schema.

    One transaction, so two processes opening a new SQLite file at once create it once; on
    PostgreSQL an advisory lock does the same for replicas that start together. Tables added to
    the code since the database was made are created (add-only tables need no version bump).
    """
    where = engine.url.render_as_string(hide_password=True)
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":  # replicas starting at once: one at a time
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({SCHEMA_LOCK_KEY})")
        tables = set(inspect(conn).get_table_names())
        if SchemaInfo.__tablename__ in tables:
            found = conn.scalar(select(SchemaInfo.version).where(SchemaInfo.id == 1))
            if found in MIGRATIONS:
                migrate(conn, found)
            elif found != SCHEMA_VERSION:
                raise SchemaVersionError(schema_mismatch_message(where, found))
            # Tables added since (add-only, no change to existing ones) need no new version.
            Base.metadata.create_all(conn, checkfirst=True)
            return
        ours = tables & set(Base.metadata.tables)
        if ours:
            raise SchemaVersionError(
                f"the database {where} has DPO Studio tables ({', '.join(sorted(ours))}) but no "
                "schema version: it was not written by this version of DPO Studio. Use a new "
                "database (--db, or another data directory)."
            )
        Base.metadata.create_all(conn)
        conn.execute(insert(SchemaInfo).values(id=1, version=SCHEMA_VERSION, created_at=now_utc()))


# Version -> the DDL that brings a database of that version to the next. New tables need no
# entry (ensure_schema adds missing tables at every open); new columns must be nullable.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "ALTER TABLE preferences ADD COLUMN left_response_id INTEGER",
        "ALTER TABLE preferences ADD COLUMN suggested_choice VARCHAR(10)",
        "ALTER TABLE preferences ADD COLUMN suggested_by VARCHAR(200)",
    ),
    2: ("ALTER TABLE preferences ADD COLUMN ranking_id INTEGER",),
    3: (
        "ALTER TABLE preferences ADD COLUMN weight FLOAT "
        "CONSTRAINT ck_preferences_weight_positive CHECK (weight > 0)",
        "ALTER TABLE preferences ADD COLUMN scorer VARCHAR(64)",
        "ALTER TABLE preferences ADD COLUMN margin FLOAT",
    ),
}


def migrate(conn: Connection, found: int) -> None:
    """Upgrade a database of schema `found` to SCHEMA_VERSION, in the caller's transaction
    (a failed step leaves the database as it was, on PostgreSQL and on SQLite)."""
    for version in range(found, SCHEMA_VERSION):
        for ddl in MIGRATIONS[version]:
            conn.execute(text(ddl))
        logger.info("database upgraded from schema %d to %d", version, version + 1)
    conn.execute(update(SchemaInfo).where(SchemaInfo.id == 1).values(version=SCHEMA_VERSION))


def schema_mismatch_message(where: str, found: int | None) -> str:
    if found is not None and found > SCHEMA_VERSION:
        return (
            f"the database {where} was written by a newer DPO Studio (schema version {found}; "
            f"this one reads version {SCHEMA_VERSION}). Upgrade DPO Studio to open it."
        )
    return (
        f"the database {where} has schema version {found}; this DPO Studio reads version "
        f"{SCHEMA_VERSION} and has no migration from it. Export its preferences with the "
        "version that wrote it (`python -m storage export`), then import them into a new "
        "database (`python -m storage import-pairs`)."
    )
