"""The identifier systems the gateway mints for a sender's own identifiers (a hospital's
medical record numbers, visit numbers): those that no national authority (DESIGN.md section
4) or ISO OID names. Pure code, shared by the mappings (which mint them), the ids (made as
before such identifiers had a system) and the shared record's conditional updates (a national
identifier, when a resource has one, is the better key)."""
from __future__ import annotations

from urllib.parse import quote

LOCAL_SYSTEM = "urn:ma:hie:local:"


def local_system(sender: str, assigner: str, kind: str) -> str:
    """urn:ma:hie:local:<sender>:<assigner>:<type>, each part percent-encoded: the same number
    from the same sender, assigner and type is one identifier; another sender's is another."""
    return LOCAL_SYSTEM + ":".join(quote(part, safe="") for part in (sender, assigner, kind))


def is_local(system: str) -> bool:
    return system.startswith(LOCAL_SYSTEM)
