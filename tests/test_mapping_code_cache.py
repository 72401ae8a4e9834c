"""Compiled mapping code is kept between processes, by the source it came from: a start, a
reload or a `gateway mappings` command that finds the same mapping set skips compile(); a
changed source, a damaged entry or a cache that cannot be written cost a compile, nothing more."""
from __future__ import annotations

import pytest

from gateway.mapping import code_cache

SOURCE = "def f(x):\n    return x * 2\n"


@pytest.fixture
def compiles(monkeypatch, tmp_path):
    """The cache in tmp_path/cache; the list of the sources compile() was asked for."""
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "cache"))
    asked = []

    def counting(source, filename, mode):
        asked.append(source)
        return compile(source, filename, mode)

    monkeypatch.setattr(code_cache, "compile", counting, raising=False)
    return asked


def run(code):
    namespace = {}
    exec(code, namespace)
    return namespace["f"](21)


def test_the_same_source_is_compiled_once_across_processes(compiles, tmp_path):
    assert run(code_cache.compiled(SOURCE, "<mappings test>")) == 42
    assert run(code_cache.compiled(SOURCE, "<mappings test>")) == 42
    assert compiles == [SOURCE]
    [entry] = (tmp_path / "cache" / "mappings").glob("*.code")
    assert code_cache.compiled(SOURCE, "<mappings test>").co_filename == "<mappings test>"
    other = SOURCE.replace("2", "3")
    assert run(code_cache.compiled(other, "<mappings test>")) == 63  # another source, another entry
    assert run(code_cache.compiled(SOURCE, "<mappings other>")) == 42  # another name too
    assert compiles == [SOURCE, other, SOURCE]


def test_a_damaged_entry_is_compiled_again_and_replaced(compiles, tmp_path):
    code_cache.compiled(SOURCE, "<m>")
    [entry] = (tmp_path / "cache" / "mappings").glob("*.code")
    for damage in (b"", b"\x00garbage", entry.read_bytes()[:100]):
        entry.write_bytes(damage)
        assert run(code_cache.compiled(SOURCE, "<m>")) == 42
    assert len(compiles) == 4 and run(code_cache.compiled(SOURCE, "<m>")) == 42 and len(compiles) == 4


def test_a_cache_that_cannot_be_written_costs_a_compile_only(compiles, tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("a file where the folder would be")
    monkeypatch.setenv("GATEWAY_CACHE_DIR", str(tmp_path / "blocked"))
    assert run(code_cache.compiled(SOURCE, "<m>")) == 42
    assert run(code_cache.compiled(SOURCE, "<m>")) == 42
    assert len(compiles) == 2


def test_only_the_newest_entries_are_kept(compiles, tmp_path, monkeypatch):
    monkeypatch.setattr(code_cache, "KEEP", 3)
    folder = tmp_path / "cache" / "mappings"
    for n in range(5):
        code_cache.compiled(f"x = {n}\n", "<m>")
    assert len(list(folder.glob("*.code"))) == 3 and not list(folder.glob(".*.tmp"))
    code_cache.compiled("x = 4\n", "<m>")  # the newest is among them
    assert len(compiles) == 5


def test_a_syntax_error_is_raised_and_not_kept(compiles, tmp_path):
    with pytest.raises(SyntaxError):
        code_cache.compiled("def (:\n", "<m>")
    assert not list((tmp_path / "cache" / "mappings").glob("*.code"))
