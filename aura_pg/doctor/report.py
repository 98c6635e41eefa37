"""The report of ``aura-pg doctor``: the overall status, text for people and
JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Final

from aura_pg.doctor.verdicts import CHECK_NAMES, Check, Status

_SEVERITY: Final[Mapping[Status, int]] = {"ok": 0, "warn": 1, "fail": 2}


def one_line(text: str) -> str:
    """``text`` with every run of whitespace (newlines too) as one space."""
    return " ".join(text.split())


def overall_status(checks: Sequence[Check]) -> Status:
    worst: Status = "ok"
    for check in checks:
        if _SEVERITY[check.status] > _SEVERITY[worst]:
            worst = check.status
    return worst


def not_run(checks: Sequence[Check]) -> list[str]:
    """The checks that did not run: all but ``connect`` when it failed."""
    if not any(c.name == "connect" and c.status == "fail" for c in checks):
        return []
    ran = {c.name for c in checks}
    return [name for name in CHECK_NAMES if name not in ran]


def format_report(checks: Sequence[Check]) -> str:
    """One line per check (status, name, detail, and the hint unless ok),
    then the skipped checks and a summary line."""
    width = max((len(c.name) for c in checks), default=0)
    lines = []
    for check in checks:
        line = f"{check.status.upper():<4}  {check.name:<{width}}  {one_line(check.detail)}"
        if check.hint and check.status != "ok":
            line += f"  -- hint: {one_line(check.hint)}"
        lines.append(line)
    skipped = not_run(checks)
    if skipped:
        lines.append(f"not run (no connection): {', '.join(skipped)}")
    counts = {status: sum(c.status == status for c in checks) for status in _SEVERITY}
    lines.append(
        f"doctor: {overall_status(checks)} ({counts['ok']} ok, {counts['warn']} warn, "
        f"{counts['fail']} fail)"
    )
    return "\n".join(lines) + "\n"


def format_json(checks: Sequence[Check], *, exit_code: int) -> str:
    """The checks as a JSON document, with the exit code the command returns."""
    return (
        json.dumps(
            {
                "status": overall_status(checks),
                "exit_code": exit_code,
                "checks": [dataclasses.asdict(c) for c in checks],
                "not_run": not_run(checks),
            },
            indent=2,
        )
        + "\n"
    )
