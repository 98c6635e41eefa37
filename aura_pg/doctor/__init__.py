"""``aura-pg doctor``: check a database and its server for what aura-pg needs.

Each check runs a read-only query and says ``ok``, ``warn`` or ``fail``,
with a hint for the last two: :mod:`~aura_pg.doctor.checks` runs the
queries, :mod:`~aura_pg.doctor.verdicts` holds the rules (pure functions),
:mod:`~aura_pg.doctor.report` prints them. docs/doctor.md is the guide.
"""

from aura_pg.doctor.checks import run_checks
from aura_pg.doctor.report import format_json, format_report, overall_status
from aura_pg.doctor.verdicts import CHECK_NAMES, Check, Status

__all__ = [
    "CHECK_NAMES",
    "Check",
    "Status",
    "format_json",
    "format_report",
    "overall_status",
    "run_checks",
]
