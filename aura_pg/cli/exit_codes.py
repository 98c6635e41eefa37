"""The exit codes of ``aura-pg``, distinct so that scripts can tell a
usage error from a finding (docs/operators.md, "Exit codes")."""

from __future__ import annotations

from typing import Final

OK: Final = 0
"""Done; healthy; identical."""
ERROR: Final = 1
"""The command could not do its work: the database refused or cannot be
reached, a projection or dead letter is unknown, a migration is missing."""
USAGE: Final = 2
"""A bad flag or ``AURA_PG_*`` variable (argparse uses 2 for its own)."""
UNHEALTHY: Final = 3
"""A check found a problem: ``status`` an unhealthy projection, ``doctor``
a failing check (a warning too with ``--strict``), ``db status`` a
stopped cluster."""
DIFFERENT: Final = 4
"""``projections diff``: the shadow's read model differs from the live one."""
INTERRUPTED: Final = 130
"""Stopped by Ctrl-C before it finished (``demo``)."""
