"""The database: engine, migrations, and a thread pool that runs whole units of work.

The reactor thread never touches a connection. `Database.run(work, ...)` runs `work(conn,
...)` in one transaction on a pool thread and fires a Deferred with its result, which must
be plain data (dataclasses, tuples), never SQLAlchemy objects. SQLite runs in WAL mode with
`synchronous=FULL`, so a committed transaction survives a power cut, not only a crash.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import weakref
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import datetime
from typing import Any, Callable, Iterator, TypeVar

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DataError, DBAPIError

log = logging.getLogger(__name__)

T = TypeVar("T")
WRITE = "gateway_write"  # execution option: this transaction writes (see _sqlite_begin)
# SQLite engine -> the lock its writers take in this process around BEGIN IMMEDIATE ... COMMIT.
_WRITE_LOCKS: "weakref.WeakKeyDictionary[Engine, threading.RLock]" = weakref.WeakKeyDictionary()

# SQLite engine or PostgreSQL engine -> what this process knows of its outages (availability()).
_AVAILABILITY: "weakref.WeakKeyDictionary[Engine, Availability]" = weakref.WeakKeyDictionary()

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


def shared_clock(connection: Connection) -> datetime | None:
    """The time on the clock every node reads (PostgreSQL's, which they share), None on SQLite
    (one node: its own clock is the only one)."""
    if connection.dialect.name != "postgresql":
        return None
    return connection.execute(text("SELECT clock_timestamp()")).scalar()


def table_names(engine: Engine) -> list[str]:
    return inspect(engine).get_table_names()


def unreachable(error: BaseException) -> bool:
    """Whether `error` says the database cannot be used now (refused or lost connection, a
    server shutting down, a lock or statement timeout, a read-only standby, SQLite's "database
    is locked" or "read only"), rather than that it refused this unit of work (a value, a key, a deadlock)."""
    import psycopg

    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        error = error.orig
    if getattr(error, "sqlstate", None) and error.sqlstate.startswith("40"):
        return False  # a deadlock, a serialization failure: this transaction's, not the database's
    if getattr(error, "sqlstate", None) == "25006":
        return True  # read_only_sql_transaction: a standby (after a failover), as SQLite's "readonly"
    if isinstance(error, sqlite3.OperationalError):
        # SQLite says OperationalError for a missing table too: only these are the file's state.
        return any(cue in str(error) for cue in _SQLITE_UNAVAILABLE)
    return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))


_SQLITE_UNAVAILABLE = ("locked", "busy", "readonly", "unable to open", "disk I/O", "disk is full")


def during_outage(error) -> bool:
    """Whether `error` (an exception or a Failure) was a failure of an outage that
    `Availability` noted (and logs): the caller logs it at debug level only, so that an
    outage is told in two lines rather than one per unit of work (thousands a minute)."""
    return getattr(getattr(error, "value", error), "_gateway_outage", False)


class Availability:
    """Whether the database answers, as this process's units of work find it, so that the
    log tells each outage once. The first failure that says it is unreachable (`unreachable`)
    is logged at error level, with what the gateway does meanwhile; the others are counted
    and logged at debug level (each marked, see `during_outage`); the first success after it
    logs how long it lasted. Outages that come and go within `quiet` seconds of the last line
    (connections killed one after another) are not told one by one: they are counted in the
    next line, and one that lasts `announce_after` seconds is told then. Thread-safe;
    `answered()` costs one attribute read while all is well."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, quiet: float = 30.0,
                 announce_after: float = 2.0):
        self._clock = clock
        self._quiet = quiet
        self._announce_after = announce_after
        self._lock = threading.Lock()
        self._since: float | None = None  # the outage's first failure, when one is under way
        self._failures = 0
        self._announced = False  # the outage under way was logged
        self._told_at: float | None = None  # the last line logged
        self._untold = 0  # brief outages over before they were logged, since the last line

    @property
    def down(self) -> bool:
        return self._since is not None

    def failed(self, error: BaseException) -> bool:
        """Note a unit of work that failed with `error`; True when it is an outage's (logged
        here), False for any other error (the caller's to log)."""
        error = getattr(error, "value", error)  # a Failure's
        if getattr(error, "_gateway_outage", False):
            return True  # noted already (by the layer below)
        if not unreachable(error):
            return False
        with self._lock:
            now = self._clock()
            if self._since is None:
                self._since, self._failures, self._announced = now, 0, False
            self._failures += 1
            announce = not self._announced and (
                self._told_at is None or now - self._told_at >= self._quiet
                or now - self._since >= self._announce_after)
            if announce:
                self._announced, self._told_at = True, now
                brief, self._untold = self._untold, 0
        try:
            error._gateway_outage = True
        except AttributeError:  # an exception that takes no attributes: logged again, no harm
            pass
        if announce:
            log.error("database unavailable: %s. Messages are answered AE/CE with ERR-5 "
                      "STORE_UNAVAILABLE (nothing stored, send again) and /health/ready says not "
                      "ready; translation, delivery and the audit retry on their own. Further "
                      "failures are logged at debug level until it answers again%s",
                      _first_line(error), f" ({brief} brief outage(s) before this one)" if brief else "")
        else:
            log.debug("database still unavailable: %s", _first_line(error))
        return True

    def level(self, error, otherwise: int = logging.ERROR) -> int:
        """The level to log a unit of work that failed with `error` (or a Failure) at:
        debug when it is an outage's (noted and logged here), else `otherwise`."""
        return logging.DEBUG if self.failed(error) else otherwise

    def answered(self) -> None:
        """Note a unit of work that succeeded: the end of an outage, if one was under way."""
        if self._since is None:
            return
        with self._lock:
            if self._since is None:
                return
            now = self._clock()
            lasted, failures, announced = now - self._since, self._failures, self._announced
            self._since = None
            tell = announced or now - self._told_at >= self._quiet
            if tell:
                self._told_at = now
                brief, self._untold = self._untold + (0 if announced else 1), 0
            else:
                self._untold += 1
        if not tell:
            return
        if announced:
            log.warning("database available again after %.1f s (%d unit(s) of work failed "
                        "meanwhile)", lasted, failures)
        else:
            log.warning("database connections lost and made again: %d brief outage(s) since the "
                        "last report, each over within %g s", brief, self._announce_after)


def availability(engine: Engine) -> Availability:
    """The outage tracker of `engine` (one per engine, shared by every user of it)."""
    found = _AVAILABILITY.get(engine)
    if found is None:
        found = _AVAILABILITY.setdefault(engine, Availability())
    return found


def _first_line(error: BaseException) -> str:
    text = str(getattr(error, "orig", None) or error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:300]


class Database:
    """The engine and the thread pool that runs database work off the reactor thread."""

    def __init__(self, engine: Engine, reactor, threads: int = 4, name: str = "db"):
        from twisted.python.threadpool import ThreadPool

        self.engine = engine
        self.reactor = reactor
        self.availability = availability(engine)
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
        return self._noted(self.engine.begin, work, *args, **kwargs)

    def run_write_now(self, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return self._noted(lambda: write_transaction(self.engine), work, *args, **kwargs)

    def _noted(self, transaction, work: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """`work` in `transaction()`, its failure or success noted by `availability`."""
        try:
            with transaction() as connection:
                result = work(connection, *args, **kwargs)
        except Exception as error:
            self.availability.failed(error)
            raise
        self.availability.answered()
        return result


__all__ = ["Connection", "Database", "create_gateway_engine", "migrate", "table_names"]
