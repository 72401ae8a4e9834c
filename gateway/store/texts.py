"""Texts from outside made storable in either database: PostgreSQL's text holds no NUL and its
varchar(n) refuses a longer value, where SQLite takes both. One value that cannot be stored
fails its whole transaction: every other message of a group commit, a batch of translations
(and each sweep after it), a settlement of deliveries (and each retry after it)."""
from __future__ import annotations

import re

_CONTROL = re.compile("[\x00-\x1f\x7f]")


def storable(text: str | None, limit: int | None = None) -> str | None:
    """`text` with each NUL as U+FFFD, cut to `limit` characters when given."""
    if text and "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text[:limit] if text and limit else text


def has_control(text: str) -> bool:
    """Whether `text` holds a control character (C0 or DEL): no identifier, name or search
    term does, and PostgreSQL's text cannot keep NUL."""
    return _CONTROL.search(text) is not None
