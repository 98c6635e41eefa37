"""Locate the SQL, migrations and projections shipped with the package.

A wheel carries them inside the package (``aura_pg/_sql`` ...); a source
checkout (editable install) has them at the repository root.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import LiteralString

_SOURCE_ROOT = Path(__file__).resolve().parent.parent
_NAME_LINE = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)
_LEADING_COMMENTS = re.compile(r"\A(?:[ \t]*--[^\n]*\n)+")


def resource_dir(name: str) -> Traversable:
    """The shipped directory ``sql``, ``migrations`` or ``projections``."""
    packaged = files("aura_pg") / f"_{name}"
    if packaged.is_dir():
        return packaged
    source = _SOURCE_ROOT / name
    if source.is_dir():
        return source
    raise FileNotFoundError(f"aura-pg resource directory {name!r} is missing from the install")


def migrations_path() -> Path:
    """Filesystem path of the migrations (alembic needs a real directory)."""
    return Path(str(resource_dir("migrations")))


def sql_text(relative_path: str) -> str:
    """The text of one file under ``sql/``."""
    node = resource_dir("sql")
    for part in relative_path.split("/"):
        node = node / part
    return node.read_text(encoding="utf-8")


@cache
def named_queries(relative_path: str) -> dict[str, LiteralString]:
    """The ``-- name: x`` sections of a ``.sql`` file, by name.

    The text comes from files shipped with the package, never from users:
    it is as safe as a literal in the code.
    """
    text = sql_text(relative_path)
    marks = list(_NAME_LINE.finditer(text))
    if not marks:
        raise ValueError(f"{relative_path} has no '-- name:' sections")
    queries: dict[str, LiteralString] = {}
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        end = following.start() if following else len(text)
        body = text[mark.end() : end].strip().rstrip(";").strip()
        # The comments stay in the file for the reader; the server (and the
        # span names that database instrumentation takes from the first
        # word) gets the statement.
        queries[mark.group(1)] = _LEADING_COMMENTS.sub("", body)
    return queries
