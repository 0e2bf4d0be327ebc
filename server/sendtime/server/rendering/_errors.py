"""The one error a template can cause, naming the file, the line and the field."""

from __future__ import annotations

from pathlib import Path

from sendtime.server.domain.errors import FieldViolation, InvalidInput


class TemplateError(InvalidInput):
    """A template that cannot be used: bad front matter, a Liquid syntax error,
    MJML that does not compile, or a render that fails even with every block
    at its fallback. ``str(error)`` reads ``path:line:column: problem``."""

    reason = "TEMPLATE_INVALID"

    def __init__(
        self,
        path: Path | str,
        problem: str,
        *,
        field: str = "",
        line: int | None = None,
        column: int | None = None,
        reason: str | None = None,
    ) -> None:
        where = str(path)
        if line is not None:
            where += f":{line}"
            if column is not None:
                where += f":{column}"
        message = f"{where}: {field + ': ' if field else ''}{problem}"
        super().__init__(message, [FieldViolation(field or where, problem)], reason=reason)
        self.path = str(path)
        self.problem = problem
        self.field_path = field
        self.line = line
        self.column = column
