"""Acknowledgements built per HL7 v2 chapter 2, as bytes in the sender's own encoding.

- ACK MSH-3/4 name the gateway, MSH-5/6 echo the original MSH-3/4, MSH-10 is new,
  MSH-11/12 and MSH-18 are echoed, MSH-9 is `ACK^<trigger>^ACK` (without the structure
  before v2.3.1);
- MSA-1 is AA/AE/AR (original mode) or CA/CE/CR (enhanced mode), MSA-2 the original MSH-10;
- every negative ACK has an ERR segment: from v2.5, ERR-2 location, ERR-3 (table 0357),
  ERR-4 severity, ERR-5 our application code, ERR-7 the precise reason; before v2.5, ERR-1
  and the reason in MSA-3, which is what those receivers read.

Reasons are ours (positions, byte values, counts): never patient data.
"""
from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Protocol
from zoneinfo import ZoneInfo

from adapters.hl7v2.codes import (APP_ERROR_TABLE, AckCode, AppErrorCode, ErrorCondition, Outcome,
                                  Severity)
from adapters.hl7v2.header import DEFAULT_DELIMITERS, Delimiters, Location
from adapters.hl7v2.reference import version_at_least

DEFAULT_VERSION = b"2.5"


class HeaderView(Protocol):
    """What an ACK needs from the original: a MessageHeader, or a HeaderError's partial read."""

    delimiters: Delimiters

    def field(self, number: int) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ErrorDetail:
    condition: ErrorCondition
    location: Location
    reason: str
    app_code: AppErrorCode | None = None
    severity: Severity = Severity.ERROR


@dataclass(frozen=True, slots=True)
class Sender:
    """How the gateway names itself in the ACKs it sends (MSH-3 / MSH-4)."""

    application: bytes = b"MA_HIE_GATEWAY"
    facility: bytes = b"MA_HIE"


class ControlIds:
    """New MSH-10 values: unique across restarts and nodes, at most 20 characters (v2.5 ST):
    the process start in milliseconds (base 36), 4 random hex digits, then a hex counter."""

    def __init__(self, prefix: str | None = None):
        if prefix is None:
            prefix = _base36(int(time.time() * 1000)) + secrets.token_hex(2).upper()
        self._prefix = prefix.encode("ascii")
        self._counter = itertools.count(1)

    def next(self) -> bytes:
        return self._prefix + b"%08X" % next(self._counter)


class Hl7Clock:
    """HL7 timestamps (YYYYMMDDHHMMSS+ZZZZ) in the gateway's zone, formatted once per second."""

    def __init__(self, zone: str = "Africa/Casablanca", now=time.time):
        self._zone = ZoneInfo(zone)
        self._now = now
        self._second = -1
        self._text = b""

    def timestamp(self) -> bytes:
        second = int(self._now())
        if second != self._second:
            local = datetime.fromtimestamp(second, self._zone)
            self._text = local.strftime("%Y%m%d%H%M%S%z").encode("ascii")
            self._second = second
        return self._text


def escape(text: str, delimiters: Delimiters = DEFAULT_DELIMITERS) -> bytes:
    """Text made safe for an HL7 field: separators replaced by their escape sequences."""
    esc = delimiters.escape or b"\\"
    data = text.encode("ascii", "backslashreplace").replace(esc, esc + b"E" + esc)
    for separator, code in ((delimiters.field, b"F"), (delimiters.component, b"S"),
                            (delimiters.repetition, b"R"), (delimiters.subcomponent, b"T")):
        if separator:
            data = data.replace(separator, esc + code + esc)
    return data


class AckBuilder:
    """Builds ACK messages; one per gateway process (it numbers the ACKs it creates)."""

    def __init__(self, sender: Sender = Sender(), clock: Hl7Clock | None = None,
                 control_ids: ControlIds | None = None):
        self.sender = sender
        self.clock = clock or Hl7Clock()
        self.control_ids = control_ids or ControlIds()

    def own_fields(self, d: Delimiters) -> tuple[bytes, bytes, bytes]:
        """Our application, facility and the time, as the headers of our answers (MSH, FHS,
        BHS -3, -4 and -7) give them in the sender's delimiters: names escaped, and the time
        without its UTC offset when '+0100' would split it (a sender separating with + or -)."""
        stamp = self.clock.timestamp()
        return (*_own_names(self.sender, d), stamp[:14] if _offset_clashes(d) else stamp)

    def build(self, original: HeaderView, outcome: Outcome, enhanced: bool,
              error: ErrorDetail | None = None) -> bytes:
        """The ACK for `original` (without MLLP framing), segments ended by CR."""
        d = original.delimiters
        fs, cs = d.field, d.component
        fields = getattr(original, "fields", None)
        if fields is not None and len(fields) >= 18:  # a parsed MessageHeader: index directly
            application, facility, kind, control_id, processing, version_field, charset = (
                fields[2], fields[3], fields[8], fields[9], fields[10], fields[11], fields[17])
        else:
            field = original.field
            application, facility, kind, control_id, processing, version_field, charset = (
                field(3), field(4), field(9), field(10), field(11), field(12), field(18))
        version = version_field.split(cs, 1)[0] or DEFAULT_VERSION
        modern, with_structure = _version_traits(version)
        trigger = kind.split(cs, 2)[1:2]
        message_type = b"ACK"
        if trigger and trigger[0]:
            message_type += cs + trigger[0] + (cs + b"ACK" if with_structure else b"")
        own_application, own_facility, stamp = self.own_fields(d)
        msh = [b"MSH", d.encoding_characters, own_application, own_facility, application, facility,
               stamp, b"", message_type,
               self.control_ids.next(), processing or b"P", version_field or DEFAULT_VERSION]
        if charset:
            msh += [b"", b"", b"", b"", b"", charset]
        msa = fs.join((b"MSA", _ACK_BYTES[outcome, enhanced], control_id))
        if error is None:
            return fs.join(msh) + b"\r" + msa + b"\r"
        if modern:
            return fs.join(msh) + b"\r" + msa + b"\r" + _err_modern(error, d) + b"\r"
        msa += fs + escape(error.reason, d)
        return fs.join(msh) + b"\r" + msa + b"\r" + _err_legacy(error, d) + b"\r"


@lru_cache(maxsize=64)
def _own_names(sender: Sender, d: Delimiters) -> tuple[bytes, bytes]:
    """MSH-3 and MSH-4 of our ACKs, escaped for the sender's delimiters: a peer whose field
    separator is '_' or '-' must not read 'MA_HIE_GATEWAY' as three fields."""
    return (escape(sender.application.decode("ascii"), d),
            escape(sender.facility.decode("ascii"), d))


@lru_cache(maxsize=64)
def _offset_clashes(d: Delimiters) -> bool:
    """Whether a delimiter of the sender is a sign of a UTC offset: MSH-7 then goes without one
    (a timestamp is no text to escape)."""
    return any(sign in d.field + d.encoding_characters for sign in (b"+", b"-"))


_ACK_BYTES = {(outcome, enhanced): outcome.ack_code(enhanced).value.encode("ascii")
              for outcome in Outcome for enhanced in (False, True)}


@lru_cache(maxsize=64)
def _version_traits(version: bytes) -> tuple[bool, bool]:
    """(ERR in the v2.5 form, MSH-9 with its message structure) for an MSH-12 version."""
    text = version.decode("ascii", "replace")
    return version_at_least(text, (2, 5)), version_at_least(text, (2, 3, 1))


def _err_modern(error: ErrorDetail, d: Delimiters) -> bytes:
    fs, cs = d.field, d.component
    erl = [part.encode("ascii") for part in error.location.components()]
    condition = cs.join([str(error.condition.value).encode("ascii"), escape(error.condition.text, d),
                         b"HL70357"])
    app = b""
    if error.app_code is not None:
        app = cs.join([escape(error.app_code.value, d), escape(error.app_code.text, d),
                       escape(APP_ERROR_TABLE, d)])
    return fs.join([b"ERR", b"", cs.join(erl), condition, error.severity.value.encode("ascii"),
                    app, b"", escape(error.reason, d)])


def _err_legacy(error: ErrorDetail, d: Delimiters) -> bytes:
    cs, sub = d.component, d.subcomponent or b"&"
    location = error.location
    code = sub.join([str(error.condition.value).encode("ascii"), escape(error.condition.text, d),
                     b"HL70357"])
    return d.field.join([b"ERR", cs.join([location.segment.encode("ascii"),
                                          str(location.sequence).encode("ascii"),
                                          str(location.field or "").encode("ascii"), code])])


def _base36(number: int) -> str:
    digits = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def ack_code_of(ack: bytes) -> AckCode | None:
    """MSA-1 of an ACK message; None when there is no MSA segment or no valid MSA-1."""
    start = 0 if ack.startswith(b"MSA") else ack.find(b"\rMSA") + 1  # a segment, not MSH text
    if (start == 0 and not ack.startswith(b"MSA")) or len(ack) < start + 6:
        return None
    try:
        return AckCode(ack[start + 4:start + 6].decode("ascii"))
    except ValueError:
        return None

