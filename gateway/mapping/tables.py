"""Code tables: a v2 code to a FHIR code (or a Coding), with a policy for codes not listed.

    # mappings/tables/administrative_gender.yaml
    description: HL7 table 0001 -> administrative-gender (v2-to-FHIR AdministrativeSex)
    unmapped: error          # error | default | passthrough
    default: unknown         # the answer for an unlisted code when unmapped is 'default'
    codes:
      F: female
      M: male

A value may be a code or a mapping (a Coding: system, code, display). Codes are compared
exactly, then without case, so that a sender's 'f' is 'F'.
"""
from __future__ import annotations

from dataclasses import dataclass

from gateway.mapping.source import Located, Problem

POLICIES = ("error", "default", "passthrough")
_UNLISTED = object()
_KEYS = ("description", "source", "unmapped", "default", "codes")


@dataclass(frozen=True)
class CodeTable:
    name: str
    codes: dict
    unmapped: str = "error"
    default: object = None
    description: str = ""

    def translate(self, code):
        """The target for `code`; KeyError(reason) when it is unmapped and the policy is error."""
        key = str(code).strip()
        found = self.codes.get(key, _UNLISTED)
        if found is _UNLISTED:
            found = self._folded.get(key.upper(), _UNLISTED)
        if found is not _UNLISTED:  # a code listed with no target (`X: ~`) gives nothing
            return found
        if not key:  # a field of blanks (fixed-width senders pad): no code, as an empty field
            return None
        if self.unmapped == "passthrough":
            return key
        if self.unmapped == "default":
            return self.default
        raise KeyError(f"code {key!r} is not in table {self.name!r}")

    @property
    def _folded(self) -> dict:
        folded = self.__dict__.get("_folded_cache")
        if folded is None:
            folded = {str(code).upper(): value for code, value in self.codes.items()}
            object.__setattr__(self, "_folded_cache", folded)
        return folded


def table_from(name: str, document, display: str, problems: list[Problem],
               base: CodeTable | None = None) -> CodeTable | None:
    """A table from its YAML document; a sender's table may `extends: true` the base one."""
    if not isinstance(document, dict):
        problems.append(Problem(display, 0, "", "a code table is a mapping with codes:"))
        return None
    line = document.line_of if isinstance(document, Located) else (lambda key: 0)
    for key in document:
        if key not in _KEYS + ("extends",):
            problems.append(Problem(display, line(key), str(key), f"unknown key; a table has {', '.join(_KEYS)}"))
    if not isinstance(document.get("extends", False), bool):
        problems.append(Problem(display, line("extends"), "extends", "extends: is true or false"))
    elif document.get("extends") and base is None:  # as a map file's: its codes would be the only ones
        problems.append(Problem(display, line("extends"), "extends",
                                f"there is no shared tables/{name}.yaml to extend"))
    unmapped = document.get("unmapped", base.unmapped if base else "error")
    if unmapped not in POLICIES:
        problems.append(Problem(display, line("unmapped"), "unmapped", f"must be one of {', '.join(POLICIES)}"))
        unmapped = "error"
    codes = document.get("codes")
    if not isinstance(codes, dict) or not codes:
        problems.append(Problem(display, line("codes"), "codes", "a table needs codes: {v2 code: target}"))
        codes = {}
    written: set[str] = set()
    for code in codes:
        where = codes.line_of(code) if isinstance(codes, Located) else line("codes")
        if code is None:  # `~:` or an empty key: it would be the code 'None'
            problems.append(Problem(display, where, "codes", "a code is empty"))
        elif str(code) != str(code).strip():  # never found: a sender's code is looked up without them
            problems.append(Problem(display, where, "codes", f"code {str(code)!r} has spaces around it"))
        elif str(code) in written:  # 1 and '1': one code, the last target silently winning
            problems.append(Problem(display, where, "codes", f"code {str(code)!r} is listed twice"))
        written.add(str(code))
        if not _is_target(codes[code]):
            problems.append(Problem(display, where, f"codes.{code}", _TARGET))
    codes = {str(code): _plain(value) for code, value in codes.items()}
    if document.get("extends") and base is not None:
        codes = {**base.codes, **codes}
    if not _is_target(document.get("default")):
        problems.append(Problem(display, line("default"), "default", _TARGET))
    default = _plain(document.get("default", base.default if base else None))
    if unmapped == "default" and "default" not in document and (base is None or base.default is None):
        problems.append(Problem(display, line("unmapped"), "default", "unmapped: default needs a default"))
    return CodeTable(name, codes, unmapped, default, str(document.get("description", "")))


_CODING = frozenset({"system", "version", "code", "display", "userSelected"})
_TARGET = "a target is a code, a Coding {system, code, display} or a CodeableConcept {coding, text}"


def _is_target(value) -> bool:
    """What a lookup may give: a code (or true/false, a number), a Coding, a CodeableConcept,
    or nothing. Anything else (a list, `{when: ...}`, a misspelt key) went into the bundle."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if not isinstance(value, dict):
        return False
    if set(value) <= _CODING:
        return all(isinstance(item, (str, bool)) for item in value.values())
    coding = value.get("coding", [])
    return set(value) <= {"coding", "text"} and isinstance(value.get("text", ""), str) \
        and isinstance(coding, list) and all(isinstance(item, dict) and set(item) <= _CODING
                                             and _is_target(item) for item in coding)


def _plain(value):
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value
