"""The gateway's log: one stream (stdout) for Twisted's log and the standard library's, as
JSON lines (`log_format: json`, the default: one object per line, for a log shipper) or as
readable text (`log_format: text`, for a terminal).

A JSON line holds `time` (ISO 8601, UTC, milliseconds), `level` (debug, info, warn, error,
critical), `namespace` (the logger: "gateway.delivery.service", "mllp", ...), `node` (the
node's name), `message` (the formatted text) and the event's own fields when they are plain
values (strings cut at 500 characters, numbers, booleans): `listener`, `peer`, `facility`...
A logged failure adds `error` (its type and message) and `traceback`.

What is logged above debug names messages by control id, type, size and hash, never by
content: no patient names or identifiers (tests/test_logs.py sends real messages and looks).
"""
from __future__ import annotations

import io
import json
import logging
import sys
import threading
from datetime import datetime, timezone
from typing import IO

from twisted.logger import (FileLogObserver, FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent, formatEventAsClassicLogText,
                            globalLogBeginner, globalLogPublisher)
from zope.interface import implementer

from gateway.terminal import printable

# log_level -> (Twisted's level, the standard library's level)
LEVELS = {"debug": (LogLevel.debug, logging.DEBUG), "info": (LogLevel.info, logging.INFO),
          "warn": (LogLevel.warn, logging.WARNING), "error": (LogLevel.error, logging.ERROR)}
_FROM_STDLIB = ((logging.CRITICAL, LogLevel.critical), (logging.ERROR, LogLevel.error),
                (logging.WARNING, LogLevel.warn), (logging.INFO, LogLevel.info))
_FIELD_LIMIT = 500
# Keys of an event that are Twisted's bookkeeping or ours to write, not the caller's fields.
_RESERVED = frozenset({"time", "level", "namespace", "node", "message", "error", "traceback",
                       "format", "system", "isError", "message_text", "why", "failure"})


def json_line(event: dict, node: str) -> str:
    """One Twisted log event as one JSON object and a newline."""
    when = event.get("log_time")
    level = event.get("log_level")
    record = {
        "time": datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")
        .replace("+00:00", "Z") if when is not None else None,
        "level": level.name if isinstance(level, type(LogLevel.info)) else "info",
        "namespace": event.get("log_namespace") or event.get("system") or "-",
        "node": node,
        "message": _message(event),
    }
    for key, value in event.items():
        if key.startswith(("log_", "_")) or key in _RESERVED:
            continue
        if isinstance(value, str):
            record[key] = value[:_FIELD_LIMIT]
        elif value is None or isinstance(value, (bool, int, float)):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["error"] = f"{failure.type.__name__}: {failure.getErrorMessage()}"[:_FIELD_LIMIT]
        record["traceback"] = failure.getTraceback()
    elif event.get("traceback"):
        record["traceback"] = event["traceback"]
    return json.dumps(record, ensure_ascii=False, default=str) + "\n"


def _message(event: dict) -> str:
    if event.get("log_format") is None and "message" in event:  # the legacy API's log.msg
        message = event["message"]
        return " ".join(str(part) for part in message) if isinstance(message, tuple) else str(message)
    text = formatEvent(event)
    return text


def json_observer(stream: IO[str], node: str) -> ILogObserver:
    """An observer writing each event as a JSON line to `stream` (whole lines, from any
    thread: the database pools log too)."""
    return FileLogObserver(_LockedStream(stream), lambda event: json_line(event, node))


def text_observer(stream: IO[str]) -> ILogObserver:
    """Twisted's classic lines (a newline in the text goes on an indented line), control
    characters shown escaped: a sender's ESC or CR would otherwise drive the operator's
    terminal (colour, a cursor moved back over the line to forge another)."""
    def line(event: dict) -> str | None:
        text = formatEventAsClassicLogText(event)
        return printable(text, lines=True) if text else text  # as the commands print it

    return FileLogObserver(_LockedStream(stream), line)


class _LockedStream(io.TextIOBase):
    """Writes and flushes one line at a time under a lock."""

    def __init__(self, stream: IO[str]):
        self._stream = stream
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            try:
                self._stream.write(text)
            except UnicodeEncodeError:
                # A lone surrogate (JSON input's "\\udc80", bytes decoded with surrogateescape)
                # or a character the stream's encoding lacks: the line, with "?", not lost.
                encoding = getattr(self._stream, "encoding", None) or "utf-8"
                self._stream.write(text.encode(encoding, "replace").decode(encoding))
            self._stream.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()


def filtered(observer: ILogObserver, level: str) -> ILogObserver:
    """`observer`, seeing only events at `level` (debug, info, warn, error) or above."""
    predicate = LogLevelFilterPredicate(defaultLogLevel=LEVELS.get(level, LEVELS["info"])[0])
    return FilteringLogObserver(observer, [predicate])


class StdlibBridge(logging.Handler):
    """The standard library's records (ours, SQLAlchemy's, Alembic's) into Twisted's log, so
    that both come out of one observer in one format."""

    def __init__(self, publisher: ILogObserver = globalLogPublisher, level: int = logging.NOTSET):
        super().__init__(level)
        self.publisher = publisher

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = {"log_namespace": record.name, "log_level": _twisted_level(record.levelno),
                     "log_time": record.created, "log_format": "{log_text}",
                     "log_text": record.getMessage()}
            if record.exc_info and record.exc_info[0] is not None:
                event["traceback"] = logging.Formatter().formatException(record.exc_info)
            self.publisher(event)
        except Exception:  # a log line must never fail its caller
            self.handleError(record)


def _twisted_level(levelno: int) -> LogLevel:
    for threshold, level in _FROM_STDLIB:
        if levelno >= threshold:
            return level
    return LogLevel.debug


def observer_for(log_format: str, node: str, stream: IO[str]) -> ILogObserver:
    return text_observer(stream) if log_format == "text" else json_observer(stream, node)


def setup_logging(level: str = "info", log_format: str = "json", node: str = "gateway-1",
                  stream: IO[str] | None = None) -> None:
    """Begin Twisted's global log to `stream` (stdout) in `log_format` at `level`, and send
    the standard library's records there too (once per process)."""
    stream = stream if stream is not None else sys.stdout
    globalLogBeginner.beginLoggingTo([filtered(observer_for(log_format, node, stream), level)],
                                     redirectStandardIO=False)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, StdlibBridge):
            root.removeHandler(handler)
    root.addHandler(StdlibBridge())
    root.setLevel(LEVELS.get(level, LEVELS["info"])[1])


@implementer(ILogObserver)
class Capture:
    """Collects formatted lines (tests, and anyone who wants the log in memory)."""

    def __init__(self, node: str = "test", level: str = "debug"):
        self.buffer = io.StringIO()
        self.observer = filtered(json_observer(self.buffer, node), level)

    def __call__(self, event: dict) -> None:
        self.observer(event)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.buffer.getvalue().splitlines() if line]

    def text(self) -> str:
        return self.buffer.getvalue()
