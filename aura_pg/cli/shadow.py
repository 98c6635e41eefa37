"""``aura-pg projections shadow|diff|promote``: run a new version of a
projection beside the live one, compare them, swap (aura_pg.projection.shadows);
docs/shadows.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path

from aura_pg._runtime import serve_until_signal
from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import non_negative_count
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.cli._daemon import configure_quiet_logging
from aura_pg.cli.project import add_projector_options, project_settings, projector_settings
from aura_pg.errors import CatalogError
from aura_pg.projection import shadows
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.runner import ProjectionRunner

log = logging.getLogger("aura_pg.shadows")


def add_parser(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the shadow actions to ``aura-pg projections``."""
    a = actions.add_parser(
        "shadow",
        help="run a new version of a projection beside the live one (NAME__shadow)",
        description="Build a new version of NAME from the first event into SCHEMA__shadow and "
        "keep it live beside the current one until stopped (SIGTERM); readers never see it "
        "under the live name. The new version is the catalog entry marked shadow_of: NAME, "
        "or NAME's entry with the definition SQL of --sql. Daemons (aura-pg project NAME) "
        "run the shadows of their projections too.",
    )
    a.add_argument("name")
    a.add_argument(
        "--sql",
        type=Path,
        help="the new definition SQL (default: the catalog entry with shadow_of: NAME)",
    )
    a.add_argument("--no-run", action="store_true", help="create it and exit; daemons run it")
    a.add_argument("--drop", action="store_true", help="drop the shadow (schema and row)")
    add_projector_options(a)
    add_connection_options(a)
    a.set_defaults(handler=run)
    a = actions.add_parser(
        "diff",
        help="compare a projection's read model with its shadow's at one checkpoint",
        description="Bring NAME and its shadow to one checkpoint and compare their tables row "
        f"by row, in one transaction. Exit {exit_codes.OK} when identical, "
        f"{exit_codes.DIFFERENT} when they differ.",
    )
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a.add_argument(
        "--limit",
        type=non_negative_count,
        default=20,
        help="rows shown per table and kind (default 20)",
    )
    add_connection_options(a)
    a.set_defaults(handler=run)
    a = actions.add_parser(
        "promote",
        help="swap the shadow in atomically; the old version becomes the shadow (rollback: "
        "promote again)",
    )
    a.add_argument("name")
    add_connection_options(a)
    a.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    resolved = connection(args)
    preflight(resolved)
    dsn = resolved.conninfo
    if args.action == "diff":
        result = shadows.diff(dsn, args.name, args.limit)
        if args.json:
            print(json.dumps(result.as_dict(), indent=2, default=str, ensure_ascii=False))
        else:
            print(format_diff(result))
        return exit_codes.OK if result.identical else exit_codes.DIFFERENT
    if args.action == "promote":
        print(f"{args.name}: {shadows.promote(dsn, args.name)}")
        return exit_codes.OK
    if args.drop:
        print(f"{args.name}: shadow {shadows.drop(dsn, args.name)}")
        return exit_codes.OK
    return _begin(args, dsn)


def _begin(args: argparse.Namespace, dsn: str) -> int:
    settings = project_settings(args)
    catalog = load_catalog(settings.catalog)
    # The catalog's entry marked `shadow_of: NAME`, else NAME's own entry
    # (with the definition SQL of --sql).
    spec = catalog.shadow_entry(args.name) or catalog.get(args.name)
    if args.sql is None and spec.shadow_of is None:
        raise CatalogError(
            f"the catalog has no entry with shadow_of: {args.name}: give the new definition "
            "with --sql FILE"
        )
    if args.sql is not None:
        try:
            spec = spec.model_copy(update={"definition_sql": args.sql.read_text(encoding="utf-8")})
        except OSError as exc:
            raise CatalogError(f"cannot read {args.sql}: {exc.strerror or exc}") from None
    configure_quiet_logging()
    outcome = shadows.begin(dsn, args.name, spec)
    print(f"{args.name}: shadow {shadows.shadow_name(args.name)} {outcome}")
    if args.no_run:
        return exit_codes.OK

    async def main() -> None:
        runner = ProjectionRunner(
            dsn, shadows.shadow_name(args.name), projector_settings(settings, wake="poll")
        )
        log.info("running %s until stopped", runner.name)
        await serve_until_signal(runner.run)

    asyncio.run(main())
    return exit_codes.OK


def format_diff(result: shadows.ShadowDiff) -> str:
    """A readable report: a line per table, then the differences shown."""
    changed = [t for t in result.tables if t.differing_rows or t.missing_from]
    lines = [
        f"{result.projection} and {shadows.shadow_name(result.projection)} at checkpoint "
        f"{result.checkpoint or '?'}: "
        + (
            "identical"
            if result.identical
            else f"{result.differing_rows} rows differ in {len(changed)} of "
            f"{len(result.tables)} tables"
        )
    ]
    for t in result.tables:
        if t.missing_from:
            present = "shadow" if t.missing_from == "live" else "live"
            lines.append(f"  {t.table}: only in the {present}")
            continue
        line = (
            f"  {t.table}: live {t.live_rows} rows, shadow {t.shadow_rows}; "
            f"{t.only_live} only in live, {t.only_shadow} only in shadow, {t.differs} differ"
        )
        if t.column_differences:
            line += f"; columns not alike: {', '.join(t.column_differences)}"
        lines.append(line)
    for d in result.differences:
        if d.difference == "columns":
            continue
        if d.difference == "differs":
            changes = ", ".join(
                f"{c}: {json.dumps(d.live.get(c), default=str)} -> "
                f"{json.dumps(d.shadow.get(c), default=str)}"
                for c in d.columns or []
            )
            lines.append(f"    {d.table} differs {json.dumps(d.key)}: {changes}")
        else:
            row = d.live if d.difference == "only_live" else d.shadow
            where = "live" if d.difference == "only_live" else "shadow"
            lines.append(f"    {d.table} only in {where}: {json.dumps(row, default=str)}")
    return "\n".join(lines)
