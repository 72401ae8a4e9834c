"""Compiled mapping code kept between processes, as Python keeps its bytecode: the generated
source of a mapping set is about a megabyte, and compile() took most of a second of every
start, reload and `gateway mappings` command for code that is the same as last time.

A file per source, named by the SHA-256 of the source, its file name and the interpreter's
bytecode version, so that an entry is never stale: a changed mapping makes other source, a
new Python another key. Kept under $GATEWAY_CACHE_DIR, else $XDG_CACHE_HOME/ma-hie-gateway,
else ~/.cache/ma-hie-gateway (the newest KEEP entries). A cache that cannot be read or written
costs the compile() and nothing else.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import marshal
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

KEEP = 32  # entries; a mapping set makes one per layer (shared, and each sender's)


def directory() -> Path | None:
    configured = os.environ.get("GATEWAY_CACHE_DIR")
    try:
        base = Path(configured) if configured else \
            Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ma-hie-gateway"
    except RuntimeError:  # no home directory to be found
        return None
    return base / "mappings"


def compiled(source: str, filename: str):
    """compile(source, filename, "exec"), or the code an earlier process compiled from it."""
    folder = directory()
    if folder is None:
        return compile(source, filename, "exec")
    digest = hashlib.sha256(importlib.util.MAGIC_NUMBER + filename.encode("utf-8", "surrogatepass") + b"\0"
                            + source.encode("utf-8", "surrogatepass")).hexdigest()
    path = folder / f"{digest}.code"
    try:
        return marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):  # none yet, or unreadable: made again
        pass
    code = compile(source, filename, "exec")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".", suffix=".tmp", delete=False) as file:
            file.write(marshal.dumps(code))
        os.replace(file.name, path)  # whole or not at all, for another process reading it
        _prune(folder)
    except OSError as error:
        log.debug("compiled mappings not cached in %s: %s", folder, error)
    return code


def _prune(folder: Path) -> None:
    entries = sorted(folder.glob("*.code"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        old.unlink(missing_ok=True)
