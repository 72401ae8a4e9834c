"""FHIR OperationOutcome bodies and the one exception that carries them to the HTTP answer.

Diagnostics are written by the peer and never echo the input's values, so an answer can be
logged and kept in a dead letter without carrying patient data.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Issue:
    """One OperationOutcome.issue. `code` is from the FHIR IssueType value set."""

    code: str
    diagnostics: str
    expression: str | None = None
    severity: str = "error"

    def to_json(self) -> dict:
        issue = {"severity": self.severity, "code": self.code, "diagnostics": self.diagnostics}
        if self.expression:
            issue["expression"] = [self.expression]
        return issue


class FhirError(Exception):
    """A request the peer refuses: the HTTP status and the issues of its OperationOutcome."""

    def __init__(self, status: int, issues: list[Issue] | Issue):
        self.status = status
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        super().__init__(f"HTTP {status}: " + "; ".join(issue.diagnostics for issue in self.issues))

    @classmethod
    def single(cls, status: int, code: str, diagnostics: str, expression: str | None = None):
        return cls(status, Issue(code, diagnostics, expression))

    def outcome(self) -> dict:
        return operation_outcome(self.issues)


def operation_outcome(issues: list[Issue]) -> dict:
    return {"resourceType": "OperationOutcome", "issue": [issue.to_json() for issue in issues]}
