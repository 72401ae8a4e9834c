"""CSV exports of pharmacy software as an `Hl7Message`: one segment `ROW` per data row.

Rules (each refusal is a `CsvInputError` with the row and column):

- a header row is required; its names are normalised (lower case, anything but letters and
  digits as '_': 'Patient CNIE' -> 'patient_cnie'); empty or repeated names are refused;
- the delimiter is sniffed from the header line: ',' or ';' (or a tab), whichever occurs most
  outside quotes; a header with none of them is not CSV;
- bytes are UTF-8 (with or without BOM); otherwise the sender's fallback codec (cp1256 for
  Arabic exports, cp1252 for French ones); neither: refused, never guessed;
- a data row with more cells than the header is refused; a shorter one is padded (exports
  drop trailing empty cells); blank rows are skipped; at least one data row is required;
- values are ER7-escaped with the standard separators, so a '^' or '|' in a drug name never
  splits it.

**Profiles (the message type).** A CSV message map handles `CSV^<profile>`, and its segment
maps declare `columns:` (mappings/README.md). The header chooses the profile: the one whose
declared columns all appear in the header (the most columns when several do). ROW fields are
then laid out in the *profile's* column order (`ROW-1` is its first column, whatever the
file's order), followed by the header's other columns; a header that matches no profile gives
message type `CSV` and fields in header order. `csv_profiles(directory)` reads the profiles
of a mapping directory (the repository's `mappings/` by default).
"""
from __future__ import annotations

import csv
import hashlib
import io
import re
from functools import lru_cache
from pathlib import Path

import yaml

from adapters.hl7v2.message import Hl7Message, MessageParseError, Segment, Separators
from adapters.legacy.v2xml import escape

SEGMENT = "ROW"
DELIMITERS = (",", ";", "\t")
DEFAULT_MAX_SIZE = 64 * 1024 * 1024
DEFAULT_MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
_NAME = re.compile(r"[^0-9a-z]+")
_LINE_END = re.compile(r"[\r\n]")  # CRLF, LF, or CR alone (old Mac spreadsheets)


class CsvInputError(MessageParseError):
    """Not a usable CSV export; `location` is 'ROW[n]' (data row n) or 'ROW[n]-c', or 'header'."""

    def __init__(self, reason: str, row: int = 0, column: int = 0):
        super().__init__(reason, SEGMENT, row, column)
        self.row = row

    @property
    def location(self) -> str:
        return "header" if not self.row else super().location


def decode_csv(data: bytes, fallback_codec: str | None = None) -> tuple[str, str]:
    """(text, codec name)."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in data[:4096]:
        raise CsvInputError("binary data or UTF-16: CSV exports are read as UTF-8 or the "
                            "sender's 8-bit codec")
    try:
        return data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as error:
        if not fallback_codec:
            line = data.count(b"\n", 0, error.start) + 1
            raise CsvInputError(f"line {line}: not UTF-8 (byte 0x{data[error.start]:02x}) and the "
                                "sender has no fallback codec configured") from None
    try:
        return data.decode(fallback_codec), fallback_codec
    except LookupError:
        raise CsvInputError(f"unknown fallback codec {fallback_codec!r}") from None
    except UnicodeDecodeError as error:
        raise CsvInputError(f"neither UTF-8 nor {fallback_codec} (byte 0x{data[error.start]:02x})") from None


def normalise(name: str) -> str:
    return _NAME.sub("_", name.strip().lower()).strip("_")


def sniff_delimiter(header_line: str) -> str:
    """The delimiter of a header line ('' when it has none of ',', ';', tab outside quotes)."""
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in header_line:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(DELIMITERS, key=lambda d: counts[d])
    return best if counts[best] else ""


def looks_like_csv(data: bytes) -> bool:
    """A first line with a delimiter and no control characters (detection only)."""
    start = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    line = re.split(rb"[\r\n]", start, maxsplit=1)[0][:4096]
    if not line.strip() or line.lstrip()[:1] in (b"[", b"{", b"<", b"#") or any(byte < 0x20 and byte != 0x09 for byte in line):
        return False
    return bool(sniff_delimiter(line.decode("latin-1")))


def parse_csv(text: str, profiles: dict[str, tuple[str, ...]] | None = None) -> tuple[Hl7Message, str]:
    """(message, profile): the rows of a decoded CSV export; profile '' when none matched."""
    if text.startswith("\ufeff"):
        text = text[1:]
    first = _LINE_END.split(text, maxsplit=1)[0]  # the header only, whatever the line ends
    if not first.strip():
        raise CsvInputError("empty file: a header row is required")
    delimiter = sniff_delimiter(first)
    if not delimiter:
        raise CsvInputError("the header row has no ',' or ';' delimiter")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except csv.Error as error:
        raise CsvInputError(f"unreadable header row: {error}") from None
    # No text holds a NUL (the first 4 KB were checked for binary data when decoding): each
    # cell is looked at only when the file has one somewhere, and the first is located.
    nul = "\x00" in text
    if nul:
        _refuse_nul(header, 0)
    names = [normalise(cell) for cell in header]
    seen: set[str] = set()  # not names.index(): quadratic (40,000 columns took 10 s)
    for number, name in enumerate(names, 1):
        if not name:
            raise CsvInputError(f"column {number} of the header has no name", 0, number)
        if name in seen:
            raise CsvInputError(f"column {number} repeats the name {name!r}", 0, number)
        seen.add(name)
    profile, order = choose_profile(names, profiles or {})
    # A cell moves at most this far ahead of its column (the profile's columns come first).
    reach = len(profiles[profile]) if profile else 0
    width = len(names)
    segments = []
    row = 0
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise CsvInputError(f"unreadable row: {error}", row + 1) from None
        if not any(cell.strip() for cell in cells):
            continue
        row += 1
        if len(cells) > width:
            raise CsvInputError(f"{len(cells)} cells for {width} header columns", row, width + 1)
        if nul:
            _refuse_nul(cells, row)
        # The row's own cells only (an absent field reads as empty): padding each row to the
        # header's width cost rows x columns (4,000 one-cell rows under a 20,000-column
        # header, 137 KB, took 43 s and 650 MB).
        count = len(cells)
        segments.append(Segment(SEGMENT, [SEGMENT] + [escape(cells[index]) if index < count else ""
                                                      for index in order[:count + reach]]))
    if not segments:
        raise CsvInputError("no data row after the header")
    return Hl7Message(segments, Separators()), profile


def _refuse_nul(cells: list[str], row: int) -> None:
    for column, cell in enumerate(cells, 1):
        if "\x00" in cell:
            raise CsvInputError("a NUL byte (0x00): no text holds one", row, column)


def choose_profile(names: list[str], profiles: dict[str, tuple[str, ...]]) -> tuple[str, list[int]]:
    """(profile, column indexes in ROW field order) for a normalised header."""
    best, best_columns = "", ()
    present = set(names)
    for profile, columns in sorted(profiles.items()):
        if columns and set(columns) <= present and len(columns) > len(best_columns):
            best, best_columns = profile, columns
    order = [names.index(column) for column in best_columns]
    order += [index for index in range(len(names)) if index not in order]
    return best, order


def csv_profiles(directory: Path | str = DEFAULT_MAPPINGS) -> dict[str, tuple[str, ...]]:
    """profile -> declared columns, for each message map of `CSV^<profile>` in a mapping
    directory: the `columns:` of the first segment map it names that declares some.
    Read with plain YAML (the mapping set validates these files; a broken one gives nothing
    here and an error there)."""
    directory = Path(directory)
    messages = directory / "messages"
    if not messages.is_dir():
        return {}
    files = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in messages.glob("*.yaml")))
    segments = directory / "segments"
    stamps = tuple(sorted((str(p), p.stat().st_mtime_ns) for p in segments.glob("*.yaml"))) \
        if segments.is_dir() else ()
    return dict(_read_profiles(str(directory), files, stamps))


@lru_cache(maxsize=8)
def _read_profiles(directory: str, files: tuple, stamps: tuple) -> tuple:
    found = []
    for path, _ in files:
        document = _load(Path(path))
        types = document.get("messages") if isinstance(document, dict) else None
        types = [types] if isinstance(types, str) else types or []
        names = _map_names(document.get("resources") if isinstance(document, dict) else None)
        columns: tuple[str, ...] = ()
        for name in names:
            segment = _load(Path(directory) / "segments" / f"{name}.yaml")
            declared = segment.get("columns") if isinstance(segment, dict) else None
            if isinstance(declared, list) and declared:
                columns = tuple(str(column) for column in declared)
                break
        for message_type in types:
            if isinstance(message_type, str) and message_type.startswith("CSV^") and columns:
                found.append((message_type[4:], columns))
    return tuple(found)


def _load(path: Path):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None


def _map_names(entries) -> list[str]:
    names = []
    for entry in entries if isinstance(entries, list) else ():
        if isinstance(entry, dict):
            if isinstance(entry.get("map"), str):
                names.append(entry["map"])
            names += _map_names(entry.get("resources"))
    return names


def control_id_of(data: bytes) -> str:
    """CSV files carry no id: 'sha256:' and the first 16 hex digits of the bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]
