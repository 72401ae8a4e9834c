"""Golden cases: an input file beside the bundle it must translate into.

    mappings/tests/<area>/<case>.hl7     (or .xml, .astm, .csv)
    mappings/tests/<area>/<case>.json    the expected canonical bundle
    mappings/tests/<area>/<case>.sender  optional: the facility id it comes from
    mappings/tests/<area>/<case>.warnings  optional: the translation's warnings, one a line
                                           (without it, the case must translate without any)

Every case is translated as received at GOLDEN_RECEIVED_AT, in the sender's zone
(Africa/Casablanca), so that outputs are stable. The parts that change with every run or
every edit of the mappings (bundle timestamp, Provenance recorded time and mapping version)
are left out of the comparison.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

from adapters.legacy.csv_export import csv_profiles
from gateway import fhir_json
from gateway.mapping.mapping_set import MappingSet, Translation
from gateway.mapping.runtime import TranslationContext
from gateway.translation.inputs import read_input

GOLDEN_RECEIVED_AT = datetime(2026, 1, 15, 9, 30, tzinfo=timezone.utc)
INPUT_SUFFIXES = (".hl7", ".xml", ".astm", ".csv")


@dataclass
class CaseResult:
    input: Path
    expected: Path
    differences: list[str]

    @property
    def passed(self) -> bool:
        return not self.differences


def find_cases(root: Path) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.suffix in INPUT_SUFFIXES and path.is_file())


def translate_case(mapping_set: MappingSet, path: Path) -> Translation:
    sender_file = path.with_suffix(".sender")
    sender = sender_file.read_text(encoding="utf-8").strip() if sender_file.exists() else ""
    # A CSV case is read with the profiles of the mapping set under test, not the repository's.
    profiles = csv_profiles(mapping_set.directory) if path.suffix == ".csv" else None
    parsed = read_input(path.read_bytes(), csv_profiles=profiles)
    context = TranslationContext(sender_id=sender, timezone=ZoneInfo("Africa/Casablanca"),
                                 received_at=GOLDEN_RECEIVED_AT,
                                 message_key=f"{sender or parsed.sending_facility}|{parsed.control_id}",
                                 control_id=parsed.control_id)
    return mapping_set.translate(parsed.message, context, parsed.message_type)


def stable(bundle: dict) -> dict:
    """The bundle without what changes from run to run or with every mapping edit (decimals
    kept as written: 5.10 is not 5.1)."""
    bundle = fhir_json.loads(fhir_json.dumps(bundle))
    bundle.pop("timestamp", None)
    for entry in bundle.get("entry", ()):
        resource = entry.get("resource", {})
        if resource.get("resourceType") == "Provenance":
            resource.pop("recorded", None)
            resource.pop("policy", None)
    return bundle


def check_case(mapping_set: MappingSet, path: Path) -> CaseResult:
    expected_path = path.with_suffix(".json")
    translation = translate_case(mapping_set, path)
    actual = stable(translation.bundle)
    if not expected_path.exists():
        return CaseResult(path, expected_path, [f"no expected output {expected_path.name}"])
    expected = expected_bundle(expected_path)
    return CaseResult(path, expected_path, list(differences(expected, actual))
                      + warning_differences(path, translation.warnings))


def expected_bundle(expected_path: Path) -> dict:
    """A case's expected bundle, as `stable` gives it (decimals as written)."""
    return stable(fhir_json.loads(expected_path.read_text(encoding="utf-8")))


def expected_warnings(path: Path) -> list[str]:
    """The warnings a case's `.warnings` file lists ([] without one)."""
    found = path.with_suffix(".warnings")
    if not found.exists():
        return []
    return [line for line in found.read_text(encoding="utf-8").splitlines() if line.strip()]


def warning_differences(path: Path, warnings: list[str]) -> list[str]:
    """What differs between the translation's warnings and the case's `.warnings`."""
    expected = expected_warnings(path)
    found = [f"warning missing: {text}" for text in expected if text not in warnings]
    found += [f"warning unexpected: {text}" for text in warnings if text not in expected]
    return found


def write_expected(mapping_set: MappingSet, path: Path) -> Path:
    """Write the case's expected bundle (and its `.warnings`, when it has any)."""
    expected_path = path.with_suffix(".json")
    translation = translate_case(mapping_set, path)
    bundle = stable(translation.bundle)
    expected_path.write_text(fhir_json.dumps(bundle, indent=True).decode("utf-8") + "\n", encoding="utf-8")
    warnings_path = path.with_suffix(".warnings")
    if translation.warnings:
        warnings_path.write_text("".join(text + "\n" for text in translation.warnings), encoding="utf-8")
    elif warnings_path.exists():
        warnings_path.unlink()
    return expected_path


def differences(expected, actual, where: str = "Bundle"):
    """Human-readable differences, as element paths."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        for key in expected.keys() | actual.keys():
            if key not in actual:
                yield f"{where}.{key}: missing (expected {_short(expected[key])})"
            elif key not in expected:
                yield f"{where}.{key}: unexpected {_short(actual[key])}"
            else:
                yield from differences(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list) and isinstance(actual, list):
        if len(expected) != len(actual):
            yield f"{where}: {len(actual)} items, expected {len(expected)}"
        for number, (left, right) in enumerate(zip(expected, actual)):
            yield from differences(left, right, f"{where}[{number}]")
    elif expected != actual or _is_number(expected) and _text(expected) != _text(actual):
        yield f"{where}: {_short(actual)}, expected {_short(expected)}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _text(value) -> str:
    """A value as written in the JSON: a decimal's precision counts (FHIR R4 decimal)."""
    return fhir_json.dumps(value).decode("utf-8")


def _short(value) -> str:
    text = _text(value)
    return text if len(text) <= 80 else text[:77] + "..."
