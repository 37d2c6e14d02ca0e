"""Open the database the way durability needs, and keep its schema current.

SQLite runs in WAL mode with synchronous=FULL (a commit is on disk when it
returns), foreign keys on, and write transactions that take the write lock at
BEGIN (``BEGIN IMMEDIATE``), so two writers wait for each other instead of
failing half-way; a BEGIN that finds the lock taken tries again within 2 ms
(SQLite's own busy handler sleeps up to 25 ms and more between tries).
PostgreSQL runs with synchronous_commit on.  Alembic migrations ship inside the
package; ``upgrade()`` applies them.

Alembic (with Mako and Pygments, 11 MiB) is loaded only to upgrade: the daemon
reads the schema's revision with one query and, when a SQLite database needs
an upgrade at start, has ``upgrade_child`` do it in a short-lived process.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    func,
    insert,
    inspect,
    select,
    text,
)
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.schema import ColumnDefault

from gateway import files

if TYPE_CHECKING:
    from multiprocessing.connection import Connection as Pipe

    from alembic.config import Config as AlembicConfig

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).parent / "migrations"
# The revision this code works with: the newest in migrations/versions (a test checks).
HEAD = "0018"
VERSION_TABLE = "alembic_version"  # where Alembic records a database's revision
SQLITE_BUSY_TIMEOUT_MS = 30_000
BEGIN_RETRY = 0.0002  # seconds before the first new try for SQLite's write lock
BEGIN_RETRY_MAX = 0.002  # and the longest pause between two tries


def is_sqlite(engine_or_url: Engine | str) -> bool:
    url = engine_or_url.url if isinstance(engine_or_url, Engine) else make_url(engine_or_url)
    return url.get_backend_name() == "sqlite"


def preload(url: str) -> None:
    """Import what an engine for ``url`` loads on its creation (its dialect's modules
    and driver) in a process that forks the others, so that they share it: imported
    in each after the fork, it was 2-3 MiB of memory of its own in every process."""
    with contextlib.suppress(Exception):  # create() says what is wrong with the URL
        make_url(url).get_dialect().import_dbapi()


def create(url: str, *, pool_size: int = 5) -> Engine:
    """An engine for ``url`` with the session settings durability depends on."""
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            _make_file(Path(database))
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=4,
        )
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=4,
        pool_pre_ping=True,
        pool_recycle=1800,
        connect_args={"connect_timeout": 5, "options": "-c synchronous_commit=on"},
    )


def lock_key(name: str) -> int:
    """The PostgreSQL advisory lock that stands for ``name`` (a signed 64-bit key)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


def take_turn(conn: Any, name: str) -> None:
    """Hold ``name``'s lock until ``conn``'s transaction ends: instances sharing a
    PostgreSQL database take turns at what follows (a read, then writes that depend
    on it).  On SQLite every write transaction holds the database's write lock."""
    if conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_advisory_xact_lock(lock_key(name))))


def insert_rows(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]], *,
                bulky: bool = False) -> None:
    """INSERT ``rows`` (mappings with the same keys) into ``table``, in ``conn``'s
    transaction.

    On SQLite, in as few statements as its limit on bound values allows.  The driver
    lets go of the GIL around every row it steps through and must take it back after
    each; under load every take-back waits for the event loop, so a row-by-row
    executemany of a group commit spent more time waiting than SQLite spent writing.
    The statement is SQLAlchemy's own single-row INSERT with its VALUES repeated, the
    values passed through the column types' bind processors, so what is stored is what
    ``conn.execute(insert(table), rows)`` would store.  Elsewhere it is that executemany.

    After a statement with ``bulky`` rows (originals) the same statement runs once more
    with NULLs that insert nothing: the driver keeps a copy of the values last bound to
    each statement it caches, so a statement of twenty originals would otherwise hold
    twenty, on every pooled connection, until a group of twenty comes again.
    """
    if not rows:
        return
    if conn.dialect.name != "sqlite":
        conn.execute(insert(table), list(rows))
        return
    plan = _multirow_plan(conn.dialect, table, tuple(rows[0]))
    width = len(plan.columns)
    per_statement = max(1, (SQLITE_MAX_VALUES - 1) // width)
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        values = ", ".join([plan.row] * len(chunk))
        if not bulky:
            conn.exec_driver_sql(f"{plan.into} VALUES {values}", _values(plan, chunk))
            continue
        sql = f"{plan.into} SELECT * FROM (VALUES {values}) WHERE ?"
        conn.exec_driver_sql(sql, (*_values(plan, chunk), 1))
        conn.exec_driver_sql(sql, (None,) * (width * len(chunk)) + (0,))


def _values(plan: _MultirowPlan, rows: Sequence[Mapping[str, Any]]) -> tuple[Any, ...]:
    """The bound values of ``rows`` in the plan's order, as the database takes them."""
    values: list[Any] = []
    for row in rows:
        for key, process, default in plan.columns:
            value = row[key] if default is _GIVEN else default
            values.append(process(value) if process is not None else value)
    return tuple(values)


# SQLite's limit on bound values in one statement (999 before 3.32).
SQLITE_MAX_VALUES = 32_766 if sqlite3.sqlite_version_info >= (3, 32) else 999
_GIVEN = object()  # the column's value comes from the row


@dataclass(frozen=True)
class _MultirowPlan:
    into: str  # INSERT INTO t (a, b)
    row: str  # (?, ?)
    # (key, bind processor, _GIVEN or the column's scalar default) in statement order
    columns: tuple[tuple[str, Callable[[Any], Any] | None, Any], ...]


@functools.lru_cache(maxsize=64)
def _multirow_plan(dialect: Dialect, table: Table, keys: tuple[str, ...]) -> _MultirowPlan:
    compiled = insert(table).values({k: bindparam(k) for k in keys}).compile(dialect=dialect)
    assert compiled.positiontup is not None, "a positional paramstyle (SQLite's qmark)"
    head, found, row = str(compiled).partition(" VALUES ")
    assert found, str(compiled)
    columns = []
    for key in compiled.positiontup:
        column = table.c[key]
        if key in keys:
            default = _GIVEN
        elif isinstance(column.default, ColumnDefault) and column.default.is_scalar:
            default = column.default.arg
        else:  # a default computed per row: no such column among the bulk inserts
            raise ValueError(f"{table.name}.{key}: give a value for each row")
        columns.append((key, column.type.dialect_impl(dialect).bind_processor(dialect),
                        default))
    return _MultirowPlan(head, row, tuple(columns))


def _make_file(path: Path) -> None:
    """The database file, made 0600 (and its folders 0700) before SQLite opens it:
    SQLite gives the -wal, -shm and -journal files the database file's mode."""
    files.make_folders(path.parent)
    # there already, or not to be made here: SQLite reports that when it opens it
    with contextlib.suppress(OSError):
        os.close(files.create(path, os.O_WRONLY | os.O_EXCL))


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    # Take transaction control from the driver so that BEGIN IMMEDIATE is ours.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Deleted content is overwritten, so erased mail does not linger in free pages.
    cursor.execute("PRAGMA secure_delete=ON")
    cursor.close()


def _sqlite_begin(conn: Any) -> None:
    if conn.get_execution_options().get("readonly"):
        conn.exec_driver_sql("BEGIN DEFERRED")
        return
    # The write lock, asked for again every 0.2 ms (growing to 2 ms) while another
    # process holds it.  SQLite's own busy handler sleeps 1, 2, 5, 10, 15, 20, 25 ms
    # ... between tries: where the daemon's processes take the lock for a millisecond
    # each, sessions waited 10-20 ms for one that was free after one.
    raw = conn.connection.dbapi_connection
    raw.execute("PRAGMA busy_timeout=0")
    try:
        deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
        pause = BEGIN_RETRY
        while True:
            try:
                raw.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if (getattr(exc, "sqlite_errorname", "SQLITE_BUSY") != "SQLITE_BUSY"
                        or time.monotonic() + pause > deadline):
                    raise
            time.sleep(pause)
            pause = min(pause * 1.5, BEGIN_RETRY_MAX)
    finally:  # every other statement waits for locks as SQLite does it
        raw.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")


def _alembic_config(engine: Engine) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def head_revision() -> str:
    """The newest revision among the migrations, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
    assert head is not None
    return head


def current_revision(engine: Engine) -> str | None:
    """The database's revision; None for an empty database."""
    with engine.connect().execution_options(readonly=True) as conn:
        if not inspect(conn).has_table(VERSION_TABLE):
            return None
        return conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalar()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending migration; returns (revision before, revision after)."""
    from alembic import command

    before = current_revision(engine)
    command.upgrade(_alembic_config(engine), "head")
    after = current_revision(engine)
    assert after is not None
    if before != after:
        log.info("database schema upgraded from %s to %s", before or "empty", after)
    return before, after


def upgrade_child(conn: Pipe, url: str) -> None:
    """``upgrade()`` in a process of its own (see gateway.zygote.spawn): sends back
    (True, (before, after)), or (False, the error in one line)."""
    engine = create(url, pool_size=1)
    try:
        result: tuple[bool, Any] = (True, upgrade(engine))
    except Exception as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        result = (False, first[0] if first else exc.__class__.__name__)
    finally:
        engine.dispose()
    conn.send(result)
