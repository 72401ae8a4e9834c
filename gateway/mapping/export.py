"""Mapping files as the HL7 v2-to-FHIR guide's tables, for clinical review.

Every rule of every map becomes one row: the map, the source path, the condition, the target
element, the transform, the code table and the nested map it uses, in the order written.
This walks the YAML documents as written (after a successful `MappingSet.load`, so they are
known to be valid), not the compiled closures.
"""
from __future__ import annotations

from dataclasses import astuple, dataclass
from pathlib import Path

from gateway.mapping.mapping_set import KINDS
from gateway.mapping.rules import VOCABULARY
from gateway.mapping.source import MappingErrors, Problem, read_yaml
from gateway.mapping.transforms import load_all

COLUMNS = ("map", "source", "condition", "target", "transform", "lookup", "nested_map")
TRANSFORMS = load_all()


@dataclass(frozen=True)
class Row:
    map: str
    source: str
    condition: str
    target: str
    transform: str
    lookup: str
    nested_map: str

    def values(self) -> tuple[str, ...]:
        return astuple(self)


def export_rows(directory: Path | str) -> list[Row]:
    """The rows of every message, segment and datatype map under `directory` (shared maps
    first, then each facility's), in file order."""
    directory = Path(directory)
    problems: list[Problem] = []
    rows: list[Row] = []
    folders = [("", directory)]
    senders = directory / "senders"
    if senders.is_dir():
        folders += [(f"senders/{p.name}/", p) for p in sorted(senders.iterdir()) if p.is_dir()]
    for prefix, folder in folders:
        for kind in KINDS:
            if kind == "tables" or not (folder / kind).is_dir():
                continue
            for path in sorted((folder / kind).glob("*.yaml")):
                if path.name.startswith("."):  # not a map: an editor's lock file, as for loading
                    continue
                document = read_yaml(path, str(path), problems)
                if not isinstance(document, dict):
                    continue
                name = prefix + path.stem
                if kind == "messages":
                    rows += _not_translated(name, document.get("not_translated"))
                    rows += _entries(name, document.get("resources") or [], "")
                else:
                    rows += _object(name, document.get("map") or {}, "")
    if problems:
        raise MappingErrors(problems)
    return rows


def _not_translated(name: str, spec) -> list[Row]:
    """A map's `not_translated:`: one row, the reason as its target (and its condition)."""
    if isinstance(spec, str):
        return [Row(name, "MSH-9", "", f"not translated: {spec.strip()}", "", "", "")]
    if isinstance(spec, dict):
        return [Row(name, "", _condition(spec.get("when")), f"not translated: {spec.get('reason', '')}",
                    "", "", "")]
    return []


def _entries(name: str, entries, scope: str) -> list[Row]:
    rows = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict):
            continue
        source = entry.get("from") or entry.get("each") or ""
        if isinstance(source, list):
            source = " + ".join(str(part) for part in source)
        source = f"{scope} > {source}" if scope and source else (source or scope)
        target = entry.get("resource") or ""
        label = entry.get("name") or ""
        mapped = entry.get("map")
        nested = mapped if isinstance(mapped, str) else ""
        rows.append(Row(name, str(source), _condition(entry.get("when")),
                        f"{label}: {target}" if label and target else str(label or target),
                        "", "", nested))
        if isinstance(mapped, dict):
            rows += _object(f"{name}/{label or target}", mapped, "")
        rows += _entries(name, entry.get("resources"), str(source))
    return rows


def _object(name: str, spec: dict, prefix: str) -> list[Row]:
    rows = []
    for target, rule in spec.items() if isinstance(spec, dict) else ():
        rows += _rule(name, rule, f"{prefix}{target}")
    return rows


def _rule(name: str, rule, target: str, condition: str = "") -> list[Row]:
    if isinstance(rule, list):
        return [row for item in rule for row in _rule(name, item, target, condition)]
    if not isinstance(rule, dict):
        return [Row(name, "", condition, target, "", "", f"= {rule}")]
    if not any(key in VOCABULARY for key in rule):
        return _object(name, rule, f"{target}.")  # an object written directly
    condition = " and ".join(part for part in (condition, _condition(rule.get("when"))) if part)
    if "first_of" in rule:
        rows = []
        # transform, lookup and data_absent beside first_of apply to the option chosen.
        shared = {key: rule[key] for key in ("transform", "lookup", "data_absent") if key in rule}
        for number, option in enumerate(rule["first_of"] or [], 1):
            if shared and isinstance(option, dict) and any(key in VOCABULARY for key in option):
                option = {**shared, **option}
            rows += _rule(name, option, target, " and ".join(
                part for part in (condition, f"first of #{number}") if part))
        return rows
    source = rule.get("from") or rule.get("each") or ""
    if "each" in rule:
        source = f"each {source}"
    elif not source and rule.get("transform") in TRANSFORMS:
        source = TRANSFORMS[rule["transform"]].reads  # what a node transform reads of its value
    mapped = rule.get("map")
    nested = mapped if isinstance(mapped, str) else ""
    if "default" in rule:
        nested = nested or f"default {rule['default']}"
    if "data_absent" in rule:
        absent = f"unreadable: data-absent-reason {rule['data_absent']}"
        nested = f"{nested}; {absent}" if nested else absent
    row = Row(name, str(source), condition, target, str(rule.get("transform") or ""),
              str(rule.get("lookup") or ""), nested)
    if isinstance(mapped, dict):
        return [row] + _object(name, mapped, f"{target}.")
    return [row]


def _condition(when) -> str:
    if not when:
        return ""
    if isinstance(when, list):
        return " and ".join(_condition(part) for part in when)
    if not isinstance(when, dict):
        return str(when)
    field = when.get("field", "")
    for key, word in (("is", "="), ("in", "in"), ("not_in", "not in")):
        if key in when:
            value = when[key]
            shown = "[" + ", ".join(str(v) for v in value) + "]" if isinstance(value, list) else str(value)
            return f"{field} {word} {shown}"
    if "present" in when:
        return f"{field} {'present' if when['present'] else 'absent'}"
    if list(when) == ["before"]:
        return f"before the first {when['before']}"
    if list(when) == ["any"] and isinstance(when["any"], list):  # as the guide writes it, not a Python dict
        return "(" + " or ".join(_condition(part) for part in when["any"]) + ")"
    return ", ".join(f"{key}={value}" for key, value in when.items())
