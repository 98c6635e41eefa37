"""argparse types for the commands' options, built from the validators the
settings use (aura_pg.config), so that a flag and its ``AURA_PG_*``
variable are checked alike: a usage error (exit 2), never a traceback."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TypeVar

from aura_pg import config

T = TypeVar("T")


def argtype(check: Callable[[object], T]) -> Callable[[str], T]:
    """``check`` (which raises ValueError with a readable reason) as an
    argparse type, whose errors argparse reports with the option's name."""

    def parse(text: str) -> T:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse


positive_seconds = argtype(config.positive_seconds)
non_negative_seconds = argtype(config.non_negative_seconds)
positive_count = argtype(config.positive_count)
non_negative_count = argtype(config.non_negative_count)
port_number = argtype(config.port_number)
statement_timeout = argtype(config.statement_timeout)
