"""Texts from outside made storable in either database: PostgreSQL's text holds no NUL and its
varchar(n) refuses a longer value, where SQLite takes both. One value that cannot be stored
fails its whole transaction: every other message of a group commit, a batch of translations
(and each sweep after it), a settlement of deliveries (and each retry after it)."""
from __future__ import annotations


def storable(text: str | None, limit: int | None = None) -> str | None:
    """`text` with each NUL as U+FFFD, cut to `limit` characters when given."""
    if text and "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    return text[:limit] if text and limit else text
