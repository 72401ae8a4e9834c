"""The database: engine, migrations, and a thread pool that runs whole units of work.

The reactor thread never touches a connection. `Database.run(work, ...)` runs `work(conn,
...)` in one transaction on a pool thread and fires a Deferred with its result, which must
be plain data (dataclasses, tuples), never SQLAlchemy objects. SQLite runs in WAL mode with
`synchronous=FULL`, so a committed transaction survives a power cut, not only a crash.
"""
from __future__ import annotations

import os
import threading
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any, Callable, Iterator, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DataError

T = TypeVar("T")
WRITE = "gateway_write"  # execution option: this transaction writes (see _sqlite_begin)
# SQLite engine -> the lock its writers take in this process around BEGIN IMMEDIATE ... COMMIT.
_WRITE_LOCKS: "weakref.WeakKeyDictionary[Engine, threading.RLock]" = weakref.WeakKeyDictionary()

_ALEMBIC_INI = os.path.join(os.path.dirname(__file__), "alembic.ini")
# The advisory lock a node holds while it migrates (an arbitrary constant: "migrat" in ASCII).
MIGRATE_LOCK = 0x6D_69_67_72_61_74


def create_gateway_engine(url: str, pool_size: int = 4) -> Engine:
    """An engine with the settings durability needs on each backend. Its errors never quote
    the statement's parameters (hide_parameters): they hold message bytes and bundles, and
    errors are logged."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            os.makedirs(os.path.dirname(os.path.abspath(parsed.database)), exist_ok=True)
        engine = create_engine(url, pool_size=pool_size + 2, max_overflow=4, hide_parameters=True,
                               connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take control so that BEGIN is
        # emitted when SQLAlchemy begins (as its documentation recommends).
        event.listen(engine, "begin", _sqlite_begin)
        _WRITE_LOCKS[engine] = threading.RLock()
        return engine
    engine = create_engine(url, pool_size=pool_size + 2, max_overflow=4, pool_pre_ping=True,
                           hide_parameters=True)
    event.listen(engine, "connect", _postgresql_session)
    return engine


def _postgresql_session(dbapi_connection, _record) -> None:
    # Payloads and bundles (3 and 20 KB) are compressed as they are stored (TOAST). lz4 costs
    # PostgreSQL well under half of its default pglz per message stored (measured: 0.24 ->
    # 0.10 ms of its CPU per translated ORU^R01) and compresses them as well or better;
    # values stored either way stay readable. A server built without lz4 keeps pglz.
    try:
        with dbapi_connection.cursor() as cursor:
            cursor.execute("SET default_toast_compression = 'lz4'")
    except Exception:  # the server refuses the value: nothing else depends on it
        dbapi_connection.rollback()
    else:
        dbapi_connection.commit()


def _sqlite_begin(conn) -> None:
    # A transaction that reads and then writes must take the write lock at BEGIN: upgrading a
    # read transaction fails at once ("database is locked", no busy wait) when another writer
    # committed since it began.
    conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get(WRITE) else "BEGIN")


def sqlite_write_lock(engine: Engine) -> AbstractContextManager:
    """What a SQLite writer of this process holds from its BEGIN IMMEDIATE to its COMMIT.

    SQLite has one write lock, and a writer that finds it taken sleeps in steps of up to
    100 ms before it looks again (its busy handler): the ingest writer would wait that long
    behind an audit append. In-process writers queue on this lock instead and start the
    moment the one before them commits; other processes (the command line) still meet the
    busy handler. A no-op for other databases and for engines not made here."""
    return _WRITE_LOCKS.get(engine) or nullcontext()


def value_refused(engine: Engine) -> tuple[type[Exception], ...]:
    """What the database raises for a value it refuses to store (PostgreSQL: a NUL in text, a
    text longer than its column), as SQLAlchemy and as the driver raise it (code on the
    driver's own connection): the cue to store a batch item by item, so that the refused
    one fails alone (gateway.store.texts keeps known cases from getting this far)."""
    return DataError, engine.dialect.loaded_dbapi.DataError


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """`with write_transaction(engine) as conn:` a transaction that will write (BEGIN
    IMMEDIATE on SQLite, under `sqlite_write_lock`; an ordinary transaction elsewhere)."""
    with sqlite_write_lock(engine), engine.connect() as connection:
        connection.execution_options(**{WRITE: True})
        with connection.begin():
            yield connection


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # autocommit at the driver; SQLAlchemy sends BEGIN
    cursor = dbapi_connection.cursor()
    # Freed pages go back to the file only on `PRAGMA incremental_vacuum` (retention runs it);
    # SQLite applies this to a new database only, so it comes before the first table is made.
    # On an older database it waits for a VACUUM (retention converts it once).
    cursor.execute("PRAGMA auto_vacuum=INCREMENTAL")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (Alembic), the same on SQLite and PostgreSQL."""
    config = AlembicConfig(_ALEMBIC_INI)
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Nodes started together on one database: one migrates, the others wait for its
            # commit and then find the schema at head (PostgreSQL's DDL is transactional).
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATE_LOCK})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


def table_names(engine: Engine) -> list[str]:
    return inspect(engine).get_table_names()


class Database:
    """The engine and the thread pool that runs database work off the reactor thread."""

    def __init__(self, engine: Engine, reactor, threads: int = 4, name: str = "db"):
        from twisted.python.threadpool import ThreadPool

        self.engine = engine
        self.reactor = reactor
        self.pool = ThreadPool(minthreads=1, maxthreads=threads, name=name)

    def start(self) -> None:
        self.pool.start()

    def stop(self) -> None:
        self.pool.stop()
        self.engine.dispose()

    def run(self, work: Callable[..., T], *args: Any, **kwargs: Any):
        """Run `work(connection, *args)` in one transaction on a pool thread; a Deferred."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, self.run_now, work, *args, **kwargs)

    def run_write(self, work: Callable[..., T], *args: Any, **kwargs: Any):
        """`run` for work that reads then writes (a claim, a settlement): on SQLite the write
        lock is taken at BEGIN, so it waits for other writers instead of failing."""
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.pool, self.run_write_now, work, *args, **kwargs)

    def run_now(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """The same, in the calling thread (command line tools, tests, the pool itself)."""
        with self.engine.begin() as connection:
            return work(connection, *args, **kwargs)

    def run_write_now(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with write_transaction(self.engine) as connection:
            return work(connection, *args, **kwargs)


__all__ = ["Connection", "Database", "create_gateway_engine", "migrate", "table_names"]
