"""Errors and the ingestion report: every input row is either kept or explained.

The report exists because silently dropping rows hides data problems that change
the experiment; users must see how many rows were read, kept and skipped, and why.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

from prefprune.errors import DataError

#: Stable skip reasons (part of the public contract; used in reports and JSON): a row is only
#: ever skipped for one of these.
REASONS = (
    "malformed_json",
    "malformed_row",
    "missing_field",
    "empty_field",
    "wrong_type",
    "identical_responses",
    "hh_prompt_mismatch",
    "duplicate_id",
    "bad_choice",
    "unknown_split",
    "malformed_message",
    "no_shared_prompt",
    "tie_label",
    "unknown_label",
    "too_deep",
)


class RowIssue(Exception):
    """Internal: one row cannot be converted; carries a stable reason for the report."""

    def __init__(self, reason: str, field: str | None, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.field = field
        self.detail = detail


@dataclass
class SkippedRow:
    """One input row that was not kept, with where it is and why.

    ``line`` is the 1-based line number for JSON-lines input and the 0-based row
    index for other containers (``unit`` says which), matching ``source_row``.
    """

    file: str
    line: int | None
    field: str | None
    reason: str
    detail: str
    unit: str = "line"

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"skip reason {self.reason!r} is not one of the stable REASONS")

    @property
    def location(self) -> str:
        """``file:LINE`` for line-based input, ``file[row N]`` otherwise."""
        if self.line is None:
            return self.file
        if self.unit == "line":
            return f"{self.file}:{self.line}"
        return f"{self.file}[row {self.line}]"

    def message(self) -> str:
        """One-line description used both in reports and in strict-mode errors."""
        where = f" (field '{self.field}')" if self.field else ""
        return f"{self.location}: {self.reason}{where}: {self.detail}"


@dataclass
class IngestionReport:
    """Counts of what happened to the rows of one source; ``read == kept + skipped``."""

    source: str
    format: str
    read: int
    kept: int
    skipped: list[SkippedRow] = field(default_factory=list)
    container: str = ""

    def __post_init__(self) -> None:
        if self.read != self.kept + len(self.skipped):
            raise ValueError(
                f"report invariant broken: read {self.read} != kept {self.kept} "
                f"+ skipped {len(self.skipped)}"
            )

    def by_reason(self) -> dict[str, int]:
        """Number of skipped rows per reason, most frequent first."""
        return dict(Counter(row.reason for row in self.skipped).most_common())

    def require_pairs(self, purpose: str | None = None) -> None:
        """Raise :class:`DataError` when no row was kept, with the main reasons and where to
        see each row: otherwise the user only learns, later, that a split is empty."""
        if self.kept:
            return
        reasons = ", ".join(f"{count} {reason}" for reason, count
                            in list(self.by_reason().items())[:3])
        used = f" for {purpose}" if purpose else ""
        raise DataError(f"{self.source}: no usable pairs{used}: all {self.read} rows "
                        f"were skipped ({reasons}); 'prefprune data inspect {self.source}', with "
                        "the same data options, lists each one")

    def to_dict(self) -> dict:
        """JSON-serialisable form, for run metadata."""
        return {
            "source": self.source,
            "format": self.format,
            "container": self.container,
            "read": self.read,
            "kept": self.kept,
            "skipped_count": len(self.skipped),
            "by_reason": self.by_reason(),
            "skipped": [asdict(row) for row in self.skipped],
        }

    def render(self, max_issues: int = 10) -> str:
        """Human-readable summary: totals, breakdown by reason, the first issues."""
        lines = [
            f"Ingestion of {self.source} (format {self.format}, container {self.container})",
            f"read {self.read} = kept {self.kept} + skipped {len(self.skipped)}",
        ]
        lines += [f"  {reason}: {count}" for reason, count in self.by_reason().items()]
        if self.skipped:
            shown = self.skipped[:max_issues]
            lines.append(f"first {len(shown)} of {len(self.skipped)} issues:")
            lines += [f"  {row.message()}" for row in shown]
        return "\n".join(lines)
