"""Texts from outside made storable in either database: PostgreSQL's text holds no NUL and its
varchar(n) refuses a longer value, where SQLite takes both; neither driver encodes a lone
UTF-16 surrogate (what Python's json reads a "\\ud800" escape as) into UTF-8. One value that
cannot be stored fails its whole transaction: every other message of a group commit, a batch
of translations (and each sweep after it), a settlement of deliveries (and each retry after
it)."""
from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def storable(text: str | None, limit: int | None = None) -> str | None:
    """`text` with each NUL and each lone surrogate as U+FFFD, cut to `limit` characters when
    given."""
    if text:
        if "\x00" in text:
            text = text.replace("\x00", "\ufffd")
        if not text.isascii():
            text = _SURROGATE.sub("\ufffd", text)
    return text[:limit] if text and limit else text


def is_storable(text: str | None, limit: int | None = None) -> bool:
    """Whether `text` is stored as it is (`storable` would leave it unchanged)."""
    return not text or ((limit is None or len(text) <= limit) and "\x00" not in text
                        and (text.isascii() or _SURROGATE.search(text) is None))


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (C0 or DEL): no identifier, name or search
    term does, and PostgreSQL's text cannot keep NUL."""
    return _CONTROL.search(text) is not None
