"""The ``aura-pg`` command: one module per command group, each with
``add_parser(subparsers)`` and ``run(args) -> int``; the only place that
parses arguments. Exit codes: :mod:`aura_pg.cli.exit_codes`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import psycopg
import sqlalchemy.exc

from aura_pg.cli import (
    db,
    demo,
    dlq,
    doctor,
    exit_codes,
    export,
    importer,
    migrate,
    project,
    projections,
    relay,
    smoke,
    status,
    stream,
    tail,
)
from aura_pg.cli._connection import CannotConnect
from aura_pg.config import ConfigurationError, Connection, mask_text
from aura_pg.errors import AuraPgError
from aura_pg.store.validation import encodable

COMMANDS = (
    migrate, db, smoke, project, status, projections, dlq, stream, tail, demo, relay, importer,
    export, doctor,
)  # fmt: skip


def package_version() -> str:
    try:
        return version("aura-pg")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="aura-pg", description="aura-pg: a Postgres-native event store (docs/operators.md)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _mask(args: argparse.Namespace, text: str) -> str:
    connection = getattr(args, "connection", None)
    return connection.mask(text) if isinstance(connection, Connection) else mask_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    for argument in arguments:
        if not encodable(argument):
            # Bytes that are not UTF-8 reach Python as lone surrogates.
            shown = argument.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            print(f"aura-pg: argument {shown!r} is not valid UTF-8", file=sys.stderr)
            return exit_codes.USAGE
    args = build_parser().parse_args(arguments)
    prog = getattr(args, "prog", "aura-pg")
    try:
        code: int = args.handler(args)
    except ConfigurationError as exc:
        print(f"{prog}: {_mask(args, str(exc))}", file=sys.stderr)
        return exit_codes.USAGE
    except CannotConnect as exc:
        print(f"{prog}: {_mask(args, str(exc))}\nhint: {exc.hint}", file=sys.stderr)
        return exit_codes.ERROR
    except AuraPgError as exc:
        print(f"{prog}: {_mask(args, str(exc))}", file=sys.stderr)
        return exit_codes.ERROR
    except (psycopg.Error, sqlalchemy.exc.DBAPIError) as exc:
        # No traceback for what the database said; never a password.
        cause = getattr(exc, "orig", None) or exc
        text = " ".join(str(cause).split())
        print(f"{prog}: database error: {_mask(args, text)}", file=sys.stderr)
        return exit_codes.ERROR
    return code
