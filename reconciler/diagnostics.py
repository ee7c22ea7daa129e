"""A problem found in the manifests, pointing at the file, line and field it concerns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, order=True)
class Diagnostic:
    """One problem found in the manifests, pointing at the file, line and field it concerns."""

    file: str
    line: int
    col: int
    summary: str
    field_path: str = ""
    hint: str = ""
    severity: str = field(default="error", compare=False)

    def to_json(self) -> dict:
        return {
            "severity": self.severity,
            "file": self.file,
            "line": self.line,
            "col": self.col,
            "field": self.field_path,
            "summary": self.summary,
            "hint": self.hint,
        }
