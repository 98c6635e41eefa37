"""``aura-pg import nats``: import a NATS JetStream stream into the store
(aura_pg.importer), exactly once; docs/import.md. ``aura-pg import jsonl``:
import an ``aura-pg export`` file through the bulk path (aura_pg.jsonl);
docs/import-export.md."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import sys
from contextlib import nullcontext

import psycopg

from aura_pg import jsonl
from aura_pg._runtime import serve_until_signal
from aura_pg.cli import exit_codes
from aura_pg.cli._argtypes import argtype
from aura_pg.cli._connection import add_connection_options, connection, preflight
from aura_pg.cli._daemon import (
    add_logging_options,
    configure_logging,
    logging_settings,
    observed,
)
from aura_pg.cli.settings import ImportSettings, flags_given, nats_name
from aura_pg.config import ConfigurationError, positive_count, positive_seconds
from aura_pg.errors import AuraPgError
from aura_pg.importer import (
    EventModelMapping,
    FileMapping,
    ImportConfigError,
    ImportStats,
    MessageMapping,
    NatsImporter,
    load_callable,
)
from aura_pg.importer.nats import CONSUMER_PREFIX
from aura_pg.store import EventStore
from aura_pg.store.operations import DEFAULT_CHUNK_EVENTS, DEFAULT_CHUNK_STREAMS, MAX_BULK_STREAMS

log = logging.getLogger("aura_pg.importer")

PROG = "aura-pg import nats"
JSONL_PROG = "aura-pg import jsonl"


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "import",
        help="import events from another system into the store, exactly once",
        description="Import events from another system; see docs/import.md.",
    )
    sources = p.add_subparsers(dest="source", required=True, metavar="SOURCE")
    n = sources.add_parser(
        "nats",
        help="import a NATS JetStream stream",
        description="Import a NATS JetStream stream through a durable pull consumer, "
        "exactly once and in each aggregate's publish order, alongside the system that writes it; "
        "see docs/import.md. Every option has an AURA_PG_IMPORT_* variable "
        "(e.g. AURA_PG_IMPORT_SERVER); a flag wins over it.",
    )
    add_connection_options(n)
    n.add_argument(
        "--server", metavar="URL[,URL...]", help="NATS server URL(s) (required, here or in env)"
    )
    n.add_argument(
        "--stream", type=argtype(nats_name), help="the JetStream stream (required, here or in env)"
    )
    n.add_argument(
        "--subject", metavar="FILTER", help="import only the subjects this filter matches"
    )
    n.add_argument(
        "--consumer",
        type=argtype(nats_name),
        metavar="NAME",
        help=f"durable consumer name (default: {CONSUMER_PREFIX}STREAM)",
    )
    chosen = n.add_mutually_exclusive_group()
    chosen.add_argument(
        "--mapping",
        metavar="MODULE:FUNCTION",
        help="a Python function mapping a SourceMessage to an ImportedEvent",
    )
    chosen.add_argument(
        "--mapping-file", metavar="FILE", help="a YAML mapping (fields, headers, templates)"
    )
    n.add_argument(
        "--stream-prefix",
        metavar="PREFIX",
        help="default mapping: stream id = PREFIX + aggregate_id",
    )
    n.add_argument(
        "--until-end",
        action=argparse.BooleanOptionalAction,
        help="stop once the consumer has nothing left; print a JSON summary",
    )
    seconds = argtype(positive_seconds)
    defaults = ImportSettings.model_fields
    for flag, text in (
        (
            "--ack-wait",
            "redeliver a message not acknowledged within this time, e.g. after a crash "
            "(set when the consumer is created)",
        ),
        ("--fetch-timeout", "how long one fetch waits for a message"),
        ("--lag-interval", "log the lag this often"),
    ):
        default = defaults[flag[2:].replace("-", "_")].default
        n.add_argument(flag, type=seconds, metavar="SECONDS", help=f"{text} (default {default})")
    n.add_argument(
        "--window",
        type=argtype(positive_count),
        metavar="N",
        help="messages delivered and not yet acknowledged at once; each aggregate's "
        f"order is kept whatever the window (default {defaults['window'].default})",
    )
    add_logging_options(n)
    n.set_defaults(handler=run, prog=PROG)

    j = sources.add_parser(
        "jsonl",
        help="import a JSON Lines file (aura-pg export), through the bulk path",
        description="Import one event per line (the format of `aura-pg export`) in chunks "
        "of consecutive lines, each one transaction, every event at its recorded version "
        "and the file's commit order kept. Run again after an interruption, with the "
        "same chunk options: committed chunks are found recorded and nothing is "
        "imported twice. recorded_at is not imported (the target records its own time). "
        "See docs/import-export.md.",
    )
    j.add_argument("file", metavar="FILE", help="the JSONL file ('-' for standard input)")
    j.add_argument(
        "--chunk-events",
        type=argtype(positive_count),
        default=DEFAULT_CHUNK_EVENTS,
        metavar="N",
        help=f"events per transaction (default {DEFAULT_CHUNK_EVENTS})",
    )
    j.add_argument(
        "--chunk-streams",
        type=argtype(chunk_streams),
        default=DEFAULT_CHUNK_STREAMS,
        metavar="N",
        help=f"streams per transaction, one lock each (default {DEFAULT_CHUNK_STREAMS}, "
        f"at most {MAX_BULK_STREAMS})",
    )
    j.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    add_connection_options(j)
    j.set_defaults(handler=run_jsonl, prog=JSONL_PROG)


def chunk_streams(text: object) -> int:
    count = positive_count(text)
    if count > MAX_BULK_STREAMS:
        raise ValueError(f"must be at most {MAX_BULK_STREAMS}")
    return count


def run_jsonl(args: argparse.Namespace) -> int:
    conninfo = connection(args)
    preflight(conninfo)

    def progress(line: int, summary: jsonl.ImportSummary) -> None:
        if not args.quiet:
            print(
                f"{JSONL_PROG}: line {line}: {summary.appended} events imported, "
                f"{summary.duplicates} found recorded",
                file=sys.stderr,
            )

    try:
        opened = open(args.file, encoding="utf-8") if args.file != "-" else None  # noqa: SIM115
    except OSError as exc:
        raise AuraPgError(f"cannot read {args.file}: {exc.strerror}") from None
    with (
        opened or nullcontext(sys.stdin) as lines,
        EventStore.connect(conninfo.conninfo, max_size=1) as store,
    ):
        summary = jsonl.import_lines(
            store,
            lines,
            chunk_events=args.chunk_events,
            chunk_streams=args.chunk_streams,
            progress=progress,
        )
    print(json.dumps(dataclasses.asdict(summary)))
    return exit_codes.OK


def mapping_of(settings: ImportSettings) -> MessageMapping:
    """The mapping the settings choose: --mapping, --mapping-file, or the
    default (with --stream-prefix)."""
    if settings.mapping and settings.mapping_file:
        raise ConfigurationError("give --mapping or --mapping-file, not both")
    if settings.stream_prefix and (settings.mapping or settings.mapping_file):
        raise ConfigurationError("--stream-prefix applies to the default mapping only")
    try:
        if settings.mapping:
            return load_callable(settings.mapping)
        if settings.mapping_file:
            return FileMapping.load(settings.mapping_file)
    except ImportConfigError as exc:
        raise ConfigurationError(str(exc)) from None
    return EventModelMapping(settings.stream_prefix)


def run(args: argparse.Namespace) -> int:
    logs = logging_settings(args)
    settings = ImportSettings.resolve(**flags_given(args, ImportSettings))
    configure_logging(logs)
    servers = [url.strip() for url in (settings.server or "").split(",") if url.strip()]
    if not servers:
        raise ConfigurationError("--server (or AURA_PG_IMPORT_SERVER) needs a NATS URL")
    if settings.stream is None:
        raise ConfigurationError("--stream (or AURA_PG_IMPORT_STREAM) is required")
    mapping = mapping_of(settings)
    connection_info = connection(args)
    importer = NatsImporter(
        connection_info.conninfo,
        servers,
        settings.stream,
        mapping,
        subject=settings.subject,
        consumer=settings.consumer,
        ack_wait=settings.ack_wait,
        fetch_timeout=settings.fetch_timeout,
        lag_interval=settings.lag_interval,
        window=settings.window,
    )

    async def work(stop: asyncio.Event) -> ImportStats:
        async with importer:
            return await importer.run(stop, until_end=settings.until_end)

    try:
        with observed(connection_info.conninfo, logs, "import") as heartbeat:
            stats = asyncio.run(serve_until_signal(work, heartbeat=heartbeat))
    except (psycopg.Error, AuraPgError) as exc:
        print(f"{PROG}: {connection_info.mask(str(exc).strip())}", file=sys.stderr)
        return exit_codes.ERROR
    summary = dataclasses.asdict(stats)
    if settings.until_end:
        print(json.dumps(summary))
    log.info("stopped: %s", summary)
    return exit_codes.OK
