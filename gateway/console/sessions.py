"""Console sessions in the database (table console_sessions), so that any node behind the
load balancer serves them. The cookie carries a random token; the table keeps only its
SHA-256, so a copy of the database opens no session. A session ends at logout, after
`session_idle_timeout` seconds without a request, or `session_max_age` after login.
Functions take a connection (one transaction, the caller's); `new_session` is pure. A
request reads its session (`find_session`) and writes only when it must: to delete an ended
one, or to move its last use forward (at most every 15 s).

A session's CSRF token is an HMAC of its cookie token under the account's password hash
(`csrf_token`): the console checks it again on each request, so that a new hash in the
configuration ends the sessions opened with the old password, on every node and across
restarts, with no column to add."""
from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, or_, select, update

from gateway.store.schema import console_sessions
from gateway.store.timestamps import utc as _utc

COOKIE = "gw_console"
_TOUCH_EVERY = timedelta(seconds=15)  # last_seen_at is written at most this often


@dataclass(frozen=True)
class Session:
    account: str
    role: str
    csrf_token: str
    source: str | None
    created_at: datetime
    expires_at: datetime


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_session(account: str, role: str, source: str | None, now: datetime,
                max_age: float, password_hash: str) -> tuple[str, Session]:
    """A fresh cookie token and its session (not stored yet: see `store_session`), bound to
    the account's `password_hash`."""
    token = secrets.token_urlsafe(32)
    return token, Session(account, role, csrf_token(token, password_hash), source, now,
                          now + timedelta(seconds=max_age))


def csrf_token(token: str, password_hash: str) -> str:
    """The form token of the session whose cookie holds `token`, opened while the account's
    password hash was `password_hash`. Unguessable without the cookie (HttpOnly), and it
    gives neither the cookie nor the hash back."""
    digest = hmac.new(password_hash.encode("utf-8"), token.encode("utf-8"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def opened_with(session: Session, token: str, password_hash: str) -> bool:
    """Whether `session` was opened with the password whose hash is `password_hash`."""
    return hmac.compare_digest(session.csrf_token.encode("utf-8"),
                               csrf_token(token, password_hash).encode("utf-8"))


def store_session(connection: Connection, token: str, session: Session, idle: float) -> None:
    """Keep `session` under `token`'s digest; drop the sessions that have ended meanwhile."""
    now = session.created_at
    connection.execute(delete(console_sessions).where(or_(
        console_sessions.c.expires_at <= now,
        console_sessions.c.last_seen_at <= now - timedelta(seconds=idle))))
    connection.execute(console_sessions.insert().values(
        token_sha256=token_digest(token), account=session.account, role=session.role,
        csrf_token=session.csrf_token, source=session.source, created_at=now,
        last_seen_at=now, expires_at=session.expires_at))


@dataclass(frozen=True)
class Found:
    """A session as read, and what its use now requires."""

    session: Session | None  # None: none, or it has ended
    ended: bool  # a row that has ended: delete it
    touch: bool  # a live row whose last use should move to now


def find_session(connection: Connection, token: str, now: datetime, idle: float) -> Found:
    """Read the session of `token` (no write: most requests need none, and on SQLite a
    write transaction would wait for the ingest writer)."""
    row = connection.execute(select(console_sessions)
                             .where(console_sessions.c.token_sha256 == token_digest(token))).first()
    if row is None:
        return Found(None, False, False)
    expires_at, last_seen = _utc(row.expires_at), _utc(row.last_seen_at)
    if expires_at <= now or last_seen + timedelta(seconds=idle) <= now:
        return Found(None, True, False)
    return Found(Session(row.account, row.role, row.csrf_token, row.source, _utc(row.created_at),
                         expires_at), False, now - last_seen >= _TOUCH_EVERY)


def touch_session(connection: Connection, token: str, now: datetime) -> None:
    connection.execute(update(console_sessions)
                       .where(console_sessions.c.token_sha256 == token_digest(token))
                       .values(last_seen_at=now))


def close_session(connection: Connection, token: str) -> bool:
    """Delete the session of `token`; whether there was one."""
    return connection.execute(delete(console_sessions).where(
        console_sessions.c.token_sha256 == token_digest(token))).rowcount > 0
