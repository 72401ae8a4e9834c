"""Dates, times and numbers: HL7 v2 text into FHIR R4 primitives.

FHIR R4 rules: a dateTime with a time has seconds and a zone; a date has no time. A v2 time
without an offset is in the sender's zone (TranslationContext.timezone, Africa/Casablanca by
default, whose offset changes around Ramadan: zoneinfo, never a fixed offset). A wall-clock
time that occurs twice when clocks go back is read as the first (fold=0); one that does not
exist when they go forward is moved forward by the gap, as zoneinfo does.

The date and time transforms are lenient (gateway.mapping.transforms): a value that is no date
('Aug 15, 1942', a 15-digit OBX-14) leaves an optional element out with a warning naming the
field and the text, and the message is translated; a `required` rule fails with the reason.
"""
from __future__ import annotations

import math
import re
import sys
from datetime import datetime, timedelta, timezone

from gateway.fhir_json import exact_decimal
from gateway.mapping.runtime import FIELD
from gateway.mapping.transforms import transform

# ASCII digits only (re.ASCII): \d also matches Arabic-Indic and other digits, which int() reads
# but which would be copied into the FHIR text. Each part nested in the one before it: a
# fraction follows the seconds only ('202501140835.5', '20250114.5' are no DTM).
_DTM = re.compile(r"^(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
                  r"([+-]\d{4})?$", re.ASCII)
_TM = re.compile(r"^(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?([+-]\d{4})?$", re.ASCII)
_cache: dict[tuple, str | None] = {}


def raw_components(raw: str, run, level: int = FIELD) -> list[str]:
    """A value's components (its subcomponents when `level` is a component's), still escaped;
    a separator a short MSH-2 leaves out ('') is never in a value."""
    separator = run.separators.component if level == FIELD else run.separators.subcomponent
    return raw.split(separator) if separator and separator in raw else [raw]


def _parts(text: str):
    match = _DTM.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    year, month, day, hour, minute, second, fraction, offset = match.groups()
    if year == "0000" or month and not 1 <= int(month) <= 12 or day and not _is_day(year, month, day):
        raise ValueError(f"{text!r} is not a valid date")  # FHIR has no year 0000
    if hour and (int(hour) > 23 or minute and int(minute) > 59 or second and int(second) > 60):
        raise ValueError(f"{text!r} is not a valid time")
    if offset and not _is_offset(offset):
        raise ValueError(f"{text!r} has no valid offset (+/-HHMM, minutes 00-59, at most 14 hours)")
    return year, month, day, hour, minute, second, fraction, offset


def _is_day(year: str, month: str, day: str) -> bool:
    try:
        datetime(int(year), int(month), int(day))  # 30 February
    except ValueError:
        return False
    return True


def _is_offset(offset: str) -> bool:
    """An offset FHIR can write (-14:00 to +14:00, whole minutes): '+0175' is no 02:15."""
    return int(offset[3:5]) <= 59 and offset[1:] <= "1400"


def fhir_datetime(text: str, zone) -> str:
    """A v2 DTM/TS as a FHIR dateTime: partial dates kept, times completed to seconds with zone."""
    key = (text, zone)
    cached = _cache.get(key)
    if cached is not None:
        return cached
    year, month, day, hour, minute, second, fraction, offset = _parts(text)
    if not hour:
        result = "-".join(part for part in (year, month, day) if part)
    else:
        moment = datetime(int(year), int(month), int(day or 1), int(hour), int(minute or 0),
                          min(int(second or 0), 59))
        if offset:
            sign = 1 if offset[0] == "+" else -1
            moment = moment.replace(tzinfo=timezone(sign * timedelta(hours=int(offset[1:3]),
                                                                   minutes=int(offset[3:5]))))
        else:
            try:
                moment = _local(moment, zone)
                if moment.utcoffset().seconds % 60:
                    # Local mean time before standard zones (Casablanca before 1913: -00:30:20):
                    # FHIR offsets are whole minutes, so the instant is written in UTC, exactly.
                    moment = moment.astimezone(timezone.utc)
            except OverflowError:  # year 1 or 9999 in a zone whose UTC is in year 0 or 10000
                raise ValueError(f"{text!r} is out of the range of dates in zone {zone}") from None
        result = moment.isoformat(timespec="seconds")
        if fraction:
            result = result[:19] + "." + fraction + result[19:]
        if result.endswith("+00:00") and offset is None and zone is not None and str(zone) == "UTC":
            result = result[:-6] + "Z"
    if len(_cache) < 65536:
        _cache[key] = result
    return result


def _local(moment: datetime, zone) -> datetime:
    aware = moment.replace(tzinfo=zone, fold=0)
    # A time in the spring-forward gap does not exist: zoneinfo gives it the offset before the
    # change; normalising through UTC moves it forward by the gap.
    return aware.astimezone(timezone.utc).astimezone(zone)


_ZEROS = re.compile(r"^0{4,}(?:\.0+)?(?:[+-]\d{4})?$")


def is_placeholder(value: str, run) -> bool:
    """The HL7 null ('""': the value is deleted) or an all-zero date ('0000', '00000000'),
    which senders write for 'unknown' and is no date (FHIR has no year 0): nothing is mapped,
    the latter with a warning."""
    text = value.strip()
    if text == '""':
        return True
    if _ZEROS.match(text) is None:
        return False
    run.warnings.append(f"date {value.strip()!r} is a placeholder for an unknown date: not mapped")
    return True


@transform("datetime", lenient=True)
def to_datetime(value: str, run) -> str | None:
    """v2 DTM/TS -> FHIR dateTime (seconds and the sender's zone when a time is given)."""
    if is_placeholder(value, run):
        return None
    return fhir_datetime(value, run.context.timezone)


@transform("date", lenient=True)
def to_date(value: str, run) -> str | None:
    """v2 DT/DTM/TS -> FHIR date (the time, if any, is dropped)."""
    if is_placeholder(value, run):
        return None
    year, month, day, *_ = _parts(value)
    return "-".join(part for part in (year, month, day) if part)


@transform("instant", lenient=True)
def to_instant(value: str, run) -> str | None:
    """v2 DTM/TS with at least a time -> FHIR instant (a date alone is refused)."""
    if is_placeholder(value, run):
        return None
    result = fhir_datetime(value, run.context.timezone)
    if "T" not in result:
        raise ValueError(f"{value!r} has no time; an instant needs one")
    return result


@transform("time", lenient=True)
def to_time(value: str, run) -> str:
    """v2 TM -> FHIR time (hh:mm:ss; the offset, which FHIR time cannot carry, is dropped)."""
    match = _TM.match(value.strip())
    if not match:
        raise ValueError(f"{value!r} is not an HL7 time (HH[MM[SS[.S]]][+/-ZZZZ])")
    hour, minute, second, fraction, _ = match.groups()
    if int(hour) > 23 or int(minute or 0) > 59 or int(second or 0) > 59:
        raise ValueError(f"{value!r} is not a valid time")
    text = f"{hour}:{minute or '00'}:{second or '00'}"
    return text + "." + fraction if fraction else text


_NUMBER = re.compile(r"^[+-]?(?:\d+(\.\d*)?|\.\d+)$")
_NONZERO = re.compile("[1-9]")


def in_range(number, text: str) -> bool:
    """`number`, read from `text`, is one a double holds: past 1.8e308 float() gives infinity,
    which JSON has no number for (the stored bundle would say null), and a non-zero value
    under 5e-324 reads as 0."""
    return -sys.float_info.max <= number <= sys.float_info.max and (
        number != 0 or _NONZERO.search(text) is None)


@transform("decimal")
def to_decimal(value: str, run):
    """v2 NM -> a JSON number as written: an int, or a decimal that keeps its precision
    (gateway.fhir_json.ExactDecimal: '5.10' stays 5.10); '1,5' with a decimal comma is read."""
    text = value.strip()
    if "," in text and "." not in text and text.count(",") == 1:
        text = text.replace(",", ".")
    match = _NUMBER.match(text)
    if match is None:
        raise ValueError(f"{value!r} is not a number")
    try:
        number = exact_decimal(text) if match.group(1) is not None or text.startswith((".", "+.", "-.")) \
            else int(text)
    except ValueError:  # an integer of more than 4,300 digits (Python's limit)
        number = math.inf
    if not in_range(number, text):
        raise ValueError(f"{value!r} is out of range (a number up to 1.8e308)")
    return number


_FHIR_INTEGER = range(-2**31, 2**31)


@transform("integer")
def to_integer(value: str, run) -> int:
    """v2 NM/SI -> a JSON integer, in FHIR's range (32 bits)."""
    text = value.strip()
    if not re.fullmatch(r"[+-]?\d+", text):
        raise ValueError(f"{value!r} is not an integer")
    if len(text.lstrip("+-0")) > 10 or int(text) not in _FHIR_INTEGER:
        raise ValueError(f"{value!r} is out of the range of a FHIR integer (-2147483648 to 2147483647)")
    return int(text)


@transform("boolean")
def to_boolean(value: str, run) -> bool:
    """v2 ID Y/N (table 0136) -> true/false."""
    text = value.strip().upper()
    if text in ("Y", "YES", "T", "TRUE", "1"):
        return True
    if text in ("N", "NO", "F", "FALSE", "0"):
        return False
    raise ValueError(f"{value!r} is not Y or N")


@transform("trim")
def trimmed(value: str, run) -> str:
    """Text without leading and trailing blanks."""
    return value.strip()


_BLANKS = re.compile(r"\s+")


@transform("code")
def to_code(value: str, run):
    """v2 ID/IS/CWE-1 -> FHIR code: no leading or trailing blanks, inner blanks as one space
    (a code 'PI ' is 'PI'; FHIR refuses the blanks)."""
    text = value.strip()
    if not text:
        return None
    return _BLANKS.sub(" ", text) if not text.isalnum() else text
