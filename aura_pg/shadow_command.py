"""``aura-pg projections shadow|diff|promote``: the command side of
:mod:`aura_pg.projection.shadows`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path

from aura_pg.errors import CatalogError
from aura_pg.projection import shadows
from aura_pg.projection.catalog import load_catalog
from aura_pg.projection.runner import ProjectionRunner
from aura_pg.projection.settings import ProjectorSettings

ACTIONS = ("shadow", "diff", "promote")
EXIT_DIFFERENT = 2
"""`aura-pg projections diff`: the shadow's read model differs from the live one."""

log = logging.getLogger("aura_pg.shadows")


def add_actions(
    actions: argparse._SubParsersAction[argparse.ArgumentParser],
    with_daemon_options: Callable[[argparse.ArgumentParser], None],
) -> None:
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
    with_daemon_options(a)
    a = actions.add_parser(
        "diff",
        help="compare a projection's read model with its shadow's at one checkpoint",
        description="Bring NAME and its shadow to one checkpoint and compare their tables row "
        "by row, in one transaction. Exit 0 when identical, 2 when they differ.",
    )
    a.add_argument("name")
    a.add_argument("--json", action="store_true")
    a.add_argument(
        "--limit", type=int, default=20, help="rows shown per table and kind (default 20)"
    )
    a = actions.add_parser(
        "promote",
        help="swap the shadow in atomically; the old version becomes the shadow (rollback: "
        "promote again)",
    )
    a.add_argument("name")


def run(
    args: argparse.Namespace,
    dsn: str,
    settings: Callable[[], ProjectorSettings],
    stop_on_signals: Callable[[], asyncio.Event],
) -> int:
    if args.action == "diff":
        if args.limit < 0:
            raise CatalogError("--limit must be 0 or more")
        result = shadows.diff(dsn, args.name, args.limit)
        if args.json:
            print(json.dumps(result.as_dict(), indent=2, default=str, ensure_ascii=False))
        else:
            print(format_diff(result))
        return 0 if result.identical else EXIT_DIFFERENT
    if args.action == "promote":
        print(f"{args.name}: {shadows.promote(dsn, args.name)}")
        return 0
    if args.drop:
        print(f"{args.name}: shadow {shadows.drop(dsn, args.name)}")
        return 0
    catalog = load_catalog(args.catalog)
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
    outcome = shadows.begin(dsn, args.name, spec)
    print(f"{args.name}: shadow {shadows.shadow_name(args.name)} {outcome}")
    if args.no_run:
        return 0

    async def main() -> None:
        stop = stop_on_signals()
        runner = ProjectionRunner(dsn, shadows.shadow_name(args.name), settings())
        log.info("running %s until stopped", runner.name)
        await runner.run(stop)

    asyncio.run(main())
    return 0


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
