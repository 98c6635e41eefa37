"""How the operator commands print rows: JSON for scripts (numbers stay
numbers, timestamps ISO 8601), padded columns for people."""

from __future__ import annotations

import datetime as dt
import decimal
import json
from collections.abc import Sequence
from typing import Any


def json_value(value: Any) -> Any:
    """JSON for what psycopg returns: numbers stay numbers, timestamps are
    ISO 8601, intervals are seconds."""
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    return str(value)


def dumps(value: Any, *, indent: int | None = None) -> str:
    return json.dumps(value, indent=indent, default=json_value, ensure_ascii=False)


def compact(value: Any) -> str:
    """One-line JSON with sorted keys, for data and metadata in text output."""
    return json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def print_rows(rows: list[dict[str, Any]], as_json: bool, columns: Sequence[str]) -> None:
    """``rows`` as a JSON list, or as a table of ``columns`` (cells cut at 60)."""
    if as_json:
        print(dumps(rows, indent=2))
        return
    if not rows:
        print("(none)")
        return
    cells = [[("" if row[c] is None else str(row[c]))[:60] for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for r in cells:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
